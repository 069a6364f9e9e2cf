#pragma once
//! \file
//! Deterministic transport doubles for tests of code built on transports (the
//! transfer engine, the store, your own decorators), in the manner of
//! stdexec's test schedulers:
//!
//! - `failing_transport`: every operation completes (posted, never inline)
//!   with one chosen error. Counts the operations it saw.
//! - `impulse<Inner>`: operations wait in a queue until the test releases
//!   them one at a time (`release_one()` hands the oldest to `Inner`, which
//!   then moves the bytes) or fails them (`fail_one(ec)`). A pending operation
//!   honours cancellation: it completes with `errc::cancelled` and leaves the
//!   queue. An operation that is never released never completes on its own,
//!   which is how deadline tests model a dead peer. `land_after_cancel(true)`
//!   models the bytes that outlive a cancel: the op completes `cancelled` but
//!   a later release still moves them.
//!
//! Both are transports (`check_transport` passes). They are thread-safe; the
//! queue of `impulse` is guarded by a mutex.
//!
//! \code
//! kvx::testing::impulse<> t(io.get_executor());        // wraps kvx::transport::local
//! t.async_read(desc, 0, dst, handler);
//! io.poll();  assert(t.pending() == 1);                  // nothing happens until...
//! t.release_one();  io.poll();                           // ...the test says so
//! \endcode

#include <atomic>
#include <cstdint>
#include <list>
#include <mutex>
#include <optional>
#include <span>
#include <string_view>
#include <system_error>
#include <utility>

#include <boost/asio/any_completion_handler.hpp>
#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/associated_cancellation_slot.hpp>

#include <kvx/core/async.hpp>
#include <kvx/transport/decorators/decorator.hpp>
#include <kvx/transport/local.hpp>
#include <kvx/transport/transport.hpp>

namespace kvx::testing {

//! Completes every operation with one error; registration succeeds.
class failing_transport {
 public:
  using transport_concept = transport::transport_tag;
  using executor_type = asio::any_io_executor;
  static constexpr transport::transport_capabilities capabilities{};
  static constexpr std::string_view name() noexcept { return "failing"; }

  explicit failing_transport(executor_type ex, std::error_code ec = errc::connection_lost)
      : ex_(std::move(ex)), ec_(ec) {}

  [[nodiscard]] executor_type get_executor() const noexcept { return ex_; }
  result<nlohmann::json> register_memory(const memory::local_segment&) { return nlohmann::json::object(); }
  result<void> deregister_memory(const memory::local_segment&) { return {}; }
  //! Reachable when the descriptor has a "failing" entry, so an engine picks it.
  [[nodiscard]] std::error_code can_transfer(const memory::segment_descriptor& remote) const {
    return remote.transports.contains(name()) ? std::error_code{} : make_error_code(errc::unreachable);
  }

  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_read(const memory::segment_descriptor&, std::uint64_t, std::span<std::byte>, CompletionToken&& token) {
    return fail(std::forward<CompletionToken>(token));
  }
  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_write(const memory::segment_descriptor&, std::uint64_t, std::span<const std::byte>, CompletionToken&& token) {
    return fail(std::forward<CompletionToken>(token));
  }

  [[nodiscard]] std::uint64_t operations() const noexcept { return ops_.load(std::memory_order_relaxed); }

 private:
  template <class CompletionToken>
  auto fail(CompletionToken&& token) {
    return asio::async_initiate<CompletionToken, void(std::error_code)>(
        [this](auto handler) {
          ops_.fetch_add(1, std::memory_order_relaxed);
          kvx::detail::post_completion(ex_, std::move(handler), ec_);
        },
        token);
  }

  executor_type ex_;
  std::error_code ec_;
  std::atomic<std::uint64_t> ops_{0};
};

static_assert(transport::check_transport<failing_transport>());

//! Holds each operation until the test releases it to `Inner` or fails it.
template <class Inner = transport::local>
class impulse : public transport::decorator<Inner> {
 public:
  template <class... Args>
  explicit impulse(Args&&... args) : transport::decorator<Inner>(std::in_place, std::forward<Args>(args)...) {}

  impulse(const impulse&) = delete;
  impulse& operator=(const impulse&) = delete;
  //! Fails what is still queued with `cancelled`, so no handler is lost.
  ~impulse() { fail_all(errc::cancelled); }

  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_read(const memory::segment_descriptor& remote, std::uint64_t offset, std::span<std::byte> dst,
                  CompletionToken&& token) {
    return asio::async_initiate<CompletionToken, void(std::error_code)>(
        [this](auto handler, const memory::segment_descriptor& r, std::uint64_t off, std::span<std::byte> d) {
          enqueue(op{0, true, r, off, d.data(), d.size(), std::move(handler)});
        },
        token, std::cref(remote), offset, dst);
  }

  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_write(const memory::segment_descriptor& remote, std::uint64_t offset, std::span<const std::byte> src,
                   CompletionToken&& token) {
    return asio::async_initiate<CompletionToken, void(std::error_code)>(
        [this](auto handler, const memory::segment_descriptor& r, std::uint64_t off, std::span<const std::byte> s) {
          enqueue(op{0, false, r, off, const_cast<std::byte*>(s.data()), s.size(), std::move(handler)});
        },
        token, std::cref(remote), offset, src);
  }

