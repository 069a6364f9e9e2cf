#pragma once
// The initiating half of the tcp transport: one `tcp_connection` per socket
// to a peer, pipelining many requests matched by request id.
//
// A request moves through queued -> sending (in a gather write) -> awaiting
// (its response not started) -> receiving (its read payload streaming into
// the caller's buffer) -> done. A request's buffers are handed back to the
// caller only when no I/O can touch them any more: a failure completes
// queued and awaiting requests at once, and sending / receiving ones from
// their I/O handler, which a closed socket delivers promptly.
//
// Cancelling a request that is queued removes it; one that is awaiting is
// abandoned (its response is later drained into scratch memory, never into
// the caller's buffer); one whose bytes are on the move mid-frame poisons the
// stream, so the connection is closed and its other requests fail with
// connection_lost (the engine retries those).
//
// Everything runs on the transport's strand.

#include <algorithm>
#include <array>
#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include <boost/asio/associated_cancellation_slot.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/buffer.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/execution/outstanding_work.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/prefer.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/write.hpp>

#include <kvx/core/async.hpp>
#include <kvx/core/log.hpp>
#include <kvx/transport/detail/tcp_config.hpp>
#include <kvx/transport/detail/tcp_protocol.hpp>
#include <kvx/transport/detail/tcp_server.hpp>

namespace kvx::transport::detail {

struct tcp_request;

// Asio's transfer_all caps every read_some / write_some at 64 KiB; a MiB
// payload would take 16 system calls. This condition asks for all that is
// left, so one call moves as much as the socket buffer holds.
struct tcp_transfer_rest {
  std::size_t total;
  std::size_t operator()(const boost::system::error_code& ec, std::size_t done) const noexcept {
    return ec ? 0 : total - done;
  }
};

// One caller operation: its requests (slices) and its handler.
class tcp_transfer {
 public:
  virtual ~tcp_transfer() = default;

  std::string segment;
  std::uint64_t key = 0;
  std::uint64_t generation = 0;
  std::size_t pending = 0;
  std::vector<std::weak_ptr<tcp_request>> requests;

  void record(std::error_code ec) {
    if (ec && !first_error_) first_error_ = ec;
  }
  void finish_one(std::error_code ec) {
    record(ec);
    if (--pending == 0 && !done_) {
      done_ = true;
      complete(first_error_);
    }
  }
  [[nodiscard]] bool done() const noexcept { return done_; }
  //! A cancellation that arrived before `start` cut the op into requests.
  [[nodiscard]] bool cancel_requested() const noexcept { return cancel_requested_; }
  void cancel();

 protected:
  virtual void complete(std::error_code ec) = 0;

 private:
  std::error_code first_error_;
  bool done_ = false;
  bool cancel_requested_ = false;
};

template <class Handler>
class tcp_transfer_op final : public tcp_transfer {
 public:
  using default_executor = asio::any_io_executor;
  using handler_executor = asio::associated_executor_t<Handler, default_executor>;
  using work_type =
      std::decay_t<decltype(asio::prefer(std::declval<handler_executor>(), asio::execution::outstanding_work.tracked))>;

  tcp_transfer_op(Handler h, const default_executor& ex)
      : slot_(asio::get_associated_cancellation_slot(h)),
        work_(asio::prefer(asio::get_associated_executor(h, ex), asio::execution::outstanding_work.tracked)),
        handler_(std::move(h)) {}

  [[nodiscard]] asio::associated_cancellation_slot_t<Handler> slot() const { return slot_; }

 private:
  void complete(std::error_code ec) override {
    auto work = std::move(work_);
    auto h = std::move(handler_);
    // The tracked executor as the fallback, not an any_io_executor made from it: a
    // type-erased handler's (any_completion_executor) does not convert to one.
    auto ex = asio::get_associated_executor(h, work);
    // The slot is cleared there, not on this strand: the caller emits on its own executor.
    asio::dispatch(ex, [h = std::move(h), slot = slot_, ec]() mutable {
      if (slot.is_connected()) slot.clear();
      std::move(h)(ec);
    });
  }

  asio::associated_cancellation_slot_t<Handler> slot_;
  work_type work_;
  Handler handler_;
};

class tcp_connection;

struct tcp_request {
  enum class stage : std::uint8_t { queued, sending, awaiting, receiving, done };

