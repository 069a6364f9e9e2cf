// ucx_bench: bandwidth and latency of kvx::transport::ucx between two
// processes on this host, beside ucx_perftest (ucp_put_bw, ucp_put_lat) run
// in the same invocation with the same UCX_TLS and message sizes.
//
//   ucx_bench --tls posix [--sizes 65536,1048576,67108864] [--memory ucx|plain]
//             [--window 16] [--seconds 1] [--json results.jsonl] [--perftest ucx_perftest]
//
// The target is this binary started again with --serve; it registers one
// segment and serves until killed. kvx writes are put + flush (remotely
// visible at completion); ucx_perftest's put_bw counts local completion, so
// the comparison is conservative for kvx.
#include <kvx/transport/ucx.hpp>

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <iostream>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>

#include <kvx/memory/segment_table.hpp>

extern char** environ;

namespace {

namespace asio = boost::asio;
using clock_type = std::chrono::steady_clock;

struct args_t {
  std::string tls = "posix";
  std::vector<std::uint64_t> sizes{64u << 10, 1u << 20, 64u << 20};
  std::string memory = "ucx";
  int window = 16;
  double seconds = 1.0;
  std::string json;
  std::string perftest = "ucx_perftest";
  bool serve = false;
  std::uint64_t serve_bytes = 0;
};

// A child process with its stdout piped to us (stderr inherited).
struct child {
  pid_t pid = -1;
  int out = -1;
  std::string buf;
  child(const std::vector<std::string>& argv, const std::vector<std::string>& extra_env) {
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0) throw std::runtime_error("pipe2");
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, fds[1], STDOUT_FILENO);
    std::vector<std::string> env_storage;
    for (char** e = environ; *e; ++e) {
      std::string kv = *e;
      bool overridden = false;
      for (auto& x : extra_env) overridden = overridden || kv.substr(0, kv.find('=') + 1) == x.substr(0, x.find('=') + 1);
      if (!overridden) env_storage.push_back(kv);
    }
    env_storage.insert(env_storage.end(), extra_env.begin(), extra_env.end());
    std::vector<char*> envp, av;
    for (auto& s : env_storage) envp.push_back(s.data());
    envp.push_back(nullptr);
    std::vector<std::string> a = argv;
    for (auto& s : a) av.push_back(s.data());
    av.push_back(nullptr);
    const int rc = ::posix_spawnp(&pid, a[0].c_str(), &fa, nullptr, av.data(), envp.data());
    posix_spawn_file_actions_destroy(&fa);
    ::close(fds[1]);
    out = fds[0];
    if (rc != 0) throw std::runtime_error("cannot start " + a[0]);
  }
  ~child() {
    if (pid > 0) {
      ::kill(pid, SIGKILL);
      int st;
      ::waitpid(pid, &st, 0);
    }
    ::close(out);
  }
  std::optional<std::string> line(int timeout_ms) {
    const auto deadline = clock_type::now() + std::chrono::milliseconds(timeout_ms);
    for (;;) {
      if (auto p = buf.find('\n'); p != std::string::npos) {
        auto l = buf.substr(0, p);
        buf.erase(0, p + 1);
        return l;
      }
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - clock_type::now()).count();
      if (left <= 0) return std::nullopt;
      pollfd pfd{out, POLLIN, 0};
      if (::poll(&pfd, 1, static_cast<int>(left)) <= 0) return std::nullopt;
      char c[4096];
      auto n = ::read(out, c, sizeof c);
      if (n <= 0) return std::nullopt;
      buf.append(c, static_cast<std::size_t>(n));
    }
  }
  int wait_exit() {
    int st = 0;
    ::waitpid(pid, &st, 0);
    pid = -1;
    return st;
  }
};

int serve(const args_t& a) {
  asio::io_context io;
  kvx::transport::ucx t(io.get_executor(), {.tls = a.tls});
  std::vector<std::byte> plain;
  kvx::transport::ucx_buffer mem;
  kvx::memory::memory_region region;
  if (a.memory == "ucx") {
    mem = std::move(*t.allocate(a.serve_bytes));
    region = mem.region();
  } else {
    plain.resize(a.serve_bytes);
    region = {plain.data(), plain.size()};
  }
  std::memset(region.address, 1, region.length);  // pre-fault
  kvx::memory::segment_table table("ucx-bench-target");
  auto seg = *table.add("ucx-bench", region);
  auto entry = t.register_memory(seg);
  if (!entry) {
    std::cerr << entry.error().message() << "\n";
    return 1;
  }
  auto d = table.describe(seg);
  d.transports["ucx"] = *entry;
  std::cout << d.to_json().dump() << std::endl;
  auto guard = asio::make_work_guard(io);
  io.run();
  return 0;
}

