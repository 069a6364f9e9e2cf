#pragma once
// kvx-store's JSON configs: one flat object per mode, every key checked
// (unknown keys, wrong types and missing fields are errors naming the field).
// The reference for every key is docs/store.md, "Running the store".

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include <kvx/core/config.hpp>
#include <kvx/core/log.hpp>
#include <kvx/core/result.hpp>
#include <kvx/features.hpp>
#include <kvx/store/elected_master.hpp>
#include <kvx/store/etcd_metadata.hpp>
#include <kvx/store/master_state.hpp>
#if KVX_WITH_UCX
#include <kvx/transport/ucx.hpp>
#endif

namespace kvx_store {

using kvx::errc;
using kvx::error;
using kvx::result;
using json = nlohmann::json;

struct host_port {
  std::string host;
  std::uint16_t port = 0;
  [[nodiscard]] std::string text() const { return host + ":" + std::to_string(port); }
};

//! "HOST:PORT" ("[v6]:PORT"); `field` names the config field in the error.
inline result<host_port> parse_host_port(const std::string& text, const std::string& field) {
  auto bad = [&](const std::string& why) {
    return error{errc::invalid_argument, "config field '" + field + "': '" + text + "' " + why};
  };
  const auto colon = text.rfind(':');
  if (colon == std::string::npos || colon == 0) return bad("is not HOST:PORT");
  std::string host = text.substr(0, colon);
  if (host.size() > 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  const auto port_text = text.substr(colon + 1);
  if (port_text.empty() || port_text.size() > 5 || port_text.find_first_not_of("0123456789") != std::string::npos)
    return bad("has no valid port");
  const auto port = std::stoul(port_text);
  if (port > 65535) return bad("has a port above 65535");
  return host_port{host, static_cast<std::uint16_t>(port)};
}

inline result<json> read_config_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) return error{errc::not_found, "cannot read config file '" + path + "'"};
  std::stringstream ss;
  ss << in.rdbuf();
  auto doc = kvx::config::parse(ss.str());
  if (!doc) return error{errc::invalid_argument, "config file '" + path + "' is not valid JSON"};
  if (!doc->is_object()) return error{errc::invalid_argument, "config file '" + path + "': expected a JSON object"};
  return doc;
}

inline result<kvx::log_level> parse_log_level(const kvx::config::view& v) {
  auto name = v.optional<std::string>("log_level", "warn");
  KVX_TRY(name);
  for (auto l : {kvx::log_level::trace, kvx::log_level::debug, kvx::log_level::info, kvx::log_level::warn,
                 kvx::log_level::error, kvx::log_level::off})
    if (kvx::to_string(l) == *name) return l;
  return error{errc::invalid_argument, "config field '" + v.path_of("log_level") + "': unknown level '" + *name +
                                           "' (expected trace, debug, info, warn, error or off)"};
}

// The largest duration a config accepts, 2^40 ms (about 34 years): in nanoseconds it stays far below
// INT64_MAX, so `steady_clock::now() + d` (and a few multiples of d) cannot overflow.
inline constexpr std::uint64_t max_config_ms = std::uint64_t{1} << 40;

//! The shortest put lease, read lease or copy deadline a config may set: a
//! transfer bounded by one ends 250 ms before it, so it has 250 ms at least.
inline constexpr std::uint64_t min_transfer_lease_ms = 500;

inline result<std::chrono::milliseconds> parse_ms(const kvx::config::view& v, std::string_view key,
                                                  std::chrono::milliseconds fallback, std::uint64_t min_ms = 1) {
  auto ms = v.optional<std::uint64_t>(key, static_cast<std::uint64_t>(fallback.count()));
  KVX_TRY(ms);
  if (*ms < min_ms)
    return error{errc::invalid_argument, "config field '" + v.path_of(key) + "': must be at least " + std::to_string(min_ms)};
  if (*ms > max_config_ms)
    return error{errc::invalid_argument,
                 "config field '" + v.path_of(key) + "': at most " + std::to_string(max_config_ms) + " (ms)"};
  return std::chrono::milliseconds(*ms);
}

