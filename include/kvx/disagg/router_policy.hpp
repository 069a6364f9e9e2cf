#pragma once
//! \file
//! The `router_policy` concept: which prefill and which decode instance serve
//! a request, given what the router knows (in the spirit of Mooncake's
//! Conductor). The router (kvx/disagg/router.hpp) owns the cluster state (load
//! reports, the index of which instance or pool holds which block keys) and
//! the cost model; it hands a policy one `cluster_view` per request, with an
//! estimate for every candidate, and applies SLO-based early rejection to what
//! the policy picks.
//!
//! ## Requirements
//!
//! For a type `P`, `p` a `P`, `v` a `const cluster_view&`:
//!
//! | expression | type | semantics |
//! | --- | --- | --- |
//! | `typename P::router_policy_concept` | `router_policy_tag` | opts `P` in |
//! | `p.pick_prefill(v)` | `std::optional<std::size_t>` | index into `v.prefill` of the instance that computes the prompt; `nullopt` when none fits |
//! | `p.pick_decode(v)` | `std::optional<std::size_t>` | index into `v.decode` of the instance that generates |
//!
//! Candidates in a view are all up, in instance-id order. Policies may keep
//! state (a round-robin cursor) and are called from the router's one thread.
//!
//! ## A minimal conforming policy
//! \code
//! struct first_up {
//!   using router_policy_concept = kvx::disagg::router_policy_tag;
//!   std::optional<std::size_t> pick_prefill(const kvx::disagg::cluster_view& v) {
//!     return v.prefill.empty() ? std::nullopt : std::optional<std::size_t>(0);
//!   }
//!   std::optional<std::size_t> pick_decode(const kvx::disagg::cluster_view& v) {
//!     return v.decode.empty() ? std::nullopt : std::optional<std::size_t>(0);
//!   }
//! };
//! static_assert(kvx::disagg::router_policy<first_up>);
//! \endcode

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>

#include <kvx/cache/block_key.hpp>

namespace kvx::disagg {

//! The tag a type names as `router_policy_concept` to opt in.
struct router_policy_tag {};

using instance_id = std::uint32_t;
//! The KV pool (store) as a holder of cached blocks, beside the instances.
inline constexpr instance_id pool_location = UINT32_MAX;

enum class instance_role : std::uint8_t { prefill, decode, both };

//! What an instance is and how fast it is (from the engine's own profile, or
//! for the tiny engine `tiny::measure_engine` in examples/tiny_engine).
struct instance_spec {
  std::string name;
  instance_role role = instance_role::both;
  double prefill_tokens_per_s = 10000;   //!< prompt tokens computed per second
  double decode_step_s = 0.02;           //!< one decode step with an empty batch
  double decode_s_per_token = 0;         //!< step-time growth per token of KV in the batch
  double fetch_bytes_per_s = 10e9;       //!< how fast it loads cached KV from the pool or a peer
};

//! What an instance last reported (the router also adds its own routing
//! decisions optimistically until the next report).
struct instance_load {
  std::uint32_t queued_requests = 0;   //!< waiting for prefill
  std::uint64_t queued_tokens = 0;     //!< prompt tokens left to compute in that queue
  std::uint32_t running_requests = 0;  //!< decoding
  std::uint64_t running_tokens = 0;    //!< tokens of KV those requests hold
};

//! One request, as the router sees it.
struct routing_request {
  std::span<const cache::block_key> keys{};  //!< the prompt's block keys (full blocks, in order)
  std::uint32_t prompt_tokens = 0;
  std::uint32_t block_tokens = 16;            //!< tokens per key
  std::uint64_t kv_bytes_per_token = 0;       //!< KV bytes per token, all layers (for transfer times; 0: transfers cost nothing)
};

//! One up instance with the router's estimates for this request.
struct candidate {
  instance_id id = 0;
  const instance_spec* spec = nullptr;
  instance_load load{};
  std::uint32_t cached_tokens = 0;        //!< longest prefix of the prompt this instance holds
  std::uint32_t fetchable_tokens = 0;     //!< longest prefix held by any other location (pool or peer)
  instance_id fetch_from = pool_location; //!< where that longer prefix is
  double queue_s = 0;                     //!< wait before this request's prefill starts
  double prefill_s = 0;                   //!< compute for the uncached part (after any fetch)
  bool fetches = false;                   //!< the estimate loads the fetchable part beyond `cached_tokens` (it beats recomputing it)
  double fetch_s = 0;                     //!< ... in this time (0 when it does not; also 0 when `kv_bytes_per_token` is 0)
  double ttft_s = 0;                      //!< queue_s + fetch_s + prefill_s (prefill candidates)
  double tpot_s = 0;                      //!< decode step time once this request joins (decode candidates)
};

//! What a policy decides from.
struct cluster_view {
  const routing_request* request = nullptr;
  std::span<const candidate> prefill{};
  std::span<const candidate> decode{};
};

namespace detail {
template <class P>
concept has_router_tag = requires { typename P::router_policy_concept; } &&
                         std::same_as<typename P::router_policy_concept, router_policy_tag>;
template <class P>
concept has_pick_prefill = requires(P& p, const cluster_view& v) {
  { p.pick_prefill(v) } -> std::same_as<std::optional<std::size_t>>;
};
template <class P>
concept has_pick_decode = requires(P& p, const cluster_view& v) {
  { p.pick_decode(v) } -> std::same_as<std::optional<std::size_t>>;
};
}  // namespace detail

//! `P` picks instances for requests; see the requirements table above.
template <class P>
concept router_policy = detail::has_router_tag<P> && detail::has_pick_prefill<P> && detail::has_pick_decode<P>;

//! Fails to compile, with one sentence per missing requirement, unless `P` is
//! a router policy. Returns true so it can sit in a `static_assert`.
template <class P>
constexpr bool check_router_policy() {
  static_assert(detail::has_router_tag<P>,
                "kvx: router policy P lacks `using router_policy_concept = kvx::disagg::router_policy_tag;`");
  static_assert(detail::has_pick_prefill<P>,
                "kvx: router policy P lacks pick_prefill(const cluster_view&) -> std::optional<std::size_t>");
  static_assert(detail::has_pick_decode<P>,
                "kvx: router policy P lacks pick_decode(const cluster_view&) -> std::optional<std::size_t>");
  return router_policy<P>;
}

}  // namespace kvx::disagg
