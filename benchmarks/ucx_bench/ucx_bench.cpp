// ucx_bench: bandwidth and latency of kvx::transport::ucx between two
// processes on this host, beside ucx_perftest (ucp_put_bw, ucp_put_lat) run
// in the same invocation with the same UCX_TLS and message sizes.
//
//   ucx_bench --tls posix [--sizes 65536,1048576,67108864] [--memory ucx|plain]
//             [--window 16] [--seconds 1] [--json results.jsonl] [--perftest ucx_perftest]
//             [--progress event|busy_poll] [--lat-iters 2000] [--latency-only] [--rounds 1]
//
// --rounds N runs, for each size, N rounds of (kvx write, kvx read, plain
// memcpy of the same size, ucx_perftest) back to back and prints medians and
// the spread of the per-round ratio: on hosts whose copy rate drifts between
// half-second runs (the lent 16-core VM: 15 to 33 GB/s for the same raw UCX
// put loop) one pair of runs decides nothing.
//
// The target is this binary started again with --serve; it registers one
// segment, answers the ping-pong rounds, and serves until killed. kvx writes
// are put + flush (remotely visible at completion); ucx_perftest's put_bw
// counts local completion, so the comparison is conservative for kvx.
//
// 4 KiB latency, three kvx figures beside ucp_put_lat (a ping-pong whose
// figure is half the round trip, p50; see docs/benchmarks/transport-ucx.md):
// one write (initiation to handler, put + flush), one read, and a kvx
// ping-pong run the way ucp_put_lat runs (--progress sets the initiator's
// policy). Where puts raise events (not posix/sysv) ucp_put_lat also runs
// with -E sleep, event-driven like kvx's default progress. Then the same with
// a transfer prepared once (ucx::prepare_write / prepare_read): posted and
// polled with post + check (no completion handler, as NIXL's postXferReq +
// checkXferState), through async_post, and a ping-pong whose both sides post.
#include <kvx/transport/ucx.hpp>

#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
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
  std::string progress = "event";  // the initiator's progress policy (ucx_options::busy_poll)
  int lat_iters = 2000;
  bool latency_only = false;  // skip the bandwidth sizes
  int rounds = 1;              // bandwidth rounds per size, alternated with ucx_perftest
  int pingpong = 0;  // --serve: answer this many ping-pong rounds first (descriptor on stdin)
  bool serve = false;
  std::uint64_t serve_bytes = 0;
};