// --- master failover through etcd ------------------------------------------------

//! Where the election lives: an etcd server, a key prefix, the role's name.
struct etcd_role {
  kvx::store::etcd_options etcd;
  std::string role = kvx::store::default_master_role;
};

inline result<etcd_role> parse_etcd_role(const kvx::config::view& v, std::initializer_list<std::string_view> more_keys) {
  std::vector<std::string_view> keys{"address", "prefix", "timeout_ms", "role"};
  keys.insert(keys.end(), more_keys.begin(), more_keys.end());
  for (auto it = v.raw().begin(); it != v.raw().end(); ++it)
    if (std::find(keys.begin(), keys.end(), it.key()) == keys.end()) {
      std::string list;
      for (auto k : keys) list += (list.empty() ? "" : ", ") + std::string(k);
      return error{errc::invalid_argument, "unknown config field '" + v.path_of(it.key()) + "' (allowed: " + list + ")"};
    }
  etcd_role r;
  auto etcd = kvx::store::etcd_options::from_config(v);
  KVX_TRY(etcd);
  r.etcd = std::move(*etcd);
  auto role = v.optional<std::string>("role", r.role);
  KVX_TRY(role);
  r.role = *role;
  return r;
}

//! The master campaigns on etcd and serves only while it leads.
struct election_settings {
  etcd_role where;
  std::string advertise;  //!< "host:port" published as leader; empty: the bound one
  kvx::store::etcd_election_options election;
  std::optional<std::chrono::milliseconds> takeover_grace;
};

inline result<election_settings> parse_election(const kvx::config::view& v) {
  election_settings e;
  auto where = parse_etcd_role(v, {"advertise", "ttl_ms", "poll_interval_ms", "takeover_grace_ms"});
  KVX_TRY(where);
  e.where = std::move(*where);
  auto advertise = v.optional<std::string>("advertise", "");
  KVX_TRY(advertise);
  e.advertise = *advertise;
  auto ttl = parse_ms(v, "ttl_ms", e.election.ttl, 1000);
  KVX_TRY(ttl);
  e.election.ttl = *ttl;
  auto poll = parse_ms(v, "poll_interval_ms", e.election.poll_interval);
  KVX_TRY(poll);
  e.election.poll_interval = *poll;
  if (v.contains("takeover_grace_ms")) {
    auto grace = parse_ms(v, "takeover_grace_ms", std::chrono::milliseconds(0), 0);
    KVX_TRY(grace);
    e.takeover_grace = *grace;
  }
  return e;
}

// --- master ------------------------------------------------------------------

struct master_settings {
  host_port listen;                        //!< where clients, nodes and admins reach the master
  std::optional<host_port> metadata_server;  //!< serve the engines' metadata over HTTP here
  std::chrono::milliseconds tick{200};
  kvx::store::master_config state;
  std::string eviction = "lru";
  std::string placement = "random";
  kvx::log_level log_level = kvx::log_level::warn;
  std::optional<election_settings> election;  //!< campaign on etcd (failover) instead of serving alone
};

