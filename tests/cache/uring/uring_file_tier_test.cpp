#include <kvx/cache/tiers/uring_file_tier.hpp>
#include <kvx/testing/tier_conformance.hpp>

#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <thread>
#include <vector>

#include "cache/uring/skip_without_uring.hpp"

namespace kc = kvx::cache;

static_assert(kc::tier<kc::uring_file_tier<>>);
static_assert(KVX_WITH_URING == 1);

namespace {
kc::file_tier_config cfg(std::uint64_t cap) {
  kc::file_tier_config c;
  c.path = KVX_BINARY_DIR;
  c.capacity = cap;
  return c;
}
std::vector<std::byte> pattern(std::size_t n, unsigned seed) {
  std::vector<std::byte> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<std::byte>((i * 13 + seed) & 0xFF);
  return v;
}
}  // namespace

TEST(UringFileTier, LoadManyDeliversEveryBlockOnceWithItsBytes) {
  KVX_SKIP_WITHOUT_URING();
  kc::uring_file_tier<> t(cfg(4 << 20), 4);  // depth 4 < 20 blocks: the window must slide
  std::vector<kc::block_key> keys;
  std::vector<std::vector<std::byte>> want;
  for (std::uint64_t i = 0; i < 20; ++i) {
    keys.push_back({3, i});
    want.push_back(pattern(4096 * (1 + i % 4) - (i % 2) * 100, static_cast<unsigned>(i)));  // some unaligned sizes
    ASSERT_TRUE(t.store(keys.back(), want.back()));
  }
  // Aligned buffers for even blocks (read in place), unaligned for odd (bounced).
  std::vector<std::byte*> raw;
  std::vector<std::span<std::byte>> outs;
  for (std::size_t i = 0; i < keys.size(); ++i) {
    auto* p = static_cast<std::byte*>(std::aligned_alloc(4096, 5 * 4096));
    raw.push_back(p);
    outs.emplace_back(p + (i % 2), want[i].size());
  }
  std::vector<int> calls(keys.size(), 0);
  t.load_many(keys, outs, [&](std::size_t i, std::error_code ec) {
    EXPECT_FALSE(ec) << i << ": " << ec.message();
    ++calls[i];
  });
  for (std::size_t i = 0; i < keys.size(); ++i) {
    EXPECT_EQ(calls[i], 1) << i;
    EXPECT_EQ(0, std::memcmp(outs[i].data(), want[i].data(), want[i].size())) << i;
  }
  for (auto* p : raw) std::free(p);
}

TEST(UringFileTier, LoadManyReportsMissingKeysAndShortBuffers) {
  KVX_SKIP_WITHOUT_URING();
  kc::uring_file_tier<> t(cfg(1 << 20), 2);
  auto a = pattern(8192, 1);
  ASSERT_TRUE(t.store({1, 0}, a));
  std::vector<kc::block_key> keys{{1, 0}, {1, 1}, {1, 0}};
  std::vector<std::byte> b0(8192), b1(8192), b2(10);
  std::vector<std::span<std::byte>> outs{b0, b1, b2};
  std::vector<std::error_code> codes(3, make_error_code(kvx::errc::internal));
  t.load_many(keys, outs, [&](std::size_t i, std::error_code ec) { codes[i] = ec; });
  EXPECT_FALSE(codes[0]);
  EXPECT_EQ(codes[1], kvx::errc::not_found);
  EXPECT_EQ(codes[2], kvx::errc::out_of_range);
  EXPECT_EQ(b0, a);
}

TEST(UringFileTier, GenericLoadManyUsesThePipelinedPath) {
  KVX_SKIP_WITHOUT_URING();
  kc::uring_file_tier<> t(cfg(1 << 20), 8);
  auto a = pattern(4096, 5);
  ASSERT_TRUE(t.store({2, 0}, a));
  std::vector<kc::block_key> keys{{2, 0}};
  std::vector<std::byte> out(4096);
  std::vector<std::span<std::byte>> outs{out};
  int n = 0;
  kc::load_many(t, std::span<const kc::block_key>(keys), std::span<const std::span<std::byte>>(outs),
                [&](std::size_t, std::error_code ec) { n += !ec; });
  EXPECT_EQ(n, 1);
  EXPECT_EQ(out, a);
}

// ---- an on_block that throws -------------------------------------------------

