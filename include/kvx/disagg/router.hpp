#pragma once
//! \file
//! `router<Policy>`: cache-aware request routing for disaggregated serving.
//!
//! The router keeps (1) the instances, their speeds and their last load
//! reports, and (2) a `prefix_index` of which instance, or the pool, holds
//! which block keys, updated by callbacks (`on_stored`, `on_evicted`,
//! `on_dropped`) as caches fill and evict. For each request it estimates, per
//! prefill candidate, the time to first token as Mooncake's Conductor does:
//!
//!     ttft = queue time + fetch time of the cached part held elsewhere
//!            + (uncached tokens) / (prefill speed)
//!
//! (fetching is chosen only when it beats recomputing), and per decode
//! candidate the step time once the request joins. The `Policy` picks; the
//! router then rejects early when the pick cannot meet the SLO, and otherwise
//! adds the request to the picked instances' load until their next report.
//!
//! Policies (`routing::round_robin`, `routing::least_loaded`,
//! `routing::cache_aware`) satisfy `router_policy` (kvx/disagg/router_policy.hpp).
//!
//! Thread safety: none; a router is owned by one thread (or strand). Nothing
//! blocks; `route()` allocates its candidate lists.
//!
//! \code
//! kvx::disagg::router<kvx::disagg::routing::cache_aware> r;
//! auto p = r.add_instance({.name = "prefill-0", .role = kvx::disagg::instance_role::prefill});
//! auto d = r.add_instance({.name = "decode-0", .role = kvx::disagg::instance_role::decode});
//! r.on_stored(p, keys_of_system_prompt);
//! auto decision = r.route({.keys = keys, .prompt_tokens = 900, .kv_bytes_per_token = 128 * 1024},
//!                         {.ttft_s = 0.5, .tpot_s = 0.05});
//! if (decision.accepted()) send(decision.prefill, decision.decode);
//! \endcode

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include <boost/container/small_vector.hpp>

#include <kvx/cache/block_key.hpp>
#include <kvx/core/result.hpp>
#include <kvx/disagg/router_policy.hpp>

namespace kvx::disagg {

//! Which location (instance id or `pool_location`) holds which block keys.
//! Because keys are prefix-chained, a location can use key i only if it also
//! holds keys 0..i-1: `longest_prefixes` counts leading keys per location.
class prefix_index {
 public:
  void on_stored(instance_id where, std::span<const cache::block_key> keys) {
    for (const auto& k : keys) {
      auto& holders = map_[k];
      if (std::find(holders.begin(), holders.end(), where) == holders.end()) holders.push_back(where);
    }
  }
  void on_evicted(instance_id where, std::span<const cache::block_key> keys) {
    for (const auto& k : keys) {
      auto it = map_.find(k);
      if (it == map_.end()) continue;
      auto& holders = it->second;
      holders.erase(std::remove(holders.begin(), holders.end(), where), holders.end());
      if (holders.empty()) map_.erase(it);
    }
  }
  //! Everything `where` held is gone (it died or was wiped).
  void on_dropped(instance_id where) {
    for (auto it = map_.begin(); it != map_.end();) {
      auto& holders = it->second;
      holders.erase(std::remove(holders.begin(), holders.end(), where), holders.end());
      it = holders.empty() ? map_.erase(it) : std::next(it);
    }
  }
  //! For every location holding key 0, the number of leading keys it holds;
  //! locations absent from the result hold none.
  [[nodiscard]] std::unordered_map<instance_id, std::uint32_t> longest_prefixes(
      std::span<const cache::block_key> keys) const {
    std::unordered_map<instance_id, std::uint32_t> hit;
    for (std::uint32_t i = 0; i < keys.size(); ++i) {
      auto it = map_.find(keys[i]);
      if (it == map_.end()) break;
      bool advanced = false;
      for (instance_id loc : it->second) {
        if (i == 0) {
          hit[loc] = 1;
          advanced = true;
        } else if (auto h = hit.find(loc); h != hit.end() && h->second == i) {
          h->second = i + 1;
          advanced = true;
        }
      }
      if (!advanced) break;
    }
    return hit;
  }
  //! Keys held by at least one location.
  [[nodiscard]] std::size_t size() const noexcept { return map_.size(); }

