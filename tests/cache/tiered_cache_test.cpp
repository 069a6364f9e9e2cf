#include <kvx/cache/tiered_cache.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <list>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include <kvx/cache/tiering/second_access_admission.hpp>
#include <kvx/cache/tiering/write_through.hpp>
#include <kvx/cache/tiers/dram_tier.hpp>
#include <kvx/cache/tiers/file_tier.hpp>
#include <kvx/cache/eviction/lru.hpp>
#include <kvx/core/log.hpp>
#include <kvx/memory/slab_allocator.hpp>

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

// A key-indexed tier whose stores wait at a gate while it is closed, so a
// test can hold a demotion in the middle of its copy.
class gated_tier {
 public:
  using tier_concept = kc::tier_tag;
  static constexpr bool host_accessible = true;
  explicit gated_tier(std::uint64_t capacity) : capacity_(capacity) {}

  std::string_view name() const { return "gated"; }
  std::uint64_t capacity() const { return capacity_; }
  std::uint64_t used_bytes() const {
    std::lock_guard lock(mu_);
    std::uint64_t n = 0;
    for (const auto& [k, v] : blocks_) n += v.size();
    return n;
  }
  kc::watermarks marks() const { return {1.0, 1.0}; }
  kvx::result<void> store(const kc::block_key& k, std::span<const std::byte> in) {
    std::unique_lock lock(mu_);
    ++stores_entered_;
    cv_.notify_all();
    cv_.wait(lock, [&] { return open_; });
    if (!blocks_.emplace(k, std::vector<std::byte>(in.begin(), in.end())).second)
      return kvx::error{kvx::errc::already_exists, "gated"};
    return {};
  }
  kvx::result<std::size_t> load(const kc::block_key& k, std::span<std::byte> out) {
    std::lock_guard lock(mu_);
    auto it = blocks_.find(k);
    if (it == blocks_.end()) return kvx::error{kvx::errc::not_found, "gated"};
    if (out.size() < it->second.size()) return kvx::error{kvx::errc::out_of_range, "gated"};
    std::memcpy(out.data(), it->second.data(), it->second.size());
    return it->second.size();
  }
  bool erase(const kc::block_key& k) {
    std::lock_guard lock(mu_);
    return blocks_.erase(k) != 0;
  }
  bool contains(const kc::block_key& k) const {
    std::lock_guard lock(mu_);
    return blocks_.contains(k);
  }
  std::optional<std::uint64_t> size_of(const kc::block_key& k) const {
    std::lock_guard lock(mu_);
    auto it = blocks_.find(k);
    return it == blocks_.end() ? std::nullopt : std::optional<std::uint64_t>(it->second.size());
  }

  void close() {
    std::lock_guard lock(mu_);
    open_ = false;
  }
  void open() {
    std::lock_guard lock(mu_);
    open_ = true;
    cv_.notify_all();
  }
  // Blocks until `n` stores have reached the gate.
  void wait_for_stores(int n) {
    std::unique_lock lock(mu_);
    cv_.wait(lock, [&] { return stores_entered_ >= n; });
  }

 private:
  std::uint64_t capacity_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = true;
  int stores_entered_ = 0;
  std::map<kc::block_key, std::vector<std::byte>> blocks_;
};
static_assert(kc::check_tier<gated_tier>());

// A key-indexed tier whose every store fails, like a disk that is full or
// failing (ENOSPC, EIO).
class failing_tier {
 public:
  using tier_concept = kc::tier_tag;
  static constexpr bool host_accessible = true;
  explicit failing_tier(std::uint64_t capacity) : capacity_(capacity) {}

  std::string_view name() const { return "failing"; }
  std::uint64_t capacity() const { return capacity_; }
  std::uint64_t used_bytes() const { return 0; }
  kc::watermarks marks() const { return {1.0, 1.0}; }
  kvx::result<void> store(const kc::block_key& k, std::span<const std::byte>) {
    return kvx::error{kvx::errc::io_error, "failing tier: write block " + k.to_string()};
  }
  kvx::result<std::size_t> load(const kc::block_key&, std::span<std::byte>) {
    return kvx::error{kvx::errc::not_found, "failing"};
  }
  bool erase(const kc::block_key&) { return false; }
  bool contains(const kc::block_key&) const { return false; }
  std::optional<std::uint64_t> size_of(const kc::block_key&) const { return std::nullopt; }

