// Objects that survive a master failover (master_config::recover_objects):
// the ledgers a master keeps for its nodes, and a new master taking objects
// back from the nodes' reports. Deterministic: time is an argument.

#include <kvx/store/master_handler.hpp>
#include <kvx/store/master_server.hpp>
#include <kvx/store/master_state.hpp>
#include <kvx/store/node_ledger.hpp>
#include <kvx/cache/eviction/lru.hpp>

#include <gtest/gtest.h>

#include <boost/asio/io_context.hpp>

#include <map>

namespace {

using namespace std::chrono_literals;
using kvx::store::clock;
using kvx::store::ledger_entry;
using kvx::store::object_key;
using json = nlohmann::json;
using master = kvx::store::master_state<kvx::cache::eviction::lru>;

struct MasterRecovery : ::testing::Test {
  kvx::metrics::registry registry;
  clock::time_point t0 = clock::now();
  kvx::store::master_config config = [] {
    kvx::store::master_config c;
    c.recover_objects = true;
    c.put_lease = 10s;
    return c;
  }();

  std::unique_ptr<master> make(const kvx::store::master_config& c) {
    auto m = std::make_unique<master>(c, kvx::store::placement::random_with_capacity{}, registry);
    for (int n = 0; n < 3; ++n)
      EXPECT_TRUE(m->add_segment({"seg" + std::to_string(n), "node" + std::to_string(n), 1 << 20, "dram"}, t0));
    return m;
  }
  std::unique_ptr<master> make() { return make(config); }
  static object_key key(const std::string& k) { return {"tenant", k}; }

  // Puts and commits `k` with `checksum`; the ticket's replicas.
  static std::vector<kvx::store::replica_location> put(master& m, const std::string& k, std::uint64_t size, unsigned replicas,
                                                       std::optional<std::uint64_t> checksum, clock::time_point now) {
    kvx::store::put_options o;
    o.replicas = replicas;
    auto t = m.put_start(key(k), size, o, now);
    EXPECT_TRUE(t) << t.error().message();
    if (!t) return {};
    EXPECT_TRUE(m.put_commit(key(k), t->put_id, now, checksum));
    return t->replicas;
  }