 private:
  std::unordered_map<cache::block_key, boost::container::small_vector<instance_id, 4>, cache::block_key_hash> map_;
};

//! Latency targets; a request whose estimates exceed them is rejected early.
struct slo {
  double ttft_s = std::numeric_limits<double>::infinity();
  double tpot_s = std::numeric_limits<double>::infinity();
};

//! The router's answer for one request.
struct route_decision {
  enum class outcome : std::uint8_t { accepted, rejected_ttft, rejected_tpot, no_instance, invalid_request };
  outcome status = outcome::no_instance;
  instance_id prefill = 0;
  instance_id decode = 0;
  std::uint32_t cached_tokens = 0;         //!< prefix the prefill instance already holds
  std::uint32_t fetch_tokens = 0;          //!< prefix to load from `fetch_from` (0: recompute instead)
  instance_id fetch_from = pool_location;
  double ttft_s = 0;                       //!< estimate for the picked prefill instance
  double tpot_s = 0;                       //!< estimate for the picked decode instance
  std::string reason;                      //!< why, in words (for logs and the demo)

  [[nodiscard]] bool accepted() const noexcept { return status == outcome::accepted; }
};

namespace routing {

//! Cycles through prefill instances and, independently, decode instances.
class round_robin {
 public:
  using router_policy_concept = router_policy_tag;
  std::optional<std::size_t> pick_prefill(const cluster_view& v) { return next(v.prefill, last_prefill_); }
  std::optional<std::size_t> pick_decode(const cluster_view& v) { return next(v.decode, last_decode_); }

 private:
  static std::optional<std::size_t> next(std::span<const candidate> c, std::optional<instance_id>& last) {
    if (c.empty()) return std::nullopt;
    std::size_t pick = 0;
    if (last)
      for (std::size_t i = 0; i < c.size(); ++i)
        if (c[i].id > *last) {
          pick = i;
          break;
        }
    last = c[pick].id;
    return pick;
  }
  std::optional<instance_id> last_prefill_, last_decode_;
};

//! Prefill on the instance whose queue drains first, decode on the one with
//! the fastest step; blind to caches.
class least_loaded {
 public:
  using router_policy_concept = router_policy_tag;
  std::optional<std::size_t> pick_prefill(const cluster_view& v) {
    return argmin(v.prefill, [](const candidate& c) { return c.queue_s; });
  }
  std::optional<std::size_t> pick_decode(const cluster_view& v) {
    return argmin(v.decode, [](const candidate& c) { return c.tpot_s; });
  }

  template <class Score>
  static std::optional<std::size_t> argmin(std::span<const candidate> c, Score score) {
    std::optional<std::size_t> best;
    double best_score = 0;
    for (std::size_t i = 0; i < c.size(); ++i) {
      const double s = score(c[i]);
      if (!best || s < best_score) {
        best = i;
        best_score = s;
      }
    }
    return best;
  }
};

//! Conductor-style: prefill where the estimated TTFT is lowest, i.e. the
//! prefix hit (and what can be fetched) minus a load penalty; decode by load.
//! `load_weight` scales the queue time in the score (1: pure TTFT; larger
//! values trade hit rate for balance).
class cache_aware {
 public:
  using router_policy_concept = router_policy_tag;
  //! Throws `std::invalid_argument` for a weight that is negative, infinite
  //! or NaN (NaN scores would make the first candidate win every pick).
  explicit cache_aware(double load_weight = 1.0) : load_weight_(load_weight) {
    if (!(load_weight >= 0) || !std::isfinite(load_weight))
      throw std::invalid_argument("kvx::disagg::routing::cache_aware: load_weight is " + std::to_string(load_weight) +
                                  "; it must be finite and not negative");
  }
  std::optional<std::size_t> pick_prefill(const cluster_view& v) {
    return least_loaded::argmin(v.prefill, [w = load_weight_](const candidate& c) {
      return w * c.queue_s + c.fetch_s + c.prefill_s;
    });
  }
  std::optional<std::size_t> pick_decode(const cluster_view& v) {
    return least_loaded::argmin(v.decode, [](const candidate& c) { return c.tpot_s; });
  }

 private:
  double load_weight_;
};

static_assert(check_router_policy<round_robin>());
static_assert(check_router_policy<least_loaded>());
static_assert(check_router_policy<cache_aware>());

}  // namespace routing

template <class Policy>
class router {
  static_assert(check_router_policy<Policy>(), "kvx: router<Policy> needs a router policy (see router_policy.hpp)");

 public:
  explicit router(Policy policy = Policy{}) : policy_(std::move(policy)) {}

