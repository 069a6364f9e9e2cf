#pragma once
//! \file
//! `tiering::write_through`: an insert stores the block into every tier at
//! once, so eviction from an upper tier never copies (the lower copy is
//! already there) and a crash of the upper tier's process loses nothing the
//! lower tier holds. Costs lower-tier write bandwidth for every insert. Hits
//! in lower tiers are promoted to tier 0.
//!
//! Thread safety: stateless.

#include <cstddef>

#include <kvx/cache/tiering_policy.hpp>

namespace kvx::cache::tiering {

struct write_through {
  using tiering_policy_concept = tiering_policy_tag;
  [[nodiscard]] bool writes_through() const noexcept { return true; }
  [[nodiscard]] bool admit(const admission_context&) noexcept { return true; }
  [[nodiscard]] bool promote_on_hit(std::size_t) noexcept { return true; }
  //! Evicted blocks are dropped from the tier; the copy below stays.
  [[nodiscard]] bool demote_on_evict(std::size_t) noexcept { return true; }
};

}  // namespace kvx::cache::tiering
