#pragma once
//! \file
//! Deterministic bytes and schedules for tests: `fill_random` (splitmix64,
//! fast enough to refill MiBs per test), `test_rng` (uniform and log-uniform
//! sizes), `first_difference` (where two byte ranges differ, for a readable
//! failure) and `unique_segment_name` (segment names unique in the process).
//!
//! \code
//! std::vector<std::byte> a(4096), b(4096);
//! kvx::testing::fill_random(a, 1);
//! EXPECT_EQ(kvx::testing::first_difference(a, b), "");
//! \endcode

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <string_view>

#include <kvx/core/splitmix64.hpp>
#include <kvx/memory/segment_table.hpp>

namespace kvx::testing {

//! Deterministic pseudo-random bytes (splitmix64).
inline void fill_random(std::span<std::byte> out, std::uint64_t seed) {
  std::uint64_t s = seed;
  auto next = [&s] { return splitmix64_next(s); };
  std::size_t i = 0;
  for (; i + 8 <= out.size(); i += 8) {
    const std::uint64_t v = next();
    std::memcpy(out.data() + i, &v, 8);
  }
  if (i < out.size()) {
    const std::uint64_t v = next();
    std::memcpy(out.data() + i, &v, out.size() - i);
  }
}

//! Small deterministic generator for test schedules.
class test_rng {
 public:
  explicit test_rng(std::uint64_t seed) : s_(seed) {}
  std::uint64_t next() { return splitmix64_next(s_); }
  //! Uniform in [lo, hi].
  std::uint64_t uniform(std::uint64_t lo, std::uint64_t hi) { return lo + next() % (hi - lo + 1); }
  //! Log-uniform in [lo, hi]: small and large sizes equally often.
  std::uint64_t log_uniform(std::uint64_t lo, std::uint64_t hi) {
    const int bits = 64 - __builtin_clzll(hi);
    for (;;) {
      const std::uint64_t cap = std::uint64_t{1} << uniform(0, static_cast<std::uint64_t>(bits));
      const std::uint64_t v = uniform(lo, std::min(hi, std::max(lo, cap)));
      if (v >= lo && v <= hi) return v;
    }
  }

 private:
  std::uint64_t s_;
};

//! "" when equal, else where the first difference is.
inline std::string first_difference(std::span<const std::byte> got, std::span<const std::byte> want) {
  if (got.size() != want.size()) return "sizes differ: " + std::to_string(got.size()) + " vs " + std::to_string(want.size());
  if (std::memcmp(got.data(), want.data(), got.size()) == 0) return {};
  for (std::size_t i = 0; i < got.size(); ++i)
    if (got[i] != want[i])
      return "first difference at byte " + std::to_string(i) + " of " + std::to_string(got.size()) + ": got " +
             std::to_string(static_cast<int>(got[i])) + ", want " + std::to_string(static_cast<int>(want[i]));
  return {};
}

//! A process-unique segment name (transports such as `local` share one table per process).
inline std::string unique_segment_name(std::string_view prefix) {
  static std::atomic<std::uint64_t> counter{0};
  return std::string(prefix) + "-" + std::to_string(counter.fetch_add(1)) + "-" +
         std::to_string(memory::detail::random_u64() % 1000000);
}

}  // namespace kvx::testing
