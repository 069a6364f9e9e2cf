#pragma once
//! \file
//! `end_before`: the batch deadline of a store transfer bounded by a
//! master's lease or deadline (a put's lease, a get's read lease, a
//! re-replication copy's deadline). Past it the master may give the range to
//! another object, so the transfer must be over `margin` earlier: bytes a
//! transport sent before a deadline cancelled it may still land that late.

#include <algorithm>
#include <optional>

#include <kvx/store/types.hpp>
#include <kvx/transfer/batch.hpp>

namespace kvx::store::detail {

//! Sets `b.deadline` so the transfer ends `margin` before `until` (on this
//! host's clock; `time_point::max()`: no bound) and no later than
//! `engine_default` (the engine's own batch deadline, if any). False when no
//! time is left: the transfer must not start.
inline bool end_before(transfer::batch& b, clock::time_point until, clock::duration margin,
                       std::optional<clock::duration> engine_default, clock::time_point now = clock::now()) {
  auto left = until == clock::time_point::max() ? clock::duration::max() : until - margin - now;
  if (engine_default) left = std::min(left, *engine_default);
  if (left <= clock::duration::zero()) return false;
  if (left != clock::duration::max()) b.deadline = left;
  return true;
}

}  // namespace kvx::store::detail
