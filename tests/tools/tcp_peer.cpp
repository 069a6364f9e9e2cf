// A second process for the tcp transport's tests and quick measurements.
//
//   kvx_test_tcp_peer serve --size BYTES --seed N [--connections C] [--socket-buffer BYTES]
//       Registers a BYTES segment filled with a seeded pattern with a tcp
//       transport, prints its descriptor as one JSON line, then serves until
//       killed.
//   kvx_test_tcp_peer raw-serve --direction send|recv [--block BYTES]
//       The reference: a plain blocking-socket stream. Prints its port, accepts
//       one connection and sends blocks until the peer goes (send) or reads
//       until EOF (recv).
//   kvx_test_tcp_peer bench [--block BYTES] [--total BYTES] [--connections C] [--depth D] [--op read|write]
//                           [--socket-buffer BYTES]
//       Starts a `serve` and a `raw-serve` child of this same program and
//       prints, as JSON, the GB/s of the tcp transport (C connections, D ops in
//       flight, ops of BLOCK bytes) beside the raw stream in the same run, and
//       CPU seconds per GB and context switches per MiB on both sides.

#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>

#include <kvx/core/bytes.hpp>
#include <kvx/transport/tcp.hpp>

// Tools are built without the tests' KVX_TEST_TOOLS_DIR; this one spawns itself by path.
#ifndef KVX_TEST_TOOLS_DIR
#define KVX_TEST_TOOLS_DIR "."
#endif
#include "support/child_process.hpp"

namespace {

namespace asio = boost::asio;

std::map<std::string, std::string> parse_flags(int argc, char** argv, int first) {
  std::map<std::string, std::string> flags;
  for (int i = first; i + 1 < argc; i += 2) flags[argv[i]] = argv[i + 1];
  return flags;
}

std::uint64_t size_flag(const std::map<std::string, std::string>& f, const std::string& name, std::uint64_t fallback) {
  auto it = f.find(name);
  if (it == f.end()) return fallback;
  auto v = kvx::parse_size(it->second);
  if (!v) {
    std::cerr << name << ": " << v.error().message() << "\n";
    std::exit(2);
  }
  return *v;
}

std::byte pattern_at(std::uint64_t i, std::uint64_t seed) {
  return static_cast<std::byte>((i * 131 + seed * 7 + (i >> 9)) & 0xff);
}

int serve(const std::map<std::string, std::string>& f) {
  const auto size = size_flag(f, "--size", 1 << 20);
  const auto seed = size_flag(f, "--seed", 1);
  asio::io_context io;
  kvx::transport::tcp::config cfg;
  cfg.connections = static_cast<unsigned>(size_flag(f, "--connections", 4));
  cfg.socket_buffer = size_flag(f, "--socket-buffer", 0);
  kvx::transport::tcp t(io.get_executor(), cfg);
  std::vector<std::byte> region(size);
  for (std::uint64_t i = 0; i < size; ++i) region[i] = pattern_at(i, seed);
  kvx::memory::segment_table table("tcp-peer");
  auto seg = table.add("tcp-peer-kv", {region.data(), region.size()});
  if (!seg) return std::cerr << seg.error().message() << "\n", 1;
  auto entry = t.register_memory(*seg);
  if (!entry) return std::cerr << entry.error().message() << "\n", 1;
  auto desc = table.describe(*seg);
  desc.transports["tcp"] = *entry;
  std::cout << desc.to_json().dump() << std::endl;
  io.run();
  return 0;
}

int raw_serve(const std::map<std::string, std::string>& f) {
  const bool send = f.count("--direction") && f.at("--direction") == "send";
  const auto block = size_flag(f, "--block", 1 << 20);
  asio::io_context io;
  asio::ip::tcp::acceptor acceptor(io, asio::ip::tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0));
  std::cout << acceptor.local_endpoint().port() << std::endl;
  asio::ip::tcp::socket s(io);
  acceptor.accept(s);
  s.set_option(asio::ip::tcp::no_delay(true));
  std::vector<std::byte> buf(block, std::byte{7});
  const int fd = s.native_handle();
  for (;;) {
    const auto n = send ? ::send(fd, buf.data(), buf.size(), MSG_NOSIGNAL) : ::recv(fd, buf.data(), buf.size(), 0);
    if (n <= 0) return 0;
  }
}

