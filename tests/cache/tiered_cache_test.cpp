#include <kvx/cache/tiered_cache.hpp>

#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <list>
#include <random>
#include <thread>
#include <unordered_map>
#include <vector>

#include <kvx/cache/tiering/second_access_admission.hpp>
#include <kvx/cache/tiering/write_through.hpp>
#include <kvx/cache/tiers/dram_tier.hpp>
#include <kvx/cache/tiers/file_tier.hpp>
#include <kvx/cache/eviction/lru.hpp>

namespace kc = kvx::cache;

namespace {

// A plain LRU written against the eviction_policy concept, so these tests
// exercise the cache's own logic independently of the policy library.
struct test_lru {
  using eviction_policy_concept = kc::eviction_policy_tag;
  explicit test_lru(std::size_t) {}
  void on_insert(const kc::block_key& k, const kc::access_context&) {
    order_.push_front(k);
    pos_[k] = order_.begin();
  }
  void on_hit(const kc::block_key& k, const kc::access_context&) {
    auto it = pos_.find(k);
    if (it != pos_.end()) order_.splice(order_.begin(), order_, it->second);
  }
  void on_erase(const kc::block_key& k) {
    auto it = pos_.find(k);
    if (it == pos_.end()) return;
    order_.erase(it->second);
    pos_.erase(it);
  }
  template <class Evictable>
  std::optional<kc::block_key> victim(Evictable&& ev) {
    for (auto it = order_.rbegin(); it != order_.rend(); ++it)
      if (ev(*it)) {
        auto k = *it;
        on_erase(k);
        return k;
      }
    return std::nullopt;
  }
  std::size_t size() const { return order_.size(); }
  std::list<kc::block_key> order_;
  std::unordered_map<kc::block_key, std::list<kc::block_key>::iterator, kc::block_key_hash> pos_;
};

constexpr std::uint64_t block = 4096;

kc::dram_tier_config dram(std::uint64_t blocks, double high = 1.0, double low = 1.0) {
  kc::dram_tier_config c;
  c.capacity = blocks * block;
  c.marks = {high, low};
  c.alignment = 4096;
  return c;
}
kc::file_tier_config file(std::uint64_t blocks) {
  kc::file_tier_config c;
  c.path = KVX_BINARY_DIR;
  c.capacity = blocks * block;
  c.marks = {1.0, 1.0};
  return c;
}
kc::tiered_cache_config cache_cfg(kvx::metrics::registry& reg) {
  kc::tiered_cache_config c;
  c.block_bytes = block;
  c.name = "test";
  c.registry = &reg;
  return c;
}
std::vector<std::byte> payload(std::uint64_t id) {
  std::vector<std::byte> v(block);
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<std::byte>((id * 131 + i) & 0xFF);
  return v;
}
kc::block_key key(std::uint64_t i) { return {0xABC, i}; }

using dram_cache = kc::tiered_cache<kc::tier_stack<kc::dram_tier<>>, test_lru>;
using two_tier = kc::tiered_cache<kc::tier_stack<kc::dram_tier<>, kc::file_tier<>>, test_lru, kc::tiering::write_back>;

}  // namespace

TEST(TieredCache, LookupReturnsLongestCachedPrefixAndTier) {
  kvx::metrics::registry reg;
  dram_cache c(cache_cfg(reg), dram(16));
  for (std::uint64_t i : {0, 1, 2, 4}) ASSERT_EQ(*c.insert(key(i), payload(i)), kc::insert_status::inserted);
  std::vector<kc::block_key> keys{key(0), key(1), key(2), key(3), key(4)};
  auto m = c.lookup(keys);
  EXPECT_EQ(m.blocks, 3U);  // key 3 is missing, so key 4 does not count
  EXPECT_EQ(m.tiers, (std::vector<std::uint8_t>{0, 0, 0}));
  EXPECT_EQ(c.stats(0).hits, 3U);
  EXPECT_EQ(c.misses(), 2U);
  EXPECT_EQ(c.lookup(std::span<const kc::block_key>()).blocks, 0U);
}

TEST(TieredCache, ReadCopiesTheBlockOut) {
  kvx::metrics::registry reg;
  dram_cache c(cache_cfg(reg), dram(4));
  ASSERT_TRUE(c.insert(key(1), payload(1)));
  EXPECT_EQ(*c.insert(key(1), payload(1)), kc::insert_status::already_cached);
  std::vector<std::byte> out(block);
  auto r = c.read(key(1), out);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->bytes, block);
  EXPECT_EQ(r->tier, 0U);
  EXPECT_EQ(out, payload(1));
  EXPECT_EQ(c.read(key(2), out).code(), kvx::errc::not_found);
  std::vector<std::byte> small(10);
  EXPECT_EQ(c.read(key(1), small).code(), kvx::errc::out_of_range);
  EXPECT_EQ(c.insert(key(3), std::span<const std::byte>()).code(), kvx::errc::invalid_argument);
}