 private:
  std::uint64_t capacity_;
};
static_assert(kc::check_tier<failing_tier>());

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
    EXPECT_EQ(c.residency(key(2)), 0);
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
  EXPECT_FALSE(c.contains(key(2)));
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
template <class Cache>
void hammer_with_readers_and_writers(Cache& c) {
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
  EXPECT_GT(c.stats(1).demotions, 0U);
  // Every block the index holds reads back whole from where it says.
  std::vector<std::byte> out(block);
  for (std::uint64_t id = 0; id < 99; ++id)
    if (auto r = c.read(key(id), out)) {
      EXPECT_EQ(out, payload(id)) << id;
    }
}

TEST(TieredCache, ConcurrentReadersAndWritersStayConsistent) {
  kvx::metrics::registry reg;
  two_tier c(cache_cfg(reg), dram(16, 0.9, 0.7), file(48));
  hammer_with_readers_and_writers(c);
}

// Both tiers take placements: demotions copy arena to arena outside the lock.
TEST(TieredCache, ConcurrentReadersAndWritersAcrossTwoDramTiers) {
  kvx::metrics::registry reg;
  kc::tiered_cache<kc::tier_stack<kc::dram_tier<>, kc::dram_tier<>>, test_lru, kc::tiering::write_back> c(
      cache_cfg(reg), dram(16, 0.9, 0.7), dram(48));
  hammer_with_readers_and_writers(c);
}

// Thread B's demotion out of tier 1 is held in its copy into tier 2: tier 1's
// books already count its room as free, its arena does not yet. Thread A's
// demotion into tier 1, admitted on those books, waits for the range rather
// than failing (it failed, and A's insert with it, though nothing was pinned).
TEST(TieredCache, ADemotionIntoRoomAnotherThreadsMoveIsStillFreeingWaitsForItInsteadOfFailing) {
  kvx::metrics::registry reg;
  kc::tiered_cache<kc::tier_stack<kc::dram_tier<>, kc::dram_tier<>, gated_tier>, test_lru, kc::tiering::write_back> c(
      cache_cfg(reg), dram(4), dram(4, 1.0, 0.5), 64 * block);
  auto& gate = c.tiers().get<2>();
  for (std::uint64_t i = 0; i < 8; ++i) ASSERT_TRUE(c.insert(key(i), payload(i)));  // tier 0: 4..7, tier 1: 0..3
  gate.close();
  // Key 8 evicts key 4 into tier 1, which sends keys 0 and 1 to tier 2: held at the gate.
  std::thread b([&] { EXPECT_TRUE(c.insert(key(8), payload(8))); });
  gate.wait_for_stores(1);
  std::thread opener([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    gate.open();
  });
  auto a = c.insert(key(9), payload(9));  // evicts key 5 into tier 1
  EXPECT_TRUE(a) << a.error().message();
  opener.join();
  b.join();
  EXPECT_EQ(c.stats(1).demotion_failures, 0U);
  std::vector<std::byte> out(block);
  for (std::uint64_t i = 0; i < 10; ++i) {
    ASSERT_TRUE(c.read(key(i), out)) << i;
    EXPECT_EQ(out, payload(i)) << i;
  }
}

// A block no tier allocation can ever hold (above the slab allocator's largest
// class) is refused before anything is evicted; a cache whose block_bytes a
// tier can never hold is refused when built.
TEST(TieredCache, ABlockTheTierCanNeverPlaceIsRefusedWithoutEvictingAnything) {
  kvx::metrics::registry reg;
  using slab_tier = kc::dram_tier<kvx::memory::slab_allocator>;
  kc::dram_tier_config cfg = dram(16);
  cfg.capacity = 16 << 20;
  kc::tiered_cache<kc::tier_stack<slab_tier>, test_lru> c(cache_cfg(reg), cfg);
  for (std::uint64_t i = 0; i < 10; ++i) ASSERT_TRUE(c.insert(key(i), std::vector<std::byte>(1 << 20, std::byte{1})));
  auto big = c.insert(key(99), std::vector<std::byte>(2 << 20, std::byte{2}));
  ASSERT_FALSE(big);
  EXPECT_EQ(big.code(), kvx::errc::capacity_exceeded);
  EXPECT_NE(big.error().message().find("largest size class"), std::string::npos) << big.error().message();
  EXPECT_EQ(c.stats(0).evictions, 0U);
  for (std::uint64_t i = 0; i < 10; ++i) EXPECT_EQ(c.residency(key(i)), 0b1) << i;

  kc::tiered_cache_config too_big = cache_cfg(reg);
  too_big.name = "too-big";
  too_big.block_bytes = 2 << 20;
  try {
    kc::tiered_cache<kc::tier_stack<slab_tier>, test_lru> never(too_big, cfg);
    ADD_FAILURE() << "a cache of blocks its only tier can never hold was built";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("block_bytes"), std::string::npos) << e.what();
  }
}

