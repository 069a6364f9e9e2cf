// Transfers that outlast the master's deadline for them. Past a put's lease,
// a read lease or a copy's deadline the master gives the range to another
// object, so a writer, reader or copying node still moving bytes would
// corrupt that object or read it as its own. Each party here has a transport
// that starts every transfer seconds late (a stalled link, an overloaded
// node) against leases of a fraction of a second; and a writer that knows
// its write takes that long asks for a longer put lease.
#include <kvx/store/master_server.hpp>
#include <kvx/store/store_client.hpp>
#include <kvx/store/store_node.hpp>

#include <gtest/gtest.h>

#include <boost/asio/io_context.hpp>

#include <kvx/cache/eviction/lru.hpp>
#include <kvx/memory/mapped_arena.hpp>
#include <kvx/testing/random_bytes.hpp>
#include <kvx/transfer/embedded_metadata.hpp>
#include <kvx/transfer/transfer_engine.hpp>
#include <kvx/transport/local.hpp>

#include <algorithm>
#include <memory>
#include <optional>

#include "support/store_cluster.hpp"

namespace {

namespace asio = boost::asio;
using namespace std::chrono_literals;
using state_type = kvx::store::master_state<kvx::cache::eviction::lru>;
using slow_engine = kvx::test::slow_store_engine;
using slow_party = kvx::test::slow_store_party;
using fast_engine = kvx::test::store_engine;
using kvx::testing::fill_random;

constexpr std::size_t object_bytes = 64 << 10;

kvx::store::master_config lease_bounds_config() {
  kvx::store::master_config c;
  c.put_lease = 600ms;
  c.read_lease = 600ms;  // also the longest a get is granted (no max_read_lease)
  c.node_timeout = 1000ms;  // 50 ms heartbeats: a loaded 2-core CI host stalls a node past 400 ms at times
  c.replication_timeout = 1500ms;
  c.high_watermark = 1.0;  // a full node keeps its one object
  c.low_watermark = 0.9;
  return c;
}

struct StoreLeaseBounds : ::testing::Test, kvx::test::store_cluster<state_type> {
  explicit StoreLeaseBounds(kvx::store::master_config c = lease_bounds_config()) : store_cluster(std::move(c)) {}
  std::vector<std::unique_ptr<kvx::test::store_party>> parties;
  std::vector<std::unique_ptr<slow_party>> slow_parties;
  std::vector<kvx::memory::mapped_arena> arenas;
  std::vector<std::unique_ptr<kvx::store::store_node<fast_engine>>> nodes;
  std::vector<std::unique_ptr<kvx::store::store_node<slow_engine>>> slow_nodes;
  std::vector<std::vector<std::byte>> buffers;

  void SetUp() override { ASSERT_TRUE(server.start()); }
  void TearDown() override {
    for (auto& n : nodes) n->stop();
    for (auto& n : slow_nodes) n->stop();
    stop_master();
  }
  // Runs the io_context until `done()` (false after `limit`).
  template <class Pred>
  bool run_until(Pred done, std::chrono::milliseconds limit = 10s) {
    const auto give_up = std::chrono::steady_clock::now() + limit;
    io.restart();
    while (!done()) {
      if (std::chrono::steady_clock::now() > give_up) return false;
      io.run_one_for(10ms);
    }
    return true;
  }

  template <class Engine>
  std::error_code start(kvx::store::store_node<Engine>& node, kvx::memory::memory_region region) {
    return wait([&]() -> asio::awaitable<std::error_code> {
      auto [e] = co_await node.async_start(region, asio::as_tuple(asio::use_awaitable));
      co_return e;
    });
  }
  kvx::memory::memory_region arena(std::size_t bytes) {
    arenas.push_back(std::move(*kvx::memory::mapped_arena::create(bytes)));
    return arenas.back().region();
  }
  kvx::store::node_options node_options(const std::string& name) const {
    return {.name = name, .segment = "", .tier = "dram", .heartbeat = 50ms};
  }
  kvx::store::store_node<fast_engine>& add_node(const std::string& name, kvx::memory::memory_region region) {
    auto& p = *parties.emplace_back(std::make_unique<kvx::test::store_party>(io, meta, name));
    auto& node = *nodes.emplace_back(std::make_unique<kvx::store::store_node<fast_engine>>(
        p.engine, kvx::store::master_client::create(io.get_executor(), server.endpoint()), node_options(name)));
    EXPECT_FALSE(start(node, region));
    return node;
  }
  kvx::store::store_node<slow_engine>& add_slow_node(const std::string& name, kvx::memory::memory_region region,
                                                     std::chrono::milliseconds delay) {
    auto& p = *slow_parties.emplace_back(std::make_unique<slow_party>(io, meta, name, delay));
    auto& node = *slow_nodes.emplace_back(std::make_unique<kvx::store::store_node<slow_engine>>(
        p.engine, kvx::store::master_client::create(io.get_executor(), server.endpoint()), node_options(name)));
    EXPECT_FALSE(start(node, region));
    return node;
  }