TEST(TieredCache, EvictsLeastRecentlyUsedWhenFull) {
  kvx::metrics::registry reg;
  dram_cache c(cache_cfg(reg), dram(3));
  for (std::uint64_t i = 0; i < 3; ++i) ASSERT_TRUE(c.insert(key(i), payload(i)));
  const kc::block_key k0 = key(0);
  EXPECT_EQ(c.lookup(std::span(&k0, 1)).blocks, 1U);  // 0 is now most recent: 1 is the LRU
  ASSERT_TRUE(c.insert(key(3), payload(3)));
  EXPECT_TRUE(c.contains(key(0)));
  EXPECT_FALSE(c.contains(key(1)));
  EXPECT_TRUE(c.contains(key(2)));
  EXPECT_TRUE(c.contains(key(3)));
  EXPECT_EQ(c.stats(0).evictions, 1U);
}

TEST(TieredCache, WatermarksEvictInABatchDownToLow) {
  kvx::metrics::registry reg;
  dram_cache c(cache_cfg(reg), dram(10, 0.8, 0.5));  // evict above 8 blocks down to 5
  for (std::uint64_t i = 0; i < 8; ++i) ASSERT_TRUE(c.insert(key(i), payload(i)));
  EXPECT_EQ(c.size(), 8U);
  ASSERT_TRUE(c.insert(key(8), payload(8)));  // would be 9 > 8: evict until 4 + 1 <= 5
  EXPECT_EQ(c.size(), 5U);
  EXPECT_EQ(c.stats(0).evictions, 4U);
  for (std::uint64_t i = 0; i < 4; ++i) EXPECT_FALSE(c.contains(key(i))) << i;
}

TEST(TieredCache, PinnedBlocksAreNeverEvictedAndFullTierSaysSo) {
  kvx::metrics::registry reg;
  dram_cache c(cache_cfg(reg), dram(2));
  ASSERT_TRUE(c.insert(key(0), payload(0)));
  ASSERT_TRUE(c.insert(key(1), payload(1)));
  {
    auto p0 = c.pin(key(0));
    auto p1 = c.pin(key(1));
    ASSERT_TRUE(p0 && p1);
    auto r = c.insert(key(2), payload(2));
    ASSERT_FALSE(r);
    EXPECT_EQ(r.code(), kvx::errc::capacity_exceeded);
    EXPECT_NE(r.error().message().find("pinned"), std::string::npos);
    EXPECT_EQ(c.erase(key(0)).code(), kvx::errc::busy);
    std::vector<std::byte> out(block);
    ASSERT_TRUE(c.read(key(0), out));
    EXPECT_EQ(out, payload(0));  // pinned data intact
  }
  ASSERT_TRUE(c.insert(key(2), payload(2)));  // pins gone: eviction works again
  EXPECT_EQ(c.size(), 2U);
  EXPECT_EQ(c.pin(key(99)).code(), kvx::errc::not_found);
}

TEST(TieredCache, PinPrefixPinsOnlyTheCachedLeadingBlocks) {
  kvx::metrics::registry reg;
  dram_cache c(cache_cfg(reg), dram(3));
  for (std::uint64_t i = 0; i < 3; ++i) ASSERT_TRUE(c.insert(key(i), payload(i)));
  std::vector<kc::block_key> keys{key(0), key(1), key(7), key(2)};
  auto pins = c.pin_prefix(keys);
  ASSERT_EQ(pins.size(), 2U);
  EXPECT_EQ(pins[1].key(), key(1));
  ASSERT_TRUE(c.insert(key(5), payload(5)));  // only key 2 is evictable
  EXPECT_TRUE(c.contains(key(0)));
  EXPECT_TRUE(c.contains(key(1)));
  EXPECT_FALSE(c.contains(key(2)));
  pins.clear();
  ASSERT_TRUE(c.erase(key(0)));
  EXPECT_FALSE(c.contains(key(0)));
  EXPECT_EQ(c.erase(key(0)).code(), kvx::errc::not_found);
}

