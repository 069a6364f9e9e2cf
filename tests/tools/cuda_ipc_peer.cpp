// A second process that owns a GPU segment for the cuda_ipc transport's
// two-process tests: allocates --size bytes on device 0, fills them with a
// seeded pattern, registers them and prints the descriptor as one JSON line.
// Then, until killed:
//   SIGUSR1: deregisters the segment (revocation) and prints "revoked";
//   SIGUSR2: copies the segment to the host and prints "hash <fnv1a-64>".
//
//   kvx_test_cuda_ipc_peer --size 8388608 --seed 7

#include <kvx/cuda/memory.hpp>
#include <kvx/transport/cuda_ipc.hpp>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/signal_set.hpp>

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

#include "support/cuda_pattern.hpp"

int main(int argc, char** argv) {
  std::size_t size = 1 << 20;
  unsigned seed = 1;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--size") size = std::strtoull(argv[i + 1], nullptr, 10);
    else if (flag == "--seed") seed = static_cast<unsigned>(std::strtoul(argv[i + 1], nullptr, 10));
    else {
      std::cerr << "cuda_ipc_peer: unknown flag " << flag << "\n";
      return 2;
    }
  }
  auto fail = [](const std::string& what) {
    std::cout << "error " << what << std::endl;
    return 1;
  };
  auto gpu = kvx::cuda::device_buffer::allocate(size, 0);
  if (!gpu) return fail(gpu.error().message());
  std::vector<std::byte> host(size);
  kvx::test::fill_pattern(host, seed);
  if (cudaMemcpy(gpu->data(), host.data(), size, cudaMemcpyHostToDevice) != cudaSuccess) return fail("cudaMemcpy");

  boost::asio::io_context io;
  kvx::transport::cuda_ipc transport(io.get_executor());
  kvx::memory::segment_table table("cuda-ipc-peer");
  auto seg = table.add("peer-gpu", gpu->region());
  if (!seg) return fail(seg.error().message());
  auto entry = transport.register_memory(*seg);
  if (!entry) return fail(entry.error().message());
  auto desc = table.describe(*seg);
  desc.transports["cuda_ipc"] = *entry;
  std::cout << desc.to_json().dump() << std::endl;

  boost::asio::signal_set signals(io, SIGUSR1, SIGUSR2);
  std::function<void()> wait_signal = [&] {
    signals.async_wait([&](boost::system::error_code ec, int sig) {
      if (ec) return;
      if (sig == SIGUSR1) {
        auto r = transport.deregister_memory(*seg);
        std::cout << (r ? "revoked" : "error " + r.error().message()) << std::endl;
      } else {
        if (cudaMemcpy(host.data(), gpu->data(), size, cudaMemcpyDeviceToHost) != cudaSuccess)
          std::cout << "error cudaMemcpy" << std::endl;
        else
          std::cout << "hash " << kvx::test::fnv1a(host) << std::endl;
      }
      wait_signal();
    });
  };
  wait_signal();
  auto guard = boost::asio::make_work_guard(io);
  io.run();
}
