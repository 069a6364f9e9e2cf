#pragma once
//! \file
//! Host topology from sysfs: NUMA nodes and their CPUs, the PCIe tree, NICs
//! (RDMA devices and netdevs) and GPUs, and the distance between any two
//! devices, so rail selection can put each buffer on the NIC nearest to it
//! (Mooncake's Transfer Engine earns its bandwidth this way).
//!
//! Distances, nearest first (the classes NCCL users know):
//!
//! | value | name | meaning |
//! | --- | --- | --- |
//! | 0 | `same_device` | one device |
//! | 1 | `same_switch` | share a PCIe switch (a bridge below the root complex) |
//! | 2 | `same_root` | share only the root complex (host bridge) |
//! | 3 | `same_numa` | different root complexes of one NUMA node |
//! | 4 | `cross_numa` | through the inter-socket link |
//!
//! `discover("/sys")` reads the real machine; tests pass fixture trees
//! (`tests/data/topology/`). GPUs are numbered in PCI bus-id order, as CUDA
//! does with `CUDA_DEVICE_ORDER=PCI_BUS_ID`.
//!
//! \code
//! auto topo = kvx::topology::discover();            // result<system>
//! auto nics = topo->nearest_nics_to_gpu(0);         // indices into topo->nics
//! std::cout << topo->to_json().dump(2);
//! \endcode

#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include <nlohmann/json.hpp>

#include <kvx/core/result.hpp>

namespace kvx::topology {

enum class distance : int { same_device = 0, same_switch = 1, same_root = 2, same_numa = 3, cross_numa = 4 };

inline const char* to_string(distance d) noexcept {
  constexpr const char* names[] = {"same_device", "same_switch", "same_root", "same_numa", "cross_numa"};
  return names[static_cast<int>(d)];
}

struct numa_node {
  int id = 0;
  std::vector<int> cpus;
};

//! A PCI function and its path from the root complex (root first, itself last).
struct pci_device {
  std::string bdf;                 //!< "0000:17:00.0"
  std::string root;                //!< "pci0000:00"
  std::vector<std::string> path;   //!< bridges from the root down to (and including) this device
  std::uint32_t class_code = 0;
  std::uint16_t vendor = 0;
  int numa = -1;                   //!< -1: firmware did not say
};

//! One entry in use of an RDMA port's GID table, as sysfs lists it.
struct gid_entry {
  int index = 0;
  std::string gid;                 //!< as sysfs prints it: "fe80:0000:0000:0000:0a1b:2cff:fe3d:4e5f"
  std::string type;                //!< "IB/RoCE v1" or "RoCE v2"
  std::string netdev;              //!< the netdev a RoCE GID comes from ("" on InfiniBand)
};

struct nic {
  std::string name;                //!< RDMA device ("mlx5_0") or netdev ("eth0") name
  bool rdma = false;
  std::vector<std::string> netdevs;
  std::string bdf;
  int numa = -1;
  double gbps = 0;                 //!< link rate
  std::string link_layer;          //!< "InfiniBand", "Ethernet" (RoCE) for RDMA devices
  std::vector<gid_entry> gids;     //!< port 1's GIDs in use, by index (RDMA devices)
};

struct gpu {
  int index = 0;                   //!< PCI bus-id order
  std::string bdf;
  int numa = -1;
};

namespace detail {
inline std::string read_first_line(const std::filesystem::path& p) {
  std::ifstream in(p);
  std::string s;
  std::getline(in, s);
  return s;
}
inline std::uint64_t parse_hex(const std::string& s) {
  try {
    return std::stoull(s, nullptr, 16);
  } catch (...) {
    return 0;
  }
}
inline int parse_int(const std::string& s, int fallback) {
  try {
    return std::stoi(s);
  } catch (...) {
    return fallback;
  }
}
//! "0-3,8,10-11" -> {0,1,2,3,8,10,11}
inline std::vector<int> parse_cpulist(const std::string& text) {
  std::vector<int> out;
  std::size_t pos = 0;
  while (pos < text.size()) {
    auto comma = text.find(',', pos);
    auto part = text.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    auto dash = part.find('-');
    const int lo = parse_int(part.substr(0, dash), -1);
    const int hi = dash == std::string::npos ? lo : parse_int(part.substr(dash + 1), -1);
    for (int c = lo; c >= 0 && c <= hi; ++c) out.push_back(c);
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  return out;
}
// The trailing digits compare as a number of any length: without leading zeros, the shorter run is smaller,
// and runs of one length compare digit by digit (a device name is not bounded to 64 bits).
inline bool natural_less(const std::string& a, const std::string& b) {
  auto split = [](const std::string& s) {
    const std::string_view v(s);
    auto i = v.find_last_not_of("0123456789");
    i = i == std::string_view::npos ? 0 : i + 1;
    auto digits = v.substr(i);
    digits.remove_prefix(std::min(digits.find_first_not_of('0'), digits.size()));
    return std::tuple{v.substr(0, i), digits.size(), digits};
  };
  return split(a) < split(b);
}
inline bool is_bdf(const std::string& s) { return s.size() == 12 && s[4] == ':' && s[7] == ':' && s[10] == '.'; }

//! The GIDs in use under `port_dir` (".../ports/1"): unused entries read as
//! all zeros and have no readable type.
inline std::vector<gid_entry> read_gid_table(const std::filesystem::path& port_dir) {
  std::vector<gid_entry> out;
  std::error_code ec;
  for (std::filesystem::directory_iterator it(port_dir / "gids", ec), end; !ec && it != end; it.increment(ec)) {
    const auto name = it->path().filename().string();
    if (name.empty() || name.find_first_not_of("0123456789") != std::string::npos) continue;
    gid_entry g;
    g.index = parse_int(name, -1);
    g.gid = read_first_line(it->path());
    if (g.index < 0 || g.gid.find_first_not_of("0:") == std::string::npos) continue;
    g.type = read_first_line(port_dir / "gid_attrs/types" / name);
    if (g.type.empty()) continue;
    g.netdev = read_first_line(port_dir / "gid_attrs/ndevs" / name);
    out.push_back(std::move(g));
  }
  std::sort(out.begin(), out.end(), [](const gid_entry& a, const gid_entry& b) { return a.index < b.index; });
  return out;
}
}  // namespace detail

//! NUMA node of the page holding `p` (`get_mempolicy(MPOL_F_NODE |
//! MPOL_F_ADDR)`, which faults the page in if needed); -1 when the kernel
//! does not say (no NUMA support, a seccomp filter).
inline int numa_node_of(const void* p) noexcept {
  if (p == nullptr) return -1;
  int node = -1;
  constexpr unsigned long mpol_f_node = 1, mpol_f_addr = 2;
  if (syscall(SYS_get_mempolicy, &node, nullptr, 0UL, p, mpol_f_node | mpol_f_addr) != 0) return -1;
  return node;
}

//! What `discover` found.
struct system {
  std::vector<numa_node> numa_nodes;
  std::vector<pci_device> pci;
  std::vector<nic> nics;
  std::vector<gpu> gpus;

