#pragma once
// The peer-side half of the tcp transport: accepts connections and serves
// read/write requests against the transport's segment_table. Every request is
// checked (segment, key, bounds, generation) before a byte moves; the payload
// moves straight between the socket and the region (a gather write for reads,
// a read into the region for writes); a read's payload is padded to a 64-byte
// boundary of what this thread has sent (tcp_protocol.hpp says why).
// Malformed or truncated frames get an error frame and the connection is
// closed, since the stream position is lost.
//
// Everything runs on the transport's strand.

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <boost/asio/buffer.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/write.hpp>

#include <kvx/core/async.hpp>
#include <kvx/core/log.hpp>
#include <kvx/memory/segment_table.hpp>
#include <kvx/transport/detail/tcp_config.hpp>
#include <kvx/transport/detail/tcp_protocol.hpp>

namespace kvx::transport::detail {

using tcp_strand = asio::strand<asio::any_io_executor>;

struct tcp_counters {
  std::atomic<std::uint64_t> connections_opened{0};
  std::atomic<std::uint64_t> sessions_accepted{0};
  std::atomic<std::uint64_t> requests_served{0};
  std::atomic<std::uint64_t> requests_refused{0};
};

inline void apply_socket_options(asio::ip::tcp::socket& s, const tcp_config& cfg) {
  boost::system::error_code ignored;
  s.set_option(asio::ip::tcp::no_delay(cfg.no_delay), ignored);
  if (cfg.socket_buffer != 0) {
    s.set_option(asio::socket_base::send_buffer_size(static_cast<int>(cfg.socket_buffer)), ignored);
    s.set_option(asio::socket_base::receive_buffer_size(static_cast<int>(cfg.socket_buffer)), ignored);
  }
}

// Bytes this thread has written to tcp sockets. Linux copies what a thread
// sends into one page fragment per thread, whatever the socket, so this
// count (not a socket's own) is what read_padding aligns a payload against.
inline std::uint64_t& bytes_sent_on_this_thread() noexcept {
  thread_local std::uint64_t sent = 0;
  return sent;
}

class tcp_server;

class tcp_session : public std::enable_shared_from_this<tcp_session> {
 public:
  tcp_session(asio::ip::tcp::socket socket, std::shared_ptr<memory::segment_table> table, const tcp_config& cfg,
              std::weak_ptr<tcp_server> server, std::shared_ptr<tcp_counters> counters)
      : socket_(std::move(socket)), table_(std::move(table)), limits_{cfg.max_request}, server_(std::move(server)),
        counters_(std::move(counters)) {}

  void start() {
    boost::system::error_code ignored;
    socket_.non_blocking(true, ignored);
    read_header();
  }

  //! Stops serving: no I/O touches a region after this returns, and the pin is released.
  void close() {
    boost::system::error_code ignored;
    socket_.shutdown(asio::socket_base::shutdown_both, ignored);
    socket_.close(ignored);
    access_ = {};
    closed_ = true;
  }

  [[nodiscard]] bool is_using(const std::string& segment) const {
    return access_.size() != 0 && access_.segment().name == segment;
  }

 private:
  void read_header() {
    if (closed_) return;
    asio::async_read(socket_, asio::buffer(header_),
                     [self = shared_from_this()](const boost::system::error_code& ec, std::size_t n) {
                       self->on_header(ec, n);
                     });
  }

  void on_header(const boost::system::error_code& ec, std::size_t n) {
    if (closed_) return;
    if (ec) {
      if (ec == asio::error::eof && n > 0)
        return refuse_and_close(0, errc::truncated_message,
                                "request header truncated after " + std::to_string(n) + " of 48 bytes");
      return finish();
    }
    const auto parsed = tcp_wire::parse_request_header(std::span<const std::byte>(header_), limits_);
    request_ = parsed.header;
    if (parsed.state != tcp_wire::parse_state::complete)
      return refuse_and_close(parsed.header.request_id, parsed.code, std::string(parsed.reason));
    name_.resize(request_.name_length);
    asio::async_read(socket_, asio::buffer(name_), [self = shared_from_this()](const boost::system::error_code& e, std::size_t) {
      self->on_name(e);
    });
  }

  void on_name(const boost::system::error_code& ec) {
    if (closed_) return;
    if (ec) {
      if (ec == asio::error::eof) return refuse_and_close(request_.request_id, errc::truncated_message, "segment name truncated");
      return finish();
    }
    auto access = table_->check_access(name_, request_.key, request_.offset, request_.length);
    if (!access) return refuse(access.code(), access.error().context());
    if (access->segment().generation != request_.generation)
      return refuse(errc::stale, "segment '" + name_ + "' generation " + std::to_string(access->segment().generation) +
                                     ", request names " + std::to_string(request_.generation));
    access_ = std::move(*access);
    counters_->requests_served.fetch_add(1, std::memory_order_relaxed);
    moved_ = 0;
    if (request_.op == tcp_wire::opcode::read) {
      const auto pad = tcp_wire::read_padding(bytes_sent_on_this_thread());
      const auto header = tcp_wire::encode_response(0, request_.request_id, request_.length, pad);
      std::copy(header.begin(), header.end(), read_head_.begin());
      std::fill_n(read_head_.begin() + header.size(), pad, std::byte{0});
      read_head_size_ = header.size() + pad;
      send_payload();
    } else {
      receive_payload();
    }
  }

