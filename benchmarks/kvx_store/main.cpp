// kvx-store: the distributed KV pool's processes and admin command.
//
//   kvx-store master --config master.json     the master (placement, leases, membership)
//   kvx-store node   --config node.json       a node contributing DRAM (and an SSD file)
//   kvx-store put    --config client.json ... put an object from a file or seeded bytes
//   kvx-store get    --config client.json ... get an object into a file, or verify it
//   kvx-store admin  --master HOST:PORT segments|objects|usage|drain NODE|undrain NODE
//
// Configs and commands are documented in docs/store.md ("Running the store").
#include <sys/prctl.h>
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <span>
#include <sstream>
#include <string>
#include <vector>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <kvx/cache/eviction/lru.hpp>
#include <kvx/cache/eviction/s3fifo.hpp>
#include <kvx/cache/eviction/sieve.hpp>
#include <kvx/core/bytes.hpp>
#include <kvx/memory/mapped_arena.hpp>
#include <kvx/memory/mapped_file.hpp>
#include <kvx/store/elected_master.hpp>
#include <kvx/store/master_server.hpp>
#include <kvx/store/metadata.hpp>
#include <kvx/store/store_client.hpp>
#include <kvx/store/store_node.hpp>
#include <kvx/transfer/http_metadata.hpp>
#include <kvx/transfer/http_metadata_server.hpp>
#include <kvx/transfer/transfer_engine.hpp>
#include <kvx/transport/shm.hpp>
#include <kvx/transport/tcp.hpp>
#if KVX_WITH_UCX
#include <kvx/transport/ucx.hpp>
#endif

#include "store_config.hpp"

namespace {

namespace asio = boost::asio;
using namespace kvx_store;

const char* const top_usage =
    "usage: kvx-store MODE [options]   (kvx-store MODE --help for each)\n"
    "  master --config F.json   run the store master\n"
    "  node   --config F.json   run a node that contributes DRAM (and an SSD file) to the pool\n"
    "  put    --config F.json --tenant T --key K (--file F | --size N [--seed S]) [--replicas N] [--pin]\n"
    "  get    --config F.json --tenant T --key K [--out F | --expect-file F | --expect-seed S]\n"
    "  admin  (--master HOST:PORT | --etcd HOST:PORT) [--json] segments | objects [--tenant T] [--limit N] | usage | drain NODE [--wait S [--until empty]] | undrain NODE | remove NODE [--force]\n"
    "Configs: docs/store.md, \"Running the store\".\n";

const char* const master_usage =
    "usage: kvx-store master --config F.json [--die-with-parent]\n"
    "Runs the store master until SIGINT/SIGTERM. Prints one JSON line when it listens:\n"
    "  {\"master\": \"HOST:PORT\", \"metadata_url\": \"http://HOST:PORT\"}   (metadata_url with metadata_server)\n"
    "Config keys: listen (required, \"HOST:PORT\", port 0 = any), metadata_server (\"HOST:PORT\": serve the\n"
    "engines' metadata over HTTP), tick_ms, put_lease_ms, read_lease_ms, max_put_lease_ms (the longest\n"
    "put lease a put may ask), max_read_lease_ms (the longest read lease granted), node_timeout_ms,\n"
    "replication_timeout_ms (a re-replication copy not done by then is given up), high_watermark,\n"
    "low_watermark, max_object_size, eviction (lru|s3fifo|sieve), placement (random|locality),\n"
    "tenant_quota ({\"tenant\": bytes}), log_level, election ({\"address\": ETCD, \"prefix\", \"role\",\n"
    "\"advertise\", \"ttl_ms\", \"poll_interval_ms\", \"takeover_grace_ms\" (at least the longest lease plus ttl_ms / 3)}:\n"
    "campaign on etcd, serve while leading),\n"
    "recover_objects (default: true with election: nodes keep ledgers so objects survive a failover).\n";

const char* const node_usage =
    "usage: kvx-store node --config F.json [--die-with-parent]\n"
    "Contributes memory to the pool until SIGINT/SIGTERM, then leaves the master (which drops it at once,\n"
    "not a node timeout later; at most 1 s is spent waiting for its answer). Prints one JSON line once registered:\n"
    "  {\"node\": NAME, \"segments\": [...]}\n"
    "Config keys: name (required), master (required: \"HOST:PORT\", or {\"address\": ETCD, \"prefix\", \"role\"}\n"
    "to follow the elected master), metadata (required: {\"backend\": \"http\",\n"
    "\"url\": ...} | {\"backend\": \"etcd\"|\"redis\", \"address\": ...}), transport (tcp|shm|ucx), address,\n"
    "ucx ({\"tls\", \"net_devices\", \"progress\": \"event\"|\"busy_poll\", \"settings\": {NAME: value}}: with ucx),\n"
    "dram (bytes, e.g. \"256MiB\"), ssd ({\"path\", \"bytes\", \"replace\"}: a file as an SSD segment,\n"
    "node \"NAME-ssd\"), host (the machine, for replica spreading; default NAME, shared by NAME-ssd),\n"
    "heartbeat_ms, log_level.\n";

const char* const put_usage =
    "usage: kvx-store put --config F.json --tenant T --key K (--file F | --size N [--seed S]) [--replicas N] [--pin]\n"
    "                     [--die-with-parent]\n"
    "Puts one object: the bytes of F, or N bytes of the pattern seeded by S (default 1).\n"
    "Config keys: name, master, metadata, transport, address, ucx, lease_ms, log_level (as the node's),\n"
    "put_lease_ms (the put lease asked; default: the master's put lease).\n"
    "Test-only: --hold-after-allocate allocates and writes the replicas, prints {\"put_id\": ...}, and waits\n"
    "(never commits) until killed.\n";

const char* const get_usage =
    "usage: kvx-store get --config F.json --tenant T --key K [--out F | --expect-file F | --expect-seed S]\n"
    "                     [--die-with-parent]\n"
    "Gets one object into F, or checks it byte for byte against a file or the pattern seeded by S.\n"
    "Prints {\"key\": ..., \"size\": N, \"verified\": true|false}; exit status 1 when it differs.\n";

const char* const admin_usage =
    "usage: kvx-store admin (--master HOST:PORT | --etcd HOST:PORT [--prefix P] [--role R]) [--json] COMMAND\n"
    "  segments                        every segment: node, tier, capacity, used, draining\n"
    "  objects [--tenant T] [--limit N] objects: tenant, key, size, replicas, leases, pinned, state\n"
    "  usage                           bytes used per tier and per tenant (with quotas)\n"
    "  drain NODE [--wait SECONDS]     stop placing on NODE and copy its objects elsewhere; with --wait,\n"
    "                                  poll until NODE holds nothing that is not elsewhere; the master then\n"
    "                                  gives back NODE's copies of objects whole elsewhere once unread\n"
    "        [--until empty]           with --wait, poll until NODE holds no copy at all (a copy the pool\n"
    "                                  has no room for elsewhere stays: then the wait runs out, status 1)\n"
    "  undrain NODE                    place new objects on NODE again\n"
    "  remove NODE [--force]           drop NODE now, as if its heartbeats had timed out: objects it alone\n"
    "                                  held are lost, the others copied again (for a node known dead, when\n"
    "                                  node_timeout is long); refused while NODE still heartbeats, unless\n"
    "                                  --force (it would register again, empty)\n"
    "--json prints the master's answer as JSON.\n";

int fail(const std::string& what) {
  std::fprintf(stderr, "kvx-store: %s\n", what.c_str());
  return 1;
}

// Bounds of numeric options, checked before they become an unsigned or a duration.
inline constexpr std::uint64_t max_replicas = 1024;
inline constexpr std::uint64_t max_wait_s = 1'000'000'000;

int usage_error(const std::string& what, const char* usage) {
  std::fprintf(stderr, "kvx-store: %s\n%s", what.c_str(), usage);
  return 2;
}

// Flags of one mode: "--name value" pairs and lone switches.
struct args {
  std::map<std::string, std::string> values;
  std::set<std::string> switches;
  std::vector<std::string> positional;