  // What each node's ledger holds once it applied every change (the node's side, by offset).
  static std::map<std::string, std::map<std::uint64_t, ledger_entry>> ledgers(master& m) {
    std::map<std::string, std::map<std::uint64_t, ledger_entry>> out;
    for (const auto& node : m.nodes()) {
      auto changes = m.ledger_since(node, 0, 1 << 20);
      EXPECT_TRUE(changes);
      auto& l = out[node];
      for (const auto& c : *changes) {
        if (c.add) l[c.entry.offset] = c.entry;
        else if (l.count(c.entry.offset) && l[c.entry.offset].put_id == c.entry.put_id) l.erase(c.entry.offset);
      }
    }
    return out;
  }
  static std::vector<ledger_entry> entries(const std::map<std::uint64_t, ledger_entry>& l) {
    std::vector<ledger_entry> out;
    for (const auto& [_, e] : l) out.push_back(e);
    return out;
  }
};

TEST_F(MasterRecovery, CommitsAndRemovalsReachTheHoldingNodesLedgersInOrder) {
  auto m = make();
  const auto where = put(*m, "a", 1000, 2, 0xabcdef, t0);
  ASSERT_EQ(where.size(), 2u);
  for (const auto& r : where) {
    auto changes = m->ledger_since(r.node, 0, 100);
    ASSERT_TRUE(changes);
    ASSERT_EQ(changes->size(), 1u);
    const auto& c = changes->front();
    EXPECT_EQ(c.seq, 1u);
    EXPECT_TRUE(c.add);
    EXPECT_EQ(c.entry.key, key("a"));
    EXPECT_EQ(c.entry.segment, r.segment);
    EXPECT_EQ(c.entry.offset, r.offset);
    EXPECT_EQ(c.entry.size, 1000u);
    EXPECT_EQ(c.entry.checksum, 0xabcdefu);
    EXPECT_EQ(c.entry.replicas_wanted, 2u);
  }
  std::string other;
  for (const auto& n : m->nodes())
    if (n != where[0].node && n != where[1].node) other = n;
  EXPECT_TRUE(m->ledger_since(other, 0, 100)->empty()) << "a node holding nothing hears nothing";

  EXPECT_TRUE(m->ledger_since(where[0].node, 1, 100)->empty()) << "acknowledged changes are forgotten";
  ASSERT_TRUE(m->remove(key("a"), t0));
  auto changes = m->ledger_since(where[0].node, 1, 100);
  ASSERT_EQ(changes->size(), 1u);
  EXPECT_EQ(changes->front().seq, 2u);
  EXPECT_FALSE(changes->front().add);
  EXPECT_EQ(changes->front().entry.offset, where[0].offset);
  EXPECT_EQ(m->ledger_since("nobody", 0, 1).code(), kvx::errc::not_found);
}

TEST_F(MasterRecovery, ACopyGivenBackByADrainLeavesItsNodesLedger) {
  auto m = make();
  const auto where = put(*m, "a", 1000, 1, 0x1234, t0);
  ASSERT_EQ(where.size(), 1u);
  const auto drained = where[0].node;
  ASSERT_TRUE(m->drain_node(drained));
  auto report = m->tick(t0 + 100ms);
  ASSERT_EQ(report.replications.size(), 1u);
  const auto task = report.replications[0];
  ASSERT_TRUE(m->replication_done(key("a"), task.put_id, task.target));
  EXPECT_EQ(m->tick(t0 + 200ms).freed_drained_copies, 1u);
  auto l = ledgers(*m);
  EXPECT_TRUE(l[drained].empty()) << "a node reporting a copy given back would bring back a range reused since";
  ASSERT_EQ(l[task.target.node].size(), 1u);
  EXPECT_EQ(l[task.target.node].begin()->second.key, key("a"));
}

TEST_F(MasterRecovery, WithoutRecoveryOrWithoutAChecksumNothingIsAnnounced) {
  auto off = config;
  off.recover_objects = false;
  auto m = make(off);
  const auto where = put(*m, "a", 1000, 1, 7, t0);
  EXPECT_TRUE(m->ledger_since(where[0].node, 0, 100)->empty());
  EXPECT_EQ(m->recover(where[0].node, {}, t0).code(), kvx::errc::invalid_argument);

  auto on = make();
  const auto plain = put(*on, "b", 1000, 1, std::nullopt, t0);
  EXPECT_TRUE(on->ledger_since(plain[0].node, 0, 100)->empty()) << "an object without a checksum cannot be checked: no ledger";
}

TEST_F(MasterRecovery, ANewMasterTakesBackReportedObjectsOnTheirExactRanges) {
  auto old = make();
  const auto a = put(*old, "a", 3000, 2, 11, t0);
  const auto b = put(*old, "b", 70000, 1, 22, t0);
  ASSERT_TRUE(old->set_pin(key("b"), true));
  const auto l = ledgers(*old);

  auto fresh = make();  // the same nodes register again, empty
  const auto before = fresh->used_bytes();
  std::size_t objects = 0, replicas = 0;
  for (const auto& [node, ledger] : l) {
    auto r = fresh->recover(node, entries(ledger), t0 + 1s);
    ASSERT_TRUE(r) << r.error().message();
    EXPECT_TRUE(r->rejected.empty()) << r->rejected.front();
    objects += r->objects;
    replicas += r->replicas;
  }
  EXPECT_EQ(objects, 2u);
  EXPECT_EQ(replicas, 1u) << "a's second copy, from the other node";
  auto ga = fresh->get(key("a"), t0 + 1s);
  ASSERT_TRUE(ga);
  EXPECT_EQ(ga->size, 3000u);
  EXPECT_TRUE(std::is_permutation(ga->replicas.begin(), ga->replicas.end(), a.begin(), a.end()));
  auto gb = fresh->get(key("b"), t0 + 1s);
  ASSERT_TRUE(gb);
  EXPECT_EQ(gb->replicas, b);
  EXPECT_EQ(fresh->tenant_used("tenant"), 3000u * 2 + 70000u);
  EXPECT_GT(fresh->used_bytes(), before + 3000 * 2 + 70000 - 1);
  const auto listed = fresh->objects("tenant", 10, t0 + 1s);
  ASSERT_EQ(listed.size(), 2u);
  EXPECT_TRUE(listed[1].pinned) << "b's soft pin came back with it";

  // The new master's puts land elsewhere, and are newer than what it took back.
  kvx::store::put_options o;
  auto t = fresh->put_start(key("c"), 500000, o, t0 + 2s);
  ASSERT_TRUE(t);
  for (const auto& r : t->replicas)
    for (const auto& taken : {ga->replicas, gb->replicas})
      for (const auto& x : taken)
        if (x.segment == r.segment) {
          EXPECT_TRUE(r.offset >= x.offset + x.size || x.offset >= r.offset + r.size);
        }
  // The nodes' new ledgers name what was taken back.
  const auto again = ledgers(*fresh);
  std::size_t listed_again = 0;
  for (const auto& [node, ledger] : again) listed_again += ledger.size();
  EXPECT_EQ(listed_again, 3u);
}

TEST_F(MasterRecovery, ReportsThatCannotBeTrustedAreRefusedWithTheReason) {
  auto old = make();
  put(*old, "a", 3000, 1, 11, t0);
  auto l = ledgers(*old);
  std::string node;
  ledger_entry e;
  for (const auto& [n, ledger] : l)
    if (!ledger.empty()) node = n, e = ledger.begin()->second;
  ASSERT_FALSE(node.empty());

  auto fresh = make();
  fresh->hold_recovery_until(t0 + 5s);
  EXPECT_EQ(fresh->recover(node, std::vector{e}, t0 + 1s).code(), kvx::errc::busy) << "old writers may still write";
  EXPECT_EQ(fresh->recovery_wait(node, t0 + 1s), 4s);
  EXPECT_EQ(fresh->recover("nobody", std::vector{e}, t0 + 6s).code(), kvx::errc::not_found);

  auto rejected = [&](ledger_entry x, const std::string& why) {
    auto r = fresh->recover(node, std::vector{x}, t0 + 6s);
    ASSERT_TRUE(r) << r.error().message();
    EXPECT_EQ(r->objects + r->replicas, 0u) << why;
    ASSERT_EQ(r->rejected.size(), 1u) << why;
    EXPECT_NE(r->rejected[0].find(why), std::string::npos) << r->rejected[0];
  };
  auto x = e;
  x.segment = node == "node0" ? "seg1" : "seg0";
  rejected(x, "is not one of node");
  x = e;
  x.offset = (1 << 20) - 256;
  rejected(x, "outside it or taken");
  x = e;
  x.size = 0;
  rejected(x, "size 0");

  ASSERT_EQ(fresh->recover(node, std::vector{e}, t0 + 6s)->objects, 1u);
  rejected(e, "was taken back already");
  x = e;
  x.checksum = 12;
  rejected(x, "other size or checksum");
  x = e;  // a newer version of a, elsewhere: replaces the one taken back
  x.put_id = e.put_id + 10;
  x.offset = e.offset + 4096;
  auto newer = fresh->recover(node, std::vector{x}, t0 + 6s);
  ASSERT_TRUE(newer);
  EXPECT_EQ(newer->objects, 1u);
  rejected(e, "a newer version was taken back");
  auto y = x;
  y.key = key("overlap");
  y.put_id = x.put_id + 1;
  rejected(y, "outside it or taken");

  // A key this master wrote itself stays its own.
  kvx::store::put_options o;
  auto t = fresh->put_start(key("mine"), 100, o, t0 + 6s);
  ASSERT_TRUE(fresh->put_commit(key("mine"), t->put_id, t0 + 6s, 5));
  x = e;
  x.key = key("mine");
  x.offset = e.offset + 8192;
  rejected(x, "this master holds a put of the key");
}

TEST_F(MasterRecovery, ANewerVersionReplacesAnOlderOneTakenBack) {
  auto m = make();
  ledger_entry v1{key("k"), 7, "seg0", 0, 1000, 1, 1, false};
  ledger_entry v2{key("k"), 9, "seg1", 4096, 2000, 2, 1, false};
  ASSERT_EQ(m->recover("node0", std::vector{v1}, t0)->objects, 1u);
  const auto used = m->used_bytes();
  auto r = m->recover("node1", std::vector{v2}, t0);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->objects, 1u) << (r->rejected.empty() ? "" : r->rejected[0]);
  auto g = m->get(key("k"), t0);
  ASSERT_TRUE(g);
  EXPECT_EQ(g->size, 2000u);
  ASSERT_EQ(g->replicas.size(), 1u);
  EXPECT_EQ(g->replicas[0].segment, "seg1");
  EXPECT_EQ(m->used_bytes(), used - 1024 + 2048) << "v1's range was freed";
  EXPECT_EQ(m->tenant_used("tenant"), 2000u);
  // node0 hears that v1 is gone from its ledger.
  auto changes = m->ledger_since("node0", 0, 10);
  ASSERT_EQ(changes->size(), 2u);
  EXPECT_FALSE(changes->back().add);
  // Puts of this master come after what it took back.
  kvx::store::put_options o;
  auto t = m->put_start(key("new"), 10, o, t0);
  ASSERT_TRUE(t);
  EXPECT_GT(t->put_id, 9u);
  // An older version that is being read is not replaced.
  ASSERT_TRUE(m->get(key("k"), t0, {}, 10s));
  ledger_entry v3{key("k"), 12, "seg2", 0, 100, 3, 1, false};
  r = m->recover("node2", std::vector{v3}, t0 + 1s);
  ASSERT_EQ(r->rejected.size(), 1u);
  EXPECT_NE(r->rejected[0].find("being read"), std::string::npos) << r->rejected[0];
}

