// transfer_bench: bandwidth, op rate, latency and CPU cost of kvx transports,
// in the spirit of Mooncake's transfer_engine_bench, with the references
// measured in the same run: single-thread memcpy of the same block size, and
// for tcp a plain blocking-socket stream between two processes on loopback
// (what iperf3 does; iperf3 itself too when installed).
//
//   transfer_bench --transport shm --op read --block-size 1M --batch-size 16 --duration 2 --mode both
//   transfer_bench --transport tcp --mode target                 # prints its segment as one JSON line
//   transfer_bench --transport tcp --mode initiator --segment-json '<line>'
//
// Transports are driven directly through the transport concept: each thread
// submits a batch of --batch-size ops of --block-size bytes (distinct remote
// offsets), waits for all of them (driving the shared io_context itself) and
// repeats for --duration seconds.

#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <spawn.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <nlohmann/json.hpp>

#include <kvx/features.hpp>
#include <kvx/memory/segment_table.hpp>
#include <kvx/transport/local.hpp>
#include <kvx/transport/shm.hpp>
#if __has_include(<kvx/transport/tcp.hpp>)
#include <kvx/transport/tcp.hpp>
#define KVX_BENCH_HAS_TCP 1
#else
#define KVX_BENCH_HAS_TCP 0
#endif
#if KVX_WITH_UCX && __has_include(<kvx/transport/ucx.hpp>)
#include <kvx/transport/ucx.hpp>
#define KVX_BENCH_HAS_UCX 1
#else
#define KVX_BENCH_HAS_UCX 0
#endif

extern char** environ;

namespace {

namespace asio = boost::asio;
using clock_type = std::chrono::steady_clock;

struct options {
  std::string transport = "shm";
  std::string op = "read";
  std::uint64_t block = 1 << 20;
  unsigned batch = 16;
  unsigned threads = 1;
  double duration = 2.0;
  std::string mode = "both";
  std::string segment_json;
  std::string json_out;
  std::string memory = "memfd";  // shm target memory: memfd (shm_allocate) or heap (process_vm path)
  unsigned connections = 1;      // tcp connections per peer
  bool references = true;
  bool iperf3 = true;
  std::vector<std::string> raw_args;
};

[[noreturn]] void usage(const std::string& why) {
  std::cerr << "transfer_bench: " << why << "\n"
            << "usage: transfer_bench --transport local|tcp|shm|ucx --op read|write --block-size N[K|M]\n"
               "         --batch-size N --threads N --duration SECONDS --mode target|initiator|both\n"
               "         [--segment-json JSON|@FILE] [--json OUT] [--memory memfd|heap] [--connections N]\n"
               "         [--no-references] [--no-iperf3]\n";
  std::exit(2);
}

std::uint64_t parse_size(const std::string& s) {
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  std::uint64_t mult = 1;
  if (*end == 'K' || *end == 'k') mult = 1024;
  else if (*end == 'M' || *end == 'm') mult = 1024 * 1024;
  else if (*end == 'G' || *end == 'g') mult = 1024ull * 1024 * 1024;
  else if (*end != '\0') usage("bad size '" + s + "'");
  if (v <= 0) usage("size must be positive: '" + s + "'");
  return static_cast<std::uint64_t>(v * static_cast<double>(mult));
}

options parse(int argc, char** argv) {
  options o;
  for (int i = 1; i < argc; ++i) o.raw_args.emplace_back(argv[i]);
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage(a + " needs a value");
      return argv[++i];
    };
    if (a == "--transport") o.transport = value();
    else if (a == "--op") o.op = value();
    else if (a == "--block-size") o.block = parse_size(value());
    else if (a == "--batch-size") o.batch = static_cast<unsigned>(std::stoul(value()));
    else if (a == "--threads") o.threads = static_cast<unsigned>(std::stoul(value()));
    else if (a == "--duration") o.duration = std::stod(value());
    else if (a == "--mode") o.mode = value();
    else if (a == "--segment-json") o.segment_json = value();
    else if (a == "--json") o.json_out = value();
    else if (a == "--memory") o.memory = value();
    else if (a == "--connections") o.connections = static_cast<unsigned>(std::stoul(value()));
    else if (a == "--no-references") o.references = false;
    else if (a == "--no-iperf3") o.iperf3 = false;
    else usage("unknown flag " + a);
  }
  if (o.op != "read" && o.op != "write") usage("--op must be read or write");
  if (o.mode != "target" && o.mode != "initiator" && o.mode != "both") usage("--mode must be target, initiator or both");
  if (o.batch == 0 || o.threads == 0 || o.duration <= 0) usage("batch, threads and duration must be positive");
  if (o.memory != "memfd" && o.memory != "heap") usage("--memory must be memfd or heap");
  return o;
}

