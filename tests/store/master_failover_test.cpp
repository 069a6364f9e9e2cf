// Master failover through etcd: two elected masters (one leads, one stands
// by) on a real etcd started on loopback; store clients and nodes follow the
// leader through `leader_lookup` and go on working, as the same objects,
// after the leader dies or resigns.

#include <kvx/store/elected_master.hpp>
#include <kvx/store/store_client.hpp>
#include <kvx/store/store_node.hpp>

#include <gtest/gtest.h>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/use_future.hpp>
#include <boost/asio/write.hpp>

#include <kvx/cache/eviction/lru.hpp>
#include <kvx/memory/mapped_arena.hpp>
#include <kvx/testing/metadata_conformance.hpp>
#include <kvx/testing/random_bytes.hpp>
#include <kvx/transfer/embedded_metadata.hpp>
#include <kvx/transfer/transfer_engine.hpp>
#include <kvx/transport/local.hpp>

#include <algorithm>
#include <atomic>
#include <functional>
#include <future>
#include <optional>
#include <random>
#include <thread>

#include "support/run_until.hpp"
#include "support/servers.hpp"
#include "support/store_parties.hpp"

namespace {

namespace asio = boost::asio;
using namespace std::chrono_literals;
using json = nlohmann::json;
using engine_type = kvx::test::store_engine;
using state_type = kvx::store::master_state<kvx::cache::eviction::lru>;
using master_type = kvx::store::elected_master<state_type>;


using party = kvx::test::store_party;

class MasterFailover : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { server_ = kvx::test::etcd_server::start(); }
  static void TearDownTestSuite() { server_.reset(); }

  void SetUp() override {
    if (!server_) GTEST_SKIP() << kvx::test::etcd_server::missing_reason();
    prefix_ = kvx::test::fresh_prefix("failover");
    etcd_.emplace(io.get_executor(), kvx::store::etcd_options{.address = server_->address(), .prefix = prefix_, .timeout = 2s});
    // Short leases and copies: the takeover grace (min_takeover_grace) is
    // the longest, 1 s, plus the keep-alive period of a 1 s TTL.
    config_.put_lease = 300ms;
    config_.read_lease = 1000ms;
    config_.replication_timeout = 1000ms;
    config_.node_timeout = 2s;
  }
  void TearDown() override {
    for (auto& n : nodes) n->stop();
    for (auto& m : masters)
      if (m) m->stop();
    io.restart();
    io.run_for(100ms);
  }

  master_type& add_master(std::optional<std::chrono::milliseconds> grace = std::nullopt) {
    auto& m = *masters.emplace_back(std::make_unique<master_type>(
        *etcd_,
        kvx::store::elected_master_config{.server = {.address = "127.0.0.1", .port = 0, .tick_interval = 50ms},
                                          .election = election_,
                                          .takeover_grace = grace},
        [this] { return std::make_unique<state_type>(config_, kvx::store::placement::random_with_capacity{}, registry); }));
    auto started = m.start();
    EXPECT_TRUE(started) << started.error().message();
    return m;
  }

  bool run_until(const std::function<bool()>& done, std::chrono::milliseconds limit = 5s) {
    return kvx::test::run_until(io, done, limit);
  }
  void run_for(std::chrono::milliseconds d) {
    io.restart();
    io.run_for(d);
  }

  std::shared_ptr<kvx::store::master_client> following_client() {
    return kvx::store::master_client::create(io.get_executor(), kvx::store::leader_lookup(*etcd_));
  }

  std::pair<std::error_code, json> call(kvx::store::master_client& c, json req) {
    auto [ec, body] = kvx::testing::run_op<json>(io, [&](auto h) { c.async_call(std::move(req), std::move(h)); });
    return {ec, body};
  }

  template <class Op>
  auto wait(Op op) {
    return kvx::test::run_coroutine(io, std::move(op));
  }

  party& add_party(const std::string& name) { return *parties.emplace_back(std::make_unique<party>(io, meta, name)); }