TEST_F(MasterRecovery, ANodeDroppedAndBackReportsAfterAPutLeaseAndItsLostObjectComesBack) {
  auto m = make();
  const auto where = put(*m, "only", 1000, 1, 5, t0);
  const auto node = where[0].node;
  auto l = ledgers(*m);
  const auto entry = l[node].begin()->second;
  for (const auto& n : m->nodes())
    if (n != node) {
      ASSERT_TRUE(m->heartbeat(n, t0 + 6s));
    }
  auto report = m->tick(t0 + 6s);  // the holder was silent past node_timeout (5 s)
  ASSERT_EQ(report.lost_objects, std::vector<object_key>{key("only")});
  ASSERT_TRUE(m->add_segment({where[0].segment, node, 1 << 20, "dram"}, t0 + 7s));  // it is back, empty
  EXPECT_EQ(m->recovery_wait(node, t0 + 7s), 9s) << "a put lease (10 s) from the drop: old tickets may still write";
  EXPECT_EQ(m->recover(node, std::vector{entry}, t0 + 7s).code(), kvx::errc::busy);
  auto r = m->recover(node, std::vector{entry}, t0 + 16s);
  ASSERT_TRUE(r) << r.error().message();
  EXPECT_EQ(r->objects, 1u);
  EXPECT_TRUE(m->get(key("only"), t0 + 16s));
}

