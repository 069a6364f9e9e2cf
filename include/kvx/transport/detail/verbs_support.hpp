#pragma once
// The parts of the verbs transport that need no RDMA device: options, the
// completion-status mapping, the descriptor entry, the registration range
// map and GID ranking (also over a sysfs GID table). Kept apart so they are
// tested everywhere.

#include <arpa/inet.h>

#include <infiniband/verbs.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include <kvx/core/config.hpp>
#include <kvx/core/error.hpp>
#include <kvx/core/result.hpp>
#include <kvx/memory/segment.hpp>
#include <kvx/topology/topology.hpp>

namespace kvx::transport {

//! Settings of a `verbs` transport, read from JSON by `from_config`.
struct verbs_options {
  std::string device{};             //!< RDMA device name ("mlx5_0", "rxe0"); empty: the first one found
  std::uint8_t port = 1;            //!< port number on the device
  int gid_index = -1;               //!< -1: pick (RoCE v2 IPv4-mapped first)
  std::uint32_t max_outstanding = 128;  //!< work requests in flight per queue pair; further ops queue
  std::uint32_t signal_interval = 16;   //!< request a completion at least every N work requests
  bool busy_poll = false;           //!< poll the CQ on the executor while ops are in flight (else: completion channel)
  std::string handshake = "127.0.0.1:0";  //!< "ip:port" the QP handshake listens on (port 0: any)
  std::string advertise{};          //!< "ip" peers dial (empty: the handshake ip; required when that is 0.0.0.0)
  std::uint32_t handshake_timeout_ms = 10000;  //!< a QP handshake not done by then fails its ops with `timed_out`

  //! Reads `{"device", "port", "gid_index", "max_outstanding", "signal_interval", "busy_poll",
  //! "handshake", "advertise", "handshake_timeout_ms"}`; errors name the field (`transport.verbs.port`).
  static result<verbs_options> from_config(const config::view& v) {
    KVX_TRY(v.allow_only({"device", "port", "gid_index", "max_outstanding", "signal_interval", "busy_poll",
                          "handshake", "advertise", "handshake_timeout_ms"}));
    verbs_options o;
    auto bad = [&](std::string_view field, const std::string& why) {
      return error{errc::invalid_argument, "config field '" + v.path_of(field) + "': " + why};
    };
    auto device = v.optional<std::string>("device", "");
    KVX_TRY(device);
    auto port = v.optional<std::uint8_t>("port", 1);
    KVX_TRY(port);
    if (*port == 0) return bad("port", "ports are numbered from 1");
    auto gid = v.optional<int>("gid_index", -1);
    KVX_TRY(gid);
    if (*gid < -1 || *gid > 65535) return bad("gid_index", std::to_string(*gid) + " is not -1 (auto) or a table index");
    auto outstanding = v.optional<std::uint32_t>("max_outstanding", 128);
    KVX_TRY(outstanding);
    if (*outstanding == 0 || *outstanding > 32768) return bad("max_outstanding", "must be in 1..32768");
    auto interval = v.optional<std::uint32_t>("signal_interval", 16);
    KVX_TRY(interval);
    if (*interval == 0 || *interval > *outstanding)
      return bad("signal_interval", "must be in 1..max_outstanding (" + std::to_string(*outstanding) + ")");
    auto busy = v.optional<bool>("busy_poll", false);
    KVX_TRY(busy);
    auto hs = v.optional<std::string>("handshake", "127.0.0.1:0");
    KVX_TRY(hs);
    if (auto ep = split_endpoint(*hs); !ep) return bad("handshake", ep.error().context());
    auto adv = v.optional<std::string>("advertise", "");
    KVX_TRY(adv);
    in6_addr scratch{};
    in_addr scratch4{};
    if (!adv->empty() && inet_pton(AF_INET, adv->c_str(), &scratch4) != 1 && inet_pton(AF_INET6, adv->c_str(), &scratch) != 1)
      return bad("advertise", "'" + *adv + "' is not a numeric IP address");
    auto hs_timeout = v.optional<std::uint32_t>("handshake_timeout_ms", 10000);
    KVX_TRY(hs_timeout);
    if (*hs_timeout == 0 || *hs_timeout > 600000) return bad("handshake_timeout_ms", "must be in 1..600000");
    o.device = std::move(*device);
    o.port = *port;
    o.gid_index = *gid;
    o.max_outstanding = *outstanding;
    o.signal_interval = *interval;
    o.busy_poll = *busy;
    o.handshake = std::move(*hs);
    o.advertise = std::move(*adv);
    o.handshake_timeout_ms = *hs_timeout;
    return o;
  }

