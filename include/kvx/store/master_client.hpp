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
//! Following a master that fails over: `create(ex, lookup)` takes a
//! function that finds the master's "host:port" (`leader_lookup` in
//! `elected_master.hpp` asks etcd who leads). The client looks it up before
//! connecting, and again after the connection failed (`connection_lost`,
//! `unreachable`, `protocol_error`) or a standby answered (`errc::stale`).
//! Requests in flight when that happens are not retried (a `put_commit` may
//! or may not have been applied): they complete with that error, and later
//! calls go to the master found then. A lookup that finds no master is
//! `unreachable`; a value that is not "host:port" is `malformed_message`,
//! and both say so in the response's "message".
//!
//! Runs on one strand; calls may be started from any thread.

#include <charconv>
#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>

#include <boost/asio/any_completion_handler.hpp>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/connect.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>

#include <kvx/core/async.hpp>
#include <kvx/core/log.hpp>
#include <kvx/store/protocol.hpp>

namespace kvx::store {

//! A master's "host:port" split in two; `malformed_message` naming `what`
//! (and the value) when it is not that shape or the port is not 1..65535.
inline result<std::pair<std::string, std::string>> split_master_endpoint(std::string_view endpoint, std::string_view what) {
  const auto colon = endpoint.rfind(':');
  auto bad = [&](const char* why) {
    return error{errc::malformed_message, std::string(what) + " '" + std::string(endpoint) + "' is not host:port (" + why + ")"};
  };
  if (colon == std::string_view::npos) return bad("no port");
  const auto host = endpoint.substr(0, colon);
  const auto port = endpoint.substr(colon + 1);
  if (host.empty()) return bad("no host");
  unsigned value = 0;
  const auto [end, ec] = std::from_chars(port.data(), port.data() + port.size(), value);
  if (port.empty() || ec != std::errc{} || end != port.data() + port.size() || value == 0 || value > 65535)
    return bad("port must be 1..65535");
  return std::pair{std::string(host), std::string(port)};
}

class master_client : public std::enable_shared_from_this<master_client> {
 public:
  using executor_type = asio::any_io_executor;
  using json = protocol::json;
  using handler_type = asio::any_completion_handler<void(std::error_code, json)>;

  //! Finds the master: completes with its "host:port".
  using endpoint_lookup = std::function<void(asio::any_completion_handler<void(std::error_code, std::string)>)>;

  //! `endpoint` is "host:port" (loopback in tests).
  static std::shared_ptr<master_client> create(executor_type ex, std::string endpoint) {
    return std::shared_ptr<master_client>(new master_client(std::move(ex), std::move(endpoint), nullptr));
  }
  //! A client that finds the master with `lookup` and follows it when it
  //! changes (see the file comment).
  static std::shared_ptr<master_client> create(executor_type ex, endpoint_lookup lookup) {
    return std::shared_ptr<master_client>(new master_client(std::move(ex), {}, std::move(lookup)));
  }

  [[nodiscard]] executor_type get_executor() const { return strand_; }
  //! The master's "host:port": the last one looked up for a following client.
  [[nodiscard]] std::string endpoint() const {
    std::lock_guard lock(endpoint_mutex_);
    return endpoint_;
  }

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

  //! Sends `request` as a notification (`"reply": false`): the master acts
  //! on it in order with this client's other requests and answers nothing.
  //! It rides with the next write (a call's, or one under way), and leaves
  //! on its own at the latest `notify_linger` after the flush timer was
  //! armed; one not yet written when the connection fails is dropped.
  //! The timer is armed when a notification finds it idle and is never
  //! cancelled: one arming per `notify_linger` at most, not one arming and
  //! one cancel per notification (which cost a store get of 64 KiB 29 us
  //! at the median on the 2-core VM; docs/benchmarks.md).
  void notify(json request) {
    asio::dispatch(strand_, [self = shared_from_this(), req = std::move(request)]() mutable { self->start_notify(std::move(req)); });
  }

  //! The longest a notification waits for a write to ride with.
  static constexpr std::chrono::microseconds notify_linger{1000};

  //! Closes the connection; requests in flight complete with `connection_lost`.
  void close() {
    asio::dispatch(strand_, [self = shared_from_this()] { self->fail_all(errc::connection_lost, "closed by the client"); });
  }

 private:
  master_client(executor_type ex, std::string endpoint, endpoint_lookup lookup)
      : strand_(asio::make_strand(ex)), endpoint_(std::move(endpoint)), lookup_(std::move(lookup)), flush_(strand_) {}

