#include <kvx/cache/any_tiered_cache.hpp>

#include <gtest/gtest.h>

#include <cstdio>
#include <limits>
#include <memory>
#include <stdexcept>
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

// Sizes that would make a policy allocate without bound, or convert a
// double out of range, are config errors naming the field, never exceptions.
TEST(AnyTieredCache, AGhostFactorOutOfRangeIsAConfigError) {
  for (const std::string eviction : {R"({"policy": "auto", "ghost_factor": 1e17})",
                                     R"({"policy": "reuse_class", "ghost_factor": 65})",
                                     R"({"policy": "s3fifo", "ghost_factor": 1e300})"}) {
    const std::string json = R"({"block_bytes": 4096, "eviction": )" + eviction +
                             R"(, "tiers": [{"kind": "dram", "capacity": "64KiB"}]})";
    std::string err;
    EXPECT_NO_THROW(err = config_error_of(json)) << eviction;
    EXPECT_NE(err.find("'eviction.ghost_factor': must be in [0, 64]"), std::string::npos) << err;
  }
  EXPECT_EQ(config_error_of(R"({"block_bytes": 4096, "eviction": {"policy": "s3fifo", "ghost_factor": 64},
                                "tiers": [{"kind": "dram", "capacity": "64KiB"}]})"),
            "no error");
}

TEST(AnyTieredCache, ATierOfTooManyBlocksIsAConfigError) {
  std::string err;
  EXPECT_NO_THROW(err = config_error_of(
                      R"({"block_bytes": 1, "tiers": [{"kind": "dram", "capacity": "64GiB", "populate": false}]})"));
  EXPECT_NE(err.find("'tiers[0].capacity'"), std::string::npos) << err;
  EXPECT_NE(err.find("block_bytes"), std::string::npos) << err;
}

// Within the bound on blocks, a policy may still refuse its size when the
// cache builds it (reuse_class: tracked and remembered keys under 2^32).
TEST(AnyTieredCache, APolicyThatCannotBeBuiltForATierIsAConfigError) {
  std::string err;
  EXPECT_NO_THROW(err = config_error_of(R"({"block_bytes": 1, "eviction": {"policy": "auto", "ghost_factor": 64},
                                            "tiers": [{"kind": "dram", "capacity": "64MiB", "populate": false}]})"));
  EXPECT_EQ(err.find("invalid argument: config field 'eviction': "), 0U) << err;
  EXPECT_NE(err.find("ghost_factor"), std::string::npos) << err;
}

// Two tiers on one file would overwrite each other's blocks: the second is
// refused, also across caches (and processes), until the first is gone.
TEST(AnyTieredCache, TwoFileTiersOnOneFileAreRefused) {
  const std::string path = std::string(KVX_BINARY_DIR) + "/any_tiered_cache_shared_file.tier";
  const std::string tier = R"({"kind": "file", "capacity": "1MiB", "path": ")" + path + R"("})";
  const std::string both = R"({"block_bytes": 4096, "tiers": [)" + tier + ", " + tier + "]}";
  const std::string err = config_error_of(both);
  EXPECT_NE(err.find("'tiers[1]'"), std::string::npos) << err;
  EXPECT_NE(err.find("in use by another tier or process"), std::string::npos) << err;
  const std::string one = R"({"block_bytes": 4096, "tiers": [)" + tier + "]}";
  {
    kvx::metrics::registry reg;
    auto first = kc::any_tiered_cache::make(one, &reg);
    ASSERT_TRUE(first) << first.error().message();
    const std::string second = config_error_of(one);
    EXPECT_NE(second.find("'tiers[0]'"), std::string::npos) << second;
    EXPECT_NE(second.find("in use by another tier or process"), std::string::npos) << second;
  }
  EXPECT_EQ(config_error_of(one), "no error");
  std::remove(path.c_str());
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

namespace {
std::string with_doorkeeper_bits(const std::string& bits) {
  return R"({"block_bytes": 4096, "tiering": {"admission": "second_access", "doorkeeper_bits": )" + bits +
         R"(}, "tiers": [{"kind": "dram", "capacity": "16KiB", "alignment": 4096, "populate": false}]})";
}
}  // namespace

// SIZE_MAX wrapped the doorkeeper's word count to 0 (the first insert probed
// out of bounds) and 2^62 threw std::bad_alloc out of make; zero and values
// below 64 were taken as 64 without a word.
TEST(AnyTieredCache, DoorkeeperBitsOutsideTheirRangeAreAConfigError) {
  for (const char* bits : {"18446744073709551615", "4611686018427387904", "4294967297", "0", "63"}) {
    SCOPED_TRACE(bits);
    kvx::metrics::registry reg;
    kvx::result<std::unique_ptr<kc::any_tiered_cache>> c = kvx::error{kvx::errc::internal, "not made"};
    EXPECT_NO_THROW(c = kc::any_tiered_cache::make(with_doorkeeper_bits(bits), &reg));
    if (c) {
      ADD_FAILURE() << "accepted";
      continue;
    }
    EXPECT_EQ(c.code(), kvx::errc::invalid_argument);
    const std::string m = c.error().message();
    EXPECT_NE(m.find("'tiering.doorkeeper_bits'"), std::string::npos) << m;
    EXPECT_NE(m.find("outside 64 to 4294967296"), std::string::npos) << m;
    EXPECT_EQ(m.find("not made"), std::string::npos) << m;
  }
  for (const char* bits : {"64", "65536"}) {
    kvx::metrics::registry reg;
    auto c = kc::any_tiered_cache::make(with_doorkeeper_bits(bits), &reg);
    ASSERT_TRUE(c) << bits << ": " << c.error().message();
    EXPECT_TRUE((*c)->insert({1, 1}, config_payload(1))) << bits;
  }
}

// The typed policy is guarded too: a doorkeeper too large to exist is refused
// up front rather than built empty (its first admit wrote out of bounds).
TEST(AnyTieredCache, ATypedDoorkeeperTooLargeThrowsInvalidArgument) {
  using admission = kc::tiering::second_access_admission<>;
  for (const std::size_t bits : {std::numeric_limits<std::size_t>::max(), std::numeric_limits<std::size_t>::max() - 62,
                                 (std::size_t{1} << 32) + 1}) {
    SCOPED_TRACE(bits);
    EXPECT_THROW(admission{bits}, std::invalid_argument);
    kc::tiering::tiering_settings s;
    s.second_access = true;
    s.doorkeeper_bits = bits;
    EXPECT_THROW(kc::tiering::any_tiering{s}, std::invalid_argument);
  }
  admission small(1);  // below 64: 64 bits, and it works
  kc::admission_context offer;
  offer.key = {3, 4};
  offer.under_pressure = true;
  EXPECT_FALSE(small.admit(offer));
  EXPECT_TRUE(small.remembers(offer.key));
  EXPECT_TRUE(small.admit(offer));
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

