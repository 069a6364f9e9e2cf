#include <kvx/cuda/event_poller.hpp>
#include <kvx/cuda/memory.hpp>
#include <kvx/cuda/stream.hpp>

#include <gtest/gtest.h>

#include <boost/asio/io_context.hpp>
#include <boost/asio/strand.hpp>

#include <atomic>
#include <optional>
#include <thread>
#include <vector>

#include "support/cuda_pattern.hpp"

namespace {

namespace asio = boost::asio;
using namespace std::chrono_literals;

#define KVX_REQUIRE_GPU()                                                        \
  do {                                                                           \
    if (kvx::cuda::device_count() == 0) GTEST_SKIP() << kvx::cuda::skip_reason(); \
  } while (false)

// ---- no GPU needed ----------------------------------------------------------

TEST(CudaErrors, MapToKvxCodesAndKeepCudasText) {
  EXPECT_EQ(kvx::cuda::errc_of(cudaSuccess), kvx::errc{});
  EXPECT_FALSE(kvx::cuda::error_code_of(cudaSuccess));
  EXPECT_EQ(kvx::cuda::errc_of(cudaErrorMemoryAllocation), kvx::errc::capacity_exceeded);
  EXPECT_EQ(kvx::cuda::errc_of(cudaErrorInvalidValue), kvx::errc::invalid_argument);
  EXPECT_EQ(kvx::cuda::errc_of(cudaErrorNoDevice), kvx::errc::not_supported);
  EXPECT_EQ(kvx::cuda::errc_of(cudaErrorInvalidResourceHandle), kvx::errc::stale);
  EXPECT_EQ(kvx::cuda::errc_of(cudaErrorIllegalAddress), kvx::errc::device_error);
  auto e = kvx::cuda::make_error(cudaErrorIllegalAddress, "gather");
  EXPECT_EQ(e, kvx::errc::device_error);
  EXPECT_NE(e.message().find("gather: cudaErrorIllegalAddress"), std::string::npos) << e.message();
  EXPECT_TRUE(kvx::cuda::check(cudaSuccess, "x"));
  EXPECT_STREQ(kvx::to_string(kvx::errc::device_error), "device_error");
  EXPECT_EQ(kvx::errc_from_string("device_error"), kvx::errc::device_error);
}

TEST(CudaDevices, CountIsZeroWithAReasonOrPositiveWithout) {
  const int n = kvx::cuda::device_count();
  EXPECT_GE(n, 0);
  EXPECT_EQ(n == 0, !kvx::cuda::skip_reason().empty()) << kvx::cuda::skip_reason();
  if (n == 0) {
    auto b = kvx::cuda::device_buffer::allocate(4096, 0);
    ASSERT_FALSE(b);
    EXPECT_EQ(b.code(), kvx::errc::not_supported) << b.error().message();
  }
}

TEST(CudaMemory, ZeroSizesAreInvalidArguments) {
  EXPECT_EQ(kvx::cuda::device_buffer::allocate(0, 0).code(), kvx::errc::invalid_argument);
  EXPECT_EQ(kvx::cuda::pinned_buffer::allocate(0).code(), kvx::errc::invalid_argument);
  std::vector<std::byte> v(16);
  EXPECT_EQ(kvx::cuda::host_registration::pin({v.data(), v.size(), kvx::memory::location::cuda(0)}).code(),
            kvx::errc::invalid_argument);
}

// ---- GPU --------------------------------------------------------------------

TEST(CudaMemoryGpu, BuffersDescribeTheirLocation) {
  KVX_REQUIRE_GPU();
  auto d = kvx::cuda::device_buffer::allocate(1 << 20, 0).value();
  EXPECT_EQ(d.region().where, kvx::memory::location::cuda(0));
  EXPECT_FALSE(d.region().where.is_host_accessible());
  auto p = kvx::cuda::pinned_buffer::allocate(1 << 20).value();
  EXPECT_EQ(p.region().where, kvx::memory::location::host());
  cudaPointerAttributes a{};
  ASSERT_EQ(cudaPointerGetAttributes(&a, p.data()), cudaSuccess);
  EXPECT_EQ(a.type, cudaMemoryTypeHost);
  auto moved = std::move(d);
  EXPECT_EQ(d.data(), nullptr);
  EXPECT_NE(moved.data(), nullptr);
  auto id = kvx::cuda::identify(0).value();
  EXPECT_EQ(id.uuid.size(), 32u);
  EXPECT_EQ(kvx::cuda::ordinal_of(id.uuid).value(), 0);
  EXPECT_EQ(kvx::cuda::ordinal_of("nope").code(), kvx::errc::not_found);
}

TEST(CudaMemoryGpu, HostRegistrationPinsForeignMemory) {
  KVX_REQUIRE_GPU();
  std::vector<std::byte> v(1 << 20);
  {
    auto reg = kvx::cuda::host_registration::pin({v.data(), v.size()});
    ASSERT_TRUE(reg) << reg.error().message();
    cudaPointerAttributes a{};
    ASSERT_EQ(cudaPointerGetAttributes(&a, v.data()), cudaSuccess);
    EXPECT_EQ(a.type, cudaMemoryTypeHost);
    auto twice = kvx::cuda::host_registration::pin({v.data(), v.size()});
    EXPECT_FALSE(twice) << "registering the same range twice is refused by CUDA";
  }
  auto again = kvx::cuda::host_registration::pin({v.data(), v.size()});
  EXPECT_TRUE(again) << "unpinned on destruction";
}

TEST(CudaMemoryGpu, DevicePoolCarvesAndReportsFull) {
  KVX_REQUIRE_GPU();
  auto pool = kvx::cuda::device_pool<>::create(1 << 20, 0).value();
  std::vector<kvx::cuda::device_pool<>::block> blocks;
  for (int i = 0; i < 4; ++i) {
    auto b = pool.allocate(256 << 10);
    ASSERT_TRUE(b) << b.error().message();
    EXPECT_EQ(b->region.where, kvx::memory::location::cuda(0));
    EXPECT_TRUE(pool.region().contains(b->region.address, b->region.length));
    blocks.push_back(*b);
  }
  auto full = pool.allocate(1);
  ASSERT_FALSE(full);
  EXPECT_EQ(full.code(), kvx::errc::capacity_exceeded);
  EXPECT_EQ(pool.allocate(64, 3).code(), kvx::errc::invalid_argument);
  pool.deallocate(blocks[1]);
  EXPECT_TRUE(pool.allocate(256 << 10));
}

TEST(CudaStreamGpu, ManyCopiesInFlightOnSeveralStreamsCompleteIntoTheToken) {
  KVX_REQUIRE_GPU();
  asio::io_context io;
  auto streams = kvx::cuda::stream_pool::create(0, 4).value();
  constexpr std::size_t chunk = 256 << 10, n = 64;
  auto host = kvx::cuda::pinned_buffer::allocate(chunk * n).value();
  auto dev = kvx::cuda::device_buffer::allocate(chunk * n, 0).value();
  auto back = kvx::cuda::pinned_buffer::allocate(chunk * n).value();
  kvx::test::fill_pattern(host.region().bytes(), 5);
  std::atomic<int> up{0}, down{0};
  std::error_code first;
  for (std::size_t i = 0; i < n; ++i) {
    auto s = streams.next();
    kvx::cuda::async_copy(s, dev.data() + i * chunk, host.data() + i * chunk, chunk, io.get_executor(), [&, i, s](std::error_code ec) {
      if (ec && !first) first = ec;
      ++up;
      // Chained: the way back goes on the same stream once the way up completed.
      kvx::cuda::async_copy(s, back.data() + i * chunk, dev.data() + i * chunk, chunk, io.get_executor(), [&](std::error_code ec2) {
        if (ec2 && !first) first = ec2;
        ++down;
      });
    });
  }
  EXPECT_EQ(up.load(), 0) << "completions never run inline";
  io.run();  // returns only once every copy completed: waits hold the executor's work
  EXPECT_EQ(down.load(), static_cast<int>(n));
  EXPECT_FALSE(first) << first.message();
  EXPECT_EQ(std::memcmp(host.data(), back.data(), chunk * n), 0);
}

TEST(CudaStreamGpu, EnqueueErrorsArePostedNotInline) {
  KVX_REQUIRE_GPU();
  asio::io_context io;
  auto s = kvx::cuda::stream::create(0).value();
  auto dev = kvx::cuda::device_buffer::allocate(4096, 0).value();
  std::optional<std::error_code> out;
  // A null destination: the runtime refuses it at enqueue.
  kvx::cuda::async_copy(s.native(), nullptr, dev.data(), 64, io.get_executor(), [&](std::error_code ec) { out = ec; });
  EXPECT_FALSE(out);
  io.run();
  ASSERT_TRUE(out);
  EXPECT_TRUE(*out) << "an impossible copy must fail";
  // Nothing sticky: the stream still works.
  std::optional<std::error_code> ok;
  kvx::cuda::async_wait(s.native(), io.get_executor(), [&](std::error_code ec) { ok = ec; });
  io.restart();
  io.run();
  ASSERT_TRUE(ok);
  EXPECT_FALSE(*ok) << ok->message();
}

TEST(CudaStreamGpu, CompletionRunsOnTheHandlersAssociatedExecutor) {
  KVX_REQUIRE_GPU();
  asio::io_context io;
  auto strand = asio::make_strand(io);
  auto s = kvx::cuda::stream::create(0).value();
  bool on_strand = false;
  kvx::cuda::async_wait(s.native(), io.get_executor(),
                        asio::bind_executor(strand, [&](std::error_code) { on_strand = strand.running_in_this_thread(); }));
  io.run();
  EXPECT_TRUE(on_strand);
}

}  // namespace