  //! Splits "ip:port" / "[v6]:port"; the ip must be numeric (no resolver on the data path).
  static result<std::pair<std::string, std::uint16_t>> split_endpoint(std::string_view text) {
    const auto colon = text.rfind(':');
    if (colon == std::string_view::npos || colon == 0 || colon + 1 == text.size())
      return error{errc::invalid_argument, "'" + std::string(text) + "' is not ip:port"};
    std::string host(text.substr(0, colon));
    if (host.size() > 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
    in_addr a4{};
    in6_addr a6{};
    if (inet_pton(AF_INET, host.c_str(), &a4) != 1 && inet_pton(AF_INET6, host.c_str(), &a6) != 1)
      return error{errc::invalid_argument, "'" + host + "' in '" + std::string(text) + "' is not a numeric IP address"};
    unsigned port = 0;
    for (char c : text.substr(colon + 1)) {
      if (c < '0' || c > '9' || port > 65535) return error{errc::invalid_argument, "bad port in '" + std::string(text) + "'"};
      port = port * 10 + static_cast<unsigned>(c - '0');
    }
    if (port > 65535) return error{errc::invalid_argument, "bad port in '" + std::string(text) + "'"};
    return std::pair{host, static_cast<std::uint16_t>(port)};
  }
};

namespace detail {

//! What an error completion means to a caller. The initiator checks segment,
//! key, generation and bounds before posting, so a responder refusing the
//! rkey means the registration the descriptor names is gone: `stale`.
inline std::error_code verbs_wc_error(ibv_wc_status s) noexcept {
  switch (s) {
    case IBV_WC_SUCCESS: return {};
    case IBV_WC_REM_ACCESS_ERR: return errc::stale;
    case IBV_WC_REM_INV_REQ_ERR: return errc::out_of_range;
    case IBV_WC_LOC_LEN_ERR: return errc::out_of_range;
    case IBV_WC_LOC_PROT_ERR: return errc::invalid_argument;    // local buffer not registered with this PD
    case IBV_WC_LOC_ACCESS_ERR: return errc::invalid_argument;
    case IBV_WC_MW_BIND_ERR: return errc::bad_key;
    case IBV_WC_RETRY_EXC_ERR: return errc::connection_lost;    // the responder stopped acknowledging
    case IBV_WC_RNR_RETRY_EXC_ERR: return errc::connection_lost;
    case IBV_WC_REM_ABORT_ERR: return errc::connection_lost;
    case IBV_WC_WR_FLUSH_ERR: return errc::connection_lost;     // the QP went to error before this WR ran
    case IBV_WC_RESP_TIMEOUT_ERR: return errc::timed_out;
    case IBV_WC_BAD_RESP_ERR: return errc::protocol_error;
    case IBV_WC_REM_INV_RD_REQ_ERR: return errc::protocol_error;
    case IBV_WC_REM_OP_ERR: return errc::io_error;
    case IBV_WC_FATAL_ERR: return errc::io_error;
    case IBV_WC_GENERAL_ERR: return errc::io_error;
    case IBV_WC_LOC_QP_OP_ERR: return errc::internal;           // we built a WR the QP cannot run
    case IBV_WC_LOC_EEC_OP_ERR:
    case IBV_WC_LOC_RDD_VIOL_ERR:
    case IBV_WC_INV_EECN_ERR:
    case IBV_WC_INV_EEC_STATE_ERR: return errc::internal;       // RD/EEC: never used by RC
    default: return errc::io_error;
  }
}

//! A registration key is checked through a hash so the entry carries no secret of its own.
inline std::uint64_t verbs_key_check(std::uint64_t key, std::uint64_t generation) noexcept {
  std::uint64_t x = key ^ (generation * 0x9e3779b97f4a7c15ULL) ^ 0x766572627321ULL;  // splitmix64 finaliser
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

inline std::string verbs_gid_to_string(const ibv_gid& g) {
  char text[INET6_ADDRSTRLEN] = {};
  inet_ntop(AF_INET6, g.raw, text, sizeof(text));
  return text;
}
inline std::optional<ibv_gid> verbs_gid_from_string(const std::string& s) {
  ibv_gid g{};
  if (inet_pton(AF_INET6, s.c_str(), g.raw) != 1) return std::nullopt;
  return g;
}

//! The `transports["verbs"]` entry of a segment descriptor, validated.
struct verbs_entry {
  std::string segment;
  std::uint64_t generation = 0;
  std::uint64_t key_check = 0;
  std::uint64_t addr = 0;     //!< remote virtual address (or IOVA) of offset 0
  std::uint64_t length = 0;
  std::uint32_t rkey = 0;
  std::uint16_t lid = 0;
  ibv_gid gid{};
  std::string qp_endpoint;    //!< "ip:port" of the owner's handshake listener

  [[nodiscard]] nlohmann::json to_json() const {
    return {{"segment", segment}, {"generation", generation}, {"key_check", key_check}, {"addr", addr},
            {"length", length},   {"rkey", rkey},             {"lid", lid},             {"gid", verbs_gid_to_string(gid)},
            {"qp_endpoint", qp_endpoint}};
  }

  static result<verbs_entry> parse(const nlohmann::json& j) {
    if (!j.is_object()) return error{errc::malformed_message, "verbs entry: expected an object, got " + std::string(j.type_name())};
    config::view v(j, "transports.verbs");
    verbs_entry e;
    auto segment = v.required<std::string>("segment");
    KVX_TRY(segment);
    auto generation = v.required<std::uint64_t>("generation");
    KVX_TRY(generation);
    auto key_check = v.required<std::uint64_t>("key_check");
    KVX_TRY(key_check);
    auto addr = v.required<std::uint64_t>("addr");
    KVX_TRY(addr);
    auto length = v.required<std::uint64_t>("length");
    KVX_TRY(length);
    auto rkey = v.required<std::uint32_t>("rkey");
    KVX_TRY(rkey);
    auto lid = v.required<std::uint16_t>("lid");
    KVX_TRY(lid);
    auto gid = v.required<std::string>("gid");
    KVX_TRY(gid);
    auto endpoint = v.required<std::string>("qp_endpoint");
    KVX_TRY(endpoint);
    auto g = verbs_gid_from_string(*gid);
    if (!g) return error{errc::malformed_message, "config field 'transports.verbs.gid': '" + *gid + "' is not a GID"};
    if (auto ep = verbs_options::split_endpoint(*endpoint); !ep)
      return error{errc::malformed_message, "config field 'transports.verbs.qp_endpoint': " + ep.error().context()};
    if (*addr + *length < *addr)
      return error{errc::malformed_message, "config field 'transports.verbs.length': addr + length overflows"};
    e.segment = std::move(*segment);
    e.generation = *generation;
    e.key_check = *key_check;
    e.addr = *addr;
    e.length = *length;
    e.rkey = *rkey;
    e.lid = *lid;
    e.gid = *g;
    e.qp_endpoint = std::move(*endpoint);
    return e;
  }

  //! Everything the initiator can check before posting: the entry describes
  //! this descriptor's segment, key and generation, and the range fits.
  [[nodiscard]] std::error_code check(const memory::segment_descriptor& d, std::uint64_t offset,
                                      std::uint64_t len) const noexcept {
    if (segment != d.name) return errc::unknown_segment;
    if (generation != d.generation) return errc::stale;
    if (key_check != verbs_key_check(d.key, d.generation)) return errc::bad_key;
    const std::uint64_t limit = d.length < length ? d.length : length;
    if (offset > limit || len > limit - offset) return errc::out_of_range;
    return {};
  }
};

//! Completion-queue entries `active_qps` queue pairs sharing one CQ may need
//! at once: a broken QP flushes every WR it holds (signaled or not) plus the
//! drain marker, so `max_outstanding + 1` each.
inline std::uint64_t verbs_cq_entries_for(std::size_t active_qps, std::uint32_t max_outstanding) noexcept {
  return static_cast<std::uint64_t>(active_qps) * (std::uint64_t{max_outstanding} + 1);
}

//! One side of a queue-pair connection, as the handshake exchanges it: one
//! JSON line `{"qpn", "psn", "lid", "gid", "mtu"}` each way.
struct verbs_qp_address {
  std::uint32_t qpn = 0;   //!< 24 bits
  std::uint32_t psn = 0;   //!< 24 bits: the first packet sequence number this side sends
  std::uint16_t lid = 0;   //!< 0 on RoCE
  ibv_gid gid{};
  ibv_mtu mtu = IBV_MTU_1024;  //!< this side's active port MTU

  [[nodiscard]] std::string to_line() const {
    return nlohmann::json{{"qpn", qpn}, {"psn", psn}, {"lid", lid}, {"gid", verbs_gid_to_string(gid)},
                          {"mtu", static_cast<int>(mtu)}}
               .dump() +
           "\n";
  }

  //! The path MTU of a connection: the smaller port MTU of its two ends
  //! (packets larger than the far port takes are dropped, not fragmented).
  [[nodiscard]] static ibv_mtu path_mtu(ibv_mtu local, ibv_mtu remote) noexcept { return local < remote ? local : remote; }

  //! Parses a peer's line; anything else is `malformed_message` naming what is wrong.
  static result<verbs_qp_address> parse(std::string_view line) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.is_object())
      return error{errc::malformed_message, "verbs handshake: the peer's line is not a JSON object"};
    config::view v(j, "handshake");
    auto qpn = v.required<std::uint32_t>("qpn");
    auto psn = v.required<std::uint32_t>("psn");
    auto lid = v.required<std::uint16_t>("lid");
    auto gid = v.required<std::string>("gid");
    auto mtu = v.required<int>("mtu");
    // The peer sent it: a missing or mistyped field is a malformed message, not a bad argument.
    for (const kvx::error* e : {qpn ? nullptr : &qpn.error(), psn ? nullptr : &psn.error(), lid ? nullptr : &lid.error(),
                                gid ? nullptr : &gid.error(), mtu ? nullptr : &mtu.error()})
      if (e) return error{errc::malformed_message, "verbs handshake: " + e->context()};
    if (*mtu < IBV_MTU_256 || *mtu > IBV_MTU_4096)
      return error{errc::malformed_message, "verbs handshake: mtu " + std::to_string(*mtu) + " is not an ibv_mtu (1..5)"};
    constexpr std::uint32_t bits24 = 0xffffffu;
    if (*qpn > bits24 || *psn > bits24)
      return error{errc::malformed_message, "verbs handshake: qpn " + std::to_string(*qpn) + " / psn " +
                                                std::to_string(*psn) + " exceed 24 bits"};
    auto g = verbs_gid_from_string(*gid);
    if (!g) return error{errc::malformed_message, "verbs handshake: '" + *gid + "' is not a GID"};
    return verbs_qp_address{*qpn, *psn, *lid, *g, static_cast<ibv_mtu>(*mtu)};
  }
};

//! Address ranges with a value each, looked up by an enclosed sub-range:
//! the registration cache's bookkeeping (one memory registration serves
//! every buffer inside it). Not thread-safe.
template <class T>
class verbs_range_map {
 public:
  struct range {
    std::uintptr_t base = 0;
    std::size_t length = 0;
    std::size_t refs = 0;
    T value{};
  };