  kvx::store::store_node<engine_type>& add_node(const std::string& name, std::size_t bytes) {
    arenas.push_back(std::move(*kvx::memory::mapped_arena::create(bytes)));
    auto& p = add_party(name);
    auto& node = *nodes.emplace_back(std::make_unique<kvx::store::store_node<engine_type>>(
        p.engine, following_client(), kvx::store::node_options{.name = name, .segment = "", .tier = "dram", .heartbeat = 50ms}));
    auto region = arenas.back().region();
    auto ec = wait([&]() -> asio::awaitable<std::error_code> {
      auto [e] = co_await node.async_start(region, asio::as_tuple(asio::use_awaitable));
      co_return e;
    });
    EXPECT_FALSE(ec) << ec.message();
    return node;
  }

  struct client_party {
    party* p = nullptr;
    std::vector<std::byte> buffer;
    std::unique_ptr<kvx::store::store_client<engine_type>> client;
  };
  client_party add_client(const std::string& name, std::size_t bytes) {
    auto& p = add_party(name);
    client_party c{&p, std::vector<std::byte>(bytes), nullptr};
    const kvx::memory::memory_region region{c.buffer.data(), c.buffer.size()};
    auto ec = wait([&]() -> asio::awaitable<std::error_code> {
      auto [e, d] = co_await p.engine.async_register_memory(region, name + "/buf", asio::as_tuple(asio::use_awaitable));
      co_return e;
    });
    EXPECT_FALSE(ec) << ec.message();
    c.client = std::make_unique<kvx::store::store_client<engine_type>>(
        p.engine, following_client(), kvx::store::client_options{.node = name, .replicas = 1, .lease = 1000ms});
    return c;
  }

  std::error_code put(client_party& c, const std::string& key, std::span<const std::byte> bytes) {
    const kvx::store::object_key k{"t", key};
    return wait([&]() -> asio::awaitable<std::error_code> {
      auto [e] = co_await c.client->async_put(k, bytes, asio::as_tuple(asio::use_awaitable));
      co_return e;
    });
  }
  // During a failover a put meets the old leader gone (connection_lost,
  // unreachable), a standby (stale) or the new leader's grace (busy):
  // retried here as an application would, every other error returned.
  std::error_code put_through_failover(client_party& c, const std::string& key, std::span<const std::byte> bytes,
                                       std::vector<std::error_code>* seen = nullptr) {
    const auto give_up = std::chrono::steady_clock::now() + 8s;
    for (;;) {
      auto ec = put(c, key, bytes);
      if (!ec || std::chrono::steady_clock::now() > give_up) return ec;
      if (ec != kvx::errc::busy && ec != kvx::errc::stale && ec != kvx::errc::unreachable && ec != kvx::errc::connection_lost)
        return ec;
      if (seen) seen->push_back(ec);
      run_for(50ms);
    }
  }
  std::pair<std::error_code, std::uint64_t> get(client_party& c, const std::string& key, std::span<std::byte> dst) {
    const kvx::store::object_key k{"t", key};
    return wait([&]() -> asio::awaitable<std::pair<std::error_code, std::uint64_t>> {
      auto [e, n] = co_await c.client->async_get(k, dst, asio::as_tuple(asio::use_awaitable));
      co_return std::pair{e, n};
    });
  }

  // The leader (masters.front(), for the test to destroy), a standby, two
  // nodes and a writer and a reader, all following whichever leads.
  struct failover_cast {
    master_type& standby;
    kvx::store::store_node<engine_type>& node_a;
    kvx::store::store_node<engine_type>& node_b;
    client_party writer;
    client_party reader;
  };
  failover_cast leader_standby_nodes_and_clients() {
    add_master();
    EXPECT_TRUE(run_until([&] { return masters.front()->is_leader(); }));
    auto& standby = add_master();
    auto& node_a = add_node("node-a", 2 << 20);
    auto& node_b = add_node("node-b", 2 << 20);
    return {standby, node_a, node_b, add_client("writer", 1 << 20), add_client("reader", 1 << 20)};
  }

  static inline std::unique_ptr<kvx::test::etcd_server> server_;
  asio::io_context io;
  std::string prefix_;
  std::optional<kvx::store::etcd_metadata> etcd_;
  kvx::metrics::registry registry;
  kvx::store::master_config config_;
  kvx::store::etcd_election_options election_{.ttl = 1s, .poll_interval = 50ms};
  kvx::transfer::embedded_metadata meta{io.get_executor()};
  std::vector<std::unique_ptr<party>> parties;
  std::vector<std::unique_ptr<kvx::test::slow_store_party>> slow_parties;
  std::vector<kvx::memory::mapped_arena> arenas;
  std::vector<std::unique_ptr<master_type>> masters;
  std::vector<std::unique_ptr<kvx::store::store_node<engine_type>>> nodes;
};

