// store_bench: put/get throughput and latency of the kvx store (master +
// nodes + clients, bytes moved by the transfer engine over tcp, shm or ucx)
// against Redis (redis-server + redis-benchmark SET/GET) with the same value
// sizes and client counts, in the same run. Redis is what LMCache uses as its
// remote tier.
//
// Set-up per run: a master and two storage nodes on one io_context thread
// (the "server side"), clients on another (the "client side"), each side with
// its own metadata client: two threads, like Redis's server process and
// benchmark process. Each client keeps one operation outstanding, as
// redis-benchmark's clients do.
#include <kvx/cache/eviction/lru.hpp>
#include <kvx/core/bytes.hpp>
#include <kvx/memory/mapped_arena.hpp>
#include <kvx/store/master_server.hpp>
#include <kvx/store/store_client.hpp>
#include <kvx/store/store_node.hpp>
#include <kvx/transfer/embedded_metadata.hpp>
#include <kvx/transfer/transfer_engine.hpp>
#include <kvx/transport/shm.hpp>
#include <kvx/transport/tcp.hpp>
#if KVX_WITH_UCX
#include <kvx/transport/ucx.hpp>
#endif

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/use_future.hpp>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <optional>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <future>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

extern char** environ;

namespace {

namespace asio = boost::asio;
using clock_type = std::chrono::steady_clock;
using json = nlohmann::json;

struct options {
  std::string transport = "tcp";
  std::string ucx_tls = "tcp";  // --transport ucx: the UCX transports (UCX_TLS) every party uses
  std::vector<std::uint64_t> sizes{4 * kvx::KiB, 64 * kvx::KiB, kvx::MiB, 16 * kvx::MiB};
  std::vector<unsigned> clients{1, 4};
  std::uint64_t ops = 0;  // per client and size; 0: scaled to move about 256 MiB (32 to 5,000 ops)
  bool redis = true;
  std::string redis_bin_dir;  // where redis-server and redis-benchmark are; empty: PATH
  std::string json_out;
  bool recover_objects = false;  // ledgers for failover (a checksum per put, changes on heartbeats)
};

struct figures {
  double ops_per_s = 0, gb_per_s = 0, p50_us = 0, p99_us = 0;
};

figures summarize(std::vector<double>& lat_us, std::uint64_t bytes_each, double seconds) {
  figures f;
  if (lat_us.empty() || seconds <= 0) return f;
  std::sort(lat_us.begin(), lat_us.end());
  f.ops_per_s = static_cast<double>(lat_us.size()) / seconds;
  f.gb_per_s = f.ops_per_s * static_cast<double>(bytes_each) / 1e9;
  f.p50_us = lat_us[lat_us.size() / 2];
  f.p99_us = lat_us[std::min(lat_us.size() - 1, lat_us.size() * 99 / 100)];
  return f;
}

std::uint64_t ops_for(const options& o, std::uint64_t size) {
  if (o.ops) return o.ops;
  return std::clamp<std::uint64_t>((256 * kvx::MiB) / size, 32, 5000);
}

// The values of one size that stay stored at once: the clients' puts cycle
// through more keys than that (the master evicts the oldest), and gets read
// the last ones written, so memory stays bounded at 16 MiB values (kvx nodes
// and redis-server alike) and every get finds its object.
constexpr std::uint64_t stored_bytes = 512 * kvx::MiB;
std::uint64_t keys_kept(std::uint64_t size, unsigned clients, std::uint64_t ops) {
  return std::clamp<std::uint64_t>(stored_bytes / (size * clients), 1, ops);
}

// ---- kvx side ---------------------------------------------------------------

template <class Transport>
struct kvx_run {
  using engine_type = kvx::transfer::transfer_engine<kvx::transfer::embedded_metadata, Transport>;
  using state_type = kvx::store::master_state<kvx::cache::eviction::lru>;

