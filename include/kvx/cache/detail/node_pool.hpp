#pragma once
//! \file
//! `kvx::cache::detail::pool_allocator<T>`: an allocator for node-based
//! containers (`std::list`) whose nodes are reached at random, as an eviction
//! policy's list tails are: single nodes come from a shared `node_pool`,
//! fixed-size slots carved from chunks that double from 16 KiB to 2 MiB (those
//! on transparent huge pages) and are recycled through a free list, so a node access misses neither the heap's
//! scattered small pages in the TLB nor the allocator's bookkeeping. Other
//! requests go to `std::allocator`.
//!
//! Allocators compare equal when they share a pool (so lists sharing one can
//! splice); the pool lives as long as an allocator refers to it. Not
//! thread-safe: one owner serializes every container using the pool.
//!
//! \code
//! auto pool = std::make_shared<kvx::cache::detail::node_pool>(64);
//! std::list<int, kvx::cache::detail::pool_allocator<int>> a{pool_allocator<int>(pool)}, b{...(pool)};
//! \endcode

#include <algorithm>
#include <cstddef>
#include <memory>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

#include <kvx/cache/detail/huge_page_allocator.hpp>

namespace kvx::cache::detail {

class node_pool {
 public:
  static constexpr std::size_t align = alignof(std::max_align_t);

  //! Slots of at least `slot_bytes` (rounded up to `align`).
  explicit node_pool(std::size_t slot_bytes)
      : slot_((std::max(slot_bytes, sizeof(void*)) + align - 1) / align * align) {}
  node_pool(const node_pool&) = delete;
  node_pool& operator=(const node_pool&) = delete;
  ~node_pool() {
    for (auto [c, n] : chunks_) huge_page_allocator<std::byte>{}.deallocate(c, n);
  }

  [[nodiscard]] std::size_t slot_bytes() const noexcept { return slot_; }

  [[nodiscard]] void* allocate() {
    if (free_ != nullptr) return std::exchange(free_, *static_cast<void**>(free_));
    if (next_ == end_) {
      const std::size_t n = std::max(chunk_bytes_, slot_);
      chunks_.reserve(chunks_.size() + 1);
      std::byte* c = huge_page_allocator<std::byte>{}.allocate(n);
      chunks_.emplace_back(c, n);
      chunk_bytes_ = std::min(2 * chunk_bytes_, huge_page_bytes);
      next_ = c;
      end_ = c + n / slot_ * slot_;
    }
    return std::exchange(next_, next_ + slot_);
  }
  void deallocate(void* p) noexcept {
    *static_cast<void**>(p) = free_;
    free_ = p;
  }

 private:
  std::size_t slot_;
  std::size_t chunk_bytes_ = 16 << 10;  // the next chunk's size
  std::vector<std::pair<std::byte*, std::size_t>> chunks_;
  void* free_ = nullptr;       // freed slots, linked through their first word
  std::byte* next_ = nullptr;  // the current chunk's unused tail
  std::byte* end_ = nullptr;
};

template <class T>
struct pool_allocator {
  using value_type = T;
  using propagate_on_container_move_assignment = std::true_type;
  using propagate_on_container_swap = std::true_type;

  explicit pool_allocator(std::shared_ptr<node_pool> p) noexcept : pool(std::move(p)) {}
  template <class U>
  pool_allocator(const pool_allocator<U>& o) noexcept : pool(o.pool) {}

  [[nodiscard]] T* allocate(std::size_t n) {
    if (pooled(n)) return static_cast<T*>(pool->allocate());
    return std::allocator<T>{}.allocate(n);
  }
  void deallocate(T* p, std::size_t n) noexcept {
    if (pooled(n))
      pool->deallocate(p);
    else
      std::allocator<T>{}.deallocate(p, n);
  }

  template <class U>
  friend bool operator==(const pool_allocator& a, const pool_allocator<U>& b) noexcept {
    return a.pool == b.pool;
  }

  std::shared_ptr<node_pool> pool;

 private:
  [[nodiscard]] bool pooled(std::size_t n) const noexcept {
    return n == 1 && sizeof(T) <= pool->slot_bytes() && alignof(T) <= node_pool::align;
  }
};

}  // namespace kvx::cache::detail