TEST_F(MasterFailover, OneMasterLeadsAndTheStandbyRefusesWithAClearError) {
  auto& a = add_master();
  ASSERT_TRUE(run_until([&] { return a.is_leader(); }));
  auto& b = add_master();
  run_for(300ms);
  EXPECT_TRUE(a.is_leader());
  EXPECT_FALSE(b.is_leader()) << "the standby waits while the leader lives";
  EXPECT_GT(a.leader_revision(), 0);
  EXPECT_EQ(b.leader_revision(), 0);
  EXPECT_EQ(b.state(), nullptr);

  auto to_standby = kvx::store::master_client::create(io.get_executor(), b.endpoint());
  auto [ec, body] = call(*to_standby, {{"op", "stats"}});
  EXPECT_EQ(ec, kvx::errc::stale) << ec.message();
  EXPECT_NE(body.value("message", "").find("standby"), std::string::npos) << body.dump();
  std::tie(ec, body) = call(*to_standby, {{"op", "register_segment"}, {"node", "n"}, {"segment", "s"}, {"capacity", 1 << 20}});
  EXPECT_EQ(ec, kvx::errc::stale) << "a standby takes no registration either";

  auto follower = following_client();
  std::tie(ec, body) = call(*follower, {{"op", "stats"}});
  EXPECT_FALSE(ec) << ec.message() << body.dump();
  EXPECT_EQ(follower->endpoint(), a.endpoint()) << "the lookup found the leader";
}

TEST_F(MasterFailover, ClientsAndNodesFollowTheStandbyWhenTheLeaderDies) {
  auto cast = leader_standby_nodes_and_clients();
  ASSERT_TRUE(masters.front()->is_leader());
  auto first = std::span(cast.writer.buffer).first(200000);
  kvx::testing::fill_random(first, 1);
  ASSERT_FALSE(put_through_failover(cast.writer, "before", first)) << "after the takeover grace";
  auto [ec, n] = get(cast.reader, "before", cast.reader.buffer);
  ASSERT_FALSE(ec) << ec.message();
  ASSERT_EQ(n, first.size());
  EXPECT_TRUE(std::equal(first.begin(), first.end(), cast.reader.buffer.begin()));

  // The leader dies: no resignation, its lease runs out (TTL 1 s).
  masters.front().reset();
  ASSERT_TRUE(run_until([&] { return cast.standby.is_leader(); }, 5s)) << "the standby takes over within the TTL plus polling";
  ASSERT_TRUE(run_until([&] { return cast.node_a.reregistrations() > 0 && cast.node_b.reregistrations() > 0; }, 3s))
      << "the nodes register again with the new master";
  ASSERT_TRUE(cast.standby.state());
  EXPECT_EQ(cast.standby.state()->nodes().size(), 2u);
  EXPECT_EQ(cast.standby.state()->capacity_bytes(), std::uint64_t{4} << 20) << "their whole segments, empty";

  // The same client objects, through the same engines.
  std::tie(ec, n) = get(cast.reader, "before", cast.reader.buffer);
  EXPECT_EQ(ec, kvx::errc::not_found) << "objects do not survive a failover (docs/store.md): a miss, never stale bytes";
  auto second = std::span(cast.writer.buffer).subspan(200000, 300000);
  kvx::testing::fill_random(second, 2);
  std::vector<std::error_code> seen;
  ASSERT_FALSE(put_through_failover(cast.writer, "after", second, &seen));
  std::fill(cast.reader.buffer.begin(), cast.reader.buffer.end(), std::byte{0});
  std::tie(ec, n) = get(cast.reader, "after", cast.reader.buffer);
  ASSERT_FALSE(ec) << ec.message();
  ASSERT_EQ(n, second.size());
  EXPECT_TRUE(std::equal(second.begin(), second.end(), cast.reader.buffer.begin()));
  EXPECT_EQ(cast.standby.state()->object_count(), 1u);
  for (auto e : seen) EXPECT_EQ(e, kvx::errc::busy) << "once the standby led, only its grace held puts back: " << e.message();
}

