#pragma once
//! \file
//! `master_handler`: executes control-plane requests against a
//! `master_state`. Pure (time is an argument, no I/O), so the fuzz target
//! drives it directly and tests replay exact schedules; `master_server`
//! puts it behind a socket.

#include <chrono>
#include <deque>
#include <map>
#include <optional>
#include <string>
#include <utility>

#include <kvx/core/log.hpp>
#include <kvx/store/master_state.hpp>
#include <kvx/store/protocol.hpp>

namespace kvx::store {

template <class MasterState>
class master_handler {
 public:
  explicit master_handler(MasterState& state) : state_(state) {}

  //! Answers one request body (after framing): the response, or null for a
  //! notification (`"reply": false`), whose outcome goes nowhere. Never
  //! throws on bad input.
  protocol::json handle(std::string_view body, clock::time_point now) {
    auto req = protocol::parse_request(body);
    if (!req) return protocol::error_response(0, req.error());
    auto r = dispatch(*req, now);
    if (!req->reply) return nullptr;
    if (!r) return protocol::error_response(req->id, r.error());
    (*r)["id"] = req->id;
    (*r)["ok"] = true;
    return std::move(*r);
  }

  //! Runs the master's periodic work; replication tasks are queued for the
  //! source node and handed out with its next heartbeat.
  tick_report tick(clock::time_point now) {
    auto report = state_.tick(now);
    for (const auto& t : report.replications) tasks_[t.source.node].push_back(t);
    for (const auto& n : report.dropped_nodes) tasks_.erase(n);
    // Tasks for objects gone, or copies given up, must not reach a source:
    // their target ranges may already hold another object.
    for (auto& [node, queue] : tasks_) std::erase_if(queue, [&](const replication_task& t) { return !state_.copying(t); });
    return report;
  }

 private:
  using json = protocol::json;

  static std::int64_t ms_until(clock::time_point t, clock::time_point now) {
    return std::chrono::duration_cast<std::chrono::milliseconds>(t - now).count();
  }

