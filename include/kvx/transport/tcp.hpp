#pragma once
//! \file
//! `kvx::transport::tcp`: one-sided reads and writes over TCP (Boost.Asio),
//! emulated by a server in the owning process.
//!
//! Each `tcp` object is both ends: a server (an acceptor on `config.address`,
//! an ephemeral port by default) that serves the segments registered with it,
//! and a pool of `config.connections` client connections per peer endpoint.
//!
//! - **Checked.** The server checks every request with
//!   `memory::segment_table::check_access` (unknown segment, wrong key, out of
//!   range, offset overflow) and the descriptor's generation (`errc::stale`)
//!   before a byte moves; refused requests get an error frame with the reason.
//!   Malformed or truncated frames get an error frame and the connection is
//!   closed. Requests larger than `config.max_request` are refused.
//! - **No copies in kvx.** A read's response payload is received straight into
//!   the caller's span; a write is sent as one gather of header and caller's
//!   span. (The kernel's socket buffers are the link's own copy, hence
//!   `bounce_buffered`.)
//! - **Pipelined and striped.** Many requests are in flight per connection,
//!   matched by request id. Ops larger than `config.slice_size` are cut into
//!   requests spread over the peer's connections by least outstanding bytes.
//! - **Errors.** A peer that dies fails every request on its connections with
//!   `errc::connection_lost` as soon as the kernel reports it; a refused or
//!   timed-out connect gives `errc::unreachable`; the next op reconnects. A
//!   peer that hangs is caught by a deadline: wrap the token in
//!   `kvx::cancel_after`. Cancelling an op whose bytes are mid-frame closes
//!   that connection (its other ops fail with `connection_lost`).
//!
//! **Thread safety.** The model is one `io_context`; all I/O state lives on a
//! strand of the executor given at construction, so running that context on
//! several threads is also safe. `async_read`, `async_write`,
//! `register_memory`, `can_transfer`, `stats` and `close` may be called from
//! any thread. `deregister_memory` waits for server accesses in flight on the
//! segment, first closing the server connections moving that segment's
//! bytes (from a thread running a single-threaded `io_context` they could not
//! progress while it waits; from another thread the peer may have stalled).
//! With a multi-threaded `io_context`, call it from a thread that is not
//! running the context. Nothing blocks
//! except `deregister_memory`; no threads are started.
//!
//! \code
//! asio::io_context io;
//! kvx::transport::tcp owner(io.get_executor()), initiator(io.get_executor());
//! kvx::memory::segment_table table("node-a");
//! auto seg = *table.add("kv", kvx::memory::memory_region{buf.data(), buf.size()});
//! auto desc = table.describe(seg);
//! desc.transports["tcp"] = *owner.register_memory(seg);   // {"host": ..., "port": ...}
//! initiator.async_read(desc, 0, std::span(dst), [](std::error_code ec) { ... });
//! \endcode

#include <cstdint>
#include <algorithm>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/address.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/strand.hpp>

#include <kvx/core/async.hpp>
#include <kvx/core/log.hpp>
#include <kvx/memory/segment_table.hpp>
#include <kvx/transport/detail/tcp_client.hpp>
#include <kvx/transport/detail/tcp_config.hpp>
#include <kvx/transport/detail/tcp_protocol.hpp>
#include <kvx/transport/detail/tcp_server.hpp>
#include <kvx/transport/transport.hpp>

namespace kvx::transport {

//! Counters of one `tcp` object (monotonic; readable from any thread).
struct tcp_stats {
  std::uint64_t connections_opened = 0;  //!< client connections established
  std::uint64_t sessions_accepted = 0;   //!< server connections accepted
  std::uint64_t requests_served = 0;     //!< requests the server checked and moved bytes for
  std::uint64_t requests_refused = 0;    //!< requests the server answered with an error
};

namespace detail {

struct tcp_target {
  asio::ip::tcp::endpoint endpoint;
  std::uint64_t max_request = 0;
  std::string key;  // "host:port"
};

class tcp_state : public std::enable_shared_from_this<tcp_state> {
 public:
  tcp_state(asio::any_io_executor ex, tcp_config cfg)
      : io_ex(std::move(ex)), strand(asio::make_strand(io_ex)),
        cfg(std::make_shared<const tcp_config>(std::move(cfg))),
        table(std::make_shared<memory::segment_table>("tcp")), counters(std::make_shared<tcp_counters>()) {}

