#pragma once
//! \file
//! `kvx::transfer::http_metadata`: a `metadata_backend` that is a client of
//! an `http_metadata_server` (`kvx/transfer/http_metadata_server.hpp`), so
//! processes on one host or several share the metadata one of them keeps.
//! Opt-in: it needs Boost.Beast (headers only).
//!
//! Each operation is a coroutine on its own strand that borrows a keep-alive
//! HTTP/1.1 connection from a pool of at most `pool_size` (operations beyond
//! that wait for one, inside their deadline). A request that fails on a
//! reused connection before any byte of an answer arrived (the server closed
//! it while idle, or restarted) is sent once more on a fresh connection.
//!
//! | what happens | the completion's code |
//! | --- | --- |
//! | key absent (`get`, `remove`) | `errc::not_found` |
//! | server not listening | `errc::unreachable` |
//! | server closed the connection mid-request | `errc::connection_lost` |
//! | no answer within `timeout` (connect, queue and exchange together), or the caller's `kvx::cancel_after` | `errc::timed_out` |
//! | caller cancelled (cancellation slot) | `errc::cancelled` |
//! | answer is not HTTP, or a list body is not kvx's JSON | `errc::malformed_message` |
//! | an HTTP error without kvx's `kvx-error` header (not a kvx server?) | `errc::protocol_error` |
//! | value above the server's `max_body` | `errc::capacity_exceeded` |
//! | the server's backend failed | that backend's code (its message is logged) |
//!
//! Completions carry only the code; the details (server, operation, key, the
//! server's reason) go to kvx's log: `warn` for what retrying will not fix
//! (refusals, malformed answers, backend errors), `debug` for unreachable,
//! lost and timed-out requests.
//!
//! Thread-safety: operations may be started from any thread; completions run
//! on the handler's associated executor (default: `get_executor()`). Copies
//! share one client (pool, config). Nothing blocks; no thread is started.
//!
//! \code
//! auto meta = kvx::transfer::http_metadata::from_url(io.get_executor(), "http://127.0.0.1:40123");
//! if (!meta) return fail(meta.error().message());  // "invalid argument: metadata URL '...': has no port ..."
//! co_await meta->async_put("kvx/segment/kv", descriptor.dump(), asio::use_awaitable);
//! auto [ec, value] = co_await meta->async_get("kvx/segment/kv", asio::as_tuple(asio::use_awaitable));
//! \endcode

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <exception>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <stdexcept>
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
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http/error.hpp>
#include <boost/beast/http/message.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/string_body.hpp>
#include <boost/beast/http/write.hpp>

#include <kvx/core/async.hpp>
#include <kvx/core/log.hpp>
#include <kvx/core/result.hpp>
#include <kvx/transfer/detail/bounded_resolve.hpp>
#include <kvx/transfer/detail/http_metadata_protocol.hpp>
#include <kvx/transfer/metadata_backend.hpp>

namespace kvx::transfer {

//! Settings of an `http_metadata` client.
struct http_metadata_config {
  std::string host = "127.0.0.1";                  //!< the server's IP address or name (resolved per connection)
  std::uint16_t port = 0;                          //!< the server's port (required)
  std::chrono::milliseconds timeout{2000};         //!< deadline of each operation, queueing included; 0 = none; at most 24 h
  std::size_t pool_size = 4;                       //!< connections open at once; more operations wait for one
  std::uint64_t max_response_bytes = 256ull << 20; //!< largest answer accepted (a big list)
  //! A PUT body above this many bytes is sent only after the server answers
  //! `100 Continue` to its headers (`Expect: 100-continue`), so one the
  //! server refuses (above its `max_body`) is never sent: the refusal comes
  //! back as `capacity_exceeded` however slow the link. 0 = always send at
  //! once (a server that ignores Expect then costs the whole deadline).
  std::uint64_t expect_continue_above = 64 * 1024;