  // The region's bytes move with non-blocking calls made inside this
  // session's handlers, waiting for readiness in between, so the pin is
  // released in the very handler that moves the last byte: a peer that sees
  // its op complete never finds the segment still pinned by a completion
  // handler waiting in the queue (deregister_memory would wait for it).
  void send_payload() {
    for (;;) {
      const std::size_t total = read_head_size_ + static_cast<std::size_t>(access_.size());
      const std::size_t head = std::min(moved_, read_head_size_);
      const std::size_t body = moved_ - head;
      const std::array<asio::const_buffer, 2> out{
          asio::buffer(read_head_.data() + head, read_head_size_ - head),
          asio::buffer(access_.data() + body, static_cast<std::size_t>(access_.size()) - body)};
      boost::system::error_code ec;
      const std::size_t n = socket_.write_some(out, ec);
      if (ec == asio::error::would_block || ec == asio::error::try_again) {
        socket_.async_wait(asio::socket_base::wait_write, [self = shared_from_this()](const boost::system::error_code& e) {
          if (self->closed_) return;
          if (e) return self->finish();
          self->send_payload();
        });
        return;
      }
      if (ec) return finish();
      moved_ += n;
      bytes_sent_on_this_thread() += n;
      if (moved_ == total) {
        access_ = {};
        return read_header();
      }
    }
  }

  void receive_payload() {
    for (;;) {
      const std::size_t total = static_cast<std::size_t>(access_.size());
      if (moved_ == total) {
        access_ = {};
        return respond_ok();
      }
      boost::system::error_code ec;
      const std::size_t n = socket_.read_some(asio::buffer(access_.data() + moved_, total - moved_), ec);
      if (ec == asio::error::would_block || ec == asio::error::try_again) {
        socket_.async_wait(asio::socket_base::wait_read, [self = shared_from_this()](const boost::system::error_code& e) {
          if (self->closed_) return;
          if (e) return self->finish();
          self->receive_payload();
        });
        return;
      }
      if (ec) {
        access_ = {};
        if (ec == asio::error::eof)
          return refuse_and_close(request_.request_id, errc::truncated_message, "write payload truncated");
        return finish();
      }
      moved_ += n;
    }
  }

  void respond_ok() {
    response_ = tcp_wire::encode_response(0, request_.request_id, 0);
    asio::async_write(socket_, asio::buffer(response_), [self = shared_from_this()](const boost::system::error_code& e, std::size_t n) {
      if (e) return self->finish();
      bytes_sent_on_this_thread() += n;
      self->read_header();
    });
  }

  // A well-formed request the owner refuses: answer and keep the connection
  // (a write's payload is drained so the stream stays in step).
  void refuse(std::error_code code, std::string text) {
    counters_->requests_refused.fetch_add(1, std::memory_order_relaxed);
    log(log_level::debug, "tcp server: refused request ", request_.request_id, ": ", code.message(), ": ", text);
    if (request_.op == tcp_wire::opcode::write && request_.length != 0) {
      drain_left_ = request_.length;
      pending_code_ = code;
      pending_text_ = std::move(text);
      return drain();
    }
    send_error(request_.request_id, code, std::move(text), false);
  }

  void drain() {
    if (closed_) return;
    if (drain_left_ == 0) return send_error(request_.request_id, pending_code_, std::move(pending_text_), false);
    if (scratch_.empty()) scratch_.resize(64 * 1024);
    const auto n = static_cast<std::size_t>(std::min<std::uint64_t>(drain_left_, scratch_.size()));
    asio::async_read(socket_, asio::buffer(scratch_.data(), n),
                     [self = shared_from_this()](const boost::system::error_code& e, std::size_t got) {
                       if (e) return self->finish();
                       self->drain_left_ -= got;
                       self->drain();
                     });
  }

  // A frame that cannot be trusted: answer, then close cleanly.
  void refuse_and_close(std::uint64_t id, std::error_code code, std::string text) {
    counters_->requests_refused.fetch_add(1, std::memory_order_relaxed);
    log(log_level::debug, "tcp server: closing a connection: ", code.message(), ": ", text);
    send_error(id, code, std::move(text), true);
  }

  void send_error(std::uint64_t id, std::error_code code, std::string text, bool then_close) {
    if (text.size() > tcp_wire::max_error_text) text.resize(tcp_wire::max_error_text);
    error_text_ = std::move(text);
    response_ = tcp_wire::encode_response(tcp_wire::status_of(code), id, error_text_.size());
    const std::array<asio::const_buffer, 2> out{asio::buffer(response_), asio::buffer(error_text_)};
    asio::async_write(socket_, out, [self = shared_from_this(), then_close](const boost::system::error_code& e, std::size_t n) {
      if (e) return self->finish();
      bytes_sent_on_this_thread() += n;
      if (then_close) {
        boost::system::error_code ignored;
        self->socket_.shutdown(asio::socket_base::shutdown_send, ignored);
        self->drain_left_ = 1 * MiB;
        return self->linger();
      }
      self->read_header();
    });
  }

