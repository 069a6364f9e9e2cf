#include <kvx/topology/topology.hpp>
#include <kvx/topology/rail_selector.hpp>

#include <gtest/gtest.h>

#include <map>
#include <set>
#include <string>
#include <vector>

#include <unistd.h>

namespace {

using kvx::topology::distance;

std::filesystem::path fixture(const char* name) {
  return std::filesystem::path(KVX_SOURCE_DIR) / "tests/data/topology" / name;
}

TEST(Topology, TwoSocketServerHasEightGpusAndEightRdmaNicsPlusManagement) {
  auto t = kvx::topology::discover(fixture("two_socket_8gpu"));
  ASSERT_TRUE(t) << t.error().message();
  ASSERT_EQ(t->numa_nodes.size(), 2u);
  EXPECT_EQ(t->numa_nodes[1].cpus.size(), 48u);
  EXPECT_EQ(t->numa_nodes[1].cpus.front(), 48);
  ASSERT_EQ(t->gpus.size(), 8u);
  ASSERT_EQ(t->nics.size(), 9u);
  int rdma = 0;
  for (const auto& n : t->nics) rdma += n.rdma;
  EXPECT_EQ(rdma, 8);
  EXPECT_EQ(t->nics[0].name, "mlx5_0");
  EXPECT_EQ(t->nics[0].netdevs, std::vector<std::string>{"ibp0"});
  EXPECT_DOUBLE_EQ(t->nics[0].gbps, 400.0);
  EXPECT_EQ(t->nics[0].link_layer, "InfiniBand");
  EXPECT_EQ(t->nics.back().name, "eno1");
  EXPECT_FALSE(t->nics.back().rdma);
  EXPECT_EQ(t->gpus[4].numa, 1);
}

TEST(Topology, DistancesFollowThePcieTree) {
  auto t = *kvx::topology::discover(fixture("two_socket_8gpu"));
  // GPU 0 and 1 and mlx5_0/1 share the first switch of socket 0.
  EXPECT_EQ(t.between(t.gpus[0].bdf, t.nics[0].bdf), distance::same_switch);
  EXPECT_EQ(t.between(t.gpus[0].bdf, t.gpus[1].bdf), distance::same_switch);
  // The second switch of socket 0: same root complex only.
  EXPECT_EQ(t.between(t.gpus[0].bdf, t.nics[2].bdf), distance::same_root);
  // Socket 1's NICs.
  EXPECT_EQ(t.between(t.gpus[0].bdf, t.nics[4].bdf), distance::cross_numa);
  EXPECT_EQ(t.between(t.gpus[0].bdf, t.gpus[0].bdf), distance::same_device);
  EXPECT_EQ(t.between(t.gpus[0].bdf, "0000:ff:00.0"), distance::cross_numa);
}

TEST(Topology, EachGpuGetsTheNicsOnItsSwitchFirst) {
  auto t = *kvx::topology::discover(fixture("two_socket_8gpu"));
  for (int g = 0; g < 8; ++g) {
    auto order = t.nearest_nics_to_gpu(g);
    ASSERT_EQ(order.size(), 8u);
    std::set<std::string> first_two{t.nics[order[0]].name, t.nics[order[1]].name};
    const int sw = g / 2;  // GPUs 2k, 2k+1 share a switch with mlx5_2k, mlx5_2k+1
    EXPECT_EQ(first_two, (std::set<std::string>{"mlx5_" + std::to_string(2 * sw), "mlx5_" + std::to_string(2 * sw + 1)}))
        << "gpu " << g;
    EXPECT_EQ(t.between(t.gpus[static_cast<std::size_t>(g)].bdf, t.nics[order.back()].bdf), distance::cross_numa);
  }
  auto host1 = t.nearest_nics_to_numa(1);
  EXPECT_EQ(t.nics[host1[0]].numa, 1);
}

TEST(Topology, SingleSocketHostWithoutNumaInformation) {
  auto t = kvx::topology::discover(fixture("single_socket"));
  ASSERT_TRUE(t);
  ASSERT_EQ(t->gpus.size(), 1u);
  ASSERT_EQ(t->nics.size(), 1u);
  EXPECT_EQ(t->nics[0].link_layer, "Ethernet");
  EXPECT_EQ(t->nics[0].netdevs, std::vector<std::string>{"enp2s0"});
  EXPECT_EQ(t->between(t->gpus[0].bdf, t->nics[0].bdf), distance::same_root);
  EXPECT_EQ(t->nearest_nics_to_gpu(0).size(), 1u);
  auto j = t->to_json();
  EXPECT_EQ(j["gpu_nic_distance"][0][0], "same_root");
  EXPECT_EQ(j["numa_nic_distance"][0][0], "same_numa") << "one node: every NIC is local";
  // `lo` has no PCI device: no placement, not a NIC.
  for (const auto& n : t->nics) EXPECT_NE(n.name, "lo");
}

TEST(Topology, RoceGidTableListsTheEntriesInUse) {
  auto t = *kvx::topology::discover(fixture("single_socket"));
  const auto& gids = t.nics.at(0).gids;
  ASSERT_EQ(gids.size(), 4u) << "entries 4..7 are unused (zero GID, no type)";
  EXPECT_EQ(gids[0].index, 0);
  EXPECT_EQ(gids[0].type, "IB/RoCE v1");
  EXPECT_EQ(gids[3].index, 3);
  EXPECT_EQ(gids[3].gid, "0000:0000:0000:0000:0000:ffff:c0a8:0114");
  EXPECT_EQ(gids[3].type, "RoCE v2");
  EXPECT_EQ(gids[3].netdev, "enp2s0");
  auto j = t.to_json();
  EXPECT_EQ(j["nics"][0]["gids"][1]["type"], "RoCE v2");
  // InfiniBand ports list their port GID only.
  auto big = *kvx::topology::discover(fixture("two_socket_8gpu"));
  ASSERT_EQ(big.nics[7].gids.size(), 1u);
  EXPECT_EQ(big.nics[7].gids[0].gid, "fe80:0000:0000:0000:0c42:a103:006c:b1a0");
  EXPECT_EQ(big.nics[7].gids[0].netdev, "");
  EXPECT_TRUE(big.nics.back().gids.empty()) << "a plain Ethernet NIC has no GID table";
}

TEST(Topology, NumaNicMatrixSendsEachSocketsMemoryToItsOwnNics) {
  auto t = *kvx::topology::discover(fixture("two_socket_8gpu"));
  const auto m = t.numa_nic_matrix();
  ASSERT_EQ(m.size(), 2u);
  ASSERT_EQ(m[0].size(), t.nics.size());
  for (std::size_t i = 0; i < t.nics.size(); ++i) {
    const auto local = t.nics[i].numa;
    EXPECT_EQ(m[0][i], local == 0 ? distance::same_numa : distance::cross_numa) << t.nics[i].name;
    EXPECT_EQ(m[1][i], local == 1 ? distance::same_numa : distance::cross_numa) << t.nics[i].name;
  }
  EXPECT_EQ(t.to_json()["numa_nic_distance"][1][4], "same_numa");
}

TEST(Topology, DeviceNumbersOfAnyLengthSortAsNumbers) {
  // single_socket plus two more RDMA devices whose numbers do not fit 64 bits.
  const auto root = std::filesystem::temp_directory_path() / ("kvx_topo_test_" + std::to_string(::getpid()));
  std::filesystem::remove_all(root);
  const auto opts = std::filesystem::copy_options::recursive | std::filesystem::copy_options::copy_symlinks;
  std::filesystem::copy(fixture("single_socket"), root, opts);
  const auto ib = root / "class/infiniband";
  std::filesystem::copy(ib / "mlx5_0", ib / "mlx5_100000000000000000000", opts);
  std::filesystem::copy(ib / "mlx5_0", ib / "mlx5_99999999999999999999", opts);
  auto t = kvx::topology::discover(root);
  std::filesystem::remove_all(root);
  ASSERT_TRUE(t) << t.error().message();
  std::vector<std::string> names;
  for (const auto& n : t->nics) names.push_back(n.name);
  EXPECT_EQ(names, (std::vector<std::string>{"mlx5_0", "mlx5_99999999999999999999", "mlx5_100000000000000000000"}));
}

TEST(Topology, MissingRootIsAClearError) {
  auto t = kvx::topology::discover("/no/such/sysfs");
  EXPECT_EQ(t.code(), kvx::errc::not_found);
  EXPECT_NE(t.error().context().find("/no/such/sysfs"), std::string::npos);
}

TEST(Topology, ThisMachineParsesWithoutError) {
  auto t = kvx::topology::discover();
  ASSERT_TRUE(t) << t.error().message();
  EXPECT_GE(t->numa_nodes.size(), 1u);
}

TEST(RailSelector, NearestSpreadsAGpusSlicesOverItsTwoLocalNicsAndFailsOver) {
  auto t = *kvx::topology::discover(fixture("two_socket_8gpu"));
  kvx::topology::rail::nearest sel(t);
  ASSERT_EQ(sel.rail_count(), 8u);
  std::map<std::size_t, int> used;
  for (std::size_t s = 0; s < 100; ++s) used[*sel.select({.gpu = 5, .numa = -1, .slice_index = s})]++;
  ASSERT_EQ(used.size(), 2u);
  for (auto [rail, n] : used) {
    EXPECT_EQ(n, 50);
    EXPECT_TRUE(sel.rail(rail).name == "mlx5_4" || sel.rail(rail).name == "mlx5_5") << sel.rail(rail).name;
  }
  // One local NIC fails: everything goes to the other; both fail: the next nearest (same root).
  sel.mark_failed(used.begin()->first);
  for (std::size_t s = 0; s < 10; ++s) EXPECT_EQ(*sel.select({5, -1, s}), std::next(used.begin())->first);
  sel.mark_failed(std::next(used.begin())->first);
  auto fallback = *sel.select({5, -1, 0});
  EXPECT_TRUE(sel.rail(fallback).name == "mlx5_6" || sel.rail(fallback).name == "mlx5_7");
  for (std::size_t i = 0; i < 8; ++i) sel.mark_failed(i);
  EXPECT_FALSE(sel.select({5, -1, 0}));
  sel.mark_healthy(3);
  EXPECT_EQ(*sel.select({5, -1, 0}), 3u);
}

TEST(RailSelector, RoundRobinStripesAndSkipsFailedRails) {
  kvx::topology::rail::round_robin rr(3);
  std::vector<std::size_t> seq;
  for (int i = 0; i < 6; ++i) seq.push_back(*rr.select({}));
  EXPECT_EQ(seq, (std::vector<std::size_t>{0, 1, 2, 0, 1, 2}));
  rr.mark_failed(1);
  for (int i = 0; i < 6; ++i) EXPECT_NE(*rr.select({}), 1u);
  rr.mark_failed(0);
  rr.mark_failed(2);
  EXPECT_FALSE(rr.select({}));
}

}  // namespace
