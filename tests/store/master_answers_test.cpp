// Nodes and clients facing a master that answers wrongly. A node logs and
// skips every malformed answer (register_segment, heartbeat tasks and ledger
// changes), keeps heartbeating, and no task makes it read outside its
// segment; a client's call ends with `protocol_error` (not an exception's
// `internal`), and a get still releases its lease. The master here is a fake
// speaking the wire format.
#include <kvx/store/store_client.hpp>
#include <kvx/store/store_node.hpp>

#include <gtest/gtest.h>

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/write.hpp>

#include <kvx/memory/mapped_arena.hpp>
#include <kvx/store/protocol.hpp>

#include <array>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "support/accept_each.hpp"
#include "support/run_until.hpp"
#include "support/store_parties.hpp"

namespace {

namespace asio = boost::asio;
using json = nlohmann::json;
using namespace std::chrono_literals;

// Answers every request with `ok`, merged with the next scripted answer for
// its op (in order; plain `ok` once they run out), and counts what came.
struct scripted_master {
  asio::ip::tcp::acceptor acceptor;
  std::map<std::string, std::vector<json>> script;  // op -> answers, in order
  std::map<std::string, std::size_t> seen;          // op -> requests received

  explicit scripted_master(asio::io_context& io) : acceptor(io, {asio::ip::make_address("127.0.0.1"), 0}) {
    asio::co_spawn(io, kvx::test::accept_each(acceptor, [this](asio::ip::tcp::socket s) { return serve(std::move(s)); }),
                   asio::detached);
  }
  [[nodiscard]] std::string endpoint() const { return "127.0.0.1:" + std::to_string(acceptor.local_endpoint().port()); }