inline result<master_settings> parse_master(const json& doc) {
  kvx::config::view v(doc);
  KVX_TRY(v.allow_only({"listen", "metadata_server", "tick_ms", "put_lease_ms", "read_lease_ms", "max_put_lease_ms",
                        "max_read_lease_ms", "node_timeout_ms", "replication_timeout_ms", "high_watermark",
                        "low_watermark", "max_object_size", "eviction", "placement", "tenant_quota", "log_level",
                        "election", "recover_objects"}));
  master_settings s;
  auto listen = v.required<std::string>("listen");
  KVX_TRY(listen);
  auto hp = parse_host_port(*listen, "listen");
  KVX_TRY(hp);
  s.listen = *hp;
  if (v.contains("metadata_server")) {
    auto text = v.required<std::string>("metadata_server");
    KVX_TRY(text);
    auto m = parse_host_port(*text, "metadata_server");
    KVX_TRY(m);
    s.metadata_server = *m;
  }
  auto tick = parse_ms(v, "tick_ms", s.tick);
  KVX_TRY(tick);
  s.tick = *tick;
  // Transfers end 250 ms before the lease or deadline that bounds them
  // (store_client's lease_margin, store_node's copy_margin): shorter ones
  // would leave no time for any.
  auto put_lease = parse_ms(v, "put_lease_ms", std::chrono::milliseconds(30000), min_transfer_lease_ms);
  KVX_TRY(put_lease);
  s.state.put_lease = *put_lease;
  auto read_lease = parse_ms(v, "read_lease_ms", std::chrono::milliseconds(5000), min_transfer_lease_ms);
  KVX_TRY(read_lease);
  s.state.read_lease = *read_lease;
  // The longest leases a put may ask for and a get is granted; absent:
  // the defaults above, none longer. Never below them.
  for (auto [key, of, lease, cap] : {std::tuple{"max_put_lease_ms", "put_lease_ms", *put_lease, &s.state.max_put_lease},
                                     std::tuple{"max_read_lease_ms", "read_lease_ms", *read_lease, &s.state.max_read_lease}}) {
    auto max = parse_ms(v, key, lease, min_transfer_lease_ms);
    KVX_TRY(max);
    if (*max < lease)
      return error{errc::invalid_argument, "config field '" + v.path_of(key) + "': must be at least " + of + " (" +
                                               std::to_string(lease.count()) + ")"};
    *cap = *max;
  }
  auto node_timeout = parse_ms(v, "node_timeout_ms", std::chrono::milliseconds(5000));
  KVX_TRY(node_timeout);
  s.state.node_timeout = *node_timeout;
  auto replication_timeout = parse_ms(v, "replication_timeout_ms", std::chrono::milliseconds(30000), min_transfer_lease_ms);
  KVX_TRY(replication_timeout);
  s.state.replication_timeout = *replication_timeout;
  auto high = v.optional<double>("high_watermark", s.state.high_watermark);
  KVX_TRY(high);
  auto low = v.optional<double>("low_watermark", s.state.low_watermark);
  KVX_TRY(low);
  if (*high <= 0 || *high > 1)
    return error{errc::invalid_argument, "config field 'high_watermark': must be in (0, 1]"};
  if (*low <= 0 || *low > *high)
    return error{errc::invalid_argument, "config field 'low_watermark': must be in (0, high_watermark]"};
  s.state.high_watermark = *high;
  s.state.low_watermark = *low;
  auto max_object = v.optional<kvx::config::bytes>("max_object_size", {s.state.max_object_size});
  KVX_TRY(max_object);
  if (max_object->value == 0) return error{errc::invalid_argument, "config field 'max_object_size': must not be 0"};
  s.state.max_object_size = max_object->value;
  auto eviction = v.optional<std::string>("eviction", s.eviction);
  KVX_TRY(eviction);
  if (*eviction != "lru" && *eviction != "s3fifo" && *eviction != "sieve")
    return error{errc::invalid_argument, "config field 'eviction': unknown policy '" + *eviction +
                                             "' (expected lru, s3fifo or sieve)"};
  s.eviction = *eviction;
  auto placement = v.optional<std::string>("placement", s.placement);
  KVX_TRY(placement);
  if (*placement != "random" && *placement != "locality")
    return error{errc::invalid_argument, "config field 'placement': unknown policy '" + *placement +
                                             "' (expected random or locality)"};
  s.placement = *placement;
  if (v.contains("tenant_quota")) {
    auto quotas = v.child("tenant_quota");
    KVX_TRY(quotas);
    for (auto it = quotas->raw().begin(); it != quotas->raw().end(); ++it) {
      auto q = quotas->required<kvx::config::bytes>(it.key());
      KVX_TRY(q);
      s.state.tenant_quota[it.key()] = q->value;
    }
  }
  auto level = parse_log_level(v);
  KVX_TRY(level);
  s.log_level = *level;
  if (v.contains("election")) {
    auto e = v.child("election");
    KVX_TRY(e);
    auto election = parse_election(*e);
    KVX_TRY(election);
    // A shorter grace lets a new leader's puts land in ranges the old
    // leader's writers, readers or copies still use.
    const auto least = kvx::store::min_takeover_grace(s.state, election->election);
    if (election->takeover_grace && *election->takeover_grace < least)
      return error{errc::invalid_argument,
                   "config field '" + e->path_of("takeover_grace_ms") + "': must be at least " +
                       std::to_string(least.count()) +
                       " (the longest of put_lease_ms, max_put_lease_ms, read_lease_ms, max_read_lease_ms and "
                       "replication_timeout_ms, plus the election's keep-alive period, ttl_ms / 3)"};
    s.election = std::move(*election);
  }
  // Ledgers cost a checksum per put: on by default where a failover can happen.
  auto recover = v.optional<bool>("recover_objects", s.election.has_value());
  KVX_TRY(recover);
  s.state.recover_objects = *recover;
  return s;
}