// Two tiers of one name: each keeps its own counters (they shared them, so
// stats() of either reported the sum of both).
TEST(TieredCache, TwoTiersOfOneNameKeepTheirOwnMetrics) {
  kvx::metrics::registry reg;
  kc::tiered_cache<kc::tier_stack<kc::dram_tier<>, kc::dram_tier<>>, test_lru, kc::tiering::write_back> c(cache_cfg(reg), dram(2),
                                                                                                            dram(8));
  for (std::uint64_t i = 0; i < 4; ++i) ASSERT_TRUE(c.insert(key(i), payload(i)));  // tier 0: 2, 3; tier 1: 0, 1
  const std::vector<kc::block_key> hot{key(3)};
  EXPECT_EQ(c.lookup(hot).blocks, 1U);
  EXPECT_EQ(c.stats(0).evictions, 2U);
  EXPECT_EQ(c.stats(1).evictions, 0U);
  EXPECT_EQ(c.stats(0).demotions, 0U);
  EXPECT_EQ(c.stats(1).demotions, 2U);
  EXPECT_EQ(c.stats(0).hits, 1U);
  EXPECT_EQ(c.stats(1).hits, 0U);
  EXPECT_EQ(c.stats(0).used_bytes, 2 * block);
  EXPECT_EQ(c.stats(1).used_bytes, 2 * block);
}

TEST(TieredCache, LookupsAndReadsDuringASlowDemotionAreNotBlockedByIt) {
  kvx::metrics::registry reg;
  kc::tiered_cache<kc::tier_stack<kc::dram_tier<>, gated_tier>, test_lru, kc::tiering::write_back> c(
      cache_cfg(reg), dram(3, 0.7, 0.7), 8 * block);  // room for 2 blocks, space for a third while one leaves
  auto& gate = c.tiers().get<1>();
  ASSERT_TRUE(c.insert(key(0), payload(0)));
  ASSERT_TRUE(c.insert(key(1), payload(1)));
  gate.close();
  // Inserting key 2 evicts key 0, whose copy into the gated tier then waits.
  std::thread writer([&] { EXPECT_TRUE(c.insert(key(2), payload(2))); });
  gate.wait_for_stores(1);
  // The copy is stuck; the cache must still answer (this test hangs if not).
  const std::vector<kc::block_key> keys{key(0), key(1)};
  auto m = c.lookup(keys);
  EXPECT_EQ(m.blocks, 2U);
  EXPECT_EQ(m.tiers, (std::vector<std::uint8_t>{0, 0}));  // key 0 is found where it was
  std::vector<std::byte> out(block);
  auto r = c.read(key(0), out);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->tier, 0U);
  EXPECT_EQ(out, payload(0));
  EXPECT_EQ(c.erase(key(0)).code(), kvx::errc::busy);                      // neither erased
  EXPECT_EQ(c.insert(key(0), payload(9)).value(), kc::insert_status::already_cached);  // nor replaced
  auto pinned = c.pin(key(0));  // a reader still holding it when the move ends
  ASSERT_TRUE(pinned);
  EXPECT_EQ(c.stats(0).used_bytes, 2 * block);  // key 0 left tier 0's account, key 2 entered it
  gate.open();
  writer.join();
  EXPECT_EQ(c.stats(1).demotions, 1U);
  EXPECT_EQ(c.residency(key(0)), 0b11);  // its DRAM copy outlives the move while pinned
  pinned->reset();
  EXPECT_EQ(c.residency(key(0)), 0b10);
  EXPECT_EQ(c.tiers().get<0>().used_bytes(), 2 * block);  // the range it left is free again
  for (std::uint64_t i = 0; i < 3; ++i) {
    ASSERT_TRUE(c.read(key(i), out));
    EXPECT_EQ(out, payload(i)) << i;
  }
}