struct kvx_result {
  double gbps = 0;
  double read_gbps = 0;
};

// Bandwidth: `window` writes of `size` bytes in flight, re-issued as each completes.
double kvx_bandwidth(asio::io_context& io, kvx::transport::ucx& t, const kvx::memory::segment_descriptor& d,
                     std::span<std::byte> local, std::uint64_t size, int window, double seconds, bool write,
                     std::uint64_t& bytes_moved) {
  std::uint64_t done_bytes = 0;
  int in_flight = 0;
  bool stop = false;
  std::error_code failure;
  const auto start = clock_type::now();
  const auto until = start + std::chrono::duration<double>(seconds);
  std::function<void()> issue = [&] {
    ++in_flight;
    auto h = [&](std::error_code ec) {
      --in_flight;
      if (ec) failure = ec;
      done_bytes += size;
      if (clock_type::now() >= until || failure) stop = true;
      if (!stop) issue();
    };
    if (write) t.async_write(d, 0, std::span<const std::byte>(local.first(size)), h);
    else t.async_read(d, 0, local.first(size), h);
  };
  for (int i = 0; i < window; ++i) issue();
  while (in_flight > 0) io.run_one();
  const double secs = std::chrono::duration<double>(clock_type::now() - start).count();
  if (failure) throw std::runtime_error("kvx op failed: " + failure.message());
  bytes_moved = done_bytes;
  return static_cast<double>(done_bytes) / secs / 1e9;
}

// Latency: one op in flight; the median of `n` completions, in microseconds.
double kvx_latency(asio::io_context& io, kvx::transport::ucx& t, const kvx::memory::segment_descriptor& d,
                   std::span<std::byte> local, std::uint64_t size, int n, bool write) {
  std::vector<double> us;
  us.reserve(n);
  for (int i = 0; i < n + 100; ++i) {
    bool done = false;
    std::error_code err;
    const auto s = clock_type::now();
    if (write) t.async_write(d, 0, std::span<const std::byte>(local.first(size)), [&](std::error_code ec) { done = true; err = ec; });
    else t.async_read(d, 0, local.first(size), [&](std::error_code ec) { done = true; err = ec; });
    while (!done) io.run_one();
    if (err) throw std::runtime_error("kvx op failed: " + err.message());
    if (i >= 100) us.push_back(std::chrono::duration<double, std::micro>(clock_type::now() - s).count());
  }
  std::nth_element(us.begin(), us.begin() + us.size() / 2, us.end());
  return us[us.size() / 2];
}

// ucx_perftest client+server on 127.0.0.1; returns the "Final:" fields.
std::vector<double> perftest(const args_t& a, const std::string& test, std::uint64_t size, std::uint64_t iters) {
  const std::string port = std::to_string(20000 + (::getpid() * 7 + static_cast<int>(size % 997)) % 20000);
  std::vector<std::string> env{"UCX_TLS=" + a.tls};
  child server({a.perftest, "-p", port}, env);
  ::usleep(300000);
  std::vector<std::double_t> fields;
  for (int attempt = 0; attempt < 3 && fields.empty(); ++attempt) {
    child client({a.perftest, "127.0.0.1", "-p", port, "-t", test, "-s", std::to_string(size), "-n",
                  std::to_string(iters), "-w", std::to_string(std::min<std::uint64_t>(iters / 10 + 1, 100))},
                 env);
    while (auto l = client.line(120000)) {
      if (l->rfind("Final:", 0) == 0) {
        std::istringstream in(l->substr(6));
        double v;
        while (in >> v) fields.push_back(v);
      }
    }
    client.wait_exit();
    if (fields.empty()) ::usleep(300000);
  }
  if (fields.size() < 8) throw std::runtime_error("ucx_perftest " + test + " gave no result (is ucx-utils installed?)");
  return fields;  // iters, lat p50, lat avg, lat overall, bw avg, bw overall (MB/s = 2^20), rate avg, rate overall
}

