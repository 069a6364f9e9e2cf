#pragma once
//! \file
//! `faulty<T>`: any transport, with faults injected on a seeded schedule, so
//! tests prove that what sits above a transport (retries, checksums, the
//! engine's status reporting) ends every schedule in success or an error,
//! never in silent corruption or a hang.
//!
//! Each operation draws one fate, in initiation order, from a generator seeded
//! by `faulty_config::seed` (the same seed and the same order of operations
//! give the same faults):
//!
//! | fault | probability | what the caller sees |
//! | --- | --- | --- |
//! | drop | `drop` | nothing moves; `errc::timed_out` after `drop_timeout` (a lost request meeting the link's own timeout) |
//! | disconnect | `disconnect` | the first half of the bytes move, then `errc::connection_lost`; the next `disconnect_ops` operations fail with `connection_lost` without moving bytes (the link is down) |
//! | corrupt | `corrupt` | the operation succeeds but one byte of the destination differs (silent corruption: `checksummed<>` is what catches it) |
//! | delay | `delay` | the operation runs after `delay_by` |
//!
//! Probabilities must sum to at most 1. Corrupting a write stages the bytes
//! through a heap copy (the source is const), so use it over transports that
//! do not require the local side to be registered (local, tcp, shm). Delayed
//! and dropped operations honour cancellation and complete with
//! `errc::cancelled`. Thread-safe; the schedule is drawn under a mutex.
//!
//! \code
//! kvx::transport::faulty_config cfg{.seed = 7, .drop = 0.1, .corrupt = 0.05};
//! kvx::transport::faulty<kvx::transport::local> t(cfg, io.get_executor());
//! \endcode

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include <boost/asio/associated_cancellation_slot.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/steady_timer.hpp>

#include <kvx/core/async.hpp>
#include <kvx/core/config.hpp>
#include <kvx/core/splitmix64.hpp>
#include <kvx/transport/decorators/decorator.hpp>
#include <kvx/transport/detail/then_handler.hpp>
#include <kvx/transport/local.hpp>
#include <kvx/transport/transport.hpp>

namespace kvx::transport {

//! The fault schedule of `faulty<T>`.
struct faulty_config {
  std::uint64_t seed = 1;
  double drop = 0;
  double disconnect = 0;
  double corrupt = 0;
  double delay = 0;
  std::chrono::microseconds delay_by{200};
  std::chrono::microseconds drop_timeout{1000};
  std::uint32_t disconnect_ops = 2;

  //! Reads `{"seed", "drop", "disconnect", "corrupt", "delay", "delay_us", "drop_timeout_us", "disconnect_ops"}`;
  //! errors name the field.
  static result<faulty_config> from_json(const config::view& v) {
    KVX_TRY(v.allow_only({"seed", "drop", "disconnect", "corrupt", "delay", "delay_us", "drop_timeout_us", "disconnect_ops"}));
    faulty_config c;
    auto seed = v.optional<std::uint64_t>("seed", c.seed);
    KVX_TRY(seed);
    c.seed = *seed;
    for (auto [key, field] : {std::pair{"drop", &c.drop}, std::pair{"disconnect", &c.disconnect},
                              std::pair{"corrupt", &c.corrupt}, std::pair{"delay", &c.delay}}) {
      auto p = v.optional<double>(key, 0.0);
      KVX_TRY(p);
      if (*p < 0 || *p > 1)
        return error{errc::invalid_argument, "config field '" + v.path_of(key) + "': a probability in [0, 1], got " + std::to_string(*p)};
      *field = *p;
    }
    if (c.drop + c.disconnect + c.corrupt + c.delay > 1.0 + 1e-9)
      return error{errc::invalid_argument, "config '" + v.path() + "': drop + disconnect + corrupt + delay exceed 1"};
    auto delay_us = v.optional<std::uint32_t>("delay_us", static_cast<std::uint32_t>(c.delay_by.count()));
    KVX_TRY(delay_us);
    c.delay_by = std::chrono::microseconds(*delay_us);
    auto drop_us = v.optional<std::uint32_t>("drop_timeout_us", static_cast<std::uint32_t>(c.drop_timeout.count()));
    KVX_TRY(drop_us);
    c.drop_timeout = std::chrono::microseconds(*drop_us);
    auto down = v.optional<std::uint32_t>("disconnect_ops", c.disconnect_ops);
    KVX_TRY(down);
    c.disconnect_ops = *down;
    return c;
  }
};

//! How many faults of each kind `faulty<T>` injected.
struct fault_counts {
  std::uint64_t dropped = 0, disconnected = 0, failed_while_down = 0, corrupted = 0, delayed = 0, clean = 0;
};

template <class T>
class faulty : public decorator<T> {
 public:
  template <class... Args>
  explicit faulty(faulty_config cfg, Args&&... inner_args)
      : decorator<T>(std::in_place, std::forward<Args>(inner_args)...), cfg_(cfg), rng_(cfg.seed) {}

  [[nodiscard]] const faulty_config& config() const noexcept { return cfg_; }
  [[nodiscard]] fault_counts counts() const {
    std::lock_guard lock(mutex_);
    return counts_;
  }

  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_read(const memory::segment_descriptor& remote, std::uint64_t offset, std::span<std::byte> dst,
                  CompletionToken&& token) {
    return asio::async_initiate<CompletionToken, void(std::error_code)>(
        [this](auto handler, const memory::segment_descriptor& r, std::uint64_t off, std::span<std::byte> d) {
          this->start(std::move(handler), r, off, d.data(), d.size(), true);
        },
        token, std::cref(remote), offset, dst);
  }

  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_write(const memory::segment_descriptor& remote, std::uint64_t offset, std::span<const std::byte> src,
                   CompletionToken&& token) {
    return asio::async_initiate<CompletionToken, void(std::error_code)>(
        [this](auto handler, const memory::segment_descriptor& r, std::uint64_t off, std::span<const std::byte> s) {
          this->start(std::move(handler), r, off, const_cast<std::byte*>(s.data()), s.size(), false);
        },
        token, std::cref(remote), offset, src);
  }