  std::shared_ptr<tcp_transfer> parent;
  std::weak_ptr<tcp_connection> conn;
  tcp_wire::opcode op = tcp_wire::opcode::read;
  std::uint64_t id = 0;
  std::uint64_t offset = 0;
  std::uint64_t length = 0;
  std::byte* dst = nullptr;
  const std::byte* src = nullptr;
  tcp_wire::request_bytes header{};
  stage st = stage::queued;
  bool abandoned = false;
  bool answered = false;  // the owner answered while the request's batch was still being sent
  std::error_code pending_error;
};

class tcp_connection : public std::enable_shared_from_this<tcp_connection> {
 public:
  tcp_connection(tcp_strand strand, asio::ip::tcp::endpoint ep, std::shared_ptr<const tcp_config> cfg,
                 std::shared_ptr<tcp_counters> counters)
      : strand_(std::move(strand)), endpoint_(ep), cfg_(std::move(cfg)), counters_(std::move(counters)) {}

  [[nodiscard]] std::uint64_t outstanding() const noexcept { return outstanding_; }
  [[nodiscard]] bool is_open() const noexcept { return link_ && link_->open; }

  void submit(std::shared_ptr<tcp_request> r) {
    r->id = next_id_++;
    tcp_wire::request_header h;
    h.op = r->op;
    h.name_length = static_cast<std::uint16_t>(r->parent->segment.size());
    h.request_id = r->id;
    h.key = r->parent->key;
    h.generation = r->parent->generation;
    h.offset = r->offset;
    h.length = r->length;
    r->header = tcp_wire::encode_request(h);
    outstanding_ += weight(*r);
    queue_.push_back(std::move(r));
    if (!link_)
      connect();
    else if (link_->open)
      start_write();
  }

  void cancel(const std::shared_ptr<tcp_request>& r) {
    switch (r->st) {
      case tcp_request::stage::queued: {
        auto it = std::find(queue_.begin(), queue_.end(), r);
        if (it != queue_.end()) queue_.erase(it);
        finish(r, errc::cancelled);
        break;
      }
      case tcp_request::stage::awaiting:
        r->abandoned = true;
        r->parent->finish_one(errc::cancelled);
        break;
      case tcp_request::stage::sending:
      case tcp_request::stage::receiving:
        r->parent->record(errc::cancelled);
        fail(errc::connection_lost, "an operation was cancelled with its bytes mid-frame");
        break;
      case tcp_request::stage::done: break;
    }
  }

  //! Closes the socket and fails every request on it with `ec`.
  void fail(std::error_code ec, const std::string& why) {
    if (link_) log(log_level::debug, "tcp transport: connection to ", endpoint_, " failed: ", ec.message(), ": ", why);
    auto l = std::move(link_);
    link_.reset();
    if (l) {
      boost::system::error_code ignored;
      l->socket.close(ignored);
      l->timer.cancel();
    }
    writing_ = false;
    auto queued = std::move(queue_);
    queue_.clear();
    auto flight = std::move(in_flight_);
    in_flight_.clear();
    std::vector<std::shared_ptr<tcp_request>> now(queued.begin(), queued.end());
    for (auto& [id, r] : flight) {
      if (r->st == tcp_request::stage::sending || r->st == tcp_request::stage::receiving) {
        if (!r->pending_error) r->pending_error = ec;  // completed by its I/O handler, which the close delivers
      }
      else
        now.push_back(r);
    }
    for (auto& r : now) finish(r, ec);
  }

 private:
  struct link {
    explicit link(const tcp_strand& s) : socket(s), timer(s) {}
    asio::ip::tcp::socket socket;
    asio::steady_timer timer;
    bool open = false;
    tcp_wire::response_bytes header{};
    std::string text;
    std::array<std::byte, tcp_wire::payload_alignment> pad{};  // a read response's pad lands here
    std::vector<std::byte> scratch;
    std::uint64_t drain_left = 0;
  };
  using link_ptr = std::shared_ptr<link>;

  // Every request weighs at least a header, so empty ones still spread.
  static std::uint64_t weight(const tcp_request& r) noexcept { return r.length + tcp_wire::request_header_size; }