// master_config::recover_objects: the nodes' ledgers bring the old leader's
// objects back; one whose bytes changed (as if its range had been reused by
// a put whose removal the node never heard of) and one removed do not.
TEST_F(MasterFailover, WithLedgersTheOldLeadersObjectsComeBackUnlessTheirBytesChanged) {
  config_.recover_objects = true;
  auto cast = leader_standby_nodes_and_clients();
  ASSERT_TRUE(masters.front()->is_leader());
  auto kept = std::span(cast.writer.buffer).first(200000);
  auto clobbered = std::span(cast.writer.buffer).subspan(200000, 100000);
  auto removed = std::span(cast.writer.buffer).subspan(300000, 50000);
  kvx::testing::fill_random(cast.writer.buffer, 3);
  ASSERT_FALSE(put_through_failover(cast.writer, "kept", kept));
  ASSERT_FALSE(put_through_failover(cast.writer, "clobbered", clobbered));
  ASSERT_FALSE(put_through_failover(cast.writer, "removed", removed));
  auto admin = following_client();
  auto [rec, rbody] = call(*admin, {{"op", "remove"}, {"tenant", "t"}, {"key", "removed"}});
  ASSERT_FALSE(rec) << rec.message() << rbody.dump();
  const auto listed = masters.front()->state()->objects("t", 10, kvx::store::clock::now());
  auto at = std::find_if(listed.begin(), listed.end(), [](const auto& o) { return o.key.key == "clobbered"; });
  ASSERT_NE(at, listed.end());
  ASSERT_EQ(at->replicas.size(), 1u);
  run_for(300ms);  // a few heartbeats: the ledgers reach the nodes

  const auto& where = at->replicas[0];
  auto& arena = arenas[where.node == "node-a" ? 0 : 1];
  arena.data()[where.offset + 777] ^= std::byte{0x5a};
  masters.front().reset();
  ASSERT_TRUE(run_until([&] { return cast.standby.is_leader(); }, 5s));
  ASSERT_TRUE(run_until([&] { return cast.node_a.recovered() + cast.node_b.recovered() >= 1 &&
                                     cast.node_a.recovery_mismatches() + cast.node_b.recovery_mismatches() >= 1; }, 5s))
      << "after the grace (1.33 s) the nodes report what their ledgers name and still match";
  EXPECT_EQ(cast.node_a.recovered() + cast.node_b.recovered(), 1u);
  EXPECT_EQ(cast.node_a.recovery_mismatches() + cast.node_b.recovery_mismatches(), 1u);
  ASSERT_TRUE(cast.standby.state());
  EXPECT_EQ(cast.standby.state()->object_count(), 1u);

  std::fill(cast.reader.buffer.begin(), cast.reader.buffer.end(), std::byte{0});
  auto [ec, n] = get(cast.reader, "kept", cast.reader.buffer);
  ASSERT_FALSE(ec) << ec.message();
  ASSERT_EQ(n, kept.size());
  EXPECT_TRUE(std::equal(kept.begin(), kept.end(), cast.reader.buffer.begin())) << "byte-exact through the new master";
  std::tie(ec, n) = get(cast.reader, "clobbered", cast.reader.buffer);
  EXPECT_EQ(ec, kvx::errc::not_found) << "changed bytes are never served";
  std::tie(ec, n) = get(cast.reader, "removed", cast.reader.buffer);
  EXPECT_EQ(ec, kvx::errc::not_found) << "the removal reached the ledger";
  // The pool goes on: a new put lands beside what was taken back.
  auto after = std::span(cast.writer.buffer).subspan(400000, 300000);
  ASSERT_FALSE(put_through_failover(cast.writer, "after", after));
  std::tie(ec, n) = get(cast.reader, "after", cast.reader.buffer);
  ASSERT_FALSE(ec) << ec.message();
  EXPECT_TRUE(std::equal(after.begin(), after.end(), cast.reader.buffer.begin()));
  std::tie(ec, n) = get(cast.reader, "kept", cast.reader.buffer);
  ASSERT_FALSE(ec);
  EXPECT_TRUE(std::equal(kept.begin(), kept.end(), cast.reader.buffer.begin()));
}

