#pragma once
//! \file
//! Device memory exported as a Linux dma-buf, so that a NIC can DMA straight
//! into it: `ibv_reg_dmabuf_mr` registers the fd (GPUDirect RDMA without the
//! `nvidia-peermem` module). The verbs transport calls this for CUDA segments
//! when it is built with `kvx::cuda`.
//!
//! `export_dmabuf(ptr, length)` widens `[ptr, ptr + length)` to host pages
//! (the driver exports page-aligned ranges only), exports that range with
//! `cuMemGetHandleForAddressRange(CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD)` (the
//! driver API, reached through the runtime's entry-point query so nothing
//! links libcuda) and returns the fd with the offset of `ptr` inside it.
//! Needs memory from `cudaMalloc`/`cuMemAlloc` (or fully mapped VMM ranges)
//! on a device and driver with `CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED`
//! (CUDA 11.7+, the open kernel modules); otherwise `not_supported`, saying so.
//!
//! \code
//! auto buf = kvx::cuda::export_dmabuf(kv_blocks, bytes);
//! KVX_TRY(buf);
//! ibv_reg_dmabuf_mr(pd, buf->offset(), bytes, reinterpret_cast<std::uint64_t>(kv_blocks), buf->fd(), access);
//! \endcode   (the fd may be closed once the MR exists: `buf` closes it)

#include <unistd.h>

#include <cuda.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>

#include <kvx/core/error.hpp>
#include <kvx/core/result.hpp>
#include <kvx/cuda/driver_entry.hpp>

namespace kvx::cuda {

//! An exported dma-buf: owns the fd (closed on destruction), move-only.
class dmabuf {
 public:
  dmabuf() = default;
  dmabuf(int fd, std::uint64_t offset, std::size_t length) noexcept : fd_(fd), offset_(offset), length_(length) {}
  dmabuf(dmabuf&& o) noexcept
      : fd_(std::exchange(o.fd_, -1)), offset_(std::exchange(o.offset_, 0)), length_(std::exchange(o.length_, 0)) {}
  dmabuf& operator=(dmabuf&& o) noexcept {
    if (this != &o) {
      reset();
      fd_ = std::exchange(o.fd_, -1);
      offset_ = std::exchange(o.offset_, 0);
      length_ = std::exchange(o.length_, 0);
    }
    return *this;
  }
  dmabuf(const dmabuf&) = delete;
  dmabuf& operator=(const dmabuf&) = delete;
  ~dmabuf() { reset(); }

  //! The dma-buf file descriptor (-1 when empty).
  [[nodiscard]] int fd() const noexcept { return fd_; }
  //! Where the exported pointer sits inside the dma-buf.
  [[nodiscard]] std::uint64_t offset() const noexcept { return offset_; }
  //! Bytes the dma-buf spans (whole host pages).
  [[nodiscard]] std::size_t length() const noexcept { return length_; }

 private:
  void reset() noexcept {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }
  int fd_ = -1;
  std::uint64_t offset_ = 0;
  std::size_t length_ = 0;
};

namespace detail {
// The page-aligned range holding [p, p + n): (first byte, bytes, offset of p in it).
struct page_span {
  std::uintptr_t begin = 0;
  std::size_t length = 0;
  std::uint64_t offset = 0;
};
inline result<page_span> page_span_of(std::uintptr_t p, std::size_t n, std::size_t page) {
  if (p == 0 || n == 0) return kvx::error{errc::invalid_argument, "dma-buf export of an empty range"};
  if (page == 0 || (page & (page - 1)) != 0) return kvx::error{errc::internal, "host page size is not a power of two"};
  if (p + n < p || p + n > UINTPTR_MAX - page) return kvx::error{errc::out_of_range, "dma-buf export range wraps around"};
  const std::uintptr_t begin = p & ~(std::uintptr_t{page} - 1);
  const std::uintptr_t end = (p + n + page - 1) & ~(std::uintptr_t{page} - 1);
  return page_span{begin, static_cast<std::size_t>(end - begin), static_cast<std::uint64_t>(p - begin)};
}
}  // namespace detail

//! Exports the device memory holding `[ptr, ptr + length)` as a dma-buf (see the file comment).
inline result<dmabuf> export_dmabuf(const void* ptr, std::size_t length) {
  const long page = ::sysconf(_SC_PAGESIZE);
  auto span = detail::page_span_of(reinterpret_cast<std::uintptr_t>(ptr), length, page > 0 ? static_cast<std::size_t>(page) : 4096);
  KVX_TRY(span);
  using get_handle_fn = CUresult (*)(void*, CUdeviceptr, std::size_t, CUmemRangeHandleType, unsigned long long);
  static const auto fn = driver_entry<get_handle_fn>("cuMemGetHandleForAddressRange", 11070);
  if (!fn)
    return kvx::error{errc::not_supported, "dma-buf export: the CUDA driver has no cuMemGetHandleForAddressRange (needs 11.7+)"};
  int fd = -1;
  const CUresult r = fn(&fd, static_cast<CUdeviceptr>(span->begin), span->length, CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD, 0);
  if (r != CUDA_SUCCESS || fd < 0) {
    const std::string what = "dma-buf export of " + std::to_string(span->length) +
                             " bytes of device memory: cuMemGetHandleForAddressRange returned " +
                             std::to_string(static_cast<int>(r));
    if (r == CUDA_ERROR_NOT_SUPPORTED)
      return kvx::error{errc::not_supported, what + " (CUDA_ERROR_NOT_SUPPORTED: the device or driver lacks dma-buf "
                                                    "support; it needs the open kernel modules)"};
    return kvx::error{errc::invalid_argument, what + " (not memory from cudaMalloc, or a range not fully mapped)"};
  }
  return dmabuf(fd, span->offset, span->length);
}

}  // namespace kvx::cuda