  void finish(const std::shared_ptr<tcp_request>& r, std::error_code ec) {
    if (r->st == tcp_request::stage::done) return;
    r->st = tcp_request::stage::done;
    outstanding_ -= weight(*r);
    if (r->abandoned) return;
    r->parent->finish_one(ec);
  }

  static std::error_code pending_or_lost(const tcp_request& r) {
    return r.pending_error ? r.pending_error : make_error_code(errc::connection_lost);
  }

  void connect() {
    auto l = std::make_shared<link>(strand_);
    link_ = l;
    l->timer.expires_after(cfg_->connect_timeout);
    l->timer.async_wait([self = shared_from_this(), l](const boost::system::error_code& ec) {
      if (ec || self->link_ != l || l->open) return;
      self->fail(errc::unreachable, "connect timed out");
    });
    l->socket.async_connect(endpoint_, [self = shared_from_this(), l](const boost::system::error_code& ec) {
      if (self->link_ != l) return;
      l->timer.cancel();
      if (ec) return self->fail(errc::unreachable, "connect: " + ec.message());
      apply_socket_options(l->socket, *self->cfg_);
      l->open = true;
      self->counters_->connections_opened.fetch_add(1, std::memory_order_relaxed);
      self->start_read(l);
      self->start_write();
    });
  }

  void start_write() {
    if (writing_ || queue_.empty() || !link_ || !link_->open) return;
    writing_ = true;
    auto batch = std::make_shared<std::vector<std::shared_ptr<tcp_request>>>();
    std::vector<asio::const_buffer> buffers;
    std::uint64_t bytes = 0;
    // Gathers several small requests into one sendmsg; large payloads go alone.
    while (!queue_.empty() && batch->size() < 64 && bytes < 1 * MiB) {
      auto r = std::move(queue_.front());
      queue_.pop_front();
      r->st = tcp_request::stage::sending;
      buffers.push_back(asio::buffer(r->header));
      buffers.push_back(asio::buffer(r->parent->segment));
      if (r->op == tcp_wire::opcode::write && r->length != 0)
        buffers.push_back(asio::buffer(r->src, static_cast<std::size_t>(r->length)));
      bytes += weight(*r);
      in_flight_.emplace(r->id, r);
      batch->push_back(std::move(r));
    }
    asio::async_write(link_->socket, buffers, tcp_transfer_rest{asio::buffer_size(buffers)},
                      [self = shared_from_this(), l = link_, batch](const boost::system::error_code& ec, std::size_t n) {
                        bytes_sent_on_this_thread() += n;
                        self->on_written(l, *batch, ec);
                      });
  }

  void on_written(const link_ptr& l, std::vector<std::shared_ptr<tcp_request>>& batch, const boost::system::error_code& ec) {
    if (l == link_) {
      writing_ = false;
      if (ec) fail(errc::connection_lost, "write: " + ec.message());
    }
    if (l != link_) {  // failed, now or before: no byte of this batch is touched any more
      for (auto& r : batch)
        if (r->st == tcp_request::stage::sending) finish(r, r->answered ? r->pending_error : pending_or_lost(*r));
      return;
    }
    for (auto& r : batch) {
      if (r->st != tcp_request::stage::sending) continue;
      if (r->answered)
        finish(r, r->pending_error);
      else
        r->st = tcp_request::stage::awaiting;
    }
    start_write();
  }

  void start_read(const link_ptr& l) {
    asio::async_read(l->socket, asio::buffer(l->header),
                     [self = shared_from_this(), l](const boost::system::error_code& ec, std::size_t) {
                       self->on_response(l, ec);
                     });
  }

  // An answer can arrive while the gathered write that carries its request is
  // still sending (later requests of the batch, or this one's payload when the
  // owner refused it early): that write may still read the caller's buffer,
  // so the request completes from on_written, with this result.
  void answered_while_sending(const link_ptr& l, const std::shared_ptr<tcp_request>& r, std::error_code result) {
    r->answered = true;
    r->pending_error = result;
    start_read(l);
  }

