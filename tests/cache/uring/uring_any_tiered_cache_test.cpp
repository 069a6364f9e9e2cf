#include <kvx/cache/any_tiered_cache.hpp>

#include <gtest/gtest.h>

#include <kvx/cache/tiers/uring_file_tier.hpp>

#include "cache/uring/skip_without_uring.hpp"

namespace kc = kvx::cache;

namespace {
// A DRAM tier over an io_uring file tier, 4 KiB blocks.
std::string dram_over_uring(std::uint64_t dram_bytes, std::uint64_t file_bytes, unsigned depth) {
  return R"({"block_bytes": 4096, "tiers": [{"kind": "dram", "capacity": )" + std::to_string(dram_bytes) +
         R"(, "alignment": 4096, "high": 1.0, "low": 1.0}, {"kind": "file", "capacity": )" +
         std::to_string(file_bytes) + R"(, "io": "uring", "queue_depth": )" + std::to_string(depth) +
         R"(, "path": ")" + std::string(KVX_BINARY_DIR) + R"("}]})";
}
}  // namespace

TEST(UringAnyTieredCache, ConfigSelectsTheIoUringFileTier) {
  KVX_SKIP_WITHOUT_URING();
  kvx::metrics::registry reg;
  auto c = kc::any_tiered_cache::make(dram_over_uring(4096, 65536, 8), &reg);
  ASSERT_TRUE(c) << c.error().message();
  EXPECT_NE((*c)->get().tiers()[1].target<kc::uring_file_tier<>>(), nullptr);
  std::vector<std::byte> a(4096, std::byte{1}), b(4096, std::byte{2}), out(4096);
  ASSERT_TRUE((*c)->insert({1, 1}, a));
  ASSERT_TRUE((*c)->insert({1, 2}, b));  // demotes {1,1} to the uring file tier
  EXPECT_EQ((*c)->tier_of({1, 1}), 1U);
  ASSERT_TRUE((*c)->read({1, 1}, out));
  EXPECT_EQ(out, a);
}

TEST(UringAnyTieredCache, ReadManyReadsTheFileTiersBlocksThroughItsRing) {
  KVX_SKIP_WITHOUT_URING();
  kvx::metrics::registry reg;
  auto c = kc::any_tiered_cache::make(dram_over_uring(8192, 262144, 4), &reg);
  ASSERT_TRUE(c) << c.error().message();
  auto& cache = (*c)->get();
  constexpr std::uint64_t n = 24;  // 22 of them demoted to the file tier
  std::vector<kc::block_key> keys;
  for (std::uint64_t i = 0; i < n; ++i) {
    keys.push_back({7, i});
    ASSERT_TRUE(cache.insert(keys.back(), std::vector<std::byte>(4096, static_cast<std::byte>(i + 1))));
  }
  ASSERT_EQ(cache.tier_of(keys[0]), 1U);
  std::vector<std::vector<std::byte>> bufs(n, std::vector<std::byte>(4096));
  std::vector<std::span<std::byte>> outs(bufs.begin(), bufs.end());
  std::vector<int> reported(n, 0);
  cache.read_many(keys, outs, [&](std::size_t i, std::error_code ec) {
    EXPECT_FALSE(ec) << i << ": " << ec.message();
    EXPECT_EQ(bufs[i], std::vector<std::byte>(4096, static_cast<std::byte>(i + 1))) << i;  // whole when reported
    ++reported[i];
  });
  EXPECT_EQ(reported, std::vector<int>(n, 1));
}
