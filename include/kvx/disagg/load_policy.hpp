#pragma once
//! \file
//! The `load_policy` concept: how long a KV connector's loading side waits for
//! KV it was promised (pushed by a prefill instance, or read from the pool),
//! and what happens to KV that does not arrive.
//!
//! ## Requirements
//!
//! For a type `P`, `p` a `const P`:
//!
//! | expression | type | semantics |
//! | --- | --- | --- |
//! | `typename P::load_policy_concept` | `load_policy_tag` | opts `P` in |
//! | `p.max_wait()` | `std::chrono::steady_clock::duration` | the longest a load may take, counted from `start_load_kv`; past it, what has not arrived is missing. Not negative (`kv_connector::make` refuses it); `duration::max()` waits without a deadline |
//! | `p.on_missing()` | `missing_action` | `fail`: a missing or failed block fails the request (`wait_for_layer_load` returns the error: the engine aborts the step and the router retries elsewhere); `recompute`: missing blocks are reported by `blocks_with_load_errors()` and the engine recomputes from the first of them |
//!
//! Policies are small values, copied into the connector; nothing blocks.
//!
//! | policy | for | behaviour |
//! | --- | --- | --- |
//! | `load::wait_full` | batch jobs, correctness first | waits for everything (a generous safety timeout turns a dead peer into an error, never a hang); any failure fails the request |
//! | `load::wait_until` | chat with a TTFT SLO | waits up to a deadline; a late or failed load fails the request fast so the router can retry on another prefill instance |
//! | `load::best_effort` | agents, long shared prefixes | waits up to a deadline, uses what arrived, recomputes the rest; never fails a request for a missing block |
//!
//! \code
//! kvx::disagg::load::wait_until chat{std::chrono::milliseconds(300)};
//! static_assert(kvx::disagg::load_policy<decltype(chat)>);
//! \endcode

#include <chrono>
#include <concepts>
#include <cstdint>
#include <string_view>

namespace kvx::disagg {

//! The tag a type names as `load_policy_concept` to opt in.
struct load_policy_tag {};

//! What happens to blocks that did not arrive in time or failed to load.
enum class missing_action : std::uint8_t {
  fail,      //!< the request fails; the caller retries it elsewhere
  recompute  //!< the engine recomputes them (`blocks_with_load_errors`)
};

[[nodiscard]] constexpr std::string_view to_string(missing_action a) noexcept {
  return a == missing_action::fail ? "fail" : "recompute";
}

namespace detail {
template <class P>
concept has_load_tag = requires { typename P::load_policy_concept; } &&
                       std::same_as<typename P::load_policy_concept, load_policy_tag>;
template <class P>
concept has_max_wait = requires(const P& p) {
  { p.max_wait() } -> std::convertible_to<std::chrono::steady_clock::duration>;
};
template <class P>
concept has_on_missing = requires(const P& p) {
  { p.on_missing() } -> std::same_as<missing_action>;
};
}  // namespace detail

//! `P` decides how long loads are waited for and what a missing block means.
template <class P>
concept load_policy =
    detail::has_load_tag<P> && std::copy_constructible<P> && detail::has_max_wait<P> && detail::has_on_missing<P>;

//! One sentence per requirement `P` misses. Returns true so it can sit in a `static_assert`.
template <class P>
constexpr bool check_load_policy() {
  static_assert(detail::has_load_tag<P>,
                "kvx: load policy P lacks `using load_policy_concept = kvx::disagg::load_policy_tag;`");
  static_assert(std::copy_constructible<P>, "kvx: load policy P is not copy constructible (policies are values)");
  static_assert(detail::has_max_wait<P>, "kvx: load policy P lacks max_wait() const -> std::chrono::steady_clock::duration");
  static_assert(detail::has_on_missing<P>, "kvx: load policy P lacks on_missing() const -> kvx::disagg::missing_action");
  return load_policy<P>;
}

namespace load {

//! Waits for everything; any failure fails the request. `timeout` only turns
//! a dead peer into an error.
struct wait_full {
  using load_policy_concept = load_policy_tag;
  std::chrono::steady_clock::duration timeout = std::chrono::seconds(30);
  [[nodiscard]] std::chrono::steady_clock::duration max_wait() const noexcept { return timeout; }
  [[nodiscard]] static constexpr missing_action on_missing() noexcept { return missing_action::fail; }
};

//! Waits up to `deadline`; anything late or failed fails the request.
struct wait_until {
  using load_policy_concept = load_policy_tag;
  std::chrono::steady_clock::duration deadline = std::chrono::milliseconds(500);
  [[nodiscard]] std::chrono::steady_clock::duration max_wait() const noexcept { return deadline; }
  [[nodiscard]] static constexpr missing_action on_missing() noexcept { return missing_action::fail; }
};

//! Waits up to `deadline`, uses what arrived and has the engine recompute the rest.
struct best_effort {
  using load_policy_concept = load_policy_tag;
  std::chrono::steady_clock::duration deadline = std::chrono::milliseconds(500);
  [[nodiscard]] std::chrono::steady_clock::duration max_wait() const noexcept { return deadline; }
  [[nodiscard]] static constexpr missing_action on_missing() noexcept { return missing_action::recompute; }
};

static_assert(check_load_policy<wait_full>());
static_assert(check_load_policy<wait_until>());
static_assert(check_load_policy<best_effort>());

}  // namespace load
}  // namespace kvx::disagg
