#pragma once
//! \file
//! `tiering::write_back`: new blocks go to tier 0 only; a block evicted from
//! a tier moves down one tier (written back) instead of being dropped; a hit
//! in a lower tier is copied back up to tier 0. The default
//! (`tiering::tiering_auto`): lower tiers see only what the upper tier could
//! not keep, so their write bandwidth goes to blocks that were worth caching.
//!
//! Thread safety: stateless.
//!
//! \code
//! using cache = kvx::cache::tiered_cache<kvx::cache::tier_stack<dram, ssd>, kvx::cache::eviction::lru,
//!                                        kvx::cache::tiering::write_back>;
//! \endcode

#include <cstddef>

#include <kvx/cache/tiering_policy.hpp>

namespace kvx::cache::tiering {

struct write_back {
  using tiering_policy_concept = tiering_policy_tag;
  [[nodiscard]] bool writes_through() const noexcept { return false; }
  [[nodiscard]] bool admit(const admission_context&) noexcept { return true; }
  [[nodiscard]] bool promote_on_hit(std::size_t) noexcept { return true; }
  [[nodiscard]] bool demote_on_evict(std::size_t) noexcept { return true; }
};

//! The default tiering policy.
using tiering_auto = write_back;

}  // namespace kvx::cache::tiering
