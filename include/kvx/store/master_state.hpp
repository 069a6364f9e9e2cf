#pragma once
//! \file
//! `master_state`: the store master's bookkeeping as a deterministic state
//! machine (time is an argument, so tests replay exact schedules). The
//! master service wraps it with a control-plane protocol and a lock.
//!
//! What it decides:
//! - **Placement**: each put allocates `replicas` ranges on distinct nodes
//!   through a `placement_policy`, carved by a `memory::allocator` per segment.
//! - **Two-phase put**: `put_start` (allocate) -> the writer moves the bytes ->
//!   `put_commit` (visible). A writer that dies leaves a pending object that
//!   no reader sees; `tick` reclaims it when its put lease expires (its
//!   own, up to `max_put_lease`, if it asked for one).
//! - **Read leases**: `get` grants a lease (up to `max_read_lease`), each with its own id; a leased
//!   object is neither evicted nor removed until the last lease ends (a
//!   reader's release ends only its own), so a reader's transfer never races
//!   a reuse of the bytes.
//! - **Soft pin**: pinned objects (system prompts) are evicted only when
//!   nothing unpinned is left.
//! - **Eviction**: above the high watermark (or when a put does not fit), committed,
//!   unleased objects with no copy in flight leave in the order of a `kvx::cache` eviction policy
//!   until usage is under the low watermark.
//! - **Membership**: nodes heartbeat; a node silent past `node_timeout` is
//!   dropped: its replicas are forgotten, objects left with none are lost
//!   (reported), objects left with fewer than asked get re-replication tasks;
//!   a copy not done within `replication_timeout` is given up and planned again.
//! - **Quotas** per tenant, in bytes.
//! - **Recovery** (`recover_objects`): each node is told, with its heartbeat
//!   answers, which committed objects its segment holds (a ledger; the
//!   writer's checksum comes with each); after a failover the nodes check
//!   those checksums against their bytes and report the objects that pass,
//!   and a new master takes them back (`recover`).
//!
//! Not thread-safe: one owner serializes calls.

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <deque>
#include <iterator>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include <kvx/cache/eviction_policy.hpp>
#include <kvx/core/metrics.hpp>
#include <kvx/core/result.hpp>
#include <kvx/memory/allocator.hpp>
#include <kvx/memory/offset_allocator.hpp>
#include <kvx/store/placement_policy.hpp>
#include <kvx/store/types.hpp>

namespace kvx::store {

namespace detail {
// A duration in whole milliseconds, for messages.
inline std::string ms_text(clock::duration d) {
  return std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(d).count()) + " ms";
}
}  // namespace detail

struct master_config {
  clock::duration put_lease = std::chrono::seconds(30);   //!< a writer must commit within this (unless it asks another lease)
  clock::duration read_lease = std::chrono::seconds(5);   //!< default lease a get grants
  //! The longest put lease a writer may ask for (`put_options::lease`);
  //! asking more is `invalid_argument`. Empty: `put_lease`, none longer.
  std::optional<clock::duration> max_put_lease{};
  //! The longest read lease a get grants: a longer one asked is cut to this
  //! (the answer says what was granted). Empty: `read_lease`, none longer.
  std::optional<clock::duration> max_read_lease{};
  clock::duration node_timeout = std::chrono::seconds(5); //!< heartbeat silence that drops a node
  //! A re-replication copy not reported done within this is given up: its
  //! target is freed and another copy is planned. Keep it above the nodes'
  //! transfer deadline, so a source never writes a target given up.
  clock::duration replication_timeout = std::chrono::seconds(30);
  double high_watermark = 0.95;  //!< evict when used/capacity exceeds this
  double low_watermark = 0.85;   //!< ... down to this
  std::uint64_t alignment = 64;  //!< replica offsets are multiples of this
  std::uint64_t max_object_size = std::uint64_t{64} << 30;
  std::map<std::string, std::uint64_t> tenant_quota;  //!< bytes per tenant; absent = unlimited
  //! Keep each node's ledger of its committed objects (sent with heartbeat
  //! answers; writers send a checksum with each commit) so that a new master
  //! takes the objects back from the nodes' reports after a failover.
  bool recover_objects = false;
  //! Ledger changes kept per node until it acknowledges them; past this the
  //! oldest are dropped and the node, seeing the gap, forgets its ledger.
  std::size_t ledger_backlog = std::size_t{1} << 17;

  [[nodiscard]] clock::duration put_lease_cap() const { return max_put_lease.value_or(put_lease); }
  [[nodiscard]] clock::duration read_lease_cap() const { return max_read_lease.value_or(read_lease); }
  //! The longest any party may move bytes on this master's word: a put
  //! lease, a read lease, a re-replication copy. A master taking over from
  //! this one must not reuse a range before it has passed.
  [[nodiscard]] clock::duration longest_lease() const {
    return std::max({put_lease_cap(), read_lease_cap(), replication_timeout});  // caps: at least the defaults (check)
  }

  //! `invalid_argument` naming the field out of place: a default lease not
  //! positive, or a maximum below its default lease.
  [[nodiscard]] result<void> check() const {
    if (put_lease <= clock::duration::zero() || read_lease <= clock::duration::zero())
      return error{errc::invalid_argument, "master_config: put_lease and read_lease must be positive"};
    if (put_lease_cap() < put_lease)
      return error{errc::invalid_argument, "master_config::max_put_lease (" + detail::ms_text(put_lease_cap()) +
                                               ") is shorter than put_lease (" + detail::ms_text(put_lease) +
                                               "), which every put may take"};
    if (read_lease_cap() < read_lease)
      return error{errc::invalid_argument, "master_config::max_read_lease (" + detail::ms_text(read_lease_cap()) +
                                               ") is shorter than read_lease (" + detail::ms_text(read_lease) +
                                               "), which every get may take"};
    return {};
  }
};

struct put_options {
  unsigned replicas = 1;
  std::string preferred_node;  //!< for locality-aware placement
  bool soft_pin = false;
  //! The put lease asked for: the writes must be over and committed within
  //! it (an object too large to write within `put_lease` on a slow link).
  //! Empty: the master's `put_lease`; over its `max_put_lease`: refused.
  std::optional<clock::duration> lease{};
};