// --- nodes and clients: what an engine needs -----------------------------------

struct engine_settings {
  std::string name;
  host_port master;                 //!< a fixed master ...
  std::optional<etcd_role> leader;  //!< ... or whichever leads this election
  json metadata;                    //!< {"backend": "http", "url": ...} or any_metadata_backend's config
  std::string transport = "tcp";    //!< tcp, shm or ucx (where kvx-store is built with UCX)
  std::string address = "127.0.0.1";  //!< tcp: the address the transport listens on
#if KVX_WITH_UCX
  kvx::transport::ucx_options ucx{};  //!< ucx: the "ucx" object (tls, net_devices, progress, settings)
#endif
  kvx::log_level log_level = kvx::log_level::warn;
  //! Deadline of each transfer batch (a put's writes, a get's read from one
  //! replica, a node's copy); 0 = none. Without one, a read from a node that
  //! died stalls where the transport cannot see deaths (UCX posix/sysv).
  std::chrono::milliseconds transfer_timeout{30000};
};

inline result<engine_settings> parse_engine(const kvx::config::view& v, bool name_required) {
  engine_settings s;
  auto name = name_required ? v.required<std::string>("name") : v.optional<std::string>("name", "");
  KVX_TRY(name);
  if (name_required && name->empty()) return error{errc::invalid_argument, "config field 'name': must not be empty"};
  s.name = *name;
  if (v.contains("master") && v.raw()["master"].is_object()) {
    auto m = v.child("master");
    KVX_TRY(m);
    auto leader = parse_etcd_role(*m, {});
    KVX_TRY(leader);
    s.leader = std::move(*leader);
  } else {
    auto master = v.required<std::string>("master");
    if (!master)
      return error{errc::invalid_argument, master.error().context() +
                                               " (\"HOST:PORT\", or {\"address\": ETCD, \"prefix\", \"role\"} to follow an elected master)"};
    auto hp = parse_host_port(*master, "master");
    KVX_TRY(hp);
    s.master = *hp;
  }
  auto meta = v.child("metadata");
  KVX_TRY(meta);
  auto backend = meta->required<std::string>("backend");
  KVX_TRY(backend);
  if (*backend == "embedded")
    return error{errc::invalid_argument,
                 "config field 'metadata.backend': \"embedded\" lives in one process; nodes and clients of a store need "
                 "one they share: \"http\" (the master's metadata_server), \"etcd\" or \"redis\""};
  s.metadata = meta->raw();
  auto transport = v.optional<std::string>("transport", s.transport);
  KVX_TRY(transport);
  if (*transport != "tcp" && *transport != "shm" && *transport != "ucx")
    return error{errc::invalid_argument, "config field 'transport': unknown transport '" + *transport +
                                             "' (expected tcp, shm or ucx)"};
#if !KVX_WITH_UCX
  if (*transport == "ucx")
    return error{errc::not_supported, "config field 'transport': this kvx-store is built without UCX (the kvx::ucx "
                                      "target, from Debian's libucx-dev)"};
#endif
  s.transport = *transport;
  if (v.contains("ucx")) {
    if (s.transport != "ucx")
      return error{errc::invalid_argument, "config field 'ucx': only with \"transport\": \"ucx\""};
#if KVX_WITH_UCX
    auto u = v.child("ucx");
    KVX_TRY(u);
    auto options = kvx::transport::ucx_options::from_config(*u);
    KVX_TRY(options);
    s.ucx = std::move(*options);
#endif
  }
  auto address = v.optional<std::string>("address", s.address);
  KVX_TRY(address);
  s.address = *address;
  auto level = parse_log_level(v);
  KVX_TRY(level);
  s.log_level = *level;
  auto transfer_timeout = parse_ms(v, "transfer_timeout_ms", s.transfer_timeout, /*min_ms=*/0);
  KVX_TRY(transfer_timeout);
  s.transfer_timeout = *transfer_timeout;
  return s;
}