namespace {

TEST(CudaEventPollerGpu, CompletesManyCopiesAndPostsEnqueueErrors) {
  if (kvx::cuda::device_count() == 0) GTEST_SKIP() << kvx::cuda::skip_reason();
  asio::io_context io;
  auto& poller = kvx::cuda::event_poller::instance();
  auto streams = kvx::cuda::stream_pool::create(0, 3).value();
  constexpr std::size_t chunk = 64 << 10, n = 200;
  auto host = kvx::cuda::pinned_buffer::allocate(chunk * n).value();
  auto dev = kvx::cuda::device_buffer::allocate(chunk * n, 0).value();
  auto back = kvx::cuda::pinned_buffer::allocate(chunk * n).value();
  kvx::test::fill_pattern(host.region().bytes(), 11);
  std::atomic<int> done{0};
  std::error_code first;
  for (std::size_t i = 0; i < n; ++i) {
    auto s = streams.next();
    poller.async_copy(s, 0, dev.data() + i * chunk, host.data() + i * chunk, chunk, io.get_executor(), [&, i, s](std::error_code ec) {
      if (ec && !first) first = ec;
      poller.async_copy(s, 0, back.data() + i * chunk, dev.data() + i * chunk, chunk, io.get_executor(), [&](std::error_code ec2) {
        if (ec2 && !first) first = ec2;
        ++done;
      });
    });
  }
  io.run();
  EXPECT_EQ(done.load(), static_cast<int>(n));
  EXPECT_FALSE(first) << first.message();
  EXPECT_EQ(std::memcmp(host.data(), back.data(), chunk * n), 0);

  std::optional<std::error_code> bad;
  poller.async_copy(streams.next(), 0, nullptr, dev.data(), 64, io.get_executor(), [&](std::error_code ec) { bad = ec; });
  EXPECT_FALSE(bad) << "never inline";
  io.restart();
  io.run();
  ASSERT_TRUE(bad);
  EXPECT_EQ(*bad, kvx::errc::invalid_argument) << bad->message();
}

}  // namespace
