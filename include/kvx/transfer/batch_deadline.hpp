#pragma once
//! \file
//! `end_before`: a batch deadline bounded by a time past which the remote
//! range may belong to someone else (a store put's lease, a get's read
//! lease, a re-replication copy's deadline, a push target's `write_by`).
//! The transfer must be over `margin` earlier: bytes a transport sent
//! before a deadline cancelled it may still land that late.

#include <algorithm>
#include <chrono>
#include <optional>

#include <kvx/transfer/batch.hpp>

namespace kvx::transfer {

//! Sets `b.deadline` so the transfer ends `margin` before `until` (on this
//! host's steady clock; `time_point::max()`: no bound) and no later than
//! `engine_default` (the engine's own batch deadline, if any) or the
//! deadline `b` already has. False when no time is left: the transfer must
//! not start.
inline bool end_before(batch& b, std::chrono::steady_clock::time_point until, std::chrono::steady_clock::duration margin,
                       std::optional<std::chrono::steady_clock::duration> engine_default,
                       std::chrono::steady_clock::time_point now = std::chrono::steady_clock::now()) {
  using duration = std::chrono::steady_clock::duration;
  auto left = until == std::chrono::steady_clock::time_point::max() ? duration::max() : until - margin - now;
  if (engine_default) left = std::min(left, *engine_default);
  if (b.deadline) left = std::min(left, *b.deadline);
  if (left <= duration::zero()) return false;
  if (left != duration::max()) b.deadline = left;
  return true;
}

}  // namespace kvx::transfer