// Pre-faulted anonymous memory: page faults must not land inside a measurement.
struct buffer {
  std::byte* data = nullptr;
  std::size_t size = 0;
  explicit buffer(std::size_t n) : size(n) {
    void* p = ::mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("mmap " + std::to_string(n) + " bytes failed");
    data = static_cast<std::byte*>(p);
    std::memset(data, 0x5a, n);
  }
  buffer(const buffer&) = delete;
  ~buffer() { ::munmap(data, size); }
};

double cpu_seconds_self() {
  rusage ru{};
  ::getrusage(RUSAGE_SELF, &ru);
  return static_cast<double>(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
         static_cast<double>(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

// utime + stime of another process, from /proc/<pid>/stat (fields 14 and 15).
std::optional<double> cpu_seconds_of(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const auto close = text.rfind(')');
  if (close == std::string::npos) return std::nullopt;
  std::istringstream fields(text.substr(close + 2));
  std::string f;
  double ticks = 0;
  for (int i = 3; i <= 15 && fields >> f; ++i)
    if (i >= 14) ticks += std::stod(f);
  return ticks / static_cast<double>(::sysconf(_SC_CLK_TCK));
}

// ---- references ---------------------------------------------------------------

// Single-thread memcpy of `block`-sized pieces over the same working set the transport touches.
double memcpy_gbps(std::uint64_t block, std::uint64_t working_set, double seconds) {
  buffer src(working_set), dst(working_set);
  std::uint64_t bytes = 0;
  const auto start = clock_type::now();
  const auto stop = start + std::chrono::duration<double>(seconds);
  while (clock_type::now() < stop)
    for (std::uint64_t off = 0; off + block <= working_set; off += block) {
      std::memcpy(dst.data + off, src.data + off, block);
      bytes += block;
    }
  return static_cast<double>(bytes) / std::chrono::duration<double>(clock_type::now() - start).count() / 1e9;
}

// A plain blocking TCP stream on loopback between this process and a forked
// child, `block` bytes per send(): the figure a one-connection tcp transport is
// held to. With `working_set` == `block` both ends reuse one buffer that stays
// in cache (what iperf3 does); with the transport's working set (block x batch)
// the sender walks through that many distinct source blocks and the receiver
// lands them in as many distinct destinations, the same memory traffic the
// transport's batch makes.
double socket_stream_gbps(std::uint64_t block, std::uint64_t working_set, double seconds) {
  working_set = std::max(working_set, block);
  int listener = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  if (::bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 || ::listen(listener, 1) != 0 ||
      ::getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &len) != 0)
    throw std::runtime_error("reference stream: cannot listen on loopback");
  const pid_t child = ::fork();
  if (child == 0) {
    // The ring is faulted in before connecting: the parent's clock starts at accept.
    buffer ring(std::max<std::uint64_t>(working_set, 64 << 10));
    const int s = ::socket(AF_INET, SOCK_STREAM, 0);
    if (::connect(s, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) ::_exit(1);
    std::uint64_t total = 0, at = 0;
    for (;;) {
      const auto n = ::read(s, ring.data + at, ring.size - at);
      if (n <= 0) break;
      total += static_cast<std::uint64_t>(n);
      at = (at + static_cast<std::uint64_t>(n)) % ring.size;
    }
    (void)::write(s, &total, sizeof total);
    ::_exit(0);
  }
  const int s = ::accept(listener, nullptr, nullptr);
  ::close(listener);
  buffer blocks(working_set - working_set % block);
  const std::uint64_t count = blocks.size / block;
  const auto start = clock_type::now();
  const auto stop = start + std::chrono::duration<double>(seconds);
  for (std::uint64_t i = 0; clock_type::now() < stop; i = (i + 1) % count) {
    const std::byte* src = blocks.data + i * block;
    std::uint64_t sent = 0;
    while (sent < block) {
      const auto n = ::send(s, src + sent, block - sent, MSG_NOSIGNAL);
      if (n <= 0) break;
      sent += static_cast<std::uint64_t>(n);
    }
  }
  ::shutdown(s, SHUT_WR);
  std::uint64_t received = 0;
  (void)::read(s, &received, sizeof received);
  const double secs = std::chrono::duration<double>(clock_type::now() - start).count();
  ::close(s);
  ::waitpid(child, nullptr, 0);
  return static_cast<double>(received) / secs / 1e9;
}

// iperf3 on loopback, one stream, when installed; nothing otherwise.
std::optional<double> iperf3_gbps(double seconds) {
  if (std::system("command -v iperf3 >/dev/null 2>&1") != 0) return std::nullopt;
  const std::string port = std::to_string(20000 + ::getpid() % 20000);
  const std::string out = "/tmp/kvx_transfer_bench_iperf3_" + std::to_string(::getpid()) + ".json";
  if (std::system(("iperf3 -s -1 -p " + port + " >/dev/null 2>&1 & sleep 0.5; iperf3 -c 127.0.0.1 -p " + port +
                   " -t " + std::to_string(std::max(1, static_cast<int>(seconds))) + " -J > " + out + " 2>/dev/null")
                      .c_str()) != 0)
    return std::nullopt;
  std::ifstream in(out);
  auto j = nlohmann::json::parse(in, nullptr, false);
  std::remove(out.c_str());
  if (j.is_discarded()) return std::nullopt;
  try {
    return j.at("end").at("sum_received").at("bits_per_second").get<double>() / 8e9;
  } catch (const std::exception&) {
    return std::nullopt;
  }
}

// ---- transports ---------------------------------------------------------------

std::uint64_t segment_size(const options& o) { return o.block * o.batch * o.threads; }

template <class T>
std::unique_ptr<T> make_transport(asio::io_context& io, const options& o, bool serve) {
  if constexpr (std::is_same_v<T, kvx::transport::shm>) {
    return std::make_unique<T>(io.get_executor());
#if KVX_BENCH_HAS_TCP
  } else if constexpr (std::is_same_v<T, kvx::transport::tcp>) {
    kvx::transport::tcp::config cfg;
    cfg.serve = serve;
    cfg.connections = o.connections;
    return std::make_unique<T>(io.get_executor(), cfg);
#endif
  } else {
    (void)o;
    (void)serve;
    return std::make_unique<T>(io.get_executor());
  }
}

// The target: owns and registers the remote segment, serves until killed.
template <class T>
int run_target(const options& o) {
  asio::io_context io;
  auto t = make_transport<T>(io, o, true);
  kvx::memory::segment_table table("transfer-bench-target");
  kvx::transport::shm_memory shared;
  std::optional<buffer> heap;
  kvx::memory::memory_region region;
  if constexpr (std::is_same_v<T, kvx::transport::shm>) {
    if (o.memory == "memfd") {
      auto m = kvx::transport::shm_allocate(segment_size(o));
      if (!m) {
        std::cerr << "transfer_bench: " << m.error().message() << "\n";
        return 1;
      }
      shared = std::move(*m);
      region = shared.region();
    }
  }
  if (!region.address) {
    heap.emplace(segment_size(o));
    region = {heap->data, heap->size};
  }
  auto seg = table.add("transfer-bench", region);
  auto entry = t->register_memory(*seg);
  if (!entry) {
    std::cerr << "transfer_bench: register_memory: " << entry.error().message() << "\n";
    return 1;
  }
  auto desc = table.describe(*seg);
  desc.transports[std::string(T::name())] = *entry;
  std::cout << nlohmann::json{{"pid", ::getpid()}, {"segment", desc.to_json()}}.dump() << std::endl;
  auto guard = asio::make_work_guard(io);
  io.run();
  return 0;
}

struct measurement {
  double seconds = 0;
  std::uint64_t bytes = 0, ops = 0, errors = 0;
  std::string first_error;
  std::vector<double> latencies_us;
  double cpu_initiator = 0;
  std::optional<double> cpu_target;
};

template <class T>
measurement run_initiator(T& t, asio::io_context& io, const kvx::memory::segment_descriptor& remote, const options& o,
                          pid_t target_pid) {
  buffer local(segment_size(o));
  // The io_context never runs out of work while workers drive it with run_one_for.
  io.restart();
  auto guard = asio::make_work_guard(io);
  kvx::memory::segment_table table("transfer-bench-initiator");
  auto seg = table.add("transfer-bench-local", {local.data, local.size});
  // Transports that need the initiator's memory registered (ucx) get it; those that cannot register without serving (tcp initiator) do not need it.
  const bool registered = static_cast<bool>(t.register_memory(*seg));
  if (auto ec = t.can_transfer(remote)) throw std::runtime_error("cannot reach the target: " + ec.message());

  // One warm-up batch per thread's range: connects, maps, faults page tables.
  for (unsigned th = 0; th < o.threads; ++th) {
    std::atomic<unsigned> left{o.batch};
    for (unsigned i = 0; i < o.batch; ++i) {
      const std::uint64_t off = (std::uint64_t{th} * o.batch + i) * o.block;
      t.async_read(remote, off, std::span(local.data + off, o.block), [&](std::error_code) { --left; });
    }
    while (left.load() != 0) io.run_one_for(std::chrono::milliseconds(10));
  }

  measurement m;
  std::vector<std::vector<double>> lat(o.threads);
  std::vector<std::uint64_t> ops(o.threads), errors(o.threads);
  std::string first_error;
  std::mutex error_mutex;
  const bool is_read = o.op == "read";
  const auto cpu_start = cpu_seconds_self();
  const auto target_start = target_pid > 0 ? cpu_seconds_of(target_pid) : std::nullopt;
  const auto start = clock_type::now();
  const auto stop = start + std::chrono::duration<double>(o.duration);
  std::vector<std::thread> workers;
  for (unsigned th = 0; th < o.threads; ++th) {
    workers.emplace_back([&, th] {
      std::vector<clock_type::time_point> done_at(o.batch);
      while (clock_type::now() < stop) {
        std::atomic<unsigned> left{o.batch};
        const auto submitted = clock_type::now();
        for (unsigned i = 0; i < o.batch; ++i) {
          const std::uint64_t off = (std::uint64_t{th} * o.batch + i) * o.block;
          auto h = [&, i](std::error_code ec) {
            done_at[i] = clock_type::now();
            if (ec) {
              ++errors[th];
              std::lock_guard lock(error_mutex);
              if (first_error.empty()) first_error = ec.message();
            }
            left.fetch_sub(1, std::memory_order_release);
          };
          if (is_read)
            t.async_read(remote, off, std::span(local.data + off, o.block), h);
          else
            t.async_write(remote, off, std::span<const std::byte>(local.data + off, o.block), h);
        }
        while (left.load(std::memory_order_acquire) != 0) io.run_one_for(std::chrono::milliseconds(10));
        for (auto& d : done_at) lat[th].push_back(std::chrono::duration<double, std::micro>(d - submitted).count());
        ops[th] += o.batch;
      }
    });
  }
  for (auto& w : workers) w.join();
  m.seconds = std::chrono::duration<double>(clock_type::now() - start).count();
  m.cpu_initiator = cpu_seconds_self() - cpu_start;
  if (target_start)
    if (auto end = cpu_seconds_of(target_pid)) m.cpu_target = *end - *target_start;
  for (unsigned th = 0; th < o.threads; ++th) {
    m.ops += ops[th];
    m.errors += errors[th];
    m.latencies_us.insert(m.latencies_us.end(), lat[th].begin(), lat[th].end());
  }
  m.bytes = m.ops * o.block;
  m.first_error = first_error;
  guard.reset();
  io.restart();
  io.poll();
  if (registered) (void)t.deregister_memory(*seg);
  return m;
}

// Starts this program as the target and reads its descriptor line.
struct spawned_target {
  pid_t pid = -1;
  std::string line;
  ~spawned_target() {
    if (pid > 0) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
    }
  }
};

void spawn_target(const options& o, spawned_target& out) {
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) throw std::runtime_error("pipe2 failed");
  std::vector<std::string> args{"/proc/self/exe"};
  for (std::size_t i = 0; i < o.raw_args.size(); ++i) {
    if (o.raw_args[i] == "--mode" || o.raw_args[i] == "--json") {
      ++i;
      continue;
    }
    args.push_back(o.raw_args[i]);
  }
  args.insert(args.end(), {"--mode", "target"});
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, fds[1], STDOUT_FILENO);
  const int rc = ::posix_spawn(&out.pid, "/proc/self/exe", &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  ::close(fds[1]);
  if (rc != 0) throw std::runtime_error("posix_spawn target failed");
  char c;
  while (::read(fds[0], &c, 1) == 1 && c != '\n') out.line.push_back(c);
  ::close(fds[0]);
  if (out.line.empty()) throw std::runtime_error("the target printed no descriptor");
}

std::string read_segment_json(const std::string& arg) {
  if (!arg.empty() && arg[0] == '@') {
    std::ifstream in(arg.substr(1));
    std::string line;
    std::getline(in, line);
    return line;
  }
  return arg;
}

double percentile(std::vector<double>& v, double p) {
  if (v.empty()) return 0;
  const auto k = static_cast<std::size_t>(p * static_cast<double>(v.size() - 1));
  std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(k), v.end());
  return v[k];
}