// A reader of the old leader asked for an hour's read lease; the leader
// dies while the read is on its way (its transport starts it 3 s late).
// The lease granted is cut to max_read_lease (4.5 s), and the new leader
// places no put before a grace that covers it, so the range the reader
// reads is not reused under it: its read returns the old object's bytes.
// Before, the lease was an hour and the grace a put lease: the new
// leader's put reused the range and the read returned its bytes as the old
// object's, with success.
TEST_F(MasterFailover, AReaderOfTheOldLeaderNeverReadsARangeTheNewLeaderReused) {
  config_.max_read_lease = 4500ms;
  config_.high_watermark = 1.0;  // a full node keeps its one object
  config_.low_watermark = 0.9;
  add_master();
  ASSERT_TRUE(run_until([&] { return masters.front()->is_leader(); }));
  auto& standby = add_master();
  constexpr std::size_t object_bytes = 64 << 10;
  add_node("node-a", object_bytes);  // room for one object: a new put takes the old one's range
  auto writer = add_client("writer", object_bytes);
  kvx::testing::fill_random(writer.buffer, 11);
  ASSERT_FALSE(put_through_failover(writer, "old", writer.buffer));
  const std::vector<std::byte> old_bytes = writer.buffer;

  auto& slow = *slow_parties.emplace_back(std::make_unique<kvx::test::slow_store_party>(io, meta, "slow-reader", 3s));
  std::vector<std::byte> got(object_bytes);
  ASSERT_FALSE(wait([&]() -> asio::awaitable<std::error_code> {
    auto [e, d] = co_await slow.engine.async_register_memory(kvx::memory::memory_region{got.data(), got.size()},
                                                             "slow-reader/buf", asio::as_tuple(asio::use_awaitable));
    co_return e;
  }));
  kvx::store::store_client<kvx::test::slow_store_engine> reader(
      slow.engine, following_client(), kvx::store::client_options{.node = "slow-reader", .replicas = 1, .lease = std::chrono::hours(1)});
  std::optional<std::error_code> read;
  reader.async_get(kvx::store::object_key{"t", "old"}, got, [&](std::error_code ec, std::uint64_t) { read = ec; });
  kvx::store::clock::duration granted{};
  ASSERT_TRUE(run_until([&] {
    const auto listed = masters.front()->state()->objects("t", 1, kvx::store::clock::now());
    if (!listed.empty()) granted = listed[0].lease_left;
    return granted > kvx::store::clock::duration::zero();
  })) << "the slow get never took its lease";
  EXPECT_LE(granted, 4500ms) << "an hour was asked";

  masters.front().reset();  // dies while the read waits to start
  ASSERT_TRUE(run_until([&] { return standby.is_leader(); }, 5s));
  kvx::testing::fill_random(writer.buffer, 12);
  ASSERT_FALSE(put_through_failover(writer, "new", writer.buffer)) << "after the new leader's grace";
  ASSERT_TRUE(run_until([&] { return read.has_value(); })) << "the slow get never completed";
  if (!*read) {
    EXPECT_TRUE(std::equal(old_bytes.begin(), old_bytes.end(), got.begin()))
        << "the get succeeded with the bytes of an object the new leader put into its range";
  } else {
    EXPECT_EQ(*read, kvx::errc::timed_out) << read->message();
  }
}

TEST_F(MasterFailover, ResignHandsOverAtOnceAndNoLeaderIsUnreachable) {
  auto& a = add_master();
  ASSERT_TRUE(run_until([&] { return a.is_leader(); }));
  auto& b = add_master();
  auto follower = following_client();
  ASSERT_FALSE(call(*follower, {{"op", "stats"}}).first);
  EXPECT_EQ(follower->endpoint(), a.endpoint());

  auto [rec] = kvx::testing::run_op(io, [&](auto h) { a.async_resign(std::move(h)); });
  ASSERT_FALSE(rec) << rec.message();
  EXPECT_FALSE(a.is_leader()) << "serving stops when resigning, before etcd answers";
  ASSERT_TRUE(run_until([&] { return b.is_leader(); }, 2s)) << "within a few polls, not a TTL";
  EXPECT_GT(b.leader_revision(), 0);

  auto [ec, body] = call(*follower, {{"op", "stats"}});
  EXPECT_FALSE(ec) << ec.message() << body.dump();
  EXPECT_EQ(follower->endpoint(), b.endpoint()) << "the follower found the new leader";
  auto to_old = kvx::store::master_client::create(io.get_executor(), a.endpoint());
  EXPECT_EQ(call(*to_old, {{"op", "stats"}}).first, kvx::errc::stale) << "a resigned master stays a standby";
  run_for(300ms);
  EXPECT_FALSE(a.is_leader()) << "and does not campaign again";

  b.stop();  // nobody leads once its lease runs out
  const auto give_up = std::chrono::steady_clock::now() + 5s;
  for (;;) {
    std::tie(ec, body) = call(*follower, {{"op", "stats"}});
    if (ec == kvx::errc::unreachable && body.value("message", "").find("no master leads") != std::string::npos) break;
    ASSERT_LT(std::chrono::steady_clock::now(), give_up) << "last: " << ec.message() << " " << body.dump();
    run_for(100ms);
  }
}

