#pragma once
//! \file
//! `kvx::memory::offset_allocator`: best-fit allocation of offsets in
//! `[0, capacity)` with immediate coalescing of freed neighbours.
//!
//! Free ranges are indexed twice, by offset (to coalesce) and by size (to
//! find the best fit), so `allocate` and `deallocate` cost O(log n) in the
//! number of free ranges. Every offset and size is a multiple of the granule
//! (a power of two, default 256 bytes; a file tier using O_DIRECT passes
//! 4096), so requests aligned to at most the granule never pay padding. A
//! request aligned above the granule takes the best fit that holds it after
//! padding; the padding stays free.
//!
//! Thread safety: none (see `kvx/memory/allocator.hpp`).
//!
//! \code
//! kvx::memory::offset_allocator a(64 << 20, 4096);
//! auto x = a.allocate(10000, 4096);  // x->size == 12288
//! a.deallocate(*x);
//! \endcode

#include <cstdint>
#include <iterator>
#include <map>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>

#include <kvx/memory/allocator.hpp>

namespace kvx::memory {

class offset_allocator {
 public:
  using allocator_concept = allocator_tag;

  //! Manages `[0, capacity)` rounded down to a multiple of `granule` (a power of two).
  explicit offset_allocator(std::uint64_t capacity, std::uint64_t granule = 256) : granule_(granule) {
    if (!detail::is_pow2(granule))
      throw std::invalid_argument("kvx: offset_allocator granule " + std::to_string(granule) + " is not a power of two");
    capacity_ = capacity & ~(granule - 1);
    if (capacity_ > 0) insert_free(0, capacity_);
    free_bytes_ = capacity_;
  }

  [[nodiscard]] std::optional<allocation> allocate(std::uint64_t size, std::uint64_t align = 1) {
    if (size == 0) throw std::invalid_argument("kvx: offset_allocator::allocate of 0 bytes");
    if (!detail::is_pow2(align))
      throw std::invalid_argument("kvx: offset_allocator::allocate alignment " + std::to_string(align) +
                                  " is not a power of two");
    if (size > capacity_) return std::nullopt;
    const std::uint64_t need = detail::align_up(size, granule_);
    const std::uint64_t a = align > granule_ ? align : granule_;
    auto it = by_size_.lower_bound({need, 0});
    // Over-aligned requests: a few best-fit candidates, then the first range
    // large enough to hold any padding (granule-aligned offsets pad at most
    // a - granule), which keeps the search O(log n).
    for (int tries = 0; it != by_size_.end() && tries < 4; ++tries, ++it)
      if (fits(*it, need, a)) return carve(it, need, a);
    if (a > granule_) {
      it = by_size_.lower_bound({need + a - granule_, 0});
      if (it != by_size_.end()) return carve(it, need, a);
    }
    return std::nullopt;
  }

  //! Exactly `[offset, offset + granted_size(size))` if every byte of it is
  //! free; `std::nullopt` if any is taken, it runs past the end, or `offset`
  //! is not a multiple of the granule (no range handed out starts there).
  [[nodiscard]] std::optional<allocation> allocate_at(std::uint64_t offset, std::uint64_t size) {
    if (size == 0) throw std::invalid_argument("kvx: offset_allocator::allocate_at of 0 bytes");
    const std::uint64_t need = detail::align_up(size, granule_);
    if (offset % granule_ != 0 || offset > capacity_ || need > capacity_ - offset || need < size) return std::nullopt;
    auto it = by_offset_.upper_bound(offset);
    if (it == by_offset_.begin()) return std::nullopt;
    --it;  // the free range starting at or before `offset`
    const auto [off, len] = *it;
    if (off + len < offset + need) return std::nullopt;
    by_size_.erase({len, off});
    by_offset_.erase(it);
    if (offset > off) insert_free(off, offset - off);
    if (offset + need < off + len) insert_free(offset + need, off + len - offset - need);
    free_bytes_ -= need;
    return allocation{offset, need};
  }

  void deallocate(const allocation& x) {
    if (x.size == 0 || x.offset % granule_ != 0 || x.size % granule_ != 0 || x.offset > capacity_ ||
        x.size > capacity_ - x.offset)
      throw std::logic_error("kvx: offset_allocator::deallocate of a range it did not hand out: offset " +
                             std::to_string(x.offset) + " size " + std::to_string(x.size));
    std::uint64_t off = x.offset;
    std::uint64_t len = x.size;
    auto next = by_offset_.lower_bound(off);
    if (next != by_offset_.end() && next->first < off + len) double_free(x);
    if (next != by_offset_.begin()) {
      auto prev = std::prev(next);
      if (prev->first + prev->second > off) double_free(x);
      if (prev->first + prev->second == off) {
        off = prev->first;
        len += prev->second;
        erase_free(prev);
      }
    }
    if (next != by_offset_.end() && next->first == x.offset + x.size) {
      len += next->second;
      erase_free(next);
    }
    insert_free(off, len);
    free_bytes_ += x.size;
  }

  [[nodiscard]] std::uint64_t capacity() const noexcept { return capacity_; }
  [[nodiscard]] std::uint64_t free_bytes() const noexcept { return free_bytes_; }
  [[nodiscard]] std::uint64_t largest_free_block() const noexcept {
    return by_size_.empty() ? 0 : by_size_.rbegin()->first;
  }
  [[nodiscard]] std::uint64_t granule() const noexcept { return granule_; }
  //! The size `allocate(n, align)` grants for `align <= granule()`.
  [[nodiscard]] std::uint64_t granted_size(std::uint64_t n) const noexcept { return detail::align_up(n, granule_); }
  //! Number of disjoint free ranges (1 when nothing is allocated): a fragmentation measure.
  [[nodiscard]] std::size_t free_ranges() const noexcept { return by_offset_.size(); }

 private:
  using size_key = std::pair<std::uint64_t, std::uint64_t>;  // (size, offset)

  static bool fits(const size_key& r, std::uint64_t need, std::uint64_t a) noexcept {
    const std::uint64_t start = detail::align_up(r.second, a);
    return start - r.second + need <= r.first;
  }

  allocation carve(std::set<size_key>::iterator it, std::uint64_t need, std::uint64_t a) {
    const auto [len, off] = *it;
    by_size_.erase(it);
    by_offset_.erase(off);
    const std::uint64_t start = detail::align_up(off, a);
    if (start > off) insert_free(off, start - off);
    if (start + need < off + len) insert_free(start + need, off + len - start - need);
    free_bytes_ -= need;
    return {start, need};
  }

  void insert_free(std::uint64_t off, std::uint64_t len) {
    by_offset_.emplace(off, len);
    by_size_.emplace(len, off);
  }
  void erase_free(std::map<std::uint64_t, std::uint64_t>::iterator it) {
    by_size_.erase({it->second, it->first});
    by_offset_.erase(it);
  }
  [[noreturn]] static void double_free(const allocation& x) {
    throw std::logic_error("kvx: offset_allocator::deallocate of a range that is (partly) free: offset " +
                           std::to_string(x.offset) + " size " + std::to_string(x.size));
  }

  std::uint64_t granule_;
  std::uint64_t capacity_ = 0;
  std::uint64_t free_bytes_ = 0;
  std::map<std::uint64_t, std::uint64_t> by_offset_;
  std::set<size_key> by_size_;
};

}  // namespace kvx::memory