  asio::any_io_executor io_ex;
  tcp_strand strand;
  std::shared_ptr<const tcp_config> cfg;
  std::shared_ptr<memory::segment_table> table;
  std::shared_ptr<tcp_counters> counters;
  std::shared_ptr<tcp_server> server;
  asio::ip::tcp::endpoint endpoint;

  // Strand only.
  std::map<std::string, std::vector<std::shared_ptr<tcp_connection>>> peers;
  bool closed = false;

  static result<tcp_target> parse_target(const memory::segment_descriptor& remote) {
    auto it = remote.transports.find("tcp");
    if (it == remote.transports.end() || !it->is_object())
      return error{errc::unreachable, "segment '" + remote.name + "' has no tcp entry"};
    auto host = it->find("host");
    auto port = it->find("port");
    if (host == it->end() || !host->is_string() || port == it->end() || !port->is_number_integer() ||
        port->get<std::int64_t>() <= 0 || port->get<std::int64_t>() > 65535)
      return error{errc::unreachable, "segment '" + remote.name + "': tcp entry lacks host or port"};
    boost::system::error_code ec;
    const auto addr = asio::ip::make_address(host->get_ref<const std::string&>(), ec);
    if (ec) return error{errc::unreachable, "segment '" + remote.name + "': tcp host is not an IP address"};
    tcp_target t;
    t.endpoint = asio::ip::tcp::endpoint(addr, static_cast<std::uint16_t>(port->get<std::int64_t>()));
    t.max_request = tcp_wire::limits{}.max_request;
    // JSON built in C++ holds signed numbers, parsed JSON unsigned ones: accept both.
    if (auto m = it->find("max_request"); m != it->end()) {
      const std::uint64_t v = !m->is_number_integer()  ? 0
                              : m->is_number_unsigned() ? m->get<std::uint64_t>()
                                                        : static_cast<std::uint64_t>(std::max<std::int64_t>(0, m->get<std::int64_t>()));
      if (v < tcp_wire::min_request)
        return error{errc::protocol_error, "segment '" + remote.name + "': tcp max_request must be an integer of at least " +
                                               std::to_string(tcp_wire::min_request) + " bytes"};
      t.max_request = v;
    }
    t.key = host->get<std::string>() + ":" + std::to_string(t.endpoint.port());
    return t;
  }

  template <class Handler>
  void initiate(Handler&& handler, tcp_wire::opcode op, const memory::segment_descriptor& remote, std::uint64_t offset,
                std::byte* data, std::size_t length) {
    auto target = parse_target(remote);
    std::error_code early;
    if (!target)
      early = target.code();
    else if (!has(memory_kinds::host, kind_of(remote.where)))
      early = errc::not_supported;
    else if (remote.name.empty() || remote.name.size() > tcp_wire::max_name_length)
      early = errc::invalid_argument;
    if (early) return kvx::detail::post_completion(asio::any_io_executor(strand), std::forward<Handler>(handler), early);

    using op_type = tcp_transfer_op<std::decay_t<Handler>>;
    auto t = std::make_shared<op_type>(std::forward<Handler>(handler), asio::any_io_executor(strand));
    t->segment = remote.name;
    t->key = remote.key;
    t->generation = remote.generation;
    if (auto slot = t->slot(); slot.is_connected()) {
      slot.assign([weak = std::weak_ptr<tcp_transfer>(t), s = strand](asio::cancellation_type_t type) {
        if (type == asio::cancellation_type::none) return;
        asio::dispatch(s, [weak] {
          if (auto tr = weak.lock()) tr->cancel();
        });
      });
    }
    asio::post(strand, [self = shared_from_this(), t = std::shared_ptr<tcp_transfer>(std::move(t)),
                        target = std::move(*target), op, offset, data, length]() mutable {
      self->start(std::move(t), target, op, offset, data, length);
    });
  }

