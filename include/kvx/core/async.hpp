#pragma once
//! \file
//! The async conventions every kvx layer follows (DESIGN.md, "The async model").
//!
//! - Every operation that waits is an Asio initiating function
//!   `async_<verb>(args..., CompletionToken&& token)` whose completion
//!   signature is `void(std::error_code)` or `void(std::error_code, T)`.
//! - Callers pick the token: `asio::use_awaitable` in coroutines (the style of
//!   kvx's docs), `asio::deferred`, `asio::use_future`, `asio::as_tuple(...)`,
//!   or a plain callback.
//! - Operations honour per-operation cancellation slots; `kvx::cancel_after`
//!   gives any of them a deadline. Boost 1.81 (Asio 1.26) lacks
//!   `asio::cancel_after` (Asio 1.31), so kvx ships one of the same shape, with
//!   one difference: when the deadline is what cancelled the operation, the
//!   error the caller sees is `kvx::errc::timed_out`, not `operation_aborted`,
//!   so a dead peer reads as what it is.
//!
//! \code
//! using namespace std::chrono_literals;
//! auto [ec, n] = co_await engine.async_transfer(batch, kvx::cancel_after(2s, asio::as_tuple(asio::use_awaitable)));
//! if (ec == kvx::errc::timed_out) ...
//! \endcode

#include <chrono>
#include <exception>
#include <memory>
#include <stdexcept>
#include <string>
#include <system_error>
#include <type_traits>
#include <utility>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/associated_allocator.hpp>
#include <boost/asio/associated_cancellation_slot.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/system_executor.hpp>
#include <boost/system/error_code.hpp>

#include <kvx/core/error.hpp>

namespace kvx {

namespace asio = boost::asio;

//! Converts Asio's own error codes (boost::system) to `std::error_code`,
//! mapping `operation_aborted` to `kvx::errc::cancelled` so callers test one value.
inline std::error_code to_std(const boost::system::error_code& ec) noexcept {
  if (!ec) return {};
  if (ec == asio::error::operation_aborted) return errc::cancelled;
  if (ec == asio::error::eof || ec == asio::error::connection_reset || ec == asio::error::broken_pipe)
    return errc::connection_lost;
  if (ec == asio::error::connection_refused || ec == asio::error::host_unreachable ||
      ec == asio::error::network_unreachable)
    return errc::unreachable;
  return std::error_code(ec);
}

//! What ended a coroutine by an exception, for a log line: its what(), or a
//! note that it was not a std::exception. (A detached coroutine's exception
//! is otherwise lost without a word.)
inline std::string exception_message(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(e);
  } catch (const std::exception& x) {
    return x.what();
  } catch (...) {
    return "an exception that is not a std::exception";
  }
}

//! A completion token adapter: `Token`, cancelled after `timeout`.
template <class Token>
struct cancel_after_t {
  std::chrono::steady_clock::duration timeout;
  asio::cancellation_type_t cancel_type;
  Token token;
  asio::any_io_executor timer_executor{};  //!< empty: the handler's associated executor
};

//! Wraps `token` so the operation is cancelled (terminal by default) when
//! `timeout` passes before it completes. The timer runs on the handler's
//! associated executor (a coroutine's executor for `use_awaitable`).
template <class Token>
[[nodiscard]] cancel_after_t<std::decay_t<Token>> cancel_after(
    std::chrono::steady_clock::duration timeout, Token&& token,
    asio::cancellation_type_t type = asio::cancellation_type::terminal) {
  return {timeout, type, std::forward<Token>(token), {}};
}

//! As above, with the deadline timer on `ex`: for handlers whose associated
//! executor is not an I/O executor (type-erased handlers, plain callbacks).
template <class Token>
[[nodiscard]] cancel_after_t<std::decay_t<Token>> cancel_after(
    asio::any_io_executor ex, std::chrono::steady_clock::duration timeout, Token&& token,
    asio::cancellation_type_t type = asio::cancellation_type::terminal) {
  return {timeout, type, std::forward<Token>(token), std::move(ex)};
}

namespace detail {

//! Completes `handler` with `args` later, never inside the initiating
//! function: posted through `ex` and run on the handler's associated executor.
template <class Executor, class Handler, class... Args>
void post_completion(const Executor& ex, Handler&& handler, Args&&... args) {
  auto handler_ex = asio::get_associated_executor(handler, ex);
  asio::post(ex, asio::bind_executor(handler_ex, [h = std::forward<Handler>(handler),
                                                  ... a = std::forward<Args>(args)]() mutable { std::move(h)(std::move(a)...); }));
}

//! As `post_completion`, for an operation that assigned a handler to the
//! handler's cancellation slot: the slot is cleared on the handler's
//! associated executor, just before the handler runs. Whoever owns the slot's
//! signal emits it there (the transfer engine, on a batch's strand); a clear
//! from the thread that finished the operation races with that emit.
template <class Executor, class Handler, class... Args>
void post_completion_clearing_slot(const Executor& ex, Handler&& handler, Args&&... args) {
  auto handler_ex = asio::get_associated_executor(handler, ex);
  asio::post(ex, asio::bind_executor(handler_ex, [h = std::forward<Handler>(handler),
                                                  ... a = std::forward<Args>(args)]() mutable {
               if (auto slot = asio::get_associated_cancellation_slot(h); slot.is_connected()) slot.clear();
               std::move(h)(std::move(a)...);
             }));
}

struct deadline_state {
  template <class Executor>
  explicit deadline_state(const Executor& ex) : timer(ex) {}
  asio::steady_timer timer;
  asio::cancellation_signal signal;
  bool expired = false;
};

template <class Handler>
class deadline_handler {
 public:
  using executor_type = asio::associated_executor_t<Handler>;
  using allocator_type = asio::associated_allocator_t<Handler>;
  using cancellation_slot_type = asio::cancellation_slot;