  // Closing with unread bytes queued makes the kernel send a reset, which can
  // destroy the error frame before the peer reads it; so read (a bounded
  // amount) until the peer closes its side, then close.
  void linger() {
    if (closed_) return;
    if (scratch_.empty()) scratch_.resize(64 * 1024);
    socket_.async_read_some(asio::buffer(scratch_), [self = shared_from_this()](const boost::system::error_code& e, std::size_t n) {
      if (e || n >= self->drain_left_) return self->finish();
      self->drain_left_ -= n;
      self->linger();
    });
  }

  void finish();

  asio::ip::tcp::socket socket_;
  std::shared_ptr<memory::segment_table> table_;
  tcp_wire::limits limits_;
  std::weak_ptr<tcp_server> server_;
  std::shared_ptr<tcp_counters> counters_;
  std::array<std::byte, tcp_wire::request_header_size> header_{};
  tcp_wire::request_header request_{};
  std::string name_;
  memory::segment_access access_;
  tcp_wire::response_bytes response_{};
  // A read's response header and its pad, sent in one gather with the payload.
  std::array<std::byte, tcp_wire::response_header_size + tcp_wire::payload_alignment> read_head_{};
  std::size_t read_head_size_ = 0;
  std::string error_text_;
  std::vector<std::byte> scratch_;
  std::uint64_t drain_left_ = 0;
  std::error_code pending_code_;
  std::string pending_text_;
  std::size_t moved_ = 0;
  bool closed_ = false;
};

class tcp_server : public std::enable_shared_from_this<tcp_server> {
 public:
  tcp_server(tcp_strand strand, std::shared_ptr<memory::segment_table> table, tcp_config cfg,
             std::shared_ptr<tcp_counters> counters)
      : strand_(std::move(strand)), acceptor_(strand_), table_(std::move(table)), cfg_(std::move(cfg)),
        counters_(std::move(counters)) {}

  //! Binds and listens; set-up errors carry the address.
  result<void> listen() {
    boost::system::error_code ec;
    const auto addr = asio::ip::make_address(cfg_.address, ec);
    if (ec) return error{errc::invalid_argument, "tcp transport: bad listen address '" + cfg_.address + "'"};
    const asio::ip::tcp::endpoint ep(addr, cfg_.port);
    acceptor_.open(ep.protocol(), ec);
    if (!ec) acceptor_.set_option(asio::socket_base::reuse_address(true), ec);
    if (!ec) acceptor_.bind(ep, ec);
    if (!ec) acceptor_.listen(asio::socket_base::max_listen_connections, ec);
    if (ec)
      return error{to_std(ec), "tcp transport: cannot listen on " + cfg_.address + ":" + std::to_string(cfg_.port) + ": " +
                                   ec.message()};
    endpoint_ = acceptor_.local_endpoint(ec);
    return {};
  }

  void start() { accept(); }

  [[nodiscard]] const asio::ip::tcp::endpoint& endpoint() const noexcept { return endpoint_; }

  void shutdown() {
    boost::system::error_code ignored;
    acceptor_.close(ignored);
    for (auto& s : sessions_) s->close();
    sessions_.clear();
  }

  //! Closes the sessions moving bytes of `segment` and releases their pins.
  void revoke(const std::string& segment) {
    for (auto it = sessions_.begin(); it != sessions_.end();) {
      if ((*it)->is_using(segment)) {
        (*it)->close();
        it = sessions_.erase(it);
      } else {
        ++it;
      }
    }
  }

  void forget(const std::shared_ptr<tcp_session>& s) { sessions_.erase(s); }

 private:
  void accept() {
    acceptor_.async_accept(strand_, [self = shared_from_this()](const boost::system::error_code& ec, asio::ip::tcp::socket s) {
      if (ec == asio::error::operation_aborted || !self->acceptor_.is_open()) return;
      if (!ec) {
        apply_socket_options(s, self->cfg_);
        self->counters_->sessions_accepted.fetch_add(1, std::memory_order_relaxed);
        auto session = std::make_shared<tcp_session>(std::move(s), self->table_, self->cfg_, self, self->counters_);
        self->sessions_.insert(session);
        session->start();
      } else {
        log(log_level::warn, "tcp server: accept failed: ", ec.message());
      }
      self->accept();
    });
  }

  tcp_strand strand_;
  asio::ip::tcp::acceptor acceptor_;
  std::shared_ptr<memory::segment_table> table_;
  tcp_config cfg_;
  std::shared_ptr<tcp_counters> counters_;
  asio::ip::tcp::endpoint endpoint_;
  std::set<std::shared_ptr<tcp_session>> sessions_;
};

inline void tcp_session::finish() {
  if (closed_) return;
  close();
  if (auto server = server_.lock()) server->forget(shared_from_this());
}

}  // namespace kvx::transport::detail