template <class T>
int run(const options& o) {
  if (o.mode == "target") return run_target<T>(o);
  nlohmann::json report{{"transport", o.transport}, {"op", o.op},          {"block_size", o.block},
                        {"batch_size", o.batch},   {"threads", o.threads}, {"duration_s", o.duration}};
  if constexpr (std::is_same_v<T, kvx::transport::shm>) report["memory"] = o.memory;
  if (o.transport == "tcp") report["connections"] = o.connections;
  // References first, before any transport thread or socket exists.
  if (o.references) {
    const double ref_seconds = std::min(1.0, o.duration);
    report["memcpy_gbps"] = memcpy_gbps(o.block, segment_size(o), ref_seconds);
    if (o.transport == "tcp") {
      report["socket_stream_gbps"] = socket_stream_gbps(o.block, o.block, ref_seconds);
      report["socket_stream_batch_gbps"] = socket_stream_gbps(o.block, o.block * o.batch, ref_seconds);
      if (o.iperf3)
        if (auto g = iperf3_gbps(ref_seconds)) report["iperf3_gbps"] = *g;
    }
  }
  spawned_target target;
  std::string line;
  if (o.mode == "both" && o.transport != "local") {
    spawn_target(o, target);
    line = target.line;
  } else if (o.mode == "initiator") {
    if (o.segment_json.empty()) usage("--mode initiator needs --segment-json");
    line = read_segment_json(o.segment_json);
  }

  asio::io_context io;
  measurement m;
  if (o.transport == "local") {
    // Same process by definition: owner and initiator share the process.
    auto owner = make_transport<T>(io, o, true);
    buffer remote_mem(segment_size(o));
    kvx::memory::segment_table table("transfer-bench-local-owner");
    auto seg = table.add("transfer-bench-remote", {remote_mem.data, remote_mem.size});
    auto desc = table.describe(*seg);
    desc.transports[std::string(T::name())] = *owner->register_memory(*seg);
    auto initiator = make_transport<T>(io, o, false);
    m = run_initiator(*initiator, io, desc, o, -1);
    (void)owner->deregister_memory(*seg);
  } else {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded()) usage("--segment-json is not JSON");
    const auto& sj = j.contains("segment") ? j["segment"] : j;
    auto desc = kvx::memory::segment_descriptor::from_json(sj);
    if (!desc) usage("bad segment JSON: " + desc.error().message());
    const pid_t pid = j.contains("pid") ? j["pid"].get<pid_t>() : -1;
    auto t = make_transport<T>(io, o, false);
    m = run_initiator(*t, io, *desc, o, pid);
  }

  const double gb = static_cast<double>(m.bytes) / 1e9;
  report["gbps"] = gb / m.seconds;
  report["ops_per_s"] = static_cast<double>(m.ops) / m.seconds;
  report["latency_p50_us"] = percentile(m.latencies_us, 0.50);
  report["latency_p99_us"] = percentile(m.latencies_us, 0.99);
  report["errors"] = m.errors;
  if (!m.first_error.empty()) report["first_error"] = m.first_error;
  report["cpu_s_per_gb_initiator"] = gb > 0 ? m.cpu_initiator / gb : 0.0;
  if (m.cpu_target) report["cpu_s_per_gb_target"] = gb > 0 ? *m.cpu_target / gb : 0.0;
  if (report.contains("memcpy_gbps")) report["ratio_vs_memcpy"] = report["gbps"].get<double>() / report["memcpy_gbps"].get<double>();
  if (report.contains("socket_stream_gbps"))
    report["ratio_vs_socket_stream"] = report["gbps"].get<double>() / report["socket_stream_gbps"].get<double>();
  if (report.contains("socket_stream_batch_gbps"))
    report["ratio_vs_socket_stream_batch"] =
        report["gbps"].get<double>() / report["socket_stream_batch_gbps"].get<double>();
  std::cout << report.dump() << std::endl;
  if (!o.json_out.empty()) std::ofstream(o.json_out) << report.dump(2) << "\n";
  return m.errors == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  const options o = parse(argc, argv);
  try {
    if (o.transport == "shm") return run<kvx::transport::shm>(o);
    if (o.transport == "local") {
      if (o.mode != "both") usage("--transport local runs in one process: use --mode both");
      return run<kvx::transport::local>(o);
    }
    if (o.transport == "tcp") {
#if KVX_BENCH_HAS_TCP
      return run<kvx::transport::tcp>(o);
#else
      usage("--transport tcp is unavailable: kvx/transport/tcp.hpp is not in this build");
#endif
    }
    if (o.transport == "ucx") {
#if KVX_BENCH_HAS_UCX
      return run<kvx::transport::ucx>(o);
#else
      usage("--transport ucx is unavailable: this build has no kvx::ucx (UCX not found) or no kvx/transport/ucx.hpp");
#endif
    }
    usage("unknown transport '" + o.transport + "'");
  } catch (const std::exception& e) {
    std::cerr << "transfer_bench: " << e.what() << "\n";
    return 1;
  }
}