  asio::awaitable<void> serve(asio::ip::tcp::socket socket) {
    kvx::store::protocol::frame_decoder decoder;
    std::array<char, 64 * 1024> buf;
    for (;;) {
      auto [ec, n] = co_await socket.async_read_some(asio::buffer(buf), asio::as_tuple(asio::use_awaitable));
      if (ec) co_return;
      decoder.feed(std::string_view(buf.data(), n));
      for (auto frame = decoder.next(); frame && *frame; frame = decoder.next()) {
        const auto request = json::parse(**frame);
        const auto op = request.value("op", std::string());
        json answer{{"id", request["id"]}, {"ok", true}};
        auto& answers = script[op];
        if (const auto i = seen[op]++; i < answers.size()) answer.update(answers[i]);
        if (request.value("reply", true)) {
          auto [wec, w] = co_await asio::async_write(socket, asio::buffer(kvx::store::protocol::encode_frame(answer)),
                                                     asio::as_tuple(asio::use_awaitable));
          if (wec) co_return;
        }
      }
    }
  }
};

json replica(const std::string& segment, std::uint64_t offset, std::uint64_t size) {
  return {{"node", "n"}, {"segment", segment}, {"offset", offset}, {"size", size}};
}

json task(json source) {
  return {{"tenant", "t"}, {"key", "k"}, {"put_id", 1u}, {"source", std::move(source)}, {"target", replica("other/pool", 0u, 4096u)}};
}

TEST(StoreNode, MalformedMasterAnswersAreSkippedAndTheNodeHeartbeatsOn) {
  asio::io_context io;
  scripted_master master(io);
  constexpr std::uint64_t capacity = 1u << 20;
  auto malformed_task = task(replica("node-x/pool", 0u, 64u));
  malformed_task["tenant"] = 5;
  master.script["register_segment"] = {json{{"recover_after_ms", "soon"}}};
  master.script["heartbeat"] = {
      json{{"tasks", "not an array"}},
      json{{"tasks", json::array({42, malformed_task, json{{"tenant", "t"}, {"key", "k"}, {"put_id", 1u}}})}},
      // Past the segment's end, and wrapping around 2^64: neither may be read.
      json{{"tasks", json::array({task(replica("node-x/pool", capacity - 16, 4096u)),
                                  task(replica("node-x/pool", 4096u, ~std::uint64_t{0} - 100))})}},
      json{{"tasks", json::array({task(replica("someone-else/pool", 0u, 64u))})}},
      json{{"ledger", "not an array"}},
      json{{"ledger", json::array({json{{"seq", "one"}}})}},
  };
  const auto scripted = master.script["heartbeat"].size();

  kvx::transfer::embedded_metadata meta{io.get_executor()};
  kvx::test::store_party party(io, meta, "node-x");
  auto arena = kvx::memory::mapped_arena::create(capacity);
  ASSERT_TRUE(arena);
  kvx::store::store_node<kvx::test::store_engine> node(
      party.engine, kvx::store::master_client::create(io.get_executor(), master.endpoint()),
      {.name = "node-x", .segment = "", .tier = "dram", .host = "", .heartbeat = 10ms});
  const auto ec = kvx::test::run_coroutine(io, [&]() -> asio::awaitable<std::error_code> {
    auto [e] = co_await node.async_start(arena->region(), asio::as_tuple(asio::use_awaitable));
    co_return e;
  });
  ASSERT_FALSE(ec) << ec.message();
  // Every scripted answer, then three plain ones: the loop outlived them all.
  EXPECT_TRUE(kvx::test::run_until(io, [&] { return master.seen["heartbeat"] >= scripted + 3; }, 10s))
      << "the node stopped heartbeating after " << master.seen["heartbeat"] << " answers";
  EXPECT_EQ(master.seen["replication_done"], 0u);
  EXPECT_EQ(node.replications_done(), 0u);
  EXPECT_EQ(node.reregistrations(), 0u);
  node.stop();
  io.restart();
  io.run_for(50ms);
}

TEST(StoreClient, MalformedMasterAnswersEndTheCallWithProtocolErrorAndAGetStillReleases) {
  asio::io_context io;
  scripted_master master(io);
  master.script["exists"] = {json{{"exists", "yes"}}};
  master.script["longest_prefix"] = {json{{"count", "three"}}};
  master.script["put_start"] = {json{{"put_id", "seven"}, {"replicas", json::array()}},
                                json{{"put_id", 1u}, {"replicas", "none"}},
                                json{{"put_id", 1u}, {"replicas", json::array()}, {"checksum", "yes"}}};
  master.script["get"] = {json{{"size", "big"}, {"replicas", json::array()}},
                          json{{"size", 10u}, {"replicas", json::array({json{{"node", 5}}})}}};
  kvx::transfer::embedded_metadata meta{io.get_executor()};
  kvx::test::store_party party(io, meta, "client-x");
  kvx::store::store_client<kvx::test::store_engine> client(
      party.engine, kvx::store::master_client::create(io.get_executor(), master.endpoint()),
      kvx::store::client_options{.node = "client-x", .replicas = 1, .lease = 1000ms});
  const kvx::store::object_key key{"t", "k"};
  std::vector<std::byte> bytes(64);

  auto exists = kvx::test::run_coroutine(io, [&]() -> asio::awaitable<std::error_code> {
    auto [e, found] = co_await client.async_exists(key, asio::as_tuple(asio::use_awaitable));
    co_return e;
  });
  EXPECT_EQ(exists, kvx::errc::protocol_error) << exists.message();
  // Built outside the coroutine: g++ 12 rejects an initializer list inside a co_await expression.
  const std::vector<std::string> keys{"a", "b"};
  auto prefix = kvx::test::run_coroutine(io, [&]() -> asio::awaitable<std::error_code> {
    auto [e, n] = co_await client.async_longest_prefix(key.tenant, keys, asio::as_tuple(asio::use_awaitable));
    co_return e;
  });
  EXPECT_EQ(prefix, kvx::errc::protocol_error) << prefix.message();
  for (int i = 0; i < 3; ++i) {
    auto put = kvx::test::run_coroutine(io, [&]() -> asio::awaitable<std::error_code> {
      auto [e] = co_await client.async_put(key, bytes, asio::as_tuple(asio::use_awaitable));
      co_return e;
    });
    EXPECT_EQ(put, kvx::errc::protocol_error) << "put_start answer " << i << ": " << put.message();
  }
  EXPECT_EQ(master.seen["put_commit"], 0u);
  for (int i = 0; i < 2; ++i) {
    auto get = kvx::test::run_coroutine(io, [&]() -> asio::awaitable<std::error_code> {
      auto [e, n] = co_await client.async_get(key, bytes, asio::as_tuple(asio::use_awaitable));
      co_return e;
    });
    EXPECT_EQ(get, kvx::errc::protocol_error) << "get answer " << i << ": " << get.message();
  }
  // The releases are notifications: they leave with the next write or the linger timer.
  EXPECT_TRUE(kvx::test::run_until(io, [&] { return master.seen["release"] == 2; }, 5s)) << master.seen["release"];
}

// An error answer whose fields have the wrong type used to throw inside the
// client's read loop, which ended silently: every call then hung.
TEST(MasterClientAnswers, AnErrorAnswerOfTheWrongShapeIsProtocolErrorNotAHang) {
  asio::io_context io;
  scripted_master master(io);
  master.script["stats"] = {json{{"ok", false}, {"error", 5}}, json{{"ok", false}, {"error", "not_found"}, {"message", 7}},
                            json{{"ok", false}}};
  auto client = kvx::store::master_client::create(io.get_executor(), master.endpoint());
  for (auto expected : {kvx::errc::protocol_error, kvx::errc::not_found, kvx::errc::internal}) {
    std::optional<std::error_code> out;
    client->async_call({{"op", "stats"}}, [&](std::error_code ec, json) { out = ec; });
    ASSERT_TRUE(kvx::test::run_until(io, [&] { return out.has_value(); }, 5s)) << "the call hung";
    EXPECT_EQ(*out, expected) << out->message();
  }
}

TEST(StoreProtocol, AReplicationTaskRoundTripsAndEachMissingOrWrongFieldIsNamed) {
  const auto now = kvx::store::clock::now();
  const kvx::store::replication_task t{{"tenant", "key"}, {"a", "a/pool", 10, 20}, {"b", "b/pool", 30, 20}, 7, now + 3s};
  const auto asked = now - 1s;  // the node's heartbeat went out before the master answered
  auto back = kvx::store::protocol::replication_task_from_json(kvx::store::protocol::to_json(t, now), "task", asked);
  ASSERT_TRUE(back) << back.error().message();
  EXPECT_EQ(back->key, t.key);
  EXPECT_EQ(back->source, t.source);
  EXPECT_EQ(back->target, t.target);
  EXPECT_EQ(back->put_id, 7u);
  // The time left counts from when the node asked: never after the master's deadline.
  EXPECT_EQ(back->deadline, asked + 3s);
  auto no_deadline = t;
  no_deadline.deadline = {};
  EXPECT_FALSE(kvx::store::protocol::to_json(no_deadline, now).contains("deadline_ms"));
  back = kvx::store::protocol::replication_task_from_json(kvx::store::protocol::to_json(no_deadline, now), "task", asked);
  ASSERT_TRUE(back) << back.error().message();
  EXPECT_EQ(back->deadline, kvx::store::clock::time_point{}) << "a task without deadline_ms (an older master) has none";
  // A copy already past its deadline has no time left, not a time before it was asked.
  back = kvx::store::protocol::replication_task_from_json(kvx::store::protocol::to_json(t, now + 10s), "task", asked);
  ASSERT_TRUE(back) << back.error().message();
  EXPECT_EQ(back->deadline, asked);

  auto named = [](json j, const std::string& field) {
    auto r = kvx::store::protocol::replication_task_from_json(j, "heartbeat.tasks[0]");
    ASSERT_FALSE(r) << j.dump();
    // Shape errors are malformed_message; a field's wrong value, invalid_argument (config::view's).
    EXPECT_TRUE(r.code() == kvx::errc::malformed_message || r.code() == kvx::errc::invalid_argument) << r.code().message();
    EXPECT_NE(r.error().context().find(field), std::string::npos) << r.error().context();
  };
  named(json(42), "heartbeat.tasks[0]");
  auto j = kvx::store::protocol::to_json(t, now);
  for (const char* f : {"tenant", "key", "put_id", "source", "target"}) {
    auto missing = j;
    missing.erase(f);
    named(missing, f);
  }
  auto bad = j;
  bad["put_id"] = "seven";
  named(bad, "put_id");
  bad = j;
  bad["source"]["offset"] = -1;
  named(bad, "source.offset");
  bad = j;
  bad["target"] = "b/pool";
  named(bad, "target");
  bad = j;
  bad["deadline_ms"] = "soon";
  named(bad, "deadline_ms");
  bad = j;
  bad["deadline_ms"] = std::uint64_t{1} << 62;  // would overflow the node's clock
  named(bad, "deadline_ms");
}

}  // namespace
