#pragma once
//! \file
//! `kvx::memory::slab_allocator`: fixed size classes carved from equal slabs.
//!
//! `[0, capacity)` is cut into slabs of `slab_bytes`; a free slab is given to
//! a size class on demand and cut into objects of that class; a slab whose
//! objects are all free goes back to the free-slab pool, so one class's burst
//! does not strand memory forever. Every operation is O(1) (amortized over
//! the classes, a fixed small number). The grant is the class size, so KV
//! blocks of a few fixed shapes waste nothing, and external fragmentation is
//! bounded to one partly used slab per class.
//!
//! Default classes: powers of two from 4 KiB to 1 MiB in 1 MiB slabs.
//!
//! Thread safety: none (see `kvx/memory/allocator.hpp`).
//!
//! \code
//! kvx::memory::slab_allocator a(256 << 20, {.slab_bytes = 2 << 20, .classes = {64 << 10, 2 << 20}});
//! auto x = a.allocate(60000, 4096);  // x->size == 64 KiB
//! \endcode

#include <algorithm>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <kvx/memory/allocator.hpp>

namespace kvx::memory {

//! Slab geometry. Each class must be positive and no larger than
//! `slab_bytes`; classes are sorted on construction.
struct slab_config {
  std::uint64_t slab_bytes = 1ULL << 20;
  std::vector<std::uint64_t> classes = {4ULL << 10,   8ULL << 10,   16ULL << 10,  32ULL << 10,
                                        64ULL << 10,  128ULL << 10, 256ULL << 10, 512ULL << 10,
                                        1ULL << 20};
};

class slab_allocator {
 public:
  using allocator_concept = allocator_tag;

  explicit slab_allocator(std::uint64_t capacity) : slab_allocator(capacity, slab_config{}) {}
  slab_allocator(std::uint64_t capacity, slab_config cfg) : slab_bytes_(cfg.slab_bytes), classes_(std::move(cfg.classes)) {
    if (slab_bytes_ == 0) throw std::invalid_argument("kvx: slab_allocator slab_bytes is 0");
    if (classes_.empty()) throw std::invalid_argument("kvx: slab_allocator needs at least one size class");
    std::sort(classes_.begin(), classes_.end());
    classes_.erase(std::unique(classes_.begin(), classes_.end()), classes_.end());
    for (auto c : classes_)
      if (c == 0 || c > slab_bytes_)
        throw std::invalid_argument("kvx: slab_allocator size class " + std::to_string(c) + " is 0 or larger than slab_bytes " +
                                    std::to_string(slab_bytes_));
    if (capacity < slab_bytes_)
      throw std::invalid_argument("kvx: slab_allocator capacity " + std::to_string(capacity) + " is below one slab of " +
                                  std::to_string(slab_bytes_) + " bytes");
    slabs_.resize(capacity / slab_bytes_);
    capacity_ = slabs_.size() * slab_bytes_;
    free_bytes_ = capacity_;
    for (std::size_t s = slabs_.size(); s-- > 0;) free_slabs_.push_back(static_cast<std::uint32_t>(s));
    partial_.resize(classes_.size());
  }

  [[nodiscard]] std::optional<allocation> allocate(std::uint64_t size, std::uint64_t align = 1) {
    if (size == 0) throw std::invalid_argument("kvx: slab_allocator::allocate of 0 bytes");
    if (!detail::is_pow2(align))
      throw std::invalid_argument("kvx: slab_allocator::allocate alignment " + std::to_string(align) +
                                  " is not a power of two");
    if (slab_bytes_ % align != 0) return std::nullopt;
    std::size_t first = classes_.size();
    for (std::size_t c = 0; c < classes_.size(); ++c)
      if (classes_[c] >= size && classes_[c] % align == 0) {
        first = c;
        break;
      }
    if (first == classes_.size()) return std::nullopt;
    if (!partial_[first].empty()) return take(first);
    if (!free_slabs_.empty()) {
      open_slab(first);
      return take(first);
    }
    // No free slab: a larger class's partly used slab still satisfies the request.
    for (std::size_t c = first + 1; c < classes_.size(); ++c)
      if (classes_[c] % align == 0 && !partial_[c].empty()) return take(c);
    return std::nullopt;
  }