  // A client of `engine` with a registered buffer of one object.
  template <class Engine>
  struct client_with_buffer {
    std::unique_ptr<kvx::store::store_client<Engine>> client;
    std::span<std::byte> buffer;
  };
  template <class Engine>
  client_with_buffer<Engine> client(Engine& engine, const std::string& name, kvx::store::client_options opt) {
    auto& buf = buffers.emplace_back(object_bytes);
    auto ec = wait([&]() -> asio::awaitable<std::error_code> {
      auto [e, d] = co_await engine.async_register_memory(kvx::memory::memory_region{buf.data(), buf.size()},
                                                          name + "/buf", asio::as_tuple(asio::use_awaitable));
      co_return e;
    });
    EXPECT_FALSE(ec) << ec.message();
    opt.node = name;
    return {std::make_unique<kvx::store::store_client<Engine>>(
                engine, kvx::store::master_client::create(io.get_executor(), server.endpoint()), std::move(opt)),
            std::span(buf)};
  }
  auto fast_client(const std::string& name) {
    auto& p = *parties.emplace_back(std::make_unique<kvx::test::store_party>(io, meta, name));
    return client(p.engine, name, {});
  }
  auto slow_client(const std::string& name, std::chrono::milliseconds delay, kvx::store::client_options opt = {}) {
    auto& p = *slow_parties.emplace_back(std::make_unique<slow_party>(io, meta, name, delay));
    return client(p.engine, name, std::move(opt));
  }