  //! Host and port of "http://HOST:PORT" ("http://[::1]:PORT", an optional
  //! trailing '/'); the other fields keep their defaults. The error says what
  //! is wrong with the URL.
  static result<http_metadata_config> from_url(std::string_view url) {
    auto bad = [&](std::string_view why) {
      return error{errc::invalid_argument, "metadata URL '" + std::string(url) + "': " + std::string(why)};
    };
    const auto scheme_end = url.find("://");
    if (scheme_end == std::string_view::npos) return bad("must start with http:// (e.g. http://127.0.0.1:8080)");
    std::string scheme(url.substr(0, scheme_end));
    std::transform(scheme.begin(), scheme.end(), scheme.begin(), [](unsigned char c) { return static_cast<char>(c | 0x20); });
    if (scheme == "https") return bad("https is not supported (the server speaks plain http)");
    if (scheme != "http") return bad("scheme '" + scheme + "' is not supported (expected http://)");
    auto rest = url.substr(scheme_end + 3);
    const auto slash = rest.find('/');
    if (slash != std::string_view::npos) {
      if (rest.substr(slash) != "/") return bad("has a path; give only http://HOST:PORT (the routes are fixed)");
      rest = rest.substr(0, slash);
    }
    if (rest.find('@') != std::string_view::npos) return bad("has user information, which is not supported");
    std::string_view host;
    std::string_view port_text;
    if (rest.starts_with('[')) {
      const auto close = rest.find(']');
      if (close == std::string_view::npos) return bad("has an unterminated [IPv6] host");
      host = rest.substr(1, close - 1);
      if (close + 1 >= rest.size() || rest[close + 1] != ':') return bad("has no port (http://HOST:PORT)");
      port_text = rest.substr(close + 2);
    } else {
      const auto colon = rest.rfind(':');
      if (colon == std::string_view::npos) return bad("has no port (http://HOST:PORT)");
      host = rest.substr(0, colon);
      port_text = rest.substr(colon + 1);
    }
    if (host.empty()) return bad("has no host");
    unsigned port = 0;
    const auto [end, ec] = std::from_chars(port_text.data(), port_text.data() + port_text.size(), port);
    if (port_text.empty() || ec != std::errc{} || end != port_text.data() + port_text.size() || port == 0 || port > 65535)
      return bad("port '" + std::string(port_text) + "' is not a number from 1 to 65535");
    http_metadata_config c;
    c.host = std::string(host);
    c.port = static_cast<std::uint16_t>(port);
    return c;
  }
};

namespace detail {

namespace http = boost::beast::http;
using http_metadata_clock = std::chrono::steady_clock;
using http_metadata_response = http::response<http::string_body>;
using http_metadata_request_message = http::request<http::string_body>;

struct http_metadata_connection {
  explicit http_metadata_connection(const asio::any_io_executor& ex) : socket(ex) {}
  asio::ip::tcp::socket socket;
  boost::beast::flat_buffer buffer;
};

// An operation queued for a connection. The grant and the give-up are both
// decided under the client's mutex, so a connection handed over is never lost
// to a waiter that timed out at the same moment.
struct http_metadata_waiter {
  explicit http_metadata_waiter(const asio::any_io_executor& strand) : timer(strand) {}
  asio::steady_timer timer;  // on the waiting operation's strand
  bool granted = false;
  std::unique_ptr<http_metadata_connection> connection;  // null with `granted`: open a new one
};

// Runs `on_expiry` on the operation's strand when `deadline` passes, unless
// destroyed first. Closing the socket from there (same strand as the I/O) is
// what ends a connect, write or read that the server never answers.
class http_metadata_deadline {
 public:
  template <class OnExpiry>
  http_metadata_deadline(const asio::any_io_executor& strand, http_metadata_clock::time_point deadline, OnExpiry on_expiry)
      : timer_(strand), state_(std::make_shared<state>()) {
    if (deadline == http_metadata_clock::time_point::max()) return;
    timer_.expires_at(deadline);
    timer_.async_wait([st = state_, f = std::move(on_expiry)](const boost::system::error_code& ec) mutable {
      if (ec || !st->armed) return;
      st->expired = true;
      f();
    });
  }
  http_metadata_deadline(const http_metadata_deadline&) = delete;
  http_metadata_deadline& operator=(const http_metadata_deadline&) = delete;
  ~http_metadata_deadline() {
    state_->armed = false;
    timer_.cancel();
  }
  [[nodiscard]] bool expired() const noexcept { return state_->expired; }