double cpu_seconds_self() {
  rusage u{};
  ::getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
         static_cast<double>(u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6;
}

double cpu_seconds_of(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::istringstream rest(stat.substr(stat.rfind(')') + 2));
  std::string field;
  unsigned long utime = 0, stime = 0;
  for (int i = 3; i <= 15 && rest >> field; ++i) {
    if (i == 14) utime = std::stoul(field);
    if (i == 15) stime = std::stoul(field);
  }
  return static_cast<double>(utime + stime) / static_cast<double>(::sysconf(_SC_CLK_TCK));
}

// Context switches (voluntary + involuntary) so far: each voluntary one is a
// sleep and a wakeup, the cost a non-blocking event loop adds over a blocking
// stream when the cores are busy.
std::uint64_t switches_self() {
  rusage u{};
  ::getrusage(RUSAGE_SELF, &u);
  return static_cast<std::uint64_t>(u.ru_nvcsw + u.ru_nivcsw);
}

std::uint64_t switches_of(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::uint64_t total = 0;
  for (std::string line; std::getline(in, line);)
    if (line.rfind("voluntary_ctxt_switches:", 0) == 0 || line.rfind("nonvoluntary_ctxt_switches:", 0) == 0)
      total += std::stoull(line.substr(line.find(':') + 1));
  return total;
}

struct side_cost {
  double cpu_seconds = 0;
  std::uint64_t switches = 0;
};

side_cost cost_self() { return {cpu_seconds_self(), switches_self()}; }
side_cost cost_of(pid_t pid) { return {cpu_seconds_of(pid), switches_of(pid)}; }

struct figure {
  double gbps;
  double client_cpu_per_gb;
  double server_cpu_per_gb;
  double client_switches_per_mib;
  double server_switches_per_mib;
};

figure make_figure(std::uint64_t bytes, double secs, side_cost c0, side_cost c1, side_cost s0, side_cost s1) {
  const double gb = static_cast<double>(bytes) / 1e9;
  const double mib = static_cast<double>(bytes) / static_cast<double>(1 << 20);
  return {gb / secs, (c1.cpu_seconds - c0.cpu_seconds) / gb, (s1.cpu_seconds - s0.cpu_seconds) / gb,
          static_cast<double>(c1.switches - c0.switches) / mib, static_cast<double>(s1.switches - s0.switches) / mib};
}

figure bench_tcp(const std::string& self, std::uint64_t block, std::uint64_t total, unsigned connections, unsigned depth,
                 std::uint64_t socket_buffer, bool write) {
  const std::uint64_t region_size = block * depth;
  kvx::test::child_process peer(self, {"serve", "--size", std::to_string(region_size), "--seed", "1", "--connections",
                                       std::to_string(connections), "--socket-buffer", std::to_string(socket_buffer)});
  auto line = peer.read_line();
  if (!line) throw std::runtime_error("serve child printed nothing");
  auto desc = *kvx::memory::segment_descriptor::from_json(nlohmann::json::parse(*line));
  asio::io_context io;
  kvx::transport::tcp::config cfg;
  cfg.serve = false;
  cfg.connections = connections;
  cfg.socket_buffer = socket_buffer;
  cfg.slice_size = std::max<std::uint64_t>(block / connections, 64 * 1024);
  kvx::transport::tcp t(io.get_executor(), cfg);
  std::vector<std::byte> local(region_size, std::byte{1});
  std::uint64_t issued = 0, completed = 0;
  std::error_code failure;
  std::function<void(unsigned)> issue = [&](unsigned slot) {
    if (issued * block >= total || failure) return;
    ++issued;
    auto done = [&, slot](std::error_code ec) {
      ++completed;
      if (ec) failure = ec;
      issue(slot);
    };
    const auto off = slot * block;
    if (write)
      t.async_write(desc, off, std::span<const std::byte>(local).subspan(off, block), done);
    else
      t.async_read(desc, off, std::span(local).subspan(off, block), done);
  };
  // Warm up: connect and fault in both buffers.
  for (unsigned s = 0; s < depth; ++s) issue(s);
  while (completed < issued) io.run_one();
  const auto c0 = cost_self();
  const auto s0 = cost_of(peer.pid());
  issued = completed = 0;
  const auto start = std::chrono::steady_clock::now();
  for (unsigned s = 0; s < depth; ++s) issue(s);
  while (completed < issued) io.run_one();
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (failure) throw std::runtime_error("tcp bench: " + failure.message());
  return make_figure(completed * block, secs, c0, cost_self(), s0, cost_of(peer.pid()));
}

figure bench_raw(const std::string& self, std::uint64_t block, std::uint64_t total, bool write) {
  // The reference peer sends when we read, and reads when we write.
  kvx::test::child_process peer(self, {"raw-serve", "--direction", write ? "recv" : "send", "--block", std::to_string(block)});
  auto line = peer.read_line();
  if (!line) throw std::runtime_error("raw-serve child printed nothing");
  asio::io_context io;
  asio::ip::tcp::socket s(io);
  s.connect(asio::ip::tcp::endpoint(asio::ip::make_address("127.0.0.1"), static_cast<std::uint16_t>(std::stoi(*line))));
  s.set_option(asio::ip::tcp::no_delay(true));
  std::vector<std::byte> buf(block, std::byte{3});
  const int fd = s.native_handle();
  auto move = [&](std::uint64_t bytes) {
    std::uint64_t done = 0;
    while (done < bytes) {
      const auto want = std::min<std::uint64_t>(buf.size(), bytes - done);
      const auto n = write ? ::send(fd, buf.data(), want, MSG_NOSIGNAL) : ::recv(fd, buf.data(), want, 0);
      if (n <= 0) throw std::runtime_error("raw stream broke");
      done += static_cast<std::uint64_t>(n);
    }
  };
  move(std::min<std::uint64_t>(total / 8, 64 << 20));  // warm up
  const auto c0 = cost_self();
  const auto s0 = cost_of(peer.pid());
  const auto start = std::chrono::steady_clock::now();
  move(total);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return make_figure(total, secs, c0, cost_self(), s0, cost_of(peer.pid()));
}

int bench(const std::string& self, const std::map<std::string, std::string>& f) {
  const auto block = size_flag(f, "--block", 1 << 20);
  const auto total = size_flag(f, "--total", 2ull << 30);
  const auto connections = static_cast<unsigned>(size_flag(f, "--connections", 1));
  const auto depth = static_cast<unsigned>(size_flag(f, "--depth", 4));
  const auto socket_buffer = size_flag(f, "--socket-buffer", 0);
  const bool write = f.count("--op") && f.at("--op") == "write";
  const auto raw = bench_raw(self, block, total, write);
  const auto t = bench_tcp(self, block, total, connections, depth, socket_buffer, write);
  nlohmann::json out{{"op", write ? "write" : "read"},
                     {"block", block},
                     {"total", total},
                     {"connections", connections},
                     {"depth", depth},
                     {"socket_buffer", socket_buffer},
                     {"tcp_gbps", t.gbps},
                     {"raw_stream_gbps", raw.gbps},
                     {"ratio", t.gbps / raw.gbps},
                     {"tcp_cpu_s_per_gb", {{"initiator", t.client_cpu_per_gb}, {"owner", t.server_cpu_per_gb}}},
                     {"raw_cpu_s_per_gb", {{"initiator", raw.client_cpu_per_gb}, {"peer", raw.server_cpu_per_gb}}},
                     {"tcp_switches_per_mib", {{"initiator", t.client_switches_per_mib}, {"owner", t.server_switches_per_mib}}},
                     {"raw_switches_per_mib", {{"initiator", raw.client_switches_per_mib}, {"peer", raw.server_switches_per_mib}}}};
  std::cout << out.dump() << std::endl;
  return 0;
}

std::string self_path(const char* argv0) {
  char buf[4096];
  const auto n = ::readlink("/proc/self/exe", buf, sizeof buf - 1);
  return n > 0 ? std::string(buf, static_cast<std::size_t>(n)) : std::string(argv0);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << "usage: " << argv[0] << " serve|raw-serve|bench [--flag value]...\n";
    return 2;
  }
  const std::string mode = argv[1];
  const auto flags = parse_flags(argc, argv, 2);
  try {
    if (mode == "serve") return serve(flags);
    if (mode == "raw-serve") return raw_serve(flags);
    if (mode == "bench") return bench(self_path(argv[0]), flags);
  } catch (const std::exception& e) {
    std::cerr << mode << ": " << e.what() << "\n";
    return 1;
  }
  std::cerr << "unknown mode '" << mode << "'\n";
  return 2;
}