  //! Whether operations queued from now on complete with `cancelled` when
  //! their cancellation slot fires (default), or ignore it and wait for the
  //! test, like a transport whose request already left.
  void honour_cancellation(bool on) noexcept { honour_cancellation_.store(on, std::memory_order_relaxed); }
  //! Whether operations queued from now on, when their cancellation slot
  //! fires, complete with `cancelled` at once yet stay queued: a later
  //! release still moves their bytes (and completes nothing). A transport
  //! whose bytes had left when it reported the op cancelled, as tcp's may
  //! have. Takes precedence over `honour_cancellation`.
  void land_after_cancel(bool on) noexcept { land_after_cancel_.store(on, std::memory_order_relaxed); }

  //! Operations waiting for the test.
  [[nodiscard]] std::size_t pending() const {
    std::lock_guard lock(mutex_);
    return queue_.size();
  }
  //! Operations ever started.
  [[nodiscard]] std::uint64_t started() const noexcept { return started_.load(std::memory_order_relaxed); }

  //! Hands the oldest pending operation to `Inner`; false when none waits.
  bool release_one() {
    auto o = pop();
    if (!o) return false;
    if (o->completed) {  // reported cancelled already: the bytes move, nobody hears of it
      if (o->is_read)
        this->inner_.async_read(o->remote, o->offset, std::span<std::byte>(o->data, o->length), [](std::error_code) {});
      else
        this->inner_.async_write(o->remote, o->offset, std::span<const std::byte>(o->data, o->length), [](std::error_code) {});
      return true;
    }
    if (o->is_read)
      this->inner_.async_read(o->remote, o->offset, std::span<std::byte>(o->data, o->length), std::move(o->handler));
    else
      this->inner_.async_write(o->remote, o->offset, std::span<const std::byte>(o->data, o->length), std::move(o->handler));
    return true;
  }
  //! Releases every pending operation; returns how many.
  std::size_t release_all() {
    std::size_t n = 0;
    while (release_one()) ++n;
    return n;
  }
  //! Completes the oldest pending operation with `ec` (posted); false when none waits.
  bool fail_one(std::error_code ec) {
    auto o = pop();
    if (!o) return false;
    if (!o->completed) kvx::detail::post_completion(this->inner_.get_executor(), std::move(o->handler), ec);
    return true;
  }
  std::size_t fail_all(std::error_code ec) {
    std::size_t n = 0;
    while (fail_one(ec)) ++n;
    return n;
  }

 private:
  using handler_type = asio::any_completion_handler<void(std::error_code)>;
  struct op {
    std::uint64_t id;
    bool is_read;
    memory::segment_descriptor remote;
    std::uint64_t offset;
    std::byte* data;
    std::size_t length;
    handler_type handler;
    bool lands_late = false;  // land_after_cancel was on when it was queued
    bool completed = false;   // its handler ran (cancelled); it still waits to move its bytes
  };

  void enqueue(op o) {
    started_.fetch_add(1, std::memory_order_relaxed);
    auto slot = asio::get_associated_cancellation_slot(o.handler);
    std::lock_guard lock(mutex_);
    o.id = ++next_id_;
    o.lands_late = land_after_cancel_.load(std::memory_order_relaxed);
    if (slot.is_connected() && (o.lands_late || honour_cancellation_.load(std::memory_order_relaxed))) {
      slot.assign([this, id = o.id](asio::cancellation_type_t) { cancel(id); });
    }
    queue_.push_back(std::move(o));
  }

  void cancel(std::uint64_t id) {
    std::optional<op> found;
    {
      std::lock_guard lock(mutex_);
      for (auto it = queue_.begin(); it != queue_.end(); ++it) {
        if (it->id != id || it->completed) continue;
        if (it->lands_late) {
          found.emplace(op{it->id, it->is_read, it->remote, it->offset, it->data, it->length, std::move(it->handler)});
          it->completed = true;
        } else {
          found.emplace(std::move(*it));
          queue_.erase(it);
        }
        break;
      }
    }
    if (found) kvx::detail::post_completion(this->inner_.get_executor(), std::move(found->handler), make_error_code(errc::cancelled));
  }

  std::optional<op> pop() {
    std::lock_guard lock(mutex_);
    if (queue_.empty()) return std::nullopt;
    std::optional<op> o(std::move(queue_.front()));
    queue_.pop_front();
    // The slot's handler refers to this op; the op is leaving our queue.
    if (o->completed) return o;
    if (auto slot = asio::get_associated_cancellation_slot(o->handler); slot.is_connected()) slot.clear();
    return o;
  }

  mutable std::mutex mutex_;
  // A list: erasing a cancelled op from the middle moves no other op. Boost
  // 1.81's any_completion_handler move-assignment recurses until the stack
  // overflows (it constructs from the lvalue `other`), and a deque's erase
  // move-assigns the ops behind the erased one.
  std::list<op> queue_;
  std::uint64_t next_id_ = 0;
  std::atomic<std::uint64_t> started_{0};
  std::atomic<bool> honour_cancellation_{true};
  std::atomic<bool> land_after_cancel_{false};
};

static_assert(transport::check_transport<impulse<>>());

}  // namespace kvx::testing
