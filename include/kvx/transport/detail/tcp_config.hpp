#pragma once
// kvx::transport::tcp_config (public as kvx::transport::tcp::config): it lives
// here so the client and server halves in detail/ can use it without
// including the transport itself.

#include <chrono>
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include <kvx/core/bytes.hpp>
#include <kvx/core/config.hpp>
#include <kvx/core/result.hpp>
#include <kvx/transport/detail/tcp_protocol.hpp>

namespace kvx::transport {

//! Settings of a `kvx::transport::tcp`. Read from JSON with `from_json`; every
//! error names the field (`tcp.connections`).
//!
//! \code
//! auto cfg = kvx::transport::tcp_config::from_json(
//!     nlohmann::json::parse(R"({"connections": 8, "max_request": "16MiB"})"));
//! \endcode
struct tcp_config {
  std::string address = "127.0.0.1";  //!< address the server listens on
  std::string advertise;              //!< host peers connect to; empty: `address` (or 127.0.0.1 for 0.0.0.0 / ::)
  std::uint16_t port = 0;             //!< listening port; 0 picks a free one
  bool serve = true;                  //!< run the server (false: an initiator that registers nothing)
  unsigned connections = 4;           //!< connections per peer; slices spread over them by outstanding bytes
  std::uint64_t max_request = 64 * MiB;  //!< largest payload one request carries; larger requests are refused
  std::uint64_t slice_size = 4 * MiB;    //!< the client cuts ops larger than this into pipelined, striped requests (0: max_request)
  std::uint64_t socket_buffer = 0;       //!< SO_SNDBUF / SO_RCVBUF; 0 keeps the kernel's autotuning
  bool no_delay = true;                  //!< TCP_NODELAY
  std::chrono::milliseconds connect_timeout{5000};  //!< a connect that takes longer fails with errc::unreachable

  //! Reads the fields present in `j` over the defaults; unknown fields are errors.
  static result<tcp_config> from_json(const nlohmann::json& j, std::string path = "tcp") {
    config::view v(j, std::move(path));
    KVX_TRY(v.allow_only({"address", "advertise", "port", "serve", "connections", "max_request", "slice_size",
                          "socket_buffer", "no_delay", "connect_timeout_ms"}));
    tcp_config c;
    auto address = v.optional<std::string>("address", c.address);
    KVX_TRY(address);
    auto advertise = v.optional<std::string>("advertise", c.advertise);
    KVX_TRY(advertise);
    auto port = v.optional<std::uint16_t>("port", c.port);
    KVX_TRY(port);
    auto serve = v.optional<bool>("serve", c.serve);
    KVX_TRY(serve);
    auto connections = v.optional<unsigned>("connections", c.connections);
    KVX_TRY(connections);
    auto max_request = v.optional<config::bytes>("max_request", {c.max_request});
    KVX_TRY(max_request);
    auto slice = v.optional<config::bytes>("slice_size", {c.slice_size});
    KVX_TRY(slice);
    auto sockbuf = v.optional<config::bytes>("socket_buffer", {c.socket_buffer});
    KVX_TRY(sockbuf);
    auto no_delay = v.optional<bool>("no_delay", c.no_delay);
    KVX_TRY(no_delay);
    auto timeout = v.optional<std::uint32_t>("connect_timeout_ms", static_cast<std::uint32_t>(c.connect_timeout.count()));
    KVX_TRY(timeout);
    c.address = std::move(*address);
    c.advertise = std::move(*advertise);
    c.port = *port;
    c.serve = *serve;
    c.connections = *connections;
    c.max_request = max_request->value;
    c.slice_size = slice->value;
    c.socket_buffer = sockbuf->value;
    c.no_delay = *no_delay;
    c.connect_timeout = std::chrono::milliseconds(*timeout);
    KVX_TRY(c.validate(v));
    return c;
  }

  //! Checks ranges; `v` only names the fields in messages.
  [[nodiscard]] result<void> validate(const config::view& v = config::view(nlohmann::json::object(), "tcp")) const {
    if (connections == 0 || connections > 256)
      return error{errc::invalid_argument, "config field '" + v.path_of("connections") + "': must be 1..256, got " +
                                               std::to_string(connections)};
    if (max_request < detail::tcp_wire::min_request || max_request > (std::uint64_t{1} << 40))
      return error{errc::invalid_argument, "config field '" + v.path_of("max_request") + "': must be 4 KiB..1 TiB, got " +
                                               std::to_string(max_request)};
    if (slice_size != 0 && (slice_size < detail::tcp_wire::min_request || slice_size > (std::uint64_t{1} << 40)))
      return error{errc::invalid_argument, "config field '" + v.path_of("slice_size") + "': must be 0 (max_request) or 4 KiB..1 TiB, got " +
                                               std::to_string(slice_size)};
    if (socket_buffer > (std::uint64_t{1} << 30))
      return error{errc::invalid_argument, "config field '" + v.path_of("socket_buffer") + "': at most 1 GiB"};
    if (address.empty()) return error{errc::invalid_argument, "config field '" + v.path_of("address") + "': empty"};
    if (connect_timeout.count() <= 0)
      return error{errc::invalid_argument, "config field '" + v.path_of("connect_timeout_ms") + "': must be positive"};
    return {};
  }

  [[nodiscard]] nlohmann::json to_json() const {
    return {{"address", address},
            {"advertise", advertise},
            {"port", port},
            {"serve", serve},
            {"connections", connections},
            {"max_request", max_request},
            {"slice_size", slice_size},
            {"socket_buffer", socket_buffer},
            {"no_delay", no_delay},
            {"connect_timeout_ms", static_cast<std::uint64_t>(connect_timeout.count())}};
  }

  //! The host peers are told to connect to.
  [[nodiscard]] std::string advertised_host() const {
    if (!advertise.empty()) return advertise;
    if (address == "0.0.0.0") return "127.0.0.1";
    if (address == "::") return "::1";
    return address;
  }
};

}  // namespace kvx::transport
