#pragma once
//! \file
//! `kvx::transfer::http_metadata_server<Backend>`: serves any
//! `metadata_backend` (typically the `embedded_metadata` of one process) over
//! HTTP/1.1, so other processes reach it with `kvx::transfer::http_metadata`
//! (`kvx/transfer/http_metadata.hpp`): the role of Mooncake's HTTP metadata
//! server. Opt-in: it needs Boost.Beast (headers only).
//!
//! Routes (`<key>` is percent-encoded, so one key is one path segment; a
//! literal '/' in the path is taken as part of the key, for curl users):
//!
//! | request | answer |
//! | --- | --- |
//! | `PUT /kvx/v1/keys/<key>`, body = value | 204 |
//! | `GET /kvx/v1/keys/<key>` | 200, body = value; 404 when absent |
//! | `DELETE /kvx/v1/keys/<key>` | 204; 404 when absent |
//! | `GET /kvx/v1/list?prefix=<prefix>` | 200, `[["key","value"],...]` sorted by key (each byte one code point U+0000-U+00FF) |
//!
//! A refused request gets a 4xx (unknown route 404, wrong method 405, bad
//! percent-encoding or malformed HTTP 400, body above `max_body` 413, headers
//! above 64 KiB 431) with a short text reason, and never reaches the backend.
//! A backend error is a 5xx whose body is the error's message. Every refusal
//! carries a `kvx-error` header naming the `kvx::errc` (`not_found`,
//! `capacity_exceeded`, ...), which the client turns back into that code.
//! Connections are keep-alive; one idle longer than `idle_timeout` is closed
//! (0: never, as the client's `timeout`; a negative one is refused by `start`).
//!
//! Threading: each connection runs on its own strand, the listener on
//! another, so any number of threads may run the executor. `start`, `stop`
//! and the accessors may be called from any thread. Once `stop()` (or the
//! destructor) returns, the backend is never touched again, so it may be
//! destroyed then; sockets close on the executor shortly after.
//!
//! \code
//! asio::io_context io;
//! kvx::transfer::embedded_metadata meta(io.get_executor());
//! kvx::transfer::http_metadata_server server(io.get_executor(), meta);  // 127.0.0.1, ephemeral port
//! if (auto started = server.start(); !started) return fail(started.error().message());
//! publish(server.url());  // "http://127.0.0.1:40123", for kvx::transfer::http_metadata::from_url
//! io.run();
//! \endcode

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <string_view>
#include <system_error>
#include <tuple>
#include <utility>
#include <variant>
#include <vector>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core/error.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/string.hpp>
#include <boost/beast/core/tcp_stream.hpp>
#include <boost/beast/http/empty_body.hpp>
#include <boost/beast/http/error.hpp>
#include <boost/beast/http/message.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/string_body.hpp>
#include <boost/beast/http/write.hpp>

#include <kvx/core/async.hpp>
#include <kvx/core/log.hpp>
#include <kvx/core/result.hpp>
#include <kvx/transfer/detail/http_metadata_protocol.hpp>
#include <kvx/transfer/metadata_backend.hpp>

