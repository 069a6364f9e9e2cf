// The nearest-NIC policy through the transfer engine: eight tcp rails on
// loopback stand in for the eight NICs of the two-socket fixture (`local`
// cannot: its segment table is process-wide, so a second rail's registration
// of the same segment collides). Host memory stays on the NICs of its own
// socket; when one of them dies mid-transfer its slices move to the other
// local NICs without the engine seeing an error, and when a socket's NICs
// are all gone the other socket's carry the rest.
#include <kvx/transport/multi_rail.hpp>

#include <gtest/gtest.h>

#include <boost/asio/io_context.hpp>

#include <optional>
#include <set>
#include <vector>

#include <kvx/testing/random_bytes.hpp>
#include <kvx/topology/topology.hpp>
#include <kvx/transfer/embedded_metadata.hpp>
#include <kvx/transfer/transfer_engine.hpp>
#include <kvx/transport/tcp.hpp>

#include "support/run_until.hpp"

namespace {

namespace asio = boost::asio;
using namespace std::chrono_literals;
using kvx::transfer::batch;
using kvx::transfer::batch_result;
using kvx::transfer::embedded_metadata;
using rails_t = kvx::transport::multi_rail<kvx::transport::tcp, kvx::topology::rail::nearest>;
using engine_t = kvx::transfer::transfer_engine<embedded_metadata, rails_t>;

kvx::topology::system two_socket() {
  auto t = kvx::topology::discover(std::filesystem::path(KVX_SOURCE_DIR) / "tests/data/topology/two_socket_8gpu");
  if (!t) throw std::runtime_error(t.error().message());
  return *t;
}

rails_t make_rails(asio::io_context& io, const kvx::topology::system& topo) {
  kvx::topology::rail::nearest sel(topo);
  std::vector<std::unique_ptr<kvx::transport::tcp>> v;
  for (std::size_t i = 0; i < sel.rail_count(); ++i) v.push_back(std::make_unique<kvx::transport::tcp>(io.get_executor()));
  // No failed NIC comes back during the test.
  return rails_t(std::move(sel), std::move(v), std::chrono::hours(1));
}

// What a NIC becomes when it dies: a transport that serves nothing, so the
// connections to the old one close and new ones are refused.
kvx::transport::tcp dead_nic(asio::io_context& io) {
  kvx::transport::tcp::config c;
  c.serve = false;
  return kvx::transport::tcp(io.get_executor(), c);
}

struct nearest_rails : ::testing::Test {
  static constexpr std::size_t size = 4u << 20, slice = 32u << 10;
  kvx::topology::system topo = two_socket();
  asio::io_context io;
  embedded_metadata meta{io.get_executor()};
  rails_t owner_rails = make_rails(io, topo), my_rails = make_rails(io, topo);
  engine_t owner{meta, {.node = "owner"}, owner_rails};
  engine_t me{meta, {.node = "initiator", .slice_size = slice, .max_in_flight = 8}, my_rails};
  std::vector<std::byte> remote = std::vector<std::byte>(size), mine = std::vector<std::byte>(size);
  std::string name = kvx::testing::unique_segment_name("nearest");
  std::optional<std::pair<std::error_code, batch_result>> out;

  void SetUp() override {
    kvx::testing::fill_random(remote, 11);
    kvx::testing::fill_random(mine, 12);  // the first page is touched: it has a NUMA node
    reg(owner, remote, name);
    reg(me, mine, name + "-local");
  }
  void reg(engine_t& e, std::vector<std::byte>& buf, const std::string& n) {
    std::optional<std::error_code> done;
    e.async_register_memory({buf.data(), buf.size()}, n, [&](std::error_code ec, const kvx::memory::segment_descriptor&) {
      done = ec;
    });
    run_until([&] { return done.has_value(); });
    ASSERT_TRUE(done && !*done) << (done ? done->message() : "no completion");
  }
  template <class Pred>
  void run_until(Pred done) {
    kvx::test::run_until(io, done, 20s);
  }
  std::uint64_t carried_on(const std::set<std::size_t>& rails) {
    const auto per_rail = my_rails.ops_per_rail();
    std::uint64_t n = 0;
    for (auto r : rails) n += per_rail[r];
    return n;
  }
};

TEST_F(nearest_rails, HostMemoryStaysOnItsSocketsNicsAndFailsOverMidTransfer) {
  const int node = kvx::topology::numa_node_of(mine.data());
  if (node < 0) GTEST_SKIP() << "get_mempolicy() gives no NUMA node for heap memory here: the hint cannot be tested";
  // The fixture's NICs on this node's socket (node 0 or 1: four NICs each).
  std::set<std::size_t> near, far;
  kvx::topology::rail::nearest probe(topo);
  for (std::size_t r = 0; r < probe.rail_count(); ++r) (probe.rail(r).numa == node ? near : far).insert(r);
  if (near.empty()) GTEST_SKIP() << "this host's NUMA node " << node << " has no NIC in the two-socket fixture";
  ASSERT_EQ(near.size(), 4u);

  batch b;
  b.read(std::span(mine), name, 0);
  me.async_transfer(std::move(b), [&](std::error_code ec, batch_result r) { out.emplace(ec, std::move(r)); });
  run_until([&] { return out.has_value() || carried_on(near) >= 24; });
  ASSERT_FALSE(out) << "finished before a NIC could fail";
  EXPECT_EQ(carried_on(far), 0u) << "host memory of node " << node << " left through the other socket";
  for (auto r : near) EXPECT_GT(my_rails.ops_per_rail()[r], 0u) << "rail " << r << ": equally near NICs share the slices";

  // One local NIC dies mid-transfer: its slices move to the other local NICs.
  const auto first = *near.begin();
  const auto before = my_rails.ops_per_rail()[first];
  owner_rails.rail(first) = dead_nic(io);
  run_until([&] { return out.has_value() || carried_on(near) >= 64; });
  ASSERT_FALSE(out);
  EXPECT_LE(my_rails.ops_per_rail()[first], before + 8) << "at most a window's worth more on the dead NIC";
  EXPECT_EQ(carried_on(far), 0u) << "three local NICs are left: the far socket is not needed yet";

  // Every local NIC dies: the rest of the transfer crosses to the other socket's NICs.
  for (auto r : near) owner_rails.rail(r) = dead_nic(io);
  run_until([&] { return out.has_value(); });
  ASSERT_TRUE(out) << "the transfer hung";
  ASSERT_FALSE(out->first) << out->second.first_error().message();
  EXPECT_EQ(out->second.retries, 0u) << "failover happened below the engine";
  EXPECT_EQ(mine, remote);
  EXPECT_GT(carried_on(far), 0u);
  EXPECT_EQ(carried_on(near) + carried_on(far), size / slice) << "each slice completed once";
}

TEST(RailSelection, HostMemoryOfAnUnknownNodeUsesEveryNic) {
  // A selector given no NUMA node ranks every NIC alike (two nodes in the topology).
  kvx::topology::rail::nearest sel(two_socket());
  std::set<std::size_t> used;
  for (std::size_t s = 0; s < 16; ++s) used.insert(*sel.select({.gpu = -1, .numa = -1, .slice_index = s}));
  EXPECT_EQ(used.size(), 8u);
  std::set<std::size_t> node1;
  for (std::size_t s = 0; s < 16; ++s) node1.insert(*sel.select({.gpu = -1, .numa = 1, .slice_index = s}));
  for (auto r : node1) EXPECT_EQ(sel.rail(r).numa, 1) << sel.rail(r).name;
  EXPECT_EQ(node1.size(), 4u);
}

}  // namespace