  void on_response(const link_ptr& l, const boost::system::error_code& ec) {
    if (l != link_) return;
    if (ec) return fail(errc::connection_lost, "read: " + ec.message());
    const auto p = tcp_wire::parse_response_header(std::span<const std::byte>(l->header));
    if (p.state != tcp_wire::parse_state::complete) return fail(errc::protocol_error, std::string(p.reason));
    auto it = in_flight_.find(p.header.request_id);
    if (it == in_flight_.end()) return fail(errc::protocol_error, "response to unknown request " + std::to_string(p.header.request_id));
    auto r = it->second;
    if (p.header.status != 0) {
      l->text.resize(static_cast<std::size_t>(p.header.length));
      const auto status = static_cast<errc>(p.header.status);
      asio::async_read(l->socket, asio::buffer(l->text),
                       [self = shared_from_this(), l, r, status](const boost::system::error_code& e, std::size_t) {
                         if (l != self->link_) return;
                         if (e) return self->fail(errc::connection_lost, "read: " + e.message());
                         log(log_level::debug, "tcp transport: peer ", self->endpoint_, " refused request ", r->id, ": ",
                             make_error_code(status).message(), ": ", l->text);
                         self->in_flight_.erase(r->id);
                         if (r->st == tcp_request::stage::sending) return self->answered_while_sending(l, r, status);
                         self->start_read(l);
                         self->finish(r, status);
                       });
      return;
    }
    if (r->op == tcp_wire::opcode::write) {
      if (p.header.length != 0) return fail(errc::protocol_error, "write response carries a payload");
      if (p.header.pad != 0) return fail(errc::protocol_error, "write response carries padding");
      in_flight_.erase(it);
      if (r->st == tcp_request::stage::sending) return answered_while_sending(l, r, {});
      start_read(l);
      return finish(r, {});
    }
    if (p.header.length != r->length) return fail(errc::protocol_error, "read response length differs from the request");
    if (r->abandoned) {
      l->drain_left = p.header.pad + r->length;
      return drain(l, r);
    }
    r->st = tcp_request::stage::receiving;
    // The pad and the payload in one scatter read, straight into the caller's buffer.
    const std::array<asio::mutable_buffer, 2> in{asio::buffer(l->pad.data(), p.header.pad),
                                                 asio::buffer(r->dst, static_cast<std::size_t>(r->length))};
    asio::async_read(l->socket, in, tcp_transfer_rest{p.header.pad + static_cast<std::size_t>(r->length)},
                     [self = shared_from_this(), l, r](const boost::system::error_code& e, std::size_t) {
                       self->on_payload(l, r, e);
                     });
  }

  void on_payload(const link_ptr& l, const std::shared_ptr<tcp_request>& r, const boost::system::error_code& ec) {
    if (l == link_ && ec) fail(errc::connection_lost, "read: " + ec.message());
    if (l != link_) return finish(r, pending_or_lost(*r));
    in_flight_.erase(r->id);
    start_read(l);
    finish(r, {});
  }

  void drain(const link_ptr& l, const std::shared_ptr<tcp_request>& r) {
    if (l->drain_left == 0) {
      in_flight_.erase(r->id);
      start_read(l);
      return finish(r, {});
    }
    if (l->scratch.empty()) l->scratch.resize(64 * 1024);
    const auto n = static_cast<std::size_t>(std::min<std::uint64_t>(l->drain_left, l->scratch.size()));
    asio::async_read(l->socket, asio::buffer(l->scratch.data(), n),
                     [self = shared_from_this(), l, r](const boost::system::error_code& e, std::size_t got) {
                       if (l != self->link_) return;
                       if (e) return self->fail(errc::connection_lost, "read: " + e.message());
                       l->drain_left -= got;
                       self->drain(l, r);
                     });
  }

  tcp_strand strand_;
  asio::ip::tcp::endpoint endpoint_;
  std::shared_ptr<const tcp_config> cfg_;
  std::shared_ptr<tcp_counters> counters_;
  link_ptr link_;
  bool writing_ = false;
  std::uint64_t next_id_ = 1;
  std::uint64_t outstanding_ = 0;
  std::deque<std::shared_ptr<tcp_request>> queue_;
  std::unordered_map<std::uint64_t, std::shared_ptr<tcp_request>> in_flight_;
};

inline void tcp_transfer::cancel() {
  if (done_) return;
  cancel_requested_ = true;  // `start` may not have run yet (a cancellation emitted on the strand)
  auto reqs = requests;  // cancelling may complete this transfer and run the caller's handler
  for (auto& w : reqs)
    if (auto r = w.lock())
      if (auto c = r->conn.lock()) c->cancel(r);
}

}  // namespace kvx::transport::detail