// A child process with its stdout piped to us, and its stdin when `with_stdin`
// (stderr inherited).
struct child {
  pid_t pid = -1;
  int out = -1;
  int in = -1;
  std::string buf;
  child(const std::vector<std::string>& argv, const std::vector<std::string>& extra_env, bool with_stdin = false) {
    int fds[2];
    int in_fds[2] = {-1, -1};
    if (::pipe2(fds, O_CLOEXEC) != 0) throw std::runtime_error("pipe2");
    if (with_stdin && ::pipe2(in_fds, O_CLOEXEC) != 0) throw std::runtime_error("pipe2");
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, fds[1], STDOUT_FILENO);
    if (with_stdin) posix_spawn_file_actions_adddup2(&fa, in_fds[0], STDIN_FILENO);
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
    if (with_stdin) {
      ::close(in_fds[0]);
      in = in_fds[1];
    }
    if (rc != 0) throw std::runtime_error("cannot start " + a[0]);
  }
  void send_line(const std::string& l) {
    const std::string data = l + "\n";
    if (::write(in, data.data(), data.size()) != static_cast<ssize_t>(data.size())) throw std::runtime_error("write to child");
  }
  ~child() {
    if (pid > 0) {
      ::kill(pid, SIGKILL);
      int st;
      ::waitpid(pid, &st, 0);
    }
    ::close(out);
    if (in >= 0) ::close(in);
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

// The kvx analogue of ucp_put_lat: each side writes 4 KiB whose last byte is
// the round's number into the other's segment, then spins on that byte in its
// own segment (polling the io_context, which progresses UCX and runs the write
// completions). The initiator times the round trip; half is comparable with
// ucp_put_lat's figure, which is measured the same way.
constexpr std::size_t ping_bytes = 4096;

std::uint8_t ping_number(int round) { return static_cast<std::uint8_t>(round % 250 + 1); }

// Spins as ucp_put_lat does, but yields the core now and then: on a shared
// 2-core VM two spinning processes can land on one core and then each round
// waits for a scheduler time slice (milliseconds), which is not latency.
// With `t`, progresses UCX directly (as ucp_put_lat does) instead of polling
// the io_context, whose every poll is an epoll_wait.
void wait_for_byte(asio::io_context& io, std::byte* p, std::uint8_t v, kvx::transport::ucx* t = nullptr) {
  std::atomic_ref<std::byte> flag(*p);  // written by the peer through UCX
  for (unsigned spins = 1; flag.load(std::memory_order_acquire) != std::byte{v}; ++spins) {
    if (t) t->progress();
    else io.poll();
    if (spins % 64 == 0) ::sched_yield();
  }
}

// Writes each round's 4 KiB with async_write, or (after use_post) with a
// prepared transfer posted and polled, NIXL-style.
struct ping_writer {
  asio::io_context& io;
  kvx::transport::ucx& t;
  const kvx::memory::segment_descriptor& peer;
  std::span<std::byte> src;  // ping_bytes, from this side's memory
  int pending = 0;
  std::error_code failure;
  std::optional<kvx::transport::ucx_prepared_transfer> prepared{};
  bool posted = false;  // a post of `prepared` not yet reported done

  void use_post() {
    drain();
    const kvx::transport::ucx_piece piece{0, src};
    auto p = t.prepare_write(peer, std::span(&piece, 1));
    if (!p) throw std::runtime_error("kvx ping-pong prepare failed: " + p.error().message());
    prepared = std::move(*p);
  }
  void send(int round) {
    if (prepared) {
      settle();
      src.back() = std::byte{ping_number(round)};
      auto r = t.post(*prepared);
      if (!r) throw std::runtime_error("kvx ping-pong post failed: " + r.error().message());
      posted = *r == kvx::transport::ucx_post_status::in_progress;
      return;
    }
    src.back() = std::byte{ping_number(round)};
    ++pending;
    t.async_write(peer, 0, std::span<const std::byte>(src), [this](std::error_code ec) {
      --pending;
      if (ec) failure = ec;
    });
  }
  void settle() {
    while (posted) {
      auto r = t.check(*prepared);
      if (!r) throw std::runtime_error("kvx ping-pong post failed: " + r.error().message());
      posted = *r == kvx::transport::ucx_post_status::in_progress;
    }
  }
  void drain() {
    settle();
    while (pending > 0) io.run_one();
    if (failure) throw std::runtime_error("kvx ping-pong write failed: " + failure.message());
  }
};

// Registers `region` as segment `name` and returns its descriptor with the ucx entry.
std::optional<kvx::memory::segment_descriptor> publish(kvx::transport::ucx& t, kvx::memory::segment_table& table,
                                                       const std::string& name, kvx::memory::memory_region region) {
  auto seg = table.add(name, region);
  if (!seg) {
    std::cerr << seg.error().message() << "\n";
    return std::nullopt;
  }
  auto entry = t.register_memory(*seg);
  if (!entry) {
    std::cerr << entry.error().message() << "\n";
    return std::nullopt;
  }
  auto d = table.describe(*seg);
  d.transports["ucx"] = *entry;
  return d;
}

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
  std::memset(region.address, 0, std::min<std::size_t>(region.length, ping_bytes));  // no ping-pong round yet
  kvx::memory::segment_table table("ucx-bench-target");
  auto d = publish(t, table, "ucx-bench", region);
  if (!d) return 1;
  std::cout << d->to_json().dump() << std::endl;
  if (a.pingpong > 0) {
    std::string line;
    if (!std::getline(std::cin, line)) return 1;
    auto peer = kvx::memory::segment_descriptor::from_json(nlohmann::json::parse(line));
    if (!peer) return 1;
    auto* bytes = static_cast<std::byte*>(region.address);
    ping_writer w{io, t, *peer, {bytes + ping_bytes, ping_bytes}, 0, {}};
    // The initiator's rounds: with async_write first, then with posts.
    for (int round = 0; round < 2 * a.pingpong; ++round) {
      if (round == a.pingpong) w.use_post();
      wait_for_byte(io, bytes + ping_bytes - 1, ping_number(round), round >= a.pingpong ? &t : nullptr);
      w.send(round);
    }
    w.drain();
  }
  auto guard = asio::make_work_guard(io);
  io.run();
  return 0;
}

