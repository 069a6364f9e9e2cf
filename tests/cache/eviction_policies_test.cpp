#include <kvx/cache/eviction.hpp>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <stdexcept>
#include <vector>

#include <gtest/gtest.h>

#include <kvx/testing/eviction_conformance.hpp>

namespace ev = kvx::cache::eviction;
using kvx::cache::access_context;
using kvx::cache::block_key;

namespace {

block_key policy_key(std::uint64_t i) { return block_key{0, i}; }
constexpr auto all = [](const block_key&) { return true; };

// A demand cache of `capacity` blocks driven one access at a time (no
// pinning). Returns whether each access hit; `evicted` collects victims.
template <class P>
std::vector<bool> drive(P& p, std::size_t capacity, std::initializer_list<std::uint64_t> seq,
                        std::vector<std::uint64_t>* evicted = nullptr) {
  std::vector<bool> hits;
  std::vector<std::uint64_t> resident;
  std::uint64_t now = 0;
  for (auto id : seq) {
    const access_context ctx{++now};
    if (std::find(resident.begin(), resident.end(), id) != resident.end()) {
      p.on_hit(policy_key(id), ctx);
      hits.push_back(true);
      continue;
    }
    hits.push_back(false);
    if (resident.size() >= capacity) {
      auto v = p.victim(all);
      EXPECT_TRUE(v.has_value());
      std::erase(resident, v->lo);
      if (evicted) evicted->push_back(v->lo);
    }
    p.on_insert(policy_key(id), ctx);
    resident.push_back(id);
  }
  return hits;
}

// A hot pair read three times, a scan of 20 one-off blocks, then the pair again.
template <class P>
std::size_t hot_hits_after_scan(P p, std::size_t capacity) {
  auto h = drive(p, capacity,
                 {1, 2, 1, 2, 1, 2, 100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111, 112, 113, 114, 115, 116,
                  117, 118, 119, 1, 2});
  return static_cast<std::size_t>(h[h.size() - 2]) + static_cast<std::size_t>(h.back());
}

}  // namespace

KVX_INSTANTIATE_EVICTION_CONFORMANCE(Builtin, ev::lru, ev::lfu, ev::s3fifo, ev::arc, ev::sieve, ev::prefix_aware,
                                     ev::belady, ev::reuse_class, ev::any_eviction_policy);

TEST(EvictionLru, EvictsTheLeastRecentlyUsed) {
  ev::lru p(3);
  std::vector<std::uint64_t> evicted;
  drive(p, 3, {1, 2, 3, 1, 4, 5}, &evicted);
  EXPECT_EQ(evicted, (std::vector<std::uint64_t>{2, 3}));
}

TEST(EvictionLru, AScanFlushesTheHotSet) {  // the classic case where LRU fails
  EXPECT_EQ(hot_hits_after_scan(ev::lru(4), 4), 0u);
}

TEST(EvictionLfu, FrequencyBeatsRecency) {
  ev::lfu p(2);
  std::vector<std::uint64_t> evicted;
  drive(p, 2, {1, 1, 1, 2, 3}, &evicted);
  EXPECT_EQ(evicted, (std::vector<std::uint64_t>{2}));
}

TEST(EvictionLfu, AgingEvictsAStaleFavourite) {
  // Plain LFU would keep block 1 (six reads long ago) forever and churn the
  // other slot. With aging each eviction raises the floor new blocks start
  // from: x_n enters at priority n, so at x_7 block 1 (priority 6, older
  // than x_6 at 6) is the victim.
  ev::lfu p(2);
  std::vector<std::uint64_t> evicted;
  drive(p, 2, {1, 1, 1, 1, 1, 1, 11, 12, 13, 14, 15, 16, 17}, &evicted);
  EXPECT_EQ(evicted, (std::vector<std::uint64_t>{11, 12, 13, 14, 15, 1}));
  EXPECT_EQ(p.age(), 6u);
}

TEST(EvictionS3fifo, OneHitWondersLeaveThroughTheSmallQueueAndTheGhost) {
  ev::s3fifo p(10);
  drive(p, 10, {1, 2, 3});
  EXPECT_EQ(p.small_size(), 3u);
  EXPECT_EQ(p.main_size(), 0u);
  p.on_hit(policy_key(1), {});
  // Small is over its share: 1 (read while there) moves to main, 2 leaves.
  EXPECT_EQ(p.victim(all), policy_key(2));
  EXPECT_EQ(p.main_size(), 1u);
  EXPECT_TRUE(p.in_ghost(policy_key(2)));
  p.on_insert(policy_key(2), {});  // back from the ghost: straight to main
  EXPECT_EQ(p.main_size(), 2u);
  EXPECT_FALSE(p.in_ghost(policy_key(2)));
}

