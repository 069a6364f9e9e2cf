#pragma once
//! \file
//! `mapped_arena`: an anonymous private mapping, pre-faulted when created
//! (MAP_POPULATE, then a touch of every page in case the kernel skipped
//! some), optionally backed by huge pages. On the virtual machines kvx is
//! tested on, the first write into fresh memory costs about 2.9 ms per MiB —
//! more than moving the bytes — so pool memory pays it once, here, and never
//! inside a transfer.
//!
//! \code
//! auto arena = kvx::memory::mapped_arena::create(1 << 30);   // result<mapped_arena>
//! engine.async_register_memory(arena->region(), "node-0/pool", token);
//! \endcode

#include <sys/mman.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>

#include <kvx/core/result.hpp>
#include <kvx/memory/memory_region.hpp>

namespace kvx::memory {

class mapped_arena {
 public:
  //! Maps and pre-faults `bytes`; with `huge_pages`, tries MAP_HUGETLB first
  //! and falls back to normal pages when none are reserved.
  static result<mapped_arena> create(std::size_t bytes, bool huge_pages = false) {
    if (bytes == 0) return error{errc::invalid_argument, "mapped_arena of 0 bytes"};
    void* p = MAP_FAILED;
    if (huge_pages) p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE | MAP_HUGETLB, -1, 0);
    if (p == MAP_FAILED) p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (p == MAP_FAILED)
      return error{errc::capacity_exceeded, "mmap of " + std::to_string(bytes) + " bytes: " + std::strerror(errno)};
    // MAP_POPULATE is best effort; one write per page guarantees the faults happen now.
    auto* bytes_ptr = static_cast<volatile char*>(p);
    for (std::size_t off = 0; off < bytes; off += 4096) bytes_ptr[off] = 0;
    return mapped_arena(p, bytes);
  }

  mapped_arena(mapped_arena&& o) noexcept : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  mapped_arena& operator=(mapped_arena&& o) noexcept {
    if (this != &o) {
      release();
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }
  mapped_arena(const mapped_arena&) = delete;
  mapped_arena& operator=(const mapped_arena&) = delete;
  ~mapped_arena() { release(); }

  [[nodiscard]] std::byte* data() const noexcept { return static_cast<std::byte*>(data_); }
  [[nodiscard]] std::size_t size() const noexcept { return size_; }
  [[nodiscard]] memory_region region() const noexcept { return {data_, size_, location::host()}; }

 private:
  mapped_arena(void* p, std::size_t n) : data_(p), size_(n) {}
  void release() noexcept {
    if (data_) ::munmap(data_, size_);
    data_ = nullptr;
  }
  void* data_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace kvx::memory