  template <class Client>
  std::error_code put(Client& c, const std::string& key, std::span<const std::byte> bytes,
                      std::optional<kvx::store::put_options> opt = std::nullopt) {
    return wait([&]() -> asio::awaitable<std::error_code> {
      const kvx::store::object_key k{"t", key};
      if (opt) {
        auto [e] = co_await c.async_put(k, bytes, *opt, asio::as_tuple(asio::use_awaitable));
        co_return e;
      }
      auto [e] = co_await c.async_put(k, bytes, asio::as_tuple(asio::use_awaitable));
      co_return e;
    });
  }
  template <class Client>
  std::pair<std::error_code, std::uint64_t> get(Client& c, const std::string& key, std::span<std::byte> dst) {
    return wait([&]() -> asio::awaitable<std::pair<std::error_code, std::uint64_t>> {
      auto [e, size] = co_await c.async_get(kvx::store::object_key{"t", key}, dst, asio::as_tuple(asio::use_awaitable));
      co_return std::pair{e, size};
    });
  }
};

// The slow writer's lease ends, the master reclaims its range and gives it
// to the next put; the slow writer must not write into that object then.
TEST_F(StoreLeaseBounds, AWriteSlowerThanItsPutLeaseIsCancelledAndNeverLandsInTheNextObject) {
  add_node("node-a", arena(object_bytes));  // room for one object: the next put reuses the range
  auto slow = slow_client("slow-writer", 2s);
  auto fast = fast_client("writer");
  const auto late_bytes = slow.buffer;
  const auto next_bytes = fast.buffer;
  fill_random(late_bytes, 1);
  fill_random(next_bytes, 2);

  // Shared with the handler: an ASSERT below returns before the slow put ends.
  auto late = std::make_shared<std::optional<std::error_code>>();
  slow.client->async_put(kvx::store::object_key{"t", "late"}, late_bytes, [late](std::error_code ec) { *late = ec; });
  ASSERT_TRUE(run_until([&] { return state.object_count() == 1; })) << "the slow put never started";
  ASSERT_TRUE(run_until([&] { return state.object_count() == 0; })) << "the slow put's range was never given back";

  ASSERT_FALSE(put(*fast.client, "next", next_bytes));
  ASSERT_TRUE(run_until([&] { return late->has_value(); })) << "the slow put never completed";
  EXPECT_EQ(**late, kvx::errc::timed_out) << (*late)->message();

  // Read the next object back through a fresh buffer.
  auto reader = fast_client("reader");
  const auto got = reader.buffer;
  const auto [ec, n] = get(*reader.client, "next", got);
  ASSERT_FALSE(ec) << ec.message();
  ASSERT_EQ(n, object_bytes);
  EXPECT_TRUE(std::equal(next_bytes.begin(), next_bytes.end(), got.begin()))
      << "the slow writer's bytes landed in the object put after its lease ended";
}

// The slow reader's lease ends, the object is removed and its range reused:
// the read must fail, not return the new object's bytes as the old one's.
TEST_F(StoreLeaseBounds, AReadSlowerThanItsLeaseFailsInsteadOfReturningAnotherObjectsBytes) {
  add_node("node-a", arena(object_bytes));
  auto writer = fast_client("writer");
  const auto bytes = writer.buffer;
  fill_random(bytes, 3);
  ASSERT_FALSE(put(*writer.client, "old", bytes));
  const std::vector<std::byte> old_bytes(bytes.begin(), bytes.end());

  kvx::store::client_options short_lease;
  short_lease.lease = 600ms;
  auto slow = slow_client("slow-reader", 2s, short_lease);
  const auto got = slow.buffer;
  auto read = std::make_shared<std::optional<std::pair<std::error_code, std::uint64_t>>>();  // outlives an early ASSERT
  slow.client->async_get(kvx::store::object_key{"t", "old"}, got,
                  [read](std::error_code ec, std::uint64_t n) { read->emplace(ec, n); });
  // Once the slow get holds its lease, remove the object as soon as no lease
  // holds it any more, then reuse its range.
  ASSERT_TRUE(run_until([&] {
    auto listed = state.objects("t", 1, kvx::store::clock::now());
    return !listed.empty() && listed[0].lease_left > kvx::store::clock::duration::zero();
  })) << "the slow get never took its lease";
  ASSERT_TRUE(run_until([&] { return !state.remove({"t", "old"}, kvx::store::clock::now()).code(); }))
      << "the slow reader's lease never ended";
  fill_random(bytes, 4);
  ASSERT_FALSE(put(*writer.client, "new", bytes));

  ASSERT_TRUE(run_until([&] { return read->has_value(); })) << "the slow get never completed";
  EXPECT_EQ((*read)->first, kvx::errc::timed_out) << (*read)->first.message();
  if (!(*read)->first) {
    EXPECT_TRUE(std::equal(old_bytes.begin(), old_bytes.end(), got.begin()))
        << "the get succeeded with another object's bytes";
  }
}

// A copy slower than the master's deadline for it: the source keeps
// heartbeating (it is not dropped, its object not lost) and stops the copy
// before the master gives the target up, so the target range stays clean.
TEST_F(StoreLeaseBounds, ACopySlowerThanItsDeadlineNeitherSilencesItsSourceNorLandsLate) {
  auto& source = add_slow_node("node-a", arena(object_bytes), 3s);
  auto& doomed = add_node("node-c", arena(object_bytes));
  auto writer = fast_client("writer");
  const auto bytes = writer.buffer;
  fill_random(bytes, 5);
  kvx::store::put_options two;
  two.replicas = 2;
  ASSERT_FALSE(wait([&]() -> asio::awaitable<std::error_code> {
    auto [e] = co_await writer.client->async_put(kvx::store::object_key{"t", "obj"}, bytes, two, asio::as_tuple(asio::use_awaitable));
    co_return e;
  }));
  auto target = arena(object_bytes);
  auto& spare = add_node("node-b", target);
  doomed.stop();  // dropped after the 1 s node timeout: node-a must copy the object to node-b

  // Past the first copy's 1.5 s deadline and the slow transport's 3 s.
  ASSERT_TRUE(run_until([&] { return source.replications_failed() >= 1; })) << "the slow copy was never stopped";
  const auto settle = std::chrono::steady_clock::now() + 3500ms;
  run_until([&] { return std::chrono::steady_clock::now() > settle; });

  const auto live = state.nodes();
  EXPECT_NE(std::find(live.begin(), live.end(), "node-a"), live.end()) << "the copying node went silent and was dropped";
  EXPECT_TRUE(state.exists({"t", "obj"})) << "the object was lost with its copying node";
  EXPECT_EQ(source.replications_done(), 0u);
  EXPECT_EQ(spare.replications_done(), 0u);
  const auto* t = target.data();
  EXPECT_TRUE(std::all_of(t, t + target.length, [](std::byte b) { return b == std::byte{0}; }))
      << "a copy given up by the master still wrote its target";
}

// A reader that asks for a lease far longer than the master grants (an
// hour: a new master after a failover would not wait that long before
// reusing the range) is granted the master's longest, and its read is
// bounded by that: slower, it fails instead of reading on past it.
TEST_F(StoreLeaseBounds, AReadLeaseAskedPastTheMastersLongestIsCutAndBoundsTheRead) {
  add_node("node-a", arena(object_bytes));
  auto writer = fast_client("writer");
  fill_random(writer.buffer, 6);
  ASSERT_FALSE(put(*writer.client, "obj", writer.buffer));

  kvx::store::client_options hour;
  hour.lease = std::chrono::hours(1);
  auto slow = slow_client("slow-reader", 2s, hour);
  auto read = std::make_shared<std::optional<std::error_code>>();  // outlives an early ASSERT
  slow.client->async_get(kvx::store::object_key{"t", "obj"}, slow.buffer, [read](std::error_code ec, std::uint64_t) { *read = ec; });
  kvx::store::clock::duration granted{};
  ASSERT_TRUE(run_until([&] {
    auto listed = state.objects("t", 1, kvx::store::clock::now());
    granted = listed.empty() ? granted : listed[0].lease_left;
    return granted > kvx::store::clock::duration::zero();
  })) << "the slow get never took its lease";
  EXPECT_LE(granted, config.read_lease_cap()) << "an hour was asked; the master grants at most its max_read_lease";
  ASSERT_TRUE(run_until([&] { return read->has_value(); })) << "the slow get never completed";
  EXPECT_EQ(**read, kvx::errc::timed_out) << (*read)->message();
}

// Puts that ask for their own lease: up to 3 s on a master whose default
// is 600 ms.
kvx::store::master_config long_put_lease_config() {
  auto c = lease_bounds_config();
  c.max_put_lease = 3s;
  return c;
}
struct StorePutLeases : StoreLeaseBounds {
  StorePutLeases() : StoreLeaseBounds(long_put_lease_config()) {}
};

// A write that starts 1 s late cannot end inside the default put lease
// (600 ms) and fails; asking for 2.5 s, the same write succeeds, byte-exact.
TEST_F(StorePutLeases, AWriteLongerThanTheDefaultPutLeaseSucceedsUnderTheLeaseItAskedFor) {
  add_node("node-a", arena(object_bytes));
  auto slow = slow_client("slow-writer", 1s);
  fill_random(slow.buffer, 7);
  EXPECT_EQ(put(*slow.client, "default-lease", slow.buffer), kvx::errc::timed_out) << "the write outlasts 600 ms";
  kvx::store::put_options longer;
  longer.lease = 2500ms;
  const auto ec = put(*slow.client, "own-lease", slow.buffer, longer);
  ASSERT_FALSE(ec) << ec.message();

  auto reader = fast_client("reader");
  const auto [gec, n] = get(*reader.client, "own-lease", reader.buffer);
  ASSERT_FALSE(gec) << gec.message();
  ASSERT_EQ(n, object_bytes);
  EXPECT_TRUE(std::equal(slow.buffer.begin(), slow.buffer.end(), reader.buffer.begin()));
}

// More than the master's max_put_lease is refused before anything is
// allocated; so is a lease that is not positive (by the client).
TEST_F(StorePutLeases, APutLeaseOverTheMaximumIsRefusedAndAllocatesNothing) {
  add_node("node-a", arena(object_bytes));
  auto writer = fast_client("writer");
  fill_random(writer.buffer, 8);
  kvx::store::put_options too_long;
  too_long.lease = 3001ms;
  EXPECT_EQ(put(*writer.client, "k", writer.buffer, too_long), kvx::errc::invalid_argument);
  kvx::store::put_options none;
  none.lease = 0ms;
  EXPECT_EQ(put(*writer.client, "k", writer.buffer, none), kvx::errc::invalid_argument);
  EXPECT_EQ(state.object_count(), 0u);
  EXPECT_EQ(state.used_bytes(), 0u);
  EXPECT_FALSE(put(*writer.client, "k", writer.buffer)) << "the default lease still serves";
}

}  // namespace