TEST(EvictionS3fifo, KeepsTheHotSetThroughAScan) { EXPECT_EQ(hot_hits_after_scan(ev::s3fifo(4), 4), 2u); }

TEST(EvictionArc, KeepsTheHotSetThroughAScan) { EXPECT_EQ(hot_hits_after_scan(ev::arc(4), 4), 2u); }

TEST(EvictionArc, AGhostHitInB1GrowsTheRecencyTarget) {
  ev::arc p(3);
  std::vector<std::uint64_t> evicted;
  // 1 is read twice (T2); T1 = {2, 3} exceeds its target 0, so 2 goes to B1.
  drive(p, 3, {1, 1, 2, 3, 4}, &evicted);
  EXPECT_EQ(evicted, (std::vector<std::uint64_t>{2}));
  EXPECT_EQ(p.target_recency(), 0.0);
  ASSERT_EQ(p.victim(all), policy_key(3));  // room for 2 again
  p.on_insert(policy_key(2), {});           // a hit in B1: recency deserved more room
  EXPECT_GT(p.target_recency(), 0.0);
}

TEST(EvictionSieve, TheHandSparesVisitedBlocksOnce) {
  ev::sieve p(3);
  std::vector<std::uint64_t> evicted;
  // 1 is visited: the hand clears it and evicts 2; next it reaches 3.
  drive(p, 3, {1, 2, 3, 1, 4, 5}, &evicted);
  EXPECT_EQ(evicted, (std::vector<std::uint64_t>{2, 3}));
}

TEST(EvictionSieve, KeepsTheHotSetThroughAScan) { EXPECT_EQ(hot_hits_after_scan(ev::sieve(4), 4), 2u); }

TEST(EvictionPrefixAware, EvictsLeavesBeforeTheirParents) {
  ev::prefix_aware p(4);
  const block_key a = policy_key(1), b = policy_key(2), c = policy_key(3), d = policy_key(4);
  p.on_insert(a, {1});
  p.on_insert(b, {2, kvx::cache::never, 0, &a});
  p.on_insert(c, {3, kvx::cache::never, 0, &b});
  p.on_insert(d, {4});
  EXPECT_FALSE(p.is_leaf(a));
  EXPECT_EQ(p.victim(all), c);  // a is older, but c is the oldest leaf
  EXPECT_TRUE(p.is_leaf(b));
  EXPECT_EQ(p.victim(all), b);  // b became a leaf, older than d
  EXPECT_EQ(p.victim(all), a);
  EXPECT_EQ(p.victim(all), d);
}

TEST(EvictionPrefixAware, FallsBackToInnerBlocksWhenEveryLeafIsPinned) {
  ev::prefix_aware p(2);
  const block_key a = policy_key(1), b = policy_key(2);
  p.on_insert(a, {1});
  p.on_insert(b, {2, kvx::cache::never, 0, &a});
  EXPECT_EQ(p.victim([&](const block_key& k) { return k != b; }), a);
}

TEST(EvictionPrefixAware, ABlockChangingClassTakesItsRecencyPlace) {
  ev::prefix_aware p(8);
  const block_key r1 = policy_key(1), a = policy_key(2), r2 = policy_key(3);
  const block_key c1 = policy_key(11), c2 = policy_key(12), ca = policy_key(13);
  p.on_insert(r1, {1});
  p.on_insert(a, {2});
  p.on_insert(r2, {3});
  p.on_insert(c1, {4, kvx::cache::never, 0, &r1});
  p.on_insert(c2, {5, kvx::cache::never, 0, &r2});
  p.on_insert(ca, {6, kvx::cache::never, 0, &a});  // a joins r2 and r1 between them
  const auto roots = [&](const block_key& k) { return k == r1 || k == a || k == r2; };
  p.on_erase(c1);  // r1 becomes a leaf again, older than every other leaf
  EXPECT_EQ(p.victim(all), r1);
  EXPECT_EQ(p.victim(roots), a);
  EXPECT_EQ(p.victim(roots), r2);
  EXPECT_EQ(p.approximate_placements(), 0u);
}

TEST(EvictionPrefixAware, AChildInsertedAgainCountsOnceForItsParent) {
  ev::prefix_aware p(4);
  const block_key a = policy_key(1), b = policy_key(2);
  p.on_insert(a, {1});
  p.on_insert(b, {2, kvx::cache::never, 0, &a});
  p.on_insert(b, {3, kvx::cache::never, 0, &a});
  EXPECT_EQ(p.size(), 2u);
  p.on_erase(b);
  EXPECT_TRUE(p.is_leaf(a));
  EXPECT_EQ(p.victim(all), a);
}

