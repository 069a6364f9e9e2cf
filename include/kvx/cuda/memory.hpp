#pragma once
//! \file
//! GPU and pinned host memory as `memory_region`s, and a pool that carves one
//! device allocation into blocks.
//!
//! - `device_buffer`: `cudaMalloc` on device N; its region's location is
//!   `cuda:N`, which makes the transfer engine choose a transport that can
//!   touch device memory (`cuda_ipc`, `ucx` with CUDA support).
//! - `pinned_buffer`: `cudaHostAlloc` (portable: pinned for every device);
//!   host-located, so every host transport can use it too. DMA to and from it
//!   runs at link speed; pageable memory goes through the driver's staging.
//! - `host_registration`: pins memory someone else allocated (a shm arena, a
//!   store segment) with `cudaHostRegister` for the same effect.
//! - `device_pool<Allocator>`: one `device_buffer` carved by any
//!   `kvx::memory::allocator` (offset by default); what a GPU tier or a GPU
//!   pool segment is made of. Thread-safe.
//!
//! All are move-only and free their memory on destruction (deregister regions
//! from transports first). Errors: `errc::capacity_exceeded` when the device
//! is out of memory or the pool is full, `errc::not_supported` without a
//! driver or device.
//!
//! \code
//! auto gpu = kvx::cuda::device_buffer::allocate(64 << 20, /*device=*/0).value();
//! auto seg = table.add("kv", gpu.region());       // location cuda:0
//! auto host = kvx::cuda::pinned_buffer::allocate(64 << 20).value();
//! \endcode

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <utility>

#include <kvx/cuda/device.hpp>
#include <kvx/cuda/error.hpp>
#include <kvx/memory/allocator.hpp>
#include <kvx/memory/memory_region.hpp>
#include <kvx/memory/offset_allocator.hpp>

namespace kvx::cuda {

//! Device memory from `cudaMalloc`. Move-only.
class device_buffer {
 public:
  device_buffer() = default;
  //! `bytes` on device `ordinal`; `errc::capacity_exceeded` when it does not fit.
  static result<device_buffer> allocate(std::size_t bytes, int ordinal = 0) {
    if (bytes == 0) return kvx::error{errc::invalid_argument, "device_buffer: size 0"};
    device_guard on(ordinal);
    void* p = nullptr;
    const auto status = cudaMalloc(&p, bytes);
    if (status != cudaSuccess) {
      (void)cudaGetLastError();
      return make_error(status, "cudaMalloc(" + std::to_string(bytes) + " bytes) on cuda:" + std::to_string(ordinal));
    }
    return device_buffer(p, bytes, ordinal);
  }
  device_buffer(device_buffer&& o) noexcept
      : ptr_(std::exchange(o.ptr_, nullptr)), size_(std::exchange(o.size_, 0)), device_(o.device_) {}
  device_buffer& operator=(device_buffer&& o) noexcept {
    if (this != &o) {
      release();
      ptr_ = std::exchange(o.ptr_, nullptr);
      size_ = std::exchange(o.size_, 0);
      device_ = o.device_;
    }
    return *this;
  }
  ~device_buffer() { release(); }

  [[nodiscard]] std::byte* data() const noexcept { return static_cast<std::byte*>(ptr_); }
  [[nodiscard]] std::size_t size() const noexcept { return size_; }
  [[nodiscard]] int device() const noexcept { return device_; }
  [[nodiscard]] memory::memory_region region() const noexcept {
    return {ptr_, size_, memory::location::cuda(device_)};
  }

