#pragma once
//! \file
//! `event_poller`: the low-latency way to notice that CUDA work finished. One
//! thread per process records an event after each waited-on operation and
//! polls the pending events (`cudaEventQuery`), posting each handler to its
//! executor as its event completes; it sleeps on a condition variable when
//! nothing is pending, so a core is busy only while GPU work is in flight.
//!
//! Why beside the stream callback of `stream.hpp`: a stream callback costs
//! ~25 us per operation on an H100 (the driver wakes a thread for it, and the
//! stream waits for the callback before its next copy), so small copies and
//! one-at-a-time latency suffer; polling completes within a microsecond or
//! two of the copy and never holds up the stream (docs/cuda.md has the
//! figures). Callbacks remain the choice where no core may spin. The poller
//! also spins 200 us after its last completion before it sleeps.
//!
//! Errors as `stream.hpp`: enqueue and record failures complete at once
//! (posted), a faulted stream completes with its mapped `errc`. Thread-safe.
//!
//! \code
//! auto& poller = kvx::cuda::event_poller::instance();
//! poller.async_copy(s.native(), s.device(), dst, src, n, ex, [](std::error_code ec) { ... });
//! \endcode

#include <cuda_runtime_api.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include <boost/asio/async_result.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/execution/outstanding_work.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/prefer.hpp>

#include <kvx/core/async.hpp>
#include <kvx/cuda/device.hpp>
#include <kvx/cuda/error.hpp>

namespace kvx::cuda {

//! How a CUDA operation's completion reaches its Asio handler.
enum class completion_mode {
  callback,  //!< stream callback: no spinning core, ~25 us per op
  poll,      //!< `event_poller`: ~1-2 us, one core busy while ops are in flight
};

class event_poller {
 public:
  //! The process's poller (its thread starts on first use).
  static event_poller& instance() {
    static event_poller p;
    return p;
  }

  event_poller(const event_poller&) = delete;
  event_poller& operator=(const event_poller&) = delete;
  ~event_poller() {
    {
      std::lock_guard lock(mu_);
      stop_ = true;
    }
    cv_.notify_one();
    if (thread_.joinable()) thread_.join();
    for (auto& [device, events] : free_events_) {
      device_guard on(device);
      for (auto e : events) (void)cudaEventDestroy(e);
    }
  }

  //! Completes `token` (`void(std::error_code)`) once the work enqueued on
  //! `s` (a stream of device `device`) so far has finished.
  template <class Executor, asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_wait(cudaStream_t s, int device, const Executor& ex, CompletionToken&& token) {
    return asio::async_initiate<CompletionToken, void(std::error_code)>(
        initiation<Executor>{this, ex}, token, s, device, [](cudaStream_t) { return cudaSuccess; });
  }

  //! Enqueues a copy of `n` bytes (any direction) on `s` and completes when it finished.
  template <class Executor, asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_copy(cudaStream_t s, int device, void* dst, const void* src, std::size_t n, const Executor& ex,
                  CompletionToken&& token) {
    return asio::async_initiate<CompletionToken, void(std::error_code)>(
        initiation<Executor>{this, ex}, token, s, device,
        [dst, src, n](cudaStream_t on) { return n ? cudaMemcpyAsync(dst, src, n, cudaMemcpyDefault, on) : cudaSuccess; });
  }

 private:
  struct waiter_base {
    virtual ~waiter_base() = default;
    virtual void complete(std::error_code ec) = 0;  // posts; callable from the poller thread
  };

  template <class Handler, class Executor>
  struct waiter final : waiter_base {
    waiter(Handler h, const Executor& ex)
        : handler(std::move(h)), work(asio::prefer(ex, asio::execution::outstanding_work.tracked)) {}
    void complete(std::error_code ec) override {
      auto ex = work;
      auto handler_ex = asio::get_associated_executor(handler, work);
      asio::post(ex, [h = std::move(handler), handler_ex, ec]() mutable {
        asio::dispatch(handler_ex, [h = std::move(h), ec]() mutable { std::move(h)(ec); });
      });
    }
    Handler handler;
    std::decay_t<decltype(asio::prefer(std::declval<const Executor&>(), asio::execution::outstanding_work.tracked))> work;
  };

  struct pending {
    cudaEvent_t event;
    int device;
    std::unique_ptr<waiter_base> waiter;
  };

  template <class Executor>
  struct initiation {
    event_poller* self;
    Executor ex;
    template <class Handler, class Enqueue>
    void operator()(Handler&& handler, cudaStream_t s, int device, Enqueue enqueue) const {
      device_guard on(device);
      auto status = enqueue(s);
      cudaEvent_t ev = nullptr;
      if (status == cudaSuccess) status = self->take_event(device, ev);
      if (status == cudaSuccess) status = cudaEventRecord(ev, s);
      if (status != cudaSuccess) {
        (void)cudaGetLastError();
        if (ev) self->give_event(device, ev);
        kvx::detail::post_completion(ex, std::forward<Handler>(handler), error_code_of(status));
        return;
      }
      self->add({ev, device, std::make_unique<waiter<std::decay_t<Handler>, Executor>>(std::forward<Handler>(handler), ex)});
    }
  };

  event_poller() = default;

  cudaError_t take_event(int device, cudaEvent_t& ev) {
    {
      std::lock_guard lock(mu_);
      auto& free = free_events_[device];
      if (!free.empty()) {
        ev = free.back();
        free.pop_back();
        return cudaSuccess;
      }
    }
    return cudaEventCreateWithFlags(&ev, cudaEventDisableTiming);
  }
  void give_event(int device, cudaEvent_t ev) {
    std::lock_guard lock(mu_);
    free_events_[device].push_back(ev);
  }

  void add(pending p) {
    {
      std::lock_guard lock(mu_);
      incoming_.push_back(std::move(p));
      has_incoming.store(true, std::memory_order_release);
      if (!thread_.joinable()) thread_ = std::thread([this] { loop(); });
    }
    cv_.notify_one();
  }

  void loop() {
    std::vector<pending> polling;
    for (;;) {
      if (polling.empty()) {
        // Spin a little before sleeping: ops tend to come in bursts, and a
        // futex wake-up costs more than the copy of a small block.
        const auto until = std::chrono::steady_clock::now() + spin_before_sleep;
        while (std::chrono::steady_clock::now() < until && !has_incoming.load(std::memory_order_acquire))
          std::this_thread::yield();
      }
      {
        std::unique_lock lock(mu_);
        if (polling.empty()) cv_.wait(lock, [&] { return stop_ || !incoming_.empty(); });
        has_incoming.store(false, std::memory_order_relaxed);
        if (stop_ && incoming_.empty() && polling.empty()) return;
        for (auto& p : incoming_) polling.push_back(std::move(p));
        incoming_.clear();
      }
      std::size_t kept = 0;
      for (auto& p : polling) {
        const auto status = cudaEventQuery(p.event);
        if (status == cudaErrorNotReady) {
          if (&polling[kept] != &p) polling[kept] = std::move(p);
          ++kept;
          continue;
        }
        if (status != cudaSuccess) (void)cudaGetLastError();
        p.waiter->complete(error_code_of(status));
        give_event(p.device, p.event);
      }
      polling.resize(kept);
      if (kept) std::this_thread::yield();
    }
  }

  static constexpr std::chrono::microseconds spin_before_sleep{200};
  std::atomic<bool> has_incoming{false};
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<pending> incoming_;
  std::map<int, std::vector<cudaEvent_t>> free_events_;
  std::thread thread_;
  bool stop_ = false;
};

}  // namespace kvx::cuda