struct put_ticket {
  std::uint64_t put_id = 0;
  std::vector<replica_location> replicas;  //!< write the object to every one
  clock::time_point deadline;              //!< commit before this
};

struct get_grant {
  std::uint64_t size = 0;
  std::vector<replica_location> replicas;  //!< any one serves; the reader's node first
  clock::time_point lease_until;
  std::uint64_t lease_id = 0;  //!< names this lease to `release_lease`
};

//! What `master_state::recover` did with a node's report.
struct recovery_report {
  std::size_t objects = 0;   //!< objects taken back
  std::size_t replicas = 0;  //!< further copies of objects already taken back (from other nodes)
  std::vector<std::string> rejected;  //!< one line per entry not taken, saying why
};

struct tick_report {
  std::vector<std::string> dropped_nodes;
  std::vector<object_key> reclaimed_puts;  //!< pending puts whose writer never committed, or whose every node was dropped
  std::vector<object_key> lost_objects;    //!< every replica was on dropped nodes
  std::vector<replication_task> replications;
  std::vector<object_key> abandoned_copies;  //!< re-replication copies not done by their deadline (planned again)
  std::size_t freed_drained_copies = 0;      //!< copies on draining nodes given back (their objects are whole elsewhere)
  std::size_t evicted = 0;
};

//! A segment as the admin command lists it.
struct segment_usage {
  segment_info info;
  std::uint64_t used = 0;  //!< bytes allocated to replicas (committed, pending or being copied)
  bool draining = false;   //!< its node is being drained: nothing new is placed on it
};

//! An object as the admin command lists it.
struct object_summary {
  object_key key;
  std::uint64_t size = 0;
  bool committed = false;        //!< false: a put between allocate and commit (never readable)
  bool pinned = false;
  unsigned replicas_wanted = 1;
  std::vector<replica_location> replicas;  //!< readable copies (committed objects)
  std::size_t copying = 0;                 //!< re-replication copies in flight
  clock::duration lease_left{};  //!< read lease left (committed) or put lease left (pending); 0 if none
};

//! Where draining a node stands (`master_state::drain_node`).
struct drain_status {
  std::string node;
  std::size_t objects = 0;    //!< objects with a replica (or a pending put) on the node
  std::size_t only_here = 0;  //!< ... of which no readable copy is on a node not being drained
  std::size_t copying = 0;    //!< re-replication copies in flight for the node's objects
  std::uint64_t used = 0;     //!< bytes still allocated on the node's segments
  //! The node holds nothing that is not elsewhere: it can be stopped without losing an object.
  [[nodiscard]] bool drained() const noexcept { return only_here == 0; }
  //! The node holds nothing at all: `tick` gave back every copy it had.
  [[nodiscard]] bool empty() const noexcept { return objects == 0; }
};

template <cache::eviction_policy Eviction, placement_policy Placement = placement::random_with_capacity,
          memory::allocator Allocator = memory::offset_allocator>
class master_state {
  static_assert(cache::check_eviction_policy<Eviction>());
  static_assert(check_placement_policy<Placement>());
  static_assert(memory::check_allocator<Allocator>());

 public:
  //! Throws `std::invalid_argument` for a config that `check()` refuses.
  explicit master_state(master_config config = {}, Placement placement = Placement{},
                        metrics::registry& registry = metrics::default_registry())
      : config_(std::move(config)),
        placement_(std::move(placement)),
        eviction_(1 << 20),
        m_puts_(registry.counter("kvx_store_puts_total", "Committed puts")),
        m_gets_(registry.counter("kvx_store_gets_total", "Gets served")),
        m_misses_(registry.counter("kvx_store_get_misses_total", "Gets of absent objects")),
        m_evictions_(registry.counter("kvx_store_evictions_total", "Objects evicted")),
        m_lost_(registry.counter("kvx_store_lost_objects_total", "Objects lost with their nodes")),
        m_used_(registry.gauge("kvx_store_used_bytes", "Bytes allocated to objects")),
        m_capacity_(registry.gauge("kvx_store_capacity_bytes", "Bytes contributed by live segments")) {
    if (auto ok = config_.check(); !ok) throw std::invalid_argument("kvx::store::master_state: " + ok.error().context());
  }

  [[nodiscard]] const master_config& config() const noexcept { return config_; }

  // --- membership --------------------------------------------------------

  result<void> add_segment(const segment_info& s, clock::time_point now) {
    if (s.name.empty() || s.node.empty()) return error{errc::invalid_argument, "segment needs a name and a node"};
    if (s.capacity == 0) return error{errc::invalid_argument, "segment '" + s.name + "' has no capacity"};
    if (s.tier != "dram" && s.tier != "ssd")
      return error{errc::invalid_argument, "segment '" + s.name + "': tier must be dram or ssd, not '" + s.tier + "'"};
    if (segments_.count(s.name)) return error{errc::already_exists, "segment '" + s.name + "'"};
    if (auto n = nodes_.find(s.node); n != nodes_.end())
      for (const auto& other : n->second.segments)
        if (auto o = segments_.find(other); o != segments_.end() && o->second.info.host_or_node() != s.host_or_node())
          return error{errc::invalid_argument, "segment '" + s.name + "': node '" + s.node + "' is on host '" +
                                                   o->second.info.host_or_node() + "', not '" + s.host_or_node() + "'"};
    segments_.emplace(s.name, segment_state{s, Allocator(s.capacity)});
    nodes_[s.node].last_heartbeat = now;
    nodes_[s.node].segments.insert(s.name);
    capacity_ += s.capacity;
    m_capacity_.set(static_cast<double>(capacity_));
    return {};
  }

  result<void> heartbeat(const std::string& node, clock::time_point now) {
    auto it = nodes_.find(node);
    if (it == nodes_.end()) return error{errc::not_found, "heartbeat from unknown node '" + node + "'"};
    it->second.heartbeat_gap = now - it->second.last_heartbeat;
    it->second.last_heartbeat = now;
    return {};
  }