 private:
  device_buffer(void* p, std::size_t n, int d) noexcept : ptr_(p), size_(n), device_(d) {}
  void release() noexcept {
    if (!ptr_) return;
    device_guard on(device_);
    (void)cudaFree(ptr_);
    ptr_ = nullptr;
  }
  void* ptr_ = nullptr;
  std::size_t size_ = 0;
  int device_ = 0;
};

//! Page-locked host memory from `cudaHostAlloc` (portable). Move-only.
class pinned_buffer {
 public:
  pinned_buffer() = default;
  static result<pinned_buffer> allocate(std::size_t bytes) {
    if (bytes == 0) return kvx::error{errc::invalid_argument, "pinned_buffer: size 0"};
    void* p = nullptr;
    const auto status = cudaHostAlloc(&p, bytes, cudaHostAllocPortable);
    if (status != cudaSuccess) {
      (void)cudaGetLastError();
      return make_error(status, "cudaHostAlloc(" + std::to_string(bytes) + " bytes)");
    }
    return pinned_buffer(p, bytes);
  }
  pinned_buffer(pinned_buffer&& o) noexcept : ptr_(std::exchange(o.ptr_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  pinned_buffer& operator=(pinned_buffer&& o) noexcept {
    if (this != &o) {
      release();
      ptr_ = std::exchange(o.ptr_, nullptr);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }
  ~pinned_buffer() { release(); }

  [[nodiscard]] std::byte* data() const noexcept { return static_cast<std::byte*>(ptr_); }
  [[nodiscard]] std::size_t size() const noexcept { return size_; }
  [[nodiscard]] memory::memory_region region() const noexcept { return {ptr_, size_, memory::location::host()}; }

 private:
  pinned_buffer(void* p, std::size_t n) noexcept : ptr_(p), size_(n) {}
  void release() noexcept {
    if (ptr_) (void)cudaFreeHost(ptr_);
    ptr_ = nullptr;
  }
  void* ptr_ = nullptr;
  std::size_t size_ = 0;
};

//! Pins an existing host range (`cudaHostRegister`, portable) until destruction.
class host_registration {
 public:
  host_registration() = default;
  static result<host_registration> pin(const memory::memory_region& r) {
    if (!r.where.is_host_accessible())
      return kvx::error{errc::invalid_argument, "host_registration: region is " + r.where.to_string()};
    if (r.length == 0) return kvx::error{errc::invalid_argument, "host_registration: empty region"};
    const auto status = cudaHostRegister(r.address, r.length, cudaHostRegisterPortable);
    if (status != cudaSuccess) {
      (void)cudaGetLastError();
      return make_error(status, "cudaHostRegister(" + std::to_string(r.length) + " bytes)");
    }
    return host_registration(r.address);
  }
  host_registration(host_registration&& o) noexcept : ptr_(std::exchange(o.ptr_, nullptr)) {}
  host_registration& operator=(host_registration&& o) noexcept {
    if (this != &o) {
      release();
      ptr_ = std::exchange(o.ptr_, nullptr);
    }
    return *this;
  }
  ~host_registration() { release(); }

 private:
  explicit host_registration(void* p) noexcept : ptr_(p) {}
  void release() noexcept {
    if (ptr_) (void)cudaHostUnregister(ptr_);
    ptr_ = nullptr;
  }
  void* ptr_ = nullptr;
};

//! One device allocation carved into blocks by `Allocator`. Thread-safe.
template <memory::allocator Allocator = memory::offset_allocator>
class device_pool {
 public:
  //! A block of the pool: where it is and what to give back.
  struct block {
    memory::memory_region region;
    memory::allocation slot;
  };

  static result<device_pool> create(std::size_t bytes, int ordinal = 0) {
    auto buf = device_buffer::allocate(bytes, ordinal);
    KVX_TRY(buf);
    return device_pool(std::move(*buf));
  }

  device_pool(device_pool&& o) noexcept : buffer_(std::move(o.buffer_)), alloc_(std::move(o.alloc_)) {}

  //! `n` bytes aligned to `align` (a power of two); `errc::capacity_exceeded` when full.
  result<block> allocate(std::uint64_t n, std::uint64_t align = 256) {
    if (n == 0 || !memory::detail::is_pow2(align))
      return kvx::error{errc::invalid_argument, "device_pool: size 0 or alignment not a power of two"};
    std::lock_guard lock(mu_);
    auto a = alloc_.allocate(n, align);
    if (!a)
      return kvx::error{errc::capacity_exceeded, "device_pool on cuda:" + std::to_string(buffer_.device()) + ": no free range of " +
                                                     std::to_string(n) + " bytes (" + std::to_string(alloc_.free_bytes()) + " free)"};
    return block{buffer_.region().subregion(a->offset, n), *a};
  }
  void deallocate(const block& b) {
    std::lock_guard lock(mu_);
    alloc_.deallocate(b.slot);
  }

  [[nodiscard]] memory::memory_region region() const noexcept { return buffer_.region(); }
  [[nodiscard]] std::uint64_t capacity() const noexcept { return buffer_.size(); }
  [[nodiscard]] std::uint64_t free_bytes() const {
    std::lock_guard lock(mu_);
    return alloc_.free_bytes();
  }

 private:
  explicit device_pool(device_buffer b) : buffer_(std::move(b)), alloc_(buffer_.size()) {}
  device_buffer buffer_;
  mutable std::mutex mu_;
  Allocator alloc_;
};

}  // namespace kvx::cuda