  // One connection attempt and what is written on it. Each has its own
  // socket: operations of a connection that failed (or was closed) complete
  // later with errors, and must find it is no longer `conn_` instead of
  // failing the calls of the next one.
  struct connection {
    explicit connection(const asio::strand<executor_type>& s) : socket(s) {}
    asio::ip::tcp::socket socket;
    bool writing = false;
    std::string frames;  // what the write under way sends
  };
  [[nodiscard]] bool current(const std::shared_ptr<connection>& c) const { return conn_ == c; }

  void start_notify(json req) {
    req["id"] = ++next_id_;
    req["reply"] = false;
    auto frame = protocol::try_encode_frame(req);
    if (!frame) {
      log(log_level::warn, "store client: master ", endpoint_, ": notification dropped: ", frame.error().context());
      return;
    }
    outbox_.push_back(std::move(*frame));
    if (state_ != state::connected) return send_outbox();
    // A write under way takes it along when it completes; else the next
    // call's write, or the flush timer, whichever comes first.
    if ((conn_ && conn_->writing) || flush_armed_) return;
    flush_armed_ = true;
    flush_.expires_after(notify_linger);
    // A weak reference: the pending wait must not keep the client alive (the
    // timer is its member, so a strong one is a cycle that outlives its
    // owners and leaks at exit when the io_context is not run to the end).
    flush_.async_wait([weak = weak_from_this()](boost::system::error_code) {
      auto self = weak.lock();
      if (!self) return;
      self->flush_armed_ = false;
      self->start_write();
    });
  }

  // Connects, or writes the outbox unless a write is under way (its completion writes what waits).
  void send_outbox() {
    if (state_ == state::idle) {
      state_ = state::connecting;
      conn_ = std::make_shared<connection>(strand_);
      // An exception (none is expected) must not end the connection silently,
      // leaving its calls to hang: they fail with `internal` instead.
      asio::co_spawn(strand_, connect_and_run(shared_from_this(), conn_), [self = shared_from_this(), c = conn_](std::exception_ptr e) {
        if (e && self->current(c)) self->fail_all(errc::internal, "the connection ended by an exception: " + exception_message(e));
      });
    } else {
      start_write();
    }
  }

  void start_call(json req, handler_type h, asio::cancellation_slot slot) {
    const auto id = ++next_id_;
    req["id"] = id;
    // JSON text is UTF-8: a key or name that is not would make the encoding
    // throw here, in a strand handler, out of io.run(). Refuse the call.
    auto frame = protocol::try_encode_frame(req);
    if (!frame) {
      kvx::detail::post_completion(strand_, std::move(h), make_error_code(errc::invalid_argument),
                                   json{{"message", frame.error().context()}});
      return;
    }
    pending_.emplace(id, std::move(h));
    if (slot.is_connected()) {
      slot.assign([weak = weak_from_this(), id](asio::cancellation_type_t) {
        if (auto self = weak.lock())
          asio::dispatch(self->strand_, [self, id] { self->complete(id, errc::cancelled, {}); });
      });
    }
    outbox_.push_back(std::move(*frame));
    send_outbox();
  }

  void complete(std::uint64_t id, std::error_code ec, json body) {
    auto it = pending_.find(id);
    if (it == pending_.end()) return;  // already completed (cancelled, or answered)
    auto h = std::move(it->second);
    pending_.erase(it);
    kvx::detail::post_completion(strand_, std::move(h), ec, std::move(body));
  }

  void fail_all(errc code, const std::string& why) {
    if (conn_) {
      boost::system::error_code ignored;
      conn_->socket.close(ignored);
      conn_.reset();
    }
    outbox_.clear();
    state_ = state::idle;
    // A following client looks the master up again after any failure.
    if (lookup_ && code != errc::cancelled) looked_up_ = false;
    auto pending = std::move(pending_);
    pending_.clear();
    if (!pending.empty()) log(log_level::info, "store client: master ", endpoint_, ": ", why);
    for (auto& [id, h] : pending)
      kvx::detail::post_completion(strand_, std::move(h), make_error_code(code), json{{"message", why}});
  }