  [[nodiscard]] const pci_device* find_pci(const std::string& bdf) const {
    for (const auto& d : pci)
      if (d.bdf == bdf) return &d;
    return nullptr;
  }

  //! Distance between two PCI functions (by BDF); `cross_numa` when one is unknown.
  [[nodiscard]] distance between(const std::string& a, const std::string& b) const {
    if (a == b) return distance::same_device;
    const auto* da = find_pci(a);
    const auto* db = find_pci(b);
    if (!da || !db) return distance::cross_numa;
    if (da->root == db->root) {
      // Bridges both paths share below the root complex (the devices themselves excluded):
      // any shared bridge is a PCIe switch (or root port) both hang off.
      std::size_t common = 0;
      while (common + 1 < da->path.size() && common + 1 < db->path.size() && da->path[common] == db->path[common]) ++common;
      return common >= 1 ? distance::same_switch : distance::same_root;
    }
    if (da->numa >= 0 && da->numa == db->numa) return distance::same_numa;
    return distance::cross_numa;
  }

  //! Distance from a NUMA node's memory to a device.
  [[nodiscard]] distance from_numa(int node, const std::string& bdf) const {
    const auto* d = find_pci(bdf);
    if (!d || d->numa < 0 || node < 0) return numa_nodes.size() <= 1 ? distance::same_numa : distance::cross_numa;
    return d->numa == node ? distance::same_numa : distance::cross_numa;
  }

