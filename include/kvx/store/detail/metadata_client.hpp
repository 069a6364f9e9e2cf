#pragma once
// Shared plumbing of the networked metadata backends (Redis, etcd): address
// parsing, running an operation as a coroutine on the backend's strand with a
// default deadline, TCP connect, and a pool of idle keep-alive connections.

#include <charconv>
#include <chrono>
#include <cstdint>
#include <exception>
#include <memory>
#include <string>
#include <string_view>
#include <system_error>
#include <tuple>
#include <utility>
#include <vector>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/associated_allocator.hpp>
#include <boost/asio/associated_cancellation_slot.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/connect.hpp>
#include <boost/asio/experimental/awaitable_operators.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <kvx/core/async.hpp>
#include <kvx/core/config.hpp>
#include <kvx/core/result.hpp>
#include <kvx/transfer/detail/bounded_resolve.hpp>

namespace kvx::store::detail {

inline constexpr auto use_tuple = asio::as_tuple(asio::use_awaitable);

struct host_port {
  std::string host;
  std::uint16_t port = 0;
};

//! "host:port" (or "[v6]:port"); the error names `field`.
inline result<host_port> parse_host_port(std::string_view text, std::string_view field = "address") {
  auto bad = [&](std::string_view why) {
    return error{errc::invalid_argument,
                 "config field '" + std::string(field) + "': '" + std::string(text) + "' " + std::string(why)};
  };
  const auto colon = text.rfind(':');
  if (colon == std::string_view::npos || colon == 0 || colon + 1 == text.size())
    return bad("is not host:port (e.g. \"127.0.0.1:6379\")");
  std::string_view host = text.substr(0, colon);
  if (host.front() == '[') {
    if (host.back() != ']' || host.size() < 3) return bad("has an unterminated [IPv6] host");
    host = host.substr(1, host.size() - 2);
  }
  const auto port_text = text.substr(colon + 1);
  unsigned port = 0;
  auto [end, ec] = std::from_chars(port_text.data(), port_text.data() + port_text.size(), port);
  if (ec != std::errc{} || end != port_text.data() + port_text.size() || port == 0 || port > 65535)
    return bad("has no valid port (1-65535)");
  return host_port{std::string(host), static_cast<std::uint16_t>(port)};
}

//! Reads the fields every networked backend's options have (`address`,
//! `prefix`, `timeout_ms`, `max_idle_connections`) into `o`, keeping its
//! defaults for those absent; errors name the field.
template <class Options>
result<void> read_client_options(const config::view& v, Options& o) {
  auto address = v.optional<std::string>("address", o.address);
  if (!address) return address.error();
  if (auto parsed = parse_host_port(*address, v.path_of("address")); !parsed) return parsed.error();
  o.address = *address;
  auto prefix = v.optional<std::string>("prefix", o.prefix);
  if (!prefix) return prefix.error();
  o.prefix = *prefix;
  auto timeout = v.optional<std::uint32_t>("timeout_ms", static_cast<std::uint32_t>(o.timeout.count()));
  if (!timeout) return timeout.error();
  o.timeout = std::chrono::milliseconds(*timeout);
  auto idle = v.optional<std::uint32_t>("max_idle_connections", static_cast<std::uint32_t>(o.max_idle_connections));
  if (!idle) return idle.error();
  o.max_idle_connections = *idle;
  return {};
}

// The user's handler, with `fallback` as its executor when it has none, so
// completions never land on Asio's system executor (which would start threads).
template <class Handler>
class defaulted_handler {
 public:
  using executor_type = asio::associated_executor_t<Handler, asio::any_io_executor>;
  using allocator_type = asio::associated_allocator_t<Handler>;
  using cancellation_slot_type = asio::associated_cancellation_slot_t<Handler>;

  defaulted_handler(Handler h, asio::any_io_executor fallback) : handler_(std::move(h)), fallback_(std::move(fallback)) {}
  executor_type get_executor() const noexcept { return asio::get_associated_executor(handler_, fallback_); }
  allocator_type get_allocator() const noexcept { return asio::get_associated_allocator(handler_); }
  cancellation_slot_type get_cancellation_slot() const noexcept { return asio::get_associated_cancellation_slot(handler_); }

  template <class... Args>
  void operator()(Args&&... args) {
    std::move(handler_)(std::forward<Args>(args)...);
  }

 private:
  Handler handler_;
  asio::any_io_executor fallback_;
};

// co_spawn's completion `(exception_ptr, tuple<error_code, T...>)` turned into
// `(error_code, T...)`; an escaped exception is a kvx bug (errc::internal).
template <class Handler>
class spawn_completion {
 public:
  using executor_type = asio::associated_executor_t<Handler>;
  using allocator_type = asio::associated_allocator_t<Handler>;
  using cancellation_slot_type = asio::associated_cancellation_slot_t<Handler>;

  explicit spawn_completion(Handler h) : handler_(std::move(h)) {}
  executor_type get_executor() const noexcept { return asio::get_associated_executor(handler_); }
  allocator_type get_allocator() const noexcept { return asio::get_associated_allocator(handler_); }
  cancellation_slot_type get_cancellation_slot() const noexcept { return asio::get_associated_cancellation_slot(handler_); }