namespace kvx::transfer {

//! Settings of an `http_metadata_server`.
struct http_metadata_server_config {
  std::string address = "127.0.0.1";                //!< IP address to listen on ("0.0.0.0": every interface)
  std::uint16_t port = 0;                           //!< 0: an ephemeral port, read back with `endpoint()`
  std::size_t max_body = std::size_t{1} << 20;      //!< largest PUT body accepted (413 above)
  //! A connection idle (or stalled mid-request) this long is closed; 0: never; at most 24 h.
  std::chrono::milliseconds idle_timeout{30'000};
};

namespace detail {

namespace http = boost::beast::http;

//! What a well-formed request asks of the backend.
struct http_metadata_request {
  enum class operation { get, put, remove, list };
  operation op;
  std::string key;  //!< the prefix for `list`
};

//! A refusal: the status, the errc its `kvx-error` header names, a short reason.
struct http_metadata_refusal {
  http::status status;
  errc code;
  std::string reason;
};

//! The backend call `method target` asks for, or why it is refused.
inline std::variant<http_metadata_request, http_metadata_refusal> route_http_metadata_request(http::verb method,
                                                                                            std::string_view target) {
  using op = http_metadata_request::operation;
  auto refuse = [](http::status s, errc c, std::string why) { return http_metadata_refusal{s, c, std::move(why)}; };
  auto wrong_method = [&](std::string_view allowed) {
    return refuse(http::status::method_not_allowed, errc::not_supported,
                  std::string(http::to_string(method)) + " is not allowed here (allowed: " + std::string(allowed) + ")");
  };
  if (target.starts_with(http_metadata_keys_path)) {
    const auto encoded = target.substr(http_metadata_keys_path.size());
    if (encoded.find('?') != std::string_view::npos)
      return refuse(http::status::bad_request, errc::invalid_argument, "a key route takes no query (encode '?' as %3F)");
    auto key = percent_decode(encoded);
    if (!key) return refuse(http::status::bad_request, errc::invalid_argument, "bad percent-encoding in the key");
    switch (method) {
      case http::verb::get: return http_metadata_request{op::get, std::move(*key)};
      case http::verb::put: return http_metadata_request{op::put, std::move(*key)};
      case http::verb::delete_: return http_metadata_request{op::remove, std::move(*key)};
      default: return wrong_method("GET, PUT, DELETE");
    }
  }
  const auto query_at = target.find('?');
  if (target.substr(0, query_at) == http_metadata_list_path) {
    if (method != http::verb::get) return wrong_method("GET");
    std::string prefix;
    std::string_view query = query_at == std::string_view::npos ? std::string_view{} : target.substr(query_at + 1);
    while (!query.empty()) {
      const auto amp = query.find('&');
      const auto param = query.substr(0, amp);
      query = amp == std::string_view::npos ? std::string_view{} : query.substr(amp + 1);
      if (param.empty()) continue;
      if (!param.starts_with("prefix="))
        return refuse(http::status::bad_request, errc::invalid_argument,
                      "unknown query parameter '" + printable(param.substr(0, param.find('='))) + "' (expected prefix=)");
      auto decoded = percent_decode(param.substr(7));
      if (!decoded) return refuse(http::status::bad_request, errc::invalid_argument, "bad percent-encoding in the prefix");
      prefix = std::move(*decoded);
    }
    return http_metadata_request{op::list, std::move(prefix)};
  }
  return refuse(http::status::not_found, errc::not_supported,
                "no such route (routes: /kvx/v1/keys/<key>, /kvx/v1/list?prefix=<prefix>)");
}

//! The refusal for a request Beast could not read; nothing when the
//! connection just ended or failed (no answer is due).
inline std::optional<http_metadata_refusal> refusal_of_read_error(const boost::system::error_code& ec) {
  if (ec.category() != http::make_error_code(http::error::end_of_stream).category()) return std::nullopt;
  if (ec == http::error::end_of_stream || ec == http::error::partial_message) return std::nullopt;
  if (ec == http::error::body_limit)
    return http_metadata_refusal{http::status::payload_too_large, errc::capacity_exceeded, "body above the server's max_body"};
  if (ec == http::error::header_limit)
    return http_metadata_refusal{http::status::request_header_fields_too_large, errc::capacity_exceeded,
                                 "headers above 64 KiB"};
  return http_metadata_refusal{http::status::bad_request, errc::malformed_message, "malformed HTTP request: " + ec.message()};
}

//! The status a backend error is answered with.
inline http::status status_of_backend_error(const std::error_code& ec) {
  if (ec == errc::timed_out) return http::status::gateway_timeout;
  if (ec == errc::unreachable || ec == errc::connection_lost) return http::status::service_unavailable;
  return http::status::internal_server_error;
}

template <class Signature>
struct refused_completion;
template <class... Ts>
struct refused_completion<void(std::error_code, Ts...)> {
  template <class Handler>
  static void post(const asio::any_io_executor& ex, Handler&& handler) {
    kvx::detail::post_completion(ex, std::forward<Handler>(handler), make_error_code(errc::cancelled), Ts{}...);
  }
};

inline constexpr std::size_t http_metadata_header_limit = 64 * 1024;

template <class Backend>
class http_metadata_service : public std::enable_shared_from_this<http_metadata_service<Backend>> {
 public:
  using executor_type = asio::any_io_executor;
  using tcp = asio::ip::tcp;