  void deallocate(const allocation& x) {
    const std::uint64_t s = x.offset / slab_bytes_;
    if (s >= slabs_.size() || slabs_[s].cls < 0) bad_free(x);
    slab& sl = slabs_[s];
    const std::uint64_t cls_size = classes_[static_cast<std::size_t>(sl.cls)];
    const std::uint64_t in = x.offset - s * slab_bytes_;
    if (x.size != cls_size || in % cls_size != 0) bad_free(x);
    const auto obj = static_cast<std::uint32_t>(in / cls_size);
    if (!sl.used_mask[obj]) bad_free(x);
    sl.used_mask[obj] = false;
    sl.free_objs.push_back(obj);
    --sl.used;
    free_bytes_ += cls_size;
    auto& part = partial_[static_cast<std::size_t>(sl.cls)];
    if (sl.used == 0) {
      if (sl.in_partial) remove_partial(part, static_cast<std::uint32_t>(s));
      sl = slab{};
      free_slabs_.push_back(static_cast<std::uint32_t>(s));
    } else if (!sl.in_partial) {
      sl.in_partial = true;
      sl.partial_pos = part.size();
      part.push_back(static_cast<std::uint32_t>(s));
    }
  }

  [[nodiscard]] std::uint64_t capacity() const noexcept { return capacity_; }
  [[nodiscard]] std::uint64_t free_bytes() const noexcept { return free_bytes_; }
  [[nodiscard]] std::uint64_t largest_free_block() const noexcept {
    if (!free_slabs_.empty()) return classes_.back();
    for (std::size_t c = classes_.size(); c-- > 0;)
      if (!partial_[c].empty()) return classes_[c];
    return 0;
  }
  [[nodiscard]] std::uint64_t slab_bytes() const noexcept { return slab_bytes_; }
  //! The class size `allocate(n, 1)` grants first; UINT64_MAX above the
  //! largest class, which is never granted (so a tier's footprint of such a
  //! block exceeds any capacity).
  [[nodiscard]] std::uint64_t granted_size(std::uint64_t n) const noexcept {
    auto it = std::lower_bound(classes_.begin(), classes_.end(), n);
    return it == classes_.end() ? UINT64_MAX : *it;
  }
  [[nodiscard]] const std::vector<std::uint64_t>& classes() const noexcept { return classes_; }
  [[nodiscard]] std::size_t free_slabs() const noexcept { return free_slabs_.size(); }

 private:
  struct slab {
    int cls = -1;
    std::uint32_t used = 0;
    bool in_partial = false;
    std::size_t partial_pos = 0;
    std::vector<std::uint32_t> free_objs;
    std::vector<bool> used_mask;
  };

  void open_slab(std::size_t c) {
    const std::uint32_t s = free_slabs_.back();
    free_slabs_.pop_back();
    slab& sl = slabs_[s];
    const auto n = static_cast<std::uint32_t>(slab_bytes_ / classes_[c]);
    sl.cls = static_cast<int>(c);
    sl.used = 0;
    sl.free_objs.resize(n);
    for (std::uint32_t i = 0; i < n; ++i) sl.free_objs[i] = n - 1 - i;  // hand out low offsets first
    sl.used_mask.assign(n, false);
    sl.in_partial = true;
    sl.partial_pos = partial_[c].size();
    partial_[c].push_back(s);
  }

  allocation take(std::size_t c) {
    auto& part = partial_[c];
    const std::uint32_t s = part.back();
    slab& sl = slabs_[s];
    const std::uint32_t obj = sl.free_objs.back();
    sl.free_objs.pop_back();
    sl.used_mask[obj] = true;
    ++sl.used;
    if (sl.free_objs.empty()) remove_partial(part, s);
    free_bytes_ -= classes_[c];
    return {s * slab_bytes_ + obj * classes_[c], classes_[c]};
  }

  void remove_partial(std::vector<std::uint32_t>& part, std::uint32_t s) {
    slab& sl = slabs_[s];
    const std::size_t pos = sl.partial_pos;
    part[pos] = part.back();
    slabs_[part[pos]].partial_pos = pos;
    part.pop_back();
    sl.in_partial = false;
  }

  [[noreturn]] static void bad_free(const allocation& x) {
    throw std::logic_error("kvx: slab_allocator::deallocate of a range it did not hand out (or freed twice): offset " +
                           std::to_string(x.offset) + " size " + std::to_string(x.size));
  }

  std::uint64_t slab_bytes_;
  std::vector<std::uint64_t> classes_;
  std::uint64_t capacity_ = 0;
  std::uint64_t free_bytes_ = 0;
  std::vector<slab> slabs_;
  std::vector<std::uint32_t> free_slabs_;
  std::vector<std::vector<std::uint32_t>> partial_;
};

}  // namespace kvx::memory