namespace {

struct free_deleter {
  void operator()(std::byte* p) const noexcept { std::free(p); }
};
using aligned_block = std::unique_ptr<std::byte, free_deleter>;

// 4 KiB-aligned buffers (read in place under O_DIRECT), each `fill` bytes of `bytes`.
std::vector<aligned_block> aligned_blocks(std::size_t n, std::size_t bytes, std::byte fill) {
  std::vector<aligned_block> v;
  for (std::size_t i = 0; i < n; ++i) {
    v.emplace_back(static_cast<std::byte*>(std::aligned_alloc(4096, bytes)));
    std::memset(v.back().get(), static_cast<int>(fill), bytes);
  }
  return v;
}

// After a load_many on `t` that threw: a later call on the same tier sees
// only its own completions. Its first `skip` keys are missing (reported
// not_found up front, no read), then come `keys`: a completion left in the
// ring by the aborted call names an index of that call, so it would report a
// missing key landed (twice reported), or a key of ours landed before its
// read did (wrong bytes).
void expect_a_later_call_sees_only_its_own_reads(kc::uring_file_tier<>& t, std::size_t skip,
                                                  const std::vector<kc::block_key>& keys,
                                                  const std::vector<std::vector<std::byte>>& want) {
  std::vector<kc::block_key> all;
  for (std::size_t i = 0; i < skip; ++i) all.push_back({77, i});  // never stored
  all.insert(all.end(), keys.begin(), keys.end());
  auto bufs = aligned_blocks(all.size(), want[0].size(), std::byte{0});
  std::vector<std::span<std::byte>> outs;
  for (auto& b : bufs) outs.emplace_back(b.get(), want[0].size());
  std::vector<int> reports(all.size(), 0);
  t.load_many(all, outs, [&](std::size_t i, std::error_code ec) {
    ASSERT_LT(i, all.size());
    ++reports[i];
    if (i < skip) {
      EXPECT_EQ(ec, kvx::errc::not_found) << i;
      return;
    }
    EXPECT_FALSE(ec) << i << ": " << ec.message();
    EXPECT_EQ(0, std::memcmp(outs[i].data(), want[i - skip].data(), want[i - skip].size()))
        << "block " << i << " reported landed before its bytes did";
  });
  for (std::size_t i = 0; i < all.size(); ++i) EXPECT_EQ(reports[i], 1) << "index " << i;
}

}  // namespace

TEST(UringFileTier, AThrowingOnBlockLeavesNoReadInTheRingForTheNextCall) {
  KVX_SKIP_WITHOUT_URING();
  constexpr std::size_t n = 16, bytes = 256 << 10;
  kc::uring_file_tier<> t(cfg(2 * n * bytes), 32);  // depth >= n: every read is in flight when the first lands
  std::vector<kc::block_key> keys;
  std::vector<std::vector<std::byte>> want;
  for (std::uint64_t i = 0; i < n; ++i) {
    keys.push_back({5, i});
    want.push_back(pattern(bytes, static_cast<unsigned>(i) + 1));
    ASSERT_TRUE(t.store(keys.back(), want.back()));
  }
  auto first = aligned_blocks(n, bytes, std::byte{0});
  std::vector<std::span<std::byte>> first_outs;
  for (auto& b : first) first_outs.emplace_back(b.get(), bytes);
  int calls = 0;
  EXPECT_THROW(t.load_many(keys, first_outs,
                           [&](std::size_t, std::error_code) {
                             ++calls;
                             throw std::runtime_error("consumer failed");
                           }),
               std::runtime_error);
  EXPECT_EQ(calls, 1);  // nothing reported after the throw
  // The call has returned: no read of it may land in its buffers any more.
  for (auto& b : first) std::memset(b.get(), 0xEE, bytes);
  std::this_thread::sleep_for(std::chrono::milliseconds(100));  // what was left in flight completes
  for (std::size_t i = 0; i < n; ++i)
    EXPECT_EQ(first_outs[i][0], std::byte{0xEE}) << "a read landed in buffer " << i << " after load_many returned";
  expect_a_later_call_sees_only_its_own_reads(t, n, keys, want);
}

TEST(UringFileTier, AThrowingUpFrontReportLeavesNoQueuedReadForTheNextCall) {
  KVX_SKIP_WITHOUT_URING();
  constexpr std::size_t bytes = 64 << 10;
  kc::uring_file_tier<> t(cfg(8 * bytes), 8);
  const std::vector<kc::block_key> stored{{6, 0}, {6, 1}};
  const std::vector<std::vector<std::byte>> want{pattern(bytes, 3), pattern(bytes, 4)};
  for (std::size_t i = 0; i < stored.size(); ++i) ASSERT_TRUE(t.store(stored[i], want[i]));
  // Block 0's read starts at once, block 1's is queued but not yet submitted
  // when the missing key 2 is reported, and that report throws.
  const std::vector<kc::block_key> keys{stored[0], stored[1], {6, 99}};
  auto bufs = aligned_blocks(keys.size(), bytes, std::byte{0});
  std::vector<std::span<std::byte>> outs;
  for (auto& b : bufs) outs.emplace_back(b.get(), bytes);
  std::vector<std::size_t> reported;
  EXPECT_THROW(t.load_many(keys, outs,
                           [&](std::size_t i, std::error_code ec) {
                             reported.push_back(i);
                             if (ec == kvx::errc::not_found) throw std::runtime_error("consumer failed");
                           }),
               std::runtime_error);
  EXPECT_EQ(reported, std::vector<std::size_t>{2});
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  expect_a_later_call_sees_only_its_own_reads(t, keys.size(), stored, want);
}

// ---- the shared tier conformance suite ------------------------------------------

namespace {

struct uring_factory {
  using tier_type = kvx::cache::uring_file_tier<>;
  static std::unique_ptr<tier_type> make(std::uint64_t capacity) {
    kvx::cache::file_tier_config c;
    c.path = KVX_BINARY_DIR;
    c.capacity = capacity;
    return std::make_unique<tier_type>(c, 16);
  }
};

}  // namespace

KVX_INSTANTIATE_TIER_CONFORMANCE(UringFileTier, uring_factory);
