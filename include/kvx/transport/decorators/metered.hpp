#pragma once
//! \file
//! `metered<T>`: any transport, with bytes, operations, errors and latency
//! recorded in a `kvx::metrics::registry`, labelled `transport` and `op`
//! (`read` / `write`):
//!
//! | metric | kind |
//! | --- | --- |
//! | `kvx_transport_bytes_total` | counter, bytes of successful operations |
//! | `kvx_transport_ops_total` | counter, completed operations |
//! | `kvx_transport_errors_total` | counter, operations that completed with an error |
//! | `kvx_transport_latency_seconds` | histogram, initiation to completion |
//!
//! The metrics are looked up once at construction; each operation then costs
//! two clock reads and a few relaxed atomic adds. Thread-safe like `T`.
//! Completions keep the caller's executor and cancellation slot.
//!
//! \code
//! kvx::transport::metered<kvx::transport::local> t({}, io.get_executor());
//! t.async_read(desc, 0, dst, handler);
//! std::cout << kvx::metrics::default_registry().prometheus_text();
//! \endcode

#include <chrono>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <utility>

#include <kvx/core/async.hpp>
#include <kvx/core/metrics.hpp>
#include <kvx/transport/decorators/decorator.hpp>
#include <kvx/transport/detail/then_handler.hpp>
#include <kvx/transport/local.hpp>
#include <kvx/transport/transport.hpp>

namespace kvx::transport {

//! Where `metered<T>` records and under which `transport` label.
struct metered_config {
  metrics::registry* registry = &metrics::default_registry();
  std::string label{};  //!< the `transport` label; empty means `T::name()`
};

template <class T>
class metered : public decorator<T> {
 public:
  template <class... Args>
  explicit metered(metered_config cfg, Args&&... inner_args)
      : decorator<T>(std::in_place, std::forward<Args>(inner_args)...),
        read_(*cfg.registry, cfg.label.empty() ? std::string(T::name()) : cfg.label, "read"),
        write_(*cfg.registry, cfg.label.empty() ? std::string(T::name()) : cfg.label, "write") {}

  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_read(const memory::segment_descriptor& remote, std::uint64_t offset, std::span<std::byte> dst,
                  CompletionToken&& token) {
    return asio::async_initiate<CompletionToken, void(std::error_code)>(
        [this](auto handler, const memory::segment_descriptor& r, std::uint64_t off, std::span<std::byte> d) {
          this->inner_.async_read(r, off, d, wrap(std::move(handler), read_, d.size()));
        },
        token, std::cref(remote), offset, dst);
  }

  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_write(const memory::segment_descriptor& remote, std::uint64_t offset, std::span<const std::byte> src,
                   CompletionToken&& token) {
    return asio::async_initiate<CompletionToken, void(std::error_code)>(
        [this](auto handler, const memory::segment_descriptor& r, std::uint64_t off, std::span<const std::byte> s) {
          this->inner_.async_write(r, off, s, wrap(std::move(handler), write_, s.size()));
        },
        token, std::cref(remote), offset, src);
  }

 private:
  struct op_metrics {
    op_metrics(metrics::registry& reg, const std::string& transport, const char* op)
        : bytes(reg.counter("kvx_transport_bytes_total", "Bytes moved by successful transport operations",
                            {{"transport", transport}, {"op", op}})),
          ops(reg.counter("kvx_transport_ops_total", "Completed transport operations", {{"transport", transport}, {"op", op}})),
          errors(reg.counter("kvx_transport_errors_total", "Transport operations that completed with an error",
                             {{"transport", transport}, {"op", op}})),
          latency(reg.histogram("kvx_transport_latency_seconds", "Transport operation latency",
                                {{"transport", transport}, {"op", op}})) {}
    metrics::counter& bytes;
    metrics::counter& ops;
    metrics::counter& errors;
    metrics::histogram& latency;
  };

  template <class Handler>
  static auto wrap(Handler&& handler, op_metrics& m, std::size_t n) {
    return detail::make_then_handler(std::forward<Handler>(handler),
                                     [&m, n, start = std::chrono::steady_clock::now()](auto h, std::error_code ec) {
                                       m.latency.observe(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
                                       m.ops.add();
                                       if (ec)
                                         m.errors.add();
                                       else
                                         m.bytes.add(n);
                                       std::move(h)(ec);
                                     });
  }

  op_metrics read_;
  op_metrics write_;
};

static_assert(check_transport<metered<local>>());

}  // namespace kvx::transport