  http_metadata_service(executor_type ex, Backend& backend, http_metadata_server_config config)
      : ex_(std::move(ex)), backend_(&backend), config_(std::move(config)), accept_strand_(asio::make_strand(ex_)),
        acceptor_(accept_strand_) {}

  result<void> start() {
    std::lock_guard lock(mutex_);
    if (stopped_) return error{errc::invalid_argument, "http_metadata_server: stopped; a stopped server does not restart"};
    if (started_) return error{errc::invalid_argument, "http_metadata_server: already started on " + url_locked()};
    // Negative would end every read before it starts: connections closed unanswered.
    if (config_.idle_timeout.count() < 0)
      return error{errc::invalid_argument, "http_metadata_server: config field 'idle_timeout': " +
                                               std::to_string(config_.idle_timeout.count()) + " ms is negative (0: never)"};
    if (config_.idle_timeout > detail::http_metadata_max_timeout)
      return error{errc::invalid_argument, "http_metadata_server: config field 'idle_timeout': " +
                                               std::to_string(config_.idle_timeout.count()) + " ms is longer than " +
                                               std::to_string(detail::http_metadata_max_timeout.count()) + " ms (0: never)"};
    boost::system::error_code ec;
    const auto address = asio::ip::make_address(config_.address, ec);
    if (ec)
      return error{errc::invalid_argument,
                   "http_metadata_server: config field 'address': '" + config_.address + "' is not an IP address"};
    const tcp::endpoint wanted(address, config_.port);
    const std::string where = config_.address + ":" + std::to_string(config_.port);
    acceptor_.open(wanted.protocol(), ec);
    if (!ec) acceptor_.set_option(tcp::acceptor::reuse_address(true), ec);
    if (!ec) acceptor_.bind(wanted, ec);
    if (!ec) acceptor_.listen(asio::socket_base::max_listen_connections, ec);
    if (!ec) bound_ = acceptor_.local_endpoint(ec);
    if (ec) {
      boost::system::error_code ignored;
      acceptor_.close(ignored);
      return error{to_std(ec), "http_metadata_server: cannot listen on " + where + ": " + ec.message()};
    }
    started_ = true;
    asio::co_spawn(accept_strand_, accept_loop(this->shared_from_this()), log_escape("accept loop"));
    return {};
  }

  void stop() {
    {
      // Waits for backend calls being started; none starts afterwards.
      std::unique_lock gate(gate_mutex_);
      gate_closed_ = true;
    }
    std::vector<std::shared_ptr<connection>> open;
    {
      std::lock_guard lock(mutex_);
      if (stopped_) return;
      stopped_ = true;
      for (auto& weak : connections_)
        if (auto c = weak.lock()) open.push_back(std::move(c));
      connections_.clear();
    }
    asio::post(accept_strand_, [self = this->shared_from_this()] {
      boost::system::error_code ignored;
      self->acceptor_.close(ignored);
    });
    for (auto& c : open) asio::post(c->stream.get_executor(), [c] { c->stream.close(); });
  }

  [[nodiscard]] tcp::endpoint endpoint() const {
    std::lock_guard lock(mutex_);
    return bound_;
  }
  [[nodiscard]] std::string url() const {
    std::lock_guard lock(mutex_);
    return url_locked();
  }
  [[nodiscard]] std::uint64_t connections_accepted() const noexcept { return accepted_.load(std::memory_order_relaxed); }