TEST(TieredCache, WriteBackDemotesOnEvictionAndPromotesOnHit) {
  kvx::metrics::registry reg;
  two_tier c(cache_cfg(reg), dram(2), file(8));
  for (std::uint64_t i = 0; i < 3; ++i) ASSERT_TRUE(c.insert(key(i), payload(i)));
  // key 0 was evicted from DRAM and written back to the file tier.
  EXPECT_EQ(c.tier_of(key(0)), 1U);
  EXPECT_EQ(c.residency(key(1)), 0b01);
  EXPECT_EQ(c.stats(1).demotions, 1U);
  std::vector<kc::block_key> keys{key(0), key(1), key(2)};
  auto m = c.lookup(keys);
  EXPECT_EQ(m.blocks, 3U);
  EXPECT_EQ(m.tiers, (std::vector<std::uint8_t>{1, 0, 0}));
  std::vector<std::byte> out(block);
  auto r = c.read(key(0), out);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->tier, 1U);
  EXPECT_TRUE(r->promoted);
  EXPECT_EQ(out, payload(0));
  EXPECT_EQ(c.tier_of(key(0)), 0U);
  EXPECT_EQ(c.stats(1).promotions, 1U);
  // Promotion made room in DRAM by demoting the LRU block there.
  EXPECT_EQ(c.stats(1).demotions, 2U);
  for (std::uint64_t i = 0; i < 3; ++i) {
    ASSERT_TRUE(c.read(key(i), out));
    EXPECT_EQ(out, payload(i)) << i;
  }
}

TEST(TieredCache, WriteThroughStoresIntoEveryTierAndDropsWithoutCopying) {
  kvx::metrics::registry reg;
  kc::tiered_cache<kc::tier_stack<kc::dram_tier<>, kc::file_tier<>>, test_lru, kc::tiering::write_through> c(
      cache_cfg(reg), dram(2), file(8));
  for (std::uint64_t i = 0; i < 3; ++i) ASSERT_TRUE(c.insert(key(i), payload(i)));
  EXPECT_EQ(c.residency(key(2)), 0b11);
  EXPECT_EQ(c.residency(key(0)), 0b10);  // evicted from DRAM, its lower copy stays
  EXPECT_EQ(c.stats(1).demotions, 0U);   // nothing had to be copied down
  std::vector<std::byte> out(block);
  ASSERT_TRUE(c.read(key(0), out));
  EXPECT_EQ(out, payload(0));
}

TEST(TieredCache, LowestTierEvictionDropsTheBlock) {
  kvx::metrics::registry reg;
  two_tier c(cache_cfg(reg), dram(1), file(2));
  for (std::uint64_t i = 0; i < 5; ++i) ASSERT_TRUE(c.insert(key(i), payload(i)));
  EXPECT_EQ(c.size(), 3U);
  EXPECT_FALSE(c.contains(key(0)));
  EXPECT_FALSE(c.contains(key(1)));
  EXPECT_EQ(c.tier_of(key(4)), 0U);
  EXPECT_GE(c.stats(1).evictions, 2U);
}

TEST(TieredCache, AdmissionRejectsOneHitWondersUnderPressure) {
  kvx::metrics::registry reg;
  using policy = kc::tiering::second_access_admission<>;
  using cache_t = kc::tiered_cache<kc::tier_stack<kc::dram_tier<>>, test_lru, policy>;
  cache_t c(cache_t::options{cache_cfg(reg), policy(4096), {}}, dram(4, 0.5, 0.5));
  // Below the high watermark everything is admitted.
  ASSERT_EQ(*c.insert(key(0), payload(0)), kc::insert_status::inserted);
  ASSERT_EQ(*c.insert(key(1), payload(1)), kc::insert_status::inserted);
  // Now inserting would cross 50%: a first-time key is rejected, a repeat one admitted.
  EXPECT_EQ(*c.insert(key(2), payload(2)), kc::insert_status::rejected);
  EXPECT_EQ(c.rejections(), 1U);
  EXPECT_EQ(*c.insert(key(2), payload(2)), kc::insert_status::inserted);
  EXPECT_TRUE(c.contains(key(2)));
}

TEST(TieredCache, MetricsAreExportedWithCacheAndTierLabels) {
  kvx::metrics::registry reg;
  two_tier c(cache_cfg(reg), dram(1), file(4));
  ASSERT_TRUE(c.insert(key(0), payload(0)));
  ASSERT_TRUE(c.insert(key(1), payload(1)));
  const kc::block_key k = key(0);
  (void)c.lookup(std::span(&k, 1));
  const std::string text = reg.prometheus_text();
  EXPECT_NE(text.find("kvx_cache_hits_total{cache=\"test\",tier=\"file\"} 1"), std::string::npos) << text;
  EXPECT_NE(text.find("kvx_cache_demotions_total{cache=\"test\",tier=\"file\"} 1"), std::string::npos) << text;
  EXPECT_NE(text.find("kvx_cache_evictions_total{cache=\"test\",tier=\"dram\"} 1"), std::string::npos) << text;
  EXPECT_NE(text.find("kvx_cache_bytes{cache=\"test\",tier=\"dram\"} 4096"), std::string::npos) << text;
}

