// A second process that owns a segment for the shm transport's two-process
// tests: allocates it (memfd-backed with --memory memfd, plain heap memory
// with --memory heap), fills it with a seeded pattern, registers it and
// prints its descriptor as one JSON line; then serves until killed.
//
//   kvx_test_shm_peer --size 1048576 --memory memfd --seed 7

#include <kvx/transport/shm.hpp>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>

#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

namespace {
std::byte pattern(std::size_t i, unsigned seed) { return std::byte(static_cast<unsigned char>((i * 131 + seed) ^ (i >> 9))); }
}  // namespace

int main(int argc, char** argv) {
  std::size_t size = 1 << 20;
  std::string memory = "memfd";
  unsigned seed = 1;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--size") size = std::strtoull(argv[i + 1], nullptr, 10);
    else if (flag == "--memory") memory = argv[i + 1];
    else if (flag == "--seed") seed = static_cast<unsigned>(std::strtoul(argv[i + 1], nullptr, 10));
    else {
      std::cerr << "shm_peer: unknown flag " << flag << "\n";
      return 2;
    }
  }
  boost::asio::io_context io;
  kvx::transport::shm transport(io.get_executor());
  kvx::transport::shm_memory shared;
  std::vector<std::byte> heap;
  kvx::memory::memory_region region;
  if (memory == "memfd") {
    auto m = kvx::transport::shm_allocate(size);
    if (!m) {
      std::cerr << "shm_peer: " << m.error().message() << "\n";
      return 1;
    }
    shared = std::move(*m);
    region = shared.region();
  } else {
    heap.resize(size);
    region = {heap.data(), heap.size()};
  }
  for (std::size_t i = 0; i < size; ++i) region.data()[i] = pattern(i, seed);
  kvx::memory::segment_table table("shm-peer");
  auto seg = table.add("peer-segment", region);
  auto entry = seg ? transport.register_memory(*seg) : kvx::result<nlohmann::json>(seg.error());
  if (!entry) {
    std::cerr << "shm_peer: " << entry.error().message() << "\n";
    return 1;
  }
  auto desc = table.describe(*seg);
  desc.transports["shm"] = *entry;
  std::cout << desc.to_json().dump() << std::endl;
  auto guard = boost::asio::make_work_guard(io);
  io.run();
}
