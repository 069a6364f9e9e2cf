#pragma once
// kvx_pd_demo: the control channel between the router process and its
// workers: one TCP connection per worker carrying JSON objects, one per line.
// The KV bytes never pass here (they go through the transfer engines); this
// carries requests, push targets, per-layer notices and results.
#include "common.hpp"

#include <boost/asio/connect.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/read_until.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/streambuf.hpp>
#include <boost/asio/write.hpp>

namespace pd_demo {

using tcp_socket = asio::ip::tcp::socket;

//! One end of a JSON-lines connection. `send` may be called from any thread;
//! handlers run on the channel's strand, one at a time.
class channel : public std::enable_shared_from_this<channel> {
 public:
  static constexpr std::size_t max_line = 64u << 20;  // a push target of a long prompt is a few MiB at most

  using message_handler = std::function<void(const nlohmann::json&)>;
  using close_handler = std::function<void(std::error_code, const std::string&)>;

  explicit channel(tcp_socket s) : socket_(std::move(s)), strand_(asio::make_strand(socket_.get_executor())), in_(max_line) {}

  //! Starts reading; `on_message` gets each object, `on_close` once when the
  //! peer goes away, sends a line that is not a JSON object, or `on_message`
  //! throws (a missing or mistyped field): the channel closes then.
  void start(message_handler on_message, close_handler on_close) {
    on_message_ = std::move(on_message);
    on_close_ = std::move(on_close);
    asio::dispatch(strand_, [self = shared_from_this()] { self->read(); });
  }

  void send(const nlohmann::json& j) {
    auto line = std::make_shared<std::string>(j.dump());
    line->push_back('\n');
    asio::post(strand_, [self = shared_from_this(), line] {
      if (self->closed_) return;
      self->out_.push_back(std::move(*line));
      if (self->out_.size() == 1) self->write();
    });
  }

  //! Runs `then` on the strand once every line sent before this call has
  //! been written to the socket (at once when none is waiting).
  void drain(std::function<void()> then) {
    asio::post(strand_, [self = shared_from_this(), then = std::move(then)]() mutable {
      if (self->out_.empty()) return then();
      self->drained_.push_back(std::move(then));
    });
  }

  void close() {
    asio::post(strand_, [self = shared_from_this()] { self->shut(std::error_code{}, "closed by this side"); });
  }

 private:
  void read() {
    asio::async_read_until(socket_, in_, '\n', asio::bind_executor(strand_, [self = shared_from_this()](std::error_code ec, std::size_t n) {
      if (ec) return self->shut(ec, ec == std::error_code(boost::system::error_code(asio::error::not_found)) ? "a line longer than 64 MiB" : ec.message());
      std::string line(asio::buffers_begin(self->in_.data()), asio::buffers_begin(self->in_.data()) + static_cast<std::ptrdiff_t>(n));
      self->in_.consume(n);
      auto j = nlohmann::json::parse(line, nullptr, false);
      if (j.is_discarded() || !j.is_object() || !j.contains("op") || !j["op"].is_string())
        return self->shut(make_error_code(kvx::errc::malformed_message), "a line that is not a JSON object with an \"op\"");
      try {
        if (self->on_message_) self->on_message_(j);
      } catch (const std::exception& e) {
        // A field missing or of the wrong type (nlohmann::json throws), or a
        // reply from a peer the message is not for: as malformed as a line
        // that is not JSON. Uncaught, it ended the process.
        return self->shut(make_error_code(kvx::errc::malformed_message), std::string("a malformed message: ") + e.what());
      }
      if (!self->closed_) self->read();
    }));
  }

  // out_.front() is the line being written: it stays until the write's
  // handler runs, even when the channel shuts meanwhile (the handler then
  // drops the rest).
  void write() {
    asio::async_write(socket_, asio::buffer(out_.front()), asio::bind_executor(strand_, [self = shared_from_this()](std::error_code ec, std::size_t) {
      if (self->closed_) return self->out_.clear();
      if (ec) return self->shut(ec, ec.message());
      self->out_.pop_front();
      if (!self->out_.empty()) return self->write();
      for (auto& then : std::exchange(self->drained_, {})) then();
    }));
  }

  void shut(std::error_code ec, const std::string& why) {
    if (closed_) return;
    closed_ = true;
    boost::system::error_code ignored;
    socket_.shutdown(tcp_socket::shutdown_both, ignored);
    socket_.close(ignored);
    if (auto h = std::move(on_close_)) h(ec, why);
    on_message_ = nullptr;
  }

  tcp_socket socket_;
  asio::strand<asio::any_io_executor> strand_;
  asio::streambuf in_;
  std::deque<std::string> out_;
  std::vector<std::function<void()>> drained_;  // drain() callbacks waiting for out_ to empty
  bool closed_ = false;
  message_handler on_message_;
  close_handler on_close_;
};

//! Steady-clock time as nanoseconds: CLOCK_MONOTONIC is one clock for every
//! process on the host, so workers report instants the router can subtract.
inline std::int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(clock_type::now().time_since_epoch()).count();
}

}  // namespace pd_demo