  static Transport make_transport(asio::io_context& io, [[maybe_unused]] const options& o) {
#if KVX_WITH_UCX
    if constexpr (std::is_same_v<Transport, kvx::transport::ucx>) return Transport(io.get_executor(), {.tls = o.ucx_tls});
    else
#endif
      return Transport(io.get_executor());
  }

  struct party {
    Transport transport;
    engine_type engine;
    party(asio::io_context& io, kvx::transfer::embedded_metadata& meta, const std::string& name, const options& o)
        : transport(make_transport(io, o)), engine(meta, {.node = name, .slice_size = 4 * kvx::MiB}, transport) {}
  };

  // Page-aligned memory, faulted in up front as a node's pool (registered,
  // often pinned) and an engine's KV buffers are: the runs measure moving
  // bytes, not the kernel zeroing fresh pages. Over UCX it is memory UCX
  // allocated, which its shared-memory transports reach one-sidedly; over
  // shm a node's pool is a memfd (peers map it), a client's buffer not.
  static kvx::result<kvx::memory::memory_region> memory_for([[maybe_unused]] party& p, std::size_t bytes,
                                                           std::vector<std::shared_ptr<void>>& keep, bool node_pool) {
    kvx::memory::memory_region region;
#if KVX_WITH_UCX
    if constexpr (std::is_same_v<Transport, kvx::transport::ucx>) {
      auto m = p.transport.allocate(bytes);
      KVX_TRY(m);
      auto held = std::make_shared<kvx::transport::ucx_buffer>(std::move(*m));
      keep.push_back(held);
      region = held->region();
    } else
#endif
    if (std::is_same_v<Transport, kvx::transport::shm> && node_pool) {
      auto m = kvx::transport::shm_allocate(bytes);
      KVX_TRY(m);
      auto held = std::make_shared<kvx::transport::shm_memory>(std::move(*m));
      keep.push_back(held);
      region = kvx::memory::memory_region{held->data(), held->size()};
    } else {
      auto a = kvx::memory::mapped_arena::create(bytes);
      KVX_TRY(a);
      auto held = std::make_shared<kvx::memory::mapped_arena>(std::move(*a));
      keep.push_back(held);
      region = held->region();
    }
    std::memset(region.address, 0, region.length);
    return region;
  }