 private:
  struct state {
    bool armed = true;
    bool expired = false;
  };
  asio::steady_timer timer_;
  std::shared_ptr<state> state_;
};

inline bool is_beast_http_error(const boost::system::error_code& ec) {
  return ec.category() == http::make_error_code(http::error::end_of_stream).category();
}

//! Maps a failed connect.
inline std::error_code http_metadata_connect_error(const boost::system::error_code& ec, bool expired) {
  if (expired) return errc::timed_out;
  if (ec == asio::error::operation_aborted) return errc::cancelled;
  const auto mapped = to_std(ec);
  return mapped.category() == kvx::error_category() ? mapped : make_error_code(errc::unreachable);
}

//! Maps a failed write or read on an open connection.
inline std::error_code http_metadata_io_error(const boost::system::error_code& ec, bool expired) {
  if (expired) return errc::timed_out;
  if (ec == asio::error::operation_aborted) return errc::cancelled;
  if (is_beast_http_error(ec)) {
    if (ec == http::error::end_of_stream || ec == http::error::partial_message) return errc::connection_lost;
    if (ec == http::error::body_limit || ec == http::error::header_limit || ec == http::error::buffer_overflow)
      return errc::capacity_exceeded;
    return errc::malformed_message;
  }
  const auto mapped = to_std(ec);
  return mapped.category() == kvx::error_category() ? mapped : make_error_code(errc::connection_lost);
}

class http_metadata_client;

// A slot of the pool (and its connection once connected); gives both back
// when destroyed, the connection only if `keep()` was called.
class http_metadata_lease {
 public:
  http_metadata_lease() = default;
  http_metadata_lease(std::shared_ptr<http_metadata_client> client, std::unique_ptr<http_metadata_connection> c)
      : client_(std::move(client)), connection_(std::move(c)), reused_(connection_ != nullptr) {}
  http_metadata_lease(http_metadata_lease&&) noexcept = default;
  http_metadata_lease& operator=(http_metadata_lease&&) = delete;
  ~http_metadata_lease();

  [[nodiscard]] bool reused() const noexcept { return reused_; }
  [[nodiscard]] bool connected() const noexcept { return connection_ != nullptr; }
  http_metadata_connection& connection() { return *connection_; }
  void attach(std::unique_ptr<http_metadata_connection> c) { connection_ = std::move(c); }
  void keep() noexcept { keep_ = true; }

 private:
  std::shared_ptr<http_metadata_client> client_;
  std::unique_ptr<http_metadata_connection> connection_;
  bool reused_ = false;
  bool keep_ = false;
};

class http_metadata_client : public std::enable_shared_from_this<http_metadata_client> {
 public:
  using time_point = http_metadata_clock::time_point;

  http_metadata_client(asio::any_io_executor e, http_metadata_config c) : ex(std::move(e)), config(std::move(c)) {
    if (config.host.empty()) throw std::invalid_argument("kvx::transfer::http_metadata: config field 'host' is empty");
    if (config.port == 0) throw std::invalid_argument("kvx::transfer::http_metadata: config field 'port' is 0 (required)");
    if (config.pool_size == 0) throw std::invalid_argument("kvx::transfer::http_metadata: config field 'pool_size' is 0");
    // A negative timeout read as "none" (a silent server then blocked for good).
    if (config.timeout.count() < 0 || config.timeout > detail::http_metadata_max_timeout)
      throw std::invalid_argument("kvx::transfer::http_metadata: config field 'timeout' is " + std::to_string(config.timeout.count()) +
                                  " ms; it must be 0 (none) to " + std::to_string(detail::http_metadata_max_timeout.count()) + " ms");
    const bool v6 = config.host.find(':') != std::string::npos;
    host_field = (v6 ? "[" + config.host + "]" : config.host) + ":" + std::to_string(config.port);
    server = "http://" + host_field;
  }