TEST(EvictionPrefixAware, ALongPlacementWalkStopsAndPlacesAfterTheOlderBlocksItPassed) {
  ev::prefix_aware p(400);
  constexpr std::uint64_t half = 2 * ev::prefix_aware::max_placement_steps + 20;
  std::uint64_t now = 0;
  for (std::uint64_t i = 0; i < half; ++i) p.on_insert(policy_key(i), {++now});
  const block_key parent = policy_key(1000), child = policy_key(1001);
  p.on_insert(parent, {++now});
  for (std::uint64_t i = half; i < 2 * half; ++i) p.on_insert(policy_key(i), {++now});
  p.on_insert(child, {++now, kvx::cache::never, 0, &parent});
  EXPECT_EQ(p.approximate_placements(), 0u);  // into the empty inner list
  p.on_erase(child);  // back among the leaves, with `half` newer and older ones
  EXPECT_EQ(p.approximate_placements(), 1u);
  for (std::uint64_t i = 0; i < ev::prefix_aware::max_placement_steps; ++i) EXPECT_EQ(p.victim(all), policy_key(i));
  EXPECT_EQ(p.victim(all), parent);
}

TEST(EvictionBelady, EvictsTheBlockUsedFarthestInTheFuture) {
  ev::belady p(2);
  p.on_insert(policy_key(1), {0, 10});
  p.on_insert(policy_key(2), {1, 5});
  EXPECT_EQ(p.victim(all), policy_key(1));
  p.on_insert(policy_key(3), {2, kvx::cache::never});
  EXPECT_EQ(p.victim(all), policy_key(3));
}

TEST(EvictionReuseClass, EvictsARequestsTailBeforeAReusedBlock) {
  ev::reuse_class::options o;
  o.vectors = {{-2, -1.5, -1, 0, 1}};
  ev::reuse_class p(4, o);
  const block_key a = policy_key(1), tail = policy_key(2);
  p.on_insert(a, {1});
  p.on_hit(a, {2});
  p.on_insert(tail, {3, kvx::cache::never, 0, nullptr});
  EXPECT_EQ(p.victim(all), tail);
}

TEST(EvictionReuseClass, StrongProtectionKeepsTheHotSetThroughAScan) {
  ev::reuse_class::options o;
  o.vectors = {{-16, -16, -12, 0, 8}};
  EXPECT_EQ(hot_hits_after_scan(ev::reuse_class(4, o), 4), 2u);
}

TEST(EvictionReuseClass, StartsAsLruAndDuelsOnlyWithSeveralVectors) {
  ev::reuse_class p(100);
  EXPECT_EQ(p.mode(), 0u);
}

// The ghost ring: a key's reads are remembered until its latest ring slot is
// reused (ring of 2 here), also when its record was reused in between.
TEST(EvictionReuseClass, AGhostRemembersReadsUntilItsRingSlotIsReused) {
  ev::reuse_class::options o;
  o.vectors = {{0, 0, 0, 4, 8}};  // read twice: +8 ticks, three times: +16 (unit = capacity 2)
  o.ghost_factor = 1.0;
  ev::reuse_class p(2, o);
  const block_key a = policy_key(1), b = policy_key(2), c = policy_key(3), d = policy_key(4);
  p.on_insert(a, {});
  p.on_hit(a, {});
  EXPECT_EQ(p.victim(all), a);  // a ghost, read twice (slot 0)
  p.on_insert(b, {});
  p.on_insert(a, {});            // three reads: frequent
  EXPECT_EQ(p.victim(all), b);  // slot 1
  p.on_insert(c, {});
  EXPECT_EQ(p.victim(all), c);  // slot 0 again: a's old ghost is tracked now, kept
  EXPECT_EQ(p.victim(all), a);  // slot 1: b's ghost forgotten
  p.on_insert(b, {});           // read once (a remembered b would be protected)
  p.on_insert(d, {});
  EXPECT_EQ(p.victim(all), b);  // slot 0: c's ghost forgotten
  p.on_insert(a, {});           // four reads, remembered
  EXPECT_EQ(p.victim(all), d);
  EXPECT_EQ(p.size(), 1u);
}