// Write-back: a block evicted from DRAM whose copy into the tier below fails
// stays in DRAM (it was the only copy); the insert that needed its room fails.
// Write-through: the same for a block whose lower copy failed when inserted.
template <class Tiering>
void a_failed_demotion_keeps_the_block() {
  kvx::metrics::registry reg;
  std::vector<std::string> warnings;
  std::mutex warnings_mu;
  kvx::set_log_sink([&](kvx::log_level l, std::string_view msg) {
    std::lock_guard lock(warnings_mu);
    if (l == kvx::log_level::warn) warnings.emplace_back(msg);
  });
  kc::tiered_cache<kc::tier_stack<kc::dram_tier<>, failing_tier>, test_lru, Tiering> c(cache_cfg(reg), dram(2),
                                                                                        8 * block);
  ASSERT_TRUE(c.insert(key(0), payload(0)));
  ASSERT_TRUE(c.insert(key(1), payload(1)));
  auto r = c.insert(key(2), payload(2));  // evicts key 0, whose copy down fails
  kvx::set_log_sink({});
  ASSERT_FALSE(r);
  EXPECT_EQ(r.code(), kvx::errc::capacity_exceeded);
  EXPECT_NE(r.error().message().find("demoting"), std::string::npos) << r.error().message();
  EXPECT_FALSE(c.contains(key(2)));
  ASSERT_TRUE(c.contains(key(0)));
  EXPECT_EQ(c.residency(key(0)), 0b01);
  std::vector<std::byte> out(block);
  for (std::uint64_t i = 0; i < 2; ++i) {
    ASSERT_TRUE(c.read(key(i), out)) << i;
    EXPECT_EQ(out, payload(i)) << i;
  }
  EXPECT_EQ(c.stats(0).used_bytes, 2 * block);
  EXPECT_EQ(c.stats(1).used_bytes, 0U);
  EXPECT_EQ(c.stats(1).demotion_failures, 1U);
  EXPECT_EQ(c.stats(0).evictions, 0U);  // undone, so not counted
  const std::string text = reg.prometheus_text();
  EXPECT_NE(text.find("kvx_cache_demotion_failures_total{cache=\"test\",tier=\"failing\"} 1"), std::string::npos)
      << text;
  // Write-through: every insert's copy into the failing tier (keys 0, 1 and
  // the refused 2) is counted and logged too, beside the failed demotion.
  const bool through = Tiering{}.writes_through();
  EXPECT_EQ(c.stats(1).write_through_failures, through ? 3U : 0U);
  std::vector<std::string> written_through;
  std::erase_if(warnings, [&](const std::string& w) {
    if (w.find("writing block") == std::string::npos) return false;
    written_through.push_back(w);
    return true;
  });
  ASSERT_EQ(written_through.size(), through ? 3U : 0U);
  for (std::size_t i = 0; i < written_through.size(); ++i) {
    EXPECT_NE(written_through[i].find(key(i).to_string()), std::string::npos) << written_through[i];
    EXPECT_NE(written_through[i].find("through to tier 1"), std::string::npos) << written_through[i];
    EXPECT_NE(written_through[i].find("I/O error"), std::string::npos) << written_through[i];
  }
  if (through) {
    EXPECT_NE(text.find("kvx_cache_write_through_failures_total{cache=\"test\",tier=\"failing\"} 3"), std::string::npos)
        << text;
  }
  ASSERT_EQ(warnings.size(), 1U);
  EXPECT_NE(warnings[0].find(key(0).to_string()), std::string::npos) << warnings[0];
  EXPECT_NE(warnings[0].find("I/O error"), std::string::npos) << warnings[0];
  // Key 0 is an ordinary block again: erasable, and its room reusable.
  ASSERT_TRUE(c.erase(key(0)));
  EXPECT_EQ(*c.insert(key(2), payload(2)), kc::insert_status::inserted);
}

TEST(TieredCache, AFailedDemotionKeepsTheBlockAndFailsTheInsertThatNeededItsRoom) {
  a_failed_demotion_keeps_the_block<kc::tiering::write_back>();
}
TEST(TieredCache, AFailedDemotionKeepsTheBlockInWriteThroughToo) {
  a_failed_demotion_keeps_the_block<kc::tiering::write_through>();
}

