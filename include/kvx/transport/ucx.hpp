#pragma once
//! \file
//! `kvx::transport::ucx`: one-sided reads and writes through UCX (UCP RMA),
//! which picks shared memory (posix, sysv, cma), TCP, RDMA or CUDA IPC at run
//! time. Needs the `kvx::ucx` target (Debian `libucx-dev`).
//!
//! - One UCP context and worker per transport object; the worker's event fd
//!   joins the transport's executor (an `asio::posix::stream_descriptor`
//!   waiting for readability, progress until `ucp_worker_arm` says UCS_OK).
//!   No thread of its own; `progress: "busy_poll"` polls on the executor while
//!   operations are in flight, for the lowest latency.
//! - `register_memory(seg)` maps the region (`ucp_mem_map`) and returns the
//!   entry peers need: `{"worker_address", "rkey", "base", "length", "segment",
//!   "generation", "key_check", "blob_check"}` (hex blobs; `blob_check` is
//!   compared before UCX parses either blob). Peers create one endpoint per
//!   worker address (error mode PEER, so a dead peer is `connection_lost`, not
//!   a hang) and cache unpacked rkeys per (segment, generation).
//! - `async_read` is `ucp_get_nbx`; `async_write` is `ucp_put_nbx` followed by
//!   `ucp_ep_flush_nbx`: a write completes when its bytes are visible at the
//!   target, not merely when the source may be reused. There is no ordering
//!   between two writes in flight at once (no fence); order them by waiting.
//! - Bounds, registration key and generation are checked on the initiator
//!   against the descriptor before anything is issued (UCX's shared-memory
//!   transports do not check ranges).
//! - Memory kinds: host always; CUDA device memory when this UCX reports CUDA
//!   support at run time (`runtime_memory()`, `can_transfer`); the static
//!   `capabilities` stay conservative (host).
//! - Cancelling an operation (or its deadline passing) force-closes its
//!   endpoint: UCX then abandons the buffers; other operations in flight to
//!   the same peer end with `connection_lost`, the next one reconnects.
//!
//! Thread safety: all members may be called from any thread; they serialise
//! on one mutex (the UCP worker is SERIALIZED). Like a listening socket, the
//! transport keeps its io_context busy (it must progress for peers even when
//! it issues nothing); destroy it, or stop the io_context, to end `run()`.
//!
//! \code
//! asio::io_context io;
//! kvx::transport::ucx t(io.get_executor(), {.tls = "posix,self"});
//! auto entry = t.register_memory(seg);                 // publish under desc.transports["ucx"]
//! co_await t.async_write(remote, 0, src, asio::use_awaitable);
//! \endcode

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/append.hpp>
#include <boost/asio/associated_cancellation_slot.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>

#include <kvx/core/async.hpp>
#include <kvx/core/config.hpp>
#include <kvx/transport/detail/handler_work.hpp>
#include <kvx/transport/detail/ucx_support.hpp>
#include <kvx/transport/detail/ucx_worker.hpp>
#include <kvx/transport/transport.hpp>

namespace kvx::transport {

//! How a `ucx` transport picks its links and makes progress. Empty strings
//! leave UCX's own configuration (its `UCX_*` environment) in charge.
struct ucx_options {
  std::string tls{};        //!< UCX_TLS, e.g. "posix,self", "tcp", "rc,cuda_copy"
  std::string net_devices{};  //!< UCX_NET_DEVICES, e.g. "mlx5_0:1" or "lo"
  bool busy_poll = false;   //!< poll on the executor while ops are in flight (else: event fd)
  //! Further UCX settings, name without the UCX_ prefix: {"RNDV_THRESH", "8k"}.
  std::vector<std::pair<std::string, std::string>> settings{};

