#pragma once
//! \file
//! `tier_conformance<Factory>`: the typed GoogleTest suite every cache tier
//! must pass; run it on your own tier through a factory that makes one:
//!
//! \code
//! struct my_tier_factory {
//!   using tier_type = my::map_tier;
//!   static std::unique_ptr<my::map_tier> make(std::uint64_t capacity);   // a fresh, empty tier
//!   static std::string skip_reason() { return {}; }                      // optional: why it cannot run here
//! };
//! KVX_INSTANTIATE_TIER_CONFORMANCE(MyTier, my_tier_factory);
//! \endcode
//!
//! It checks the concept (with the sentences of `check_tier`), byte-exact
//! round trips of odd sizes through pageable host buffers, the error of every
//! refused call (`already_exists` leaving the first bytes, `not_found`,
//! `out_of_range` for a short buffer), erase, `contains` / `size_of` /
//! `used_bytes` accounting against `footprint()`, filling the tier up to
//! `capacity_exceeded` without losing a stored block, and concurrent calls on
//! distinct keys. Needs GoogleTest (link GTest::gtest_main).

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include <kvx/cache/tier.hpp>

namespace kvx::testing {

template <class Factory>
class tier_conformance : public ::testing::Test {
 protected:
  using tier_type = typename Factory::tier_type;
  static constexpr std::uint64_t capacity = 1 << 20;

  void SetUp() override {
    if constexpr (requires { Factory::skip_reason(); }) {
      if (auto why = Factory::skip_reason(); !why.empty()) GTEST_SKIP() << why;
    }
    tier = Factory::make(capacity);
    ASSERT_TRUE(tier);
  }

  static cache::block_key key(std::uint64_t i) { return cache::block_key{0x7469657273ULL, i}; }
  static std::vector<std::byte> bytes(std::size_t n, std::uint64_t seed) {
    std::vector<std::byte> v(n);
    std::uint64_t x = seed * 0x9e3779b97f4a7c15ULL + 1;
    for (auto& b : v) {
      x ^= x << 13;
      x ^= x >> 7;
      x ^= x << 17;
      b = std::byte(static_cast<unsigned char>(x));
    }
    return v;
  }
  // Loads `k` into a buffer of exactly its size (plus guard bytes that must survive).
  std::vector<std::byte> load(const cache::block_key& k, std::size_t n) {
    std::vector<std::byte> out(n + 16, std::byte{0xA5});
    auto got = tier->load(k, std::span(out).first(n));
    EXPECT_TRUE(got) << got.error().message();
    if (got) {
      EXPECT_EQ(*got, n);
    }
    for (std::size_t i = n; i < out.size(); ++i) EXPECT_EQ(out[i], std::byte{0xA5}) << "load wrote past its buffer";
    out.resize(n);
    return out;
  }

