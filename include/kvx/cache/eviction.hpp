#pragma once
//! \file
//! Umbrella for the eviction side of the cache: the concept, every policy,
//! the type-erased form, the Mooncake trace reader and trace replay.

#include <kvx/cache/eviction/any_eviction_policy.hpp>
#include <kvx/cache/eviction/arc.hpp>
#include <kvx/cache/eviction/belady.hpp>
#include <kvx/cache/eviction/eviction_auto.hpp>
#include <kvx/cache/eviction/lfu.hpp>
#include <kvx/cache/eviction/lru.hpp>
#include <kvx/cache/eviction/prefix_aware.hpp>
#include <kvx/cache/eviction/replay.hpp>
#include <kvx/cache/eviction/reuse_class.hpp>
#include <kvx/cache/eviction/s3fifo.hpp>
#include <kvx/cache/eviction/sieve.hpp>
#include <kvx/cache/eviction_policy.hpp>
#include <kvx/cache/trace.hpp>
