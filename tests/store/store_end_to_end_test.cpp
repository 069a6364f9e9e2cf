#include <kvx/store/store_client.hpp>
#include <kvx/store/store_node.hpp>
#include <kvx/store/master_server.hpp>

#include <gtest/gtest.h>

#include <boost/asio/io_context.hpp>

#include <kvx/cache/eviction/lru.hpp>
#include <kvx/memory/mapped_arena.hpp>
#include <kvx/memory/mapped_file.hpp>
#include <kvx/testing/random_bytes.hpp>
#include <kvx/transfer/embedded_metadata.hpp>
#include <kvx/transfer/transfer_engine.hpp>
#include <kvx/transport/local.hpp>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>
#include <random>

#include "support/store_cluster.hpp"

namespace {

namespace asio = boost::asio;
using namespace std::chrono_literals;
using engine_type = kvx::test::store_engine;
using state_type = kvx::store::master_state<kvx::cache::eviction::lru>;

// One process, several nodes: every party has its own engine and local
// transport, sharing the in-process metadata backend.
using party = kvx::test::store_party;

kvx::store::master_config end_to_end_config() {
  kvx::store::master_config c;
  c.node_timeout = 400ms;
  return c;
}

struct StoreEndToEnd : ::testing::Test, kvx::test::store_cluster<state_type> {
  StoreEndToEnd() : store_cluster(end_to_end_config()) {}
  std::vector<std::unique_ptr<party>> parties;
  std::vector<kvx::memory::mapped_arena> arenas;
  std::vector<std::unique_ptr<kvx::store::store_node<engine_type>>> nodes;

  std::string master_endpoint;  // where nodes and clients made from now on find the master

  void SetUp() override {
    ASSERT_TRUE(server.start());
    master_endpoint = server.endpoint();
  }
  void TearDown() override {
    for (auto& n : nodes) n->stop();
    stop_master();
  }

  party& add_party(const std::string& name) { return *parties.emplace_back(std::make_unique<party>(io, meta, name)); }

