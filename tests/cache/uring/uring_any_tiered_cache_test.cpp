#include <kvx/cache/any_tiered_cache.hpp>

#include <gtest/gtest.h>

#include <kvx/cache/tiers/uring_file_tier.hpp>

namespace kc = kvx::cache;

TEST(UringAnyTieredCache, ConfigSelectsTheIoUringFileTier) {
  if (auto ec = kc::uring_file_tier<>::probe())
    GTEST_SKIP() << "io_uring unavailable here: io_uring_queue_init failed: " << ec.message();
  const std::string json = R"({"block_bytes": 4096, "tiers": [{"kind": "dram", "capacity": 4096, "alignment": 4096, "high": 1.0, "low": 1.0},
      {"kind": "file", "capacity": 65536, "io": "uring", "queue_depth": 8, "path": ")" +
                           std::string(KVX_BINARY_DIR) + R"("}]})";
  kvx::metrics::registry reg;
  auto c = kc::any_tiered_cache::make(json, &reg);
  ASSERT_TRUE(c) << c.error().message();
  EXPECT_NE((*c)->get().tiers()[1].target<kc::uring_file_tier<>>(), nullptr);
  std::vector<std::byte> a(4096, std::byte{1}), b(4096, std::byte{2}), out(4096);
  ASSERT_TRUE((*c)->insert({1, 1}, a));
  ASSERT_TRUE((*c)->insert({1, 2}, b));  // demotes {1,1} to the uring file tier
  EXPECT_EQ((*c)->tier_of({1, 1}), 1U);
  ASSERT_TRUE((*c)->read({1, 1}, out));
  EXPECT_EQ(out, a);
}
