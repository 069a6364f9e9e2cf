#pragma once
//! \file
//! `master_server`: the store master behind a TCP socket. Sessions read
//! length-prefixed JSON requests (`protocol.hpp`) and answer them through the
//! `master_handler`; a timer runs the master's `tick` (lease expiry, dead
//! nodes, re-replication planning, watermark eviction). Every session, the
//! acceptor and the ticker run on one strand, so the master state is touched
//! by one thread at a time however many threads run the io_context (its
//! operations take microseconds; the data plane never passes through it).
//! `start` and `stop` are called from outside the io_context's threads
//! before it runs or after it stopped, or from the strand.
//!
//! A server built without a state is a standby: it listens, and answers
//! every request with `errc::stale` ("standby: ..."), so clients that follow
//! the leader (`master_client` with an endpoint lookup) look again. `serve`
//! and `refuse` switch it on the strand (`get_executor()`); `refuse` closes
//! every session at once, so requests in flight end with `connection_lost`
//! at their clients and no request is answered from a state being dropped.
//! `elected_master` drives them from an etcd election.
//!
//! \code
//! asio::io_context io;
//! kvx::store::master_state<kvx::cache::eviction::lru> state;
//! kvx::store::master_server server(io.get_executor(), state, {.address = "127.0.0.1", .port = 0});
//! server.start();                // listening on server.port()
//! io.run();
//! \endcode

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <utility>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>

#include <kvx/core/async.hpp>
#include <kvx/core/log.hpp>
#include <kvx/store/master_handler.hpp>

namespace kvx::store {

struct master_server_config {
  std::string address = "127.0.0.1";
  std::uint16_t port = 0;  //!< 0: an ephemeral port, read back with `port()`
  std::chrono::milliseconds tick_interval{200};
};

template <class MasterState>
class master_server {
 public:
  using executor_type = asio::any_io_executor;

  //! Serves `state`. If it keeps ledgers (`master_config::recover_objects`),
  //! nodes' reports wait the longest put lease (`put_lease_cap()`): this may
  //! be a restarted master whose predecessor's writers still hold tickets
  //! (`elected_master` holds them for its takeover grace instead).
  master_server(executor_type ex, MasterState& state, master_server_config config = {})
      : ex_(ex), strand_(asio::make_strand(ex)), handler_(std::in_place, state), config_(std::move(config)),
        acceptor_(ex), ticker_(strand_) {
    if constexpr (requires { state.hold_recovery_until(clock::now()); })
      state.hold_recovery_until(clock::now() + state.config().put_lease_cap());
  }

  //! A standby: refuses every request with `errc::stale` until `serve`.
  master_server(executor_type ex, master_server_config config)
      : ex_(ex), strand_(asio::make_strand(ex)), config_(std::move(config)), acceptor_(ex), ticker_(strand_) {}

  master_server(const master_server&) = delete;
  master_server& operator=(const master_server&) = delete;
  ~master_server() { stop(); }

  //! Binds and starts accepting; an error if the address cannot be bound.
  result<void> start() {
    boost::system::error_code ec;
    auto addr = asio::ip::make_address(config_.address, ec);
    if (ec) return error{errc::invalid_argument, "master address '" + config_.address + "': " + ec.message()};
    asio::ip::tcp::endpoint ep(addr, config_.port);
    acceptor_.open(ep.protocol(), ec);
    if (!ec) acceptor_.set_option(asio::ip::tcp::acceptor::reuse_address(true), ec);
    if (!ec) acceptor_.bind(ep, ec);
    if (!ec) acceptor_.listen(asio::socket_base::max_listen_connections, ec);
    if (ec) return error{to_std(ec), "master listen on " + config_.address + ":" + std::to_string(config_.port)};
    alive_ = std::make_shared<bool>(true);
    asio::co_spawn(strand_, accept_loop(alive_), asio::detached);
    asio::co_spawn(strand_, tick_loop(alive_), asio::detached);
    return {};
  }

  //! Stops accepting and closes every session; in-flight requests are dropped.
  //! On the strand, like `serve` and `refuse` (or while no thread runs its
  //! io_context): it closes sockets the sessions' coroutines are reading.
  void stop() {
    if (alive_) *alive_ = false;
    boost::system::error_code ignored;
    acceptor_.close(ignored);
    ticker_.cancel();
    close_sessions();
  }

  //! Answers requests from `state` from now on; `admit`, when set, is asked
  //! first about each request and may refuse it (an error response).
  //! On the strand.
  void serve(MasterState& state, std::function<result<void>(const protocol::request&)> admit = {}) {
    handler_.emplace(state);
    admit_ = std::move(admit);
  }
  //! Stops answering from a state: closes every session and answers later
  //! requests with `errc::stale` and `why`. On the strand.
  void refuse(std::string why) {
    handler_.reset();
    admit_ = nullptr;
    refusal_ = std::move(why);
    close_sessions();
  }
  //! Replaces the admission check `serve` set (empty: admit everything). On the strand.
  void set_admission(std::function<result<void>(const protocol::request&)> admit) { admit_ = std::move(admit); }
  [[nodiscard]] bool serving() const noexcept { return handler_.has_value(); }