TEST(TieredCache, RejectsBlockLargerThanTierAndZeroBlockBytes) {
  kvx::metrics::registry reg;
  dram_cache c(cache_cfg(reg), dram(1));
  std::vector<std::byte> big(2 * block);
  auto r = c.insert(key(0), big);
  EXPECT_EQ(r.code(), kvx::errc::capacity_exceeded);
  EXPECT_NE(r.error().message().find("exceeds"), std::string::npos);
  auto cfg = cache_cfg(reg);
  cfg.block_bytes = 0;
  EXPECT_THROW(dram_cache(cfg, dram(1)), std::invalid_argument);
}

// Many readers and writers over a small two-tier cache: every read returns
// exactly the bytes inserted under that key, pins hold, nothing crashes.
// Run under TSan to check the locking.
TEST(TieredCache, ConcurrentReadersAndWritersStayConsistent) {
  kvx::metrics::registry reg;
  two_tier c(cache_cfg(reg), dram(16, 0.9, 0.7), file(48));
  std::atomic<bool> bad{false};
  std::atomic<int> reads{0};
  std::vector<std::thread> ths;
  for (unsigned w = 0; w < 4; ++w)
    ths.emplace_back([&, w] {
      std::mt19937_64 rng(w);
      std::vector<std::byte> out(block);
      for (int step = 0; step < 400; ++step) {
        const std::uint64_t id = rng() % 96;
        switch (rng() % 4) {
          case 0:
          case 1: {
            auto r = c.insert(key(id), payload(id));
            if (!r && r.code() != kvx::errc::capacity_exceeded) bad = true;
            break;
          }
          case 2: {
            auto p = c.pin(key(id));
            if (p) {
              auto r = c.read(key(id), out);
              if (!r || out != payload(id)) bad = true;
              reads.fetch_add(1);
            }
            break;
          }
          default: {
            std::vector<kc::block_key> keys{key(id), key(id + 1), key(id + 2)};
            (void)c.lookup(keys);
            auto r = c.read(key(id), out);
            if (r && out != payload(id)) bad = true;
          }
        }
      }
    });
  for (auto& t : ths) t.join();
  EXPECT_FALSE(bad.load());
  EXPECT_GT(reads.load(), 0);
  EXPECT_LE(c.stats(0).used_bytes, 16 * block);
  EXPECT_LE(c.stats(1).used_bytes, 48 * block);
}

TEST(TieredCache, AccountsForAllocationRoundingOfTheTier) {
  kvx::metrics::registry reg;
  dram_cache c(cache_cfg(reg), dram(4));  // 16 KiB, blocks start on 4 KiB
  std::vector<std::byte> odd(5000, std::byte{1});  // occupies 8 KiB
  ASSERT_TRUE(c.insert(key(0), odd));
  ASSERT_TRUE(c.insert(key(1), odd));
  EXPECT_EQ(c.stats(0).used_bytes, 16384U);
  ASSERT_TRUE(c.insert(key(2), odd));  // does not fit beside two: evicts key 0 up front
  EXPECT_FALSE(c.contains(key(0)));
  EXPECT_EQ(c.stats(0).evictions, 1U);
}

TEST(TieredCache, DefaultPoliciesMakeACompleteCache) {
  kvx::metrics::registry reg;
  kc::tiered_cache<kc::tier_stack<kc::dram_tier<>>> c(cache_cfg(reg), dram(8));
  for (std::uint64_t i = 0; i < 32; ++i) ASSERT_TRUE(c.insert(key(i % 12), payload(i % 12)));
  EXPECT_LE(c.size(), 8U);
  std::vector<std::byte> out(block);
  for (std::uint64_t i = 0; i < 12; ++i)
    if (auto r = c.read(key(i), out)) {
      EXPECT_EQ(out, payload(i));
    }
}

TEST(TieredCache, LibraryLruEvictsLikeTheReferenceLru) {
  kvx::metrics::registry reg;
  kc::tiered_cache<kc::tier_stack<kc::dram_tier<>>, kc::eviction::lru> c(cache_cfg(reg), dram(3));
  for (std::uint64_t i = 0; i < 3; ++i) ASSERT_TRUE(c.insert(key(i), payload(i)));
  const kc::block_key k0 = key(0);
  (void)c.lookup(std::span(&k0, 1));
  ASSERT_TRUE(c.insert(key(3), payload(3)));
  EXPECT_TRUE(c.contains(key(0)));
  EXPECT_FALSE(c.contains(key(1)));
}