std::vector<std::uint64_t> parse_sizes(const std::string& s) {
  std::vector<std::uint64_t> out;
  std::stringstream in(s);
  std::string tok;
  while (std::getline(in, tok, ',')) out.push_back(std::stoull(tok));
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  args_t a;
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) throw std::runtime_error("missing value for " + k);
      return argv[++i];
    };
    if (k == "--tls") a.tls = next();
    else if (k == "--sizes") a.sizes = parse_sizes(next());
    else if (k == "--memory") a.memory = next();
    else if (k == "--window") a.window = std::stoi(next());
    else if (k == "--seconds") a.seconds = std::stod(next());
    else if (k == "--json") a.json = next();
    else if (k == "--perftest") a.perftest = next();
    else if (k == "--serve") { a.serve = true; a.serve_bytes = std::stoull(next()); }
    else {
      std::cerr << "usage: ucx_bench --tls T [--sizes a,b,c] [--memory ucx|plain] [--window N] [--seconds S] [--json FILE]\n";
      return 2;
    }
  }
  if (a.memory != "ucx" && a.memory != "plain") {
    std::cerr << "--memory must be ucx or plain\n";
    return 2;
  }
  if (a.serve) return serve(a);

  const std::uint64_t max_size = std::max<std::uint64_t>(*std::max_element(a.sizes.begin(), a.sizes.end()), 4096);
  child target({"/proc/self/exe", "--serve", std::to_string(max_size), "--tls", a.tls, "--memory", a.memory}, {});
  auto line = target.line(20000);
  if (!line) {
    std::cerr << "target printed no descriptor\n";
    return 1;
  }
  auto desc = *kvx::memory::segment_descriptor::from_json(nlohmann::json::parse(*line));

  asio::io_context io;
  kvx::transport::ucx t(io.get_executor(), {.tls = a.tls});
  kvx::transport::ucx_buffer lmem;
  std::vector<std::byte> lplain;
  std::span<std::byte> local;
  if (a.memory == "ucx") {
    lmem = std::move(*t.allocate(max_size));
    local = lmem.bytes();
  } else {
    lplain.resize(max_size);
    local = lplain;
  }
  std::memset(local.data(), 2, local.size());
  kvx::memory::segment_table table("ucx-bench-initiator");
  auto lseg = *table.add("ucx-bench-local", {local.data(), local.size()});
  (void)*t.register_memory(lseg);

  std::ofstream json;
  if (!a.json.empty()) json.open(a.json, std::ios::app);
  std::printf("UCX_TLS=%s memory=%s window=%d\n", a.tls.c_str(), a.memory.c_str(), a.window);
  std::printf("%10s %14s %14s %14s %8s\n", "size", "kvx write GB/s", "kvx read GB/s", "perftest GB/s", "ratio");
  for (auto size : a.sizes) {
    std::uint64_t moved = 0, moved_r = 0;
    kvx_bandwidth(io, t, desc, local, size, a.window, std::min(0.2, a.seconds), true, moved);  // warm-up
    const double w = kvx_bandwidth(io, t, desc, local, size, a.window, a.seconds, true, moved);
    const double r = kvx_bandwidth(io, t, desc, local, size, a.window, a.seconds, false, moved_r);
    const auto iters = std::max<std::uint64_t>(moved / size, 20);
    auto pf = perftest(a, "ucp_put_bw", size, iters);
    const double p = pf[5] * 1048576.0 / 1e9;
    std::printf("%10llu %14.3f %14.3f %14.3f %8.2f\n", static_cast<unsigned long long>(size), w, r, p, w / p);
    if (json.is_open())
      json << nlohmann::json{{"tls", a.tls}, {"memory", a.memory}, {"kind", "bandwidth"}, {"size", size},
                             {"kvx_write_gbps", w}, {"kvx_read_gbps", r}, {"perftest_put_gbps", p},
                             {"ratio", w / p}}.dump()
           << "\n";
  }
  const double lw = kvx_latency(io, t, desc, local, 4096, 2000, true);
  const double lr = kvx_latency(io, t, desc, local, 4096, 2000, false);
  auto pl = perftest(a, "ucp_put_lat", 4096, 2000);
  std::printf("4 KiB latency p50: kvx write %.2f us, kvx read %.2f us, ucx_perftest put_lat %.2f us; ratio %.2f\n", lw,
              lr, pl[1], lw / pl[1]);
  if (json.is_open())
    json << nlohmann::json{{"tls", a.tls}, {"memory", a.memory}, {"kind", "latency"}, {"size", 4096},
                           {"kvx_write_us", lw}, {"kvx_read_us", lr}, {"perftest_put_lat_us", pl[1]},
                           {"ratio", lw / pl[1]}}.dump()
         << "\n";
  return 0;
}