  //! Whether `node` still heartbeats as it did: silent for less than three
  //! of its last heartbeat intervals (each counted as at least a second: a
  //! busy host may delay a fast heartbeat by hundreds of ms; the
  //! first counts from its registration). `not_found` for no such node.
  [[nodiscard]] result<bool> heartbeating(const std::string& node, clock::time_point now) const {
    auto it = nodes_.find(node);
    if (it == nodes_.end()) return error{errc::not_found, "no node '" + node + "'"};
    const auto gap = std::max<clock::duration>(it->second.heartbeat_gap, std::chrono::seconds(1));
    return now - it->second.last_heartbeat < 3 * gap;
  }

  //! A node leaves at `now` (cleanly, on its own word, or declared dead by
  //! its operator): it is dropped as `tick` drops a node silent past
  //! `node_timeout`, with the same fence against placing on it again while
  //! leases it was part of may run. Its replicas are forgotten, objects it
  //! alone held are reported lost (with the puts reclaimed), copies of the
  //! rest are planned by the next `tick`, and its reports wait a put lease
  //! from `now` (recovery_wait).
  result<tick_report> remove_node(const std::string& node, clock::time_point now) {
    if (!nodes_.count(node)) return error{errc::not_found, "node '" + node + "'"};
    tick_report report;
    drop_node(node, now, report);
    return report;
  }

  // --- recovery (recover_objects) ------------------------------------------

  //! Ledger changes for `node` after `ack` (the last one it applied), at
  //! most `max`; those up to `ack` are forgotten.
  result<std::vector<ledger_event>> ledger_since(const std::string& node, std::uint64_t ack, std::size_t max) {
    auto it = nodes_.find(node);
    if (it == nodes_.end()) return error{errc::not_found, "ledger of unknown node '" + node + "'"};
    auto& q = it->second.ledger;
    while (!q.empty() && q.front().seq <= ack) q.pop_front();
    return std::vector<ledger_event>(q.begin(), q.begin() + static_cast<std::ptrdiff_t>(std::min(max, q.size())));
  }

  //! Reports are refused (`busy`) before `t`: until then writers holding a
  //! previous master's allocations may still change the bytes a node checks.
  void hold_recovery_until(clock::time_point t) noexcept { recovery_from_ = t; }
  //! How long `node` must wait before reporting: the hold above, and for a
  //! node this master dropped, the longest put lease from the drop (writers
  //! holding tickets for its ranges may still write them; a put may ask up
  //! to `max_put_lease`).
  [[nodiscard]] clock::duration recovery_wait(const std::string& node, clock::time_point now) const {
    auto from = recovery_from_;
    if (auto d = dropped_at_.find(node); d != dropped_at_.end()) from = std::max(from, d->second + config_.put_lease_cap());
    return from > now ? from - now : clock::duration::zero();
  }

