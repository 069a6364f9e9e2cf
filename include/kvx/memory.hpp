#pragma once
//! \file
//! The memory layer: regions, segments, allocators, pre-faulted arenas.
#include <kvx/memory/allocator.hpp>
#include <kvx/memory/mapped_arena.hpp>
#include <kvx/memory/memory_region.hpp>
#include <kvx/memory/offset_allocator.hpp>
#include <kvx/memory/segment.hpp>
#include <kvx/memory/segment_table.hpp>
#include <kvx/memory/slab_allocator.hpp>
