#pragma once
//! \file
//! CUDA streams on kvx's async model: `async_wait(stream, executor, token)`
//! completes the Asio token with `void(std::error_code)` once everything
//! enqueued on the stream before the call has run, and `async_copy` enqueues
//! a copy (any direction, `cudaMemcpyDefault`) and waits for it.
//!
//! How completion is noticed: a stream callback (`cudaStreamAddCallback`) that
//! posts the handler to the executor. Chosen over `cudaLaunchHostFunc`
//! because the callback also runs, with the error, when the context faults
//! (a host function is then silently dropped and the handler would never
//! run); and over event polling because it needs no polling thread and no
//! spinning core, at the price of a few microseconds of callback latency
//! (docs/cuda.md measures it). The executor's work count is held while a wait
//! is in flight, so `io_context::run()` does not return under it.
//!
//! Errors: an enqueue that fails completes at once (posted, never inline)
//! with the mapped `errc`; a fault in the stream completes with
//! `errc::device_error` (or what the status maps to). CUDA work cannot be
//! cancelled once enqueued, so per-operation cancellation is not supported:
//! the handler always runs after the work has finished and buffers may then
//! be released.
//!
//! Thread safety: `stream` and `stream_pool` are safe to share; enqueueing on
//! one stream from several threads is ordered by CUDA.
//!
//! \code
//! auto s = kvx::cuda::stream::create(0).value();
//! kvx::cuda::async_copy(s.native(), dst, src, n, io.get_executor(), [](std::error_code ec) { ... });
//! co_await kvx::cuda::async_wait(s.native(), ex, asio::use_awaitable);
//! \endcode

#include <cuda_runtime_api.h>

#include <atomic>
#include <cstddef>
#include <memory>
#include <utility>
#include <vector>

#include <boost/asio/async_result.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/execution/outstanding_work.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/prefer.hpp>

#include <kvx/core/async.hpp>
#include <kvx/cuda/device.hpp>
#include <kvx/cuda/error.hpp>

namespace kvx::cuda {

//! A non-blocking CUDA stream on one device. Move-only.
class stream {
 public:
  stream() = default;
  //! A stream on device `ordinal`; `priority` as `cudaStreamCreateWithPriority` (lower is more urgent).
  static result<stream> create(int ordinal = 0, int priority = 0) {
    device_guard on(ordinal);
    cudaStream_t s = nullptr;
    const auto status = cudaStreamCreateWithPriority(&s, cudaStreamNonBlocking, priority);
    if (status != cudaSuccess) {
      (void)cudaGetLastError();
      return make_error(status, "cudaStreamCreate on cuda:" + std::to_string(ordinal));
    }
    return stream(s, ordinal);
  }
  stream(stream&& o) noexcept : s_(std::exchange(o.s_, nullptr)), device_(o.device_) {}
  stream& operator=(stream&& o) noexcept {
    if (this != &o) {
      release();
      s_ = std::exchange(o.s_, nullptr);
      device_ = o.device_;
    }
    return *this;
  }
  ~stream() { release(); }

  [[nodiscard]] cudaStream_t native() const noexcept { return s_; }
  [[nodiscard]] int device() const noexcept { return device_; }
  //! Blocks until the stream is idle; the first error of its work.
  result<void> synchronize() const { return check(cudaStreamSynchronize(s_), "cudaStreamSynchronize"); }

 private:
  stream(cudaStream_t s, int d) noexcept : s_(s), device_(d) {}
  void release() noexcept {
    if (!s_) return;
    device_guard on(device_);
    (void)cudaStreamSynchronize(s_);
    (void)cudaStreamDestroy(s_);
    s_ = nullptr;
  }
  cudaStream_t s_ = nullptr;
  int device_ = 0;
};

//! `n` streams on one device handed out round-robin: many copies in flight
//! without one long copy holding up the others. Thread-safe.
class stream_pool {
 public:
  static result<stream_pool> create(int ordinal, std::size_t n) {
    stream_pool p;
    p.device_ = ordinal;
    for (std::size_t i = 0; i < (n ? n : 1); ++i) {
      auto s = stream::create(ordinal);
      KVX_TRY(s);
      p.streams_.push_back(std::move(*s));
    }
    return p;
  }
  stream_pool(stream_pool&& o) noexcept : streams_(std::move(o.streams_)), next_(o.next_.load()), device_(o.device_) {}