  //! The range enclosing [p, p + n), or nullptr.
  range* find_enclosing(std::uintptr_t p, std::size_t n) noexcept {
    if (p + n < p) return nullptr;
    auto it = ranges_.upper_bound(p);
    // Ranges may nest (a big registration made after a small one); check each candidate below p.
    while (it != ranges_.begin()) {
      --it;
      if (it->second.base + it->second.length >= p + n) return &it->second;
      if (widest_ <= p - it->second.base) break;  // nothing starting further down reaches p
    }
    return nullptr;
  }

  //! Takes a reference to the range enclosing [p, p + n), or inserts one made
  //! by `make()` (a `result<T>`) over exactly [p, p + n).
  template <class Make>
  result<range*> acquire(std::uintptr_t p, std::size_t n, Make&& make) {
    if (auto* r = find_enclosing(p, n)) {
      ++r->refs;
      return r;
    }
    auto v = make();
    KVX_TRY(v);
    auto it = ranges_.emplace(p, range{p, n, 1, std::move(*v)});
    if (n > widest_) widest_ = n;
    return &it->second;
  }

  //! Drops a reference; returns the value when it was the last one (the caller frees it).
  std::optional<T> release(range* r) {
    if (--r->refs != 0) return std::nullopt;
    auto [first, last] = ranges_.equal_range(r->base);
    for (auto it = first; it != last; ++it) {
      if (&it->second != r) continue;
      T v = std::move(it->second.value);
      ranges_.erase(it);
      return v;
    }
    return std::nullopt;
  }