  deadline_handler(Handler h, std::shared_ptr<deadline_state> st, asio::associated_cancellation_slot_t<Handler> outer)
      : handler_(std::move(h)), state_(std::move(st)), outer_(outer) {}

  executor_type get_executor() const noexcept { return asio::get_associated_executor(handler_); }
  allocator_type get_allocator() const noexcept { return asio::get_associated_allocator(handler_); }
  cancellation_slot_type get_cancellation_slot() const noexcept { return state_->signal.slot(); }

  template <class... Args>
  void operator()(Args&&... args) {
    state_->timer.cancel();
    if (outer_.is_connected()) outer_.clear();
    const bool expired = state_->expired;
    state_.reset();
    complete(expired, std::forward<Args>(args)...);
  }

 private:
  template <class First, class... Rest>
  void complete(bool expired, First&& first, Rest&&... rest) {
    using first_t = std::decay_t<First>;
    if constexpr (std::is_same_v<first_t, std::error_code> || std::is_same_v<first_t, boost::system::error_code>) {
      if (expired && first) {
        std::move(handler_)(first_t(make_error_code(errc::timed_out)), std::forward<Rest>(rest)...);
        return;
      }
    }
    std::move(handler_)(std::forward<First>(first), std::forward<Rest>(rest)...);
  }
  void complete(bool) { std::move(handler_)(); }

  Handler handler_;
  std::shared_ptr<deadline_state> state_;
  asio::associated_cancellation_slot_t<Handler> outer_;
};

template <class Initiation>
struct deadline_initiation {
  Initiation initiation;
  std::chrono::steady_clock::duration timeout;
  asio::cancellation_type_t cancel_type;
  asio::any_io_executor timer_executor;

  // The deadline timer's executor: the one given; else the initiation's
  // (Asio I/O objects have one); else the handler's I/O executor (a
  // coroutine's, or one bound with asio::bind_executor). The expiry emits the
  // cancellation signal on that executor, where the operation runs; a
  // handler with no I/O executor at all (a plain callback on one of kvx's own
  // operations) is a contract violation: there is no safe place to cancel from.
  template <class Handler>
  asio::any_io_executor pick_executor(const Handler& handler) const {
    if (timer_executor) return timer_executor;
    using handler_ex = asio::associated_executor_t<Handler>;
    if constexpr (requires { initiation.get_executor(); }) {
      return initiation.get_executor();
    } else if constexpr (std::is_convertible_v<handler_ex, asio::any_io_executor> &&
                         !std::is_same_v<handler_ex, asio::system_executor>) {
      return asio::get_associated_executor(handler);
    } else {
      throw std::logic_error(
          "kvx::cancel_after: the handler has no I/O executor; bind one with asio::bind_executor(ex, handler) "
          "or use kvx::cancel_after(executor, timeout, token)");
    }
  }

  template <class Handler, class... Args>
  void operator()(Handler&& handler, Args&&... args) && {
    using handler_t = std::decay_t<Handler>;
    auto st = std::make_shared<deadline_state>(pick_executor(handler));
    auto outer = asio::get_associated_cancellation_slot(handler);
    if (outer.is_connected()) {
      // Cancellation requested by the caller still reaches the operation.
      outer.assign([weak = std::weak_ptr<deadline_state>(st)](asio::cancellation_type_t t) {
        if (auto s = weak.lock()) s->signal.emit(t);
      });
    }
    st->timer.expires_after(timeout);
    st->timer.async_wait([weak = std::weak_ptr<deadline_state>(st), type = cancel_type](const boost::system::error_code& ec) {
      if (ec) return;
      if (auto s = weak.lock()) {
        s->expired = true;
        s->signal.emit(type);
      }
    });
    std::move(initiation)(deadline_handler<handler_t>(std::forward<Handler>(handler), st, outer),
                          std::forward<Args>(args)...);
  }
};

}  // namespace detail
}  // namespace kvx

template <class Token, class... Signatures>
struct boost::asio::async_result<kvx::cancel_after_t<Token>, Signatures...> {
  using return_type = typename boost::asio::async_result<Token, Signatures...>::return_type;
  template <class Initiation, class RawToken, class... Args>
  static auto initiate(Initiation&& initiation, RawToken&& token, Args&&... args) {
    return boost::asio::async_initiate<Token, Signatures...>(
        kvx::detail::deadline_initiation<std::decay_t<Initiation>>{std::forward<Initiation>(initiation), token.timeout,
                                                                    token.cancel_type, token.timer_executor},
        token.token, std::forward<Args>(args)...);
  }
};