struct ssd_settings {
  std::string path;
  std::uint64_t bytes = 0;
  bool replace = false;
};

struct node_settings {
  engine_settings engine;
  std::uint64_t dram_bytes = 0;
  std::optional<ssd_settings> ssd;
  std::chrono::milliseconds heartbeat{500};
  std::string host{};  //!< failure domain of both the DRAM and the SSD node; the node's name by default
};

inline result<node_settings> parse_node(const json& doc) {
  kvx::config::view v(doc);
  KVX_TRY(v.allow_only({"name", "master", "metadata", "transport", "address", "ucx", "dram", "ssd", "heartbeat_ms",
                        "log_level", "transfer_timeout_ms", "host"}));
  node_settings s;
  auto engine = parse_engine(v, /*name_required=*/true);
  KVX_TRY(engine);
  s.engine = std::move(*engine);
  auto host = v.optional<std::string>("host", s.engine.name);
  KVX_TRY(host);
  if (host->empty()) return error{errc::invalid_argument, "config field 'host': must not be empty"};
  s.host = std::move(*host);
  auto dram = v.optional<kvx::config::bytes>("dram", {0});
  KVX_TRY(dram);
  s.dram_bytes = dram->value;
  if (v.contains("ssd")) {
    auto ssd = v.child("ssd");
    KVX_TRY(ssd);
    KVX_TRY(ssd->allow_only({"path", "bytes", "replace"}));
    auto path = ssd->required<std::string>("path");
    KVX_TRY(path);
    auto bytes = ssd->required<kvx::config::bytes>("bytes");
    KVX_TRY(bytes);
    if (bytes->value == 0) return error{errc::invalid_argument, "config field 'ssd.bytes': must not be 0"};
    auto replace = ssd->optional<bool>("replace", false);
    KVX_TRY(replace);
    s.ssd = ssd_settings{*path, bytes->value, *replace};
  }
  if (s.dram_bytes == 0 && !s.ssd)
    return error{errc::invalid_argument, "config field 'dram' is required (a byte size such as \"64MiB\") unless 'ssd' is given"};
  auto hb = parse_ms(v, "heartbeat_ms", s.heartbeat);
  KVX_TRY(hb);
  s.heartbeat = *hb;
  return s;
}

struct client_settings {
  engine_settings engine;
  std::chrono::milliseconds lease{5000};
  std::optional<std::chrono::milliseconds> put_lease;  //!< asked for each put; none: the master's put lease
};

inline result<client_settings> parse_client(const json& doc) {
  kvx::config::view v(doc);
  KVX_TRY(v.allow_only({"name", "master", "metadata", "transport", "address", "ucx", "lease_ms", "put_lease_ms",
                        "log_level", "transfer_timeout_ms"}));
  client_settings s;
  auto engine = parse_engine(v, /*name_required=*/false);
  KVX_TRY(engine);
  s.engine = std::move(*engine);
  auto lease = parse_ms(v, "lease_ms", s.lease, min_transfer_lease_ms);
  KVX_TRY(lease);
  s.lease = *lease;
  if (v.contains("put_lease_ms")) {
    auto put_lease = parse_ms(v, "put_lease_ms", {}, min_transfer_lease_ms);
    KVX_TRY(put_lease);
    s.put_lease = *put_lease;
  }
  return s;
}

}  // namespace kvx_store