 private:
  struct connection {
    explicit connection(tcp::socket s) : stream(std::move(s)) {}
    boost::beast::tcp_stream stream;  // its executor is the connection's strand
    boost::beast::flat_buffer buffer;
  };

  using response = http::response<http::string_body>;
  static constexpr auto use_tuple = asio::as_tuple(asio::use_awaitable);

  std::string url_locked() const {
    const auto a = bound_.address();
    return "http://" + (a.is_v6() ? "[" + a.to_string() + "]" : a.to_string()) + ":" + std::to_string(bound_.port());
  }

  static auto log_escape(const char* what) {
    return [what](std::exception_ptr e) {
      if (e) log(log_level::error, "kvx http_metadata_server: ", what, " ended by an exception: ", exception_message(e));
    };
  }

  static asio::awaitable<void> accept_loop(std::shared_ptr<http_metadata_service> self) {
    for (;;) {
      auto strand = asio::make_strand(self->ex_);
      auto [ec, socket] = co_await self->acceptor_.async_accept(strand, use_tuple);
      if (!self->acceptor_.is_open()) co_return;
      if (ec) {
        // Out of descriptors and the like: pause instead of spinning.
        log(log_level::warn, "kvx http_metadata_server: accept: ", ec.message());
        asio::steady_timer pause(self->accept_strand_, std::chrono::milliseconds(50));
        co_await pause.async_wait(use_tuple);
        continue;
      }
      boost::system::error_code ignored;
      socket.set_option(tcp::no_delay(true), ignored);
      auto c = std::make_shared<connection>(std::move(socket));
      {
        std::lock_guard lock(self->mutex_);
        if (self->stopped_) co_return;
        std::erase_if(self->connections_, [](const std::weak_ptr<connection>& w) { return w.expired(); });
        self->connections_.push_back(c);
      }
      self->accepted_.fetch_add(1, std::memory_order_relaxed);
      asio::co_spawn(strand, serve(self, c), log_escape("connection"));
    }
  }

  static asio::awaitable<void> serve(std::shared_ptr<http_metadata_service> self, std::shared_ptr<connection> c) {
    for (;;) {
      http::request_parser<http::string_body> parser;
      parser.body_limit(self->config_.max_body);
      parser.header_limit(http_metadata_header_limit);
      self->arm_idle_timeout(*c);
      auto [ec, n] = co_await http::async_read_header(c->stream, c->buffer, parser, use_tuple);
      if (!ec && parser.content_length() && *parser.content_length() > self->config_.max_body) {
        // Refused on its headers: a client that asked (Expect: 100-continue)
        // then never sends the body, however large.
        ec = http::error::body_limit;
      } else if (!ec && !parser.is_done()) {
        // curl asks before sending a body above 1 KiB and would otherwise wait a second.
        if (boost::beast::iequals(parser.get()[http::field::expect], "100-continue")) {
          http::response<http::empty_body> go_on{http::status::continue_, 11};
          auto [cec, cn] = co_await http::async_write(c->stream, go_on, use_tuple);
          (void)cn;
          if (cec) break;
        }
        std::tie(ec, n) = co_await http::async_read(c->stream, c->buffer, parser, use_tuple);
      }
      (void)n;
      if (ec) {
        if (auto refusal = refusal_of_read_error(ec)) co_await refuse_and_close(self, c, std::move(*refusal));
        break;
      }
      auto request = parser.release();
      auto res = co_await answer(self, request);
      // Stopped meanwhile: no answer, so a client sees a closed connection
      // (and tries elsewhere) rather than an error made up here.
      if (self->stopping()) break;
      res.version(request.version());
      res.keep_alive(request.keep_alive());
      res.set(http::field::server, "kvx-metadata");
      res.prepare_payload();
      self->arm_idle_timeout(*c);
      auto [wec, wn] = co_await http::async_write(c->stream, res, use_tuple);
      (void)wn;
      if (wec || !request.keep_alive()) break;
    }
    c->stream.close();
  }