  //! Reads `{"tls": "...", "net_devices": "...", "progress": "event"|"busy_poll",
  //! "settings": {"NAME": "value"}}`; errors name the field (`transport.ucx.tls`).
  static result<ucx_options> from_config(const config::view& v) {
    KVX_TRY(v.allow_only({"tls", "net_devices", "progress", "settings"}));
    ucx_options o;
    auto tls = v.optional<std::string>("tls", "");
    KVX_TRY(tls);
    auto dev = v.optional<std::string>("net_devices", "");
    KVX_TRY(dev);
    auto progress = v.optional<std::string>("progress", "event");
    KVX_TRY(progress);
    if (*progress != "event" && *progress != "busy_poll")
      return error{errc::invalid_argument,
                   "config field '" + v.path_of("progress") + "': '" + *progress + "' is not event or busy_poll"};
    o.tls = std::move(*tls);
    o.net_devices = std::move(*dev);
    o.busy_poll = *progress == "busy_poll";
    if (v.contains("settings")) {
      auto s = v.child("settings");
      KVX_TRY(s);
      for (const auto& [name, value] : s->raw().items()) {
        if (!value.is_string())
          return error{errc::invalid_argument, "config field '" + s->path_of(name) + "': expected a string, got " +
                                                   std::string(value.type_name())};
        if (name.empty() || name.rfind("UCX_", 0) == 0)
          return error{errc::invalid_argument,
                       "config field '" + s->path_of(name) + "': give UCX setting names without the UCX_ prefix"};
        o.settings.emplace_back(name, value.get<std::string>());
      }
    }
    return o;
  }
};

//! Memory allocated by UCX for a transport (`ucx::allocate`). On UCX's
//! shared-memory transports (posix, sysv) peers access it one-sidedly;
//! ordinary memory is reached there through UCX's active-message emulation
//! of RMA, which needs the owner to make progress. Movable; frees on destruction.
class ucx_buffer {
 public:
  ucx_buffer() = default;
  [[nodiscard]] memory::memory_region region() const noexcept {
    return a_ ? memory::memory_region{a_->address, a_->length, where_} : memory::memory_region{};
  }
  [[nodiscard]] std::byte* data() const noexcept { return a_ ? static_cast<std::byte*>(a_->address) : nullptr; }
  [[nodiscard]] std::size_t size() const noexcept { return a_ ? a_->length : 0; }
  [[nodiscard]] std::span<std::byte> bytes() const noexcept { return {data(), size()}; }

 private:
  friend class ucx;
  ucx_buffer(std::shared_ptr<detail::ucx_allocation> a, memory::location where) : a_(std::move(a)), where_(where) {}
  std::shared_ptr<detail::ucx_allocation> a_;
  memory::location where_ = memory::location::host();
};

//! One piece of a prepared transfer: `local.size()` bytes between `local` and
//! the remote segment at `remote_offset` (the source of a write, the
//! destination of a read).
struct ucx_piece {
  std::uint64_t remote_offset = 0;
  std::span<std::byte> local{};
};

//! What `ucx::post` and `ucx::check` report of a prepared transfer.
enum class ucx_post_status {
  done,         //!< every piece has landed (a write: visible at the target)
  in_progress,  //!< still moving: `check` again (or cancel it)
};

namespace detail {
//! A prepared transfer's polling state, shared with its op while one is in
//! flight (the transfer may be moved or destroyed meanwhile). Guarded by the
//! worker's mutex.
struct ucx_poll_state {
  enum class phase { idle, in_flight, finished } at = phase::idle;
  std::error_code ec{};
  std::uint64_t op_id = 0;
};

struct ucx_poll_op final : ucx_op_base {
  explicit ucx_poll_op(std::shared_ptr<ucx_poll_state> s) : state(std::move(s)) {}
  void deliver(std::error_code ec) override {
    state->at = ucx_poll_state::phase::finished;
    state->ec = ec;
  }
  std::shared_ptr<ucx_poll_state> state;
};
}  // namespace detail

//! A transfer checked and resolved once and posted many times: one direction,
//! one remote segment, any number of pieces, finished by one endpoint flush
//! (NIXL's prepared transfer request; `ucx::prepare_read` / `prepare_write`).
//! Posting it skips reading the descriptor, which is most of what a small
//! operation costs kvx. The local buffers and the remote registration must
//! stay as they were when it was prepared: prepare again after the remote
//! segment is re-registered. An endpoint that failed or was closed since is
//! replaced when it is next posted (the descriptor is kept for that).
//! Movable; posted again only once its last post is checked (`post`).
class ucx_prepared_transfer {
 public:
  ucx_prepared_transfer() = default;
  [[nodiscard]] bool is_write() const noexcept { return write_; }
  [[nodiscard]] std::size_t pieces() const noexcept { return pieces_.size(); }
  [[nodiscard]] std::uint64_t bytes() const noexcept { return bytes_; }
  [[nodiscard]] const memory::segment_descriptor& remote() const noexcept { return remote_; }