  [[nodiscard]] cudaStream_t next() noexcept {
    return streams_[next_.fetch_add(1, std::memory_order_relaxed) % streams_.size()].native();
  }
  [[nodiscard]] std::size_t size() const noexcept { return streams_.size(); }
  [[nodiscard]] int device() const noexcept { return device_; }
  result<void> synchronize() const {
    for (const auto& s : streams_) KVX_TRY(s.synchronize());
    return {};
  }

 private:
  stream_pool() = default;
  std::vector<stream> streams_;
  std::atomic<std::size_t> next_{0};
  int device_ = 0;
};

namespace detail {

template <class Handler, class Executor>
class stream_waiter {
 public:
  stream_waiter(Handler h, const Executor& ex)
      : handler_(std::move(h)), work_(asio::prefer(ex, asio::execution::outstanding_work.tracked)) {}

  // Runs on a CUDA driver thread: no CUDA calls allowed here, only the post.
  static void CUDART_CB on_stream(cudaStream_t, cudaError_t status, void* self) {
    std::unique_ptr<stream_waiter> w(static_cast<stream_waiter*>(self));
    auto ex = w->work_;
    asio::post(ex, [w = std::move(w), status]() mutable { w->complete(error_code_of(status)); });
  }

  // On the executor, after the stream callback's post.
  void complete(std::error_code ec) {
    auto ex = asio::get_associated_executor(handler_, work_);
    asio::dispatch(ex, [h = std::move(handler_), ec]() mutable { std::move(h)(ec); });
  }
  // On the initiating thread: never inline.
  void fail(std::error_code ec) { kvx::detail::post_completion(work_, std::move(handler_), ec); }

 private:
  Handler handler_;
  std::decay_t<decltype(asio::prefer(std::declval<const Executor&>(), asio::execution::outstanding_work.tracked))> work_;
};

// Nothing to enqueue: wait for what is already on the stream.
struct enqueue_nothing {
  cudaError_t operator()(cudaStream_t) const noexcept { return cudaSuccess; }
};

// Enqueues (lazily: at initiation, so deferred tokens launch nothing early),
// then adds the callback that completes the handler.
template <class Executor>
struct stream_wait_initiation {
  Executor ex;
  template <class Handler, class Enqueue>
  void operator()(Handler&& handler, cudaStream_t s, Enqueue enqueue) const {
    auto status = enqueue(s);
    if (status == cudaSuccess) {
      using waiter = stream_waiter<std::decay_t<Handler>, Executor>;
      auto w = std::make_unique<waiter>(std::forward<Handler>(handler), ex);
      status = cudaStreamAddCallback(s, &waiter::on_stream, w.get(), 0);
      if (status == cudaSuccess) {
        (void)w.release();
        return;
      }
      (void)cudaGetLastError();
      w->fail(error_code_of(status));
      return;
    }
    (void)cudaGetLastError();
    kvx::detail::post_completion(ex, std::forward<Handler>(handler), error_code_of(status));
  }
};

}  // namespace detail

//! Completes `token` (`void(std::error_code)`) once all work enqueued on `s` so far has finished.
template <class Executor, asio::completion_token_for<void(std::error_code)> CompletionToken>
auto async_wait(cudaStream_t s, const Executor& ex, CompletionToken&& token) {
  return asio::async_initiate<CompletionToken, void(std::error_code)>(detail::stream_wait_initiation<Executor>{ex},
                                                                      token, s, detail::enqueue_nothing{});
}

//! Enqueues a copy of `n` bytes from `src` to `dst` (device or host, any
//! direction) on `s` and completes `token` when it has finished.
template <class Executor, asio::completion_token_for<void(std::error_code)> CompletionToken>
auto async_copy(cudaStream_t s, void* dst, const void* src, std::size_t n, const Executor& ex, CompletionToken&& token) {
  return asio::async_initiate<CompletionToken, void(std::error_code)>(
      detail::stream_wait_initiation<Executor>{ex}, token, s,
      [dst, src, n](cudaStream_t on) { return n ? cudaMemcpyAsync(dst, src, n, cudaMemcpyDefault, on) : cudaSuccess; });
}

}  // namespace kvx::cuda
