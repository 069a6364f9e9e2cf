#pragma once
//! \file
//! The `tiering_policy` concept: where a block is written, when it moves up,
//! and whether it moves down or is dropped when a tier evicts it.
//!
//! Tiers are numbered from 0, the fastest (GPU or DRAM), downwards. The
//! eviction policy of a tier picks WHICH block leaves; the tiering policy
//! decides WHERE it goes and which new blocks get in at all.
//!
//! ## Requirements
//!
//! For a type `P`, `p` a `P`, `cp` a `const P`, `a` an `admission_context`
//! and `t` a `std::size_t` tier index:
//!
//! | expression | type | semantics |
//! | --- | --- | --- |
//! | `typename P::tiering_policy_concept` | `tiering_policy_tag` | opts `P` in |
//! | `cp.writes_through()` | `bool` | an insert also stores into every lower tier (true), or only into tier 0, lower tiers getting the block when it is demoted (false: write-back) |
//! | `p.admit(a)` | `bool` | whether a new block enters tier `a.tier` at all (admission control); may record `a.key` |
//! | `p.promote_on_hit(t)` | `bool` | a read served from tier `t > 0` also copies the block into tier 0 |
//! | `p.demote_on_evict(t)` | `bool` | a block evicted from tier `t` moves to tier `t + 1` (if it is not there already) instead of being dropped |
//!
//! Thread safety: none needed; the cache calls a policy under its index lock.
//! No call may block.
//!
//! ## A minimal conforming policy
//! \code
//! struct dram_only {
//!   using tiering_policy_concept = kvx::cache::tiering_policy_tag;
//!   bool writes_through() const { return false; }
//!   bool admit(const kvx::cache::admission_context&) { return true; }
//!   bool promote_on_hit(std::size_t) { return true; }
//!   bool demote_on_evict(std::size_t) { return false; }
//! };
//! static_assert(kvx::cache::tiering_policy<dram_only>);
//! \endcode

#include <concepts>
#include <cstddef>
#include <cstdint>

#include <kvx/cache/block_key.hpp>

namespace kvx::cache {

//! The tag a type names as `tiering_policy_concept` to opt in.
struct tiering_policy_tag {};

//! What the cache knows when a new block asks to enter a tier.
struct admission_context {
  block_key key{};
  std::size_t tier = 0;
  std::uint64_t bytes = 0;
  std::uint64_t used = 0;      //!< bytes the tier holds or has promised
  std::uint64_t capacity = 0;  //!< the tier's capacity in bytes
  bool under_pressure = false; //!< admitting the block takes the tier above its high watermark
};

namespace detail {
template <class P>
concept has_tiering_tag = requires { typename P::tiering_policy_concept; } &&
                          std::same_as<typename P::tiering_policy_concept, tiering_policy_tag>;
template <class P>
concept has_writes_through = requires(const P& p) {
  { p.writes_through() } -> std::convertible_to<bool>;
};
template <class P>
concept has_admit = requires(P& p, const admission_context& a) {
  { p.admit(a) } -> std::convertible_to<bool>;
};
template <class P>
concept has_promote_on_hit = requires(P& p, std::size_t t) {
  { p.promote_on_hit(t) } -> std::convertible_to<bool>;
};
template <class P>
concept has_demote_on_evict = requires(P& p, std::size_t t) {
  { p.demote_on_evict(t) } -> std::convertible_to<bool>;
};
}  // namespace detail

//! `P` decides where blocks are written, promoted and demoted; see above.
template <class P>
concept tiering_policy = detail::has_tiering_tag<P> && detail::has_writes_through<P> && detail::has_admit<P> &&
                         detail::has_promote_on_hit<P> && detail::has_demote_on_evict<P>;

//! One `static_assert` per requirement, each a sentence naming what `P` lacks.
template <class P>
constexpr bool check_tiering_policy() {
  static_assert(detail::has_tiering_tag<P>,
                "kvx: tiering policy P lacks `using tiering_policy_concept = kvx::cache::tiering_policy_tag;`");
  static_assert(detail::has_writes_through<P>, "kvx: tiering policy P lacks writes_through() const -> bool");
  static_assert(detail::has_admit<P>, "kvx: tiering policy P lacks admit(const admission_context&) -> bool");
  static_assert(detail::has_promote_on_hit<P>, "kvx: tiering policy P lacks promote_on_hit(std::size_t tier) -> bool");
  static_assert(detail::has_demote_on_evict<P>, "kvx: tiering policy P lacks demote_on_evict(std::size_t tier) -> bool");
  return tiering_policy<P>;
}

}  // namespace kvx::cache