  //! The strand every session, the ticker and `serve`/`refuse` run on.
  [[nodiscard]] asio::strand<executor_type> get_executor() const { return strand_; }
  [[nodiscard]] std::uint16_t port() const { return acceptor_.local_endpoint().port(); }
  [[nodiscard]] std::string endpoint() const { return config_.address + ":" + std::to_string(port()); }

 private:
  using socket_ptr = std::shared_ptr<asio::ip::tcp::socket>;

  void close_sessions() {
    boost::system::error_code ignored;
    for (auto& s : sessions_) {
      if (auto sock = s.lock()) sock->close(ignored);
    }
    sessions_.clear();
  }

  protocol::json answer(std::string_view body) {
    if (handler_ && !admit_) return handler_->handle(body, clock::now());
    auto req = protocol::parse_request(body);
    if (!req) return protocol::error_response(0, req.error());
    // A refused notification is dropped without an answer, like its outcome would be.
    if (!handler_) return req->reply ? protocol::error_response(req->id, error{errc::stale, refusal_}) : protocol::json();
    if (auto admitted = admit_(*req); !admitted)
      return req->reply ? protocol::error_response(req->id, admitted.error()) : protocol::json();
    return handler_->handle(body, clock::now());
  }

  asio::awaitable<void> accept_loop(std::shared_ptr<bool> alive) {
    while (*alive) {
      auto [ec, sock] = co_await acceptor_.async_accept(asio::as_tuple(asio::use_awaitable));
      if (ec) co_return;
      sock.set_option(asio::ip::tcp::no_delay(true), ec);
      auto s = std::make_shared<asio::ip::tcp::socket>(std::move(sock));
      std::erase_if(sessions_, [](const std::weak_ptr<asio::ip::tcp::socket>& w) { return w.expired(); });
      sessions_.push_back(s);
      asio::co_spawn(strand_, session(s, alive), asio::detached);
    }
  }

  asio::awaitable<void> session(socket_ptr sock, std::shared_ptr<bool> alive) {
    protocol::frame_decoder decoder;
    std::array<char, 64 * 1024> buf;
    std::string replies;
    for (;;) {
      auto [ec, n] = co_await sock->async_read_some(asio::buffer(buf), asio::as_tuple(asio::use_awaitable));
      if (ec || !*alive) co_return;
      decoder.feed(std::string_view(buf.data(), n));
      for (;;) {
        auto frame = decoder.next();
        if (!frame) {
          // The stream cannot be resynchronised: answer once, then close.
          auto reply = protocol::encode_frame(protocol::error_response(0, frame.error()));
          co_await asio::async_write(*sock, asio::buffer(reply), asio::as_tuple(asio::use_awaitable));
          boost::system::error_code ignored;
          sock->close(ignored);
          co_return;
        }
        if (!*frame) break;
        // Answers to the frames of one read go back in one write; a
        // notification (null) gets none.
        if (auto response = answer(**frame); !response.is_null()) replies += protocol::encode_frame(response);
      }
      if (replies.empty()) continue;
      auto [wec, wn] = co_await asio::async_write(*sock, asio::buffer(replies), asio::as_tuple(asio::use_awaitable));
      if (wec) co_return;
      replies.clear();
    }
  }

  asio::awaitable<void> tick_loop(std::shared_ptr<bool> alive) {
    while (*alive) {
      ticker_.expires_after(config_.tick_interval);
      auto [ec] = co_await ticker_.async_wait(asio::as_tuple(asio::use_awaitable));
      if (ec || !*alive) co_return;
      if (!handler_) continue;
      auto report = handler_->tick(clock::now());
      for (const auto& n : report.dropped_nodes) log(log_level::warn, "store master: node '", n, "' stopped heartbeating; dropped");
      for (const auto& k : report.lost_objects) log(log_level::warn, "store master: object '", k.full(), "' lost with its nodes");
      if (report.freed_drained_copies > 0)
        log(log_level::info, "store master: gave back ", report.freed_drained_copies, " copies on draining nodes (whole elsewhere)");
    }
  }

  executor_type ex_;
  asio::strand<executor_type> strand_;
  std::optional<master_handler<MasterState>> handler_;  // empty: a standby
  std::function<result<void>(const protocol::request&)> admit_;
  std::string refusal_ = "standby: not the leading master";
  master_server_config config_;
  asio::ip::tcp::acceptor acceptor_;
  asio::steady_timer ticker_;
  std::shared_ptr<bool> alive_;
  std::vector<std::weak_ptr<asio::ip::tcp::socket>> sessions_;
};

}  // namespace kvx::store