  //! Adds an instance (up, idle); its id is its index. `errc::invalid_argument`
  //! naming the field for a speed that is not positive and finite, or a
  //! decode time that is negative, infinite or NaN (a NaN estimate wins every
  //! comparison it is first in and passes every SLO).
  result<instance_id> add_instance(instance_spec spec) {
    auto bad = [&](const char* field, double v, const char* must) {
      return error{errc::invalid_argument,
                   "router: instance '" + spec.name + "': " + field + " is " + std::to_string(v) + "; it must be " + must};
    };
    auto positive = [](double v) { return v > 0 && std::isfinite(v); };
    auto not_negative = [](double v) { return v >= 0 && std::isfinite(v); };
    if (!positive(spec.prefill_tokens_per_s)) return bad("prefill_tokens_per_s", spec.prefill_tokens_per_s, "positive and finite");
    if (!positive(spec.fetch_bytes_per_s)) return bad("fetch_bytes_per_s", spec.fetch_bytes_per_s, "positive and finite");
    if (!not_negative(spec.decode_step_s)) return bad("decode_step_s", spec.decode_step_s, "finite and not negative");
    if (!not_negative(spec.decode_s_per_token)) return bad("decode_s_per_token", spec.decode_s_per_token, "finite and not negative");
    instances_.push_back({std::move(spec), {}, true});
    return static_cast<instance_id>(instances_.size() - 1);
  }
  //! Marks an instance up or down; a down instance is never picked and its
  //! cached blocks are forgotten (a restarted instance starts cold).
  result<void> set_up(instance_id id, bool up) {
    KVX_TRY(check_id(id, "set_up"));
    instances_[id].up = up;
    if (!up) index_.on_dropped(id);
    return {};
  }
  //! Replaces the router's view of an instance's load with its report.
  result<void> update_load(instance_id id, const instance_load& load) {
    KVX_TRY(check_id(id, "update_load"));
    instances_[id].load = load;
    return {};
  }
  //! Cache callbacks: `where` (an instance id or `pool_location`) now holds /
  //! no longer holds `keys`. A store reported for an instance that is down
  //! is ignored (a late callback: the instance's blocks were forgotten when
  //! it went down, and it must not be picked as a fetch source);
  //! `errc::not_found` for an id the router does not know.
  result<void> on_stored(instance_id where, std::span<const cache::block_key> keys) {
    if (where != pool_location) {
      KVX_TRY(check_id(where, "on_stored"));
      if (!instances_[where].up) return {};
    }
    index_.on_stored(where, keys);
    return {};
  }
  void on_evicted(instance_id where, std::span<const cache::block_key> keys) { index_.on_evicted(where, keys); }
  void on_dropped(instance_id where) { index_.on_dropped(where); }

  //! Picks a prefill and a decode instance for `req`, or says why not.
  route_decision route(const routing_request& req, const slo& target = {}) {
    route_decision d;
    if (req.prompt_tokens == 0 || req.block_tokens == 0 ||
        std::uint64_t{req.keys.size()} * req.block_tokens > req.prompt_tokens) {
      d.status = route_decision::outcome::invalid_request;
      d.reason = "request has " + std::to_string(req.keys.size()) + " keys of " + std::to_string(req.block_tokens) +
                 " tokens for a prompt of " + std::to_string(req.prompt_tokens) + " tokens";
      return d;
    }
    const auto hits = index_.longest_prefixes(req.keys);
    std::vector<candidate> pre, dec;
    for (instance_id id = 0; id < instances_.size(); ++id) {
      const auto& in = instances_[id];
      if (!in.up) continue;
      if (in.spec.role != instance_role::decode) pre.push_back(estimate_prefill(id, req, hits));
      if (in.spec.role != instance_role::prefill) dec.push_back(estimate_decode(id, req));
    }
    const cluster_view view{&req, pre, dec};
    const auto p = pre.empty() ? std::nullopt : policy_.pick_prefill(view);
    const auto q = dec.empty() ? std::nullopt : policy_.pick_decode(view);
    if (!p || !q || *p >= pre.size() || *q >= dec.size()) {
      d.reason = pre.empty() ? "no prefill instance is up"
                 : dec.empty() ? "no decode instance is up"
                               : "the policy picked no instance";
      return d;
    }
    const candidate& pc = pre[*p];
    const candidate& dc = dec[*q];
    d.prefill = pc.id;
    d.decode = dc.id;
    d.cached_tokens = pc.cached_tokens;
    d.fetch_tokens = pc.fetches ? pc.fetchable_tokens - pc.cached_tokens : 0;
    d.fetch_from = pc.fetch_from;
    d.ttft_s = pc.ttft_s;
    d.tpot_s = dc.tpot_s;
    if (d.ttft_s > target.ttft_s) {
      d.status = route_decision::outcome::rejected_ttft;
      d.reason = "estimated TTFT " + std::to_string(d.ttft_s) + " s on '" + pc.spec->name + "' exceeds the SLO of " +
                 std::to_string(target.ttft_s) + " s";
      return d;
    }
    if (d.tpot_s > target.tpot_s) {
      d.status = route_decision::outcome::rejected_tpot;
      d.reason = "estimated TPOT " + std::to_string(d.tpot_s) + " s on '" + dc.spec->name + "' exceeds the SLO of " +
                 std::to_string(target.tpot_s) + " s";
      return d;
    }
    d.status = route_decision::outcome::accepted;
    d.reason = "prefill on '" + pc.spec->name + "' (" + std::to_string(pc.cached_tokens) + " tokens cached), decode on '" +
               dc.spec->name + "'";
    // Count the request against the picks until their next load report.
    auto& pl = instances_[pc.id].load;
    ++pl.queued_requests;
    pl.queued_tokens += req.prompt_tokens - std::max(pc.cached_tokens, d.fetch_tokens ? pc.fetchable_tokens : 0U);
    auto& dl = instances_[dc.id].load;
    ++dl.running_requests;
    dl.running_tokens += req.prompt_tokens;
    return d;
  }