  const asio::any_io_executor ex;
  const http_metadata_config config;
  std::string host_field;  // "host:port", the Host header
  std::string server;      // "http://host:port", for messages

  http_metadata_request_message make_request(http::verb verb, std::string target, std::string body = {}) const {
    http_metadata_request_message req{verb, target, 11};
    req.set(http::field::host, host_field);
    req.set(http::field::user_agent, "kvx");
    req.keep_alive(true);
    if (verb == http::verb::put) {
      req.set(http::field::content_type, "application/octet-stream");
      if (config.expect_continue_above > 0 && body.size() > config.expect_continue_above)
        req.set(http::field::expect, "100-continue");
      req.body() = std::move(body);
    }
    req.prepare_payload();
    return req;
  }

  //! Sends `req` and reads the answer, once more on a fresh connection when a
  //! reused one turns out stale. `what` names the operation and key in logs.
  asio::awaitable<std::tuple<std::error_code, http_metadata_response>> round_trip(http_metadata_request_message req,
                                                                                  std::string what) {
    co_await asio::this_coro::throw_if_cancelled(false);
    const auto deadline =
        config.timeout.count() > 0 ? http_metadata_clock::now() + config.timeout : time_point::max();
    for (int attempt = 0;; ++attempt) {
      auto [aec, lease] = co_await acquire(deadline);
      if (aec) {
        log_failure(what, aec, "");
        co_return std::tuple{aec, http_metadata_response{}};
      }
      auto outcome = co_await exchange(lease.connection(), req, deadline);
      if (!outcome.ec) {
        // Leftover bytes mean the stream is out of step: do not reuse it.
        if (outcome.response.keep_alive() && lease.connection().buffer.size() == 0) lease.keep();
        co_return std::tuple{std::error_code{}, std::move(outcome.response)};
      }
      if (attempt == 0 && lease.reused() && !outcome.got_reply && outcome.ec == errc::connection_lost) {
        log(log_level::debug, "kvx http_metadata ", server, ": ", what, ": pooled connection was closed; reconnecting");
        // The server closed it idle, and with it every other connection as
        // idle: the retry must not take one of those.
        drop_idle();
        continue;
      }
      log_failure(what, outcome.ec, outcome.detail);
      co_return std::tuple{outcome.ec, http_metadata_response{}};
    }
  }

  //! The code of an answer whose status is not one of `expected`.
  std::error_code refusal_code(const http_metadata_response& res, std::initializer_list<http::status> expected,
                               const std::string& what) const {
    for (auto s : expected)
      if (res.result() == s) return {};
    std::error_code ec = errc::protocol_error;
    const auto field = res.find(http_metadata_error_field);
    if (field != res.end()) {
      if (auto named = errc_of_header(std::string_view(field->value()))) ec = *named;
    }
    if (ec != errc::not_found) {
      const std::string detail = field == res.end() ? ", without a kvx-error header: is it a kvx metadata server?" : "";
      log_failure(what, ec,
                  "HTTP " + std::to_string(res.result_int()) + detail + " \"" + printable(res.body(), 300) + "\"");
    }
    return ec;
  }

  void log_failure(const std::string& what, const std::error_code& ec, const std::string& detail) const {
    const bool transient = ec == errc::unreachable || ec == errc::connection_lost || ec == errc::timed_out ||
                           ec == errc::cancelled || ec == errc::not_found;
    log(transient ? log_level::debug : log_level::warn, "kvx http_metadata ", server, ": ", what, ": ", ec.message(),
        detail.empty() ? "" : ": ", detail);
  }