// A master restarted on its port (no election) holds reports while its
// predecessor's writers may still write: as long as the longest put lease
// one may have asked for (max_put_lease, 40 s), not the default (10 s).
TEST_F(MasterRecovery, ARestartedMastersReportsWaitTheLongestPutLeaseAWriterMayHold) {
  config.max_put_lease = 40s;
  master state(config, {}, registry);
  boost::asio::io_context io;
  kvx::store::master_server<master> server(io.get_executor(), state);
  EXPECT_GT(state.recovery_wait("node0", clock::now()), 39s);
}

TEST_F(MasterRecovery, CopiesOfAnObjectTakenBackWaitForTheOtherHoldersReports) {
  auto old = make();
  const auto where = put(*old, "two", 5000, 2, 3, t0);
  auto l = ledgers(*old);
  auto fresh = make();
  fresh->hold_recovery_until(t0 + 1s);
  ASSERT_EQ(fresh->recover(where[0].node, entries(l[where[0].node]), t0 + 1s)->objects, 1u);
  for (const auto& n : fresh->nodes()) ASSERT_TRUE(fresh->heartbeat(n, t0 + 2s));
  EXPECT_TRUE(fresh->tick(t0 + 2s).replications.empty()) << "within a node timeout (5 s) of reports opening: no copy yet";
  auto r = fresh->recover(where[1].node, entries(l[where[1].node]), t0 + 2s);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->replicas, 1u) << "the second holder's own copy is taken, not refused for a copy in flight";
  EXPECT_EQ(fresh->get(key("two"), t0 + 2s)->replicas.size(), 2u);
  // With one holder only, the copy is made once the wait is over.
  auto lone = make();
  lone->hold_recovery_until(t0 + 1s);
  ASSERT_EQ(lone->recover(where[0].node, entries(l[where[0].node]), t0 + 1s)->objects, 1u);
  for (const auto& n : lone->nodes()) ASSERT_TRUE(lone->heartbeat(n, t0 + 6500ms));
  EXPECT_EQ(lone->tick(t0 + 6500ms).replications.size(), 1u);
}