  template <class Tuple>
  void operator()(std::exception_ptr e, Tuple r) {
    if (e) std::get<0>(r) = make_error_code(errc::internal);
    std::apply(std::move(handler_), std::move(r));
  }

 private:
  Handler handler_;
};

template <class Signature>
struct op_result;
template <class... Ts>
struct op_result<void(std::error_code, Ts...)> {
  using type = std::tuple<std::error_code, Ts...>;
};

//! What an operation coroutine returns: the completion's arguments.
template <class Signature>
using op_result_t = typename op_result<Signature>::type;

//! Runs `make()` (an `awaitable<op_result_t<Signature>>`) on `strand` and
//! completes `token` with its result. `make` is handed to co_spawn as a
//! function, so a lambda's captures live as long as the coroutine.
//! `timeout` > 0 adds a deadline (errc::timed_out); the caller's
//! cancellation slot reaches the coroutine (co_spawn moves it onto the strand).
template <class Signature, class Strand, class CompletionToken, class Make>
auto launch(const asio::any_io_executor& ex, const Strand& strand, std::chrono::milliseconds timeout,
            CompletionToken&& token, Make make) {
  return asio::async_initiate<CompletionToken, Signature>(
      [ex, strand, timeout](auto handler, Make make) {
        using result_type = op_result_t<Signature>;
        using defaulted = defaulted_handler<std::decay_t<decltype(handler)>>;
        spawn_completion<defaulted> done(defaulted(std::move(handler), ex));
        if (timeout.count() > 0) {
          // The timer and the operation race on the strand, so the loser is
          // cancelled there. A caller's cancellation reaching both first reads
          // as errc::cancelled, an expired timer as errc::timed_out.
          asio::co_spawn(
              strand,
              [make = std::move(make), timeout]() mutable -> asio::awaitable<result_type> {
                using namespace asio::experimental::awaitable_operators;
                asio::steady_timer timer(co_await asio::this_coro::executor, timeout);
                auto outcome = co_await (make() || timer.async_wait(use_tuple));
                if (outcome.index() == 0) co_return std::get<0>(std::move(outcome));
                result_type r{};
                const auto [timer_ec] = std::get<1>(outcome);
                std::get<0>(r) = make_error_code(timer_ec ? errc::cancelled : errc::timed_out);
                co_return r;
              },
              std::move(done));
        } else {
          asio::co_spawn(strand, std::move(make), std::move(done));
        }
      },
      token, std::move(make));
}

//! Connects `socket` to `where`, resolving a name when it is not an address.
inline asio::awaitable<std::error_code> connect_tcp(asio::ip::tcp::socket& socket, const host_port& where) {
  boost::system::error_code parse_ec;
  const auto address = asio::ip::make_address(where.host, parse_ec);
  boost::system::error_code ec;
  if (!parse_ec) {
    std::tie(ec) = co_await socket.async_connect(asio::ip::tcp::endpoint(address, where.port), use_tuple);
  } else {
    const std::string service = std::to_string(where.port);  // named: see etcd_state::call
    // The caller's cancellation (its deadline) ends the lookup's wait even
    // while getaddrinfo is stuck on a silent DNS server.
    auto [rec, results] = co_await transfer::detail::bounded_resolve(where.host, service,
                                                                     std::chrono::steady_clock::time_point::max());
    if (rec == asio::error::operation_aborted) co_return make_error_code(errc::cancelled);
    if (rec) co_return make_error_code(errc::unreachable);
    asio::ip::tcp::endpoint chosen;
    std::tie(ec, chosen) = co_await asio::async_connect(socket, results, use_tuple);
  }
  if (ec) {
    boost::system::error_code ignored;
    socket.close(ignored);
    if (ec == asio::error::operation_aborted) co_return make_error_code(errc::cancelled);
    const auto mapped = kvx::to_std(ec);
    // A refused or unroutable connect is "unreachable" whatever errno said.
    co_return mapped.category() == kvx::error_category() ? mapped : make_error_code(errc::unreachable);
  }
  boost::system::error_code ignored;
  socket.set_option(asio::ip::tcp::no_delay(true), ignored);
  co_return std::error_code{};
}

//! Maps an I/O error on an established connection.
inline std::error_code io_error(const boost::system::error_code& ec) {
  if (ec == asio::error::operation_aborted) return errc::cancelled;
  const auto mapped = kvx::to_std(ec);
  if (mapped.category() == kvx::error_category()) return mapped;
  return errc::connection_lost;
}

//! Idle keep-alive connections, used only from the backend's strand.
template <class Connection>
class idle_pool {
 public:
  explicit idle_pool(std::size_t max_idle) : max_idle_(max_idle) {}
  std::unique_ptr<Connection> take() {
    if (idle_.empty()) return nullptr;
    auto c = std::move(idle_.back());
    idle_.pop_back();
    return c;
  }
  void give_back(std::unique_ptr<Connection> c) {
    if (idle_.size() < max_idle_) idle_.push_back(std::move(c));
  }
  void clear() { idle_.clear(); }
  [[nodiscard]] std::size_t size() const noexcept { return idle_.size(); }

 private:
  std::size_t max_idle_;
  std::vector<std::unique_ptr<Connection>> idle_;
};

}  // namespace kvx::store::detail