TEST_F(MasterFailover, ALeaderThatCannotKeepItsLeaseAliveStopsServing) {
  auto& a = add_master();
  ASSERT_TRUE(run_until([&] { return a.is_leader(); }));
  auto direct = kvx::store::master_client::create(io.get_executor(), a.endpoint());
  ASSERT_FALSE(call(*direct, {{"op", "stats"}}).first);
  server_->pause();  // etcd hangs: no keep-alive succeeds, the lease is presumed expired after the TTL
  const bool stepped_down = run_until([&] { return !a.is_leader(); }, 4s);
  // Asked while etcd still hangs, so that it cannot have won again already
  // (once etcd is back it may lead again within a poll interval).
  const bool state_dropped = a.state() == nullptr;
  std::pair<std::error_code, json> first, second;
  if (stepped_down) {
    first = call(*direct, {{"op", "stats"}});
    second = call(*direct, {{"op", "stats"}});
  }
  server_->resume();
  ASSERT_TRUE(stepped_down) << "within the TTL (1 s) plus a keep-alive period";
  EXPECT_TRUE(state_dropped) << "its state is dropped";
  EXPECT_TRUE(first.first == kvx::errc::connection_lost || first.first == kvx::errc::stale)
      << first.first.message() << first.second.dump();
  EXPECT_EQ(second.first, kvx::errc::stale) << "a standby now: " << second.second.dump();
  ASSERT_TRUE(run_until([&] { return a.is_leader(); }, 5s)) << "with etcd back, it campaigns again and leads";
  auto [ec, body] = call(*direct, {{"op", "stats"}});
  EXPECT_FALSE(ec) << ec.message() << body.dump();
}

TEST_F(MasterFailover, LeadershipLostMidPutIsACleanErrorAndNothingHalfWrittenAppears) {
  auto& a = add_master();
  ASSERT_TRUE(run_until([&] { return a.is_leader(); }));
  auto& b = add_master(5s);
  auto follower = following_client();
  ASSERT_FALSE(call(*follower, {{"op", "register_segment"}, {"node", "n"}, {"segment", "s"}, {"capacity", 1 << 20}}).first);
  run_for(kvx::store::min_takeover_grace(config_, election_) + 50ms);  // a's takeover grace
  auto [ec, ticket] = call(*follower, {{"op", "put_start"}, {"tenant", "t"}, {"key", "k"}, {"size", 4096}});
  ASSERT_FALSE(ec) << ec.message() << ticket.dump();

  // A request the old leader has half received when it stops leading.
  asio::ip::tcp::socket raw(io);
  raw.connect({asio::ip::make_address("127.0.0.1"), static_cast<std::uint16_t>(std::stoi(a.endpoint().substr(a.endpoint().rfind(':') + 1)))});
  const auto frame = kvx::store::protocol::encode_frame({{"id", 1}, {"op", "stats"}});
  asio::write(raw, asio::buffer(frame.data(), frame.size() - 3));
  std::optional<boost::system::error_code> raw_result;
  std::array<char, 64> raw_buf;
  std::size_t raw_bytes = 0;
  asio::async_read(raw, asio::buffer(raw_buf), [&](boost::system::error_code e, std::size_t n) {
    raw_result = e;
    raw_bytes = n;
  });
  run_for(50ms);
  EXPECT_FALSE(raw_result);

  auto [rec] = kvx::testing::run_op(io, [&](auto h) { a.async_resign(std::move(h)); });
  ASSERT_FALSE(rec);
  ASSERT_TRUE(run_until([&] { return b.is_leader() && raw_result.has_value(); }, 3s));
  EXPECT_EQ(*raw_result, asio::error::eof) << "the old leader closed the session: " << raw_result->message();
  EXPECT_EQ(raw_bytes, 0u) << "without answering";

  // The writer's commit reaches the new leader, which never saw the put.
  std::tie(ec, ticket) = call(*follower, {{"op", "put_commit"}, {"tenant", "t"}, {"key", "k"}, {"put_id", ticket["put_id"]}});
  EXPECT_EQ(ec, kvx::errc::not_found) << ec.message() << ticket.dump();
  EXPECT_NE(ticket.value("message", "").find("no such pending put"), std::string::npos) << ticket.dump();
  auto [eec, exists] = call(*follower, {{"op", "exists"}, {"tenant", "t"}, {"key", "k"}});
  ASSERT_FALSE(eec);
  EXPECT_FALSE(exists["exists"]);
  auto [pec, refused] = call(*follower, {{"op", "put_start"}, {"tenant", "t"}, {"key", "k2"}, {"size", 4096}});
  EXPECT_EQ(pec, kvx::errc::busy) << "the new leader holds puts back while old writers may still write";
  EXPECT_NE(refused.value("message", "").find("puts resume in"), std::string::npos) << refused.dump();
}

