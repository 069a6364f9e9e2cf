#pragma once
//! \file
//! The `placement_policy` concept: which segments hold an object's replicas.
//!
//! ## Requirements
//! For a policy `P`, `p` a `P&`, `c` a `std::span<const placement_candidate>`,
//! `r` a `const placement_request&`:
//!
//! | expression | type | semantics |
//! | --- | --- | --- |
//! | `typename P::placement_policy_concept` | `placement_policy_tag` | opts in |
//! | `p.choose(c, r)` | `std::vector<std::size_t>` | indices into `c` of up to `r.replicas` candidates, on distinct nodes, each with `largest_free >= r.size`, best first; hosts not in `r.hosts_in_use` and not already chosen should come before a second replica on one host. Fewer than asked when not enough fit; the master decides whether that is an error. |
//!
//! The master calls `choose` under its lock: it must not block.
//!
//! Policies: `random_with_capacity` (weighted by free bytes, the default) and
//! `locality_aware` (the writer's or expected reader's node first, then the
//! default's choice). Both spread an object's replicas over hosts (failure
//! domains: a DRAM node and the SSD node of one machine share one) before
//! putting two on one host, and only then on another node of a used host.

#include <algorithm>
#include <concepts>
#include <cstdint>
#include <random>
#include <set>
#include <span>
#include <string>
#include <vector>

namespace kvx::store {

struct placement_policy_tag {};

//! A segment the master could place a replica on.
struct placement_candidate {
  std::string node;
  std::string segment;
  std::string tier;               //!< "dram" or "ssd"
  std::uint64_t free_bytes = 0;
  std::uint64_t largest_free = 0;  //!< largest allocation that would succeed
  std::string host{};              //!< failure domain; empty: the node is its own host

  [[nodiscard]] const std::string& host_or_node() const noexcept { return host.empty() ? node : host; }
};

struct placement_request {
  std::uint64_t size = 0;
  unsigned replicas = 1;
  std::string preferred_node;  //!< the writer or the expected reader; empty if none
  //! Hosts already holding a replica of the object (re-replication): a copy
  //! there survives less than one elsewhere.
  std::vector<std::string> hosts_in_use{};
};

template <class P>
concept placement_policy = std::same_as<typename P::placement_policy_concept, placement_policy_tag> &&
                           requires(P& p, std::span<const placement_candidate> c, const placement_request& r) {
                             { p.choose(c, r) } -> std::same_as<std::vector<std::size_t>>;
                           };

template <class P>
constexpr bool check_placement_policy() {
  static_assert(requires { typename P::placement_policy_concept; },
                "kvx: placement policy P lacks `using placement_policy_concept = kvx::store::placement_policy_tag;`");
  static_assert(requires(P& p, std::span<const placement_candidate> c, const placement_request& r) {
    { p.choose(c, r) } -> std::same_as<std::vector<std::size_t>>;
  }, "kvx: placement policy P lacks choose(std::span<const placement_candidate>, const placement_request&) -> std::vector<std::size_t>");
  return true;
}

namespace placement {

//! Random among segments that fit, weighted by free bytes (spreads load and
//! keeps big holes for big objects), DRAM before SSD, one replica per node.
class random_with_capacity {
 public:
  using placement_policy_concept = placement_policy_tag;
  random_with_capacity() : random_with_capacity(0x6b7678) {}
  explicit random_with_capacity(std::uint64_t seed) : rng_(seed) {}

  std::vector<std::size_t> choose(std::span<const placement_candidate> c, const placement_request& r) {
    std::vector<std::size_t> out;
    std::set<std::string> used_nodes;
    std::set<std::string> used_hosts(r.hosts_in_use.begin(), r.hosts_in_use.end());
    // New hosts first (DRAM, then SSD), then new nodes on hosts already used.
    for (const bool new_host : {true, false})
      for (const char* tier : {"dram", "ssd"}) {
        while (out.size() < r.replicas) {
          std::vector<std::size_t> fit;
          std::vector<double> weight;
          for (std::size_t i = 0; i < c.size(); ++i)
            if (c[i].tier == tier && c[i].largest_free >= r.size && !used_nodes.count(c[i].node) &&
                (!new_host || !used_hosts.count(c[i].host_or_node()))) {
              fit.push_back(i);
              weight.push_back(static_cast<double>(c[i].free_bytes) + 1.0);
            }
          if (fit.empty()) break;
          std::discrete_distribution<std::size_t> pick(weight.begin(), weight.end());
          const auto chosen = fit[pick(rng_)];
          out.push_back(chosen);
          used_nodes.insert(c[chosen].node);
          used_hosts.insert(c[chosen].host_or_node());
        }
      }
    return out;
  }

 private:
  std::mt19937_64 rng_;
};

//! The preferred node's segment first (a local hit is a memcpy, not a
//! network transfer), then `random_with_capacity` for the other replicas.
class locality_aware {
 public:
  using placement_policy_concept = placement_policy_tag;
  locality_aware() : locality_aware(0x6b7678) {}
  explicit locality_aware(std::uint64_t seed) : fallback_(seed) {}

  std::vector<std::size_t> choose(std::span<const placement_candidate> c, const placement_request& r) {
    std::vector<std::size_t> out;
    if (!r.preferred_node.empty()) {
      std::size_t best = c.size();
      for (std::size_t i = 0; i < c.size(); ++i)
        if (c[i].node == r.preferred_node && c[i].largest_free >= r.size &&
            (best == c.size() || (c[i].tier == "dram" && c[best].tier != "dram") ||
             (c[i].tier == c[best].tier && c[i].free_bytes > c[best].free_bytes)))
          best = i;
      if (best != c.size()) out.push_back(best);
    }
    if (out.size() < r.replicas) {
      std::vector<placement_candidate> rest;
      std::vector<std::size_t> index;
      for (std::size_t i = 0; i < c.size(); ++i)
        if (out.empty() || c[i].node != c[out.front()].node) {
          rest.push_back(c[i]);
          index.push_back(i);
        }
      auto in_use = r.hosts_in_use;
      if (!out.empty()) in_use.push_back(c[out.front()].host_or_node());
      auto more = fallback_.choose(rest, {r.size, static_cast<unsigned>(r.replicas - out.size()), {}, std::move(in_use)});
      for (auto m : more) out.push_back(index[m]);
    }
    return out;
  }

 private:
  random_with_capacity fallback_;
};

}  // namespace placement

static_assert(check_placement_policy<placement::random_with_capacity>());
static_assert(check_placement_policy<placement::locality_aware>());

}  // namespace kvx::store
