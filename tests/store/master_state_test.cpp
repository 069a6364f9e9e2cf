#include <kvx/store/master_state.hpp>
#include <kvx/cache/eviction/lru.hpp>

#include <gtest/gtest.h>

#include <list>
#include <set>
#include <stdexcept>
#include <unordered_map>

namespace {

using namespace std::chrono_literals;
using kvx::store::clock;
using kvx::store::object_key;


using master = kvx::store::master_state<kvx::cache::eviction::lru>;

kvx::store::put_options reps(unsigned n) {
  kvx::store::put_options o;
  o.replicas = n;
  return o;
}
kvx::store::put_options pinned(bool pin) {
  kvx::store::put_options o;
  o.soft_pin = pin;
  return o;
}

struct MasterState : ::testing::Test {
  kvx::metrics::registry registry;
  clock::time_point t0 = clock::now();
  kvx::store::master_config config = [] {
    kvx::store::master_config c;
    c.put_lease = 10s;
    c.read_lease = 5s;
    c.node_timeout = 3s;
    c.high_watermark = 0.9;
    c.low_watermark = 0.5;
    return c;
  }();

  master make() {
    master m(config, kvx::store::placement::random_with_capacity{}, registry);
    for (int n = 0; n < 3; ++n)
      EXPECT_TRUE(m.add_segment({"seg" + std::to_string(n), "node" + std::to_string(n), 1 << 20, "dram"}, t0));
    return m;
  }
  static object_key key(const std::string& k) { return {"tenant", k}; }
};

TEST_F(MasterState, PutIsInvisibleUntilCommitted) {
  auto m = make();
  auto t = m.put_start(key("a"), 1000, reps(2), t0);
  ASSERT_TRUE(t) << t.error().message();
  ASSERT_EQ(t->replicas.size(), 2u);
  EXPECT_NE(t->replicas[0].node, t->replicas[1].node);
  EXPECT_FALSE(m.exists(key("a")));
  EXPECT_EQ(m.get(key("a"), t0).code(), kvx::errc::not_found);
  ASSERT_TRUE(m.put_commit(key("a"), t->put_id, t0 + 1s));
  auto g = m.get(key("a"), t0 + 2s, t->replicas[1].node);
  ASSERT_TRUE(g);
  EXPECT_EQ(g->size, 1000u);
  EXPECT_EQ(g->replicas.front(), t->replicas[1]) << "the reader's own node is listed first";
  EXPECT_EQ(m.put_start(key("a"), 10, {}, t0).code(), kvx::errc::already_exists);
}

TEST_F(MasterState, DeadWriterSpaceIsReclaimedAfterItsLease) {
  auto m = make();
  auto t = m.put_start(key("half"), 4096, {}, t0);
  ASSERT_TRUE(t);
  const auto used = m.used_bytes();
  EXPECT_GT(used, 0u);
  auto beat = [&](clock::time_point at) {
    for (int n = 0; n < 3; ++n) ASSERT_TRUE(m.heartbeat("node" + std::to_string(n), at));
  };
  beat(t0 + 3s);
  auto early = m.tick(t0 + 5s);
  EXPECT_TRUE(early.reclaimed_puts.empty());
  EXPECT_TRUE(early.dropped_nodes.empty());
  beat(t0 + 8s);
  auto report = m.tick(t0 + 11s);
  ASSERT_EQ(report.reclaimed_puts.size(), 1u);
  EXPECT_EQ(report.reclaimed_puts[0], key("half"));
  EXPECT_EQ(m.used_bytes(), 0u);
  EXPECT_EQ(m.put_commit(key("half"), t->put_id, t0 + 12s).code(), kvx::errc::not_found);
}

TEST_F(MasterState, LateCommitFailsAndReclaims) {
  auto m = make();
  auto t = m.put_start(key("late"), 4096, {}, t0);
  EXPECT_EQ(m.put_commit(key("late"), t->put_id, t0 + 11s).code(), kvx::errc::timed_out);
  EXPECT_EQ(m.used_bytes(), 0u);
}

TEST_F(MasterState, WrongPutIdAndAbort) {
  auto m = make();
  auto t = m.put_start(key("x"), 100, {}, t0);
  EXPECT_EQ(m.put_commit(key("x"), t->put_id + 1, t0).code(), kvx::errc::not_found);
  EXPECT_TRUE(m.put_abort(key("x"), t->put_id));
  EXPECT_EQ(m.used_bytes(), 0u);
  EXPECT_EQ(m.put_abort(key("x"), t->put_id).code(), kvx::errc::not_found);
}

TEST_F(MasterState, ReadLeaseBlocksRemoveAndEviction) {
  auto m = make();
  auto t = m.put_start(key("leased"), 512 * 1024, {}, t0);
  ASSERT_TRUE(m.put_commit(key("leased"), t->put_id, t0));
  ASSERT_TRUE(m.get(key("leased"), t0 + 1s));  // lease until t0 + 6s
  EXPECT_EQ(m.remove(key("leased"), t0 + 2s).code(), kvx::errc::busy);
  // Fill the cluster: the leased object must survive the pressure.
  for (int i = 0; i < 20; ++i) {
    auto p = m.put_start(key("fill" + std::to_string(i)), 512 * 1024, {}, t0 + 2s);
    if (p) {
      ASSERT_TRUE(m.put_commit(key("fill" + std::to_string(i)), p->put_id, t0 + 2s));
    }
  }
  EXPECT_TRUE(m.exists(key("leased")));
  EXPECT_TRUE(m.release_lease(key("leased"), t0 + 3s));
  EXPECT_TRUE(m.remove(key("leased"), t0 + 3s));
  EXPECT_FALSE(m.exists(key("leased")));
}

// Reader A's release used to end every reader's lease (lease_until =
// min(latest, now)): reader B's range could be removed and reused mid-read.
TEST_F(MasterState, OneReadersReleaseLeavesAnotherReadersLease) {
  auto m = make();
  auto t = m.put_start(key("shared"), 1000, {}, t0);
  ASSERT_TRUE(m.put_commit(key("shared"), t->put_id, t0));
  auto a = m.get(key("shared"), t0);        // until t0 + 5s
  auto b = m.get(key("shared"), t0 + 1s);   // until t0 + 6s
  ASSERT_TRUE(a);
  ASSERT_TRUE(b);
  EXPECT_NE(a->lease_id, b->lease_id);
  // A release without an id (an older client) cannot say whose lease ended: with two it ends none.
  EXPECT_TRUE(m.release_lease(key("shared"), t0 + 2s));
  EXPECT_EQ(m.remove(key("shared"), t0 + 2s).code(), kvx::errc::busy);
  EXPECT_TRUE(m.release_lease(key("shared"), t0 + 2s, a->lease_id));
  EXPECT_EQ(m.remove(key("shared"), t0 + 2s).code(), kvx::errc::busy) << "B still reads";
  // Releasing A again, or an id never granted, changes nothing.
  EXPECT_TRUE(m.release_lease(key("shared"), t0 + 2s, a->lease_id));
  EXPECT_TRUE(m.release_lease(key("shared"), t0 + 2s, 999));
  EXPECT_EQ(m.remove(key("shared"), t0 + 2s).code(), kvx::errc::busy);
  EXPECT_TRUE(m.release_lease(key("shared"), t0 + 3s, b->lease_id));
  EXPECT_TRUE(m.remove(key("shared"), t0 + 3s));
}

TEST_F(MasterState, EvictionFollowsThePolicyAndRespectsSoftPins) {
  auto m = make();
  auto put = [&](const std::string& k, bool pin) {
    auto t = m.put_start(key(k), 400 * 1024, pinned(pin), t0);
    ASSERT_TRUE(t) << k << ": " << t.error().message();
    ASSERT_TRUE(m.put_commit(key(k), t->put_id, t0));
  };
  put("system-prompt", true);
  put("old", false);
  put("newer", false);
  ASSERT_TRUE(m.get(key("old"), t0 - 1h));  // touch "old" (lease already expired) so "newer" is LRU
  for (int i = 0; i < 5; ++i) put("more" + std::to_string(i), false);
  EXPECT_TRUE(m.exists(key("system-prompt")));
  EXPECT_LE(m.used_bytes(), static_cast<std::uint64_t>(0.9 * 3 * (1 << 20)));
  EXPECT_FALSE(m.exists(key("newer")));
}

TEST_F(MasterState, FullClusterOfLeasedObjectsRefusesAPutClearly) {
  auto m = make();
  for (int i = 0; i < 3; ++i) {
    auto t = m.put_start(key("big" + std::to_string(i)), 900 * 1024, {}, t0);
    ASSERT_TRUE(t);
    ASSERT_TRUE(m.put_commit(key("big" + std::to_string(i)), t->put_id, t0));
    ASSERT_TRUE(m.get(key("big" + std::to_string(i)), t0));
  }
  auto t = m.put_start(key("nope"), 900 * 1024, {}, t0 + 1s);
  ASSERT_FALSE(t);
  EXPECT_EQ(t.code(), kvx::errc::capacity_exceeded);
  EXPECT_NE(t.error().context().find("no room"), std::string::npos);
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(m.exists(key("big" + std::to_string(i))));
}

TEST_F(MasterState, ReplicasNeedDistinctNodes) {
  auto m = make();
  EXPECT_EQ(m.put_start(key("r4"), 10, reps(4), t0).code(), kvx::errc::capacity_exceeded);
  EXPECT_EQ(m.used_bytes(), 0u) << "a refused put leaves nothing allocated";
}

// A put no eviction can make room for (more replicas than nodes, or larger
// than every segment) used to evict the whole pool, pinned objects too.
TEST_F(MasterState, APutThatCanNeverFitEvictsNothing) {
  auto m = make();
  for (int i = 0; i < 3; ++i) {
    auto t = m.put_start(key("kept" + std::to_string(i)), 1000, pinned(i == 0), t0);
    ASSERT_TRUE(t);
    ASSERT_TRUE(m.put_commit(key("kept" + std::to_string(i)), t->put_id, t0));
  }
  auto four = m.put_start(key("r4"), 1000, reps(4), t0 + 1s);
  EXPECT_EQ(four.code(), kvx::errc::capacity_exceeded);
  EXPECT_NE(four.error().context().find("distinct nodes"), std::string::npos) << four.error().context();
  auto huge = m.put_start(key("huge"), (1 << 20) + (1 << 19), {}, t0 + 1s);  // 1.5 MiB: the pool has 3, no segment 1.5
  EXPECT_EQ(huge.code(), kvx::errc::capacity_exceeded);
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(m.exists(key("kept" + std::to_string(i)))) << i;
  EXPECT_EQ(m.object_count(), 3u);
}

// Removing (or evicting) an object whose copy was planned used to free the
// copy's target while the task still waited for its source's heartbeat: the
// source then wrote the old bytes over the next object placed there.
TEST_F(MasterState, AnObjectBeingCopiedIsNeitherRemovedNorEvicted) {
  auto m = make();
  auto t = m.put_start(key("x"), 1000, reps(2), t0);
  ASSERT_TRUE(m.put_commit(key("x"), t->put_id, t0));
  ASSERT_TRUE(m.remove_node(t->replicas[1].node, t0));
  auto report = m.tick(t0 + 1s);
  ASSERT_EQ(report.replications.size(), 1u);
  const auto task = report.replications[0];
  const auto used = m.used_bytes();
  EXPECT_EQ(m.remove(key("x"), t0 + 1s).code(), kvx::errc::busy);
  // Eviction passes it over too: a put needing its room fails instead.
  EXPECT_EQ(m.put_start(key("y"), (1 << 20) - 512, reps(2), t0 + 1s).code(), kvx::errc::capacity_exceeded);
  EXPECT_TRUE(m.exists(key("x")));
  EXPECT_EQ(m.used_bytes(), used) << "the copy's target stays allocated";
  ASSERT_TRUE(m.replication_done(key("x"), task.put_id, task.target));
  EXPECT_TRUE(m.remove(key("x"), t0 + 1s));
  EXPECT_EQ(m.used_bytes(), 0u);
}

// A copy that failed (its transfer, or its source died) used to stay "in
// flight" forever: counted as a replica, so none was planned again, and its
// target's bytes leaked.
TEST_F(MasterState, ACopyNotDoneByItsDeadlineIsGivenUpAndPlannedAgain) {
  auto m = make();  // replication_timeout: the default, 30 s
  auto t = m.put_start(key("x"), 1000, reps(2), t0);
  ASSERT_TRUE(m.put_commit(key("x"), t->put_id, t0));
  const auto one_replica = m.used_bytes() / 2;
  ASSERT_TRUE(m.remove_node(t->replicas[1].node, t0));
  EXPECT_EQ(m.used_bytes(), one_replica);
  auto first = m.tick(t0 + 1s);
  ASSERT_EQ(first.replications.size(), 1u);
  EXPECT_EQ(m.used_bytes(), 2 * one_replica);
  std::vector<kvx::store::replication_task> later;
  for (auto s = 2s; s <= 40s; s += 2s) {
    for (const auto& n : m.nodes()) ASSERT_TRUE(m.heartbeat(n, t0 + s));
    auto r = m.tick(t0 + s);
    if (s <= 31s) {
      EXPECT_TRUE(r.replications.empty()) << "planned again before the deadline, at " << s.count();
    }
    later.insert(later.end(), r.replications.begin(), r.replications.end());
  }
  ASSERT_EQ(later.size(), 1u) << "planned again once, past the deadline";
  EXPECT_NE(later[0].put_id, first.replications[0].put_id);
  EXPECT_EQ(m.used_bytes(), 2 * one_replica) << "the first target was freed";
  EXPECT_EQ(m.replication_done(key("x"), first.replications[0].put_id, first.replications[0].target).code(),
            kvx::errc::not_found) << "a copy given up cannot be reported done";
}

TEST_F(MasterState, DeadNodeLosesOrReReplicates) {
  auto m = make();
  auto t1 = m.put_start(key("one-copy"), 1000, reps(1), t0);
  ASSERT_TRUE(m.put_commit(key("one-copy"), t1->put_id, t0));
  auto t2 = m.put_start(key("two-copies"), 1000, reps(2), t0);
  ASSERT_TRUE(m.put_commit(key("two-copies"), t2->put_id, t0));
  const auto victim_node = t1->replicas[0].node;
  for (int n = 0; n < 3; ++n)
    if ("node" + std::to_string(n) != victim_node) {
      ASSERT_TRUE(m.heartbeat("node" + std::to_string(n), t0 + 4s));
    }
  auto report = m.tick(t0 + 4s);
  ASSERT_EQ(report.dropped_nodes, std::vector<std::string>{victim_node});
  EXPECT_FALSE(m.exists(key("one-copy")));
  ASSERT_EQ(report.lost_objects.size(), 1u);
  EXPECT_EQ(report.lost_objects[0], key("one-copy"));
  EXPECT_TRUE(m.exists(key("two-copies")));
  auto g = m.get(key("two-copies"), t0 + 4s);
  ASSERT_TRUE(g);
  for (const auto& r : g->replicas) EXPECT_NE(r.node, victim_node);
  const bool lost_one = t2->replicas[0].node == victim_node || t2->replicas[1].node == victim_node;
  if (lost_one) {
    ASSERT_EQ(report.replications.size(), 1u);
    const auto& task = report.replications[0];
    EXPECT_NE(task.target.node, task.source.node);
    EXPECT_NE(task.target.node, victim_node);
    ASSERT_TRUE(m.replication_done(key("two-copies"), task.put_id, task.target));
    EXPECT_EQ(m.get(key("two-copies"), t0 + 5s)->replicas.size(), 2u);
  }
  EXPECT_EQ(m.heartbeat(victim_node, t0 + 5s).code(), kvx::errc::not_found);
}

TEST_F(MasterState, ARemovedNodeLeavesAtOnceAndItsReportsWaitAPutLeaseFromThen) {
  auto m = make();
  auto t = m.put_start(key("one-copy"), 1000, reps(1), t0);
  ASSERT_TRUE(m.put_commit(key("one-copy"), t->put_id, t0));
  const auto victim = t->replicas[0].node;
  EXPECT_EQ(m.remove_node("no-such-node", t0).code(), kvx::errc::not_found);
  auto report = m.remove_node(victim, t0 + 2s);
  ASSERT_TRUE(report) << report.error().message();
  EXPECT_EQ(report->dropped_nodes, std::vector<std::string>{victim});
  ASSERT_EQ(report->lost_objects.size(), 1u);
  EXPECT_EQ(report->lost_objects[0], key("one-copy"));
  EXPECT_FALSE(m.exists(key("one-copy")));
  // Dated at the removal (no tick ran yet): writers holding tickets for its
  // ranges may write for a put lease from then.
  EXPECT_EQ(m.recovery_wait(victim, t0 + 2s), config.put_lease);
  EXPECT_EQ(m.recovery_wait(victim, t0 + 2s + config.put_lease), clock::duration::zero());
  EXPECT_EQ(m.heartbeat(victim, t0 + 3s).code(), kvx::errc::not_found);
  EXPECT_EQ(m.remove_node(victim, t0 + 3s).code(), kvx::errc::not_found);
}

TEST_F(MasterState, APendingPutWhoseNodesAllDiedCannotCommit) {
  auto m = make();
  auto t = m.put_start(key("orphan"), 1000, reps(1), t0);
  ASSERT_TRUE(t);
  const auto victim_node = t->replicas[0].node;
  for (int n = 0; n < 3; ++n)
    if ("node" + std::to_string(n) != victim_node) {
      ASSERT_TRUE(m.heartbeat("node" + std::to_string(n), t0 + 4s));
    }
  auto report = m.tick(t0 + 4s);
  ASSERT_EQ(report.dropped_nodes, std::vector<std::string>{victim_node});
  EXPECT_EQ(report.reclaimed_puts, std::vector<kvx::store::object_key>{key("orphan")});
  EXPECT_TRUE(report.lost_objects.empty()) << "never visible, so not lost";
  EXPECT_EQ(m.put_commit(key("orphan"), t->put_id, t0 + 4s).code(), kvx::errc::not_found);
  EXPECT_FALSE(m.exists(key("orphan"))) << "no object without a replica becomes visible";
  EXPECT_EQ(m.get(key("orphan"), t0 + 4s).code(), kvx::errc::not_found);
  EXPECT_EQ(m.used_bytes(), 0u);
  auto again = m.put_start(key("orphan"), 1000, reps(1), t0 + 4s);  // the key is free for a new writer
  ASSERT_TRUE(again) << again.error().message();
  EXPECT_NE(again->replicas[0].node, victim_node);
}

// A dropped node that comes back (a partition, not a crash) still has
// writers, readers and copying nodes holding this master's word for its
// ranges: no new object goes there before their leases and deadlines end.
TEST_F(MasterState, ANodeBackFromADropTakesNoNewReplicasBeforeItsLeasesEnd) {
  config.max_read_lease = 20s;  // the reader below asks for all of it
  master m(config, kvx::store::placement::random_with_capacity{}, registry);
  ASSERT_TRUE(m.add_segment({"seg-a", "a", 1 << 20, "dram"}, t0));
  auto t = m.put_start(key("read"), 1000, reps(1), t0);
  ASSERT_TRUE(m.put_commit(key("read"), t->put_id, t0));
  ASSERT_TRUE(m.get(key("read"), t0, {}, 20s));  // a reader may read the range until t0 + 20 s
  auto pending = m.put_start(key("writing"), 1000, reps(1), t0 + 1s);  // and a writer until t0 + 11 s
  ASSERT_TRUE(pending);
  ASSERT_TRUE(m.remove_node("a", t0 + 2s));
  ASSERT_TRUE(m.add_segment({"seg-a", "a", 1 << 20, "dram"}, t0 + 3s));  // back, with the same memory

  auto refused = m.put_start(key("new"), 1000, reps(1), t0 + 4s);
  ASSERT_FALSE(refused) << "placed on a range a reader may still read";
  EXPECT_EQ(refused.code(), kvx::errc::capacity_exceeded);
  EXPECT_NE(refused.error().context().find("back from a drop"), std::string::npos) << refused.error().context();
  ASSERT_TRUE(m.heartbeat("a", t0 + 19s));
  m.tick(t0 + 19s);
  EXPECT_FALSE(m.put_start(key("new"), 1000, reps(1), t0 + 19s)) << "the read lease lasts until t0 + 20 s";
  ASSERT_TRUE(m.heartbeat("a", t0 + 21s));
  m.tick(t0 + 21s);
  auto placed = m.put_start(key("new"), 1000, reps(1), t0 + 21s);
  ASSERT_TRUE(placed) << placed.error().message();
  EXPECT_EQ(placed->replicas[0].node, "a");

  // Nothing held on the node: it takes new replicas at once.
  ASSERT_TRUE(m.add_segment({"seg-b", "b", 1 << 20, "dram"}, t0 + 21s));
  ASSERT_TRUE(m.remove_node("b", t0 + 22s));
  ASSERT_TRUE(m.add_segment({"seg-b", "b", 1 << 20, "dram"}, t0 + 22s));
  auto on_b = m.put_start(key("two"), 1000, reps(2), t0 + 22s);
  ASSERT_TRUE(on_b) << on_b.error().message();
}

TEST_F(MasterState, TenantQuotaIsEnforced) {
  config.tenant_quota["small"] = 10000;
  auto m = make();
  auto a = m.put_start({"small", "a"}, 6000, {}, t0);
  ASSERT_TRUE(a);
  auto b = m.put_start({"small", "b"}, 6000, {}, t0);
  EXPECT_EQ(b.code(), kvx::errc::capacity_exceeded);
  EXPECT_NE(b.error().context().find("quota"), std::string::npos);
  EXPECT_TRUE(m.put_start({"other", "b"}, 6000, {}, t0));
  EXPECT_FALSE(m.exists({"other", "a"}));
}

TEST_F(MasterState, LongestPrefixCountsLeadingCommittedKeys) {
  auto m = make();
  for (auto k : {"b0", "b1", "b3"}) {
    auto t = m.put_start(key(k), 100, {}, t0);
    ASSERT_TRUE(m.put_commit(key(k), t->put_id, t0));
  }
  std::vector<std::string> keys{"b0", "b1", "b2", "b3"};
  EXPECT_EQ(m.longest_prefix("tenant", keys), 2u);
  EXPECT_EQ(m.longest_prefix("another-tenant", keys), 0u);
}

TEST_F(MasterState, BadRequestsAreRefusedWithContext) {
  auto m = make();
  EXPECT_EQ(m.put_start(key(""), 10, {}, t0).code(), kvx::errc::invalid_argument);
  EXPECT_EQ(m.put_start(key("z"), 0, {}, t0).code(), kvx::errc::invalid_argument);
  EXPECT_EQ(m.put_start(key("z"), 10, reps(0), t0).code(), kvx::errc::invalid_argument);
  EXPECT_EQ(m.put_start(key("z"), std::uint64_t{1} << 40, {}, t0).code(), kvx::errc::invalid_argument);
  EXPECT_EQ(m.add_segment({"seg0", "node9", 100, "dram"}, t0).code(), kvx::errc::already_exists);
  EXPECT_EQ(m.add_segment({"s", "n", 0, "dram"}, t0).code(), kvx::errc::invalid_argument);
  EXPECT_EQ(m.add_segment({"s", "n", 10, "tape"}, t0).code(), kvx::errc::invalid_argument);
  EXPECT_EQ(m.remove(key("absent"), t0).code(), kvx::errc::not_found);
}

kvx::store::put_options leased(clock::duration lease) {
  kvx::store::put_options o;
  o.lease = lease;
  return o;
}

// A put that asked for its own lease is reclaimed when that lease ends,
// sooner or later than the master's put_lease (10 s) would have it.
TEST_F(MasterState, APutsOwnLeaseIsReclaimedAtItsOwnTime) {
  config.max_put_lease = 30s;
  auto m = make();
  auto brief = m.put_start(key("brief"), 1000, leased(2s), t0);
  auto usual = m.put_start(key("usual"), 1000, {}, t0);
  auto lengthy = m.put_start(key("lengthy"), 1000, leased(25s), t0);
  ASSERT_TRUE(brief && usual && lengthy);
  EXPECT_EQ(brief->deadline, t0 + 2s);
  EXPECT_EQ(usual->deadline, t0 + config.put_lease);
  EXPECT_EQ(lengthy->deadline, t0 + 25s);
  auto tick = [&](clock::time_point at) {
    for (int n = 0; n < 3; ++n) EXPECT_TRUE(m.heartbeat("node" + std::to_string(n), at));
    return m.tick(at).reclaimed_puts;
  };
  EXPECT_TRUE(tick(t0 + 2s).empty()) << "a lease ends after its last instant";
  EXPECT_EQ(tick(t0 + 2s + 1ms), std::vector{key("brief")});
  EXPECT_EQ(m.put_commit(key("brief"), brief->put_id, t0 + 2s + 2ms).code(), kvx::errc::not_found);
  EXPECT_EQ(tick(t0 + 10s + 1ms), std::vector{key("usual")});
  EXPECT_TRUE(tick(t0 + 24s).empty()) << "past the master's put lease, inside its own";
  ASSERT_TRUE(m.put_commit(key("lengthy"), lengthy->put_id, t0 + 24s));
  EXPECT_TRUE(m.exists(key("lengthy")));
}

TEST_F(MasterState, APutLeaseOverTheMaximumOrNotPositiveIsRefusedAndAllocatesNothing) {
  config.max_put_lease = 20s;
  auto m = make();
  auto over = m.put_start(key("k"), 1000, leased(20s + 1ms), t0);
  ASSERT_EQ(over.code(), kvx::errc::invalid_argument);
  EXPECT_NE(over.error().message().find("a put lease of 20001 ms asked; this master grants at most 20000 ms (max_put_lease)"),
            std::string::npos)
      << over.error().message();
  EXPECT_EQ(m.put_start(key("k"), 1000, leased(0s), t0).code(), kvx::errc::invalid_argument);
  EXPECT_EQ(m.put_start(key("k"), 1000, leased(-1s), t0).code(), kvx::errc::invalid_argument);
  EXPECT_EQ(m.used_bytes(), 0u);
  EXPECT_TRUE(m.put_start(key("k"), 1000, leased(20s), t0));

  config.max_put_lease.reset();  // none longer than put_lease
  kvx::metrics::registry other;
  master d(config, kvx::store::placement::random_with_capacity{}, other);
  ASSERT_TRUE(d.add_segment({"s", "n", 1 << 20, "dram"}, t0));
  EXPECT_EQ(d.put_start(key("k"), 1000, leased(config.put_lease + 1ms), t0).code(), kvx::errc::invalid_argument);
}

// A get used to be granted whatever it asked for (up to an hour), longer
// than a new master waits after a failover before reusing ranges.
TEST_F(MasterState, AReadLeaseAskedLongerThanTheMastersLongestIsCutToIt) {
  auto m = make();  // no max_read_lease: none longer than read_lease (5 s)
  auto t = m.put_start(key("k"), 1000, {}, t0);
  ASSERT_TRUE(m.put_commit(key("k"), t->put_id, t0));
  auto hour = m.get(key("k"), t0, {}, std::chrono::hours(1));
  ASSERT_TRUE(hour);
  EXPECT_EQ(hour->lease_until, t0 + config.read_lease);
  EXPECT_EQ(m.get(key("k"), t0, {}, 2s)->lease_until, t0 + 2s) << "shorter ones as asked";
  EXPECT_EQ(m.remove(key("k"), t0 + config.read_lease - 1ms).code(), kvx::errc::busy);
  EXPECT_TRUE(m.remove(key("k"), t0 + config.read_lease)) << "no lease outlives the longest granted";

  config.max_read_lease = 8s;
  kvx::metrics::registry other;
  master longer(config, kvx::store::placement::random_with_capacity{}, other);
  ASSERT_TRUE(longer.add_segment({"s", "n", 1 << 20, "dram"}, t0));
  t = longer.put_start(key("k"), 1000, {}, t0);
  ASSERT_TRUE(longer.put_commit(key("k"), t->put_id, t0));
  EXPECT_EQ(longer.get(key("k"), t0, {}, std::chrono::hours(1))->lease_until, t0 + 8s);
  EXPECT_EQ(longer.get(key("k"), t0)->lease_until, t0 + config.read_lease) << "the default stays the default";
}

// Writers holding tickets for a dropped node's ranges may write until their
// own lease ends; a put may ask up to max_put_lease (25 s here, against the
// master's 10 s).
TEST_F(MasterState, ADroppedNodesReportsWaitTheLongestPutLeaseAWriterMayHold) {
  config.max_put_lease = 25s;
  auto m = make();
  auto t = m.put_start(key("lengthy"), 1000, leased(25s), t0);
  ASSERT_TRUE(t);
  const auto victim = t->replicas[0].node;
  ASSERT_TRUE(m.remove_node(victim, t0 + 1s));
  EXPECT_EQ(m.recovery_wait(victim, t0 + 1s), 25s);
}

TEST(MasterConfig, AMaximumLeaseBelowItsDefaultIsRefusedByName) {
  kvx::store::master_config c;
  EXPECT_TRUE(c.check());
  EXPECT_EQ(c.longest_lease(), 30s) << "put_lease and replication_timeout";
  c.max_read_lease = 1s;  // read_lease: 5 s
  auto bad = c.check();
  ASSERT_FALSE(bad);
  EXPECT_NE(bad.error().message().find("max_read_lease (1000 ms) is shorter than read_lease (5000 ms)"), std::string::npos)
      << bad.error().message();
  kvx::metrics::registry registry;
  EXPECT_THROW((void)master(c, {}, registry), std::invalid_argument);
  c.max_read_lease = 50s;
  c.max_put_lease = 10s;  // put_lease: 30 s
  auto bad_put = c.check();
  ASSERT_FALSE(bad_put);
  EXPECT_NE(bad_put.error().message().find("max_put_lease (10000 ms) is shorter than put_lease"), std::string::npos)
      << bad_put.error().message();
  c.max_put_lease = 40s;
  EXPECT_TRUE(c.check());
  EXPECT_EQ(c.longest_lease(), 50s);
  c.replication_timeout = 1min;
  EXPECT_EQ(c.longest_lease(), 1min);
}

TEST(Placement, LocalityAwarePrefersThePreferredNode) {
  kvx::store::placement::locality_aware p;
  std::vector<kvx::store::placement_candidate> c{
      {"a", "sa", "dram", 1000, 1000}, {"b", "sb", "dram", 5000, 5000}, {"c", "sc", "dram", 100, 100}};
  auto chosen = p.choose(c, {500, 2, "a"});
  ASSERT_EQ(chosen.size(), 2u);
  EXPECT_EQ(chosen[0], 0u);
  EXPECT_EQ(chosen[1], 1u) << "c is too small for 500 bytes";
}

TEST(Placement, RandomWithCapacityPrefersDramAndSkipsFullSegments) {
  kvx::store::placement::random_with_capacity p(7);
  std::vector<kvx::store::placement_candidate> c{
      {"a", "ssd-a", "ssd", 1 << 30, 1 << 30}, {"b", "dram-b", "dram", 1000, 1000}, {"c", "dram-c", "dram", 10, 10}};
  for (int i = 0; i < 20; ++i) {
    auto chosen = p.choose(c, {500, 2, {}});
    ASSERT_EQ(chosen.size(), 2u);
    EXPECT_EQ(chosen[0], 1u);
    EXPECT_EQ(chosen[1], 0u);
  }
}

TEST(Placement, ReplicasGoToOtherHostsBeforeASecondNodeOfOneHost) {
  // Host x has a DRAM node and an SSD node; host y one small DRAM node.
  std::vector<kvx::store::placement_candidate> c{{"x", "x/dram", "dram", 1 << 30, 1 << 30, "x"},
                                                 {"x-ssd", "x-ssd/ssd", "ssd", 1 << 30, 1 << 30, "x"},
                                                 {"y", "y/dram", "dram", 1000, 1000, "y"}};
  kvx::store::placement::random_with_capacity p(11);
  for (int i = 0; i < 20; ++i) {
    auto two = p.choose(c, {500, 2, {}});
    ASSERT_EQ(two.size(), 2u);
    std::set<std::string> hosts{c[two[0]].host, c[two[1]].host};
    EXPECT_EQ(hosts.size(), 2u) << "both replicas on host " << *hosts.begin();
    // Three replicas: only two hosts exist, so the third shares one (distinct nodes still).
    auto three = p.choose(c, {500, 3, {}});
    ASSERT_EQ(three.size(), 3u);
    EXPECT_EQ(three.back(), 1u) << "the SSD node of x comes last: its host already holds a replica";
    // Re-replication: a copy already lives on x, so y comes first.
    auto more = p.choose(c, {500, 1, {}, {"x"}});
    ASSERT_EQ(more.size(), 1u);
    EXPECT_EQ(more[0], 2u);
  }
  // A candidate without a host is its own host (the node's name).
  std::vector<kvx::store::placement_candidate> plain{{"a", "sa", "dram", 1000, 1000}, {"b", "sb", "dram", 1000, 1000}};
  EXPECT_EQ(p.choose(plain, {500, 1, {}, {"a"}}), std::vector<std::size_t>{1});
  // locality_aware: the preferred node first, the others on other hosts.
  kvx::store::placement::locality_aware l(5);
  for (int i = 0; i < 20; ++i) {
    auto chosen = l.choose(c, {500, 2, "x"});
    ASSERT_EQ(chosen.size(), 2u);
    EXPECT_EQ(chosen[0], 0u);
    EXPECT_EQ(chosen[1], 2u) << "x-ssd is on the preferred node's host";
  }
}

TEST_F(MasterState, ReReplicationPrefersAnotherHostAndANodeStaysOnOneHost) {
  master m(config, kvx::store::placement::random_with_capacity{}, registry);
  ASSERT_TRUE(m.add_segment({"a/dram", "a", 1 << 20, "dram", "host-a"}, t0));
  ASSERT_TRUE(m.add_segment({"a-ssd/ssd", "a-ssd", 1 << 20, "ssd", "host-a"}, t0));
  ASSERT_TRUE(m.add_segment({"b/dram", "b", 1 << 20, "dram", "host-b"}, t0));
  ASSERT_TRUE(m.add_segment({"c/dram", "c", 1 << 20, "dram", "host-c"}, t0));
  auto other_host = m.add_segment({"a/second", "a", 1 << 20, "dram", "host-z"}, t0);
  ASSERT_FALSE(other_host);
  EXPECT_EQ(other_host.code(), kvx::errc::invalid_argument);
  EXPECT_NE(other_host.error().message().find("host-a"), std::string::npos) << other_host.error().message();
  EXPECT_TRUE(m.add_segment({"a/second", "a", 1 << 20, "dram", "host-a"}, t0));

  auto t = m.put_start(key("k"), 1000, reps(2), t0);
  ASSERT_TRUE(t);
  ASSERT_TRUE(m.put_commit(key("k"), t->put_id, t0));
  auto host_of = [](const std::string& node) { return node.substr(0, 1); };
  EXPECT_NE(host_of(t->replicas[0].node), host_of(t->replicas[1].node)) << t->replicas[0].node << " " << t->replicas[1].node;
  // Drop whichever of b and c holds a replica (the other stays): the new copy
  // must avoid the surviving replica's host, so it lands on the free one of b/c
  // or, when the survivor is on b or c, on host a's DRAM.
  std::string victim = "b", survivor_host;
  for (const auto& r : t->replicas)
    if (r.node == "b" || r.node == "c") victim = r.node;
  for (const auto& r : t->replicas)
    if (r.node != victim) survivor_host = host_of(r.node);
  for (const char* n : {"a", "a-ssd", "b", "c"}) {
    if (n != victim) {
      ASSERT_TRUE(m.heartbeat(n, t0 + 4s));
    }
  }
  auto report = m.tick(t0 + 4s);
  ASSERT_EQ(report.replications.size(), 1u);
  const auto& target = report.replications[0].target;
  EXPECT_NE(host_of(target.node), survivor_host) << "copy placed on " << target.node;
  EXPECT_NE(target.node, "a-ssd") << "DRAM on a new host comes before SSD";
}

}  // namespace
