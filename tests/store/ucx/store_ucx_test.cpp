// The store over kvx::transport::ucx across processes: this process runs the
// master, an http_metadata_server over its embedded metadata, and the store
// clients (each its own engine and UCX worker); each node is a process of its
// own (tests/tools/ucx_store_node.cpp) that publishes its segment through the
// metadata server. UCX is forced onto transports that work on loopback.
#include <kvx/core/async.hpp>
#include <kvx/store/master_server.hpp>
#include <kvx/store/store_client.hpp>
#include <kvx/transfer/embedded_metadata.hpp>
#include <kvx/transfer/http_metadata_server.hpp>
#include <kvx/transfer/transfer_engine.hpp>
#include <kvx/transport/ucx.hpp>

#include <gtest/gtest.h>

#include <signal.h>

#include <boost/asio/io_context.hpp>

#include <algorithm>
#include <chrono>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <kvx/cache/eviction/lru.hpp>
#include <kvx/memory/mapped_arena.hpp>
#include <kvx/testing/random_bytes.hpp>

#include "support/child_process.hpp"
#include "support/run_until.hpp"

// TSan cannot see UCX's acknowledgements through uninstrumented memory; see
// tests/transport/ucx/ucx_tsan.supp for why these UCX-internal copies are suppressed.
extern "C" const char* __tsan_default_suppressions();
extern "C" const char* __tsan_default_suppressions() {
  return "race:ucp_put_handler\nrace:ucp_get_req_handler\nrace:ucp_rma_sw_do_am_bcopy\n";
}
// UCX's own leak on force-closed shared-memory endpoints (tests/transport/ucx/ucx_lsan.supp).
extern "C" const char* __lsan_default_suppressions();
extern "C" const char* __lsan_default_suppressions() { return "leak:libuct.so\n"; }

namespace {

namespace asio = boost::asio;
using namespace std::chrono_literals;
using engine_type = kvx::transfer::transfer_engine<kvx::transfer::embedded_metadata, kvx::transport::ucx>;
// Locality placement: a put's first replica lands on its preferred node, so a
// test knows which node to kill.
using state_type = kvx::store::master_state<kvx::cache::eviction::lru, kvx::store::placement::locality_aware>;

struct store_over_ucx {
  std::string tls;
  //! The clients' per-batch deadline (engine_options::deadline); none by default.
  std::optional<std::chrono::steady_clock::duration> transfer_deadline;
  asio::io_context io;
  kvx::metrics::registry registry;
  kvx::store::master_config config = [] {
    kvx::store::master_config c;
    c.node_timeout = 1000ms;
    return c;
  }();
  state_type state{config, {}, registry};
  kvx::store::master_server<state_type> server{io.get_executor(), state, {.address = "127.0.0.1", .port = 0, .tick_interval = 50ms}};
  kvx::transfer::embedded_metadata meta{io.get_executor()};
  kvx::transfer::http_metadata_server<kvx::transfer::embedded_metadata> meta_server{io.get_executor(), meta};
  std::map<std::string, std::unique_ptr<kvx::test::child_process>> nodes;

  struct client {
    kvx::transport::ucx transport;
    engine_type engine;
    kvx::memory::mapped_arena buffer;
    std::unique_ptr<kvx::store::store_client<engine_type>> store;
    client(store_over_ucx& f, const std::string& name, std::size_t bytes)
        : transport(f.io.get_executor(), {.tls = f.tls}),
          engine(f.meta, {.node = name, .deadline = f.transfer_deadline}, transport),
          buffer(std::move(*kvx::memory::mapped_arena::create(bytes))) {}
    [[nodiscard]] std::span<std::byte> bytes() const { return buffer.region().bytes(); }
  };
  std::vector<std::unique_ptr<client>> clients;