  static response refusal_response(const http_metadata_refusal& r, unsigned version) {
    response res{r.status, version};
    res.set(http::field::content_type, "text/plain");
    res.set(http_metadata_error_field, kvx::to_string(r.code));
    res.body() = r.reason + "\n";
    return res;
  }

  // Answers a request that could not be read, then closes. The client may
  // still be sending (a body over the limit): its bytes are read and dropped
  // for a while, so closing does not reset the connection before it has
  // read the answer.
  static asio::awaitable<void> refuse_and_close(std::shared_ptr<http_metadata_service> self,
                                                std::shared_ptr<connection> c, http_metadata_refusal refusal) {
    auto res = refusal_response(refusal, 11);
    res.keep_alive(false);
    res.set(http::field::server, "kvx-metadata");
    res.prepare_payload();
    self->arm_idle_timeout(*c);
    auto [wec, wn] = co_await http::async_write(c->stream, res, use_tuple);
    (void)wn;
    if (wec) co_return;
    boost::system::error_code ignored;
    c->stream.socket().shutdown(tcp::socket::shutdown_send, ignored);
    // Draining is bounded even when idle connections are kept forever.
    const std::chrono::steady_clock::duration drain_for = std::chrono::seconds(2);
    c->stream.expires_after(self->config_.idle_timeout.count() == 0 ? drain_for
                                                                     : std::min<std::chrono::steady_clock::duration>(
                                                                           self->config_.idle_timeout, drain_for));
    std::vector<char> sink(64 * 1024);
    for (;;) {
      auto [rec, got] = co_await c->stream.async_read_some(asio::buffer(sink), use_tuple);
      (void)got;
      if (rec) break;
    }
  }

  void arm_idle_timeout(connection& c) const {
    if (config_.idle_timeout.count() == 0)
      c.stream.expires_never();
    else
      c.stream.expires_after(config_.idle_timeout);
  }

  bool stopping() {
    std::shared_lock gate(gate_mutex_);
    return gate_closed_;
  }

  // Starts a backend operation unless the server stopped (then it completes
  // with errc::cancelled): holding the gate while it starts is what lets
  // stop() promise that the backend is not touched afterwards.
  template <class Signature, class Start>
  auto gated(Start start) {
    return asio::async_initiate<decltype(use_tuple), Signature>(
        [self = this->shared_from_this()](auto handler, Start start) {
          std::shared_lock gate(self->gate_mutex_);
          if (self->gate_closed_) {
            gate.unlock();
            refused_completion<Signature>::post(self->ex_, std::move(handler));
            return;
          }
          start(*self->backend_, std::move(handler));
        },
        use_tuple, std::move(start));
  }

  static response backend_failure(const std::error_code& ec, unsigned version) {
    if (ec == errc::not_found) return refusal_response({http::status::not_found, errc::not_found, "no such key"}, version);
    const errc code = ec.category() == kvx::error_category() ? static_cast<errc>(ec.value()) : errc::io_error;
    return refusal_response({status_of_backend_error(ec), code, "metadata backend: " + ec.message()}, version);
  }