TEST_F(MasterRecovery, ABacklogPastItsLimitDropsTheOldestChanges) {
  auto small = config;
  small.ledger_backlog = 2;
  master m(small, kvx::store::placement::random_with_capacity{}, registry);
  ASSERT_TRUE(m.add_segment({"seg0", "node0", 1 << 20, "dram"}, t0));
  for (int i = 0; i < 3; ++i) put(m, "k" + std::to_string(i), 100, 1, 1, t0);
  auto changes = m.ledger_since("node0", 0, 10);
  ASSERT_EQ(changes->size(), 2u);
  EXPECT_EQ(changes->front().seq, 2u) << "change 1 was dropped: the node sees the gap and forgets its ledger";
}

// --- the node's side ----------------------------------------------------------

json change(std::uint64_t seq, bool add, const std::string& k, std::uint64_t offset, std::uint64_t put_id,
            const std::string& segment = "seg0") {
  return kvx::store::protocol::to_json(kvx::store::ledger_event{seq, add, ledger_entry{{"t", k}, put_id, segment, offset, 100, 9, 1, false}});
}

TEST(NodeLedger, AppliesChangesInOrderAndSkipsThoseAlreadyApplied) {
  kvx::store::node_ledger l("seg0");
  EXPECT_EQ(l.apply(json::array({change(1, true, "a", 0, 1), change(2, true, "b", 256, 2)})), "");
  EXPECT_EQ(l.applied(), 2u);
  ASSERT_EQ(l.entries().size(), 2u);
  // The master sends again what was not acknowledged: applied once.
  EXPECT_EQ(l.apply(json::array({change(2, true, "b", 256, 2), change(3, false, "a", 0, 1)})), "");
  EXPECT_EQ(l.applied(), 3u);
  ASSERT_EQ(l.entries().size(), 1u);
  EXPECT_EQ(l.entries().begin()->second.key.key, "b");
  // A drop of another put at that offset (the range was reused) leaves the newer entry.
  EXPECT_EQ(l.apply(json::array({change(4, false, "b", 256, 1)})), "");
  EXPECT_EQ(l.entries().size(), 1u);
  // Another segment's changes count, but do not enter.
  EXPECT_EQ(l.apply(json::array({change(5, true, "x", 0, 7, "seg9")})), "");
  EXPECT_EQ(l.applied(), 5u);
  EXPECT_EQ(l.entries().size(), 1u);
  auto taken = l.take();
  ASSERT_EQ(taken.size(), 1u);
  EXPECT_EQ(taken[0].key.key, "b");
  EXPECT_EQ(l.applied(), 0u) << "a new master numbers from 1";
  EXPECT_TRUE(l.entries().empty());
}

