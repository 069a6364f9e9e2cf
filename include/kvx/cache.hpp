#pragma once
//! \file
//! The cache layer: block keys, tiers, eviction and tiering policies,
//! `tiered_cache` and its JSON-configured form. The io_uring file tier has
//! its own header (`kvx/cache/tiers/uring_file_tier.hpp`, target `kvx::uring`).
#include <kvx/cache/any_tiered_cache.hpp>
#include <kvx/cache/block_hasher.hpp>
#include <kvx/cache/block_key.hpp>
#include <kvx/cache/eviction.hpp>
#include <kvx/cache/eviction_policy.hpp>
#include <kvx/cache/tier.hpp>
#include <kvx/cache/tiered_cache.hpp>
#include <kvx/cache/tiering/any_tiering.hpp>
#include <kvx/cache/tiering/second_access_admission.hpp>
#include <kvx/cache/tiering/write_back.hpp>
#include <kvx/cache/tiering/write_through.hpp>
#include <kvx/cache/tiering_policy.hpp>
#include <kvx/cache/tiers/any_tier.hpp>
#include <kvx/cache/tiers/dram_tier.hpp>
#include <kvx/cache/tiers/file_tier.hpp>
#include <kvx/cache/tiers/tier_stack.hpp>
#include <kvx/memory/allocator.hpp>
#include <kvx/memory/offset_allocator.hpp>
#include <kvx/memory/slab_allocator.hpp>
