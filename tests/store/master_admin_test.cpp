// The admin requests (list_segments, list_objects, usage, drain_node,
// undrain_node, remove_node) over the protocol, and draining a node through the master's
// re-replication, then giving back its copies.
#include <kvx/store/master_handler.hpp>
#include <kvx/cache/eviction/lru.hpp>

#include <gtest/gtest.h>

namespace {

using namespace std::chrono_literals;
using json = nlohmann::json;
using state_type = kvx::store::master_state<kvx::cache::eviction::lru>;

kvx::store::master_config quota_config() {
  kvx::store::master_config c;
  c.tenant_quota["capped"] = 1 << 20;
  return c;
}

struct MasterAdmin : ::testing::Test {
  kvx::metrics::registry registry;
  state_type state{quota_config(), {}, registry};
  kvx::store::master_handler<state_type> handler{state};
  kvx::store::clock::time_point now = kvx::store::clock::now();
  std::uint64_t next_id = 1;

  json call(json request) {
    request["id"] = next_id++;
    return handler.handle(request.dump(), now);
  }
  void add(const std::string& node, std::uint64_t capacity, const std::string& tier = "dram") {
    ASSERT_TRUE(call({{"op", "register_segment"}, {"node", node}, {"segment", node + "/" + tier}, {"capacity", capacity}, {"tier", tier}})["ok"]);
  }
  json put(const std::string& tenant, const std::string& key, std::uint64_t size, unsigned replicas = 1, bool commit = true) {
    auto t = call({{"op", "put_start"}, {"tenant", tenant}, {"key", key}, {"size", size}, {"replicas", replicas}});
    if (commit && t["ok"]) {
      EXPECT_TRUE(call({{"op", "put_commit"}, {"tenant", tenant}, {"key", key}, {"put_id", t["put_id"]}})["ok"]);
    }
    return t;
  }
  // Carries out the replication tasks handed to `node` with its heartbeat (the copy itself is a node's job).
  std::size_t replicate_from(const std::string& node) {
    auto hb = call({{"op", "heartbeat"}, {"node", node}});
    EXPECT_TRUE(hb["ok"]) << hb.dump();
    for (const auto& t : hb["tasks"])
      EXPECT_TRUE(call({{"op", "replication_done"}, {"tenant", t["tenant"]}, {"key", t["key"]}, {"put_id", t["put_id"]}, {"target", t["target"]}})["ok"]);
    return hb["tasks"].size();
  }
};

TEST_F(MasterAdmin, ListSegmentsGivesNodeTierCapacityAndUse) {
  add("n0", 1 << 20);
  add("n1", 4 << 20, "ssd");
  put("t", "a", 4096);
  auto r = call({{"op", "list_segments"}});
  ASSERT_TRUE(r["ok"]) << r.dump();
  ASSERT_EQ(r["segments"].size(), 2u);
  std::uint64_t used = 0;
  for (const auto& s : r["segments"]) {
    used += s["used"].get<std::uint64_t>();
    EXPECT_FALSE(s["draining"]);
    EXPECT_EQ(s["host"], s["node"]) << "a node that names no host is its own";
    if (s["node"] == "n1") {
      EXPECT_EQ(s["tier"], "ssd");
      EXPECT_EQ(s["capacity"], 4 << 20);
      EXPECT_EQ(s["name"], "n1/ssd");
    }
  }
  EXPECT_EQ(used, 4096u);
  EXPECT_EQ(r["segments"][0]["used"], 4096) << "DRAM is filled first";
}

TEST_F(MasterAdmin, ListObjectsShowsReplicasLeasesPinsAndPendingPuts) {
  add("n0", 1 << 20);
  add("n1", 1 << 20);
  put("t", "a", 1000, 2);
  put("u", "b", 2000);
  ASSERT_TRUE(call({{"op", "put_start"}, {"tenant", "t"}, {"key", "pinned"}, {"size", 64}, {"soft_pin", true}})["ok"]);
  put("t", "pending", 3000, 1, /*commit=*/false);
  ASSERT_TRUE(call({{"op", "get"}, {"tenant", "t"}, {"key", "a"}, {"lease_ms", 1500}})["ok"]);

  auto all = call({{"op", "list_objects"}});
  ASSERT_TRUE(all["ok"]) << all.dump();
  EXPECT_FALSE(all["truncated"]);
  ASSERT_EQ(all["objects"].size(), 4u);
  auto t = call({{"op", "list_objects"}, {"tenant", "t"}});
  ASSERT_EQ(t["objects"].size(), 3u);
  const auto& a = t["objects"][0];
  EXPECT_EQ(a["key"], "a");
  EXPECT_EQ(a["size"], 1000);
  EXPECT_TRUE(a["committed"]);
  EXPECT_EQ(a["replicas"].size(), 2u);
  EXPECT_NE(a["replicas"][0]["node"], a["replicas"][1]["node"]);
  EXPECT_EQ(a["lease_ms"], 1500);
  const auto& pending = t["objects"][1];
  EXPECT_EQ(pending["key"], "pending");
  EXPECT_FALSE(pending["committed"]);
  EXPECT_EQ(pending["lease_ms"], 30000) << "a pending put shows its put lease";
  EXPECT_TRUE(t["objects"][2]["pinned"]);
  EXPECT_FALSE(t["objects"][2]["committed"]);
  auto u = call({{"op", "list_objects"}, {"tenant", "u"}});
  ASSERT_EQ(u["objects"].size(), 1u);
  EXPECT_EQ(u["objects"][0]["lease_ms"], 0);
  EXPECT_EQ(call({{"op", "list_objects"}, {"tenant", "nobody"}})["objects"].size(), 0u);

  auto limited = call({{"op", "list_objects"}, {"limit", 2}});
  EXPECT_EQ(limited["objects"].size(), 2u);
  EXPECT_TRUE(limited["truncated"]);
}

TEST_F(MasterAdmin, UsageIsPerTierAndPerTenantWithQuotas) {
  add("n0", 1 << 20);
  add("n1", 8 << 20, "ssd");
  put("t", "a", 4096, 2);
  put("capped", "b", 1000);
  auto r = call({{"op", "usage"}});
  ASSERT_TRUE(r["ok"]) << r.dump();
  EXPECT_EQ(r["capacity"], 9 << 20);
  EXPECT_EQ(r["objects"], 2);
  EXPECT_EQ(r["nodes"].size(), 2u);
  EXPECT_EQ(r["tiers"]["dram"]["capacity"], 1 << 20);
  EXPECT_EQ(r["tiers"]["ssd"]["capacity"], 8 << 20);
  EXPECT_EQ(r["tiers"]["dram"]["used"].get<std::uint64_t>() + r["tiers"]["ssd"]["used"].get<std::uint64_t>(),
            r["used"].get<std::uint64_t>());
  EXPECT_EQ(r["tenants"]["t"]["used"], 2 * 4096);
  EXPECT_FALSE(r["tenants"]["t"].contains("quota"));
  EXPECT_EQ(r["tenants"]["capped"]["used"], 1000);
  EXPECT_EQ(r["tenants"]["capped"]["quota"], 1 << 20);
}

TEST_F(MasterAdmin, UsageShowsAQuotaOfATenantThatStoredNothing) {
  add("n0", 1 << 20);
  auto r = call({{"op", "usage"}});
  EXPECT_EQ(r["tenants"]["capped"]["used"], 0);
  EXPECT_EQ(r["tenants"]["capped"]["quota"], 1 << 20);
}

TEST_F(MasterAdmin, DrainingANodeStopsPlacementAndReReplicatesItsObjects) {
  // Four objects only on n0, one on n0 and n1, then a third node.
  add("n0", 1 << 20);
  for (int i = 0; i < 4; ++i) put("t", "k" + std::to_string(i), 4096);
  add("n1", 1 << 20);
  put("t", "two", 4096, 2);
  add("n2", 1 << 20);
  auto first = call({{"op", "drain_node"}, {"node", "n0"}});
  ASSERT_TRUE(first["ok"]) << first.dump();
  EXPECT_EQ(first["node"], "n0");
  EXPECT_EQ(first["objects"], 5);
  EXPECT_EQ(first["only_here"], 4);
  EXPECT_EQ(first["copying"], 0);
  EXPECT_FALSE(first["drained"]);

  // Nothing new lands on a draining node.
  for (int i = 0; i < 10; ++i) {
    auto t = put("t", "new" + std::to_string(i), 4096);
    for (const auto& r : t["replicas"]) EXPECT_NE(r["node"], "n0");
  }
  const auto segments = call({{"op", "list_segments"}});
  for (const auto& s : segments["segments"]) EXPECT_EQ(s["draining"], s["node"] == "n0");

  // The next tick plans copies from n0 (the only holder) to other nodes.
  now += 100ms;
  handler.tick(now);
  auto during = call({{"op", "drain_node"}, {"node", "n0"}});
  // Four objects only on n0, and "two" whose second copy must leave n0 too.
  EXPECT_EQ(during["copying"], 5);
  EXPECT_EQ(during["only_here"], 4) << "copies in flight are not readable yet";
  EXPECT_EQ(replicate_from("n0") + replicate_from("n1") + replicate_from("n2"), 5u);
  auto done = call({{"op", "drain_node"}, {"node", "n0"}});
  EXPECT_TRUE(done["drained"]) << done.dump();
  EXPECT_EQ(done["only_here"], 0);
  EXPECT_EQ(done["objects"], 5) << "the node keeps its copies until the next tick";
  EXPECT_FALSE(done["empty"]);
  EXPECT_EQ(done["used"], 5 * 4096);

  // The next tick gives back n0's copies: every object is whole elsewhere.
  now += 100ms;
  EXPECT_EQ(handler.tick(now).freed_drained_copies, 5u);
  auto empty = call({{"op", "drain_node"}, {"node", "n0"}});
  EXPECT_TRUE(empty["drained"]) << empty.dump();
  EXPECT_TRUE(empty["empty"]) << empty.dump();
  EXPECT_EQ(empty["objects"], 0);
  EXPECT_EQ(empty["used"], 0);
  const auto after = call({{"op", "list_segments"}});
  for (const auto& s : after["segments"]) {
    if (s["node"] == "n0") {
      EXPECT_EQ(s["used"], 0) << s.dump();
    }
  }

  // n0 stops; nothing is lost and nothing needs copying again.
  now += state.config().node_timeout + 1s;
  (void)call({{"op", "heartbeat"}, {"node", "n1"}});
  (void)call({{"op", "heartbeat"}, {"node", "n2"}});
  auto report = handler.tick(now);
  ASSERT_EQ(report.dropped_nodes, std::vector<std::string>{"n0"});
  EXPECT_TRUE(report.lost_objects.empty());
  EXPECT_TRUE(report.replications.empty());
  const auto objects = call({{"op", "list_objects"}});
  for (const auto& o : objects["objects"]) {
    EXPECT_GE(o["replicas"].size(), o["replicas_wanted"].get<std::size_t>()) << o.dump();
    auto g = call({{"op", "get"}, {"tenant", "t"}, {"key", o["key"]}});
    EXPECT_TRUE(g["ok"]) << g.dump();
  }
}

TEST_F(MasterAdmin, AReadLeaseOrACopyInFlightKeepsADrainingNodesCopyUntilItEnds) {
  add("n0", 1 << 20);
  put("t", "k", 4096);
  add("n1", 1 << 20);
  ASSERT_TRUE(call({{"op", "drain_node"}, {"node", "n0"}})["ok"]);
  // A reader on n0 before the copy exists: n0 is all there is.
  auto early = call({{"op", "get"}, {"tenant", "t"}, {"key", "k"}, {"reader_node", "n0"}, {"lease_ms", 1000}});
  ASSERT_TRUE(early["ok"]) << early.dump();
  now += 100ms;
  handler.tick(now);  // plans the copy from n0 to n1
  EXPECT_EQ(handler.tick(now).freed_drained_copies, 0u) << "n0 is the copy's source";
  ASSERT_EQ(replicate_from("n0"), 1u);
  EXPECT_EQ(handler.tick(now).freed_drained_copies, 0u) << "the early reader may be reading n0's copy";

  // Readers are sent to the copy that stays, even readers on the draining node.
  auto later = call({{"op", "get"}, {"tenant", "t"}, {"key", "k"}, {"reader_node", "n0"}, {"lease_ms", 1000}});
  ASSERT_TRUE(later["ok"]) << later.dump();
  ASSERT_EQ(later["replicas"].size(), 2u);
  EXPECT_EQ(later["replicas"][0]["node"], "n1") << later.dump();
  EXPECT_EQ(later["replicas"][1]["node"], "n0") << later.dump();

  // Both leases released (or run out): n0's copy is given back, the object stays readable.
  ASSERT_TRUE(call({{"op", "release"}, {"tenant", "t"}, {"key", "k"}, {"lease_id", early["lease_id"]}})["ok"]);
  EXPECT_EQ(handler.tick(now).freed_drained_copies, 0u) << "one reader is left";
  now += 1001ms;
  (void)call({{"op", "heartbeat"}, {"node", "n0"}});
  (void)call({{"op", "heartbeat"}, {"node", "n1"}});
  EXPECT_EQ(handler.tick(now).freed_drained_copies, 1u);
  auto g = call({{"op", "get"}, {"tenant", "t"}, {"key", "k"}});
  ASSERT_TRUE(g["ok"]) << g.dump();
  ASSERT_EQ(g["replicas"].size(), 1u);
  EXPECT_EQ(g["replicas"][0]["node"], "n1");
  EXPECT_TRUE(call({{"op", "drain_node"}, {"node", "n0"}})["empty"]);
}

TEST_F(MasterAdmin, ACopyThePoolHasNoRoomForElsewhereStaysOnTheDrainingNode) {
  add("n0", 1 << 20);
  add("n1", 1 << 20);
  ASSERT_TRUE(put("t", "two", 4096, 2)["ok"]);
  auto r = call({{"op", "drain_node"}, {"node", "n0"}});
  now += 100ms;
  auto report = handler.tick(now);
  EXPECT_TRUE(report.replications.empty()) << "no third node";
  EXPECT_EQ(report.freed_drained_copies, 0u) << "two replicas are wanted, n1 holds one";
  r = call({{"op", "drain_node"}, {"node", "n0"}});
  EXPECT_TRUE(r["drained"]) << "n1 holds a copy: stopping n0 loses nothing";
  EXPECT_FALSE(r["empty"]) << r.dump();
  EXPECT_EQ(r["objects"], 1);
  auto g = call({{"op", "get"}, {"tenant", "t"}, {"key", "two"}});
  EXPECT_EQ(g["replicas"].size(), 2u) << "the copy still serves";

  // A third node: the second copy moves there, then n0's is given back.
  add("n2", 1 << 20);
  ASSERT_TRUE(call({{"op", "release"}, {"tenant", "t"}, {"key", "two"}, {"lease_id", g["lease_id"]}})["ok"]);
  now += 100ms;
  ASSERT_EQ(handler.tick(now).replications.size(), 1u);
  EXPECT_EQ(replicate_from("n0") + replicate_from("n1"), 1u);
  EXPECT_EQ(handler.tick(now).freed_drained_copies, 1u);
  const auto objects = call({{"op", "list_objects"}});
  for (const auto& rep : objects["objects"][0]["replicas"]) EXPECT_NE(rep["node"], "n0");
}

TEST_F(MasterAdmin, UndrainingANodeLetsObjectsBePlacedOnItAgain) {
  add("n0", 1 << 20);
  ASSERT_TRUE(call({{"op", "drain_node"}, {"node", "n0"}})["ok"]);
  EXPECT_EQ(put("t", "refused", 4096)["error"], "capacity_exceeded");
  auto r = call({{"op", "undrain_node"}, {"node", "n0"}});
  ASSERT_TRUE(r["ok"]) << r.dump();
  EXPECT_EQ(r["node"], "n0");
  EXPECT_TRUE(r["was_draining"]);
  EXPECT_FALSE(state.draining("n0"));
  EXPECT_TRUE(put("t", "placed", 4096)["ok"]);
  const auto segments = call({{"op", "list_segments"}});
  for (const auto& s : segments["segments"]) EXPECT_FALSE(s["draining"]);
  r = call({{"op", "undrain_node"}, {"node", "n0"}});
  EXPECT_TRUE(r["ok"]) << "idempotent";
  EXPECT_FALSE(r["was_draining"]);
}

TEST_F(MasterAdmin, ANodeThatLeavesIsDroppedWithWhatOnlyItHeld) {
  add("n0", 1 << 20);
  put("t", "only", 4096);
  ASSERT_TRUE(put("t", "half", 4096, 1, /*commit=*/false)["ok"]);
  add("n1", 1 << 20);
  put("t", "two", 4096, 2);
  auto r = call({{"op", "leave"}, {"node", "n0"}});
  ASSERT_TRUE(r["ok"]) << r.dump();
  EXPECT_EQ(r["node"], "n0");
  EXPECT_EQ(r["lost"], 1);
  EXPECT_EQ(r["reclaimed_puts"], 1);
  const auto segments = call({{"op", "list_segments"}});
  ASSERT_EQ(segments["segments"].size(), 1u);
  EXPECT_EQ(segments["segments"][0]["node"], "n1");
  EXPECT_EQ(call({{"op", "get"}, {"tenant", "t"}, {"key", "only"}})["error"], "not_found");
  auto g = call({{"op", "get"}, {"tenant", "t"}, {"key", "two"}});
  ASSERT_EQ(g["replicas"].size(), 1u);
  EXPECT_EQ(g["replicas"][0]["node"], "n1");
  EXPECT_EQ(call({{"op", "heartbeat"}, {"node", "n0"}})["error"], "not_found") << "it registers again to come back";
  auto again = call({{"op", "leave"}, {"node", "n0"}});
  EXPECT_EQ(again["error"], "not_found");
  auto bad = call({{"op", "leave"}});
  EXPECT_EQ(bad["error"], "invalid_argument");
  EXPECT_NE(bad["message"].get<std::string>().find("leave.node"), std::string::npos) << bad.dump();
}

TEST_F(MasterAdmin, AnOperatorRemovesASilentNodeBeforeItsTimeoutButNotAHeartbeatingOneUnlessForced) {
  add("n0", 1 << 20);
  add("n1", 1 << 20);
  put("t", "two", 4096, 2);
  add("n2", 1 << 20);
  // Every node heartbeats once a second.
  for (int i = 0; i < 3; ++i) {
    now += 1s;
    for (auto n : {"n0", "n1", "n2"}) ASSERT_TRUE(call({{"op", "heartbeat"}, {"node", n}})["ok"]);
  }
  auto live = call({{"op", "remove_node"}, {"node", "n0"}});
  EXPECT_EQ(live["error"], "busy") << live.dump();
  EXPECT_NE(live["message"].get<std::string>().find("still heartbeating"), std::string::npos) << live.dump();
  EXPECT_EQ(call({{"op", "list_segments"}})["segments"].size(), 3u) << "a refused removal changes nothing";
  // n0 falls silent (killed): three of its intervals later it may be removed,
  // long before node_timeout, and its object is copied again from n1.
  now += 3s;
  for (auto n : {"n1", "n2"}) ASSERT_TRUE(call({{"op", "heartbeat"}, {"node", n}})["ok"]);
  ASSERT_LT(3s, state.config().node_timeout) << "the test must remove it before the master would drop it";
  auto removed = call({{"op", "remove_node"}, {"node", "n0"}});
  ASSERT_TRUE(removed["ok"]) << removed.dump();
  EXPECT_EQ(removed["node"], "n0");
  EXPECT_EQ(removed["lost"], 0);
  handler.tick(now);
  EXPECT_EQ(replicate_from("n1"), 1u);
  auto g = call({{"op", "get"}, {"tenant", "t"}, {"key", "two"}});
  ASSERT_EQ(g["replicas"].size(), 2u) << g.dump();
  for (const auto& r : g["replicas"]) {
    EXPECT_NE(r["node"], "n0");
  }
  // Forced, a heartbeating node goes too; it registers again to come back.
  auto forced = call({{"op", "remove_node"}, {"node", "n2"}, {"force", true}});
  ASSERT_TRUE(forced["ok"]) << forced.dump();
  EXPECT_EQ(forced["lost"], 0);
  EXPECT_EQ(call({{"op", "heartbeat"}, {"node", "n2"}})["error"], "not_found");
  EXPECT_EQ(call({{"op", "remove_node"}, {"node", "n2"}})["error"], "not_found");
  auto bad_force = call({{"op", "remove_node"}, {"node", "n1"}, {"force", "yes"}});
  EXPECT_EQ(bad_force["error"], "invalid_argument");
  EXPECT_NE(bad_force["message"].get<std::string>().find("remove_node.force"), std::string::npos) << bad_force.dump();
  auto no_node = call({{"op", "remove_node"}});
  EXPECT_EQ(no_node["error"], "invalid_argument");
  EXPECT_NE(no_node["message"].get<std::string>().find("remove_node.node"), std::string::npos) << no_node.dump();
}

TEST_F(MasterAdmin, APendingPutOnADrainingNodeKeepsItUndrained) {
  add("n0", 1 << 20);
  ASSERT_TRUE(put("t", "half", 4096, 1, /*commit=*/false)["ok"]);
  auto r = call({{"op", "drain_node"}, {"node", "n0"}});
  EXPECT_EQ(r["objects"], 1);
  EXPECT_EQ(r["only_here"], 1);
  EXPECT_FALSE(r["drained"]);
  // Its writer never commits: the put lease reclaims it, and the node is drained.
  now += state.config().put_lease + 1s;
  (void)call({{"op", "heartbeat"}, {"node", "n0"}});
  handler.tick(now);
  r = call({{"op", "drain_node"}, {"node", "n0"}});
  EXPECT_EQ(r["objects"], 0);
  EXPECT_TRUE(r["drained"]);
}

TEST_F(MasterAdmin, DrainingTheLastNodeLeavesNowhereToPut) {
  add("n0", 1 << 20);
  ASSERT_TRUE(call({{"op", "drain_node"}, {"node", "n0"}})["drained"]);
  auto t = put("t", "k", 4096);
  EXPECT_FALSE(t["ok"]);
  EXPECT_EQ(t["error"], "capacity_exceeded");
}

TEST_F(MasterAdmin, MalformedAdminRequestsGetErrorsNamingTheField) {
  add("n0", 1 << 20);
  auto check = [&](const json& request, const std::string& code, const std::string& fragment) {
    auto r = call(request);
    EXPECT_FALSE(r["ok"]) << request.dump();
    EXPECT_EQ(r["error"], code) << request.dump() << " -> " << r.dump();
    EXPECT_NE(r["message"].get<std::string>().find(fragment), std::string::npos) << r.dump();
  };
  check({{"op", "drain_node"}}, "invalid_argument", "drain_node.node");
  check({{"op", "register_segment"}, {"node", "n9"}, {"segment", "n9/x"}, {"capacity", 1}, {"host", 5}}, "invalid_argument",
        "register_segment.host");
  check({{"op", "drain_node"}, {"node", 7}}, "invalid_argument", "drain_node.node");
  check({{"op", "drain_node"}, {"node", "ghost"}}, "not_found", "ghost");
  check({{"op", "undrain_node"}}, "invalid_argument", "undrain_node.node");
  check({{"op", "undrain_node"}, {"node", false}}, "invalid_argument", "undrain_node.node");
  check({{"op", "undrain_node"}, {"node", "ghost"}}, "not_found", "ghost");
  check({{"op", "list_objects"}, {"tenant", 3}}, "invalid_argument", "list_objects.tenant");
  check({{"op", "list_objects"}, {"limit", "all"}}, "invalid_argument", "list_objects.limit");
  check({{"op", "list_objects"}, {"limit", 0}}, "invalid_argument", "list_objects.limit");
  check({{"op", "list_objects"}, {"limit", -1}}, "invalid_argument", "list_objects.limit");
  check({{"op", "list_objects"}, {"limit", 1000000}}, "invalid_argument", "list_objects.limit");
  // Unknown fields are ignored like in every other request; a missing id is not.
  auto no_id = handler.handle(R"({"op":"usage"})", now);
  EXPECT_FALSE(no_id["ok"]);
  EXPECT_EQ(no_id["error"], "malformed_message");
  EXPECT_FALSE(state.draining("ghost"));
  EXPECT_FALSE(state.draining("n0")) << "failed requests drain nothing";
}

}  // namespace