  [[nodiscard]] const instance_spec& spec(instance_id id) const { return instances_.at(id).spec; }
  [[nodiscard]] const instance_load& load(instance_id id) const { return instances_.at(id).load; }
  [[nodiscard]] std::size_t size() const noexcept { return instances_.size(); }
  [[nodiscard]] const prefix_index& index() const noexcept { return index_; }
  [[nodiscard]] Policy& policy() noexcept { return policy_; }

 private:
  struct instance {
    instance_spec spec;
    instance_load load;
    bool up;
  };

  result<void> check_id(instance_id id, const char* op) const {
    if (id >= instances_.size())
      return error{errc::not_found, std::string("router::") + op + ": no instance " + std::to_string(id)};
    return {};
  }

  candidate estimate_prefill(instance_id id, const routing_request& req,
                             const std::unordered_map<instance_id, std::uint32_t>& hits) const {
    const auto& in = instances_[id];
    candidate c{.id = id, .spec = &in.spec, .load = in.load};
    // At least one token is always computed (it yields the first output token).
    const std::uint32_t cap = req.prompt_tokens > 0 ? req.prompt_tokens - 1 : 0;
    auto tokens = [&](std::uint32_t blocks) { return std::min(cap, blocks * req.block_tokens); };
    if (auto it = hits.find(id); it != hits.end()) c.cached_tokens = tokens(it->second);
    for (const auto& [loc, n] : hits)
      if (loc != id && tokens(n) > c.fetchable_tokens) {
        c.fetchable_tokens = tokens(n);
        c.fetch_from = loc;
      }
    const double speed = in.spec.prefill_tokens_per_s;
    c.queue_s = static_cast<double>(in.load.queued_tokens) / speed;
    const double recompute = static_cast<double>(req.prompt_tokens - c.cached_tokens) / speed;
    c.prefill_s = recompute;
    if (c.fetchable_tokens > c.cached_tokens) {
      const double fetch = static_cast<double>(c.fetchable_tokens - c.cached_tokens) *
                           static_cast<double>(req.kv_bytes_per_token) / in.spec.fetch_bytes_per_s;
      const double rest = static_cast<double>(req.prompt_tokens - c.fetchable_tokens) / speed;
      if (fetch + rest < recompute) {
        c.fetches = true;
        c.fetch_s = fetch;
        c.prefill_s = rest;
      }
    }
    c.ttft_s = c.queue_s + c.fetch_s + c.prefill_s;
    return c;
  }

  candidate estimate_decode(instance_id id, const routing_request& req) const {
    const auto& in = instances_[id];
    candidate c{.id = id, .spec = &in.spec, .load = in.load};
    c.tpot_s = in.spec.decode_step_s +
               in.spec.decode_s_per_token * static_cast<double>(in.load.running_tokens + req.prompt_tokens);
    return c;
  }

  Policy policy_;
  std::vector<instance> instances_;
  prefix_index index_;
};

}  // namespace kvx::disagg