TEST(NodeLedger, AGapForgetsTheLedgerAndAMalformedChangeStopsTheBatchUnacknowledged) {
  kvx::store::node_ledger l("seg0");
  ASSERT_EQ(l.apply(json::array({change(1, true, "a", 0, 1)})), "");
  auto why = l.apply(json::array({change(4, true, "d", 512, 4)}));
  EXPECT_NE(why.find("ledger changes 2 to 3 were dropped by the master"), std::string::npos) << why;
  ASSERT_EQ(l.entries().size(), 1u) << "a is forgotten: a removal of it may be among the lost changes";
  EXPECT_EQ(l.entries().begin()->second.key.key, "d");
  EXPECT_EQ(l.applied(), 4u);

  auto bad = change(6, true, "f", 1024, 6);
  bad.erase("checksum");
  why = l.apply(json::array({change(5, true, "e", 768, 5), bad, change(7, true, "g", 2048, 7)}));
  EXPECT_NE(why.find("malformed ledger change, not acknowledged"), std::string::npos) << why;
  EXPECT_NE(why.find("heartbeat.ledger[1].checksum"), std::string::npos) << why;
  EXPECT_EQ(l.applied(), 5u) << "the batch stops at the malformed change; the master sends it again";
  EXPECT_EQ(l.entries().size(), 2u);
  EXPECT_NE(l.apply(json::object()).find("not an array"), std::string::npos);
  EXPECT_EQ(l.applied(), 5u);
}

// --- over the protocol -----------------------------------------------------

struct MasterRecoveryProtocol : ::testing::Test {
  kvx::metrics::registry registry;
  kvx::store::master_config config = [] {
    kvx::store::master_config c;
    c.recover_objects = true;
    return c;
  }();
  master state{config, {}, registry};
  kvx::store::master_handler<master> handler{state};
  clock::time_point now = clock::now();

  json call(const json& request) { return handler.handle(request.dump(), now); }
};

TEST_F(MasterRecoveryProtocol, TheLedgerRidesOnHeartbeatsAndReportsComeBack) {
  auto reg = call({{"id", 1}, {"op", "register_segment"}, {"node", "n0"}, {"segment", "s0"}, {"capacity", 1 << 20}});
  ASSERT_TRUE(reg["ok"].get<bool>()) << reg.dump();
  EXPECT_EQ(reg["recover_after_ms"], 0);
  auto ticket = call({{"id", 2}, {"op", "put_start"}, {"tenant", "t"}, {"key", "k"}, {"size", 100}});
  ASSERT_TRUE(ticket["ok"].get<bool>());
  EXPECT_TRUE(ticket["checksum"].get<bool>()) << "the writer is asked for a checksum";
  auto commit = call({{"id", 3}, {"op", "put_commit"}, {"tenant", "t"}, {"key", "k"}, {"put_id", ticket["put_id"]},
                      {"checksum", std::uint64_t{0xfedcba9876543210}}});
  ASSERT_TRUE(commit["ok"].get<bool>()) << commit.dump();
  auto hb = call({{"id", 4}, {"op", "heartbeat"}, {"node", "n0"}});
  ASSERT_EQ(hb["ledger"].size(), 1u) << hb.dump();
  auto change = kvx::store::protocol::ledger_event_from_json(hb["ledger"][0], "ledger[0]");
  ASSERT_TRUE(change) << change.error().message();
  EXPECT_EQ(change->entry.checksum, 0xfedcba9876543210u) << "all 64 bits survive JSON";
  hb = call({{"id", 5}, {"op", "heartbeat"}, {"node", "n0"}, {"ledger_ack", change->seq}});
  EXPECT_TRUE(hb["ledger"].empty()) << hb.dump();

  // A new master (same handler type, fresh state) takes the entry back.
  master fresh{config, {}, registry};
  kvx::store::master_handler<master> h2{fresh};
  fresh.hold_recovery_until(now + 1500ms);
  reg = json::parse(h2.handle(json{{"id", 1}, {"op", "register_segment"}, {"node", "n0"}, {"segment", "s0"}, {"capacity", 1 << 20}}.dump(), now).dump());
  EXPECT_EQ(reg["recover_after_ms"], 1500);
  const json report{{"id", 2}, {"op", "recover"}, {"node", "n0"}, {"objects", {kvx::store::protocol::to_json(change->entry)}}};
  auto early = h2.handle(report.dump(), now);
  EXPECT_EQ(early["error"], "busy") << early.dump();
  auto done = h2.handle(report.dump(), now + 2s);
  ASSERT_TRUE(done["ok"].get<bool>()) << done.dump();
  EXPECT_EQ(done["objects"], 1);
  EXPECT_TRUE(fresh.exists({"t", "k"}));
}