  kvx::store::store_node<engine_type>& add_node(const std::string& name, std::size_t bytes) {
    arenas.push_back(std::move(*kvx::memory::mapped_arena::create(bytes)));
    return add_node(name, arenas.back().region(), "dram");
  }
  kvx::store::store_node<engine_type>& add_node(const std::string& name, kvx::memory::memory_region region, const std::string& tier) {
    auto& p = add_party(name);
    auto master = kvx::store::master_client::create(io.get_executor(), master_endpoint);
    auto& node = *nodes.emplace_back(std::make_unique<kvx::store::store_node<engine_type>>(
        p.engine, master, kvx::store::node_options{.name = name, .segment = "", .tier = tier, .heartbeat = 50ms}));
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
  client_party add_client(const std::string& name, std::size_t bytes, unsigned replicas = 1) {
    auto& p = add_party(name);
    client_party c{&p, std::vector<std::byte>(bytes), nullptr};
    const kvx::memory::memory_region region{c.buffer.data(), c.buffer.size()};
    const std::string segment = name + "/buf";
    auto ec = wait([&]() -> asio::awaitable<std::error_code> {
      auto [e, d] = co_await p.engine.async_register_memory(region, segment, asio::as_tuple(asio::use_awaitable));
      co_return e;
    });
    EXPECT_FALSE(ec) << ec.message();
    c.client = std::make_unique<kvx::store::store_client<engine_type>>(
        p.engine, kvx::store::master_client::create(io.get_executor(), master_endpoint),
        kvx::store::client_options{.node = name, .replicas = replicas, .lease = 1000ms});
    return c;
  }

  std::error_code put(client_party& c, const std::string& key, std::span<const std::byte> bytes) {
    const kvx::store::object_key k{"t", key};
    return wait([&]() -> asio::awaitable<std::error_code> {
      auto [e] = co_await c.client->async_put(k, bytes, asio::as_tuple(asio::use_awaitable));
      co_return e;
    });
  }
  // Three nodes and "obj" (100,000 random bytes of `seed`) put by `writer`
  // with two replicas; the bytes, and the node holding its first copy.
  struct placed_object {
    std::span<std::byte> bytes;
    kvx::store::store_node<engine_type>* holder = nullptr;
  };
  placed_object three_nodes_and_an_object(client_party& writer, int seed) {
    for (auto name : {"node-a", "node-b", "node-c"}) add_node(name, 2 << 20);
    writer = add_client("writer", 1 << 20, 2);
    auto src = std::span(writer.buffer).first(100000);
    kvx::testing::fill_random(src, static_cast<std::uint64_t>(seed));
    EXPECT_FALSE(put(writer, "obj", src));
    auto before = state.get({"t", "obj"}, kvx::store::clock::now(), {}, 1ms);
    EXPECT_TRUE(before);
    if (!before) return {src, nullptr};
    for (auto& n : nodes)
      if (n->options().name == before->replicas[0].node) return {src, n.get()};
    return {src, nullptr};
  }
  // Runs the io_context until some node made a re-replication copy (5 s at most); how many were made.
  std::size_t wait_for_a_copy() {
    const auto until = std::chrono::steady_clock::now() + 5s;
    std::size_t copies = 0;
    while (std::chrono::steady_clock::now() < until && copies == 0) {
      io.restart();
      io.run_for(50ms);
      for (auto& n : nodes) copies += n->replications_done();
    }
    return copies;
  }
  std::pair<std::error_code, std::uint64_t> get(client_party& c, const std::string& key, std::span<std::byte> dst) {
    const kvx::store::object_key k{"t", key};
    return wait([&]() -> asio::awaitable<std::pair<std::error_code, std::uint64_t>> {
      auto [e, n] = co_await c.client->async_get(k, dst, asio::as_tuple(asio::use_awaitable));
      co_return std::pair{e, n};
    });
  }
};

using kvx::testing::fill_random;

TEST_F(StoreEndToEnd, PutThenGetIsByteExactAcrossParties) {
  add_node("node-a", 4 << 20);
  add_node("node-b", 4 << 20);
  auto writer = add_client("writer", 1 << 20, 2);
  auto reader = add_client("reader", 1 << 20);
  auto src = std::span(writer.buffer).first(300000);
  fill_random(src, 1);
  ASSERT_FALSE(put(writer, "obj", src));
  auto [ec, n] = get(reader, "obj", reader.buffer);
  ASSERT_FALSE(ec) << ec.message();
  ASSERT_EQ(n, src.size());
  EXPECT_TRUE(std::equal(src.begin(), src.end(), reader.buffer.begin()));
  EXPECT_EQ(state.get({"t", "obj"}, kvx::store::clock::now())->replicas.size(), 2u);
}

TEST_F(StoreEndToEnd, MissingObjectsAndSmallBuffersAreErrors) {
  add_node("node-a", 1 << 20);
  auto c = add_client("c", 1 << 20);
  EXPECT_EQ(get(c, "absent", c.buffer).first, kvx::errc::not_found);
  ASSERT_FALSE(put(c, "big", std::span(c.buffer).first(4096)));
  EXPECT_EQ(get(c, "big", std::span(c.buffer).first(100)).first, kvx::errc::out_of_range);
  EXPECT_FALSE(state.remove({"t", "big"}, kvx::store::clock::now() + 1h).code()) << "the failed get released its lease";
}

TEST_F(StoreEndToEnd, PutLargerThanThePoolIsRefusedAndLeavesNothing) {
  add_node("node-a", 1 << 20);
  auto c = add_client("c", 2 << 20);
  EXPECT_EQ(put(c, "huge", c.buffer), kvx::errc::capacity_exceeded);
  EXPECT_EQ(state.used_bytes(), 0u);
}

TEST_F(StoreEndToEnd, DeadNodesReplicaIsServedByTheOtherAndReCopied) {
  client_party writer;
  auto [src, holder] = three_nodes_and_an_object(writer, 2);
  ASSERT_NE(holder, nullptr);
  const auto dead = holder->options().name;
  holder->stop();
  // Let the master notice (400 ms timeout) and the survivor copy the object to the third node.
  EXPECT_EQ(wait_for_a_copy(), 1u);
  auto reader = add_client("reader", 1 << 20);
  auto [ec, got] = get(reader, "obj", reader.buffer);
  ASSERT_FALSE(ec) << ec.message();
  EXPECT_TRUE(std::equal(src.begin(), src.end(), reader.buffer.begin()));
  auto after = state.get({"t", "obj"}, kvx::store::clock::now(), {}, 1ms);
  ASSERT_EQ(after->replicas.size(), 2u);
  for (const auto& r : after->replicas) EXPECT_NE(r.node, dead);
}

TEST_F(StoreEndToEnd, ANodeThatLeavesIsDroppedAtOnceAndItsObjectsCopiedAgain) {
  client_party writer;
  auto [src, node] = three_nodes_and_an_object(writer, 3);
  ASSERT_NE(node, nullptr);
  const auto leaving = node->options().name;
  auto leave = [&, node = node] {
    return wait([&]() -> asio::awaitable<std::error_code> {
      auto [e] = co_await node->async_leave(asio::as_tuple(asio::use_awaitable));
      co_return e;
    });
  };
  auto ec = leave();
  ASSERT_FALSE(ec) << ec.message();
  // Gone when the answer came back, not a node timeout (400 ms) later.
  const auto members = state.nodes();
  EXPECT_EQ(std::count(members.begin(), members.end(), leaving), 0) << "the master still lists " << leaving;
  auto left = state.get({"t", "obj"}, kvx::store::clock::now(), {}, 1ms);
  ASSERT_TRUE(left);
  ASSERT_EQ(left->replicas.size(), 1u);
  EXPECT_NE(left->replicas[0].node, leaving);
  // The next ticks copy the object to the third node; it reads byte-exact.
  EXPECT_EQ(wait_for_a_copy(), 1u);
  auto reader = add_client("reader", 1 << 20);
  auto [gec, got] = get(reader, "obj", reader.buffer);
  ASSERT_FALSE(gec) << gec.message();
  EXPECT_TRUE(std::equal(src.begin(), src.end(), reader.buffer.begin()));
  EXPECT_EQ(leave(), kvx::errc::not_found) << "leaving twice: the master no longer knows it";
}

TEST_F(StoreEndToEnd, BatchFormsAndPrefixLookup) {
  add_node("node-a", 4 << 20);
  auto c = add_client("c", 1 << 20);
  std::vector<kvx::store::store_client<engine_type>::put_item> items;
  for (int i = 0; i < 8; ++i) {
    auto s = std::span(c.buffer).subspan(static_cast<std::size_t>(i) * 1000, 1000);
    fill_random(s, static_cast<unsigned>(i));
    items.push_back({{"t", "block" + std::to_string(i)}, s});
  }
  auto [ec, codes] = wait([&]() -> asio::awaitable<std::pair<std::error_code, std::vector<std::error_code>>> {
    auto [e, v] = co_await c.client->async_put_batch(items, asio::as_tuple(asio::use_awaitable));
    co_return std::pair{e, v};
  });
  ASSERT_FALSE(ec);
  ASSERT_EQ(codes.size(), 8u);
  const std::string tenant = "t";
  const std::vector<std::string> prefix_keys{"block0", "block1", "block2", "nope", "block4"};
  auto [pec, count] = wait([&]() -> asio::awaitable<std::pair<std::error_code, std::size_t>> {
    auto [e, n] = co_await c.client->async_longest_prefix(tenant, prefix_keys, asio::as_tuple(asio::use_awaitable));
    co_return std::pair{e, n};
  });
  ASSERT_FALSE(pec);
  EXPECT_EQ(count, 3u);
  std::vector<std::byte> out(8000);
  std::vector<kvx::store::store_client<engine_type>::get_item> gets;
  for (int i = 0; i < 8; ++i) gets.push_back({{"t", "block" + std::to_string(i)}, std::span(out).subspan(static_cast<std::size_t>(i) * 1000, 1000)});
  // The destination must be registered memory: reuse the client's buffer tail.
  auto dst = std::span(c.buffer).subspan(500000, 8000);
  for (int i = 0; i < 8; ++i) gets[static_cast<std::size_t>(i)].dst = dst.subspan(static_cast<std::size_t>(i) * 1000, 1000);
  auto [gec, gcodes] = wait([&]() -> asio::awaitable<std::pair<std::error_code, std::vector<std::error_code>>> {
    auto [e, v] = co_await c.client->async_get_batch(gets, asio::as_tuple(asio::use_awaitable));
    co_return std::pair{e, v};
  });
  ASSERT_FALSE(gec) << gec.message();
  EXPECT_TRUE(std::equal(dst.begin(), dst.end(), c.buffer.begin()));
}

// A master restarted on its port (no election) with ledgers
// (recover_objects) gets its objects back from the nodes, both replicas,
// once a put lease has passed since it started.
TEST_F(StoreEndToEnd, AMasterRestartedOnItsPortTakesItsObjectsBackFromTheNodes) {
  server.stop();
  config.recover_objects = true;
  config.put_lease = 300ms;
  auto first = std::make_unique<state_type>(config, kvx::store::placement::random_with_capacity{}, registry);
  auto first_server = std::make_unique<kvx::store::master_server<state_type>>(
      io.get_executor(), *first, kvx::store::master_server_config{.address = "127.0.0.1", .port = 0, .tick_interval = 50ms});
  ASSERT_TRUE(first_server->start());
  master_endpoint = first_server->endpoint();
  const auto port = first_server->port();
  auto& a = add_node("node-a", 2 << 20);
  auto& b = add_node("node-b", 2 << 20);
  auto writer = add_client("writer", 1 << 20, 2);
  auto reader = add_client("reader", 1 << 20);
  auto src = std::span(writer.buffer).first(123457);
  fill_random(src, 9);
  ASSERT_FALSE(put(writer, "kept", src));
  io.restart();
  io.run_for(200ms);  // heartbeats carry the commit to both ledgers

  first_server->stop();
  first_server.reset();
  first.reset();
  state_type second(config, kvx::store::placement::random_with_capacity{}, registry);
  kvx::store::master_server<state_type> second_server(io.get_executor(), second,
                                                      {.address = "127.0.0.1", .port = port, .tick_interval = 50ms});
  ASSERT_TRUE(second_server.start());
  const auto until = std::chrono::steady_clock::now() + 5s;
  while (a.recovered() + b.recovered() < 2 && std::chrono::steady_clock::now() < until) {
    io.restart();
    io.run_for(50ms);
  }
  EXPECT_EQ(a.recovered() + b.recovered(), 2u) << "the object and its second copy";
  EXPECT_EQ(a.reregistrations() + b.reregistrations(), 2u);
  auto [ec, n] = get(reader, "kept", reader.buffer);
  ASSERT_FALSE(ec) << ec.message();
  ASSERT_EQ(n, src.size());
  EXPECT_TRUE(std::equal(src.begin(), src.end(), reader.buffer.begin()));
  EXPECT_EQ(second.get({"t", "kept"}, kvx::store::clock::now())->replicas.size(), 2u);
  for (auto& node : nodes) node->stop();
  second_server.stop();
  io.restart();
  io.run_for(100ms);
}

TEST_F(StoreEndToEnd, WriterThatNeverCommitsLeavesNoVisibleObjectAndItsSpaceReturns) {
  config.put_lease = 200ms;
  state_type short_lease(config, {}, registry);
  // Drive the master directly for the dead writer: allocate, never write or commit.
  ASSERT_TRUE(short_lease.add_segment({"s", "n", 1 << 20, "dram"}, kvx::store::clock::now()));
  auto t = short_lease.put_start({"t", "half"}, 4096, {}, kvx::store::clock::now());
  ASSERT_TRUE(t);
  EXPECT_FALSE(short_lease.exists({"t", "half"}));
  (void)short_lease.heartbeat("n", kvx::store::clock::now() + 250ms);
  auto report = short_lease.tick(kvx::store::clock::now() + 300ms);
  EXPECT_EQ(report.reclaimed_puts.size(), 1u);
  EXPECT_EQ(short_lease.used_bytes(), 0u);
}

}  // namespace

TEST_F(StoreEndToEnd, AnSsdSegmentOnAFileTakesWhatDramCannotHold) {
  char tmpl[] = "/tmp/kvx-ssd-XXXXXX";
  ASSERT_NE(::mkdtemp(tmpl), nullptr);
  const std::filesystem::path dir = tmpl;
  {
    auto ssd = kvx::memory::mapped_file::create(dir / "node-ssd.pool", 4 << 20);
    ASSERT_TRUE(ssd.has_value()) << ssd.error().message();
    add_node("node-dram", 1 << 20);
    add_node("node-ssd", ssd->region(), "ssd");
    auto c = add_client("c", 1 << 20);
    // Eight 384 KiB objects: two fit in DRAM, the rest must go to the file.
    std::vector<std::vector<std::byte>> objects(8, std::vector<std::byte>(384 << 10));
    for (std::size_t i = 0; i < objects.size(); ++i) {
      fill_random(objects[i], static_cast<unsigned>(100 + i));
      std::copy(objects[i].begin(), objects[i].end(), c.buffer.begin());
      ASSERT_FALSE(put(c, "o" + std::to_string(i), std::span(c.buffer).first(objects[i].size()))) << i;
    }
    std::size_t on_ssd = 0, on_dram = 0;
    for (std::size_t i = 0; i < objects.size(); ++i) {
      auto meta = state.get({"t", "o" + std::to_string(i)}, kvx::store::clock::now());
      ASSERT_TRUE(meta.has_value());
      ASSERT_EQ(meta->replicas.size(), 1u);
      (meta->replicas[0].node == "node-ssd" ? on_ssd : on_dram)++;
      auto [ec, n] = get(c, "o" + std::to_string(i), c.buffer);
      ASSERT_FALSE(ec) << ec.message();
      ASSERT_EQ(n, objects[i].size());
      EXPECT_TRUE(std::equal(objects[i].begin(), objects[i].end(), c.buffer.begin())) << "object " << i << " changed";
    }
    EXPECT_EQ(on_dram, 2u) << "placement prefers DRAM while it fits";
    EXPECT_EQ(on_ssd, 6u);
    EXPECT_GE(state.tier_used("ssd"), 6u * (384 << 10));
    EXPECT_GE(state.tier_used("dram"), 2u * (384 << 10));
    EXPECT_EQ(state.tier_used("dram") + state.tier_used("ssd"), state.used_bytes());
    // The bytes are in the file, not only in this process's memory.
    ASSERT_TRUE(ssd->flush().has_value());
    std::ifstream in(dir / "node-ssd.pool", std::ios::binary);
    std::vector<char> file((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::size_t found = 0;
    for (const auto& o : objects)
      if (std::search(file.begin(), file.end(), reinterpret_cast<const char*>(o.data()), reinterpret_cast<const char*>(o.data()) + 4096) != file.end()) ++found;
    EXPECT_EQ(found, 6u);
    for (auto& n : nodes) n->stop();
    io.restart();
    io.run_for(100ms);
    nodes.clear();
  }
  std::filesystem::remove_all(dir);
}