  // Returns {put, get} figures for `clients` clients moving `size`-byte values.
  static kvx::result<std::pair<figures, figures>> run(const options& o, std::uint64_t size, unsigned clients, std::uint64_t ops) {
    asio::io_context server_io, client_io;
    // Each side has its own metadata client on its own thread, as separate
    // processes would (an engine runs on its metadata backend's executor):
    // the nodes' segment descriptors are copied to the clients' side below.
    kvx::transfer::embedded_metadata meta(server_io.get_executor());
    kvx::transfer::embedded_metadata client_meta(client_io.get_executor());
    kvx::metrics::registry registry;
    kvx::store::master_config config;
    config.recover_objects = o.recover_objects;
    state_type state(config, {}, registry);
    kvx::store::master_server<state_type> master(server_io.get_executor(), state);
    KVX_TRY(master.start());
    std::vector<std::shared_ptr<void>> keep;
    std::vector<std::unique_ptr<party>> parties;
    std::vector<std::unique_ptr<kvx::store::store_node<engine_type>>> nodes;
    // Two nodes that together hold the kept values at about 70% of their
    // capacity, under the master's eviction watermark; older values are
    // evicted by later puts.
    const std::uint64_t kept = keys_kept(size, clients, ops);
    const std::size_t node_bytes = std::max<std::uint64_t>(64 * kvx::MiB, size * kept * clients * 3 / 4 + 2 * size);
    // Both sides run on their own thread until the end (transports keep
    // acceptors open, so an io_context never runs out of work by itself).
    auto server_work = asio::make_work_guard(server_io);
    auto client_work = asio::make_work_guard(client_io);
    std::thread server_thread([&] { server_io.run(); });
    std::thread client_thread([&] { client_io.run(); });
    auto stop_server = [&] {
      for (auto& n : nodes) n->stop();
      asio::post(server_io, [&] { master.stop(); });
      client_work.reset();
      client_io.stop();
      client_thread.join();
      server_work.reset();
      server_io.stop();
      server_thread.join();
    };
    for (int n = 0; n < 2; ++n) {
      const auto name = "node-" + std::to_string(n);
      auto& p = *parties.emplace_back(std::make_unique<party>(server_io, meta, name, o));
      auto region = memory_for(p, node_bytes, keep, /*node_pool=*/true);
      if (!region) {
        stop_server();
        return region.error();
      }
      auto& node = *nodes.emplace_back(std::make_unique<kvx::store::store_node<engine_type>>(
          p.engine, kvx::store::master_client::create(server_io.get_executor(), master.endpoint()),
          kvx::store::node_options{.name = name, .segment = "", .tier = "dram", .heartbeat = std::chrono::milliseconds(500)}));
      auto started = node.async_start(*region, asio::use_future);
      if (auto ec = started.get()) {
        stop_server();
        return kvx::error{ec, "starting " + name};
      }
    }
    auto published = meta.async_list("", asio::use_future).get();
    for (auto& [k, v] : std::get<1>(published)) client_meta.async_put(k, v, asio::use_future).get();
    struct client_state {
      std::unique_ptr<party> p;
      std::span<std::byte> buffer;
      std::unique_ptr<kvx::store::store_client<engine_type>> client;
      std::vector<double> put_us, get_us;
    };
    std::vector<client_state> cs(clients);
    for (unsigned c = 0; c < clients; ++c) {
      const auto name = "client-" + std::to_string(c);
      cs[c].p = std::make_unique<party>(client_io, client_meta, name, o);
      auto memory = memory_for(*cs[c].p, size, keep, /*node_pool=*/false);
      if (!memory) {
        stop_server();
        return memory.error();
      }
      cs[c].buffer = std::span<std::byte>(memory->data(), size);
      std::fill(cs[c].buffer.begin(), cs[c].buffer.end(), std::byte{static_cast<unsigned char>(c + 1)});
      auto reg = cs[c].p->engine.async_register_memory(*memory, name + "/buf", asio::use_future);
      if (auto ec = std::get<0>(reg.get())) {
        stop_server();
        return kvx::error{ec, "registering " + name};
      }
      cs[c].client = std::make_unique<kvx::store::store_client<engine_type>>(
          cs[c].p->engine, kvx::store::master_client::create(client_io.get_executor(), master.endpoint()),
          kvx::store::client_options{.node = name, .replicas = 1, .lease = std::chrono::milliseconds(5000)});
      // Connect to both nodes before timing, as redis-benchmark connects its
      // clients first: the first transfer to a segment opens it (for shm,
      // maps and populates the node's whole pool: tens of ms).
      kvx::transfer::batch warm;
      for (int n = 0; n < 2; ++n) warm.read(cs[c].buffer.first(64), "node-" + std::to_string(n) + "/pool", 0);
      auto warmed = cs[c].p->engine.async_transfer(std::move(warm), asio::use_future);
      if (auto ec = std::get<0>(warmed.get())) {
        stop_server();
        return kvx::error{ec, "connecting " + name + " to the nodes"};
      }
    }
    std::atomic<bool> failed{false};
    std::error_code failure;  // written once, by the client thread, before `failed`
    auto phase = [&](bool put) {
      const auto start = clock_type::now();
      std::vector<std::future<void>> done;
      for (unsigned c = 0; c < clients; ++c)
        done.push_back(asio::co_spawn(client_io, [&, c]() -> asio::awaitable<void> {
          auto& s = cs[c];
          for (std::uint64_t i = 0; i < ops && !failed; ++i) {
            // Gets read the last `kept` keys this client put, round robin.
            const auto n = put ? i : ops - kept + i % kept;
            kvx::store::object_key key{"bench", std::to_string(c) + "/" + std::to_string(n)};
            const auto t0 = clock_type::now();
            std::error_code ec;
            if (put) {
              auto [e] = co_await s.client->async_put(key, std::span<const std::byte>(s.buffer), asio::as_tuple(asio::use_awaitable));
              ec = e;
            } else {
              auto [e, n] = co_await s.client->async_get(key, s.buffer, asio::as_tuple(asio::use_awaitable));
              ec = e;
            }
            if (ec) {
              if (!failed.exchange(true)) failure = ec;
              co_return;
            }
            (put ? s.put_us : s.get_us).push_back(std::chrono::duration<double, std::micro>(clock_type::now() - t0).count());
          }
        }, asio::use_future));
      for (auto& d : done) d.get();
      return std::chrono::duration<double>(clock_type::now() - start).count();
    };
    const double put_s = phase(true);
    const double get_s = failed ? 0 : phase(false);
    stop_server();
    if (failed) return kvx::error{failure, "store_bench " + std::string(Transport::name()) + " " + kvx::format_size(size)};
    std::vector<double> put_all, get_all;
    for (auto& s : cs) {
      put_all.insert(put_all.end(), s.put_us.begin(), s.put_us.end());
      get_all.insert(get_all.end(), s.get_us.begin(), s.get_us.end());
    }
    return std::pair{summarize(put_all, size, put_s), summarize(get_all, size, get_s)};
  }
};

// ---- Redis reference -----------------------------------------------------------

std::uint16_t free_port() {
  asio::io_context io;
  asio::ip::tcp::acceptor a(io, {asio::ip::make_address("127.0.0.1"), 0});
  return a.local_endpoint().port();
}

pid_t spawn(const std::vector<std::string>& args, const std::string& out_path = "/dev/null") {
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, STDOUT_FILENO, out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&fa, STDERR_FILENO, "/dev/null", O_WRONLY, 0);
  std::vector<char*> argv;
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  pid_t pid = -1;
  if (posix_spawnp(&pid, argv[0], &fa, nullptr, argv.data(), environ) != 0) pid = -1;
  posix_spawn_file_actions_destroy(&fa);
  return pid;
}

