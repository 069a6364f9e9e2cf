#include <kvx/cache/block_key.hpp>
#include <kvx/cache/block_hasher.hpp>

#include <gtest/gtest.h>

#include <numeric>
#include <set>
#include <unordered_set>
#include <vector>

namespace kc = kvx::cache;

namespace {
kc::hasher_config cfg(std::uint32_t block, std::string model = "", std::string tenant = "", std::string adapter = "",
                      std::string salt = "") {
  kc::hasher_config c;
  c.block_tokens = block;
  c.ns.model = std::move(model);
  c.ns.tenant = std::move(tenant);
  c.ns.adapter = std::move(adapter);
  c.ns.salt = std::move(salt);
  return c;
}
std::vector<std::uint32_t> iota_tokens(std::size_t n) {
  std::vector<std::uint32_t> t(n);
  std::iota(t.begin(), t.end(), 0U);
  return t;
}
}  // namespace

TEST(BlockKey, ToStringIs32HexCharsHighHalfFirst) {
  kc::block_key k{0x0123456789abcdefULL, 0xfedcba9876543210ULL};
  EXPECT_EQ(k.to_string(), "0123456789abcdeffedcba9876543210");
  EXPECT_EQ(kc::block_key{}.to_string(), std::string(32, '0'));
}

TEST(BlockKey, OrdersByHighThenLowAndHashesConsistently) {
  kc::block_key a{1, 9}, b{2, 0}, c{2, 1};
  EXPECT_LT(a, b);
  EXPECT_LT(b, c);
  EXPECT_EQ(a, (kc::block_key{1, 9}));
  EXPECT_NE(a, b);
  EXPECT_EQ(std::hash<kc::block_key>{}(a), kc::block_key_hash{}(a));
  std::unordered_set<kc::block_key> s{a, b, c, a};
  EXPECT_EQ(s.size(), 3U);
}

// Test vectors of docs/cache.md, also reproduced there by a Python reference
// that calls libxxhash directly. Changing them breaks every stored key.
TEST(BlockHasher, MatchesPinnedTestVectors) {
  EXPECT_EQ(kc::block_hasher::make(cfg(16))->root().to_string(), "6afac9429d8d4e463080f04a9d76c17b");
  auto h = kc::block_hasher::make(cfg(16, "llama-3-70b", "acme"));
  ASSERT_TRUE(h);
  EXPECT_EQ(h->root().to_string(), "36b8c15d0522efa280fe4e86efc20dbb");
  auto keys = h->keys(iota_tokens(40));
  ASSERT_EQ(keys.size(), 2U);  // 40 tokens: two full blocks, 8 tokens unkeyed
  EXPECT_EQ(keys[0].to_string(), "9e0d786a40cd6fe8bbe63c66f455fbd1");
  EXPECT_EQ(keys[1].to_string(), "6a7591dd4944ad5b2ffa819d65ffb3f5");

  auto h3 = kc::block_hasher::make(cfg(32, "m", "t", "lora-7", "s1"));
  EXPECT_EQ(h3->root().to_string(), "a764f8fa83ee836ded65b3d80da59978");
  std::vector<std::uint32_t> big(32);
  for (std::uint32_t i = 0; i < 32; ++i) big[i] = 0xFFFFFFFFU - i;
  auto k3 = h3->keys(big);
  ASSERT_EQ(k3.size(), 1U);
  EXPECT_EQ(k3[0].to_string(), "8f30ca87a55bc0427a798fc1383e9eb8");
}

TEST(BlockHasher, KeyNamesTheWholePrefix) {
  auto h = kc::block_hasher::make(cfg(16, "m"));
  auto a = iota_tokens(64);
  auto b = a;
  b[3] = 999;  // differs in block 0 only
  auto ka = h->keys(a), kb = h->keys(b);
  for (std::size_t i = 0; i < ka.size(); ++i) EXPECT_NE(ka[i], kb[i]) << "block " << i;
  auto c = a;
  c[40] = 999;  // differs in block 2 only: blocks 0 and 1 are shared
  auto kcs = h->keys(c);
  EXPECT_EQ(ka[0], kcs[0]);
  EXPECT_EQ(ka[1], kcs[1]);
  EXPECT_NE(ka[2], kcs[2]);
  EXPECT_NE(ka[3], kcs[3]);
}

TEST(BlockHasher, ChainingFromAParentEqualsHashingTheWholeSequence) {
  auto h = kc::block_hasher::make(cfg(16, "m"));
  auto t = iota_tokens(64);
  auto all = h->keys(t);
  std::vector<kc::block_key> tail(2);
  const std::span<const std::uint32_t> rest(t.data() + 32, 32);
  EXPECT_EQ(h->keys_into(rest, tail, all[1]), 2U);
  EXPECT_EQ(tail[0], all[2]);
  EXPECT_EQ(tail[1], all[3]);
  EXPECT_EQ(kc::block_hasher::chain(all[0], std::span<const std::uint32_t>(t.data() + 16, 16)), all[1]);
}

TEST(BlockHasher, NamespacesNeverShareKeys) {
  auto t = iota_tokens(32);
  std::set<kc::block_key> seen;
  for (auto c : {cfg(16, "m"), cfg(16, "m", "a"), cfg(16, "m", "b"), cfg(16, "m", "a", "lora"), cfg(16, "m", "a", "", "salt"),
                 cfg(16, "n", "a"), cfg(32, "m")}) {
    for (auto& k : kc::block_hasher::make(c)->keys(t)) EXPECT_TRUE(seen.insert(k).second) << k.to_string();
  }
  // Field boundaries are length-prefixed: ("ab","c") is not ("a","bc").
  EXPECT_NE(kc::block_hasher::make(cfg(16, "ab", "c"))->root(), kc::block_hasher::make(cfg(16, "a", "bc"))->root());
}

TEST(BlockHasher, PartialLastBlockIsNotKeyed) {
  auto h = kc::block_hasher::make(cfg(16));
  EXPECT_EQ(h->keys(iota_tokens(15)).size(), 0U);
  EXPECT_EQ(h->keys(iota_tokens(16)).size(), 1U);
  EXPECT_EQ(h->keys(iota_tokens(47)).size(), 2U);
  EXPECT_EQ(h->full_blocks(47), 2U);
}

TEST(BlockHasher, RejectsBlockSizesOutside16To512) {
  for (std::uint32_t bad : {0U, 1U, 15U, 513U, 4096U}) {
    auto h = kc::block_hasher::make(cfg(bad));
    ASSERT_FALSE(h) << bad;
    EXPECT_EQ(h.code(), kvx::errc::invalid_argument);
    EXPECT_NE(h.error().message().find("16..512"), std::string::npos);
  }
  EXPECT_TRUE(kc::block_hasher::make(cfg(16)));
  EXPECT_TRUE(kc::block_hasher::make(cfg(512)));
}

TEST(BlockHasher, IsDeterministicAcrossInstances) {
  auto a = kc::block_hasher::make(cfg(64, "m", "t"));
  auto b = kc::block_hasher::make(cfg(64, "m", "t"));
  EXPECT_EQ(a->keys(iota_tokens(256)), b->keys(iota_tokens(256)));
}