  static asio::awaitable<response> answer(std::shared_ptr<http_metadata_service> self,
                                          http::request<http::string_body>& request) {
    using op = http_metadata_request::operation;
    const unsigned version = request.version();
    auto routed = route_http_metadata_request(request.method(), request.target());
    if (auto* refusal = std::get_if<http_metadata_refusal>(&routed)) co_return refusal_response(*refusal, version);
    // Named, not temporaries inside the co_await: GCC 12 ends such a
    // temporary's life before the operation starts.
    auto& call = std::get<http_metadata_request>(routed);
    response res{http::status::no_content, version};
    switch (call.op) {
      case op::put: {
        auto start = [key = std::move(call.key), value = std::move(request.body())](Backend& b, auto h) mutable {
          b.async_put(std::move(key), std::move(value), std::move(h));
        };
        auto [ec] = co_await self->template gated<void(std::error_code)>(std::move(start));
        if (ec) co_return backend_failure(ec, version);
        break;
      }
      case op::remove: {
        auto start = [key = std::move(call.key)](Backend& b, auto h) mutable { b.async_remove(std::move(key), std::move(h)); };
        auto [ec] = co_await self->template gated<void(std::error_code)>(std::move(start));
        if (ec) co_return backend_failure(ec, version);
        break;
      }
      case op::get: {
        auto start = [key = std::move(call.key)](Backend& b, auto h) mutable { b.async_get(std::move(key), std::move(h)); };
        auto [ec, value] = co_await self->template gated<void(std::error_code, std::string)>(std::move(start));
        if (ec) co_return backend_failure(ec, version);
        res.result(http::status::ok);
        res.set(http::field::content_type, "application/octet-stream");
        res.body() = std::move(value);
        break;
      }
      case op::list: {
        auto start = [prefix = std::move(call.key)](Backend& b, auto h) mutable {
          b.async_list(std::move(prefix), std::move(h));
        };
        auto [ec, entries] = co_await self->template gated<void(std::error_code, metadata_entries)>(std::move(start));
        if (ec) co_return backend_failure(ec, version);
        res.result(http::status::ok);
        res.set(http::field::content_type, "application/json");
        res.body() = encode_entries_json(entries);
        break;
      }
    }
    co_return res;
  }

  executor_type ex_;
  Backend* backend_;
  const http_metadata_server_config config_;
  asio::strand<executor_type> accept_strand_;
  tcp::acceptor acceptor_;  // used on accept_strand_ once started

  mutable std::mutex mutex_;  // guards the members below
  bool started_ = false;
  bool stopped_ = false;
  tcp::endpoint bound_;
  std::vector<std::weak_ptr<connection>> connections_;

  std::shared_mutex gate_mutex_;
  bool gate_closed_ = false;
  std::atomic<std::uint64_t> accepted_{0};
};

}  // namespace detail

//! An HTTP/1.1 server for a metadata backend. See the file comment.
template <class Backend>
class http_metadata_server {
  static_assert(check_metadata_backend<Backend>());

 public:
  using executor_type = asio::any_io_executor;
  using backend_type = Backend;

  //! Serves `backend` (not owned: it must outlive `stop()`) once `start()`ed.
  http_metadata_server(executor_type ex, Backend& backend, http_metadata_server_config config = {})
      : service_(std::make_shared<detail::http_metadata_service<Backend>>(std::move(ex), backend, std::move(config))) {}
  http_metadata_server(const http_metadata_server&) = delete;
  http_metadata_server& operator=(const http_metadata_server&) = delete;
  ~http_metadata_server() { stop(); }

  //! Binds and listens; the error names the address when it cannot (in use,
  //! not an IP address, already started or stopped).
  result<void> start() { return service_->start(); }

  //! Stops accepting and closes every connection (requests in flight get no
  //! answer). Returns at once; afterwards the backend is never touched.
  void stop() { service_->stop(); }

  //! The bound address and port (after a successful `start()`).
  [[nodiscard]] asio::ip::tcp::endpoint endpoint() const { return service_->endpoint(); }
  //! "http://127.0.0.1:PORT", what `http_metadata::from_url` takes.
  [[nodiscard]] std::string url() const { return service_->url(); }
  //! Connections accepted so far (tests check that clients reuse theirs).
  [[nodiscard]] std::uint64_t connections_accepted() const noexcept { return service_->connections_accepted(); }

 private:
  std::shared_ptr<detail::http_metadata_service<Backend>> service_;
};

}  // namespace kvx::transfer
