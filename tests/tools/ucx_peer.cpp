// A second process for the UCX tests and benchmark: registers one segment
// with a kvx::transport::ucx, prints its descriptor as one JSON line on
// stdout, then serves (progresses its worker) until killed.
//
//   kvx_test_ucx_peer <tls> <bytes> <seed> [allocate]
//
// The segment holds kvx::testing::fill_random(seed) so the test knows every
// byte; "allocate" puts it in memory allocated by UCX (one-sided on posix/sysv).
#include <kvx/transport/ucx.hpp>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>

#include <kvx/core/splitmix64.hpp>
#include <kvx/memory/segment_table.hpp>

namespace {
void fill(std::span<std::byte> out, std::uint64_t seed) {  // same as kvx::testing::fill_random
  std::uint64_t s = seed;
  std::size_t i = 0;
  for (; i < out.size(); i += 8) {
    const std::uint64_t z = kvx::splitmix64_next(s);
    std::memcpy(out.data() + i, &z, std::min<std::size_t>(8, out.size() - i));
  }
}
}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s <tls> <bytes> <seed> [allocate]\n", argv[0]);
    return 2;
  }
  const std::string tls = argv[1];
  const std::size_t bytes = std::strtoull(argv[2], nullptr, 10);
  const std::uint64_t seed = std::strtoull(argv[3], nullptr, 10);
  const bool allocate = argc > 4 && std::string(argv[4]) == "allocate";

  boost::asio::io_context io;
  kvx::transport::ucx_options options;
  if (tls != "default") options.tls = tls;
  auto t = kvx::transport::ucx::create(io.get_executor(), options);
  if (!t) {
    std::fprintf(stderr, "ucx_peer: %s\n", t.error().message().c_str());
    return 1;
  }
  std::vector<std::byte> plain;
  kvx::transport::ucx_buffer ucx_mem;
  kvx::memory::memory_region region;
  if (allocate) {
    auto b = t->allocate(bytes);
    if (!b) {
      std::fprintf(stderr, "ucx_peer: %s\n", b.error().message().c_str());
      return 1;
    }
    ucx_mem = std::move(*b);
    region = ucx_mem.region();
  } else {
    plain.resize(bytes);
    region = {plain.data(), plain.size()};
  }
  fill(region.bytes(), seed);
  kvx::memory::segment_table table("ucx-peer");
  auto seg = table.add("ucx-peer-segment", region);
  if (!seg) return 1;
  auto entry = t->register_memory(*seg);
  if (!entry) {
    std::fprintf(stderr, "ucx_peer: %s\n", entry.error().message().c_str());
    return 1;
  }
  auto desc = table.describe(*seg);
  desc.transports["ucx"] = *entry;
  std::cout << desc.to_json().dump() << std::endl;
  auto guard = boost::asio::make_work_guard(io);
  io.run();
  return 0;
}