// The initiator's side of the ping-pong: p50 of half the round trip, in µs.
// Rounds [first, first + rounds + warmup): the target switches to posts when
// `post` does, at the same round.
double kvx_pingpong(asio::io_context& io, kvx::transport::ucx& t, const kvx::memory::segment_descriptor& peer,
                    std::span<std::byte> local, int rounds, int warmup, int first, bool post) {
  ping_writer w{io, t, peer, local.subspan(ping_bytes, ping_bytes), 0, {}};
  if (post) w.use_post();
  std::vector<double> us;
  us.reserve(static_cast<std::size_t>(rounds));
  for (int i = 0; i < rounds + warmup; ++i) {
    const int round = first + i;
    const auto s = clock_type::now();
    w.send(round);
    wait_for_byte(io, local.data() + ping_bytes - 1, ping_number(round), post ? &t : nullptr);
    if (i >= warmup) us.push_back(std::chrono::duration<double, std::micro>(clock_type::now() - s).count() / 2);
  }
  w.drain();
  std::sort(us.begin(), us.end());
  return us[us.size() / 2];
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

// A plain memcpy of `size` bytes within `local`, repeated for `seconds`: the
// copy rate of this core at this moment, beside the UCX figures of the round.
double memcpy_bandwidth(std::span<std::byte> local, std::uint64_t size, double seconds) {
  static std::vector<std::byte> dst;
  dst.resize(size);
  std::uint64_t copied = 0;
  const auto start = clock_type::now();
  const auto until = start + std::chrono::duration<double>(seconds);
  do {
    std::memcpy(dst.data(), local.data(), size);
    copied += size;
  } while (clock_type::now() < until);
  const double secs = std::chrono::duration<double>(clock_type::now() - start).count();
  return static_cast<double>(copied) / secs / 1e9;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const auto n = v.size();
  return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

// Latency: one op in flight, timed from initiation to the handler running;
// percentiles of `n` completions (after 100 warm-up ops), in microseconds.
struct latency_us {
  double p50 = 0;
  double p99 = 0;
};
latency_us kvx_latency(asio::io_context& io, kvx::transport::ucx& t, const kvx::memory::segment_descriptor& d,
                       std::span<std::byte> local, std::uint64_t size, int n, bool write) {
  std::vector<double> us;
  us.reserve(static_cast<std::size_t>(n));
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
  std::sort(us.begin(), us.end());
  return {us[us.size() / 2], us[std::min(us.size() - 1, us.size() * 99 / 100)]};
}

// Posts `p` and checks it (polling the io_context between checks) until done.
void post_and_wait(asio::io_context& io, kvx::transport::ucx& t, kvx::transport::ucx_prepared_transfer& p) {
  auto r = t.post(p);
  while (r && *r == kvx::transport::ucx_post_status::in_progress) {
    io.poll();
    r = t.check(p);
  }
  if (!r) throw std::runtime_error("kvx post failed: " + r.error().message());
}

// The same with a transfer prepared once: `post` and `check` until done (no
// completion handler), or `async_post` (the handler through the io_context).
latency_us prepared_latency(asio::io_context& io, kvx::transport::ucx& t, const kvx::memory::segment_descriptor& d,
                            std::span<std::byte> local, std::uint64_t size, int n, bool write, bool polled) {
  const kvx::transport::ucx_piece piece{0, local.first(size)};
  auto p = write ? t.prepare_write(d, std::span(&piece, 1)) : t.prepare_read(d, std::span(&piece, 1));
  if (!p) throw std::runtime_error("kvx prepare failed: " + p.error().message());
  std::vector<double> us;
  us.reserve(static_cast<std::size_t>(n));
  for (int i = 0; i < n + 100; ++i) {
    const auto s = clock_type::now();
    if (polled) {
      post_and_wait(io, t, *p);
    } else {
      bool done = false;
      std::error_code err;
      t.async_post(*p, [&](std::error_code ec) { done = true; err = ec; });
      while (!done) io.run_one();
      if (err) throw std::runtime_error("kvx async_post failed: " + err.message());
    }
    if (i >= 100) us.push_back(std::chrono::duration<double, std::micro>(clock_type::now() - s).count());
  }
  std::sort(us.begin(), us.end());
  return {us[us.size() / 2], us[std::min(us.size() - 1, us.size() * 99 / 100)]};
}

// A batch of `pieces` 4 KiB writes to one segment, p50 µs per batch: one
// prepared transfer (the puts and one flush) posted and checked, against the
// same writes as `pieces` async_writes in flight together (a flush each).
constexpr int batch_pieces = 16;
std::pair<double, double> batch_latency(asio::io_context& io, kvx::transport::ucx& t,
                                        const kvx::memory::segment_descriptor& d, std::span<std::byte> local, int n) {
  std::vector<kvx::transport::ucx_piece> pieces;
  for (int i = 0; i < batch_pieces; ++i)
    pieces.push_back({static_cast<std::uint64_t>(i) * ping_bytes, local.subspan(i * ping_bytes, ping_bytes)});
  auto p = t.prepare_write(d, pieces);
  if (!p) throw std::runtime_error("kvx prepare failed: " + p.error().message());
  std::vector<double> posted, each;
  for (int i = 0; i < n + 100; ++i) {
    auto s = clock_type::now();
    post_and_wait(io, t, *p);
    if (i >= 100) posted.push_back(std::chrono::duration<double, std::micro>(clock_type::now() - s).count());
    s = clock_type::now();
    int left = batch_pieces;
    std::error_code err;
    for (const auto& piece : pieces)
      t.async_write(d, piece.remote_offset, std::span<const std::byte>(piece.local), [&](std::error_code ec) {
        --left;
        if (ec) err = ec;
      });
    while (left > 0) io.run_one();
    if (err) throw std::runtime_error("kvx op failed: " + err.message());
    if (i >= 100) each.push_back(std::chrono::duration<double, std::micro>(clock_type::now() - s).count());
  }
  return {median(posted), median(each)};
}

// The floor under any kvx operation on this io_context: a 4 KiB memcpy plus
// one completion posted to it and run by run_one (what a kvx write that UCX
// finishes at once adds to its copy), timed the same way.
double asio_floor(asio::io_context& io, std::span<std::byte> local, int n) {
  const auto ex = io.get_executor();
  std::vector<double> us;
  us.reserve(static_cast<std::size_t>(n));
  for (int i = 0; i < n + 100; ++i) {
    bool done = false;
    const auto s = clock_type::now();
    std::memcpy(local.data() + ping_bytes, local.data(), ping_bytes);
    asio::post(ex, [&done] { done = true; });
    while (!done) io.run_one();
    if (i >= 100) us.push_back(std::chrono::duration<double, std::micro>(clock_type::now() - s).count());
  }
  std::sort(us.begin(), us.end());
  return us[us.size() / 2];
}

// ucx_perftest client+server on 127.0.0.1; returns the "Final:" fields.
// `wait_mode` is ucx_perftest's -E: "poll" spins on ucp_worker_progress, "sleep"
// waits on the worker's events as kvx's default progress does.
std::vector<double> perftest(const args_t& a, const std::string& test, std::uint64_t size, std::uint64_t iters,
                             const std::string& wait_mode = "poll") {
  const int salt = static_cast<int>(size % 997) + (wait_mode == "poll" ? 0 : 499);  // a fresh port per run
  const std::string port = std::to_string(20000 + (::getpid() * 7 + salt) % 20000);
  std::vector<std::string> env{"UCX_TLS=" + a.tls};
  child server({a.perftest, "-p", port, "-E", wait_mode}, env);
  ::usleep(300000);
  std::vector<std::double_t> fields;
  for (int attempt = 0; attempt < 3 && fields.empty(); ++attempt) {
    child client({a.perftest, "127.0.0.1", "-p", port, "-t", test, "-s", std::to_string(size), "-n",
                  std::to_string(iters), "-w", std::to_string(std::min<std::uint64_t>(iters / 10 + 1, 100)), "-E", wait_mode},
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

int run(int argc, char** argv) {
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
    else if (k == "--progress") a.progress = next();
    else if (k == "--lat-iters") a.lat_iters = std::stoi(next());
    else if (k == "--latency-only") a.latency_only = true;
    else if (k == "--rounds") a.rounds = std::stoi(next());
    else if (k == "--pingpong") a.pingpong = std::stoi(next());
    else if (k == "--serve") { a.serve = true; a.serve_bytes = std::stoull(next()); }
    else {
      std::cerr << "usage: ucx_bench --tls T [--sizes a,b,c] [--memory ucx|plain] [--window N] [--seconds S] [--json FILE]\n"
                   "                 [--progress event|busy_poll] [--lat-iters N] [--latency-only] [--perftest PATH]\n"
                   "                 [--rounds N]\n";
      return 2;
    }
  }
  if (a.memory != "ucx" && a.memory != "plain") {
    std::cerr << "--memory must be ucx or plain\n";
    return 2;
  }
  if (a.progress != "event" && a.progress != "busy_poll") {
    std::cerr << "--progress must be event or busy_poll\n";
    return 2;
  }
  if (a.sizes.empty()) {
    std::cerr << "--sizes needs at least one size\n";
    return 2;
  }
  if (a.latency_only) a.sizes.clear();
  if (a.lat_iters < 1) {
    std::cerr << "--lat-iters must be at least 1\n";
    return 2;
  }
  if (a.rounds < 1) {
    std::cerr << "--rounds must be at least 1\n";
    return 2;
  }
  if (a.serve) return serve(a);

  std::uint64_t max_size = batch_pieces * ping_bytes;  // the ping-pong's two 4 KiB, and the batch
  for (auto size : a.sizes) max_size = std::max(max_size, size);
  const int ping_warmup = 100;
  child target({"/proc/self/exe", "--serve", std::to_string(max_size), "--tls", a.tls, "--memory", a.memory,
                "--pingpong", std::to_string(a.lat_iters + ping_warmup)},  // twice: async_write, then posts
               {}, true);
  auto line = target.line(20000);
  if (!line) {
    std::cerr << "target printed no descriptor\n";
    return 1;
  }
  auto desc = *kvx::memory::segment_descriptor::from_json(nlohmann::json::parse(*line));

  asio::io_context io;
  kvx::transport::ucx t(io.get_executor(), {.tls = a.tls, .busy_poll = a.progress == "busy_poll"});
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
  auto ldesc = publish(t, table, "ucx-bench-local", {local.data(), local.size()});
  if (!ldesc) return 1;
  std::memset(local.data(), 0, ping_bytes);
  target.send_line(ldesc->to_json().dump());
  // First, while the target answers ping-pong rounds (it serves only after them).
  const double ping_half_rtt = kvx_pingpong(io, t, desc, local, a.lat_iters, ping_warmup, 0, false);
  const double post_ping_half_rtt =
      kvx_pingpong(io, t, desc, local, a.lat_iters, ping_warmup, a.lat_iters + ping_warmup, true);

  std::ofstream json;
  if (!a.json.empty()) json.open(a.json, std::ios::app);
  std::printf("UCX_TLS=%s memory=%s window=%d rounds=%d\n", a.tls.c_str(), a.memory.c_str(), a.window, a.rounds);
  std::printf("%10s %14s %14s %14s %14s %8s %15s\n", "size", "kvx write GB/s", "kvx read GB/s", "memcpy GB/s",
              "perftest GB/s", "ratio", "ratio min-max");
  for (auto size : a.sizes) {
    std::uint64_t moved = 0, moved_r = 0;
    kvx_bandwidth(io, t, desc, local, size, a.window, std::min(0.2, a.seconds), true, moved);  // warm-up
    std::vector<double> ws, rs, ms, ps, ratios;
    for (int round = 0; round < a.rounds; ++round) {
      const double w = kvx_bandwidth(io, t, desc, local, size, a.window, a.seconds, true, moved);
      const double r = kvx_bandwidth(io, t, desc, local, size, a.window, a.seconds, false, moved_r);
      const double m = memcpy_bandwidth(local, size, a.seconds / 2);
      const auto iters = std::max<std::uint64_t>(moved / size, 20);
      auto pf = perftest(a, "ucp_put_bw", size, iters);
      const double p = pf[5] * 1048576.0 / 1e9;
      ws.push_back(w), rs.push_back(r), ms.push_back(m), ps.push_back(p), ratios.push_back(w / p);
      if (json.is_open())
        json << nlohmann::json{{"tls", a.tls}, {"memory", a.memory}, {"kind", "bandwidth"}, {"size", size},
                               {"round", round}, {"kvx_write_gbps", w}, {"kvx_read_gbps", r}, {"memcpy_gbps", m},
                               {"perftest_put_gbps", p}, {"ratio", w / p}}.dump()
             << "\n";
    }
    const auto [lo, hi] = std::minmax_element(ratios.begin(), ratios.end());
    std::printf("%10llu %14.3f %14.3f %14.3f %14.3f %8.2f %7.2f-%-7.2f\n", static_cast<unsigned long long>(size),
                median(ws), median(rs), median(ms), median(ps), median(ratios), *lo, *hi);
  }
  // ucp_put_lat is a ping-pong: each side puts, the other spins on the last
  // byte, and the figure is half the round trip (p50). A kvx write completes
  // when the target's flush answers: one-way on shared memory (the flush is
  // local), a full round trip on tcp. Both ratios are printed.
  const auto lw = kvx_latency(io, t, desc, local, 4096, a.lat_iters, true);
  const auto lr = kvx_latency(io, t, desc, local, 4096, a.lat_iters, false);
  const auto pw = prepared_latency(io, t, desc, local, 4096, a.lat_iters, true, true);
  const auto pr = prepared_latency(io, t, desc, local, 4096, a.lat_iters, false, true);
  const auto aw = prepared_latency(io, t, desc, local, 4096, a.lat_iters, true, false);
  const auto [batch_posted, batch_each] = batch_latency(io, t, desc, local, a.lat_iters);
  const double floor_us = asio_floor(io, local, a.lat_iters);
  auto pl = perftest(a, "ucp_put_lat", 4096, static_cast<std::uint64_t>(a.lat_iters));
  const double half_rtt = pl[1];
  // Event-driven ucx_perftest (-E sleep) as well, where puts raise events:
  // on posix/sysv a put is a plain store and a sleeping receiver never wakes.
  const bool shm_rma = a.tls.find("posix") != std::string::npos || a.tls.find("sysv") != std::string::npos;
  const double sleep_half_rtt = shm_rma ? 0.0 : perftest(a, "ucp_put_lat", 4096, static_cast<std::uint64_t>(a.lat_iters), "sleep")[1];
  std::printf("4 KiB latency (%s progress): kvx write p50 %.2f us (p99 %.2f), kvx read p50 %.2f us (p99 %.2f), "
              "ucx_perftest put_lat p50 %.2f us (half round trip); write/put_lat %.2f, write/round trip %.2f, "
              "read/round trip %.2f\n",
              a.progress.c_str(), lw.p50, lw.p99, lr.p50, lr.p99, half_rtt, lw.p50 / half_rtt, lw.p50 / (2 * half_rtt),
              lr.p50 / (2 * half_rtt));
  std::printf("  kvx ping-pong (ucp_put_lat's method with kvx writes) p50 %.2f us half round trip; /put_lat %.2f\n",
              ping_half_rtt, ping_half_rtt / half_rtt);
  std::printf("  prepared, post + check: write p50 %.2f us (p99 %.2f), /put_lat %.2f, /round trip %.2f; "
              "read p50 %.2f us (p99 %.2f), /round trip %.2f\n",
              pw.p50, pw.p99, pw.p50 / half_rtt, pw.p50 / (2 * half_rtt), pr.p50, pr.p99, pr.p50 / (2 * half_rtt));
  std::printf("  prepared, async_post: write p50 %.2f us; /put_lat %.2f\n", aw.p50, aw.p50 / half_rtt);
  std::printf("  %d x 4 KiB writes to one segment: one prepared transfer (one flush) p50 %.2f us, as %d async_writes "
              "(a flush each) %.2f us; %.2fx\n",
              batch_pieces, batch_posted, batch_pieces, batch_each, batch_each / batch_posted);
  std::printf("  kvx ping-pong with posts, both sides, p50 %.2f us half round trip; /put_lat %.2f\n", post_ping_half_rtt,
              post_ping_half_rtt / half_rtt);
  std::printf("  Asio floor (4 KiB memcpy + one posted completion) p50 %.2f us; /put_lat %.2f\n", floor_us,
              floor_us / half_rtt);
  if (!shm_rma)
    std::printf("  ucx_perftest put_lat -E sleep p50 %.2f us; write/put_lat(sleep) %.2f, write/round trip(sleep) %.2f\n",
                sleep_half_rtt, lw.p50 / sleep_half_rtt, lw.p50 / (2 * sleep_half_rtt));
  if (json.is_open()) {
    nlohmann::json j{{"tls", a.tls}, {"memory", a.memory}, {"kind", "latency"}, {"size", 4096},
                     {"progress", a.progress}, {"kvx_write_us", lw.p50}, {"kvx_write_p99_us", lw.p99},
                     {"kvx_read_us", lr.p50}, {"kvx_read_p99_us", lr.p99}, {"perftest_put_lat_us", half_rtt},
                     {"ratio", lw.p50 / half_rtt}, {"ratio_round_trip", lw.p50 / (2 * half_rtt)},
                     {"kvx_pingpong_half_rtt_us", ping_half_rtt}, {"ratio_pingpong", ping_half_rtt / half_rtt},
                     {"asio_floor_us", floor_us}, {"kvx_post_write_us", pw.p50}, {"kvx_post_write_p99_us", pw.p99},
                     {"kvx_post_read_us", pr.p50}, {"kvx_post_read_p99_us", pr.p99}, {"ratio_post", pw.p50 / half_rtt},
                     {"kvx_async_post_write_us", aw.p50}, {"kvx_post_pingpong_half_rtt_us", post_ping_half_rtt},
                     {"ratio_post_pingpong", post_ping_half_rtt / half_rtt}, {"batch_pieces", batch_pieces},
                     {"batch_prepared_us", batch_posted}, {"batch_async_writes_us", batch_each}};
    if (!shm_rma) j["perftest_put_lat_sleep_us"] = sleep_half_rtt;
    json << j.dump() << "\n";
  }
  return 0;
}

// An error (ucx_perftest giving no result, a failed kvx op) ends the run
// here, where the target process is still killed by its destructor: uncaught,
// it was orphaned and kept serving (and kept a caller's pipe open).
int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << "ucx_bench: " << e.what() << "\n";
    return 1;
  }
}