TEST_F(MasterFailover, AMalformedLeaderValueIsAClearError) {
  kvx::store::etcd_election squatter(*etcd_, kvx::store::default_master_role, "not-an-endpoint",
                                     {.ttl = 1s, .poll_interval = 50ms});
  auto [cec] = kvx::testing::run_op(io, [&](auto h) { squatter.async_campaign(std::move(h)); });
  ASSERT_FALSE(cec) << cec.message();
  auto follower = following_client();
  auto [ec, body] = call(*follower, {{"op", "stats"}});
  EXPECT_EQ(ec, kvx::errc::malformed_message) << ec.message();
  EXPECT_NE(body.value("message", "").find("'not-an-endpoint' is not host:port"), std::string::npos) << body.dump();
}

TEST(MasterLookup, ValuesThatAreNotHostAndPortAreRefusedByName) {
  for (const char* bad : {"", "host-only", ":7700", "h:", "h:0", "h:65536", "h:12ab", "h:-1"}) {
    asio::io_context io;
    auto client = kvx::store::master_client::create(
        io.get_executor(),
        kvx::store::master_client::endpoint_lookup([&](asio::any_completion_handler<void(std::error_code, std::string)> h) {
          kvx::detail::post_completion(io.get_executor(), std::move(h), std::error_code{}, std::string(bad));
        }));
    auto [ec, body] = kvx::testing::run_op<json>(io, [&](auto h) { client->async_call({{"op", "stats"}}, std::move(h)); });
    EXPECT_EQ(ec, kvx::errc::malformed_message) << "'" << bad << "': " << ec.message();
    EXPECT_NE(body.value("message", "").find(std::string("'") + bad + "' is not host:port"), std::string::npos) << body.dump();
  }
  EXPECT_TRUE(kvx::store::split_master_endpoint("127.0.0.1:7700", "x"));
  EXPECT_TRUE(kvx::store::split_master_endpoint("master.local:1", "x"));
}

TEST(MasterLookup, NoLeaderIsUnreachableAndTheNextCallLooksAgain) {
  asio::io_context io;
  int lookups = 0;
  auto client = kvx::store::master_client::create(
      io.get_executor(),
      kvx::store::master_client::endpoint_lookup([&](asio::any_completion_handler<void(std::error_code, std::string)> h) {
        ++lookups;
        kvx::detail::post_completion(io.get_executor(), std::move(h), make_error_code(kvx::errc::not_found), std::string());
      }));
  for (int i = 1; i <= 2; ++i) {
    auto [ec, body] = kvx::testing::run_op<json>(io, [&](auto h) { client->async_call({{"op", "stats"}}, std::move(h)); });
    EXPECT_EQ(ec, kvx::errc::unreachable);
    EXPECT_NE(body.value("message", "").find("no master leads"), std::string::npos) << body.dump();
    EXPECT_EQ(lookups, i);
  }
}

