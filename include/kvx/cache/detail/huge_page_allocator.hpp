#pragma once
//! \file
//! `kvx::cache::detail::huge_page_allocator<T>`: an allocator that asks the
//! kernel for transparent huge pages on large arrays (2 MiB or more), so that
//! random probes into a hash table of a million blocks do not also miss the
//! TLB on every access (Debian's default THP mode is `madvise`: only ranges
//! that ask get huge pages). Smaller requests go to `std::allocator`.
//!
//! Stateless; all instances compare equal. Thread-safe as `std::allocator`.
//!
//! \code
//! std::vector<int, kvx::cache::detail::huge_page_allocator<int>> v(1 << 20);
//! \endcode

#include <sys/mman.h>

#include <cstddef>
#include <cstdlib>
#include <memory>
#include <new>

namespace kvx::cache::detail {

inline constexpr std::size_t huge_page_bytes = std::size_t{2} << 20;

template <class T>
struct huge_page_allocator {
  using value_type = T;

  huge_page_allocator() noexcept = default;
  template <class U>
  huge_page_allocator(const huge_page_allocator<U>&) noexcept {}

  [[nodiscard]] T* allocate(std::size_t n) {
    if (n > SIZE_MAX / sizeof(T)) throw std::bad_array_new_length();
    const std::size_t bytes = n * sizeof(T);
    if (bytes < huge_page_bytes) return std::allocator<T>{}.allocate(n);
    const std::size_t rounded = (bytes + huge_page_bytes - 1) / huge_page_bytes * huge_page_bytes;
    void* p = std::aligned_alloc(huge_page_bytes, rounded);
    if (p == nullptr) throw std::bad_alloc();
    (void)::madvise(p, rounded, MADV_HUGEPAGE);  // a hint: without THP the pages stay small
    return static_cast<T*>(p);
  }
  void deallocate(T* p, std::size_t n) noexcept {
    if (n * sizeof(T) < huge_page_bytes)
      std::allocator<T>{}.deallocate(p, n);
    else
      std::free(p);
  }

  template <class U>
  friend bool operator==(const huge_page_allocator&, const huge_page_allocator<U>&) noexcept {
    return true;
  }
};

}  // namespace kvx::cache::detail