  [[nodiscard]] std::optional<std::string> get(const std::string& k) const {
    auto it = values.find(k);
    return it == values.end() ? std::nullopt : std::optional<std::string>(it->second);
  }
  [[nodiscard]] bool has(const std::string& k) const { return switches.count(k) > 0; }
};

// Parses argv[first..]; `valued` flags take a value, `lone` ones do not.
result<args> parse_args(int argc, char** argv, int first, std::initializer_list<std::string_view> valued,
                        std::initializer_list<std::string_view> lone) {
  args a;
  for (int i = first; i < argc; ++i) {
    std::string arg = argv[i];
    auto in = [&](std::initializer_list<std::string_view> l) {
      for (auto f : l)
        if (f == arg) return true;
      return false;
    };
    if (in(valued)) {
      if (i + 1 >= argc) return error{errc::invalid_argument, arg + " needs a value"};
      a.values[arg] = argv[++i];
    } else if (in(lone)) {
      a.switches.insert(arg);
    } else if (arg.starts_with("--")) {
      return error{errc::invalid_argument, "unknown option '" + arg + "'"};
    } else {
      a.positional.push_back(arg);
    }
  }
  return a;
}

void die_with_parent(const args& a) {
  if (!a.has("--die-with-parent")) return;
  const pid_t parent = ::getppid();
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (::getppid() != parent) std::_Exit(1);  // the parent is already gone
}

void print_line(const json& j) {
  std::cout << j.dump() << std::endl;  // one line, flushed: launchers wait for it
}

// Stops the io_context on SIGINT / SIGTERM after `on_stop`.
template <class OnStop>
void stop_on_signals(asio::io_context& io, asio::signal_set& signals, OnStop on_stop) {
  signals.async_wait([&io, on_stop](const boost::system::error_code& ec, int) mutable {
    if (ec) return;
    on_stop();
    io.stop();
  });
}

// --- master ------------------------------------------------------------------------

template <class Eviction, class Placement>
int run_master(const master_settings& s) {
  using state_type = kvx::store::master_state<Eviction, Placement>;
  asio::io_context io;
  kvx::store::master_server_config server_config;
  server_config.address = s.listen.host;
  server_config.port = s.listen.port;
  server_config.tick_interval = s.tick;
  // Alone, or campaigning on etcd and serving only while it leads (a fresh state each term).
  std::optional<state_type> state;
  std::optional<kvx::store::master_server<state_type>> server;
  std::optional<kvx::store::elected_master<state_type>> elected;
  if (s.election) {
    kvx::store::elected_master_config c;
    c.server = server_config;
    c.advertise = s.election->advertise;
    c.role = s.election->where.role;
    c.election = s.election->election;
    c.takeover_grace = s.election->takeover_grace;
    elected.emplace(kvx::store::etcd_metadata(io.get_executor(), s.election->where.etcd), c,
                    [config = s.state] { return std::make_unique<state_type>(config); });
    if (auto started = elected->start(); !started) return fail(started.error().message());
  } else {
    state.emplace(s.state);
    server.emplace(io.get_executor(), *state, server_config);
    if (auto started = server->start(); !started) return fail(started.error().message());
  }
  json hello{{"master", elected ? elected->endpoint() : server->endpoint()}};
  if (elected) hello["role"] = s.election->where.role;
  kvx::transfer::embedded_metadata metadata(io.get_executor());
  std::optional<kvx::transfer::http_metadata_server<kvx::transfer::embedded_metadata>> metadata_server;
  if (s.metadata_server) {
    kvx::transfer::http_metadata_server_config c;
    c.address = s.metadata_server->host;
    c.port = s.metadata_server->port;
    metadata_server.emplace(io.get_executor(), metadata, c);
    if (auto started = metadata_server->start(); !started) return fail("metadata_server: " + started.error().message());
    hello["metadata_url"] = metadata_server->url();
  }
  asio::signal_set signals(io, SIGINT, SIGTERM);
  stop_on_signals(io, signals, [&] {
    if (server) server->stop();
    if (elected) elected->stop();  // without resigning: a standby leads once the lease runs out
    if (metadata_server) metadata_server->stop();
  });
  print_line(hello);
  io.run();
  return 0;
}

template <class Eviction>
int run_master_with_placement(const master_settings& s) {
  if (s.placement == "locality") return run_master<Eviction, kvx::store::placement::locality_aware>(s);
  return run_master<Eviction, kvx::store::placement::random_with_capacity>(s);
}

int master_mode(const args& a) {
  auto path = a.get("--config");
  if (!path) return usage_error("master needs --config F.json", master_usage);
  auto doc = read_config_file(*path);
  if (!doc) return fail(doc.error().message());
  auto s = parse_master(*doc);
  if (!s) return fail(*path + ": " + s.error().message());
  kvx::set_log_level(s->log_level);
  die_with_parent(a);
  if (s->eviction == "s3fifo") return run_master_with_placement<kvx::cache::eviction::s3fifo>(*s);
  if (s->eviction == "sieve") return run_master_with_placement<kvx::cache::eviction::sieve>(*s);
  return run_master_with_placement<kvx::cache::eviction::lru>(*s);
}

// --- what nodes and clients share: metadata, transport, engine ------------------------

result<kvx::store::any_metadata_backend> make_metadata(asio::any_io_executor ex, const json& config) {
  kvx::config::view v(config, "metadata");
  auto backend = v.required<std::string>("backend");
  KVX_TRY(backend);
  if (*backend != "http") return kvx::store::any_metadata_backend::from_config(ex, v);
  KVX_TRY(v.allow_only({"backend", "url", "timeout_ms"}));
  auto url = v.required<std::string>("url");
  KVX_TRY(url);
  auto c = kvx::transfer::http_metadata_config::from_url(*url);
  if (!c) return error{errc::invalid_argument, "config field 'metadata.url': " + c.error().context()};
  auto timeout = parse_ms(v, "timeout_ms", c->timeout, 0);
  KVX_TRY(timeout);
  if (*timeout > kvx::transfer::detail::http_metadata_max_timeout)  // the client would throw
    return error{errc::invalid_argument, "config field '" + v.path_of("timeout_ms") + "': at most " +
                                             std::to_string(kvx::transfer::detail::http_metadata_max_timeout.count()) + " (ms)"};
  c->timeout = *timeout;
  return kvx::store::any_metadata_backend(std::make_shared<kvx::transfer::http_metadata>(ex, std::move(*c)), "http");
}

// Each transport is its own instantiation of the engine, node and client
// (the type-erased any_transport would cost a virtual call per operation).
// Built in place (shm cannot move); throws std::system_error on a bad address
// (tcp) or a UCX set-up failure (ucx: an unavailable "tls" say).
template <class Transport>
Transport make_transport(asio::any_io_executor ex, const engine_settings& s, bool grant_ptrace) {
  if constexpr (std::is_same_v<Transport, kvx::transport::tcp>) {
    kvx::transport::tcp::config c;
    c.address = s.address;
    return kvx::transport::tcp(ex, c);
#if KVX_WITH_UCX
  } else if constexpr (std::is_same_v<Transport, kvx::transport::ucx>) {
    return kvx::transport::ucx(ex, s.ucx);
#endif
  } else {
    kvx::transport::shm_options o;
    o.grant_ptrace = grant_ptrace;  // an SSD file is not a memfd: peers copy it with process_vm_*
    return kvx::transport::shm(ex, o);
  }
}

// Calls `f.template operator()<Transport>()` for the transport `name` names.
template <class F>
int with_transport(const std::string& name, F&& f) {
  if (name == "shm") return f.template operator()<kvx::transport::shm>();
#if KVX_WITH_UCX
  if (name == "ucx") return f.template operator()<kvx::transport::ucx>();
#endif
  return f.template operator()<kvx::transport::tcp>();
}

// Host memory the transport can serve: a memfd for shm (peers map it);
// for ucx, memory UCX allocates (its posix/sysv transports reach it
// one-sidedly, where ordinary memory goes through UCX's active-message
// emulation of RMA: 1 MiB puts took 565 us instead of 16 ms in store_bench);
// an anonymous mapping for tcp.
struct pool_memory {
  std::optional<kvx::transport::shm_memory> shm;
  std::optional<kvx::memory::mapped_arena> arena;
#if KVX_WITH_UCX
  std::optional<kvx::transport::ucx_buffer> ucx;
#endif
  [[nodiscard]] kvx::memory::memory_region region() const {
#if KVX_WITH_UCX
    if (ucx) return ucx->region();
#endif
    return shm ? shm->region() : arena->region();
  }
};

template <class Transport>
result<pool_memory> allocate([[maybe_unused]] Transport& transport, std::uint64_t bytes) {
  pool_memory m;
#if KVX_WITH_UCX
  if constexpr (std::is_same_v<Transport, kvx::transport::ucx>) {
    auto u = transport.allocate(bytes);
    KVX_TRY(u);
    m.ucx.emplace(std::move(*u));
  } else
#endif
  if constexpr (std::is_same_v<Transport, kvx::transport::shm>) {
    auto s = kvx::transport::shm_allocate(bytes);
    KVX_TRY(s);
    m.shm.emplace(std::move(*s));
  } else {
    auto a = kvx::memory::mapped_arena::create(bytes);
    KVX_TRY(a);
    m.arena.emplace(std::move(*a));
  }
  return m;
}

// A process's engine with its metadata backend and transport.
template <class Transport>
struct party {
  using engine_type = kvx::transfer::transfer_engine<kvx::store::any_metadata_backend, Transport>;
  kvx::store::any_metadata_backend metadata;
  Transport transport;
  engine_type engine;
  party(kvx::store::any_metadata_backend m, const engine_settings& s, const std::string& name, bool grant_ptrace)
      : metadata(std::move(m)),
        transport(make_transport<Transport>(metadata.get_executor(), s, grant_ptrace)),
        engine(metadata, options(s, name), transport) {}
  static kvx::transfer::engine_options options(const engine_settings& s, const std::string& name) {
    kvx::transfer::engine_options o;
    o.node = name;
    if (s.transfer_timeout.count() > 0) o.deadline = s.transfer_timeout;
    return o;
  }
};

template <class Transport>
result<std::unique_ptr<party<Transport>>> make_party(asio::io_context& io, const engine_settings& s, const std::string& name,
                                                     bool grant_ptrace) {
  auto meta = make_metadata(io.get_executor(), s.metadata);
  KVX_TRY(meta);
  try {
    return std::make_unique<party<Transport>>(std::move(*meta), s, name, grant_ptrace);
  } catch (const std::system_error& e) {
    return error{e.code(), std::string(s.transport == "ucx" ? "config field 'ucx': " : "config field 'address': ") + e.what()};
  }
}

// The master at a fixed address, or the one leading the configured election.
std::shared_ptr<kvx::store::master_client> connect_master(asio::io_context& io, const engine_settings& s) {
  if (!s.leader) return kvx::store::master_client::create(io.get_executor(), s.master.text());
  kvx::store::etcd_metadata etcd(io.get_executor(), s.leader->etcd);
  return kvx::store::master_client::create(io.get_executor(), kvx::store::leader_lookup(etcd, s.leader->role));
}

// --- node --------------------------------------------------------------------------

template <class Transport>
int run_node(const node_settings& settings, const std::string& path);

int node_mode(const args& a) {
  auto path = a.get("--config");
  if (!path) return usage_error("node needs --config F.json", node_usage);
  auto doc = read_config_file(*path);
  if (!doc) return fail(doc.error().message());
  auto s = parse_node(*doc);
  if (!s) return fail(*path + ": " + s.error().message());
  kvx::set_log_level(s->engine.log_level);
  die_with_parent(a);
  return with_transport(s->engine.transport, [&]<class Transport>() { return run_node<Transport>(*s, *path); });
}

template <class Transport>
int run_node(const node_settings& settings, const std::string& path) {
  using engine_type = typename party<Transport>::engine_type;
  const auto* s = &settings;
  asio::io_context io;
  auto p = make_party<Transport>(io, s->engine, s->engine.name, s->ssd.has_value());
  if (!p) return fail(path + ": " + p.error().message());
  auto master = connect_master(io, s->engine);

  struct contribution {
    std::string node, segment, tier;
    pool_memory memory;
    std::optional<kvx::memory::mapped_file> file;
    std::unique_ptr<kvx::store::store_node<engine_type>> node_object;
    [[nodiscard]] kvx::memory::memory_region region() const { return file ? file->region() : memory.region(); }
  };
  std::vector<contribution> parts;
  if (s->dram_bytes) {
    auto m = allocate((*p)->transport, s->dram_bytes);
    if (!m) return fail("dram: " + m.error().message());
    parts.push_back({s->engine.name, s->engine.name + "/dram", "dram", std::move(*m), std::nullopt, nullptr});
  }
  if (s->ssd) {
    // Its own node name: a store_node serves the replication tasks of one segment.
    kvx::memory::mapped_file::options o;
    o.replace = s->ssd->replace;
    auto f = kvx::memory::mapped_file::create(s->ssd->path, s->ssd->bytes, o);
    if (!f) return fail("ssd: " + f.error().message());
    parts.push_back({s->engine.name + "-ssd", s->engine.name + "-ssd/ssd", "ssd", {}, std::move(*f), nullptr});
  }
  int rc = 0;
  std::size_t started = 0;
  for (auto& part : parts) {
    kvx::store::node_options o;
    o.name = part.node;
    o.segment = part.segment;
    o.tier = part.tier;
    o.host = s->host;
    o.heartbeat = s->heartbeat;
    part.node_object = std::make_unique<kvx::store::store_node<engine_type>>((*p)->engine, master, o);
    part.node_object->async_start(part.region(), [&, seg = part.segment](std::error_code ec) {
      if (ec) {
        rc = fail("node '" + s->engine.name + "': registering segment '" + seg + "': " + ec.message());
        io.stop();
        return;
      }
      if (++started < parts.size()) return;
      json segs = json::array();
      for (const auto& q : parts)
        segs.push_back({{"node", q.node}, {"segment", q.segment}, {"tier", q.tier}, {"host", s->host},
                        {"capacity", q.region().length}});
      print_line({{"node", s->engine.name}, {"segments", std::move(segs)}});
    });
  }
  // A clean stop tells the master, which drops the node's segments at once
  // (not a node timeout later); at most a second, then the node just stops.
  asio::signal_set signals(io, SIGINT, SIGTERM);
  std::size_t left = 0;
  signals.async_wait([&](const boost::system::error_code& ec, int) {
    if (ec) return;
    left = parts.size();
    for (auto& part : parts)
      part.node_object->async_leave(kvx::cancel_after(io.get_executor(), std::chrono::seconds(1), [&, name = part.node](std::error_code lec) {
        if (lec) kvx::log(kvx::log_level::warn, "node '", name, "': leaving: ", lec.message(), "; the master drops it after its node timeout");
        if (--left == 0) io.stop();
      }));
  });
  io.run();
  return rc;
}

// --- put / get ---------------------------------------------------------------------

std::byte pattern_at(std::uint64_t i, std::uint64_t seed) {
  return static_cast<std::byte>((i * 131 + seed * 7 + (i >> 9)) & 0xff);
}

result<std::string> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return error{errc::not_found, "cannot read '" + path + "'"};
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

result<std::uint64_t> number_arg(const args& a, const std::string& flag, std::uint64_t fallback) {
  auto v = a.get(flag);
  if (!v) return fallback;
  auto n = kvx::parse_size(*v);
  if (!n) return error{errc::invalid_argument, flag + ": " + n.error().message()};
  return *n;
}

// Runs `body` on the io_context until it finishes; its value is the exit status.
int run_until_done(asio::io_context& io, asio::awaitable<int> body) {
  int rc = 1;
  asio::co_spawn(io, std::move(body), [&](std::exception_ptr e, int r) {
    rc = e ? fail("internal error") : r;
    io.stop();  // transports keep acceptors open: the context never runs out of work
  });
  io.run();
  return rc;
}

template <class Transport>
int run_client(const std::string& mode, const args& a, const client_settings& settings, const std::string& config_path);

int client_mode(const std::string& mode, const args& a) {
  const char* usage = mode == "put" ? put_usage : get_usage;
  auto path = a.get("--config");
  auto tenant = a.get("--tenant");
  auto key = a.get("--key");
  if (!path || !tenant || !key) return usage_error(mode + " needs --config, --tenant and --key", usage);
  if (mode == "put")
    if (auto replicas = number_arg(a, "--replicas", 1); replicas && *replicas > max_replicas)
      return usage_error("--replicas: at most " + std::to_string(max_replicas), usage);
  auto doc = read_config_file(*path);
  if (!doc) return fail(doc.error().message());
  auto s = parse_client(*doc);
  if (!s) return fail(*path + ": " + s.error().message());
  // The master's reasons (a quota, no room) reach the log at info: show them.
  kvx::set_log_level(std::min(s->engine.log_level, kvx::log_level::info));
  die_with_parent(a);
  return with_transport(s->engine.transport, [&]<class Transport>() { return run_client<Transport>(mode, a, *s, *path); });
}

template <class Transport>
int run_client(const std::string& mode, const args& a, const client_settings& settings, const std::string& config_path) {
  using engine_type = typename party<Transport>::engine_type;
  const char* usage = mode == "put" ? put_usage : get_usage;
  const auto* s = &settings;
  const auto* path = &config_path;
  const auto tenant = a.get("--tenant");
  const auto key = a.get("--key");
  const std::string name = s->engine.name.empty() ? "kvx-store-" + std::to_string(::getpid()) : s->engine.name;
  const kvx::store::object_key object{*tenant, *key};
  auto seed = number_arg(a, "--seed", 1);
  if (!seed) return usage_error(seed.error().message(), usage);

  asio::io_context io;
  auto p = make_party<Transport>(io, s->engine, name, false);
  if (!p) return fail(*path + ": " + p.error().message());
  auto& engine = (*p)->engine;
  auto master = connect_master(io, s->engine);
  kvx::store::client_options co;
  co.node = name;
  co.lease = s->lease;
  kvx::store::store_client<engine_type> client(engine, master, co);

  if (mode == "put") {
    auto file = a.get("--file");
    auto size = number_arg(a, "--size", 0);
    auto replicas = number_arg(a, "--replicas", 1);
    if (!size || !replicas) return usage_error(!size ? size.error().message() : replicas.error().message(), usage);
    if (!file && *size == 0) return usage_error("put needs --file F or --size N", usage);
    std::string bytes;
    if (file) {
      auto text = read_file(*file);
      if (!text) return fail(text.error().message());
      bytes = std::move(*text);
      if (bytes.empty()) return fail("'" + *file + "' is empty");
    }
    const std::uint64_t n = file ? bytes.size() : *size;
    auto memory = allocate((*p)->transport, n);
    if (!memory) return fail(memory.error().message());
    auto region = memory->region();
    for (std::uint64_t i = 0; i < n; ++i) region.data()[i] = file ? static_cast<std::byte>(bytes[i]) : pattern_at(i, *seed);
    kvx::store::put_options po;
    po.replicas = static_cast<unsigned>(*replicas);
    po.preferred_node = name;
    po.soft_pin = a.has("--pin");
    if (s->put_lease) po.lease = *s->put_lease;
    const bool hold = a.has("--hold-after-allocate");
    return run_until_done(io, [&]() -> asio::awaitable<int> {
      auto [rec, desc] = co_await engine.async_register_memory(region, name + "/buf", asio::as_tuple(asio::use_awaitable));
      if (rec) co_return fail("registering the buffer: " + rec.message());
      const std::span<const std::byte> src(region.data(), n);
      if (hold) {
        // Test-only: a writer that allocates and writes, then never commits.
        auto [ec, ticket] = co_await master->async_call(
            kvx::store::protocol::make_request("put_start", "tenant", object.tenant, "key", object.key, "size", n,
                                               "replicas", po.replicas),
            asio::as_tuple(asio::use_awaitable));
        if (ec) co_return fail("put_start: " + kvx::store::protocol::describe(ec, ticket));
        kvx::transfer::batch b;
        for (const auto& r : ticket["replicas"]) b.write(src, r.value("segment", std::string()), r.value("offset", std::uint64_t{0}));
        auto [tec, res] = co_await engine.async_transfer(std::move(b), asio::as_tuple(asio::use_awaitable));
        if (tec) co_return fail("writing the replicas: " + res.first_error().message());
        print_line({{"put_id", ticket["put_id"]}, {"replicas", ticket["replicas"]}});
        asio::steady_timer forever(io, asio::steady_timer::time_point::max());
        co_await forever.async_wait(asio::as_tuple(asio::use_awaitable));
        co_return 1;
      }
      auto [ec] = co_await client.async_put(object, src, po, asio::as_tuple(asio::use_awaitable));
      if (ec) co_return fail("put '" + object.full() + "': " + ec.message());
      print_line({{"key", object.full()}, {"size", n}, {"replicas", po.replicas}});
      co_return 0;
    }());
  }

  // get
  auto out = a.get("--out");
  auto expect_file = a.get("--expect-file");
  const bool expect_seed = a.get("--seed").has_value() || a.get("--expect-seed").has_value();
  auto expected_seed = number_arg(a, "--expect-seed", *seed);
  if (!expected_seed) return usage_error(expected_seed.error().message(), usage);
  std::string expected;
  if (expect_file) {
    auto text = read_file(*expect_file);
    if (!text) return fail(text.error().message());
    expected = std::move(*text);
  }
  return run_until_done(io, [&]() -> asio::awaitable<int> {
    // The size first (a lease the get below extends), then a buffer that fits.
    auto [sec, grant] = co_await master->async_call(
        kvx::store::protocol::make_request("get", "tenant", object.tenant, "key", object.key),
        asio::as_tuple(asio::use_awaitable));
    if (sec) co_return fail("get '" + object.full() + "': " + kvx::store::protocol::describe(sec, grant));
    const auto size = grant.value("size", std::uint64_t{0});
    auto memory = allocate((*p)->transport, std::max<std::uint64_t>(size, 1));
    if (!memory) co_return fail(memory.error().message());
    auto region = memory->region();
    auto [rec, desc] = co_await engine.async_register_memory(region, name + "/buf", asio::as_tuple(asio::use_awaitable));
    if (rec) co_return fail("registering the buffer: " + rec.message());
    auto [ec, n] = co_await client.async_get(object, std::span<std::byte>(region.data(), size), asio::as_tuple(asio::use_awaitable));
    // End the size probe's lease too, and wait for the answer: a release
    // still queued when this process exits would leave the lease to expire.
    (void)co_await master->async_call(kvx::store::protocol::make_request("release", "tenant", object.tenant, "key", object.key),
                                      asio::as_tuple(asio::use_awaitable));
    if (ec) co_return fail("get '" + object.full() + "': " + ec.message());
    json line{{"key", object.full()}, {"size", n}};
    std::optional<std::uint64_t> differs;
    if (expect_file) {
      if (expected.size() != n) differs = std::min<std::uint64_t>(expected.size(), n);
      for (std::uint64_t i = 0; !differs && i < n; ++i)
        if (region.data()[i] != static_cast<std::byte>(expected[i])) differs = i;
    } else if (expect_seed) {
      for (std::uint64_t i = 0; !differs && i < n; ++i)
        if (region.data()[i] != pattern_at(i, *expected_seed)) differs = i;
    }
    if (out) {
      std::ofstream f(*out, std::ios::binary);
      f.write(reinterpret_cast<const char*>(region.data()), static_cast<std::streamsize>(n));
      if (!f) co_return fail("cannot write '" + *out + "'");
    }
    if (expect_file || expect_seed) line["verified"] = !differs;
    print_line(line);
    if (differs) co_return fail("get '" + object.full() + "': byte " + std::to_string(*differs) + " differs");
    co_return 0;
  }());
}

// --- admin ---------------------------------------------------------------------------

std::string size_text(std::uint64_t n) { return kvx::format_size(n); }

void print_segments(const json& r) {
  std::printf("%-24s %-16s %-16s %-5s %12s %12s %6s %s\n", "segment", "node", "host", "tier", "capacity", "used", "used%",
              "");
  for (const auto& s : r["segments"]) {
    const auto cap = s["capacity"].get<std::uint64_t>();
    const auto used = s["used"].get<std::uint64_t>();
    std::printf("%-24s %-16s %-16s %-5s %12s %12s %5.1f%% %s\n", s["name"].get<std::string>().c_str(),
                s["node"].get<std::string>().c_str(), s.value("host", std::string()).c_str(),
                s["tier"].get<std::string>().c_str(), size_text(cap).c_str(),
                size_text(used).c_str(), cap ? 100.0 * static_cast<double>(used) / static_cast<double>(cap) : 0.0,
                s["draining"].get<bool>() ? "draining" : "");
  }
}

void print_objects(const json& r) {
  std::printf("%-12s %-32s %10s %-9s %-24s %9s %s\n", "tenant", "key", "size", "state", "replicas (wanted)", "lease_ms", "pinned");
  for (const auto& o : r["objects"]) {
    std::string nodes;
    for (const auto& rep : o["replicas"]) nodes += (nodes.empty() ? "" : ",") + rep["node"].get<std::string>();
    nodes += " (" + std::to_string(o["replicas_wanted"].get<unsigned>()) + ")";
    if (o["copying"].get<std::size_t>()) nodes += " +" + std::to_string(o["copying"].get<std::size_t>()) + " copying";
    std::printf("%-12s %-32s %10s %-9s %-24s %9lld %s\n", o["tenant"].get<std::string>().c_str(),
                o["key"].get<std::string>().c_str(), size_text(o["size"].get<std::uint64_t>()).c_str(),
                o["committed"].get<bool>() ? "committed" : "pending", nodes.c_str(),
                static_cast<long long>(o["lease_ms"].get<std::int64_t>()), o["pinned"].get<bool>() ? "yes" : "");
  }
  if (r.value("truncated", false)) std::printf("(more objects: raise --limit)\n");
}

void print_usage(const json& r) {
  std::printf("total: %s of %s in %zu objects on %zu nodes\n", size_text(r["used"].get<std::uint64_t>()).c_str(),
              size_text(r["capacity"].get<std::uint64_t>()).c_str(), r["objects"].get<std::size_t>(), r["nodes"].size());
  for (const auto& [tier, t] : r["tiers"].items())
    std::printf("tier %-8s %12s of %12s\n", tier.c_str(), size_text(t["used"].get<std::uint64_t>()).c_str(),
                size_text(t["capacity"].get<std::uint64_t>()).c_str());
  for (const auto& [tenant, t] : r["tenants"].items()) {
    std::printf("tenant %-12s %12s", tenant.c_str(), size_text(t["used"].get<std::uint64_t>()).c_str());
    if (t.contains("quota")) std::printf(" of quota %s", size_text(t["quota"].get<std::uint64_t>()).c_str());
    std::printf("\n");
  }
}

void print_drain(const json& r) {
  const bool empty = r.value("empty", false);
  std::printf("node '%s': %zu objects, %zu only there, %zu copies in flight, %s held: %s\n", r["node"].get<std::string>().c_str(),
              r["objects"].get<std::size_t>(), r["only_here"].get<std::size_t>(), r["copying"].get<std::size_t>(),
              size_text(r.value("used", std::uint64_t{0})).c_str(),
              empty                     ? "drained and empty (every copy it had is given back)"
              : r["drained"].get<bool>() ? "drained (it holds nothing that is not elsewhere)"
                                         : "draining");
}

void print_undrain(const json& r) {
  std::printf("node '%s': %s\n", r["node"].get<std::string>().c_str(),
              r["was_draining"].get<bool>() ? "no longer draining; new objects may be placed on it"
                                            : "was not draining; nothing changed");
}

int admin_mode(const args& a) {
  auto master_text = a.get("--master");
  auto etcd_text = a.get("--etcd");
  if (!master_text == !etcd_text) return usage_error("admin needs --master HOST:PORT or --etcd HOST:PORT", admin_usage);
  engine_settings where;
  if (master_text) {
    auto hp = parse_host_port(*master_text, "--master");
    if (!hp) return usage_error(hp.error().context(), admin_usage);
    where.master = *hp;
  } else {
    json e{{"address", *etcd_text}, {"prefix", a.get("--prefix").value_or("")},
           {"role", a.get("--role").value_or(kvx::store::default_master_role)}};
    auto leader = parse_etcd_role(kvx::config::view(e, "--etcd"), {});
    if (!leader) return usage_error(leader.error().context(), admin_usage);
    where.leader = std::move(*leader);
  }
  const std::string master_name = master_text ? *master_text : "leading '" + where.leader->role + "' on etcd " + *etcd_text;
  if (a.positional.empty()) return usage_error("admin needs a command", admin_usage);
  const auto& command = a.positional[0];
  json request;
  if (command == "segments") {
    request = kvx::store::protocol::make_request("list_segments");
  } else if (command == "objects") {
    request = kvx::store::protocol::make_request("list_objects");
    if (auto t = a.get("--tenant")) request["tenant"] = *t;
    auto limit = number_arg(a, "--limit", 10000);
    if (!limit) return usage_error(limit.error().message(), admin_usage);
    request["limit"] = *limit;
  } else if (command == "usage") {
    request = kvx::store::protocol::make_request("usage");
  } else if (command == "drain" || command == "undrain" || command == "remove") {
    if (a.positional.size() < 2) return usage_error(command + " needs a NODE", admin_usage);
    request = kvx::store::protocol::make_request(
        command == "drain" ? "drain_node" : command == "undrain" ? "undrain_node" : "remove_node", "node", a.positional[1]);
    if (command == "remove" && a.has("--force")) request["force"] = true;
  } else {
    return usage_error("unknown admin command '" + command + "'", admin_usage);
  }
  if (a.has("--force") && command != "remove") return usage_error("--force is for remove", admin_usage);
  const auto until = a.get("--until");
  if (until && (*until != "empty" || command != "drain" || !a.get("--wait")))
    return usage_error("--until: only 'empty', with drain --wait", admin_usage);
  const char* const wanted = until ? "empty" : "drained";
  if (a.positional.size() > (command == "drain" || command == "undrain" || command == "remove" ? 2u : 1u))
    return usage_error("unexpected argument '" + a.positional.back() + "'", admin_usage);
  auto wait_s = number_arg(a, "--wait", 0);
  if (!wait_s) return usage_error(wait_s.error().message(), admin_usage);
  // now() + --wait in nanoseconds must not overflow: about 31 years at most.
  if (*wait_s > max_wait_s) return usage_error("--wait: at most " + std::to_string(max_wait_s) + " seconds", admin_usage);
  const bool as_json = a.has("--json");

  asio::io_context io;
  auto master = connect_master(io, where);
  return run_until_done(io, [&]() -> asio::awaitable<int> {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(*wait_s);
    for (;;) {
      auto [ec, r] = co_await master->async_call(request, kvx::cancel_after(std::chrono::seconds(5), asio::as_tuple(asio::use_awaitable)));
      if (ec) co_return fail("admin " + command + " (master " + master_name + "): " + kvx::store::protocol::describe(ec, r));
      r.erase("id");
      r.erase("ok");
      const bool waiting = command == "drain" && !r.value(wanted, false) && std::chrono::steady_clock::now() < deadline;
      if (waiting) {
        asio::steady_timer t(io, std::chrono::milliseconds(200));
        co_await t.async_wait(asio::as_tuple(asio::use_awaitable));
        continue;
      }
      if (as_json) {
        print_line(r);
      } else if (command == "segments") {
        print_segments(r);
      } else if (command == "objects") {
        print_objects(r);
      } else if (command == "usage") {
        print_usage(r);
      } else if (command == "undrain") {
        print_undrain(r);
      } else if (command == "remove") {
        std::printf("node '%s' removed: %zu objects lost with it, %zu puts in flight reclaimed; the others are copied again\n",
                    r["node"].get<std::string>().c_str(), r["lost"].get<std::size_t>(), r["reclaimed_puts"].get<std::size_t>());
      } else {
        print_drain(r);
      }
      std::fflush(stdout);
      // drain --wait that ran out of time: not drained (or not empty) is a failure.
      co_return command == "drain" && *wait_s > 0 && !r.value(wanted, false) ? 1 : 0;
    }
  }());
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return usage_error("no mode given", top_usage);
  const std::string mode = argv[1];
  if (mode == "--help" || mode == "-h" || mode == "help") {
    std::fputs(top_usage, stdout);
    return 0;
  }
  const char* usage = mode == "master" ? master_usage
                      : mode == "node" ? node_usage
                      : mode == "put"  ? put_usage
                      : mode == "get"  ? get_usage
                      : mode == "admin" ? admin_usage
                                        : nullptr;
  if (!usage) return usage_error("unknown mode '" + mode + "'", top_usage);
  for (int i = 2; i < argc; ++i)
    if (std::strcmp(argv[i], "--help") == 0 || std::strcmp(argv[i], "-h") == 0) {
      std::fputs(usage, stdout);
      return 0;
    }
  result<args> a = error{errc::invalid_argument, ""};
  if (mode == "master" || mode == "node")
    a = parse_args(argc, argv, 2, {"--config"}, {"--die-with-parent"});
  else if (mode == "put")
    a = parse_args(argc, argv, 2, {"--config", "--tenant", "--key", "--file", "--size", "--seed", "--replicas"},
                   {"--pin", "--hold-after-allocate", "--die-with-parent"});
  else if (mode == "get")
    a = parse_args(argc, argv, 2, {"--config", "--tenant", "--key", "--out", "--expect-file", "--expect-seed", "--seed"},
                   {"--die-with-parent"});
  else
    a = parse_args(argc, argv, 2, {"--master", "--etcd", "--prefix", "--role", "--tenant", "--limit", "--wait", "--until"},
                   {"--json", "--force"});
  if (!a) return usage_error(a.error().message(), usage);
  if (mode != "admin" && !a->positional.empty()) return usage_error("unexpected argument '" + a->positional[0] + "'", usage);
  if (mode == "master") return master_mode(*a);
  if (mode == "node") return node_mode(*a);
  if (mode == "admin") return admin_mode(*a);
  return client_mode(mode, *a);
}