  void start(std::shared_ptr<tcp_transfer> t, const tcp_target& target, tcp_wire::opcode op, std::uint64_t offset,
             std::byte* data, std::size_t length) {
    if (closed || t->done() || t->cancel_requested()) {
      t->pending = 1;
      t->finish_one(closed || t->cancel_requested() ? errc::cancelled : std::error_code{});
      return;
    }
    auto& pool = peers[target.key];
    if (pool.empty()) {
      for (unsigned i = 0; i < cfg->connections; ++i)
        pool.push_back(std::make_shared<tcp_connection>(strand, target.endpoint, cfg, counters));
    }
    std::uint64_t chunk = std::min(cfg->slice_size ? cfg->slice_size : cfg->max_request, target.max_request);
    if (chunk == 0) chunk = target.max_request;
    const std::uint64_t n = length == 0 ? 1 : (length + chunk - 1) / chunk;
    t->pending = static_cast<std::size_t>(n);
    std::vector<std::shared_ptr<tcp_request>> reqs;
    reqs.reserve(static_cast<std::size_t>(n));
    for (std::uint64_t i = 0; i < n; ++i) {
      auto r = std::make_shared<tcp_request>();
      r->parent = t;
      r->op = op;
      const std::uint64_t at = i * chunk;
      r->offset = offset + at;  // may wrap: the server refuses it as out of range
      r->length = std::min<std::uint64_t>(chunk, length - at);
      if (op == tcp_wire::opcode::read)
        r->dst = data + at;
      else
        r->src = data + at;
      t->requests.push_back(r);
      reqs.push_back(std::move(r));
    }
    for (auto& r : reqs) {
      auto best = pool.front();
      for (auto& c : pool)
        if (c->outstanding() < best->outstanding()) best = c;
      r->conn = best;
      best->submit(std::move(r));
    }
  }

  void close() {
    if (closed) return;
    closed = true;
    if (server) server->shutdown();
    auto all = std::move(peers);
    peers.clear();
    for (auto& [key, pool] : all)
      for (auto& c : pool) c->fail(errc::cancelled, "transport closed");
  }

  // True on a thread running the io_context the transport was built on.
  [[nodiscard]] bool on_io_thread() const noexcept {
    if (strand.running_in_this_thread()) return true;
    if (auto* ioex = io_ex.target<asio::io_context::executor_type>()) return ioex->running_in_this_thread();
    return false;
  }
};

struct tcp_initiation {
  std::shared_ptr<tcp_state> state;
  template <class Handler>
  void operator()(Handler&& handler, tcp_wire::opcode op, const memory::segment_descriptor& remote,
                  std::uint64_t offset, std::byte* data, std::size_t length) const {
    state->initiate(std::forward<Handler>(handler), op, remote, offset, data, length);
  }
};

}  // namespace detail

//! The tcp transport. See the file comment for the protocol, errors and thread safety.
class tcp {
 public:
  using transport_concept = transport_tag;
  using executor_type = asio::any_io_executor;
  using config = tcp_config;
  static constexpr transport_capabilities capabilities{.memory = memory_kinds::host,
                                                       .one_sided = false,
                                                       .zero_copy = false,
                                                       .bounce_buffered = true,
                                                       .same_host_only = false,
                                                       .same_process_only = false};
  static constexpr std::string_view name() noexcept { return "tcp"; }

  //! Builds the transport and, unless `cfg.serve` is false, starts listening.
  //! Throws `std::system_error` when the config is invalid or the address cannot be bound.
  explicit tcp(executor_type ex, config cfg = {}) {
    auto made = create(std::move(ex), std::move(cfg));
    if (!made) throw std::system_error(made.code(), made.error().context());
    *this = std::move(*made);
  }

  //! Non-throwing construction: the error names the bad field or the address.
  static result<tcp> create(executor_type ex, config cfg = {}) {
    KVX_TRY(cfg.validate());
    tcp t(private_tag{});
    t.state_ = std::make_shared<detail::tcp_state>(std::move(ex), std::move(cfg));
    auto& st = *t.state_;
    if (st.cfg->serve) {
      st.server = std::make_shared<detail::tcp_server>(st.strand, st.table, *st.cfg, st.counters);
      KVX_TRY(st.server->listen());
      st.endpoint = st.server->endpoint();
      asio::dispatch(st.strand, [server = st.server] { server->start(); });
    }
    return t;
  }

  tcp(tcp&& other) noexcept = default;
  tcp& operator=(tcp&& other) noexcept {
    if (this != &other) {
      shutdown();
      state_ = std::move(other.state_);
    }
    return *this;
  }
  tcp(const tcp&) = delete;
  tcp& operator=(const tcp&) = delete;
  ~tcp() { shutdown(); }