  explicit store_over_ucx(std::string t) : tls(std::move(t)) {
    if (auto s = server.start(); !s) throw std::runtime_error(s.error().message());
    if (auto s = meta_server.start(); !s) throw std::runtime_error(s.error().message());
  }
  ~store_over_ucx() {
    nodes.clear();  // killed and reaped
    clients.clear();
    meta_server.stop();
    server.stop();
    io.restart();
    io.run_for(50ms);
  }

  // Runs the io_context until `done()` or `limit` passes; false then.
  template <class Done>
  bool run_until(Done done, std::chrono::milliseconds limit = 15s) {
    return kvx::test::run_until(io, done, limit);
  }

  // A node process; registered (with the master and the metadata) once it prints its line.
  void start_node(const std::string& name, std::size_t bytes = 8u << 20) {
    auto child = std::make_unique<kvx::test::child_process>(
        kvx::test::child_process::tool("ucx_store_node"),
        std::vector<std::string>{server.endpoint(), meta_server.url(), name, std::to_string(bytes), tls});
    std::optional<std::string> line;
    // The node needs this process's master and metadata server to answer while it starts
    // (read_line's timeout is whole milliseconds: 1 ms would return before polling).
    ASSERT_TRUE(run_until([&] { return (line = child->read_line(5ms)).has_value(); }, 30s)) << "node " << name << " printed nothing";
    ASSERT_EQ(nlohmann::json::parse(*line)["node"], name) << *line;
    nodes[name] = std::move(child);
  }

  client& add_client(const std::string& name, std::size_t bytes) {
    auto& c = *clients.emplace_back(std::make_unique<client>(*this, name, bytes));
    std::optional<std::error_code> registered;
    c.engine.async_register_memory(c.buffer.region(), name + "/buf", [&](std::error_code ec, auto&&) { registered = ec; });
    EXPECT_TRUE(run_until([&] { return registered.has_value(); }));
    EXPECT_FALSE(registered.value_or(kvx::errc::timed_out)) << registered.value_or(kvx::errc::timed_out).message();
    c.store = std::make_unique<kvx::store::store_client<engine_type>>(
        c.engine, kvx::store::master_client::create(io.get_executor(), server.endpoint()),
        kvx::store::client_options{.node = name, .replicas = 1, .lease = 2000ms});
    return c;
  }

  std::error_code put(client& c, const std::string& key, std::span<const std::byte> bytes, unsigned replicas,
                      const std::string& preferred) {
    std::optional<std::error_code> out;
    kvx::store::put_options o;
    o.replicas = replicas;
    o.preferred_node = preferred;
    c.store->async_put({"t", key}, bytes, o, [&](std::error_code ec) { out = ec; });
    EXPECT_TRUE(run_until([&] { return out.has_value(); })) << "put '" << key << "' hung";
    return out.value_or(kvx::errc::timed_out);
  }

  struct get_result {
    std::optional<std::error_code> ec;
    std::uint64_t size = 0;
  };
  // Starts a get; `r` is set when it completes.
  void start_get(client& c, const std::string& key, std::span<std::byte> dst, get_result& r) {
    c.store->async_get({"t", key}, dst, [&r](std::error_code ec, std::uint64_t n) {
      r.ec = ec;
      r.size = n;
    });
  }
  get_result get(client& c, const std::string& key, std::span<std::byte> dst) {
    get_result r;
    start_get(c, key, dst, r);
    EXPECT_TRUE(run_until([&] { return r.ec.has_value(); })) << "get '" << key << "' hung";
    return r;
  }