  result<json> dispatch(const protocol::request& req, clock::time_point now) {
    config::view v(req.body, req.op);
    const auto& op = req.op;
    if (auto answer = admin(v, op, now)) return std::move(*answer);
    if (op == "register_segment") {
      auto node = v.required<std::string>("node");
      KVX_TRY(node);
      auto seg = v.required<std::string>("segment");
      KVX_TRY(seg);
      auto cap = v.required<std::uint64_t>("capacity");
      KVX_TRY(cap);
      auto tier = v.optional<std::string>("tier", "dram");
      KVX_TRY(tier);
      auto host = v.optional<std::string>("host", "");
      KVX_TRY(host);
      KVX_TRY(state_.add_segment({*seg, *node, *cap, *tier, *host}, now));
      return json{{"recover_after_ms", ms_until(now + state_.recovery_wait(*node, now), now)}};
    }
    if (op == "heartbeat") {
      auto node = v.required<std::string>("node");
      KVX_TRY(node);
      auto ack = v.optional<std::uint64_t>("ledger_ack", 0);
      KVX_TRY(ack);
      KVX_TRY(state_.heartbeat(*node, now));
      json tasks = json::array();
      auto& queue = tasks_[*node];
      for (const auto& t : queue)
        if (state_.copying(t)) tasks.push_back(protocol::to_json(t, now));
      queue.clear();
      auto changes = state_.ledger_since(*node, *ack, max_ledger_changes);
      KVX_TRY(changes);
      json ledger = json::array();
      for (const auto& c : *changes) ledger.push_back(protocol::to_json(c));
      return json{{"tasks", std::move(tasks)}, {"ledger", std::move(ledger)}};
    }
    if (op == "leave") {
      auto node = v.required<std::string>("node");
      KVX_TRY(node);
      return drop(*node, now, "left");
    }
    if (op == "recover") {
      auto node = v.required<std::string>("node");
      KVX_TRY(node);
      static const json absent;
      const json& list = req.body.contains("objects") ? req.body["objects"] : absent;
      if (!list.is_array() || list.size() > max_recover_entries)
        return error{errc::malformed_message, "field 'recover.objects' must be an array of at most " +
                                                  std::to_string(max_recover_entries) + " ledger entries"};
      std::vector<ledger_entry> entries;
      for (std::size_t i = 0; i < list.size(); ++i) {
        auto e = protocol::ledger_entry_from_json(list[i], "recover.objects[" + std::to_string(i) + "]");
        KVX_TRY(e);
        entries.push_back(std::move(*e));
      }
      auto report = state_.recover(*node, entries, now);
      KVX_TRY(report);
      return json{{"objects", report->objects}, {"replicas", report->replicas}, {"rejected", report->rejected}};
    }
    if (op == "stats")
      return json{{"used", state_.used_bytes()}, {"capacity", state_.capacity_bytes()},
                  {"objects", state_.object_count()}, {"nodes", state_.nodes()}};
    if (op == "longest_prefix") {
      auto tenant = v.required<std::string>("tenant");
      KVX_TRY(tenant);
      if (!req.body.contains("keys") || !req.body["keys"].is_array())
        return error{errc::malformed_message, "field 'longest_prefix.keys' must be an array of strings"};
      std::vector<std::string> keys;
      for (const auto& k : req.body["keys"]) {
        if (!k.is_string()) return error{errc::malformed_message, "field 'longest_prefix.keys' holds a non-string"};
        keys.push_back(k.get<std::string>());
      }
      return json{{"count", state_.longest_prefix(*tenant, keys)}};
    }
    auto key = protocol::object_key_from(v);
    KVX_TRY(key);
    if (op == "put_start") {
      put_options opt;
      auto replicas = v.optional<unsigned>("replicas", 1);
      KVX_TRY(replicas);
      auto preferred = v.optional<std::string>("preferred_node", "");
      KVX_TRY(preferred);
      auto pin = v.optional<bool>("soft_pin", false);
      KVX_TRY(pin);
      auto size = v.required<std::uint64_t>("size");
      KVX_TRY(size);
      // Absent or 0 (a writer that predates per-put leases): the master's put lease.
      auto lease_ms = v.optional<std::uint64_t>("lease_ms", 0);
      KVX_TRY(lease_ms);
      if (*lease_ms > static_cast<std::uint64_t>(protocol::max_deadline_ms))
        return error{errc::malformed_message, "field 'put_start.lease_ms' is over " +
                                                  std::to_string(protocol::max_deadline_ms) + " ms"};
      if (*lease_ms) opt.lease = std::chrono::milliseconds(*lease_ms);
      opt.replicas = *replicas;
      opt.preferred_node = std::move(*preferred);
      opt.soft_pin = *pin;
      auto t = state_.put_start(*key, *size, opt, now);
      KVX_TRY(t);
      json reps = json::array();
      for (const auto& r : t->replicas) reps.push_back(protocol::to_json(r));
      return json{{"put_id", t->put_id}, {"replicas", std::move(reps)}, {"deadline_ms", ms_until(t->deadline, now)},
                  {"checksum", state_.config().recover_objects}};
    }
    if (op == "put_commit" || op == "put_abort" || op == "replication_done") {
      auto id = v.required<std::uint64_t>("put_id");
      KVX_TRY(id);
      if (op == "put_commit") {
        std::optional<std::uint64_t> checksum;
        if (req.body.contains("checksum")) {
          auto c = v.required<std::uint64_t>("checksum");
          KVX_TRY(c);
          checksum = *c;
        }
        KVX_TRY(state_.put_commit(*key, *id, now, checksum));
      }
      if (op == "put_abort") KVX_TRY(state_.put_abort(*key, *id));
      if (op == "replication_done") {
        if (!req.body.contains("target")) return error{errc::malformed_message, "field 'replication_done.target' is required"};
        auto target = protocol::replica_from_json(req.body["target"], "replication_done.target");
        KVX_TRY(target);
        KVX_TRY(state_.replication_done(*key, *id, *target));
      }
      return json::object();
    }
    if (op == "get") {
      auto reader = v.optional<std::string>("reader_node", "");
      KVX_TRY(reader);
      auto lease_ms = v.optional<std::uint64_t>("lease_ms", 0);
      KVX_TRY(lease_ms);
      // The state cuts it to max_read_lease; bounded here first so the
      // conversion to the clock's ticks cannot overflow.
      std::optional<clock::duration> lease;
      if (*lease_ms)
        lease = std::chrono::milliseconds(std::min(*lease_ms, static_cast<std::uint64_t>(protocol::max_deadline_ms)));
      auto g = state_.get(*key, now, *reader, lease);
      KVX_TRY(g);
      json reps = json::array();
      for (const auto& r : g->replicas) reps.push_back(protocol::to_json(r));
      return json{{"size", g->size}, {"replicas", std::move(reps)}, {"lease_ms", ms_until(g->lease_until, now)},
                  {"lease_id", g->lease_id}};
    }
    if (op == "release") {
      auto lease_id = v.optional<std::uint64_t>("lease_id", 0);
      KVX_TRY(lease_id);
      KVX_TRY(state_.release_lease(*key, now, *lease_id));
      return json::object();
    }
    if (op == "remove") {
      KVX_TRY(state_.remove(*key, now));
      return json::object();
    }
    if (op == "exists") return json{{"exists", state_.exists(*key)}};
    return error{errc::malformed_message, "unknown op '" + op + "'"};
  }