 private:
  enum class fate { clean, drop, disconnect, corrupt, delay, down };

  struct draw {
    fate f;
    std::uint64_t noise;
  };

  draw next_fate() {
    std::lock_guard lock(mutex_);
    const std::uint64_t noise = next();
    if (down_remaining_ > 0) {
      --down_remaining_;
      ++counts_.failed_while_down;
      return {fate::down, noise};
    }
    const double u = static_cast<double>(next() >> 11) * 0x1.0p-53;
    double edge = cfg_.drop;
    if (u < edge) return ++counts_.dropped, draw{fate::drop, noise};
    if (u < (edge += cfg_.disconnect)) {
      down_remaining_ = cfg_.disconnect_ops;
      return ++counts_.disconnected, draw{fate::disconnect, noise};
    }
    if (u < (edge += cfg_.corrupt)) return ++counts_.corrupted, draw{fate::corrupt, noise};
    if (u < (edge += cfg_.delay)) return ++counts_.delayed, draw{fate::delay, noise};
    ++counts_.clean;
    return {fate::clean, noise};
  }

  std::uint64_t next() { return splitmix64_next(rng_); }

  template <class Handler>
  void run(Handler&& handler, const memory::segment_descriptor& r, std::uint64_t off, std::byte* p, std::size_t n,
           bool is_read) {
    if (is_read)
      this->inner_.async_read(r, off, std::span<std::byte>(p, n), std::forward<Handler>(handler));
    else
      this->inner_.async_write(r, off, std::span<const std::byte>(p, n), std::forward<Handler>(handler));
  }

  template <class Handler>
  void start(Handler handler, const memory::segment_descriptor& r, std::uint64_t off, std::byte* p, std::size_t n,
             bool is_read) {
    const auto [f, noise] = next_fate();
    switch (f) {
      case fate::clean:
        return run(std::move(handler), r, off, p, n, is_read);
      case fate::down:
        return kvx::detail::post_completion(this->inner_.get_executor(), std::move(handler), make_error_code(errc::connection_lost));
      case fate::drop:
        return after(std::move(handler), cfg_.drop_timeout, [this](auto h) {
          kvx::detail::post_completion(this->inner_.get_executor(), std::move(h), make_error_code(errc::timed_out));
        });
      case fate::delay: {
        auto remote = std::make_shared<memory::segment_descriptor>(r);
        return after(std::move(handler), cfg_.delay_by,
                     [this, remote, off, p, n, is_read](auto h) { this->run(std::move(h), *remote, off, p, n, is_read); });
      }
      case fate::disconnect: {
        if (n / 2 == 0)
          return kvx::detail::post_completion(this->inner_.get_executor(), std::move(handler), make_error_code(errc::connection_lost));
        return run(detail::make_then_handler(std::move(handler),
                                             [](auto h, std::error_code ec) {
                                               std::move(h)(ec ? ec : make_error_code(errc::connection_lost));
                                             }),
                   r, off, p, n / 2, is_read);
      }
      case fate::corrupt: {
        if (n == 0) return run(std::move(handler), r, off, p, n, is_read);
        const std::size_t at = noise % n;
        const auto mask = static_cast<std::byte>(1u << ((noise >> 32) % 8));
        if (is_read)
          return run(detail::make_then_handler(std::move(handler),
                                               [p, at, mask](auto h, std::error_code ec) {
                                                 if (!ec) p[at] ^= mask;
                                                 std::move(h)(ec);
                                               }),
                     r, off, p, n, true);
        auto copy = std::make_shared<std::vector<std::byte>>(p, p + n);
        (*copy)[at] ^= mask;
        return run(detail::make_then_handler(std::move(handler), [copy](auto h, std::error_code ec) { std::move(h)(ec); }),
                   r, off, copy->data(), n, false);
      }
    }
  }

  // Runs `then(handler)` after `d`, or completes with `cancelled` when the caller cancels first.
  template <class Handler, class Then>
  void after(Handler handler, std::chrono::microseconds d, Then then) {
    auto timer = std::make_shared<asio::steady_timer>(this->inner_.get_executor(), d);
    if (auto slot = asio::get_associated_cancellation_slot(handler); slot.is_connected())
      slot.assign([weak = std::weak_ptr<asio::steady_timer>(timer)](asio::cancellation_type_t) {
        if (auto t = weak.lock()) t->cancel();
      });
    // On the handler's executor, where the caller emits: the slot is cleared
    // and the next operation assigns it there, never racing an emit.
    auto handler_ex = asio::get_associated_executor(handler, this->inner_.get_executor());
    timer->async_wait(asio::bind_executor(handler_ex, [this, timer, h = std::move(handler),
                                                       then = std::move(then)](boost::system::error_code ec) mutable {
      if (auto slot = asio::get_associated_cancellation_slot(h); slot.is_connected()) slot.clear();
      if (ec)
        kvx::detail::post_completion(this->inner_.get_executor(), std::move(h), make_error_code(errc::cancelled));
      else
        std::move(then)(std::move(h));
    }));
  }

  faulty_config cfg_;
  mutable std::mutex mutex_;
  std::uint64_t rng_;
  std::uint32_t down_remaining_ = 0;
  fault_counts counts_;
};

static_assert(check_transport<faulty<local>>());

}  // namespace kvx::transport
