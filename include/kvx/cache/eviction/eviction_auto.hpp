#pragma once
//! \file
//! `kvx::cache::eviction::eviction_auto`: the default eviction policy, the
//! best online policy measured on chat traces (docs/benchmarks/cache-eviction.md)
//! and never worse than LRU there. Today: `reuse_class`.
//!
//! \code
//! kvx::cache::eviction::eviction_auto p(10'000);
//! \endcode

#include <kvx/cache/eviction/reuse_class.hpp>

namespace kvx::cache::eviction {

using eviction_auto = reuse_class;

}  // namespace kvx::cache::eviction