  //! NIC indices sorted nearest first to GPU `index` (ties keep discovery order).
  [[nodiscard]] std::vector<std::size_t> nearest_nics_to_gpu(int index, bool rdma_only = true) const {
    const auto it = std::find_if(gpus.begin(), gpus.end(), [&](const gpu& g) { return g.index == index; });
    return rank([&](const nic& n) { return it == gpus.end() ? distance::cross_numa : between(it->bdf, n.bdf); }, rdma_only);
  }

  //! NIC indices sorted nearest first to host memory on NUMA node `node`.
  [[nodiscard]] std::vector<std::size_t> nearest_nics_to_numa(int node, bool rdma_only = true) const {
    return rank([&](const nic& n) { return from_numa(node, n.bdf); }, rdma_only);
  }

  //! Distance matrix NUMA nodes x NICs: where host memory of each node should leave.
  [[nodiscard]] std::vector<std::vector<distance>> numa_nic_matrix() const {
    return nic_matrix(numa_nodes, [&](const numa_node& node, const nic& n) { return from_numa(node.id, n.bdf); });
  }

  //! Distance matrix GPUs x NICs, for users and the JSON dump.
  [[nodiscard]] std::vector<std::vector<distance>> gpu_nic_matrix() const {
    return nic_matrix(gpus, [&](const gpu& g, const nic& n) { return between(g.bdf, n.bdf); });
  }

  [[nodiscard]] nlohmann::json to_json() const {
    nlohmann::json j;
    for (const auto& n : numa_nodes) j["numa_nodes"].push_back({{"id", n.id}, {"cpus", n.cpus}});
    for (const auto& g : gpus) j["gpus"].push_back({{"index", g.index}, {"bdf", g.bdf}, {"numa", g.numa}});
    for (const auto& n : nics) {
      auto gids = nlohmann::json::array();
      for (const auto& g : n.gids)
        gids.push_back({{"index", g.index}, {"gid", g.gid}, {"type", g.type}, {"netdev", g.netdev}});
      j["nics"].push_back({{"name", n.name}, {"rdma", n.rdma}, {"netdevs", n.netdevs}, {"bdf", n.bdf}, {"numa", n.numa},
                           {"gbps", n.gbps}, {"link_layer", n.link_layer}, {"gids", std::move(gids)}});
    }
    auto matrix = [](const std::vector<std::vector<distance>>& rows) {
      auto m = nlohmann::json::array();
      for (const auto& row : rows) {
        auto& r = m.emplace_back(nlohmann::json::array());
        for (auto d : row) r.push_back(to_string(d));
      }
      return m;
    };
    j["gpu_nic_distance"] = matrix(gpu_nic_matrix());
    j["numa_nic_distance"] = matrix(numa_nic_matrix());
    return j;
  }

 private:
  // One row per element of `rows`, one column per NIC.
  template <class Rows, class Distance>
  std::vector<std::vector<distance>> nic_matrix(const Rows& rows, Distance&& dist) const {
    std::vector<std::vector<distance>> m;
    for (const auto& from : rows) {
      auto& row = m.emplace_back();
      for (const auto& n : nics) row.push_back(dist(from, n));
    }
    return m;
  }

  template <class DistanceTo>
  std::vector<std::size_t> rank(DistanceTo&& dist, bool rdma_only) const {
    std::vector<std::size_t> idx;
    for (std::size_t i = 0; i < nics.size(); ++i)
      if (!rdma_only || nics[i].rdma) idx.push_back(i);
    std::stable_sort(idx.begin(), idx.end(), [&](std::size_t a, std::size_t b) {
      return static_cast<int>(dist(nics[a])) < static_cast<int>(dist(nics[b]));
    });
    return idx;
  }
};

//! Reads the topology under `sysfs_root` ("/sys" on a real machine).
inline result<system> discover(const std::filesystem::path& sysfs_root = "/sys") {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::is_directory(sysfs_root, ec))
    return error{errc::not_found, "sysfs root '" + sysfs_root.string() + "' is not a directory"};
  system s;
  const auto node_dir = sysfs_root / "devices/system/node";
  for (fs::directory_iterator it(node_dir, ec), end; !ec && it != end; it.increment(ec)) {
    const auto name = it->path().filename().string();
    if (name.rfind("node", 0) != 0 || name.size() == 4) continue;
    const int id = detail::parse_int(name.substr(4), -1);
    if (id < 0) continue;
    s.numa_nodes.push_back({id, detail::parse_cpulist(detail::read_first_line(it->path() / "cpulist"))});
  }
  std::sort(s.numa_nodes.begin(), s.numa_nodes.end(), [](const numa_node& a, const numa_node& b) { return a.id < b.id; });

