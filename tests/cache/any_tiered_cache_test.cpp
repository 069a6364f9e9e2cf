#include <kvx/cache/any_tiered_cache.hpp>

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace kc = kvx::cache;

namespace {
std::string two_tiers(const std::string& eviction = "\"lru\"", const std::string& extra_tier0 = "") {
  return R"({"name": "cfg", "block_bytes": "4KiB", "eviction": )" + eviction +
         R"(, "tiering": {"mode": "write_back"}, "tiers": [
            {"kind": "dram", "name": "dram", "capacity": "8KiB", "high": 1.0, "low": 1.0, "alignment": 4096)" +
         extra_tier0 + R"(},
            {"kind": "file", "name": "ssd", "path": ")" + std::string(KVX_BINARY_DIR) +
         R"(", "capacity": "2MiB", "allocator": "slab"}]})";
}
std::vector<std::byte> config_payload(std::uint64_t id) { return std::vector<std::byte>(4096, static_cast<std::byte>(id)); }

std::string config_error_of(const std::string& json) {
  kvx::metrics::registry reg;
  auto c = kc::any_tiered_cache::make(json, &reg);
  return c ? std::string("no error") : c.error().message();
}
}  // namespace

TEST(AnyTieredCache, BuildsTheConfiguredStackAndWorks) {
  kvx::metrics::registry reg;
  auto c = kc::any_tiered_cache::make(two_tiers(), &reg);
  ASSERT_TRUE(c) << c.error().message();
  auto& cache = **c;
  EXPECT_EQ(cache.tier_count(), 2U);
  EXPECT_EQ(cache.tier_name(0), "dram");
  EXPECT_EQ(cache.tier_name(1), "ssd");
  for (std::uint64_t i = 0; i < 3; ++i) ASSERT_TRUE(cache.insert({5, i}, config_payload(i)));
  EXPECT_EQ(cache.tier_of({5, 0}), 1U);  // 2 blocks of DRAM: block 0 was written back to the file
  std::vector<kc::block_key> keys{{5, 0}, {5, 1}, {5, 2}};
  EXPECT_EQ(cache.lookup(keys).blocks, 3U);
  std::vector<std::byte> out(4096);
  auto r = cache.read({5, 0}, out);
  ASSERT_TRUE(r);
  EXPECT_EQ(out, config_payload(0));
  EXPECT_NE(reg.prometheus_text().find("kvx_cache_demotions_total{cache=\"cfg\",tier=\"ssd\"}"), std::string::npos);
}

TEST(AnyTieredCache, AcceptsEvictionObjectsAndDefaults) {
  kvx::metrics::registry reg;
  EXPECT_TRUE(kc::any_tiered_cache::make(two_tiers(R"({"policy": "s3fifo", "small_ratio": 0.2})"), &reg));
  auto c = kc::any_tiered_cache::make(
      R"({"block_bytes": 4096, "tiers": [{"kind": "dram", "capacity": 65536}]})", &reg);
  ASSERT_TRUE(c) << c.error().message();
  EXPECT_EQ((*c)->tier_name(0), "dram");
}