  void release(std::unique_ptr<http_metadata_connection> c) {
    std::shared_ptr<http_metadata_waiter> next;
    {
      std::lock_guard lock(mutex_);
      if (!waiters_.empty()) {
        next = std::move(waiters_.front());
        waiters_.pop_front();
        next->granted = true;
        next->connection = std::move(c);
      } else if (c) {
        idle_.push_back(std::move(c));
      } else {
        --open_;
      }
    }
    // The waiter's timer lives on its strand: wake it there.
    if (next) asio::post(next->timer.get_executor(), [next] { next->timer.cancel(); });
  }

 private:
  static constexpr auto use_tuple = asio::as_tuple(asio::use_awaitable);

  // Closes the pooled idle connections (their slots free for fresh ones).
  void drop_idle() {
    std::vector<std::unique_ptr<http_metadata_connection>> stale;
    {
      std::lock_guard lock(mutex_);
      open_ -= idle_.size();
      stale = std::move(idle_);
      idle_.clear();
    }
  }

  asio::awaitable<std::tuple<std::error_code, http_metadata_lease>> acquire(time_point deadline) {
    const asio::any_io_executor strand = co_await asio::this_coro::executor;
    std::unique_ptr<http_metadata_connection> c;
    bool have_slot = false;
    std::shared_ptr<http_metadata_waiter> waiter;
    {
      std::lock_guard lock(mutex_);
      if (!idle_.empty()) {
        c = std::move(idle_.back());
        idle_.pop_back();
        have_slot = true;
      } else if (open_ < config.pool_size) {
        ++open_;
        have_slot = true;
      } else {
        waiter = std::make_shared<http_metadata_waiter>(strand);
        waiters_.push_back(waiter);
      }
    }
    bool expired = false;
    if (waiter) {
      waiter->timer.expires_at(deadline);
      auto [wec] = co_await waiter->timer.async_wait(use_tuple);
      expired = !wec;
      std::lock_guard lock(mutex_);
      if (waiter->granted) {
        c = std::move(waiter->connection);
        have_slot = true;
      } else {
        std::erase(waiters_, waiter);
      }
    }
    const bool cancelled = (co_await asio::this_coro::cancellation_state).cancelled() != asio::cancellation_type::none;
    if (!have_slot) co_return std::tuple{make_error_code(expired ? errc::timed_out : errc::cancelled), http_metadata_lease{}};
    http_metadata_lease lease(shared_from_this(), std::move(c));
    if (cancelled || http_metadata_clock::now() >= deadline) {
      lease.keep();  // unused: it goes back as it was
      co_return std::tuple{make_error_code(cancelled ? errc::cancelled : errc::timed_out), http_metadata_lease{}};
    }
    if (!lease.connected()) {
      auto fresh = std::make_unique<http_metadata_connection>(ex);
      const auto ec = co_await connect(*fresh, deadline);
      if (ec) co_return std::tuple{ec, http_metadata_lease{}};
      lease.attach(std::move(fresh));
    }
    co_return std::tuple{std::error_code{}, std::move(lease)};
  }

  // A cancellation emitted while no cancellable operation was pending (the
  // resolver ignores cancellation slots; or just as one step completed,
  // before the next began) is only recorded in the coroutine's state: the
  // next step would start without it and run on to the timeout.
  static asio::awaitable<bool> cancelled_meanwhile() {
    co_return (co_await asio::this_coro::cancellation_state).cancelled() != asio::cancellation_type::none;
  }