  // PCI functions: bus/pci/devices/<bdf> links into devices/pciDDDD:BB/<bridge>/.../<bdf>.
  const auto pci_dir = sysfs_root / "bus/pci/devices";
  for (fs::directory_iterator it(pci_dir, ec), end; !ec && it != end; it.increment(ec)) {
    const auto real = fs::weakly_canonical(it->path(), ec);
    if (ec) {
      ec.clear();
      continue;
    }
    pci_device d;
    d.bdf = it->path().filename().string();
    for (const auto& part : real) {
      const auto p = part.string();
      if (p.rfind("pci", 0) == 0 && p.size() > 3 && p.find(':') != std::string::npos) {
        d.root = p;
        d.path.clear();
      } else if (!d.root.empty() && detail::is_bdf(p)) {
        d.path.push_back(p);
      }
    }
    d.class_code = static_cast<std::uint32_t>(detail::parse_hex(detail::read_first_line(real / "class")));
    d.vendor = static_cast<std::uint16_t>(detail::parse_hex(detail::read_first_line(real / "vendor")));
    d.numa = detail::parse_int(detail::read_first_line(real / "numa_node"), -1);
    s.pci.push_back(std::move(d));
  }
  ec.clear();
  std::sort(s.pci.begin(), s.pci.end(), [](const pci_device& a, const pci_device& b) { return a.bdf < b.bdf; });

  // GPUs: display (0x03xxxx) class from NVIDIA (0x10de), in bus-id order.
  for (const auto& d : s.pci)
    if ((d.class_code >> 16) == 0x03 && d.vendor == 0x10de)
      s.gpus.push_back({static_cast<int>(s.gpus.size()), d.bdf, d.numa});

  auto bdf_of = [&](const fs::path& dev_link) -> std::string {
    const auto real = fs::weakly_canonical(dev_link, ec);
    if (ec) {
      ec.clear();
      return {};
    }
    const auto name = real.filename().string();
    return detail::is_bdf(name) ? name : std::string{};
  };
  auto numa_of = [&](const std::string& bdf) {
    const auto* d = s.find_pci(bdf);
    return d ? d->numa : -1;
  };

  for (fs::directory_iterator it(sysfs_root / "class/infiniband", ec), end; !ec && it != end; it.increment(ec)) {
    nic n;
    n.name = it->path().filename().string();
    n.rdma = true;
    n.bdf = bdf_of(it->path() / "device");
    n.numa = numa_of(n.bdf);
    const auto rate = detail::read_first_line(it->path() / "ports/1/rate");
    n.gbps = rate.empty() ? 0.0 : std::atof(rate.c_str());
    n.link_layer = detail::read_first_line(it->path() / "ports/1/link_layer");
    n.gids = detail::read_gid_table(it->path() / "ports/1");
    s.nics.push_back(std::move(n));
  }
  ec.clear();
  for (fs::directory_iterator it(sysfs_root / "class/net", ec), end; !ec && it != end; it.increment(ec)) {
    const auto name = it->path().filename().string();
    const auto bdf = bdf_of(it->path() / "device");
    auto owner = std::find_if(s.nics.begin(), s.nics.end(), [&](const nic& n) { return n.rdma && !bdf.empty() && n.bdf == bdf; });
    if (owner != s.nics.end()) {
      owner->netdevs.push_back(name);
      continue;
    }
    if (bdf.empty()) continue;  // virtual interfaces (lo, bridges, virtio without PCI) carry no placement information
    nic n;
    n.name = name;
    n.netdevs = {name};
    n.bdf = bdf;
    n.numa = numa_of(bdf);
    n.gbps = detail::parse_int(detail::read_first_line(it->path() / "speed"), 0) / 1000.0;
    s.nics.push_back(std::move(n));
  }
  ec.clear();
  // RDMA devices first, then by name with numbers compared as numbers (mlx5_2 < mlx5_10).
  std::sort(s.nics.begin(), s.nics.end(), [](const nic& a, const nic& b) {
    if (a.rdma != b.rdma) return a.rdma;
    return detail::natural_less(a.name, b.name);
  });
  return s;
}

}  // namespace kvx::topology
