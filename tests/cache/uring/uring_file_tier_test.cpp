#include <kvx/cache/tiers/uring_file_tier.hpp>
#include <kvx/testing/tier_conformance.hpp>

#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
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
