#pragma once
//! \file
//! `master_client`: pipelined requests to the store master over one TCP
//! connection, each an Asio operation completing with
//! `void(std::error_code, nlohmann::json)`. Connects lazily and again after
//! a failure; when the connection drops, every request in flight completes
//! with `errc::connection_lost`. Give each call a deadline with
//! `kvx::cancel_after`: a cancelled request completes with `cancelled` (or
//! `timed_out`) and its late response is discarded.
//!
//! Runs on one strand; calls may be started from any thread.

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <string>

#include <boost/asio/any_completion_handler.hpp>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/connect.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>

#include <kvx/core/async.hpp>
#include <kvx/core/log.hpp>
#include <kvx/store/protocol.hpp>

namespace kvx::store {

class master_client : public std::enable_shared_from_this<master_client> {
 public:
  using executor_type = asio::any_io_executor;
  using json = protocol::json;
  using handler_type = asio::any_completion_handler<void(std::error_code, json)>;

  //! `endpoint` is "host:port" (loopback in tests).
  static std::shared_ptr<master_client> create(executor_type ex, std::string endpoint) {
    return std::shared_ptr<master_client>(new master_client(std::move(ex), std::move(endpoint)));
  }

  [[nodiscard]] executor_type get_executor() const { return strand_; }
  [[nodiscard]] const std::string& endpoint() const noexcept { return endpoint_; }

  //! Sends `request` (its "id" is assigned here) and completes with the
  //! master's answer: the response object, or the error it carries.
  template <asio::completion_token_for<void(std::error_code, json)> CompletionToken>
  auto async_call(json request, CompletionToken&& token) {
    return asio::async_initiate<CompletionToken, void(std::error_code, json)>(
        [self = shared_from_this()](auto handler, json req) {
          auto slot = asio::get_associated_cancellation_slot(handler);
          asio::dispatch(self->strand_, [self, req = std::move(req), h = handler_type(std::move(handler)), slot]() mutable {
            self->start_call(std::move(req), std::move(h), slot);
          });
        },
        token, std::move(request));
  }

  //! Closes the connection; requests in flight complete with `connection_lost`.
  void close() {
    asio::dispatch(strand_, [self = shared_from_this()] { self->fail_all(errc::connection_lost, "closed by the client"); });
  }

 private:
  master_client(executor_type ex, std::string endpoint)
      : strand_(asio::make_strand(ex)), endpoint_(std::move(endpoint)), socket_(strand_) {}

  void start_call(json req, handler_type h, asio::cancellation_slot slot) {
    const auto id = ++next_id_;
    req["id"] = id;
    pending_.emplace(id, std::move(h));
    if (slot.is_connected()) {
      slot.assign([weak = weak_from_this(), id](asio::cancellation_type_t) {
        if (auto self = weak.lock())
          asio::dispatch(self->strand_, [self, id] { self->complete(id, errc::cancelled, {}); });
      });
    }
    outbox_.push_back(protocol::encode_frame(req));
    if (state_ == state::idle) {
      state_ = state::connecting;
      asio::co_spawn(strand_, connect_and_run(shared_from_this()), asio::detached);
    } else if (state_ == state::connected && !writing_) {
      asio::co_spawn(strand_, write_loop(shared_from_this()), asio::detached);
    }
  }

  void complete(std::uint64_t id, std::error_code ec, json body) {
    auto it = pending_.find(id);
    if (it == pending_.end()) return;  // already completed (cancelled, or answered)
    auto h = std::move(it->second);
    pending_.erase(it);
    kvx::detail::post_completion(strand_, std::move(h), ec, std::move(body));
  }

  void fail_all(errc code, const std::string& why) {
    boost::system::error_code ignored;
    socket_.close(ignored);
    outbox_.clear();
    state_ = state::idle;
    auto pending = std::move(pending_);
    pending_.clear();
    if (!pending.empty()) log(log_level::info, "store client: master ", endpoint_, ": ", why);
    for (auto& [id, h] : pending) kvx::detail::post_completion(strand_, std::move(h), make_error_code(code), json{});
  }

  static asio::awaitable<void> connect_and_run(std::shared_ptr<master_client> self) {
    const auto colon = self->endpoint_.rfind(':');
    if (colon == std::string::npos) {
      self->fail_all(errc::invalid_argument, "bad endpoint");
      co_return;
    }
    asio::ip::tcp::resolver resolver(self->strand_);
    auto [rec, results] = co_await resolver.async_resolve(self->endpoint_.substr(0, colon), self->endpoint_.substr(colon + 1),
                                                          asio::as_tuple(asio::use_awaitable));
    if (rec) {
      self->fail_all(errc::unreachable, "resolve failed: " + rec.message());
      co_return;
    }
    auto [cec, ep] = co_await asio::async_connect(self->socket_, results, asio::as_tuple(asio::use_awaitable));
    if (cec) {
      self->fail_all(errc::unreachable, "connect failed: " + cec.message());
      co_return;
    }
    boost::system::error_code ignored;
    self->socket_.set_option(asio::ip::tcp::no_delay(true), ignored);
    self->state_ = state::connected;
    asio::co_spawn(self->strand_, write_loop(self), asio::detached);
    co_await read_loop(self);
  }

  static asio::awaitable<void> write_loop(std::shared_ptr<master_client> self) {
    if (self->writing_) co_return;
    self->writing_ = true;
    while (self->state_ == state::connected && !self->outbox_.empty()) {
      std::string frame = std::move(self->outbox_.front());
      self->outbox_.pop_front();
      auto [ec, n] = co_await asio::async_write(self->socket_, asio::buffer(frame), asio::as_tuple(asio::use_awaitable));
      if (ec) {
        self->writing_ = false;
        self->fail_all(errc::connection_lost, "write failed: " + ec.message());
        co_return;
      }
    }
    self->writing_ = false;
  }

  static asio::awaitable<void> read_loop(std::shared_ptr<master_client> self) {
    protocol::frame_decoder decoder;
    std::array<char, 64 * 1024> buf;
    for (;;) {
      auto [ec, n] = co_await self->socket_.async_read_some(asio::buffer(buf), asio::as_tuple(asio::use_awaitable));
      if (ec) {
        self->fail_all(errc::connection_lost, "connection lost: " + ec.message());
        co_return;
      }
      decoder.feed(std::string_view(buf.data(), n));
      for (;;) {
        auto frame = decoder.next();
        if (!frame) {
          self->fail_all(errc::protocol_error, frame.error().message());
          co_return;
        }
        if (!*frame) break;
        auto body = json::parse(**frame, nullptr, false);
        if (body.is_discarded() || !body.is_object() || !body.contains("id") || !body["id"].is_number_unsigned()) {
          self->fail_all(errc::protocol_error, "unparseable response from the master");
          co_return;
        }
        const auto id = body["id"].get<std::uint64_t>();
        auto checked = protocol::check_response(std::move(body));
        if (checked)
          self->complete(id, {}, std::move(*checked));
        else
          self->complete(id, checked.code(), json{{"message", checked.error().context()}});
      }
    }
  }

  enum class state { idle, connecting, connected };

  asio::strand<executor_type> strand_;
  std::string endpoint_;
  asio::ip::tcp::socket socket_;
  state state_ = state::idle;
  bool writing_ = false;
  std::uint64_t next_id_ = 0;
  std::map<std::uint64_t, handler_type> pending_;
  std::deque<std::string> outbox_;
};

}  // namespace kvx::store