 private:
  friend class ucx;
  std::uint64_t worker_serial_ = 0;  // the worker it was prepared on (0: none)
  bool write_ = false;
  std::uint64_t bytes_ = 0;
  memory::segment_descriptor remote_;
  std::vector<ucx_piece> given_;  // as prepared, to resolve again
  detail::ucx_target target_;
  std::vector<detail::ucx_piece_target> pieces_;
  std::shared_ptr<detail::ucx_poll_state> state_;
};

namespace detail {
//! Posts `handler(ec)` to `ex` with the semantics of kvx::detail::post_completion
//! (never inline; run on the handler's associated executor), in fewer steps:
//! asio::append keeps the handler's associations, so a handler without an
//! executor of its own is not wrapped in a work dispatcher, and an io_context
//! executor held by `ex` is posted to directly. About 0.1 µs of a 0.6 µs
//! small write on shared memory (docs/benchmarks/transport-ucx.md).
template <class Handler>
void ucx_post_completion(const asio::any_io_executor& ex, Handler&& handler, std::error_code ec) {
  if (const auto* io_ex = ex.target<asio::io_context::executor_type>())
    asio::post(*io_ex, asio::append(std::forward<Handler>(handler), ec));
  else
    asio::post(ex, asio::append(std::forward<Handler>(handler), ec));
}

template <class Handler>
struct ucx_op final : ucx_op_base {
  ucx_op(Handler&& h, const asio::any_io_executor& ex) : handler(std::move(h)), io_ex(ex), work(*handler, ex) {}

  void deliver(std::error_code ec) override {
    // The slot is cleared on the handler's executor, where the caller emits,
    // not here on the thread that progressed the worker.
    auto h = std::move(*handler);
    auto ex = asio::get_associated_executor(h, io_ex);
    ucx_post_completion(io_ex, asio::bind_executor(ex, [h = std::move(h)](std::error_code e) mutable {
                          if (auto slot = asio::get_associated_cancellation_slot(h); slot.is_connected()) slot.clear();
                          std::move(h)(e);
                        }),
                        ec);
    handler.reset();
    work.reset();
  }

  std::optional<Handler> handler;
  asio::any_io_executor io_ex;
  handler_work<Handler, asio::any_io_executor> work;  // not make_work_guard: see handler_work.hpp
};
}  // namespace detail

class ucx {
 public:
  using transport_concept = transport_tag;
  using executor_type = asio::any_io_executor;
  //! Conservative: CUDA memory and true one-sidedness depend on the UCX build
  //! and the transports it picks at run time (`runtime_memory()`).
  static constexpr transport_capabilities capabilities{.memory = memory_kinds::host,
                                                       .one_sided = true,
                                                       .zero_copy = true,
                                                       .bounce_buffered = false,
                                                       .same_host_only = false,
                                                       .same_process_only = false};
  static constexpr std::string_view name() noexcept { return "ucx"; }

  //! Creates the context and worker; the error names the UCX call and setting.
  static result<ucx> create(executor_type ex, const ucx_options& options = {}) {
    detail::ucx_worker_settings s;
    if (!options.tls.empty()) s.ucx_config.emplace_back("TLS", options.tls);
    if (!options.net_devices.empty()) s.ucx_config.emplace_back("NET_DEVICES", options.net_devices);
    for (const auto& kv : options.settings) s.ucx_config.push_back(kv);
    s.busy_poll = options.busy_poll;
    auto w = detail::ucx_worker::create(std::move(ex), s);
    KVX_TRY(w);
    (*w)->start();
    return ucx(std::move(*w));
  }

  //! As `create`; a set-up failure throws `std::system_error` with the context.
  explicit ucx(executor_type ex, const ucx_options& options = {}) {
    auto made = create(std::move(ex), options);
    if (!made) throw std::system_error(made.code(), made.error().context());
    w_ = std::move(made->w_);
  }

  ucx(ucx&&) noexcept = default;
  ucx& operator=(ucx&& o) noexcept {
    if (this != &o) {
      reset();
      w_ = std::move(o.w_);
    }
    return *this;
  }
  ucx(const ucx&) = delete;
  ucx& operator=(const ucx&) = delete;
  //! Closes endpoints (operations in flight end with an error), unmaps
  //! registrations, destroys the worker. Call where the io_context is not
  //! running this transport's handlers on another thread.
  ~ucx() { reset(); }

  [[nodiscard]] executor_type get_executor() const noexcept { return w_->executor(); }