// `name` in `dir` when one is given, else found through PATH by posix_spawnp.
std::string redis_tool(const std::string& dir, const char* name) { return dir.empty() ? name : (std::filesystem::path(dir) / name).string(); }

struct redis_server {
  std::string bin_dir;
  pid_t pid = -1;
  std::uint16_t port = 0;
  std::string dir;
  bool start() {
    port = free_port();
    char tmpl[] = "/tmp/kvx-redis-XXXXXX";
    if (!mkdtemp(tmpl)) return false;
    dir = tmpl;
    pid = spawn({redis_tool(bin_dir, "redis-server"), "--bind", "127.0.0.1", "--port", std::to_string(port), "--save", "", "--appendonly", "no",
                 "--dir", dir, "--proto-max-bulk-len", "1gb", "--client-query-buffer-limit", "1gb"});
    if (pid <= 0) return false;
    for (int i = 0; i < 100; ++i) {  // up to 5 s for the port to answer
      asio::io_context io;
      asio::ip::tcp::socket s(io);
      boost::system::error_code ec;
      s.connect({asio::ip::make_address("127.0.0.1"), port}, ec);
      if (!ec) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return false;
  }
  ~redis_server() {
    if (pid > 0) {
      ::kill(pid, SIGTERM);
      ::waitpid(pid, nullptr, 0);
    }
    if (!dir.empty()) std::filesystem::remove_all(dir);
  }
};

// redis-benchmark -t set,get --csv: "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
// Keys are drawn at random from `keys` (-r), so Redis holds at most keys x size bytes.
std::optional<std::pair<figures, figures>> redis_reference(const std::string& bin_dir, std::uint16_t port, std::uint64_t size,
                                                           unsigned clients, std::uint64_t ops, std::uint64_t keys) {
  const std::string out = "/tmp/kvx-redis-bench-" + std::to_string(::getpid()) + ".csv";
  pid_t pid = spawn({redis_tool(bin_dir, "redis-benchmark"), "-h", "127.0.0.1", "-p", std::to_string(port), "-t", "set,get", "-d",
                     std::to_string(size), "-c", std::to_string(clients), "-n", std::to_string(ops * clients), "-r",
                     std::to_string(keys), "--csv"},
                    out);
  if (pid <= 0) return std::nullopt;
  int status = 0;
  ::waitpid(pid, &status, 0);
  std::ifstream in(out);
  std::string line;
  std::optional<figures> set, get;
  while (std::getline(in, line)) {
    std::vector<std::string> cols;
    std::stringstream ss(line);
    std::string cell;
    while (std::getline(ss, cell, ',')) {
      if (cell.size() >= 2 && cell.front() == '"') cell = cell.substr(1, cell.size() - 2);
      cols.push_back(cell);
    }
    if (cols.size() < 7) continue;
    figures f;
    try {
      f.ops_per_s = std::stod(cols[1]);
      f.p50_us = std::stod(cols[4]) * 1000;
      f.p99_us = std::stod(cols[6]) * 1000;
    } catch (...) {
      continue;
    }
    f.gb_per_s = f.ops_per_s * static_cast<double>(size) / 1e9;
    if (cols[0] == "SET") set = f;
    if (cols[0] == "GET") get = f;
  }
  std::remove(out.c_str());
  if (!set || !get) return std::nullopt;
  return std::pair{*set, *get};
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) out.push_back(item);
  return out;
}