  asio::awaitable<std::error_code> connect(http_metadata_connection& c, time_point deadline) {
    const asio::any_io_executor strand = co_await asio::this_coro::executor;
    boost::system::error_code parse_ec;
    const auto address = asio::ip::make_address(config.host, parse_ec);
    boost::system::error_code ec;
    if (!parse_ec) {
      http_metadata_deadline guard(strand, deadline, [&c] {
        boost::system::error_code ignored;
        c.socket.close(ignored);
      });
      std::tie(ec) = co_await c.socket.async_connect(asio::ip::tcp::endpoint(address, config.port), use_tuple);
      if (ec) co_return http_metadata_connect_error(ec, guard.expired());
    } else {
      if (co_await cancelled_meanwhile()) co_return make_error_code(errc::cancelled);
      // Ends at the deadline or a cancellation even while getaddrinfo is
      // stuck on a silent DNS server (the lookup finishes in the background).
      auto [rec, endpoints] = co_await bounded_resolve(config.host, std::to_string(config.port), deadline);
      if (rec == asio::error::timed_out) co_return make_error_code(errc::timed_out);
      if (rec == asio::error::operation_aborted || co_await cancelled_meanwhile()) co_return make_error_code(errc::cancelled);
      if (rec) co_return make_error_code(errc::unreachable);
      http_metadata_deadline guard(strand, deadline, [&c] {
        boost::system::error_code ignored;
        c.socket.close(ignored);
      });
      asio::ip::tcp::endpoint chosen;
      std::tie(ec, chosen) = co_await asio::async_connect(c.socket, endpoints, use_tuple);
      if (ec) co_return http_metadata_connect_error(ec, guard.expired());
    }
    if (co_await cancelled_meanwhile()) co_return make_error_code(errc::cancelled);
    boost::system::error_code ignored;
    c.socket.set_option(asio::ip::tcp::no_delay(true), ignored);
    co_return std::error_code{};
  }

  struct exchange_outcome {
    std::error_code ec;
    http_metadata_response response;
    bool got_reply = false;  // any byte of an answer arrived
    std::string detail;      // the transport's own words, for the log
  };

  //! One request and its answer.
  asio::awaitable<exchange_outcome> exchange(http_metadata_connection& c, const http_metadata_request_message& req,
                                             time_point deadline) {
    const asio::any_io_executor strand = co_await asio::this_coro::executor;
    http_metadata_deadline guard(strand, deadline, [&c] {
      boost::system::error_code ignored;
      c.socket.close(ignored);
    });
    exchange_outcome out;
    auto failed = [&](boost::system::error_code ec, std::string_view doing) {
      out.ec = http_metadata_io_error(ec, guard.expired());
      out.detail = std::string(doing) + ": " + ec.message();
    };
    http::request_serializer<http::string_body> serializer(req);
    auto limit = [this](http::response_parser<http::string_body>& p) {
      p.body_limit(config.max_response_bytes);
      p.header_limit(64 * 1024);
    };
    if (boost::beast::iequals(req[http::field::expect], "100-continue")) {
      // Headers first; the body only once the server says it wants it.
      auto [hec, hn] = co_await http::async_write_header(c.socket, serializer, use_tuple);
      (void)hn;
      if (hec) {
        failed(hec, "sending the headers");
        co_return out;
      }
      http::response_parser<http::string_body> interim;
      limit(interim);
      auto [iec, in] = co_await http::async_read_header(c.socket, c.buffer, interim, use_tuple);
      (void)in;
      out.got_reply = interim.got_some();
      if (iec) {
        failed(iec, "waiting for 100 Continue");
        co_return out;
      }
      if (interim.get().result() != http::status::continue_) {
        // The final answer (a refusal) before the body: it was never sent,
        // so this connection is out of step and is not reused.
        auto [fec, fn] = co_await http::async_read(c.socket, c.buffer, interim, use_tuple);
        (void)fn;
        if (fec) {
          failed(fec, "reading the answer");
          co_return out;
        }
        out.response = interim.release();
        out.response.keep_alive(false);
        co_return out;
      }
    }
    auto [wec, written] = co_await http::async_write(c.socket, serializer, use_tuple);
    (void)written;
    if (wec) {
      failed(wec, "sending");
      co_return out;
    }
    if (co_await cancelled_meanwhile()) {
      out.ec = make_error_code(errc::cancelled);
      out.detail = "cancelled after sending";
      co_return out;
    }
    http::response_parser<http::string_body> parser;
    limit(parser);
    auto [rec, read] = co_await http::async_read(c.socket, c.buffer, parser, use_tuple);
    (void)read;
    out.got_reply = out.got_reply || parser.got_some();
    if (rec) {
      failed(rec, "reading the answer");
      co_return out;
    }
    out.response = parser.release();
    co_return out;
  }

