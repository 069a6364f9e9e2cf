#include <kvx/cuda/dmabuf.hpp>

#include <gtest/gtest.h>

#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <vector>

#include <kvx/cuda/device.hpp>

// Exporting device memory as a dma-buf for ibv_reg_dmabuf_mr. The page
// arithmetic and the refusals run everywhere; the export itself needs a GPU
// whose driver supports dma-buf and skips with the reason otherwise.
namespace {

using kvx::errc;
using kvx::cuda::detail::page_span_of;

TEST(CudaDmabuf, WidensTheRangeToWholeHostPages) {
  auto inside = page_span_of(0x10000 + 100, 1000, 4096);
  ASSERT_TRUE(inside) << inside.error().message();
  EXPECT_EQ(inside->begin, 0x10000u);
  EXPECT_EQ(inside->length, 4096u);
  EXPECT_EQ(inside->offset, 100u);
  auto crossing = page_span_of(0x10ff0, 0x20, 4096);  // 16 bytes on each side of a page boundary
  ASSERT_TRUE(crossing);
  EXPECT_EQ(crossing->begin, 0x10000u);
  EXPECT_EQ(crossing->length, 8192u);
  EXPECT_EQ(crossing->offset, 0xff0u);
  auto aligned = page_span_of(0x200000, 0x200000, 65536);
  ASSERT_TRUE(aligned);
  EXPECT_EQ(aligned->begin, 0x200000u);
  EXPECT_EQ(aligned->length, 0x200000u);
  EXPECT_EQ(aligned->offset, 0u);
}

TEST(CudaDmabuf, RefusesEmptyWrappingAndOddPageSizes) {
  EXPECT_EQ(page_span_of(0x1000, 0, 4096).code(), errc::invalid_argument);
  EXPECT_EQ(page_span_of(0, 64, 4096).code(), errc::invalid_argument);
  EXPECT_EQ(page_span_of(UINTPTR_MAX - 10, 64, 4096).code(), errc::out_of_range);
  EXPECT_EQ(page_span_of(UINTPTR_MAX - 4000, 64, 4096).code(), errc::out_of_range) << "the page round-up would wrap";
  EXPECT_EQ(page_span_of(0x1000, 64, 3000).code(), errc::internal);
  EXPECT_EQ(kvx::cuda::export_dmabuf(nullptr, 64).code(), errc::invalid_argument);
}

TEST(CudaDmabuf, HostMemoryIsNotExported) {
  std::vector<std::byte> host(8192);
  auto buf = kvx::cuda::export_dmabuf(host.data(), host.size());
  ASSERT_FALSE(buf) << "exported host memory as a device dma-buf";
  // No driver: the entry point is missing (not_supported); a driver refuses the address.
  EXPECT_TRUE(buf.code() == errc::not_supported || buf.code() == errc::invalid_argument) << buf.error().message();
  EXPECT_NE(buf.error().message().find("dma-buf export"), std::string::npos) << buf.error().message();
}

TEST(CudaDmabuf, ExportsDeviceMemoryAndClosesTheFd) {
  if (kvx::cuda::device_count() == 0) GTEST_SKIP() << kvx::cuda::skip_reason();
  void* dev = nullptr;
  ASSERT_EQ(cudaMalloc(&dev, 2u << 20), cudaSuccess);
  int fd = -1;
  {
    auto buf = kvx::cuda::export_dmabuf(static_cast<std::byte*>(dev) + 4096 + 100, 1000);
    if (!buf && buf.code() == errc::not_supported) {
      cudaFree(dev);
      GTEST_SKIP() << buf.error().message();
    }
    ASSERT_TRUE(buf) << buf.error().message();
    fd = buf->fd();
    EXPECT_GE(fd, 0);
    EXPECT_EQ(buf->offset(), 100u);
    EXPECT_EQ(buf->length() % static_cast<std::size_t>(sysconf(_SC_PAGESIZE)), 0u);
    EXPECT_GE(buf->length(), 1100u);
    EXPECT_GE(::lseek(fd, 0, SEEK_END), static_cast<off_t>(buf->length())) << "a dma-buf's size is what it spans";
    struct stat st{};
    EXPECT_EQ(::fstat(fd, &st), 0);
    auto moved = std::move(*buf);
    EXPECT_EQ(buf->fd(), -1);
    EXPECT_EQ(moved.fd(), fd);
  }
  struct stat st{};
  EXPECT_EQ(::fstat(fd, &st), -1) << "the fd was closed with its owner";
  EXPECT_EQ(cudaFree(dev), cudaSuccess);
}

}  // namespace