  [[nodiscard]] std::size_t size() const noexcept { return ranges_.size(); }
  template <class F>
  void for_each(F&& f) {
    for (auto& [base, r] : ranges_) f(r);
  }

 private:
  std::multimap<std::uintptr_t, range> ranges_;  // a longer range may start where a shorter one does
  std::size_t widest_ = 0;
};

//! A GID table entry as seen by selection.
struct verbs_gid_candidate {
  int index = 0;
  ibv_gid gid{};
  ibv_gid_type type = IBV_GID_TYPE_IB;
};

inline bool verbs_gid_is_zero(const ibv_gid& g) noexcept {
  for (auto b : g.raw)
    if (b != 0) return false;
  return true;
}
inline bool verbs_gid_is_ipv4_mapped(const ibv_gid& g) noexcept {
  for (int i = 0; i < 10; ++i)
    if (g.raw[i] != 0) return false;
  return g.raw[10] == 0xff && g.raw[11] == 0xff;
}

//! The GID index to use: RoCE v2 IPv4-mapped (routable, what RoCE fabrics
//! configure), then RoCE v2, then RoCE v1 / IB; the lowest index on ties.
//! -1 when every entry is empty.
inline int verbs_choose_gid(const std::vector<verbs_gid_candidate>& gids) noexcept {
  int best = -1;
  int best_rank = 0;
  for (const auto& c : gids) {
    if (verbs_gid_is_zero(c.gid)) continue;
    int rank = 1;
    if (c.type == IBV_GID_TYPE_ROCE_V2) rank = verbs_gid_is_ipv4_mapped(c.gid) ? 4 : 3;
    else if (c.type == IBV_GID_TYPE_IB) rank = 2;  // IB ports: index 0 is the port GID
    if (rank > best_rank || (rank == best_rank && c.index < best)) {
      best = c.index;
      best_rank = rank;
    }
  }
  return best;
}

//! The GID index to use on a port, or why there is none: a RoCE port needs a
//! GID (its netdev needs an IP address); InfiniBand routes by LID and uses
//! index 0 when the table is empty.
inline result<int> verbs_resolve_gid(const std::vector<verbs_gid_candidate>& gids, bool ethernet, const std::string& port) {
  const int best = verbs_choose_gid(gids);
  if (best >= 0) return best;
  if (ethernet)
    return error{errc::unreachable, "verbs: " + port + " (RoCE) has no usable GID: give its netdev an IP address"};
  return 0;
}

//! A NIC's GID table as `kvx::topology` read it from sysfs (port 1), as
//! selection candidates: "RoCE v2" entries are v2, "IB/RoCE v1" entries are
//! IB on an InfiniBand port and RoCE v1 on an Ethernet one. Entries whose
//! text is not a GID are left out.
inline std::vector<verbs_gid_candidate> verbs_gid_candidates(const topology::nic& n) {
  std::vector<verbs_gid_candidate> out;
  for (const auto& g : n.gids) {
    auto gid = verbs_gid_from_string(g.gid);
    if (!gid) continue;
    ibv_gid_type type = n.link_layer == "InfiniBand" ? IBV_GID_TYPE_IB : IBV_GID_TYPE_ROCE_V1;
    if (g.type == "RoCE v2") type = IBV_GID_TYPE_ROCE_V2;
    out.push_back({g.index, *gid, type});
  }
  return out;
}

}  // namespace detail
}  // namespace kvx::transport