// prefetch is a hint: the same accesses with and without it evict the same
// keys (also through any_eviction_policy, which forwards it).
template <class P>
void expect_prefetch_changes_no_decision() {
  P with(8), without(8);
  std::vector<std::uint64_t> resident;
  std::uint64_t x = 1;
  for (int step = 0; step < 5000; ++step) {
    x = x * 6364136223846793005ULL + 1442695040888963407ULL;
    const std::uint64_t id = (x >> 33) % 40, parent_id = id == 0 ? 0 : id - 1;
    const block_key k = policy_key(id), parent = policy_key(parent_id);
    const access_context ctx{0, kvx::cache::never, 0, (x & 1) != 0 ? &parent : nullptr};
    with.prefetch(policy_key((x >> 20) % 64));  // hints for keys not inserted, too
    if (std::find(resident.begin(), resident.end(), id) != resident.end()) {
      with.on_hit(k, ctx);
      without.on_hit(k, ctx);
      continue;
    }
    with.prefetch(k);
    if (resident.size() >= 8) {
      auto v = with.victim(all);
      ASSERT_EQ(v, without.victim(all));
      ASSERT_TRUE(v.has_value());
      std::erase(resident, v->lo);
    }
    with.on_insert(k, ctx);
    without.on_insert(k, ctx);
    resident.push_back(id);
    ASSERT_EQ(with.size(), without.size());
  }
}

TEST(EvictionReuseClass, PrefetchChangesNoDecision) {
  expect_prefetch_changes_no_decision<ev::reuse_class>();
  expect_prefetch_changes_no_decision<ev::any_eviction_policy>();
}

TEST(AnyEvictionPolicy, BuildsEachNamedPolicyFromConfig) {
  for (const char* name : {"lru", "lfu", "s3fifo", "arc", "sieve", "prefix", "prefix_aware", "reuse_class", "auto",
                           "belady"}) {
    nlohmann::json cfg = {{"policy", name}};
    auto p = ev::any_eviction_policy::from_config(kvx::config::view(cfg), 8);
    ASSERT_TRUE(p) << name << ": " << p.error().message();
    EXPECT_EQ(p->name(), name);
    p->on_insert(policy_key(1), {});
    EXPECT_EQ(p->victim(all), policy_key(1));
  }
}

TEST(AnyEvictionPolicy, RejectsUnknownNamesAndFieldsWithTheirPath) {
  nlohmann::json unknown = {{"policy", "mru"}};
  auto a = ev::any_eviction_policy::from_config(kvx::config::view(unknown, "cache.eviction"), 8);
  ASSERT_FALSE(a);
  EXPECT_NE(a.error().message().find("cache.eviction.policy"), std::string::npos) << a.error().message();
  EXPECT_NE(a.error().message().find("'mru'"), std::string::npos);

  nlohmann::json typo = {{"policy", "s3fifo"}, {"small_ration", 0.2}};
  auto b = ev::any_eviction_policy::from_config(kvx::config::view(typo), 8);
  ASSERT_FALSE(b);
  EXPECT_NE(b.error().message().find("small_ration"), std::string::npos);

  nlohmann::json range = {{"policy", "s3fifo"}, {"small_ratio", 1.5}};
  EXPECT_FALSE(ev::any_eviction_policy::from_config(kvx::config::view(range), 8));

  nlohmann::json missing = {{"small_ratio", 0.5}};
  auto d = ev::any_eviction_policy::from_config(kvx::config::view(missing), 8);
  ASSERT_FALSE(d);
  EXPECT_NE(d.error().message().find("'policy' is required"), std::string::npos);
}

// ghost_factor x capacity sizes the ghost: out of [0, 64] it is a size no
// allocation or conversion takes, so the constructor refuses it.
TEST(EvictionPolicies, AGhostFactorOutOfRangeIsRefusedByTheConstructor) {
  ev::s3fifo::options s;
  s.ghost_factor = 1e300;
  EXPECT_THROW(ev::s3fifo(8, s), std::invalid_argument);
  s.ghost_factor = -1;
  EXPECT_THROW(ev::s3fifo(8, s), std::invalid_argument);
  s.ghost_factor = ev::s3fifo::max_ghost_factor;
  EXPECT_NO_THROW(ev::s3fifo(8, s));
  ev::reuse_class::options r;
  r.ghost_factor = 1e17;
  EXPECT_THROW(ev::reuse_class(8, r), std::invalid_argument);
  r.ghost_factor = ev::reuse_class::max_ghost_factor;
  EXPECT_NO_THROW(ev::reuse_class(8, r));
  // Tracked and remembered keys are numbered in 32 bits.
  r.ghost_factor = 4;
  EXPECT_THROW(ev::reuse_class(std::size_t{1} << 30, r), std::invalid_argument);
}

TEST(AnyEvictionPolicy, ForwardsOptions) {
  nlohmann::json cfg = {{"policy", "s3fifo"}, {"small_ratio", 0.5}, {"ghost_factor", 0}};
  auto p = ev::any_eviction_policy::from_config(kvx::config::view(cfg), 4);
  ASSERT_TRUE(p);
  EXPECT_EQ(p->name(), "s3fifo");
}