kvx::result<std::pair<figures, figures>> run_kvx(const options& o, std::uint64_t size, unsigned clients, std::uint64_t ops) {
#if KVX_WITH_UCX
  if (o.transport == "ucx") return kvx_run<kvx::transport::ucx>::run(o, size, clients, ops);
#endif
  if (o.transport == "shm") return kvx_run<kvx::transport::shm>::run(o, size, clients, ops);
  return kvx_run<kvx::transport::tcp>::run(o, size, clients, ops);
}

int usage(int rc) {
  std::puts(
      "usage: store_bench [--transport tcp|shm|ucx] [--ucx-tls TLS] [--sizes 4K,64K,1M,16M] [--clients 1,4] [--ops N]\n"
      "                   [--no-redis] [--redis-bin-dir DIR] [--recover-objects] [--json OUT]\n"
      "Put and get values through the kvx store (master + 2 nodes + N clients; one outstanding op per client)\n"
      "and, in the same run, Redis SET/GET with redis-benchmark at the same sizes and client counts.\n"
      "--transport ucx: every party through kvx::transport::ucx (built with UCX only); --ucx-tls: its UCX_TLS (default tcp).\n"
      "--ops: operations per client per size (default: enough to move ~256 MiB, 32 to 5000).\n"
      "--redis-bin-dir: where redis-server and redis-benchmark are (default: found through PATH).\n"
      "--recover-objects: the master keeps the nodes' ledgers (master_config::recover_objects): writers checksum each value.\n"
      "--json: every row (transport, op, size, clients, kvx and redis figures, ratio) as a JSON array.");
  return rc;
}

}  // namespace

int main(int argc, char** argv) {
  options o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "store_bench: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--help" || a == "-h") return usage(0);
    if (a == "--transport") {
      o.transport = value();
    } else if (a == "--ucx-tls") {
      o.ucx_tls = value();
    } else if (a == "--sizes") {
      o.sizes.clear();
      for (const auto& s : split(value())) {
        auto n = kvx::parse_size(s);
        if (!n || *n == 0) {
          std::fprintf(stderr, "store_bench: bad size '%s'\n", s.c_str());
          return 2;
        }
        o.sizes.push_back(*n);
      }
    } else if (a == "--clients") {
      o.clients.clear();
      for (const auto& s : split(value())) o.clients.push_back(static_cast<unsigned>(std::max(1, std::atoi(s.c_str()))));
    } else if (a == "--ops") {
      o.ops = std::strtoull(value().c_str(), nullptr, 10);
    } else if (a == "--no-redis") {
      o.redis = false;
    } else if (a == "--redis-bin-dir") {
      o.redis_bin_dir = value();
    } else if (a == "--recover-objects") {
      o.recover_objects = true;
    } else if (a == "--json") {
      o.json_out = value();
    } else {
      std::fprintf(stderr, "store_bench: unknown argument '%s'\n", a.c_str());
      return usage(2);
    }
  }
  if (o.transport != "tcp" && o.transport != "shm" && o.transport != "ucx") {
    std::fprintf(stderr, "store_bench: --transport must be tcp, shm or ucx\n");
    return 2;
  }