  std::vector<std::string> replica_nodes(const std::string& key) {
    std::vector<std::string> out;
    for (const auto& o : state.objects("t", 1000, kvx::store::clock::now()))
      if (o.key.key == key)
        for (const auto& r : o.replicas) out.push_back(r.node);
    return out;
  }
};

struct StoreOverUcx : ::testing::TestWithParam<std::string> {};

TEST_P(StoreOverUcx, PutAndGetAreByteExactBetweenProcesses) {
  store_over_ucx f(GetParam());
  ASSERT_NO_FATAL_FAILURE(f.start_node("n0"));
  ASSERT_NO_FATAL_FAILURE(f.start_node("n1"));
  auto& writer = f.add_client("writer", 4u << 20);
  auto& reader = f.add_client("reader", 4u << 20);  // another engine and UCX worker
  // One byte, an odd size, and more than three 1 MiB slices.
  const std::vector<std::pair<std::string, std::size_t>> objects{{"one-byte", 1}, {"odd", 100'003}, {"big", (3u << 20) + 5}};
  std::uint64_t seed = 100;
  for (const auto& [key, size] : objects) {
    auto src = writer.bytes().first(size);
    kvx::testing::fill_random(src, ++seed);
    ASSERT_FALSE(f.put(writer, key, src, 2, "")) << key;
    const auto where = f.replica_nodes(key);
    ASSERT_EQ(where.size(), 2u) << key;
    EXPECT_NE(where[0], where[1]) << "replicas on distinct nodes";
  }
  seed = 100;
  std::vector<std::byte> expected;
  for (const auto& [key, size] : objects) {
    std::fill(reader.bytes().begin(), reader.bytes().end(), std::byte{0xee});
    auto r = f.get(reader, key, reader.bytes());
    ASSERT_FALSE(r.ec.value_or(kvx::errc::timed_out)) << key << ": " << r.ec.value_or(kvx::errc::timed_out).message();
    ASSERT_EQ(r.size, size);
    expected.resize(size);
    kvx::testing::fill_random(expected, ++seed);
    EXPECT_EQ(kvx::testing::first_difference(reader.bytes().first(size), expected), "") << key;
  }
  // Every replica holds the bytes: each node's copy read on its own.
  for (const auto& o : f.state.objects("t", 1000, kvx::store::clock::now())) {
    if (o.key.key != "big") continue;
    for (const auto& rep : o.replicas) {
      std::fill(reader.bytes().begin(), reader.bytes().end(), std::byte{0});
      kvx::transfer::batch b;
      b.read(reader.bytes().first(o.size), rep.segment, rep.offset);
      std::optional<std::error_code> ec;
      reader.engine.async_transfer(std::move(b), [&](std::error_code e, auto&&) { ec = e; });
      ASSERT_TRUE(f.run_until([&] { return ec.has_value(); }));
      ASSERT_FALSE(*ec) << rep.node << ": " << ec->message();
      EXPECT_EQ(kvx::testing::first_difference(reader.bytes().first(o.size), expected), "") << "replica on " << rep.node;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Tls, StoreOverUcx, ::testing::Values("tcp", "posix"),
                         [](const auto& info) { return info.param; });

// UCX over tcp reports a dead peer (error mode PEER): no deadline is needed.
// UCX 1.13's posix/sysv cannot, and there only a deadline ends an operation to
// a dead node (kvx-store's transfer_timeout_ms): the clients get one of 2 s.
struct StoreOverUcxNodeDeath : ::testing::TestWithParam<std::string> {};

TEST_P(StoreOverUcxNodeDeath, ANodeKilledMidGetIsAnErrorNotAHangAndItsReplicasAreCopiedAgain) {
  store_over_ucx f(GetParam());
  if (GetParam() != "tcp") f.transfer_deadline = 2s;
  for (auto n : {"n0", "n1", "n2"}) ASSERT_NO_FATAL_FAILURE(f.start_node(n));
  auto& writer = f.add_client("writer", 4u << 20);
  auto& reader = f.add_client("reader", 8u << 20);
  const std::size_t size = 2u << 20;
  auto src = writer.bytes().first(size);
  kvx::testing::fill_random(src, 7);
  ASSERT_FALSE(f.put(writer, "kept", src, 2, "n0"));  // on n0 and another
  ASSERT_FALSE(f.put(writer, "only", src, 1, "n0"));  // on n0 alone
  const auto kept_on = f.replica_nodes("kept");
  ASSERT_EQ(kept_on.size(), 2u);
  ASSERT_NE(std::find(kept_on.begin(), kept_on.end(), "n0"), kept_on.end());
  ASSERT_EQ(f.replica_nodes("only"), std::vector<std::string>{"n0"});

  // n0 freezes with both gets in flight, then dies.
  f.nodes.at("n0")->kill(SIGSTOP);
  store_over_ucx::get_result kept, only;
  f.start_get(reader, "kept", reader.bytes().first(size), kept);
  f.start_get(reader, "only", reader.bytes().subspan(4u << 20, size), only);
  f.run_until([] { return false; }, 300ms);
  EXPECT_FALSE(only.ec.has_value()) << "a get from a frozen node completed: " << only.ec->message();
  // The caller's own deadline ends a get: it does not move on to "kept"'s
  // other replica (n0, the preferred node, is tried first) as the engine's
  // batch deadline would.
  store_over_ucx::get_result bounded;
  reader.store->async_get({"t", "kept"}, reader.bytes().subspan(2u << 20, size),
                          kvx::cancel_after(f.io.get_executor(), 250ms, [&bounded](std::error_code ec, std::uint64_t n) {
                            bounded.ec = ec;
                            bounded.size = n;
                          }));
  ASSERT_TRUE(f.run_until([&] { return bounded.ec.has_value(); }, 10s));
  EXPECT_TRUE(*bounded.ec == kvx::errc::timed_out || *bounded.ec == kvx::errc::cancelled) << bounded.ec->message();
  f.nodes.at("n0")->kill(SIGKILL);
  f.nodes.at("n0")->wait();
  const auto killed = std::chrono::steady_clock::now();
  ASSERT_TRUE(f.run_until([&] { return kept.ec.has_value() && only.ec.has_value(); }, 20s)) << "a get hung after its node died";
  EXPECT_LT(std::chrono::steady_clock::now() - killed, 10s);
  // The object with another replica is served by it; the one only n0 held is an error.
  ASSERT_FALSE(*kept.ec) << kept.ec->message();
  EXPECT_EQ(kvx::testing::first_difference(reader.bytes().first(size), src), "");
  ASSERT_TRUE(*only.ec);
  const bool expected = *only.ec == kvx::errc::connection_lost || *only.ec == kvx::errc::unreachable ||
                        *only.ec == kvx::errc::io_error || *only.ec == kvx::errc::timed_out;
  EXPECT_TRUE(expected) << only.ec->message();

  // The master drops n0; the survivor copies "kept" to n2 (node to node over UCX); "only" is lost.
  ASSERT_TRUE(f.run_until([&] {
    const auto on = f.replica_nodes("kept");
    return on.size() == 2u && std::find(on.begin(), on.end(), "n0") == on.end();
  })) << "kept was not copied again";
  EXPECT_TRUE(f.replica_nodes("only").empty());
  auto lost = f.get(reader, "only", reader.bytes());
  EXPECT_EQ(lost.ec.value_or(kvx::errc::timed_out), kvx::errc::not_found);
  // Both replicas of "kept" now hold its bytes: read each one.
  for (const auto& o : f.state.objects("t", 1000, kvx::store::clock::now())) {
    if (o.key.key != "kept") continue;
    for (const auto& rep : o.replicas) {
      std::fill(reader.bytes().begin(), reader.bytes().end(), std::byte{0});
      kvx::transfer::batch b;
      b.read(reader.bytes().first(size), rep.segment, rep.offset);
      std::optional<std::error_code> ec;
      reader.engine.async_transfer(std::move(b), [&](std::error_code e, auto&&) { ec = e; });
      ASSERT_TRUE(f.run_until([&] { return ec.has_value(); }));
      ASSERT_FALSE(*ec) << rep.node << ": " << ec->message();
      EXPECT_EQ(kvx::testing::first_difference(reader.bytes().first(size), src), "") << "replica on " << rep.node;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Tls, StoreOverUcxNodeDeath, ::testing::Values("tcp", "posix"),
                         [](const auto& info) { return info.param; });

}  // namespace