TEST_F(MasterFailover, AnAdvertisedEndpointThatIsNotHostAndPortIsRefusedAtStart) {
  master_type m(*etcd_, {.advertise = "nowhere"});
  auto started = m.start();
  ASSERT_FALSE(started);
  EXPECT_EQ(started.error().code(), kvx::errc::invalid_argument);
  EXPECT_NE(started.error().message().find("elected_master_config.advertise 'nowhere'"), std::string::npos)
      << started.error().message();
}

// Without etcd: start() refuses before it listens or campaigns.
TEST(ElectedMasterConfig, ATakeoverGraceShorterThanTheLongestLeaseIsRefusedAtStart) {
  asio::io_context io;
  kvx::store::etcd_metadata etcd(io.get_executor(), {.address = "127.0.0.1:1", .prefix = "unused/", .timeout = 1s});
  kvx::metrics::registry registry;
  kvx::store::master_config config;
  config.max_read_lease = 10s;  // the longest lease: put_lease and replication_timeout are 30 s
  const kvx::store::etcd_election_options election{.ttl = 3s, .poll_interval = 50ms};
  EXPECT_EQ(kvx::store::min_takeover_grace(config, election), 31s) << "30 s and a keep-alive period of 1 s";
  auto factory = [&] { return std::make_unique<state_type>(config, kvx::store::placement::random_with_capacity{}, registry); };

  master_type short_grace(etcd, {.election = election, .takeover_grace = 30s}, factory);
  auto refused = short_grace.start();
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.error().code(), kvx::errc::invalid_argument);
  EXPECT_NE(refused.error().message().find("takeover_grace: 30000 ms is shorter than the longest lease the state grants "
                                           "plus the election's keep-alive period (31000 ms)"),
            std::string::npos)
      << refused.error().message();

  config.max_read_lease = 1s;  // below read_lease: the state itself refuses it
  master_type bad_state(etcd, {.election = election}, factory);
  refused = bad_state.start();
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.error().code(), kvx::errc::invalid_argument);
  EXPECT_NE(refused.error().message().find("max_read_lease (1000 ms) is shorter than read_lease"), std::string::npos)
      << refused.error().message();
}

// Calls from another thread while the io_context runs on two: the client,
// the masters' strands and the election cross threads (the TSan build checks).
TEST_F(MasterFailover, CallsFromAnotherThreadAcrossAResignationAllEndCleanly) {
  auto& a = add_master();
  ASSERT_TRUE(run_until([&] { return a.is_leader(); }));
  auto& b = add_master();
  auto follower = following_client();
  io.restart();
  auto guard = asio::make_work_guard(io);
  std::thread t1([&] { io.run(); });
  std::thread t2([&] { io.run(); });
  int ok_before = 0, ok_after = 0;
  std::vector<std::error_code> failures;
  std::promise<std::error_code> resign_done;
  std::future<std::error_code> resigned;
  const auto give_up = std::chrono::steady_clock::now() + 8s;
  while (ok_after < 5 && std::chrono::steady_clock::now() < give_up) {
    std::promise<std::pair<std::error_code, json>> answered;
    follower->async_call(kvx::store::protocol::make_request("stats"),
                         [&answered](std::error_code e, json b) { answered.set_value({e, std::move(b)}); });
    auto [ec, body] = answered.get_future().get();
    if (!ec && body.contains("nodes")) {
      if (b.is_leader() && follower->endpoint() == b.endpoint())
        ++ok_after;
      else
        ++ok_before;
    } else if (ec) {
      failures.push_back(ec);
      std::this_thread::sleep_for(20ms);
    }
    if (ok_before == 5 && !resigned.valid()) {
      resigned = resign_done.get_future();
      a.async_resign([&resign_done](std::error_code e) { resign_done.set_value(e); });
    }
  }
  const bool resign_completed = resigned.valid() && resigned.wait_for(5s) == std::future_status::ready;
  guard.reset();
  io.stop();
  t1.join();
  t2.join();
  EXPECT_EQ(ok_before, 5);
  EXPECT_EQ(ok_after, 5) << "the new leader answers";
  ASSERT_TRUE(resign_completed);
  EXPECT_FALSE(resigned.get());
  for (auto e : failures)
    EXPECT_TRUE(e == kvx::errc::connection_lost || e == kvx::errc::stale || e == kvx::errc::unreachable) << e.message();
}

}  // namespace