#if !KVX_WITH_UCX
  if (o.transport == "ucx") {
    std::fprintf(stderr, "store_bench: --transport ucx: this store_bench is built without UCX (the kvx::ucx target, Debian's libucx-dev)\n");
    return 2;
  }
#endif
  std::optional<redis_server> redis;
  if (o.redis) {
    redis.emplace();
    redis->bin_dir = o.redis_bin_dir;
    if (!redis->start()) {
      std::fprintf(stderr, "store_bench: could not start redis-server (Debian: apt-get install redis-server); put it on PATH, give --redis-bin-dir, or use --no-redis\n");
      return 1;
    }
  }
  json results = json::array();
  std::printf("%-5s %-8s %-7s | %-28s | %-28s | %s\n", "op", "size", "clients", "kvx ops/s  GB/s  p50/p99 us",
              "redis ops/s  GB/s  p50/p99 us", "kvx/redis");
  for (auto size : o.sizes)
    for (auto clients : o.clients) {
      const auto ops = ops_for(o, size);
      auto r = run_kvx(o, size, clients, ops);
      if (!r) {
        std::fprintf(stderr, "store_bench: %s\n", r.error().message().c_str());
        return 1;
      }
      std::optional<std::pair<figures, figures>> ref;
      if (redis) ref = redis_reference(o.redis_bin_dir, redis->port, size, clients, ops, keys_kept(size, clients, ops) * clients);
      for (int which = 0; which < 2; ++which) {
        const auto& k = which == 0 ? r->first : r->second;
        const char* op = which == 0 ? "put" : "get";
        std::optional<figures> ref_f;
        if (ref) ref_f = which == 0 ? ref->first : ref->second;
        std::printf("%-5s %-8s %-7u | %9.0f %6.2f %6.0f/%-6.0f | ", op, kvx::format_size(size).c_str(), clients, k.ops_per_s,
                    k.gb_per_s, k.p50_us, k.p99_us);
        if (ref_f)
          std::printf("%9.0f %6.2f %6.0f/%-6.0f | %.2fx\n", ref_f->ops_per_s, ref_f->gb_per_s, ref_f->p50_us, ref_f->p99_us,
                      ref_f->ops_per_s > 0 ? k.ops_per_s / ref_f->ops_per_s : 0.0);
        else
          std::printf("%-28s | -\n", o.redis ? "(redis-benchmark failed)" : "(not run)");
        json row{{"transport", o.transport == "ucx" ? "ucx:" + o.ucx_tls : o.transport}, {"op", op}, {"size", size}, {"clients", clients},
                 {"kvx", {{"ops_per_s", k.ops_per_s}, {"gb_per_s", k.gb_per_s}, {"p50_us", k.p50_us}, {"p99_us", k.p99_us}}}};
        if (ref_f) {
          row["redis"] = {{"ops_per_s", ref_f->ops_per_s}, {"gb_per_s", ref_f->gb_per_s}, {"p50_us", ref_f->p50_us}, {"p99_us", ref_f->p99_us}};
          row["ratio"] = ref_f->ops_per_s > 0 ? k.ops_per_s / ref_f->ops_per_s : 0.0;
        }
        results.push_back(row);
      }
      std::fflush(stdout);
    }
  if (!o.json_out.empty()) std::ofstream(o.json_out) << results.dump(2) << '\n';
  return 0;
}