  std::unique_ptr<tier_type> tier;
};

TYPED_TEST_SUITE_P(tier_conformance);

TYPED_TEST_P(tier_conformance, SatisfiesTheConcept) {
  static_assert(cache::check_tier<typename TypeParam::tier_type>());
  EXPECT_FALSE(this->tier->name().empty());
  EXPECT_GT(this->tier->capacity(), 0u);
  EXPECT_EQ(this->tier->used_bytes(), 0u);
}

TYPED_TEST_P(tier_conformance, RoundTripsOddSizesByteExact) {
  const std::size_t sizes[] = {1, 7, 4095, 4096, 4097, 65536 + 3};
  std::uint64_t i = 0;
  for (auto n : sizes) {
    auto in = this->bytes(n, i);
    ASSERT_TRUE(this->tier->store(this->key(i), in)) << n;
    EXPECT_TRUE(this->tier->contains(this->key(i)));
    EXPECT_EQ(this->tier->size_of(this->key(i)), n);
    EXPECT_EQ(this->load(this->key(i), n), in) << n << " bytes";
    ++i;
  }
}

TYPED_TEST_P(tier_conformance, RefusedCallsSayWhyAndChangeNothing) {
  auto first = this->bytes(5000, 1);
  ASSERT_TRUE(this->tier->store(this->key(1), first));
  const auto used = this->tier->used_bytes();
  auto again = this->tier->store(this->key(1), this->bytes(5000, 2));
  ASSERT_FALSE(again);
  EXPECT_EQ(again.code(), errc::already_exists);
  EXPECT_EQ(this->tier->used_bytes(), used);
  EXPECT_EQ(this->load(this->key(1), 5000), first) << "a refused store must not overwrite";

  std::vector<std::byte> out(5000);
  EXPECT_EQ(this->tier->load(this->key(2), out).code(), errc::not_found);
  std::vector<std::byte> small(4999);
  EXPECT_EQ(this->tier->load(this->key(1), small).code(), errc::out_of_range);
  EXPECT_FALSE(this->tier->contains(this->key(2)));
  EXPECT_EQ(this->tier->size_of(this->key(2)), std::nullopt);
}

TYPED_TEST_P(tier_conformance, EraseFreesOnceAndAccountingFollowsFootprint) {
  auto& t = *this->tier;
  std::uint64_t expected = 0;
  for (std::uint64_t i = 0; i < 5; ++i) {
    const std::size_t n = 1000 + 3000 * i;
    ASSERT_TRUE(t.store(this->key(i), this->bytes(n, i)));
    expected += cache::footprint(t, n);
  }
  EXPECT_EQ(t.used_bytes(), expected);
  EXPECT_TRUE(t.erase(this->key(2)));
  EXPECT_FALSE(t.erase(this->key(2)));
  EXPECT_FALSE(t.contains(this->key(2)));
  EXPECT_EQ(t.used_bytes(), expected - cache::footprint(t, 7000));
  EXPECT_EQ(this->load(this->key(3), 10000), this->bytes(10000, 3)) << "erasing one block left the others intact";
}

TYPED_TEST_P(tier_conformance, FullIsCapacityExceededAndLosesNothing) {
  auto& t = *this->tier;
  constexpr std::size_t n = 60000;
  std::uint64_t stored = 0;
  for (;; ++stored) {
    auto r = t.store(this->key(stored), this->bytes(n, stored));
    if (!r) {
      EXPECT_EQ(r.code(), errc::capacity_exceeded) << r.error().message();
      break;
    }
    ASSERT_LT(stored, 10'000u) << "the tier never filled up";
  }
  EXPECT_GT(stored, 0u);
  EXPECT_LE(t.used_bytes(), t.capacity());
  EXPECT_FALSE(t.contains(this->key(stored))) << "a refused store leaves no entry";
  for (std::uint64_t i = 0; i < stored; ++i) EXPECT_EQ(this->load(this->key(i), n), this->bytes(n, i)) << "block " << i;
  ASSERT_TRUE(t.erase(this->key(0)));
  EXPECT_TRUE(t.store(this->key(stored), this->bytes(n, stored))) << "room freed by an erase is usable";
}

TYPED_TEST_P(tier_conformance, ConcurrentCallsOnDistinctKeysStayByteExact) {
  constexpr int threads = 4, rounds = 40;
  std::atomic<int> failures{0};
  std::vector<std::thread> pool;
  for (int w = 0; w < threads; ++w) {
    pool.emplace_back([&, w] {
      for (int r = 0; r < rounds; ++r) {
        const auto k = this->key(static_cast<std::uint64_t>(w * 1000 + r));
        const std::size_t n = 2048 + static_cast<std::size_t>(w * 97 + r);
        auto in = this->bytes(n, static_cast<std::uint64_t>(w * 1000 + r));
        if (!this->tier->store(k, in)) {
          ++failures;
          continue;
        }
        std::vector<std::byte> out(n);
        auto got = this->tier->load(k, out);
        if (!got || *got != n || out != in) ++failures;
        if (r % 2 == 0 && !this->tier->erase(k)) ++failures;
      }
    });
  }
  for (auto& t : pool) t.join();
  EXPECT_EQ(failures.load(), 0);
}

REGISTER_TYPED_TEST_SUITE_P(tier_conformance, SatisfiesTheConcept, RoundTripsOddSizesByteExact,
                            RefusedCallsSayWhyAndChangeNothing, EraseFreesOnceAndAccountingFollowsFootprint,
                            FullIsCapacityExceededAndLosesNothing, ConcurrentCallsOnDistinctKeysStayByteExact);

}  // namespace kvx::testing

//! Runs the suite on the tier `Factory::make` builds, under the name `Name`.
#define KVX_INSTANTIATE_TIER_CONFORMANCE(Name, ...)                                   \
  namespace kvx::testing {                                                             \
  using tier_conformance_types_##Name = ::testing::Types<__VA_ARGS__>;                 \
  INSTANTIATE_TYPED_TEST_SUITE_P(Name, tier_conformance, tier_conformance_types_##Name); \
  }                                                                                    \
  static_assert(true, "")