  //! Memory kinds this UCX can move at run time (host, plus cuda when UCX has CUDA support).
  [[nodiscard]] memory_kinds runtime_memory() const noexcept {
    return w_->supports_cuda() ? (memory_kinds::host | memory_kinds::cuda) : memory_kinds::host;
  }
  //! This worker's address (hex), as published in entries.
  [[nodiscard]] const std::string& worker_address() const noexcept { return w_->address(); }

  result<nlohmann::json> register_memory(const memory::local_segment& seg) { return w_->register_memory(seg); }
  result<void> deregister_memory(const memory::local_segment& seg) { return w_->deregister_memory(seg); }

  //! Allocates `length` bytes through UCX (host, or `cuda:N` when supported).
  //! Registering a segment inside it reuses the allocation's mapping.
  result<ucx_buffer> allocate(std::size_t length, memory::location where = memory::location::host()) {
    ucs_memory_type_t type = UCS_MEMORY_TYPE_HOST;
    if (where.kind == memory::location_kind::cuda) {
      if (!w_->supports_cuda()) return error{errc::not_supported, "ucx allocate: this UCX has no CUDA support"};
      type = UCS_MEMORY_TYPE_CUDA;
    } else if (where.kind != memory::location_kind::host) {
      return error{errc::not_supported, "ucx allocate: " + where.to_string() + " memory"};
    }
    auto a = w_->allocate(length, type);
    KVX_TRY(a);
    return ucx_buffer(std::move(*a), where);
  }

  [[nodiscard]] std::error_code can_transfer(const memory::segment_descriptor& remote) const {
    auto it = remote.transports.find(name());
    if (it == remote.transports.end() || !it->is_object() || !it->contains("worker_address") || !it->contains("rkey"))
      return errc::unreachable;
    if (!has(runtime_memory(), kind_of(remote.where))) return errc::not_supported;
    return {};
  }

  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_read(const memory::segment_descriptor& remote, std::uint64_t offset, std::span<std::byte> dst,
                  CompletionToken&& token) {
    return asio::async_initiate<CompletionToken, void(std::error_code)>(
        [this](auto handler, const memory::segment_descriptor& r, std::uint64_t off, std::span<std::byte> d) {
          this->start(std::move(handler), r, off, d.data(), d.size(), false);
        },
        token, std::cref(remote), offset, dst);
  }

  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_write(const memory::segment_descriptor& remote, std::uint64_t offset, std::span<const std::byte> src,
                   CompletionToken&& token) {
    return asio::async_initiate<CompletionToken, void(std::error_code)>(
        [this](auto handler, const memory::segment_descriptor& r, std::uint64_t off, std::span<const std::byte> s) {
          // UCX's put takes a const source; the cast only fits the shared issue path.
          this->start(std::move(handler), r, off, const_cast<std::byte*>(s.data()), s.size(), true);
        },
        token, std::cref(remote), offset, src);
  }

  // ---- prepared transfers: check once, post many times ----------------------

  //! Checks every piece against `remote` (bounds, key, generation, blobs) and
  //! resolves its endpoint and rkey, as `async_read` would for each; errors
  //! name the piece. Nothing moves yet.
  result<ucx_prepared_transfer> prepare_read(const memory::segment_descriptor& remote,
                                             std::span<const ucx_piece> pieces) {
    return prepare(remote, pieces, false);
  }
  //! As `prepare_read`, for writes from the pieces' local bytes.
  result<ucx_prepared_transfer> prepare_write(const memory::segment_descriptor& remote,
                                              std::span<const ucx_piece> pieces) {
    return prepare(remote, pieces, true);
  }

