#pragma once
//! \file
//! Registers kvx's own network and same-host transports with the
//! `transport_registry`, so tools can build them from JSON through
//! `make_transport`: including this header is what makes the names available.
//! Kept apart from the transports' headers so the transport layer does not
//! depend on the transfer layer.
//!
//! - `{"transport": "tcp", ...}`: every other field is a `tcp::config` field
//!   (`address`, `port`, `serve`, `connections`, `max_request`, `slice_size`,
//!   `socket_buffer`, `no_delay`, `connect_timeout_ms`), errors naming it.
//! - `{"transport": "shm", "open_timeout_ms": 5000, "revoke_timeout_ms": 2000,
//!   "grant_ptrace": false}`.
//!
//! \code
//! #include <kvx/transfer/registered_transports.hpp>
//! auto t = kvx::transfer::make_transport(io.get_executor(),
//!     nlohmann::json{{"transport", "tcp"}, {"connections", 2}}, "net");   // result<any_transport>
//! \endcode

#include <chrono>
#include <cstdint>
#include <string>

#include <kvx/transfer/any_transport.hpp>
#include <kvx/transport/shm.hpp>
#include <kvx/transport/tcp.hpp>

namespace kvx::transfer::detail {

// The transport's own fields: the object without the "transport" key.
inline nlohmann::json without_transport_key(const config::view& cfg) {
  nlohmann::json own = cfg.raw();
  own.erase("transport");
  return own;
}

inline const bool tcp_registered = [] {
  (void)transport_registry::instance().add(
      "tcp", [](asio::any_io_executor ex, const config::view& cfg) -> result<any_transport> {
        const auto own = without_transport_key(cfg);
        auto c = transport::tcp::config::from_json(own, cfg.path());
        KVX_TRY(c);
        return any_transport(std::in_place_type<transport::tcp>, std::move(ex), std::move(*c));
      });
  return true;
}();

inline const bool shm_registered = [] {
  (void)transport_registry::instance().add(
      "shm", [](asio::any_io_executor ex, const config::view& cfg) -> result<any_transport> {
        KVX_TRY(cfg.allow_only({"transport", "open_timeout_ms", "revoke_timeout_ms", "grant_ptrace"}));
        transport::shm_options o;
        auto open = cfg.optional<std::uint32_t>("open_timeout_ms", static_cast<std::uint32_t>(o.open_timeout.count()));
        KVX_TRY(open);
        auto revoke = cfg.optional<std::uint32_t>("revoke_timeout_ms", static_cast<std::uint32_t>(o.revoke_timeout.count()));
        KVX_TRY(revoke);
        auto grant = cfg.optional<bool>("grant_ptrace", o.grant_ptrace);
        KVX_TRY(grant);
        o.open_timeout = std::chrono::milliseconds(*open);
        o.revoke_timeout = std::chrono::milliseconds(*revoke);
        o.grant_ptrace = *grant;
        return any_transport(std::in_place_type<transport::shm>, std::move(ex), o);
      });
  return true;
}();

}  // namespace kvx::transfer::detail
