#pragma once
//! \file
//! `kvx::cache::detail::flat_key_map<V, Hash>`: the hash map the cache and the
//! eviction policies index blocks with: Boost's open-addressing
//! `unordered_flat_map` (Boost 1.81 and later), so a lookup among a million
//! blocks costs one cache miss into one array rather than a bucket and a
//! heap node, and inserting or erasing allocates nothing but the array. The
//! array is allocated on transparent huge pages once it reaches 2 MiB, so the
//! probe does not also miss the TLB.
//!
//! Unlike `std::unordered_map`, references and iterators are invalidated by
//! an insertion that grows the table (erasing another element does not
//! invalidate them); no caller keeps one across an insertion.
//!
//! \code
//! kvx::cache::detail::flat_key_map<std::uint32_t> m;
//! m[key] = 7;
//! \endcode

#include <boost/unordered/unordered_flat_map.hpp>

#include <functional>
#include <utility>

#include <kvx/cache/block_key.hpp>
#include <kvx/cache/detail/huge_page_allocator.hpp>

namespace kvx::cache::detail {

template <class V, class Hash = block_key_hash>
using flat_key_map = boost::unordered_flat_map<block_key, V, Hash, std::equal_to<block_key>,
                                              huge_page_allocator<std::pair<const block_key, V>>>;

}  // namespace kvx::cache::detail