  //! The strand all of this transport's I/O runs on; completions run here unless the handler names its own executor.
  [[nodiscard]] executor_type get_executor() const noexcept { return state_->strand; }

  [[nodiscard]] const config& settings() const noexcept { return *state_->cfg; }
  //! Where the server listens (port 0 when not serving).
  [[nodiscard]] asio::ip::tcp::endpoint local_endpoint() const noexcept { return state_->endpoint; }

  [[nodiscard]] tcp_stats stats() const noexcept {
    const auto& c = *state_->counters;
    return {c.connections_opened.load(std::memory_order_relaxed), c.sessions_accepted.load(std::memory_order_relaxed),
            c.requests_served.load(std::memory_order_relaxed), c.requests_refused.load(std::memory_order_relaxed)};
  }

  //! Serves `seg` to peers; returns `{"host", "port", "max_request"}` for its descriptor's `transports.tcp`.
  result<nlohmann::json> register_memory(const memory::local_segment& seg) {
    if (!state_->cfg->serve)
      return error{errc::not_supported, "tcp transport: serve is off, cannot register segment '" + seg.name + "'"};
    if (!seg.region.where.is_host_accessible())
      return error{errc::not_supported, "tcp transport: segment '" + seg.name + "' is " + seg.region.where.to_string()};
    if (seg.name.size() > detail::tcp_wire::max_name_length)
      return error{errc::invalid_argument, "tcp transport: segment name '" + seg.name + "' is longer than 255 bytes"};
    KVX_TRY(state_->table->adopt(seg));
    return nlohmann::json{{"host", state_->cfg->advertised_host()},
                          {"port", state_->endpoint.port()},
                          {"max_request", state_->cfg->max_request}};
  }

  //! Stops serving `seg`; returns once no server access touches it (see thread safety).
  result<void> deregister_memory(const memory::local_segment& seg) {
    return state_->table->remove(seg.name, [&] {
      if (!state_->server) return;
      // Sessions hold their pin while they wait on the peer, which may never
      // come back: close those moving this segment's bytes (on the strand).
      if (state_->on_io_thread())
        state_->server->revoke(seg.name);
      else
        asio::post(state_->strand, [server = state_->server, name = seg.name] { server->revoke(name); });
    });
  }

  //! No I/O: the descriptor has a usable tcp entry and host memory.
  [[nodiscard]] std::error_code can_transfer(const memory::segment_descriptor& remote) const {
    auto target = detail::tcp_state::parse_target(remote);
    if (!target) return target.code();
    if (!has(capabilities.memory, kind_of(remote.where))) return errc::not_supported;
    return {};
  }

  //! Reads `dst.size()` bytes at `offset` of `remote` into `dst`. Completion: `void(std::error_code)`.
  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_read(const memory::segment_descriptor& remote, std::uint64_t offset, std::span<std::byte> dst,
                  CompletionToken&& token) {
    return asio::async_initiate<CompletionToken, void(std::error_code)>(
        detail::tcp_initiation{state_}, token, detail::tcp_wire::opcode::read, std::cref(remote), offset, dst.data(),
        dst.size());
  }

  //! Writes `src` at `offset` of `remote`. Completion: `void(std::error_code)`.
  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_write(const memory::segment_descriptor& remote, std::uint64_t offset, std::span<const std::byte> src,
                   CompletionToken&& token) {
    // The request only reads through this pointer; one field serves both directions.
    return asio::async_initiate<CompletionToken, void(std::error_code)>(
        detail::tcp_initiation{state_}, token, detail::tcp_wire::opcode::write, std::cref(remote), offset,
        const_cast<std::byte*>(src.data()), src.size());
  }

  //! Stops the server and drops every connection: ops in flight complete with
  //! `errc::cancelled`, later ones too. Peers see the connection close.
  void close() {
    if (state_) asio::dispatch(state_->strand, [st = state_] { st->close(); });
  }

 private:
  struct private_tag {};
  explicit tcp(private_tag) {}

  void shutdown() {
    if (!state_) return;
    if (state_->strand.running_in_this_thread())
      state_->close();
    else
      asio::post(state_->strand, [st = state_] { st->close(); });
    state_.reset();
  }

  std::shared_ptr<detail::tcp_state> state_;
};

static_assert(check_transport<tcp>());

}  // namespace kvx::transport