  std::mutex mutex_;  // guards the pool below
  std::vector<std::unique_ptr<http_metadata_connection>> idle_;
  std::size_t open_ = 0;  // connections (and slots being connected) in existence
  std::deque<std::shared_ptr<http_metadata_waiter>> waiters_;
};

inline http_metadata_lease::~http_metadata_lease() {
  if (client_) client_->release(keep_ ? std::move(connection_) : nullptr);
}

// co_spawn's completion `(exception_ptr, tuple<error_code, T...>)` delivered
// as `(error_code, T...)`. It keeps the caller's cancellation slot (so
// cancellation reaches the coroutine) and runs on the caller's executor,
// else the client's, never on the operation's private strand.
template <class Handler>
class http_metadata_completion {
 public:
  using executor_type = asio::associated_executor_t<Handler, asio::any_io_executor>;
  using allocator_type = asio::associated_allocator_t<Handler>;
  using cancellation_slot_type = asio::associated_cancellation_slot_t<Handler>;

  http_metadata_completion(Handler h, asio::any_io_executor fallback) : handler_(std::move(h)), fallback_(std::move(fallback)) {}
  executor_type get_executor() const noexcept { return asio::get_associated_executor(handler_, fallback_); }
  allocator_type get_allocator() const noexcept { return asio::get_associated_allocator(handler_); }
  cancellation_slot_type get_cancellation_slot() const noexcept { return asio::get_associated_cancellation_slot(handler_); }

  template <class Tuple>
  void operator()(std::exception_ptr e, Tuple r) {
    if (e) std::get<0>(r) = make_error_code(errc::internal);
    std::apply(std::move(handler_), std::move(r));
  }

 private:
  Handler handler_;
  asio::any_io_executor fallback_;
};

}  // namespace detail

//! A metadata backend on an `http_metadata_server`. See the file comment.
class http_metadata {
 public:
  using metadata_backend_concept = metadata_backend_tag;
  using executor_type = asio::any_io_executor;

  //! Throws `std::invalid_argument` when `config` has no host, port 0 or pool_size 0.
  http_metadata(executor_type ex, http_metadata_config config)
      : client_(std::make_shared<detail::http_metadata_client>(std::move(ex), std::move(config))) {}

  //! A client of the server at "http://HOST:PORT" with default settings; the
  //! error says what is wrong with the URL.
  static result<http_metadata> from_url(executor_type ex, std::string_view url) {
    auto config = http_metadata_config::from_url(url);
    if (!config) return config.error();
    return http_metadata(std::move(ex), std::move(*config));
  }

  [[nodiscard]] executor_type get_executor() const noexcept { return client_->ex; }
  [[nodiscard]] const http_metadata_config& config() const noexcept { return client_->config; }
  //! "http://HOST:PORT".
  [[nodiscard]] const std::string& server() const noexcept { return client_->server; }

  //! Creates or overwrites `key`. Completion: `void(std::error_code)`.
  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_put(std::string key, std::string value, CompletionToken&& token) {
    return launch<void(std::error_code)>(
        std::forward<CompletionToken>(token),
        [c = client_, key = std::move(key), value = std::move(value)]() mutable -> asio::awaitable<std::tuple<std::error_code>> {
          std::string target = std::string(detail::http_metadata_keys_path) + detail::percent_encode(key);
          std::string what = "PUT key '" + detail::printable(key) + "'";
          auto req = c->make_request(detail::http::verb::put, std::move(target), std::move(value));
          auto [ec, res] = co_await c->round_trip(std::move(req), what);
          if (!ec) ec = c->refusal_code(res, {detail::http::status::no_content, detail::http::status::ok}, what);
          co_return std::tuple{ec};
        });
  }

