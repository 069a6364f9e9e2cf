// kvx-topo: prints the host topology kvx sees (NUMA nodes, GPUs, NICs with
// their netdevs and GID tables, and the GPU x NIC and NUMA node x NIC
// distance matrices) as JSON, for users checking rail selection.
#include <kvx/topology/topology.hpp>

#include <cstdio>
#include <cstring>
#include <iostream>
#include <string>

int main(int argc, char** argv) {
  std::string root = "/sys";
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--help") || !std::strcmp(argv[i], "-h")) {
      std::puts("usage: kvx-topo [--sysfs ROOT]\n"
                "Prints NUMA nodes, GPUs (PCI bus-id order), NICs (RDMA first, with netdevs and\n"
                "port 1's GID table) and the GPU x NIC and NUMA node x NIC distance matrices\n"
                "(same_device < same_switch < same_root < same_numa < cross_numa) as JSON.");
      return 0;
    }
    if (!std::strcmp(argv[i], "--sysfs") && i + 1 < argc) {
      root = argv[++i];
    } else {
      std::fprintf(stderr, "kvx-topo: unknown argument '%s' (see --help)\n", argv[i]);
      return 2;
    }
  }
  auto topo = kvx::topology::discover(root);
  if (!topo) {
    std::fprintf(stderr, "kvx-topo: %s\n", topo.error().message().c_str());
    return 1;
  }
  // Names come from the file system and need not be UTF-8: such bytes print as U+FFFD.
  std::cout << topo->to_json().dump(2, ' ', false, nlohmann::json::error_handler_t::replace) << '\n';
  return 0;
}
