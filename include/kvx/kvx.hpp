#pragma once
//! \file
//! The dependency-free core of every layer: everything that needs only
//! Boost, nlohmann/json, range-v3 and xxHash. Optional backends have their own
//! headers and targets (`kvx/transport/ucx.hpp` with `kvx::ucx`,
//! `kvx/transport/verbs.hpp` with `kvx::verbs`, `kvx/store/redis_metadata.hpp`
//! with `kvx::redis`, `kvx/cache/tiers/uring_file_tier.hpp` with `kvx::uring`).
//! Including one layer's umbrella (`kvx/transfer.hpp`) compiles faster.
#include <kvx/cache.hpp>
#include <kvx/core.hpp>
#include <kvx/memory.hpp>
#include <kvx/topology.hpp>
#include <kvx/transfer.hpp>
#include <kvx/transport.hpp>