  // The admin command's requests (read-only listings, draining a node and ending it);
  // nothing for the other ops.
  std::optional<result<json>> admin(const config::view& v, const std::string& op, clock::time_point now) {
    if (op == "list_segments") {
      json segs = json::array();
      for (const auto& s : state_.segments())
        segs.push_back({{"name", s.info.name}, {"node", s.info.node}, {"host", s.info.host_or_node()}, {"tier", s.info.tier},
                        {"capacity", s.info.capacity}, {"used", s.used}, {"draining", s.draining}});
      return json{{"segments", std::move(segs)}};
    }
    if (op == "list_objects") {
      auto tenant = v.optional<std::string>("tenant", "");
      if (!tenant) return result<json>(tenant.error());
      auto limit = v.optional<std::uint64_t>("limit", 10000);
      if (!limit) return result<json>(limit.error());
      if (*limit == 0 || *limit > 100000)
        return result<json>(error{errc::invalid_argument, "field 'list_objects.limit' must be 1..100000"});
      const auto objs = state_.objects(*tenant, static_cast<std::size_t>(*limit) + 1, now);
      json list = json::array();
      for (std::size_t i = 0; i < objs.size() && i < *limit; ++i) {
        const auto& o = objs[i];
        json reps = json::array();
        for (const auto& r : o.replicas) reps.push_back(protocol::to_json(r));
        list.push_back({{"tenant", o.key.tenant}, {"key", o.key.key}, {"size", o.size}, {"committed", o.committed},
                        {"pinned", o.pinned}, {"replicas_wanted", o.replicas_wanted}, {"replicas", std::move(reps)},
                        {"copying", o.copying}, {"lease_ms", std::chrono::duration_cast<std::chrono::milliseconds>(o.lease_left).count()}});
      }
      return json{{"objects", std::move(list)}, {"truncated", objs.size() > *limit}};
    }
    if (op == "usage") {
      json tiers = json::object();
      for (const auto& s : state_.segments())
        tiers[s.info.tier] = {{"used", state_.tier_used(s.info.tier)}, {"capacity", state_.tier_capacity(s.info.tier)}};
      json tenants = json::object();
      for (const auto& [t, used] : state_.tenants_used()) tenants[t] = {{"used", used}};
      for (const auto& [t, quota] : state_.config().tenant_quota) {
        tenants[t]["quota"] = quota;
        if (!tenants[t].contains("used")) tenants[t]["used"] = 0;
      }
      return json{{"used", state_.used_bytes()}, {"capacity", state_.capacity_bytes()}, {"objects", state_.object_count()},
                  {"nodes", state_.nodes()}, {"tiers", std::move(tiers)}, {"tenants", std::move(tenants)}};
    }
    if (op == "drain_node") {
      auto node = v.required<std::string>("node");
      if (!node) return result<json>(node.error());
      auto st = state_.drain_node(*node);
      if (!st) return result<json>(st.error());
      return json{{"node", st->node},       {"objects", st->objects},    {"only_here", st->only_here}, {"copying", st->copying},
                  {"used", st->used},       {"drained", st->drained()}, {"empty", st->empty()}};
    }
    if (op == "remove_node") {
      // An operator's word that a node is gone, so that its objects need
      // not wait node_timeout to be copied again. A node that still
      // heartbeats is refused without "force": removed, it would register
      // again, empty, and every copy it held would be made again elsewhere.
      auto node = v.required<std::string>("node");
      KVX_TRY(node);
      auto force = v.optional<bool>("force", false);
      KVX_TRY(force);
      auto live = state_.heartbeating(*node, now);
      KVX_TRY(live);
      if (*live && !*force)
        return error{errc::busy, "remove_node: node '" + *node +
                                     "' is still heartbeating; drain it, or stop it (it leaves by itself), or force the removal"};
      return drop(*node, now, *live ? "was removed by its operator while heartbeating" : "was removed by its operator");
    }
    if (op == "undrain_node") {
      auto node = v.required<std::string>("node");
      if (!node) return result<json>(node.error());
      auto was = state_.undrain_node(*node);
      if (!was) return result<json>(was.error());
      return json{{"node", *node}, {"was_draining", *was}};
    }
    return std::nullopt;
  }

  // Drops `node` now (leave, remove_node): its objects' copies are planned
  // by the next tick.
  result<json> drop(const std::string& node, clock::time_point now, const char* how) {
    auto report = state_.remove_node(node, now);
    KVX_TRY(report);
    tasks_.erase(node);
    log(log_level::info, "store master: node '", node, "' ", how, "; ", report->lost_objects.size(), " objects lost with it");
    for (const auto& k : report->lost_objects) log(log_level::warn, "store master: object '", k.full(), "' lost with its node");
    return json{{"node", node}, {"lost", report->lost_objects.size()}, {"reclaimed_puts", report->reclaimed_puts.size()}};
  }

  // Bound the frames: a heartbeat answer carries this many ledger changes at
  // most (the rest come with the next ones), a report this many entries.
  static constexpr std::size_t max_ledger_changes = 4096;
  static constexpr std::size_t max_recover_entries = 10000;

  MasterState& state_;
  std::map<std::string, std::deque<replication_task>> tasks_;
};

}  // namespace kvx::store