  //! Starts a prepared transfer with no completion handler (the polling form,
  //! as NIXL's postXferReq): `done` when UCX finished inside the call (small
  //! transfers on shared memory usually do), `in_progress` otherwise, then
  //! `check` it until it is not. `busy` until an earlier `in_progress` post
  //! of it has been checked to its end (even if the io_context, which keeps
  //! progressing UCX as for any operation, finished it meanwhile).
  result<ucx_post_status> post(ucx_prepared_transfer& p) {
    std::lock_guard lock(w_->mutex());
    KVX_TRY(owned(p, "post"));
    // Its last post's outcome must be checked first, or an error would be lost.
    if (p.state_->at != detail::ucx_poll_state::phase::idle)
      return error{errc::busy, "ucx post: this prepared transfer's last post is not checked yet (check it until it is done)"};
    KVX_TRY(ready(p, "post"));
    ucs_status_t failure = UCS_OK;
    const ucs_status_ptr_t request = w_->post_batch(p.target_, p.pieces_, p.write_, failure);
    if (!UCS_PTR_IS_PTR(request)) {
      const ucs_status_t s = UCS_PTR_STATUS(request);
      if (s != UCS_OK) return error{detail::ucx_worker::code_of(s), "ucx post: " + std::string(ucs_status_string(s))};
      return ucx_post_status::done;
    }
    auto* op = new detail::ucx_poll_op(p.state_);
    op->issue_failure = failure;
    p.state_->at = detail::ucx_poll_state::phase::in_flight;
    w_->track(op, p.target_, request);
    p.state_->op_id = op->id;
    return ucx_post_status::in_progress;
  }

  //! Progresses UCX once and reports a posted transfer (NIXL's
  //! checkXferState): `in_progress`, `done`, or the error it ended with. A
  //! transfer reported once is idle again; checking one never posted is
  //! `invalid_argument`.
  result<ucx_post_status> check(ucx_prepared_transfer& p) {
    std::lock_guard lock(w_->mutex());
    KVX_TRY(owned(p, "check"));
    auto& st = *p.state_;
    if (st.at == detail::ucx_poll_state::phase::idle)
      return error{errc::invalid_argument, "ucx check: the transfer is not posted"};
    if (st.at == detail::ucx_poll_state::phase::in_flight) {
      w_->progress_once();
      if (st.at == detail::ucx_poll_state::phase::in_flight) return ucx_post_status::in_progress;
    }
    st.at = detail::ucx_poll_state::phase::idle;
    if (st.ec) return error{st.ec, "ucx check: the posted transfer failed"};
    return ucx_post_status::done;
  }

  //! Progresses UCX once on the calling thread and returns how many events
  //! it handled (`ucp_worker_progress`): for an engine that spins, waiting on
  //! a peer's write into its memory or on posted transfers, without going
  //! through its io_context (whose poll is a system call).
  std::size_t progress() {
    std::lock_guard lock(w_->mutex());
    return w_->progress_once();
  }

  //! Ends a posted transfer that is still in flight, as cancelling an
  //! operation does (its endpoint is force-closed; others in flight to that
  //! peer end with `connection_lost`): `check` then reports `cancelled`.
  void cancel(ucx_prepared_transfer& p) {
    std::uint64_t id = 0;
    {
      std::lock_guard lock(w_->mutex());
      if (!p.state_ || p.worker_serial_ != w_->serial() || p.state_->at != detail::ucx_poll_state::phase::in_flight)
        return;
      id = p.state_->op_id;
    }
    w_->cancel(id);
  }

  //! Starts a prepared transfer with its completion delivered to `token`, as
  //! `async_write` / `async_read` do, without reading the descriptor again.
  //! Any number may be in flight at once; `p` must live until the operation
  //! is initiated (with a deferred token, until it is started), its buffers
  //! until it completes.
  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_post(ucx_prepared_transfer& p, CompletionToken&& token) {
    return asio::async_initiate<CompletionToken, void(std::error_code)>(
        [this](auto handler, ucx_prepared_transfer* prepared) {
          std::unique_lock lock(w_->mutex());
          if (auto ok = ready(*prepared, "async_post"); !ok) {
            lock.unlock();
            detail::ucx_post_completion(w_->executor(), std::move(handler), ok.code());
            return;
          }
          this->issue(lock, std::move(handler), prepared->target_, prepared->pieces_, prepared->write_);
        },
        token, &p);
  }

 private:
  explicit ucx(std::shared_ptr<detail::ucx_worker> w) : w_(std::move(w)) {}

  void reset() {
    if (w_) w_->shutdown();
    w_.reset();
  }

  result<ucx_prepared_transfer> prepare(const memory::segment_descriptor& remote, std::span<const ucx_piece> pieces,
                                        bool is_write) {
    const char* what = is_write ? "ucx prepare_write" : "ucx prepare_read";
    if (pieces.empty()) return error{errc::invalid_argument, std::string(what) + ": no pieces"};
    ucx_prepared_transfer p;
    p.write_ = is_write;
    p.remote_ = remote;
    p.given_.assign(pieces.begin(), pieces.end());
    p.state_ = std::make_shared<detail::ucx_poll_state>();
    std::lock_guard lock(w_->mutex());
    if (auto ok = resolve_pieces(p, what); !ok) return ok.error();
    p.worker_serial_ = w_->serial();
    for (const auto& piece : pieces) p.bytes_ += piece.local.size();
    return p;
  }