  //! The value of `key`; `errc::not_found` when absent.
  template <asio::completion_token_for<void(std::error_code, std::string)> CompletionToken>
  auto async_get(std::string key, CompletionToken&& token) {
    return launch<void(std::error_code, std::string)>(
        std::forward<CompletionToken>(token),
        [c = client_, key = std::move(key)]() -> asio::awaitable<std::tuple<std::error_code, std::string>> {
          std::string target = std::string(detail::http_metadata_keys_path) + detail::percent_encode(key);
          std::string what = "GET key '" + detail::printable(key) + "'";
          auto req = c->make_request(detail::http::verb::get, std::move(target));
          auto [ec, res] = co_await c->round_trip(std::move(req), what);
          if (!ec) ec = c->refusal_code(res, {detail::http::status::ok}, what);
          if (ec) co_return std::tuple{ec, std::string{}};
          co_return std::tuple{std::error_code{}, std::move(res.body())};
        });
  }

  //! Removes `key`; `errc::not_found` when absent.
  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_remove(std::string key, CompletionToken&& token) {
    return launch<void(std::error_code)>(
        std::forward<CompletionToken>(token), [c = client_, key = std::move(key)]() -> asio::awaitable<std::tuple<std::error_code>> {
          std::string target = std::string(detail::http_metadata_keys_path) + detail::percent_encode(key);
          std::string what = "DELETE key '" + detail::printable(key) + "'";
          auto req = c->make_request(detail::http::verb::delete_, std::move(target));
          auto [ec, res] = co_await c->round_trip(std::move(req), what);
          if (!ec) ec = c->refusal_code(res, {detail::http::status::no_content, detail::http::status::ok}, what);
          co_return std::tuple{ec};
        });
  }

  //! Every entry whose key starts with `prefix`, sorted by key (the server's
  //! backend answers it in one call: a snapshot for `embedded_metadata`).
  template <asio::completion_token_for<void(std::error_code, metadata_entries)> CompletionToken>
  auto async_list(std::string prefix, CompletionToken&& token) {
    return launch<void(std::error_code, metadata_entries)>(
        std::forward<CompletionToken>(token),
        [c = client_, prefix = std::move(prefix)]() -> asio::awaitable<std::tuple<std::error_code, metadata_entries>> {
          std::string target = std::string(detail::http_metadata_list_path) + "?prefix=" + detail::percent_encode(prefix);
          std::string what = "list prefix '" + detail::printable(prefix) + "'";
          auto req = c->make_request(detail::http::verb::get, std::move(target));
          auto [ec, res] = co_await c->round_trip(std::move(req), what);
          if (!ec) ec = c->refusal_code(res, {detail::http::status::ok}, what);
          if (ec) co_return std::tuple{ec, metadata_entries{}};
          auto entries = detail::decode_entries_json(res.body());
          if (!entries) {
            c->log_failure(what, errc::malformed_message, "the body is not [[\"key\",\"value\"],...]");
            co_return std::tuple{make_error_code(errc::malformed_message), metadata_entries{}};
          }
          co_return std::tuple{std::error_code{}, std::move(*entries)};
        });
  }

 private:
  template <class Signature, class CompletionToken, class Operation>
  auto launch(CompletionToken&& token, Operation operation) {
    return asio::async_initiate<CompletionToken, Signature>(
        [c = client_](auto handler, Operation operation) {
          using completion = detail::http_metadata_completion<std::decay_t<decltype(handler)>>;
          // A strand per operation: operations run in parallel on a
          // multi-threaded executor, each one's socket and timers serialised.
          asio::co_spawn(asio::make_strand(c->ex), std::move(operation), completion(std::move(handler), c->ex));
        },
        token, std::move(operation));
  }

  std::shared_ptr<detail::http_metadata_client> client_;
};

static_assert(check_metadata_backend<http_metadata>());

}  // namespace kvx::transfer
