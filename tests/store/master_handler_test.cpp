#include <kvx/store/master_handler.hpp>
#include <kvx/cache/eviction/lru.hpp>

#include <gtest/gtest.h>

#include <list>

namespace {

using namespace std::chrono_literals;
using json = nlohmann::json;


struct MasterHandler : ::testing::Test {
  kvx::metrics::registry registry;
  kvx::store::master_state<kvx::cache::eviction::lru> state{{}, {}, registry};
  kvx::store::master_handler<kvx::store::master_state<kvx::cache::eviction::lru>> handler{state};
  kvx::store::clock::time_point now = kvx::store::clock::now();

  json call(const json& request) { return handler.handle(request.dump(), now); }
};

TEST_F(MasterHandler, FullPutGetCycleOverTheProtocol) {
  ASSERT_TRUE(call({{"id", 1}, {"op", "register_segment"}, {"node", "n0"}, {"segment", "s0"}, {"capacity", 1 << 20}})["ok"]);
  ASSERT_TRUE(call({{"id", 2}, {"op", "register_segment"}, {"node", "n1"}, {"segment", "s1"}, {"capacity", 1 << 20}})["ok"]);
  auto put = call({{"id", 3}, {"op", "put_start"}, {"tenant", "t"}, {"key", "k"}, {"size", 4096}, {"replicas", 2}});
  ASSERT_TRUE(put["ok"]) << put.dump();
  EXPECT_EQ(put["id"], 3);
  EXPECT_EQ(put["replicas"].size(), 2u);
  EXPECT_FALSE(call({{"id", 4}, {"op", "exists"}, {"tenant", "t"}, {"key", "k"}})["exists"]);
  ASSERT_TRUE(call({{"id", 5}, {"op", "put_commit"}, {"tenant", "t"}, {"key", "k"}, {"put_id", put["put_id"]}})["ok"]);
  auto get = call({{"id", 6}, {"op", "get"}, {"tenant", "t"}, {"key", "k"}, {"reader_node", "n1"}});
  ASSERT_TRUE(get["ok"]) << get.dump();
  EXPECT_EQ(get["size"], 4096);
  EXPECT_EQ(get["replicas"][0]["node"], "n1");
  EXPECT_EQ(call({{"id", 7}, {"op", "longest_prefix"}, {"tenant", "t"}, {"keys", {"k", "nope"}}})["count"], 1);
  auto busy = call({{"id", 8}, {"op", "remove"}, {"tenant", "t"}, {"key", "k"}});
  EXPECT_FALSE(busy["ok"]);
  EXPECT_EQ(busy["error"], "busy");
  ASSERT_TRUE(call({{"id", 9}, {"op", "release"}, {"tenant", "t"}, {"key", "k"}})["ok"]);
  ASSERT_TRUE(call({{"id", 10}, {"op", "remove"}, {"tenant", "t"}, {"key", "k"}})["ok"]);
  auto stats = call({{"id", 11}, {"op", "stats"}});
  EXPECT_EQ(stats["objects"], 0);
  EXPECT_EQ(stats["capacity"], 2 << 20);
}

TEST_F(MasterHandler, AReleaseNamesItsLeaseAndLeavesOtherReaders) {
  ASSERT_TRUE(call({{"id", 1}, {"op", "register_segment"}, {"node", "n0"}, {"segment", "s0"}, {"capacity", 1 << 20}})["ok"]);
  auto put = call({{"id", 2}, {"op", "put_start"}, {"tenant", "t"}, {"key", "k"}, {"size", 4096}});
  ASSERT_TRUE(call({{"id", 3}, {"op", "put_commit"}, {"tenant", "t"}, {"key", "k"}, {"put_id", put["put_id"]}})["ok"]);
  auto a = call({{"id", 4}, {"op", "get"}, {"tenant", "t"}, {"key", "k"}});
  auto b = call({{"id", 5}, {"op", "get"}, {"tenant", "t"}, {"key", "k"}});
  ASSERT_TRUE(a["lease_id"].is_number_unsigned()) << a.dump();
  ASSERT_TRUE(b["lease_id"].is_number_unsigned()) << b.dump();
  EXPECT_NE(a["lease_id"], b["lease_id"]);
  EXPECT_EQ(call({{"id", 6}, {"op", "release"}, {"tenant", "t"}, {"key", "k"}, {"lease_id", "x"}})["error"], "invalid_argument");
  ASSERT_TRUE(call({{"id", 7}, {"op", "release"}, {"tenant", "t"}, {"key", "k"}, {"lease_id", a["lease_id"]}})["ok"]);
  EXPECT_EQ(call({{"id", 8}, {"op", "remove"}, {"tenant", "t"}, {"key", "k"}})["error"], "busy") << "b still reads";
  ASSERT_TRUE(call({{"id", 9}, {"op", "release"}, {"tenant", "t"}, {"key", "k"}, {"lease_id", b["lease_id"]}})["ok"]);
  EXPECT_TRUE(call({{"id", 10}, {"op", "remove"}, {"tenant", "t"}, {"key", "k"}})["ok"]);
}

// A task whose copy is no longer wanted (its target's node left, or the
// object is gone) used to be handed to the source anyway, which then wrote
// a range that may hold another object by now.
TEST_F(MasterHandler, AHeartbeatCarriesNoTaskForACopyNoLongerWanted) {
  for (int n = 0; n < 3; ++n) {
    const auto i = std::to_string(n);
    ASSERT_TRUE(call({{"id", 1}, {"op", "register_segment"}, {"node", "n" + i}, {"segment", "s" + i}, {"capacity", 1 << 20}})["ok"]);
  }
  auto put = call({{"id", 2}, {"op", "put_start"}, {"tenant", "t"}, {"key", "x"}, {"size", 4096}, {"replicas", 2}});
  ASSERT_TRUE(put["ok"]) << put.dump();
  ASSERT_TRUE(call({{"id", 3}, {"op", "put_commit"}, {"tenant", "t"}, {"key", "x"}, {"put_id", put["put_id"]}})["ok"]);
  ASSERT_TRUE(state.remove_node(put["replicas"][1]["node"].get<std::string>(), now));
  auto report = handler.tick(now + 1s);
  ASSERT_EQ(report.replications.size(), 1u);
  const auto source = report.replications[0].source.node;
  ASSERT_TRUE(state.remove_node(report.replications[0].target.node, now + 1s));  // the copy's target leaves
  now += 1s;
  auto beat = call({{"id", 4}, {"op", "heartbeat"}, {"node", source}});
  ASSERT_TRUE(beat["ok"]) << beat.dump();
  EXPECT_TRUE(beat["tasks"].empty()) << beat.dump();
}

TEST_F(MasterHandler, ANotificationIsActedOnAndAnsweredWithNothing) {
  ASSERT_TRUE(call({{"id", 1}, {"op", "register_segment"}, {"node", "n0"}, {"segment", "s0"}, {"capacity", 1 << 20}})["ok"]);
  auto put = call({{"id", 2}, {"op", "put_start"}, {"tenant", "t"}, {"key", "k"}, {"size", 4096}});
  ASSERT_TRUE(put["ok"]) << put.dump();
  ASSERT_TRUE(call({{"id", 3}, {"op", "put_commit"}, {"tenant", "t"}, {"key", "k"}, {"put_id", put["put_id"]}})["ok"]);
  ASSERT_TRUE(call({{"id", 4}, {"op", "get"}, {"tenant", "t"}, {"key", "k"}, {"lease_ms", 60000}})["ok"]);
  EXPECT_EQ(call({{"id", 5}, {"op", "remove"}, {"tenant", "t"}, {"key", "k"}})["error"], "busy");
  auto released = call({{"id", 6}, {"op", "release"}, {"tenant", "t"}, {"key", "k"}, {"reply", false}});
  EXPECT_TRUE(released.is_null()) << released.dump();
  // The release took effect: the lease no longer holds the object.
  EXPECT_TRUE(call({{"id", 7}, {"op", "remove"}, {"tenant", "t"}, {"key", "k"}, {"reply", true}})["ok"]);
  // A failing notification is silent too.
  auto failed = call({{"id", 8}, {"op", "release"}, {"tenant", "t"}, {"key", "k"}, {"reply", false}});
  EXPECT_TRUE(failed.is_null()) << failed.dump();
}

TEST_F(MasterHandler, AnErrorsMessageIsItsContextSoTheCodeIsNamedOnce) {
  ASSERT_TRUE(call({{"id", 1}, {"op", "register_segment"}, {"node", "n0"}, {"segment", "s0"}, {"capacity", 4096}})["ok"]);
  auto r = call({{"id", 2}, {"op", "put_start"}, {"tenant", "t"}, {"key", "k"}, {"size", 1 << 20}});
  ASSERT_FALSE(r["ok"]) << r.dump();
  ASSERT_EQ(r["error"], "capacity_exceeded");
  const auto ec = make_error_code(kvx::errc::capacity_exceeded);
  const std::string message = r["message"].get<std::string>();
  EXPECT_FALSE(message.empty());
  EXPECT_EQ(message.find(ec.message()), std::string::npos) << message;
  const std::string logged = kvx::store::protocol::describe(ec, r);
  EXPECT_EQ(logged, ec.message() + ": " + message);
  // What a client turns the response into says the code once too.
  auto checked = kvx::store::protocol::check_response(r);
  ASSERT_FALSE(checked);
  EXPECT_EQ(checked.error().message(), logged);
  EXPECT_EQ(kvx::store::protocol::describe(ec, json::object()), ec.message());
}

TEST_F(MasterHandler, MalformedRequestsGetErrorsNamingTheField) {
  auto check = [&](const std::string& body, const std::string& code, const std::string& fragment) {
    auto r = handler.handle(body, now);
    EXPECT_FALSE(r["ok"]) << body;
    EXPECT_EQ(r["error"], code) << body << " -> " << r.dump();
    EXPECT_NE(r["message"].get<std::string>().find(fragment), std::string::npos) << r.dump();
  };
  check("{nope", "malformed_message", "not valid JSON");
  check("[1,2]", "malformed_message", "not a JSON object");
  check(R"({"op":"get"})", "malformed_message", "request.id");
  check(R"({"id":1,"op":"launch_missiles"})", "malformed_message", "unknown op");
  check(R"({"id":1,"op":"release","tenant":"t","key":"k","reply":"no"})", "malformed_message", "request.reply");
  check(R"({"id":1,"op":"get","tenant":"t"})", "invalid_argument", "get.key");
  check(R"({"id":1,"op":"put_start","tenant":"t","key":"k","size":"big"})", "invalid_argument", "put_start.size");
  check(R"({"id":1,"op":"put_start","tenant":"t","key":"k","size":-5})", "invalid_argument", "put_start.size");
  check(R"({"id":1,"op":"longest_prefix","tenant":"t","keys":[1]})", "malformed_message", "non-string");
  check(R"({"id":1,"op":"replication_done","tenant":"t","key":"k","put_id":1,"target":{"node":1}})", "invalid_argument",
        "replication_done.target.node");
  check(R"({"id":1,"op":"heartbeat","node":"ghost"})", "not_found", "ghost");
}

// put_start's lease_ms (a per-put lease) is optional: a writer that
// predates it sends none and gets the master's put lease. A get's lease_ms
// is cut to max_read_lease.
TEST(MasterHandlerLeases, APutStartMayAskItsOwnLeaseAndWithoutTheFieldGetsTheDefault) {
  kvx::metrics::registry registry;
  kvx::store::master_config c;  // put_lease 30 s, read_lease 5 s
  c.max_put_lease = 120s;
  c.max_read_lease = 20s;
  kvx::store::master_state<kvx::cache::eviction::lru> state(c, {}, registry);
  kvx::store::master_handler<kvx::store::master_state<kvx::cache::eviction::lru>> handler(state);
  const auto now = kvx::store::clock::now();
  auto call = [&](const json& request) { return handler.handle(request.dump(), now); };
  ASSERT_TRUE(call({{"id", 1}, {"op", "register_segment"}, {"node", "n0"}, {"segment", "s0"}, {"capacity", 1 << 20}})["ok"]);

  auto old_format = call({{"id", 2}, {"op", "put_start"}, {"tenant", "t"}, {"key", "old"}, {"size", 4096}});
  ASSERT_TRUE(old_format["ok"]) << old_format.dump();
  EXPECT_EQ(old_format["deadline_ms"], 30000);
  auto zero = call({{"id", 3}, {"op", "put_start"}, {"tenant", "t"}, {"key", "zero"}, {"size", 4096}, {"lease_ms", 0}});
  EXPECT_EQ(zero["deadline_ms"], 30000) << zero.dump();
  auto asked = call({{"id", 4}, {"op", "put_start"}, {"tenant", "t"}, {"key", "long"}, {"size", 4096}, {"lease_ms", 90000}});
  ASSERT_TRUE(asked["ok"]) << asked.dump();
  EXPECT_EQ(asked["deadline_ms"], 90000);

  auto over = call({{"id", 5}, {"op", "put_start"}, {"tenant", "t"}, {"key", "over"}, {"size", 4096}, {"lease_ms", 120001}});
  EXPECT_EQ(over["error"], "invalid_argument") << over.dump();
  EXPECT_NE(over.value("message", "").find("at most 120000 ms (max_put_lease)"), std::string::npos) << over.dump();
  auto wrong = call({{"id", 6}, {"op", "put_start"}, {"tenant", "t"}, {"key", "w"}, {"size", 4096}, {"lease_ms", "1h"}});
  EXPECT_EQ(wrong["error"], "invalid_argument") << wrong.dump();
  EXPECT_NE(wrong.value("message", "").find("put_start.lease_ms"), std::string::npos) << wrong.dump();
  auto huge = call({{"id", 7}, {"op", "put_start"}, {"tenant", "t"}, {"key", "h"}, {"size", 4096},
                    {"lease_ms", std::uint64_t{1} << 50}});
  EXPECT_EQ(huge["error"], "malformed_message") << huge.dump();

  ASSERT_TRUE(call({{"id", 8}, {"op", "put_commit"}, {"tenant", "t"}, {"key", "old"}, {"put_id", old_format["put_id"]}})["ok"]);
  auto hour = call({{"id", 9}, {"op", "get"}, {"tenant", "t"}, {"key", "old"}, {"lease_ms", 3600000}});
  ASSERT_TRUE(hour["ok"]) << hour.dump();
  EXPECT_EQ(hour["lease_ms"], 20000) << "cut to max_read_lease";
  EXPECT_EQ(call({{"id", 10}, {"op", "get"}, {"tenant", "t"}, {"key", "old"}})["lease_ms"], 5000);
}

TEST_F(MasterHandler, ReplicationTasksRideOnTheSourceNodesHeartbeat) {
  for (int n = 0; n < 3; ++n)
    ASSERT_TRUE(call({{"id", n}, {"op", "register_segment"}, {"node", "n" + std::to_string(n)},
                      {"segment", "s" + std::to_string(n)}, {"capacity", 1 << 20}})["ok"]);
  auto put = call({{"id", 9}, {"op", "put_start"}, {"tenant", "t"}, {"key", "k"}, {"size", 100}, {"replicas", 2}});
  ASSERT_TRUE(call({{"id", 10}, {"op", "put_commit"}, {"tenant", "t"}, {"key", "k"}, {"put_id", put["put_id"]}})["ok"]);
  const std::string lost = put["replicas"][0]["node"], kept = put["replicas"][1]["node"];
  now += 3s;
  for (int n = 0; n < 3; ++n)
    if ("n" + std::to_string(n) != lost) call({{"id", 11}, {"op", "heartbeat"}, {"node", "n" + std::to_string(n)}});
  now += 3s;  // `lost` silent for 6 s > 5 s timeout; the others for 3 s
  auto report = handler.tick(now);
  ASSERT_EQ(report.dropped_nodes.size(), 1u);
  auto hb = call({{"id", 12}, {"op", "heartbeat"}, {"node", kept}});
  ASSERT_EQ(hb["tasks"].size(), 1u) << hb.dump();
  const auto task = hb["tasks"][0];
  EXPECT_EQ(task["source"]["node"], kept);
  ASSERT_TRUE(call({{"id", 13}, {"op", "replication_done"}, {"tenant", "t"}, {"key", "k"}, {"put_id", task["put_id"]},
                    {"target", task["target"]}})["ok"]);
  EXPECT_EQ(call({{"id", 14}, {"op", "get"}, {"tenant", "t"}, {"key", "k"}})["replicas"].size(), 2u);
  EXPECT_TRUE(call({{"id", 15}, {"op", "heartbeat"}, {"node", kept}})["tasks"].empty());
}

TEST(FrameDecoder, SplitsFramesAcrossArbitraryChunksAndRefusesOversize) {
  std::string stream = kvx::store::protocol::encode_frame({{"a", 1}}) + kvx::store::protocol::encode_frame({{"b", 2}});
  kvx::store::protocol::frame_decoder d;
  std::vector<std::string> bodies;
  for (char c : stream) {
    d.feed(std::string_view(&c, 1));
    auto f = d.next();
    ASSERT_TRUE(f);
    if (*f) bodies.push_back(**f);
  }
  ASSERT_EQ(bodies.size(), 2u);
  EXPECT_EQ(bodies[1], R"({"b":2})");
  kvx::store::protocol::frame_decoder small(8);
  small.feed(std::string("\x09\x00\x00\x00", 4));
  EXPECT_EQ(small.next().code(), kvx::errc::malformed_message);
}

}  // namespace
