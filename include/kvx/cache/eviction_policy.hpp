#pragma once
//! \file
//! The `eviction_policy` concept: which block leaves a tier when it is full.
//!
//! The cache decides WHEN to evict (a tier over its watermark, an insert that
//! does not fit); the policy decides WHICH block goes. A policy only tracks
//! keys and access metadata, never the bytes.
//!
//! ## Requirements
//!
//! For a type `P`, a value `p` of `P`, `cp` a `const P`, `k` a `block_key`,
//! `ctx` an `access_context` and `ev` any callable `bool(const block_key&)`:
//!
//! | expression | type | semantics |
//! | --- | --- | --- |
//! | `typename P::eviction_policy_concept` | `eviction_policy_tag` | opts `P` in |
//! | `P(std::size_t capacity)` | | capacity in blocks: a sizing hint (ghost lists, segment sizes) |
//! | `p.on_insert(k, ctx)` | any | `k` was admitted. Precondition: `k` is not tracked |
//! | `p.on_hit(k, ctx)` | any | `k` was read. Precondition: `k` is tracked |
//! | `p.on_erase(k)` | any | `k` left for another reason (invalidated, moved); no effect if untracked |
//! | `p.victim(ev)` | `std::optional<block_key>` | picks a tracked key with `ev(key) == true` and stops tracking it; `std::nullopt` if none qualifies. Keys with `ev(key) == false` (pinned: being read or transferred) are skipped but stay tracked |
//! | `cp.size()` | `std::size_t` | tracked (resident) blocks; ghost history does not count |
//! | `p.prefetch(k)` (optional) | any | a hint that `k` is about to be inserted (it may not be): the policy may start loading what `on_insert(k, ...)` will touch, so that those cache misses overlap the eviction's. No other effect; `tiered_cache` calls it where `P` has it |
//!
//! Thread safety: none. A policy is owned by one cache (or one tier of it),
//! which serializes calls under its own lock. No call blocks or allocates
//! more than O(1) amortized memory per tracked key.
//!
//! `access_context::now` is a logical clock the cache advances once per
//! access; `next_use` is only known to trace replay and is what Belady's MIN
//! reads; `parent` names the prefix parent so that prefix-aware policies can
//! tell leaves (no cached children) from inner blocks.
//!
//! ## A minimal conforming policy (FIFO)
//! \code
//! struct fifo {
//!   using eviction_policy_concept = kvx::cache::eviction_policy_tag;
//!   explicit fifo(std::size_t) {}
//!   void on_insert(const block_key& k, const access_context&) { q_.push_back(k); }
//!   void on_hit(const block_key&, const access_context&) {}
//!   void on_erase(const block_key& k) { std::erase(q_, k); }
//!   template <class Evictable> std::optional<block_key> victim(Evictable&& ev) {
//!     for (auto it = q_.begin(); it != q_.end(); ++it)
//!       if (ev(*it)) { auto k = *it; q_.erase(it); return k; }
//!     return std::nullopt;
//!   }
//!   std::size_t size() const { return q_.size(); }
//!   std::deque<block_key> q_;
//! };
//! static_assert(kvx::cache::eviction_policy<fifo>);
//! \endcode
//! `kvx::cache::check_eviction_policy<P>()` states, one `static_assert` per
//! requirement, what a type that is not a policy lacks; composition points
//! (`tiered_cache`, `any_eviction_policy`) call it.

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <type_traits>

#include <kvx/cache/block_key.hpp>

namespace kvx::cache {

//! The tag a type names as `eviction_policy_concept` to opt in.
struct eviction_policy_tag {};

//! "No future access": the `next_use` of a block that is never read again.
inline constexpr std::uint64_t never = UINT64_MAX;

//! What the cache tells a policy about one access.
struct access_context {
  std::uint64_t now = 0;               //!< logical clock, monotonic per cache
  std::uint64_t next_use = never;      //!< position of the next access; only trace replay knows it (Belady)
  std::uint64_t bytes = 0;             //!< size of the block
  const block_key* parent = nullptr;   //!< the prefix parent's key, if the block has one
};

namespace detail {
//! The callable `victim()` is checked with: any `bool(const block_key&)`.
struct evictable_archetype {
  bool operator()(const block_key&) const noexcept;
};

template <class P>
concept has_eviction_tag = requires { typename P::eviction_policy_concept; } &&
                           std::same_as<typename P::eviction_policy_concept, eviction_policy_tag>;
template <class P>
concept has_on_insert = requires(P& p, const block_key& k, const access_context& c) { p.on_insert(k, c); };
template <class P>
concept has_on_hit = requires(P& p, const block_key& k, const access_context& c) { p.on_hit(k, c); };
template <class P>
concept has_on_erase = requires(P& p, const block_key& k) { p.on_erase(k); };
template <class P>
concept has_victim = requires(P& p, evictable_archetype ev) {
  { p.victim(ev) } -> std::same_as<std::optional<block_key>>;
};
template <class P>
concept has_size = requires(const P& p) {
  { p.size() } -> std::convertible_to<std::size_t>;
};
}  // namespace detail

//! `P` decides which block leaves a tier; see the requirements table above.
template <class P>
concept eviction_policy = detail::has_eviction_tag<P> && std::constructible_from<P, std::size_t> &&
                          detail::has_on_insert<P> && detail::has_on_hit<P> && detail::has_on_erase<P> &&
                          detail::has_victim<P> && detail::has_size<P>;

//! Fails to compile, with one sentence per missing requirement, unless `P` is
//! an eviction policy. Returns true so it can sit in a `static_assert`.
template <class P>
constexpr bool check_eviction_policy() {
  static_assert(detail::has_eviction_tag<P>,
                "kvx: eviction policy P lacks `using eviction_policy_concept = kvx::cache::eviction_policy_tag;`");
  static_assert(std::constructible_from<P, std::size_t>,
                "kvx: eviction policy P lacks a constructor from std::size_t capacity_in_blocks");
  static_assert(detail::has_on_insert<P>, "kvx: eviction policy P lacks on_insert(const block_key&, const access_context&)");
  static_assert(detail::has_on_hit<P>, "kvx: eviction policy P lacks on_hit(const block_key&, const access_context&)");
  static_assert(detail::has_on_erase<P>, "kvx: eviction policy P lacks on_erase(const block_key&)");
  static_assert(detail::has_victim<P>, "kvx: eviction policy P lacks victim(evictable) -> std::optional<block_key>");
  static_assert(detail::has_size<P>, "kvx: eviction policy P lacks size() const -> std::size_t");
  return eviction_policy<P>;
}

}  // namespace kvx::cache