  // Resolves every piece of `p` again (a fresh endpoint when its old one
  // failed or was closed). Lock held.
  result<void> resolve_pieces(ucx_prepared_transfer& p, const char* what) {
    p.pieces_.clear();
    p.pieces_.reserve(p.given_.size());
    detail::ucx_target target;
    for (std::size_t i = 0; i < p.given_.size(); ++i) {
      const auto& piece = p.given_[i];
      if (piece.local.empty() || piece.local.data() == nullptr)
        return error{errc::invalid_argument, std::string(what) + ": piece " + std::to_string(i) + " is empty"};
      if (auto ec = w_->resolve(p.remote_, piece.remote_offset, piece.local.size(), target))
        return error{ec, std::string(what) + ": piece " + std::to_string(i) + " (" + std::to_string(piece.local.size()) +
                             " bytes at " + std::to_string(piece.remote_offset) + " of segment '" + p.remote_.name +
                             "'): " + ec.message()};
      p.pieces_.push_back({target.remote_address, piece.local.data(), piece.local.size()});
    }
    p.target_ = std::move(target);  // every piece resolves to the same peer and rkey
    return {};
  }

  // Whether `p` was prepared on this transport. Lock held.
  result<void> owned(const ucx_prepared_transfer& p, const char* what) const {
    if (!p.state_ || p.worker_serial_ != w_->serial())
      return error{errc::invalid_argument, std::string("ucx ") + what + ": the transfer was not prepared on this transport"};
    return {};
  }

  // Whether `p` may be posted on this transport now, resolving it again if
  // its endpoint is gone. Lock held.
  result<void> ready(ucx_prepared_transfer& p, const char* what) {
    KVX_TRY(owned(p, what));
    if (w_->is_shut_down()) return error{errc::cancelled, std::string("ucx ") + what + ": the transport is shut down"};
    if (!detail::ucx_worker::usable(p.target_)) return resolve_pieces(p, what);
    return {};
  }

  template <class Handler>
  void start(Handler&& handler, const memory::segment_descriptor& remote, std::uint64_t offset, std::byte* local,
             std::size_t length, bool is_write) {
    std::unique_lock lock(w_->mutex());
    detail::ucx_target target;
    std::error_code ec = w_->resolve(remote, offset, length, target);
    if (ec || length == 0) {
      lock.unlock();
      detail::ucx_post_completion(w_->executor(), std::forward<Handler>(handler), ec);
      return;
    }
    const detail::ucx_piece_target piece{target.remote_address, local, length};
    issue(lock, std::forward<Handler>(handler), target, std::span(&piece, 1), is_write);
  }

  // Issues resolved pieces with their completion delivered to `handler`.
  template <class Handler>
  void issue(std::unique_lock<std::mutex>& lock, Handler&& handler, const detail::ucx_target& target,
             std::span<const detail::ucx_piece_target> pieces, bool is_write) {
    // Small operations on shared memory usually finish inside the UCX call:
    // then only the completion is posted, with no op object, work guard or
    // cancellation hook (there is nothing left to cancel).
    ucs_status_t failure = UCS_OK;
    const ucs_status_ptr_t request = w_->post_batch(target, pieces, is_write, failure);
    if (!UCS_PTR_IS_PTR(request)) {
      lock.unlock();
      detail::ucx_post_completion(w_->executor(), std::forward<Handler>(handler),
                                   detail::ucx_worker::code_of(UCS_PTR_STATUS(request)));
      return;
    }
    auto* op = new detail::ucx_op<std::decay_t<Handler>>(std::forward<Handler>(handler), w_->executor());
    op->issue_failure = failure;
    auto slot = asio::get_associated_cancellation_slot(*op->handler);
    w_->track(op, target, request);
    // Still under the lock: nothing completed the op since track() named it.
    if (slot.is_connected()) {
      slot.assign([w = w_.get(), id = op->id](asio::cancellation_type_t type) {
        if (type != asio::cancellation_type::none) w->cancel(id);
      });
    }
  }

  std::shared_ptr<detail::ucx_worker> w_;
};

static_assert(check_transport<ucx>());

}  // namespace kvx::transport