  //! Takes back the objects `node` reports (its ledger, checksums already
  //! checked against its bytes). Per entry: a key this master does not hold
  //! becomes a committed object on exactly the reported range; a further copy
  //! of an object already taken back (same put, size and checksum) becomes
  //! one more replica; a newer version (higher put id) replaces one taken
  //! back earlier and not leased. Refused, with the reason in the report: a
  //! segment not the node's, a range outside it or already allocated, an
  //! older version, or any key a put of this master wrote.
  result<recovery_report> recover(const std::string& node, std::span<const ledger_entry> entries, clock::time_point now) {
    if (!config_.recover_objects)
      return error{errc::invalid_argument, "recover: this master does not recover objects (recover_objects is off)"};
    if (!nodes_.count(node)) return error{errc::not_found, "recover: unknown node '" + node + "'"};
    if (const auto wait = recovery_wait(node, now); wait > clock::duration::zero())
      return error{errc::busy, "recover: reports are taken in " +
                                   std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(wait).count()) +
                                   " ms (writers holding earlier tickets may still change the bytes)"};
    if constexpr (!memory::allocator_with_placement<Allocator>) {
      return error{errc::not_supported, "recover: the segment allocator cannot allocate a named range (allocate_at)"};
    } else {
      recovery_report report;
      for (const auto& e : entries) {
        auto why = take_back(node, e, now, report);
        if (!why.empty()) report.rejected.push_back(e.key.full() + " put " + std::to_string(e.put_id) + ": " + why);
      }
      m_used_.set(static_cast<double>(used_));
      return report;
    }
  }

  // --- objects -------------------------------------------------------------

  result<put_ticket> put_start(const object_key& key, std::uint64_t size, const put_options& opt,
                               clock::time_point now) {
    if (key.key.empty()) return error{errc::invalid_argument, "put: empty key"};
    if (size == 0) return error{errc::invalid_argument, "put '" + key.full() + "': size 0"};
    if (size > config_.max_object_size)
      return error{errc::invalid_argument, "put '" + key.full() + "': " + std::to_string(size) +
                                               " bytes exceeds the maximum object size"};
    if (opt.replicas == 0) return error{errc::invalid_argument, "put '" + key.full() + "': 0 replicas"};
    if (opt.lease && *opt.lease <= clock::duration::zero())
      return error{errc::invalid_argument, "put '" + key.full() + "': a put lease must be positive"};
    // Refused rather than cut: the writer asked because its write takes
    // that long, and a shorter lease would fail it only after the transfer.
    if (opt.lease && *opt.lease > config_.put_lease_cap())
      return error{errc::invalid_argument,
                   "put '" + key.full() + "': a put lease of " + detail::ms_text(*opt.lease) +
                       " asked; this master grants at most " + detail::ms_text(config_.put_lease_cap()) +
                       " (max_put_lease)"};
    if (objects_.count(key)) return error{errc::already_exists, "put '" + key.full() + "'"};
    if (auto q = config_.tenant_quota.find(key.tenant); q != config_.tenant_quota.end()) {
      const auto used = tenant_used_[key.tenant];
      if (used + size * opt.replicas > q->second)
        return error{errc::capacity_exceeded, "tenant '" + key.tenant + "' quota of " + std::to_string(q->second) +
                                                  " bytes: " + std::to_string(used) + " used, put needs " +
                                                  std::to_string(size * opt.replicas)};
    }
    // No eviction can make room for a put that even an empty pool could not
    // hold: refuse it before evicting anything.
    std::set<std::string> could_hold;
    for (const auto& [name, seg] : segments_)
      if (takes_new_replicas(seg.info.node, now) && seg.info.capacity >= size) could_hold.insert(seg.info.node);
    if (could_hold.size() < opt.replicas)
      return error{errc::capacity_exceeded, "put '" + key.full() + "': " + std::to_string(opt.replicas) + " replica(s) of " +
                                                std::to_string(size) + " bytes need as many distinct nodes with a segment that large; " +
                                                std::to_string(could_hold.size()) + " (not draining, not back from a drop within its leases) have one; nothing evicted"};
    auto replicas = place(size, opt.replicas, opt.preferred_node, {}, now);
    // Does not fit: evict one object at a time (unpinned first) and retry.
    while (replicas.size() < opt.replicas && evict_one(now)) {
      release(replicas);
      replicas = place(size, opt.replicas, opt.preferred_node, {}, now);
    }
    if (replicas.size() < opt.replicas) {
      release(replicas);
      return error{errc::capacity_exceeded, "put '" + key.full() + "': no room for " + std::to_string(opt.replicas) +
                                                " replica(s) of " + std::to_string(size) +
                                                " bytes on distinct nodes (leased and pinned objects, and those being copied, stay)"};
    }
    object_state obj;
    obj.size = size;
    obj.replicas_wanted = opt.replicas;
    obj.pinned = opt.soft_pin;
    obj.put_id = ++next_put_id_;
    obj.put_deadline = now + opt.lease.value_or(config_.put_lease);
    obj.replicas = std::move(replicas);
    put_ticket t{obj.put_id, {}, obj.put_deadline};
    for (const auto& r : obj.replicas) t.replicas.push_back(r.location);
    tenant_used_[key.tenant] += size * opt.replicas;
    objects_.emplace(key, std::move(obj));
    return t;
  }

  //! `checksum`: XXH3-64 of the bytes written (with `recover_objects`, an
  //! object committed without one is not in the nodes' ledgers).
  result<void> put_commit(const object_key& key, std::uint64_t put_id, clock::time_point now,
                          std::optional<std::uint64_t> checksum = std::nullopt) {
    auto it = objects_.find(key);
    if (it == objects_.end() || it->second.put_id != put_id || it->second.committed)
      return error{errc::not_found, "commit '" + key.full() + "' put " + std::to_string(put_id) +
                                        ": no such pending put (expired or already committed)"};
    if (now > it->second.put_deadline) {
      erase_object(it);
      return error{errc::timed_out, "commit '" + key.full() + "': put lease expired; space reclaimed"};
    }
    it->second.committed = true;
    it->second.checksum = checksum;
    track(it);
    announce(it->first, it->second, it->second.replicas, true);
    m_puts_.add();
    evict_until(target_after_watermark(), now);
    return {};
  }

  result<void> put_abort(const object_key& key, std::uint64_t put_id) {
    auto it = objects_.find(key);
    if (it == objects_.end() || it->second.put_id != put_id || it->second.committed)
      return error{errc::not_found, "abort '" + key.full() + "': no such pending put"};
    erase_object(it);
    return {};
  }

  //! Grants a read lease of `lease` (default: `read_lease`), at most
  //! `max_read_lease`, on a committed object. Cut, not refused: a client
  //! asks one lease for all its gets, and only a read that takes longer
  //! than the cap fails (`timed_out`), bounded by the lease it was granted.
  result<get_grant> get(const object_key& key, clock::time_point now, const std::string& reader_node = {},
                        std::optional<clock::duration> lease = std::nullopt) {
    auto it = objects_.find(key);
    if (it == objects_.end() || !it->second.committed) {
      m_misses_.add();
      return error{errc::not_found, "get '" + key.full() + "'"};
    }
    auto& obj = it->second;
    std::erase_if(obj.leases, [&](const auto& l) { return l.second <= now; });
    const auto id = ++next_lease_id_;
    const auto until = now + std::min(lease.value_or(config_.read_lease), config_.read_lease_cap());
    obj.leases.emplace(id, until);
    obj.lease_until = std::max(obj.lease_until, until);
    eviction_.on_hit(evict_key(obj.eviction_id), cache::access_context{tick_++, cache::never, obj.size});
    get_grant g{obj.size, {}, until, id};
    for (const auto& r : obj.replicas) g.replicas.push_back(r.location);
    // The reader's own node first; a draining node's copy last, so that it
    // is read only when nothing else is left and can be given back sooner.
    auto rank = [&](const replica_location& r) { return (draining_.count(r.node) ? 2 : 0) + (r.node == reader_node ? 0 : 1); };
    std::stable_sort(g.replicas.begin(), g.replicas.end(),
                     [&](const replica_location& a, const replica_location& b) { return rank(a) < rank(b); });
    m_gets_.add();
    return g;
  }

  //! Ends the read lease `lease_id` (from its `get_grant`) early: the
  //! reader's transfer finished. Other readers' leases still hold the
  //! object; an unknown or expired id changes nothing. Without an id (a
  //! client that predates them) the lease ends only if it is the object's
  //! only one: with several, the master cannot tell whose ended.
  result<void> release_lease(const object_key& key, clock::time_point now, std::uint64_t lease_id = 0) {
    auto it = objects_.find(key);
    if (it == objects_.end()) return error{errc::not_found, "release '" + key.full() + "'"};
    auto& obj = it->second;
    std::erase_if(obj.leases, [&](const auto& l) { return l.second <= now; });
    if (lease_id != 0)
      obj.leases.erase(lease_id);
    else if (obj.leases.size() == 1)
      obj.leases.clear();
    // The latest lease still held; none: the object is free from `now`.
    auto until = std::min(obj.lease_until, now);
    for (const auto& l : obj.leases) until = std::max(until, l.second);
    obj.lease_until = until;
    return {};
  }

  //! Removes a committed object; `errc::busy` while a read lease holds it
  //! or a re-replication copy of it is in flight (the source node may still
  //! write the target range, which must not be reused before it is done).
  result<void> remove(const object_key& key, clock::time_point now) {
    auto it = objects_.find(key);
    if (it == objects_.end() || !it->second.committed) return error{errc::not_found, "remove '" + key.full() + "'"};
    if (it->second.lease_until > now) return error{errc::busy, "remove '" + key.full() + "': a read lease holds it"};
    if (!it->second.pending_replicas.empty())
      return error{errc::busy, "remove '" + key.full() + "': a re-replication copy of it is in flight"};
    erase_object(it);
    return {};
  }

  [[nodiscard]] bool exists(const object_key& key) const {
    auto it = objects_.find(key);
    return it != objects_.end() && it->second.committed;
  }

  //! How many leading `keys` (of `tenant`) are committed: the cached prefix.
  [[nodiscard]] std::size_t longest_prefix(const std::string& tenant, std::span<const std::string> keys) const {
    std::size_t n = 0;
    while (n < keys.size() && exists(object_key{tenant, keys[n]})) ++n;
    return n;
  }

  result<void> set_pin(const object_key& key, bool pinned) {
    auto it = objects_.find(key);
    if (it == objects_.end()) return error{errc::not_found, "pin '" + key.full() + "'"};
    it->second.pinned = pinned;
    if (it->second.committed) announce(it->first, it->second, it->second.replicas, true);  // the entry, pinned or not
    return {};
  }

  //! A re-replication copy finished: the new replica becomes readable.
  result<void> replication_done(const object_key& key, std::uint64_t put_id, const replica_location& target) {
    auto it = objects_.find(key);
    if (it == objects_.end()) return error{errc::not_found, "replication of '" + key.full() + "'"};
    for (auto& r : it->second.pending_replicas)
      if (r.location == target && r.put_id == put_id) {
        it->second.replicas.push_back(r);
        it->second.pending_replicas.erase(it->second.pending_replicas.begin() + (&r - it->second.pending_replicas.data()));
        announce(it->first, it->second, std::span(it->second.replicas).last(1), true);
        return {};
      }
    return error{errc::not_found, "replication of '" + key.full() + "': unknown target"};
  }

  //! Whether `task` (planned by `tick`) is still wanted: its copy is still
  //! in flight. A task for an object gone, or a copy given up, is not.
  [[nodiscard]] bool copying(const replication_task& task) const {
    auto it = objects_.find(task.key);
    if (it == objects_.end()) return false;
    return std::any_of(it->second.pending_replicas.begin(), it->second.pending_replicas.end(),
                       [&](const placed& p) { return p.put_id == task.put_id && p.location == task.target; });
  }

  //! Expires put leases, drops silent nodes, plans re-replication, evicts above the watermark.
  tick_report tick(clock::time_point now) {
    tick_report report;
    std::erase_if(dropped_at_, [&](const auto& d) { return d.second + config_.put_lease_cap() < now; });
    std::erase_if(fenced_until_, [&](const auto& f) { return f.second <= now; });
    std::vector<std::string> silent;
    for (const auto& [name, n] : nodes_)
      if (now - n.last_heartbeat > config_.node_timeout) silent.push_back(name);
    for (const auto& name : silent) drop_node(name, now, report);
    for (auto it = objects_.begin(); it != objects_.end();) {
      if (!it->second.committed && now > it->second.put_deadline) {
        report.reclaimed_puts.push_back(it->first);
        it = erase_object(it);
      } else {
        ++it;
      }
    }
    for (auto& [key, obj] : objects_) {
      if (!obj.committed || obj.replicas.empty()) continue;
      // Objects taken back wait a node timeout after reports open: the other
      // holders' reports are still coming, and a copy made meanwhile would
      // make them refuse their own ("a copy to this node is being made").
      if (obj.recovered && now < recovery_from_ + config_.node_timeout) continue;
      // A copy not done by its deadline failed (its transfer, or its source
      // died): free the target and plan another below.
      for (auto p = obj.pending_replicas.begin(); p != obj.pending_replicas.end();) {
        if (p->deadline >= now) {
          ++p;
          continue;
        }
        std::vector<placed> one{*p};
        release(one);
        report.abandoned_copies.push_back(key);
        p = obj.pending_replicas.erase(p);
      }
      const auto have = kept_replicas(obj);  // a draining node's copies are about to go
      if (have >= obj.replicas_wanted) continue;
      std::set<std::string> nodes;
      for (const auto& r : obj.replicas) nodes.insert(r.location.node);
      for (const auto& r : obj.pending_replicas) nodes.insert(r.location.node);
      auto more = allocate_excluding(obj.size, static_cast<unsigned>(obj.replicas_wanted - have), nodes, now);
      for (auto& r : more) {
        r.put_id = ++next_put_id_;
        r.deadline = now + config_.replication_timeout;
        report.replications.push_back({key, obj.replicas.front().location, r.location, r.put_id, r.deadline});
        obj.pending_replicas.push_back(r);
      }
    }
    report.freed_drained_copies = free_drained_copies(now);
    report.evicted = evict_until(target_after_watermark(), now);
    return report;
  }

  // --- introspection -------------------------------------------------------

  [[nodiscard]] std::uint64_t used_bytes() const noexcept { return used_; }
  [[nodiscard]] std::uint64_t capacity_bytes() const noexcept { return capacity_; }
  [[nodiscard]] std::size_t object_count() const noexcept { return objects_.size(); }
  //! Bytes allocated in the live segments of `tier` ("dram" or "ssd").
  [[nodiscard]] std::uint64_t tier_used(std::string_view tier) const {
    std::uint64_t n = 0;
    for (const auto& [name, seg] : segments_)
      if (seg.info.tier == tier) n += seg.allocator.capacity() - seg.allocator.free_bytes();
    return n;
  }
  [[nodiscard]] std::uint64_t tenant_used(const std::string& tenant) const {
    auto it = tenant_used_.find(tenant);
    return it == tenant_used_.end() ? 0 : it->second;
  }
  [[nodiscard]] std::vector<std::string> nodes() const {
    std::vector<std::string> out;
    for (const auto& [n, _] : nodes_) out.push_back(n);
    return out;
  }

  // --- admin ---------------------------------------------------------------

  //! Every live segment with its usage, by name.
  [[nodiscard]] std::vector<segment_usage> segments() const {
    std::vector<segment_usage> out;
    for (const auto& [name, seg] : segments_)
      out.push_back({seg.info, seg.allocator.capacity() - seg.allocator.free_bytes(), draining_.count(seg.info.node) > 0});
    return out;
  }
  //! Bytes contributed by the live segments of `tier`.
  [[nodiscard]] std::uint64_t tier_capacity(std::string_view tier) const {
    std::uint64_t n = 0;
    for (const auto& [name, seg] : segments_)
      if (seg.info.tier == tier) n += seg.info.capacity;
    return n;
  }
  //! Bytes charged to each tenant that ever stored something (size x replicas asked).
  [[nodiscard]] const std::map<std::string, std::uint64_t>& tenants_used() const noexcept { return tenant_used_; }

  //! Objects (committed and pending) of `tenant`, or of every tenant when it
  //! is empty, in key order; at most `limit`.
  [[nodiscard]] std::vector<object_summary> objects(const std::string& tenant, std::size_t limit,
                                                    clock::time_point now) const {
    std::vector<object_summary> out;
    auto it = tenant.empty() ? objects_.begin() : objects_.lower_bound(object_key{tenant, {}});
    for (; it != objects_.end() && out.size() < limit; ++it) {
      if (!tenant.empty() && it->first.tenant != tenant) break;
      const auto& obj = it->second;
      object_summary o{it->first, obj.size, obj.committed, obj.pinned, obj.replicas_wanted, {}, obj.pending_replicas.size(), {}};
      for (const auto& r : obj.replicas) o.replicas.push_back(r.location);
      const auto until = obj.committed ? obj.lease_until : obj.put_deadline;
      o.lease_left = until > now ? until - now : clock::duration::zero();
      out.push_back(std::move(o));
    }
    return out;
  }

  //! Starts draining `node` (idempotent) and reports where it stands: nothing
  //! new is placed on it, and `tick` copies each of its objects that has no
  //! replica on another live node to one (the usual re-replication tasks),
  //! so the node can then be stopped without losing anything. Then `tick`
  //! gives back the node's copy of each object whose wanted replicas are all
  //! on other nodes, once no read lease holds it and no copy of it is in
  //! flight; copies the rest of the pool has no room for stay and serve.
  result<drain_status> drain_node(const std::string& node) {
    auto n = nodes_.find(node);
    if (n == nodes_.end()) return error{errc::not_found, "drain: no node '" + node + "'"};
    draining_.insert(node);
    drain_status st{node, 0, 0, 0, 0};
    for (const auto& s : n->second.segments)
      if (auto seg = segments_.find(s); seg != segments_.end())
        st.used += seg->second.allocator.capacity() - seg->second.allocator.free_bytes();
    auto on_node = [&](const placed& p) { return p.location.node == node; };
    auto kept = [&](const placed& p) { return !draining_.count(p.location.node); };
    for (const auto& [key, obj] : objects_) {
      if (std::none_of(obj.replicas.begin(), obj.replicas.end(), on_node)) continue;
      ++st.objects;
      if (!obj.committed || std::none_of(obj.replicas.begin(), obj.replicas.end(), kept)) ++st.only_here;
      st.copying += obj.pending_replicas.size();
    }
    return st;
  }
  [[nodiscard]] bool draining(const std::string& node) const { return draining_.count(node) > 0; }

  //! Ends draining `node`: new replicas may be placed on it again (its
  //! copies given back are not brought back). Whether it was draining.
  result<bool> undrain_node(const std::string& node) {
    if (!nodes_.count(node)) return error{errc::not_found, "undrain: no node '" + node + "'"};
    return draining_.erase(node) > 0;
  }

 private:
  struct segment_state {
    segment_info info;
    Allocator allocator;
  };
  struct placed {
    replica_location location;
    memory::allocation alloc;
    std::uint64_t put_id = 0;
    clock::time_point deadline{};  // a re-replication copy: given up after this
  };
  struct object_state {
    std::uint64_t size = 0;
    unsigned replicas_wanted = 1;
    bool committed = false;
    bool pinned = false;
    std::uint64_t put_id = 0;
    std::uint64_t eviction_id = 0;
    clock::time_point put_deadline{};
    clock::time_point lease_until{};             // the latest read lease still held
    std::map<std::uint64_t, clock::time_point> leases;  // read lease id -> its end (pruned as they end)
    std::vector<placed> replicas;
    std::vector<placed> pending_replicas;
    std::optional<std::uint64_t> checksum;  // from the writer; without one the object is in no ledger
    bool recovered = false;                 // taken back from a node's report (`recover`)
  };
  struct node_state {
    clock::time_point last_heartbeat{};
    clock::duration heartbeat_gap{};  // between its last two heartbeats (or registration)
    std::set<std::string> segments;
    std::deque<ledger_event> ledger;  // changes the node has not acknowledged
    std::uint64_t ledger_seq = 0;
  };
  using object_map = std::map<object_key, object_state>;

  static cache::block_key evict_key(std::uint64_t id) noexcept { return {0, id}; }

  // A committed object enters the eviction order.
  void track(typename object_map::iterator it) {
    it->second.eviction_id = ++next_eviction_id_;
    eviction_keys_.emplace(it->second.eviction_id, it->first);
    eviction_.on_insert(evict_key(it->second.eviction_id), cache::access_context{tick_++, cache::never, it->second.size});
  }

  // Tells the nodes holding `replicas` of a committed object that they hold
  // it (`add`) or no longer do, through their ledgers.
  void announce(const object_key& key, const object_state& obj, std::span<const placed> replicas, bool add) {
    if (!config_.recover_objects || !obj.checksum) return;
    for (const auto& r : replicas) {
      auto n = nodes_.find(r.location.node);
      if (n == nodes_.end()) continue;
      auto& q = n->second.ledger;
      q.push_back({++n->second.ledger_seq, add,
                   ledger_entry{key, obj.put_id, r.location.segment, r.location.offset, obj.size, *obj.checksum,
                                obj.replicas_wanted, obj.pinned}});
      if (q.size() > config_.ledger_backlog) q.pop_front();  // the node sees the gap and forgets its ledger
    }
  }

  // One reported entry; the reason it was refused, or empty.
  std::string take_back(const std::string& node, const ledger_entry& e, clock::time_point now, recovery_report& report) {
    auto seg = segments_.find(e.segment);
    if (seg == segments_.end() || seg->second.info.node != node)
      return "segment '" + e.segment + "' is not one of node '" + node + "''s";
    if (e.key.key.empty() || e.size == 0 || e.put_id == 0 || e.replicas_wanted == 0)
      return "empty key, size 0, put id 0 or 0 replicas";
    if (e.size > config_.max_object_size) return "larger than the maximum object size";
    auto it = objects_.find(e.key);
    const bool another_copy = it != objects_.end() && it->second.recovered && it->second.put_id == e.put_id;
    if (another_copy) {
      auto& obj = it->second;
      if (obj.size != e.size || obj.checksum != e.checksum) return "same put as a copy taken back, other size or checksum";
      for (const auto& r : obj.replicas)
        if (r.location.node == node) return "a copy on this node was taken back already";
      for (const auto& r : obj.pending_replicas)
        if (r.location.node == node) return "a copy to this node is being made";
    } else if (it != objects_.end()) {
      if (!it->second.recovered) return "this master holds a put of the key";
      if (it->second.put_id > e.put_id) return "a newer version was taken back";
      if (it->second.lease_until > now) return "an older version taken back is being read";
      if (!it->second.pending_replicas.empty()) return "an older version taken back is being copied";
    }
    auto alloc = seg->second.allocator.allocate_at(e.offset, e.size);
    if (!alloc)
      return "range [" + std::to_string(e.offset) + ", +" + std::to_string(e.size) + ") of '" + e.segment +
             "' is outside it or taken";
    used_ += alloc->size;
    next_put_id_ = std::max(next_put_id_, e.put_id);  // this master's puts stay newer than what it took back
    placed p{replica_location{node, e.segment, e.offset, e.size}, *alloc, 0, {}};
    if (another_copy) {
      it->second.replicas.push_back(p);
      announce(it->first, it->second, std::span(it->second.replicas).last(1), true);
      ++report.replicas;
      return {};
    }
    if (it != objects_.end()) erase_object(it);  // an older version taken back earlier
    object_state obj;
    obj.size = e.size;
    obj.replicas_wanted = e.replicas_wanted;
    obj.committed = true;
    obj.pinned = e.pinned;
    obj.put_id = e.put_id;
    obj.checksum = e.checksum;
    obj.recovered = true;
    obj.replicas.push_back(p);
    tenant_used_[e.key.tenant] += e.size * e.replicas_wanted;
    auto [ins, _] = objects_.emplace(e.key, std::move(obj));
    track(ins);
    announce(ins->first, ins->second, ins->second.replicas, true);
    ++report.objects;
    return {};
  }

  // Gives back the copies on draining nodes of objects whose wanted replicas
  // are all readable elsewhere. Not while a read lease holds the object (a
  // reader may have been sent to that copy) or a copy of it is in flight
  // (its source may be that copy); objects taken back wait as in `tick`.
  std::size_t free_drained_copies(clock::time_point now) {
    if (draining_.empty()) return 0;
    auto on_draining = [&](const placed& p) { return draining_.count(p.location.node) > 0; };
    std::size_t freed = 0;
    for (auto& [key, obj] : objects_) {
      if (!obj.committed || !obj.pending_replicas.empty() || obj.lease_until > now) continue;
      if (obj.recovered && now < recovery_from_ + config_.node_timeout) continue;
      const auto going = static_cast<std::size_t>(std::count_if(obj.replicas.begin(), obj.replicas.end(), on_draining));
      if (going == 0 || obj.replicas.size() - going < obj.replicas_wanted) continue;
      std::vector<placed> freed_copies;
      auto split = std::stable_partition(obj.replicas.begin(), obj.replicas.end(), [&](const placed& p) { return !on_draining(p); });
      std::move(split, obj.replicas.end(), std::back_inserter(freed_copies));
      obj.replicas.erase(split, obj.replicas.end());
      announce(key, obj, freed_copies, false);
      freed += freed_copies.size();
      release(freed_copies);
    }
    return freed;
  }

  // Replicas (readable or being copied) on nodes that are not being drained.
  std::size_t kept_replicas(const object_state& obj) const {
    auto kept = [&](const placed& p) { return !draining_.count(p.location.node); };
    return static_cast<std::size_t>(std::count_if(obj.replicas.begin(), obj.replicas.end(), kept) +
                                    std::count_if(obj.pending_replicas.begin(), obj.pending_replicas.end(), kept));
  }

  // Whether new replicas may go to `node` at `now`: it is not being drained,
  // nor back too soon after a drop (`fenced_until_`).
  [[nodiscard]] bool takes_new_replicas(const std::string& node, clock::time_point now) const {
    if (draining_.count(node)) return false;
    auto f = fenced_until_.find(node);
    return f == fenced_until_.end() || f->second <= now;
  }

  std::vector<placement_candidate> candidates(const std::set<std::string>& exclude_nodes, clock::time_point now) const {
    std::vector<placement_candidate> c;
    for (const auto& [name, s] : segments_)
      if (!exclude_nodes.count(s.info.node) && takes_new_replicas(s.info.node, now))
        c.push_back({s.info.node, name, s.info.tier, s.allocator.free_bytes(), s.allocator.largest_free_block(),
                     s.info.host_or_node()});
    return c;
  }

  std::vector<placed> place(std::uint64_t size, unsigned replicas, const std::string& preferred,
                            const std::set<std::string>& exclude, clock::time_point now,
                            std::vector<std::string> hosts_in_use = {}) {
    auto c = candidates(exclude, now);
    std::vector<placed> out;
    for (auto i : placement_.choose(c, placement_request{size, replicas, preferred, std::move(hosts_in_use)})) {
      if (i >= c.size() || out.size() == replicas) break;
      auto& seg = segments_.at(c[i].segment);
      auto a = seg.allocator.allocate(size, config_.alignment);
      if (!a) continue;
      used_ += a->size;
      out.push_back({replica_location{seg.info.node, seg.info.name, a->offset, size}, *a, 0, {}});
    }
    m_used_.set(static_cast<double>(used_));
    return out;
  }

  //! Room for `n` more replicas of an object whose replicas are on `exclude`
  //! (nodes): on other hosts than theirs where any fits.
  std::vector<placed> allocate_excluding(std::uint64_t size, unsigned n, const std::set<std::string>& exclude,
                                         clock::time_point now) {
    std::vector<std::string> hosts;
    for (const auto& node : exclude)  // a node's segments all name one host (add_segment)
      if (auto it = nodes_.find(node); it != nodes_.end() && !it->second.segments.empty())
        if (auto seg = segments_.find(*it->second.segments.begin()); seg != segments_.end())
          hosts.push_back(seg->second.info.host_or_node());
    return place(size, n, {}, exclude, now, std::move(hosts));
  }

  void release(std::vector<placed>& replicas) {
    for (auto& r : replicas) {
      if (auto s = segments_.find(r.location.segment); s != segments_.end()) {
        s->second.allocator.deallocate(r.alloc);
        used_ -= r.alloc.size;
      }
    }
    replicas.clear();
    m_used_.set(static_cast<double>(used_));
  }

  typename object_map::iterator erase_object(typename object_map::iterator it) {
    auto& obj = it->second;
    tenant_used_[it->first.tenant] -= obj.size * obj.replicas_wanted;
    if (obj.committed) announce(it->first, obj, obj.replicas, false);
    release(obj.replicas);
    release(obj.pending_replicas);
    if (obj.committed) {
      eviction_.on_erase(evict_key(obj.eviction_id));
      eviction_keys_.erase(obj.eviction_id);
    }
    return objects_.erase(it);
  }

  void drop_node(const std::string& node, clock::time_point when, tick_report& report) {
    auto n = nodes_.find(node);
    if (n == nodes_.end()) return;
    // Writers, readers and copying nodes holding this master's word for the
    // node's ranges may still move bytes there until their leases and
    // deadlines end: if the node comes back (a partition, not a crash), no
    // new object is placed on it before then.
    auto fence = when;
    for (auto it = objects_.begin(); it != objects_.end();) {
      auto& obj = it->second;
      auto on_node = [&](const placed& p) { return p.location.node == node; };
      if (std::any_of(obj.replicas.begin(), obj.replicas.end(), on_node))
        fence = std::max(fence, obj.committed ? obj.lease_until : obj.put_deadline);
      for (const auto& p : obj.pending_replicas)
        if (on_node(p)) fence = std::max(fence, p.deadline);
      // Those replicas' memory is gone with the node: forget them without freeing.
      std::erase_if(obj.replicas, on_node);
      std::erase_if(obj.pending_replicas, on_node);
      if (obj.committed && obj.replicas.empty()) {
        report.lost_objects.push_back(it->first);
        m_lost_.add();
        it = erase_object(it);
      } else if (!obj.committed && obj.replicas.empty()) {
        // A pending put whose every destination died: its commit must fail, or
        // an object with no replica would become visible (exists, yet no get).
        report.reclaimed_puts.push_back(it->first);
        it = erase_object(it);
      } else {
        ++it;
      }
    }
    for (const auto& s : n->second.segments) {
      auto seg = segments_.find(s);
      if (seg == segments_.end()) continue;
      used_ -= seg->second.allocator.capacity() - seg->second.allocator.free_bytes();
      capacity_ -= seg->second.info.capacity;
      segments_.erase(seg);
    }
    nodes_.erase(n);
    draining_.erase(node);
    dropped_at_[node] = when;
    if (fence > when) fenced_until_[node] = fence;
    report.dropped_nodes.push_back(node);
    m_used_.set(static_cast<double>(used_));
    m_capacity_.set(static_cast<double>(capacity_));
  }

  std::uint64_t target_after_watermark() const {
    if (capacity_ == 0) return 0;
    const auto high = static_cast<double>(capacity_) * config_.high_watermark;
    return static_cast<double>(used_) > high ? static_cast<std::uint64_t>(static_cast<double>(capacity_) * config_.low_watermark)
                                             : used_;
  }

  // Evicts the policy's victim among unleased objects, unpinned ones first.
  bool evict_one(clock::time_point now) {
    for (bool allow_pinned : {false, true}) {
      auto victim = eviction_.victim([&](const cache::block_key& k) {
        auto e = eviction_keys_.find(k.lo);
        if (e == eviction_keys_.end()) return false;
        const auto& obj = objects_.at(e->second);
        // A copy in flight may still write its target range: not before it ends.
        return obj.lease_until <= now && obj.pending_replicas.empty() && (allow_pinned || !obj.pinned);
      });
      if (!victim) continue;
      auto e = eviction_keys_.find(victim->lo);
      auto it = objects_.find(e->second);
      eviction_keys_.erase(e);
      auto& obj = it->second;
      tenant_used_[it->first.tenant] -= obj.size * obj.replicas_wanted;
      announce(it->first, obj, obj.replicas, false);
      release(obj.replicas);
      release(obj.pending_replicas);
      objects_.erase(it);  // the policy already stopped tracking it
      m_evictions_.add();
      return true;
    }
    return false;
  }

  std::size_t evict_until(std::uint64_t target, clock::time_point now) {
    std::size_t evicted = 0;
    while (used_ > target && evict_one(now)) ++evicted;
    return evicted;
  }

  master_config config_;
  Placement placement_;
  Eviction eviction_;
  std::map<std::string, segment_state> segments_;
  std::map<std::string, node_state> nodes_;
  std::set<std::string> draining_;  // nodes being drained: placement skips them
  object_map objects_;
  std::unordered_map<std::uint64_t, object_key> eviction_keys_;
  std::map<std::string, std::uint64_t> tenant_used_;
  std::uint64_t used_ = 0;
  std::uint64_t capacity_ = 0;
  std::uint64_t next_put_id_ = 0;
  std::uint64_t next_eviction_id_ = 0;
  std::uint64_t next_lease_id_ = 0;
  clock::time_point recovery_from_{};
  std::map<std::string, clock::time_point> dropped_at_;  // nodes dropped within the longest put lease
  std::map<std::string, clock::time_point> fenced_until_;  // dropped nodes: no new replicas on them before this
  std::uint64_t tick_ = 0;
  metrics::counter& m_puts_;
  metrics::counter& m_gets_;
  metrics::counter& m_misses_;
  metrics::counter& m_evictions_;
  metrics::counter& m_lost_;
  metrics::gauge& m_used_;
  metrics::gauge& m_capacity_;
};

}  // namespace kvx::store
