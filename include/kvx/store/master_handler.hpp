#pragma once
//! \file
//! `master_handler`: executes control-plane requests against a
//! `master_state`. Pure (time is an argument, no I/O), so the fuzz target
//! drives it directly and tests replay exact schedules; `master_server`
//! puts it behind a socket.

#include <chrono>
#include <deque>
#include <map>
#include <string>
#include <utility>

#include <kvx/store/master_state.hpp>
#include <kvx/store/protocol.hpp>

namespace kvx::store {

template <class MasterState>
class master_handler {
 public:
  explicit master_handler(MasterState& state) : state_(state) {}

  //! Answers one request body (after framing). Never throws on bad input.
  protocol::json handle(std::string_view body, clock::time_point now) {
    auto req = protocol::parse_request(body);
    if (!req) return protocol::error_response(0, req.error());
    auto r = dispatch(*req, now);
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
    return report;
  }

 private:
  using json = protocol::json;

  static result<object_key> key_of(const config::view& v) {
    auto tenant = v.required<std::string>("tenant");
    KVX_TRY(tenant);
    auto key = v.required<std::string>("key");
    KVX_TRY(key);
    return object_key{std::move(*tenant), std::move(*key)};
  }

  static std::int64_t ms_until(clock::time_point t, clock::time_point now) {
    return std::chrono::duration_cast<std::chrono::milliseconds>(t - now).count();
  }

  result<json> dispatch(const protocol::request& req, clock::time_point now) {
    config::view v(req.body, req.op);
    const auto& op = req.op;
    if (op == "register_segment") {
      auto node = v.required<std::string>("node");
      KVX_TRY(node);
      auto seg = v.required<std::string>("segment");
      KVX_TRY(seg);
      auto cap = v.required<std::uint64_t>("capacity");
      KVX_TRY(cap);
      auto tier = v.optional<std::string>("tier", "dram");
      KVX_TRY(tier);
      KVX_TRY(state_.add_segment({*seg, *node, *cap, *tier}, now));
      return json::object();
    }
    if (op == "heartbeat") {
      auto node = v.required<std::string>("node");
      KVX_TRY(node);
      KVX_TRY(state_.heartbeat(*node, now));
      json tasks = json::array();
      auto& queue = tasks_[*node];
      for (const auto& t : queue)
        tasks.push_back({{"tenant", t.key.tenant}, {"key", t.key.key}, {"put_id", t.put_id},
                         {"source", protocol::to_json(t.source)}, {"target", protocol::to_json(t.target)}});
      queue.clear();
      return json{{"tasks", std::move(tasks)}};
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
    auto key = key_of(v);
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
      opt.replicas = *replicas;
      opt.preferred_node = std::move(*preferred);
      opt.soft_pin = *pin;
      auto t = state_.put_start(*key, *size, opt, now);
      KVX_TRY(t);
      json reps = json::array();
      for (const auto& r : t->replicas) reps.push_back(protocol::to_json(r));
      return json{{"put_id", t->put_id}, {"replicas", std::move(reps)}, {"deadline_ms", ms_until(t->deadline, now)}};
    }
    if (op == "put_commit" || op == "put_abort" || op == "replication_done") {
      auto id = v.required<std::uint64_t>("put_id");
      KVX_TRY(id);
      if (op == "put_commit") KVX_TRY(state_.put_commit(*key, *id, now));
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
      std::optional<clock::duration> lease;
      if (*lease_ms) lease = std::chrono::milliseconds(std::min<std::uint64_t>(*lease_ms, 3600000));
      auto g = state_.get(*key, now, *reader, lease);
      KVX_TRY(g);
      json reps = json::array();
      for (const auto& r : g->replicas) reps.push_back(protocol::to_json(r));
      return json{{"size", g->size}, {"replicas", std::move(reps)}, {"lease_ms", ms_until(g->lease_until, now)}};
    }
    if (op == "release") {
      KVX_TRY(state_.release_lease(*key, now));
      return json::object();
    }
    if (op == "remove") {
      KVX_TRY(state_.remove(*key, now));
      return json::object();
    }
    if (op == "exists") return json{{"exists", state_.exists(*key)}};
    return error{errc::malformed_message, "unknown op '" + op + "'"};
  }

  MasterState& state_;
  std::map<std::string, std::deque<replication_task>> tasks_;
};

}  // namespace kvx::store