  // A following client's master, looked up when the last one failed.
  // False when the attempt ends here (failed, or superseded meanwhile).
  static asio::awaitable<bool> look_up(std::shared_ptr<master_client> self, const std::shared_ptr<connection>& c) {
    if (!self->lookup_ || self->looked_up_) co_return true;
    auto token = asio::as_tuple(asio::use_awaitable);
    auto [ec, found] = co_await asio::async_initiate<decltype(token), void(std::error_code, std::string)>(
        [&self](auto h) { self->lookup_(std::move(h)); }, token);
    if (!self->current(c)) co_return false;
    if (ec == errc::not_found) {
      self->fail_all(errc::unreachable, "no master leads now (lookup found none)");
      co_return false;
    }
    if (ec) {
      self->fail_all(ec == errc::malformed_message ? errc::malformed_message : errc::unreachable,
                     "looking up the master: " + ec.message());
      co_return false;
    }
    if (auto parts = split_master_endpoint(found, "master endpoint from the lookup"); !parts) {
      self->fail_all(errc::malformed_message, parts.error().context());
      co_return false;
    }
    {
      std::lock_guard lock(self->endpoint_mutex_);
      self->endpoint_ = std::move(found);
    }
    self->looked_up_ = true;
    co_return true;
  }

  // After each wait: a close (or another failure) meanwhile ended this
  // attempt, and the client may already be on the next one.
  static asio::awaitable<void> connect_and_run(std::shared_ptr<master_client> self, std::shared_ptr<connection> c) {
    if (!co_await look_up(self, c)) co_return;
    auto parts = split_master_endpoint(self->endpoint_, "master endpoint");
    if (!parts) {
      self->fail_all(errc::invalid_argument, parts.error().context());
      co_return;
    }
    asio::ip::tcp::resolver resolver(self->strand_);
    auto [rec, results] = co_await resolver.async_resolve(parts->first, parts->second, asio::as_tuple(asio::use_awaitable));
    if (!self->current(c)) co_return;
    if (rec) {
      self->fail_all(errc::unreachable, "resolve failed: " + rec.message());
      co_return;
    }
    auto [cec, ep] = co_await asio::async_connect(c->socket, results, asio::as_tuple(asio::use_awaitable));
    if (!self->current(c)) co_return;
    if (cec) {
      self->fail_all(errc::unreachable, "connect failed: " + cec.message());
      co_return;
    }
    boost::system::error_code ignored;
    c->socket.set_option(asio::ip::tcp::no_delay(true), ignored);
    self->state_ = state::connected;
    self->start_write();
    co_await read_loop(self, c);
  }

  // Every frame waiting goes in one write; what is queued meanwhile goes in
  // the next. A plain completion handler on the strand (the socket's
  // executor), not a coroutine per write: no frame to allocate, no post.
  void start_write() {
    if (!conn_ || conn_->writing || state_ != state::connected || outbox_.empty()) return;
    auto c = conn_;
    c->writing = true;
    c->frames.clear();
    for (auto& f : outbox_) c->frames += f;
    outbox_.clear();
    asio::async_write(c->socket, asio::buffer(c->frames), [self = shared_from_this(), c](boost::system::error_code ec, std::size_t) {
      c->writing = false;
      if (!self->current(c)) return;
      if (ec) return self->fail_all(errc::connection_lost, "write failed: " + ec.message());
      self->start_write();
    });
  }

  static asio::awaitable<void> read_loop(std::shared_ptr<master_client> self, std::shared_ptr<connection> c) {
    protocol::frame_decoder decoder;
    std::array<char, 64 * 1024> buf;
    for (;;) {
      auto [ec, n] = co_await c->socket.async_read_some(asio::buffer(buf), asio::as_tuple(asio::use_awaitable));
      if (!self->current(c)) co_return;
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
        if (!checked && checked.code() == errc::stale && self->lookup_) {
          // A standby answered: every request sent to it gets the same
          // answer, and the next call looks the leader up again.
          self->fail_all(errc::stale, "the master at " + self->endpoint_ + " refused: " + checked.error().context());
          co_return;
        }
        if (checked)
          self->complete(id, {}, std::move(*checked));
        else
          self->complete(id, checked.code(), json{{"message", checked.error().context()}});
      }
    }
  }

  enum class state { idle, connecting, connected };

  asio::strand<executor_type> strand_;
  mutable std::mutex endpoint_mutex_;  // endpoint_ is written on the strand, read from anywhere
  std::string endpoint_;
  endpoint_lookup lookup_;
  bool looked_up_ = false;
  std::shared_ptr<connection> conn_;  // the attempt under way or connected; none while idle
  state state_ = state::idle;
  asio::steady_timer flush_;  // writes notifications no call took along
  bool flush_armed_ = false;
  std::uint64_t next_id_ = 0;
  std::map<std::uint64_t, handler_type> pending_;
  std::deque<std::string> outbox_;
};

}  // namespace kvx::store