TEST_F(MasterRecoveryProtocol, MalformedReportsAndLedgerFieldsAreRefusedByName) {
  call({{"id", 1}, {"op", "register_segment"}, {"node", "n0"}, {"segment", "s0"}, {"capacity", 1 << 20}});
  // Structure errors are malformed_message; a field of the wrong type or
  // missing is invalid_argument (as for every other op), both naming it.
  auto expect_error = [&](const json& req, const std::string& code, const std::string& field) {
    auto r = call(req);
    EXPECT_EQ(r["error"], code) << r.dump();
    EXPECT_NE(r.value("message", "").find(field), std::string::npos) << r.dump();
  };
  const std::string malformed = "malformed_message", invalid = "invalid_argument";
  expect_error({{"id", 2}, {"op", "recover"}, {"node", "n0"}}, malformed, "recover.objects");
  expect_error({{"id", 2}, {"op", "recover"}, {"node", "n0"}, {"objects", "all"}}, malformed, "recover.objects");
  expect_error({{"id", 2}, {"op", "recover"}, {"node", "n0"}, {"objects", {1}}}, malformed, "recover.objects[0]");
  expect_error({{"id", 2}, {"op", "recover"}, {"node", "n0"}, {"objects", {{{"tenant", "t"}, {"key", "k"}}}}}, invalid,
               "recover.objects[0].segment");
  expect_error({{"id", 2}, {"op", "recover"}, {"node", "n0"},
                {"objects", {{{"tenant", "t"}, {"key", "k"}, {"segment", "s0"}, {"put_id", 1}, {"offset", 0},
                              {"size", 10}, {"checksum", -1}}}}},
               invalid, "recover.objects[0].checksum");
  expect_error({{"id", 2}, {"op", "recover"}, {"node", 5}, {"objects", json::array()}}, invalid, "recover.node");
  json many = json::array();
  for (int i = 0; i < 10001; ++i) many.push_back(1);
  expect_error({{"id", 2}, {"op", "recover"}, {"node", "n0"}, {"objects", many}}, malformed, "at most 10000");
  expect_error({{"id", 3}, {"op", "heartbeat"}, {"node", "n0"}, {"ledger_ack", "all"}}, invalid, "heartbeat.ledger_ack");
  expect_error({{"id", 4}, {"op", "put_commit"}, {"tenant", "t"}, {"key", "k"}, {"put_id", 1}, {"checksum", "x"}}, invalid,
               "put_commit.checksum");
  EXPECT_TRUE(state.nodes().size() == 1 && state.object_count() == 0) << "nothing changed";
  auto bad_op = kvx::store::protocol::ledger_event_from_json(json::parse(R"({"tenant":"t","key":"k","segment":"s","put_id":1,"offset":0,"size":1,"checksum":1,"seq":1,"op":"move"})"),
                                                             "ledger[0]");
  ASSERT_FALSE(bad_op);
  EXPECT_NE(bad_op.error().context().find("ledger[0].op"), std::string::npos) << bad_op.error().context();
}

}  // namespace