TEST(AnyTieredCache, ConfigErrorsNameTheField) {
  EXPECT_NE(config_error_of(R"({"tiers": []})").find("'block_bytes' is required"), std::string::npos);
  EXPECT_NE(config_error_of(R"({"block_bytes": 4096})").find("'tiers' is required"), std::string::npos);
  EXPECT_NE(config_error_of(R"({"block_bytes": 4096, "tiers": []})").find("'tiers': expected an array of 1 to 8"),
            std::string::npos);
  EXPECT_NE(config_error_of(R"({"block_bytes": 4096, "tiers": [{"kind": "dram"}]})").find("'tiers[0].capacity' is required"),
            std::string::npos);
  EXPECT_NE(config_error_of(R"({"block_bytes": 4096, "tiers": [{"kind": "tape", "capacity": 4096}]})").find("'tiers[0].kind'"),
            std::string::npos);
  EXPECT_NE(config_error_of(two_tiers("\"lru\"", R"(, "hihg": 0.9)")).find("unknown config field 'tiers[0].hihg'"),
            std::string::npos);
  EXPECT_NE(config_error_of(two_tiers("\"lru\"", R"(, "high": 0.5, "low": 0.9)")).find("tiers[0]"), std::string::npos);
  EXPECT_NE(config_error_of(two_tiers("\"lur\"")).find("'eviction.policy': unknown eviction policy 'lur'"), std::string::npos);
  EXPECT_NE(config_error_of(two_tiers("\"belady\"")).find("trace replay only"), std::string::npos);
  EXPECT_NE(config_error_of(two_tiers("42")).find("'eviction'"), std::string::npos);
  EXPECT_NE(config_error_of(R"({"block_bytes": 4096, "tiering": {"mode": "write_sideways"}, "tiers": [{"kind": "dram", "capacity": 4096}]})")
                .find("'tiering.mode'"),
            std::string::npos);
  EXPECT_NE(config_error_of(R"({"block_bytes": 4096, "tiers": [{"kind": "file", "capacity": 65536}]})").find("'tiers[0].path' is required"),
            std::string::npos);
  EXPECT_NE(config_error_of(R"({"block_bytes": 4096, "tiers": [{"kind": "file", "capacity": 65536, "path": "/nonexistent-kvx/a/b"}]})")
                .find("'tiers[0]'"),
            std::string::npos);
  EXPECT_NE(config_error_of(R"({"block_bytes": 4096, "tiers": [{"kind": "dram", "capacity": 65536, "allocator": "slab"}]})")
                .find("below one slab"),
            std::string::npos);
  EXPECT_NE(config_error_of("{not json").find("not valid JSON"), std::string::npos);
  EXPECT_NE(config_error_of(R"({"block_bytes": 4096, "tiers": [{"kind": "file", "capacity": 65536, "path": "/tmp", "readers": "many"}]})")
                .find("'tiers[0].readers'"),
            std::string::npos);
}

TEST(AnyTieredCache, UringWithoutTheBackendIsRefusedWithAReason) {
  const std::string json = R"({"block_bytes": 4096, "tiers": [{"kind": "file", "capacity": 65536, "io": "uring", "path": ")" +
                           std::string(KVX_BINARY_DIR) + R"("}]})";
  kvx::metrics::registry reg;
  auto c = kc::any_tiered_cache::make(json, &reg);
#if KVX_WITH_URING
  EXPECT_TRUE(c || c.error().message().find("io_uring") != std::string::npos);
#else
  ASSERT_FALSE(c);
  EXPECT_EQ(c.code(), kvx::errc::not_supported);
  EXPECT_NE(c.error().message().find("'tiers[0].io'"), std::string::npos);
#endif
}

TEST(AnyTieredCache, TieringAdmissionComesFromConfig) {
  kvx::metrics::registry reg;
  auto c = kc::any_tiered_cache::make(
      R"({"block_bytes": 4096, "eviction": "lru", "tiering": {"admission": "second_access", "doorkeeper_bits": 4096},
          "tiers": [{"kind": "dram", "capacity": "16KiB", "high": 0.5, "low": 0.5, "alignment": 4096}]})",
      &reg);
  ASSERT_TRUE(c) << c.error().message();
  ASSERT_EQ(*(*c)->insert({1, 1}, config_payload(1)), kc::insert_status::inserted);
  ASSERT_EQ(*(*c)->insert({1, 2}, config_payload(2)), kc::insert_status::inserted);
  EXPECT_EQ(*(*c)->insert({1, 3}, config_payload(3)), kc::insert_status::rejected);
  EXPECT_EQ(*(*c)->insert({1, 3}, config_payload(3)), kc::insert_status::inserted);
}

#if !KVX_WITH_CUDA
TEST(AnyTieredCache, ACudaTierNeedsKvxBuiltWithCuda) {
  kvx::metrics::registry reg;
  auto c = kc::any_tiered_cache::make(R"({"block_bytes": 4096, "tiers": [{"kind": "cuda", "capacity": "1MiB"}]})", &reg);
  ASSERT_FALSE(c);
  EXPECT_EQ(c.code(), kvx::errc::not_supported);
  EXPECT_NE(c.error().message().find("kvx::cuda"), std::string::npos) << c.error().message();
}
#endif