TEST(TieredCache, LocateGivesTheBlockInTheDramArena) {
  kvx::metrics::registry reg;
  dram_cache c(cache_cfg(reg), dram(4));
  ASSERT_TRUE(c.insert(key(0), payload(0)));
  auto pin = c.pin(key(0));
  ASSERT_TRUE(pin);
  auto where = c.locate(key(0), 0);
  ASSERT_TRUE(where);
  EXPECT_EQ(where->size, block);
  EXPECT_EQ(std::memcmp(c.tiers().get<0>().base() + where->offset, payload(0).data(), block), 0);
  EXPECT_FALSE(c.locate(key(1), 0));  // not cached
  EXPECT_FALSE(c.locate(key(0), 3));  // no such tier
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

TEST(TieredCache, ReadManyReportsEveryKeyOnceWithItsBytesOrItsError) {
  kvx::metrics::registry reg;
  two_tier c(cache_cfg(reg), dram(2), file(8));
  for (std::uint64_t i = 0; i < 5; ++i) ASSERT_TRUE(c.insert(key(i), payload(i)));
  ASSERT_EQ(c.tier_of(key(0)), 1U);  // 0..2 demoted to the file tier, 3 and 4 in DRAM
  ASSERT_EQ(c.tier_of(key(4)), 0U);
  const std::vector<kc::block_key> keys{key(4), key(0), key(99), key(3), key(1), key(2)};
  std::vector<std::vector<std::byte>> bufs(keys.size(), std::vector<std::byte>(block));
  bufs[4].resize(block - 1);  // too short for key 1
  std::vector<std::span<std::byte>> outs(bufs.begin(), bufs.end());
  std::vector<std::pair<std::size_t, std::error_code>> seen;
  c.read_many(keys, outs, [&](std::size_t i, std::error_code ec) { seen.emplace_back(i, ec); });
  // Errors first, then tier 0's blocks, then tier 1's (as its reads land),
  // each key once.
  const std::vector<std::pair<std::size_t, std::error_code>> up_to_tier_0{
      {2, make_error_code(kvx::errc::not_found)}, {4, make_error_code(kvx::errc::out_of_range)}, {0, {}}, {3, {}}};
  ASSERT_EQ(seen.size(), 6U);
  EXPECT_EQ(std::vector(seen.begin(), seen.begin() + 4), up_to_tier_0);
  std::vector tier_1(seen.begin() + 4, seen.end());
  std::sort(tier_1.begin(), tier_1.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  EXPECT_EQ(tier_1, (std::vector<std::pair<std::size_t, std::error_code>>{{1, {}}, {5, {}}}));
  for (std::size_t i : {0, 1, 3, 5}) EXPECT_EQ(bufs[i], payload(keys[i].lo)) << i;
  EXPECT_EQ(c.tier_of(key(0)), 1U);  // nothing promoted
  EXPECT_EQ(c.stats(1).promotions, 0U);
  EXPECT_EQ(c.stats(0).hits + c.stats(1).hits, 0U);  // and no access recorded
}

// Blocks 0..3 in a two-tier cache (0 and 1 demoted to the file tier), and
// buffers to read back keys 3, 0 and 1.
struct read_many_setup {
  kvx::metrics::registry reg;
  two_tier c{cache_cfg(reg), dram(2), file(8)};
  std::vector<kc::block_key> keys{key(3), key(0), key(1)};
  std::vector<std::vector<std::byte>> bufs = std::vector<std::vector<std::byte>>(3, std::vector<std::byte>(block));
  std::vector<std::span<std::byte>> outs{bufs.begin(), bufs.end()};
  read_many_setup() {
    for (std::uint64_t i = 0; i < 4; ++i) EXPECT_TRUE(c.insert(key(i), payload(i)));
  }
};

TEST(TieredCache, ReadManyKeepsEachBlockPinnedUntilItIsReported) {
  read_many_setup f;
  auto& c = f.c;
  std::vector<std::error_code> erase_during;
  c.read_many(f.keys, f.outs, [&](std::size_t i, std::error_code ec) {
    EXPECT_FALSE(ec) << i;
    // While block 3 is reported, 0 and 1 wait their turn: pinned, not erasable.
    if (i == 0) erase_during.push_back(c.erase(key(0)).code());
  });
  ASSERT_EQ(erase_during.size(), 1U);
  EXPECT_EQ(erase_during[0], kvx::errc::busy);
  EXPECT_TRUE(c.erase(key(0)));  // unpinned once reported
  EXPECT_TRUE(c.erase(key(3)));
}

TEST(TieredCache, ReadManyUnpinsWhatIsLeftWhenACallbackThrows) {
  read_many_setup f;
  EXPECT_THROW(f.c.read_many(f.keys, f.outs, [](std::size_t, std::error_code) { throw std::runtime_error("stop"); }),
               std::runtime_error);
  for (const auto& k : f.keys) EXPECT_TRUE(f.c.erase(k)) << k.to_string();
}
