#pragma once
//! \file
//! `kvx::transport::shm`: transfers between processes on the same host, with
//! one CPU copy and no staging buffer.
//!
//! Two data paths, chosen per segment when the owner registers it:
//! - **memfd** (the fast path): memory from `kvx::transport::shm_allocate` is
//!   backed by a memfd. A peer asks the owner for it over a unix socket, gets
//!   the fd (SCM_RIGHTS), maps it once and then reads and writes with plain
//!   `memcpy` at memory bandwidth.
//! - **process_vm** (any other host memory): the peer copies with
//!   `process_vm_readv` / `process_vm_writev`, one kernel-side copy at about
//!   half of memcpy's bandwidth; it needs ptrace permission over the owner
//!   (same user, and with Yama's ptrace_scope 1 the owner must grant it:
//!   `shm_options::grant_ptrace`). A refusal completes with
//!   `errc::not_supported` and logs what to change.
//!
//! Checks. The initiator checks every op against the descriptor (same host,
//! bounds) and against the owner's answer (bounds). The owner answers a
//! mapping request only for a registered segment with the right key and
//! generation (`unknown_segment`, `bad_key`, `stale`). Deregistration revokes:
//! the owner raises a flag in a page it shares with every peer of that
//! segment and waits (up to `shm_options::revoke_timeout`) for copies in
//! flight to drain, or fails with `errc::timed_out` (the memory is not free
//! to reuse yet; see `shm::deregister_memory`); a peer checks the flag before
//! each copy and completes with `errc::stale` once it is set, then drops its
//! mapping. A peer that ignores the protocol cannot be stopped from writing
//! into memory it has mapped: the shm transport trusts processes of the same
//! user on the host.
//! When the owner's socket closes (the owner died or shut down), new ops on
//! that peer complete with `errc::connection_lost`.
//!
//! Thread-safety: all members are thread-safe. The copy runs inline on the
//! thread that initiates the op (the first op on a segment waits for the
//! owner's answer on the executor); the completion is always posted to the
//! handler's executor. The executor must be run for the owner to answer
//! peers and for a peer's first op on a segment to complete.
//!
//! \code
//! asio::io_context io;
//! kvx::transport::shm t(io.get_executor());
//! auto mem = kvx::transport::shm_allocate(64 << 20);           // memfd-backed, pre-faulted
//! auto seg = table.add("kv", mem->region());
//! descriptor.transports["shm"] = *t.register_memory(*seg);     // {"socket": "@kvx-shm-...", ...}
//! // in the peer process:
//! peer_t.async_read(descriptor, 0, std::span(buf), [](std::error_code ec) { ... });
//! \endcode

#include <sys/prctl.h>

#include <chrono>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <shared_mutex>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/associated_cancellation_slot.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>

#include <kvx/core/async.hpp>
#include <kvx/core/log.hpp>
#include <kvx/memory/segment_table.hpp>
#include <kvx/transport/detail/shm_channel.hpp>
#include <kvx/transport/detail/shm_memory.hpp>
#include <kvx/transport/transport.hpp>

namespace kvx::transport {

//! Host memory backed by a memfd, mapped shared and pre-faulted
//! (MAP_POPULATE), so the shm transport can hand it to peers by fd. Move-only;
//! unmaps on destruction (deregister it first). Any sub-range registers as a
//! memfd segment.
class shm_memory {
 public:
  shm_memory() = default;
  shm_memory(shm_memory&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)),
        mapped_(std::exchange(o.mapped_, 0)), fd_(std::move(o.fd_)) {}
  shm_memory& operator=(shm_memory&& o) noexcept {
    if (this != &o) {
      release();
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
      mapped_ = std::exchange(o.mapped_, 0);
      fd_ = std::move(o.fd_);
    }
    return *this;
  }
  ~shm_memory() { release(); }

  [[nodiscard]] std::byte* data() const noexcept { return data_; }
  [[nodiscard]] std::size_t size() const noexcept { return size_; }
  [[nodiscard]] std::span<std::byte> bytes() const noexcept { return {data_, size_}; }
  [[nodiscard]] memory::memory_region region() const noexcept { return {data_, size_, memory::location::host()}; }

 private:
  friend result<shm_memory> shm_allocate(std::size_t size);
  void release() noexcept {
    if (!data_) return;
    detail::memfd_registry::instance().remove(data_);
    ::munmap(data_, mapped_);
    data_ = nullptr;
  }
  std::byte* data_ = nullptr;
  std::size_t size_ = 0;
  std::size_t mapped_ = 0;
  detail::unique_fd fd_;
};

//! Allocates `size` bytes of memfd-backed, pre-faulted host memory: the
//! memory the shm transport shares at memcpy speed. Blocks while the pages
//! are faulted in (about a millisecond per few MiB).
inline result<shm_memory> shm_allocate(std::size_t size) {
  if (size == 0) return error{errc::invalid_argument, "shm_allocate: size is 0"};
  const std::size_t page = detail::page_size();
  if (size > SIZE_MAX - page) return error{errc::invalid_argument, "shm_allocate: size too large"};
  const std::size_t mapped = (size + page - 1) / page * page;
  shm_memory m;
  m.fd_.reset(::memfd_create("kvx-shm", MFD_CLOEXEC));
  if (!m.fd_) return error{errc::io_error, "shm_allocate: memfd_create: " + detail::errno_text(errno)};
  if (::ftruncate(m.fd_.get(), static_cast<off_t>(mapped)) != 0)
    return error{errc::capacity_exceeded, "shm_allocate: ftruncate " + std::to_string(mapped) + ": " +
                                              detail::errno_text(errno)};
  void* p = ::mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, m.fd_.get(), 0);
  if (p == MAP_FAILED)
    return error{errc::capacity_exceeded, "shm_allocate: mmap " + std::to_string(mapped) + ": " +
                                              detail::errno_text(errno)};
  m.data_ = static_cast<std::byte*>(p);
  m.size_ = size;
  m.mapped_ = mapped;
  detail::memfd_registry::instance().add(m.data_, mapped, m.fd_.get());
  return m;
}

//! Settings of a `shm` transport.
struct shm_options {
  //! How long a peer's first op on a segment waits for the owner's answer.
  std::chrono::milliseconds open_timeout{5000};
  //! How long deregistration waits for peers' copies in flight to drain.
  std::chrono::milliseconds revoke_timeout{2000};
  //! Owner side: let any process ptrace (hence process_vm_*) this one, needed
  //! for non-memfd segments when Yama's ptrace_scope is 1. Process-wide.
  bool grant_ptrace = false;
};

namespace detail {

// A queued op waiting for the owner's answer; move-only, called once.
class shm_pending_op {
 public:
  template <class F>
  explicit shm_pending_op(F f) : impl_(std::make_unique<model<F>>(std::move(f))) {}
  void operator()(std::error_code ec, std::shared_ptr<shm_mapping> m) {
    auto impl = std::move(impl_);
    impl->call(ec, std::move(m));
  }

 private:
  struct concept_t {
    virtual ~concept_t() = default;
    virtual void call(std::error_code, std::shared_ptr<shm_mapping>) = 0;
  };
  template <class F>
  struct model final : concept_t {
    explicit model(F f) : fn(std::move(f)) {}
    void call(std::error_code ec, std::shared_ptr<shm_mapping> m) override { fn(ec, std::move(m)); }
    F fn;
  };
  std::unique_ptr<concept_t> impl_;
};

using shm_mapping_key = std::tuple<std::string, std::uint64_t, std::uint64_t>;  // name, key, generation

struct shm_peer {
  struct request {
    shm_mapping_key key;
    std::vector<std::pair<std::uint64_t, shm_pending_op>> ops;
    std::unique_ptr<asio::steady_timer> timer;
  };
  std::string socket;
  std::shared_ptr<shm_channel> channel;
  bool lost = false;
  std::map<shm_mapping_key, std::shared_ptr<shm_mapping>, std::less<>> mappings;
  std::map<std::uint64_t, request> requests;
};

struct shm_owned {
  memory::local_segment segment;
  bool memfd = false;
  unique_fd data_fd;
  std::uint64_t fd_offset = 0;
  control_page control;
};

inline std::error_code errc_from_wire(const nlohmann::json& v) {
  if (!v.is_number_integer()) return errc::protocol_error;
  const auto n = v.get<long long>();
  if (n < static_cast<int>(errc::invalid_argument) || n > static_cast<int>(errc::internal)) return errc::protocol_error;
  return static_cast<errc>(n);
}

class shm_state : public std::enable_shared_from_this<shm_state> {
 public:
  shm_state(asio::any_io_executor ex, shm_options options) : ex_(std::move(ex)), options_(options) {}

  [[nodiscard]] const asio::any_io_executor& executor() const noexcept { return ex_; }

  // ---- owner side ---------------------------------------------------------

  result<nlohmann::json> register_memory(const memory::local_segment& seg) {
    if (seg.region.where.kind != memory::location_kind::host)
      return error{errc::not_supported, "shm transport: segment '" + seg.name + "' is " + seg.region.where.to_string()};
    auto owned = std::make_shared<shm_owned>();
    owned->segment = seg;
    auto control = control_page::create();
    KVX_TRY(control);
    owned->control = std::move(*control);
    if (auto fd = memfd_registry::instance().find(seg.region.address, seg.region.length)) {
      owned->memfd = true;
      owned->data_fd = std::move(fd->first);
      owned->fd_offset = fd->second;
    } else if (options_.grant_ptrace) {
      ::prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY, 0, 0, 0);
    }
    std::lock_guard lock(owner_mutex_);
    if (!listener_) {
      const std::string name = "@kvx-shm-" + std::to_string(::getpid()) + "-" + std::to_string(memory::detail::random_u64());
      auto listener = shm_listener::open(ex_, name);
      KVX_TRY(listener);
      listener_ = std::move(*listener);
      listener_->start([weak = weak_from_this()](std::shared_ptr<shm_channel> ch) {
        if (auto self = weak.lock()) self->on_accept(std::move(ch));
      });
    }
    auto added = table_.adopt(seg);
    KVX_TRY(added);
    owned_[seg.name] = owned;
    return nlohmann::json{{"socket", listener_->name()}, {"pid", ::getpid()}, {"mode", owned->memfd ? "memfd" : "vm"}};
  }

  result<void> deregister_memory(const memory::local_segment& seg) {
    std::shared_ptr<shm_owned> owned;
    {
      std::lock_guard lock(owner_mutex_);
      const auto live = owned_.find(seg.name);
      if (live == owned_.end() || live->second->segment.key != seg.key) {
        auto it = draining_.find(std::pair{seg.name, seg.key});
        // A later registration under the same name is not this one's to revoke.
        if (it == draining_.end() && live != owned_.end())
          return error{errc::unknown_segment, "shm transport: segment '" + seg.name + "' is registered under another key"};
        if (it != draining_.end()) owned = it->second;
      }
    }
    // Revoked by an earlier call whose wait timed out: wait for its copies again.
    if (owned) return drain(owned);
    // Refuse new mappings first (waits for answers being sent), then revoke old ones.
    auto removed = table_.remove(seg.name);
    KVX_TRY(removed);
    std::vector<std::weak_ptr<shm_channel>> clients;
    {
      std::lock_guard lock(owner_mutex_);
      if (auto it = owned_.find(seg.name); it != owned_.end()) {
        owned = std::move(it->second);
        owned_.erase(it);
      }
      clients = clients_;
    }
    if (!owned) return error{errc::internal, "shm transport: segment '" + seg.name + "' has no record"};
    auto drained = drain(owned);
    const nlohmann::json notice{{"op", "revoke"}, {"name", seg.name}, {"generation", owned->segment.generation}};
    for (auto& weak : clients)
      if (auto ch = weak.lock()) (void)ch->send(notice);
    return drained;
  }

  // ---- initiator side -----------------------------------------------------

  // The mapping for (socket, remote) if one is cached; errors for lost or
  // unreachable owners; otherwise null with `peer` set, to queue an open.
  std::error_code find(const std::string& socket, const memory::segment_descriptor& r,
                       std::shared_ptr<shm_peer>& peer, std::shared_ptr<shm_mapping>& mapping) {
    const shm_mapping_key key{r.name, r.key, r.generation};
    {
      std::shared_lock lock(mutex_);
      if (auto it = peers_.find(socket); it != peers_.end()) {
        peer = it->second;
        if (peer->lost) return errc::connection_lost;
        if (auto m = peer->mappings.find(key); m != peer->mappings.end()) mapping = m->second;
        return {};
      }
    }
    std::unique_lock lock(mutex_);
    if (shutdown_) return errc::cancelled;
    if (auto it = peers_.find(socket); it != peers_.end()) {
      peer = it->second;
      return peer->lost ? std::error_code(errc::connection_lost) : std::error_code{};
    }
    auto channel = shm_channel::connect(ex_, socket);
    if (!channel) {
      log(log_level::debug, "shm transport: segment '", r.name, "': ", channel.error().message());
      return channel.code();
    }
    peer = std::make_shared<shm_peer>();
    peer->socket = socket;
    peer->channel = *channel;
    std::weak_ptr<shm_peer> weak_peer = peer;
    peer->channel->start(
        [weak = weak_from_this(), weak_peer](nlohmann::json&& body, std::vector<unique_fd>&& fds) {
          auto self = weak.lock();
          auto p = weak_peer.lock();
          if (self && p) self->on_peer_message(p, std::move(body), std::move(fds));
        },
        [weak = weak_from_this(), weak_peer] {
          auto self = weak.lock();
          auto p = weak_peer.lock();
          if (self && p) self->on_peer_lost(p);
        });
    peers_.emplace(socket, peer);
    return {};
  }

  // Queues `op` until the owner answers for `r`, asking it if nobody has yet.
  void queue_open(const std::shared_ptr<shm_peer>& peer, const memory::segment_descriptor& r, shm_pending_op op,
                  asio::cancellation_slot slot) {
    const shm_mapping_key key{r.name, r.key, r.generation};
    std::error_code ec;
    std::shared_ptr<shm_mapping> ready;
    {
      std::unique_lock lock(mutex_);
      if (peer->lost) {
        ec = errc::connection_lost;
      } else if (auto m = peer->mappings.find(key); m != peer->mappings.end()) {
        ready = m->second;
      } else {
        shm_peer::request* req = nullptr;
        for (auto& [id, q] : peer->requests)
          if (q.key == key) req = &q;
        if (!req) {
          const std::uint64_t id = ++next_id_;
          ec = peer->channel->send(
              {{"op", "open"}, {"id", id}, {"name", r.name}, {"key", r.key}, {"generation", r.generation}});
          if (!ec) {
            req = &peer->requests[id];
            req->key = key;
            req->timer = std::make_unique<asio::steady_timer>(ex_, options_.open_timeout);
            req->timer->async_wait([weak = weak_from_this(), weak_peer = std::weak_ptr<shm_peer>(peer),
                                    id](const boost::system::error_code& e) {
              if (e) return;
              auto self = weak.lock();
              auto p = weak_peer.lock();
              if (self && p) self->on_open_timeout(p, id);
            });
          }
        }
        if (req) {
          const std::uint64_t op_id = ++next_id_;
          if (slot.is_connected()) {
            slot.assign([weak = weak_from_this(), weak_peer = std::weak_ptr<shm_peer>(peer),
                         op_id](asio::cancellation_type_t) {
              auto self = weak.lock();
              auto p = weak_peer.lock();
              if (self && p) self->cancel_pending(p, op_id);
            });
          }
          req->ops.emplace_back(op_id, std::move(op));
          return;
        }
      }
    }
    op(ec, std::move(ready));
  }

  // Copies between local memory and the segment behind `m`; `len` bytes at `offset`.
  std::error_code copy(const std::shared_ptr<shm_peer>& peer, const std::shared_ptr<shm_mapping>& m,
                       std::uint64_t offset, std::byte* local, std::size_t len, bool read) {
    if (offset > m->length || len > m->length - offset) return errc::out_of_range;
    auto& ctl = m->control.block();
    ctl.in_flight.fetch_add(1, std::memory_order_seq_cst);
    if (ctl.revoked.load(std::memory_order_seq_cst) != 0) {
      ctl.in_flight.fetch_sub(1, std::memory_order_release);
      drop_mapping(peer, m);
      return errc::stale;
    }
    std::error_code ec;
    if (len != 0) {
      if (m->memfd) {
        if (read)
          std::memcpy(local, m->base + offset, len);
        else
          std::memcpy(m->base + offset, local, len);
      } else {
        ec = process_vm_copy(*m, offset, local, len, read);
      }
    }
    ctl.in_flight.fetch_sub(1, std::memory_order_release);
    return ec;
  }

  void shutdown() {
    std::map<std::string, std::shared_ptr<shm_owned>, std::less<>> owned;
    std::vector<std::weak_ptr<shm_channel>> clients;
    std::shared_ptr<shm_listener> listener;
    {
      std::lock_guard lock(owner_mutex_);
      owned.swap(owned_);
      draining_.clear();
      clients.swap(clients_);
      listener = std::move(listener_);
    }
    if (listener) listener->close();
    for (auto& [name, o] : owned) {
      (void)table_.remove(name);
      if (const auto left = revoke(*o))
        log(log_level::warn, "shm transport: segment '", name, "': ", left,
            " peer copies still in flight after the revoke timeout at shutdown (a peer died mid-copy?)");
    }
    for (auto& weak : clients)
      if (auto ch = weak.lock()) ch->close();
    std::vector<shm_pending_op> orphans;
    {
      std::unique_lock lock(mutex_);
      shutdown_ = true;
      for (auto& [socket, peer] : peers_) {
        peer->channel->close();
        peer->lost = true;
        peer->mappings.clear();
        for (auto& [id, req] : peer->requests)
          for (auto& op : req.ops) orphans.push_back(std::move(op.second));
        peer->requests.clear();
      }
    }
    for (auto& op : orphans) op(errc::cancelled, nullptr);
  }

 private:
  // Raises the revoked flag and waits up to the revoke timeout for peers'
  // copies to drain; returns how many are still in flight.
  std::uint64_t revoke(shm_owned& owned) {
    auto& ctl = owned.control.block();
    ctl.revoked.store(1, std::memory_order_seq_cst);
    const auto deadline = std::chrono::steady_clock::now() + options_.revoke_timeout;
    for (int spins = 0;; ++spins) {
      const auto left = ctl.in_flight.load(std::memory_order_seq_cst);
      if (left == 0 || std::chrono::steady_clock::now() > deadline) return left;
      if (spins < 64)
        std::this_thread::yield();
      else
        std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }

  // Revokes `owned` and waits for its copies. Past the timeout a peer may
  // still be writing into or reading from the memory, so the caller must not
  // reuse it: the registration stays revoked (never handed out again) in
  // draining_, where the next deregister_memory of it waits again.
  result<void> drain(const std::shared_ptr<shm_owned>& owned) {
    const auto left = revoke(*owned);
    const auto& seg = owned->segment;
    std::lock_guard lock(owner_mutex_);
    if (left == 0) {
      draining_.erase(std::pair{seg.name, seg.key});
      return {};
    }
    draining_[std::pair{seg.name, seg.key}] = owned;
    return error{errc::timed_out, "shm transport: segment '" + seg.name + "': " + std::to_string(left) +
                                      " peer copies still in flight after the revoke timeout (" +
                                      std::to_string(options_.revoke_timeout.count()) +
                                      " ms; a stopped peer, or one that died mid-copy); the segment stays revoked and "
                                      "its memory is not free to reuse until deregister_memory succeeds"};
  }

  void on_accept(std::shared_ptr<shm_channel> ch) {
    std::weak_ptr<shm_channel> weak_ch = ch;
    {
      std::lock_guard lock(owner_mutex_);
      std::erase_if(clients_, [](const std::weak_ptr<shm_channel>& w) { return w.expired(); });
      clients_.push_back(weak_ch);
    }
    // The channel keeps itself alive through its pending wait until the peer hangs up.
    ch->start(
        [weak = weak_from_this(), weak_ch](nlohmann::json&& body, std::vector<unique_fd>&&) {
          auto self = weak.lock();
          auto c = weak_ch.lock();
          if (self && c) self->on_owner_message(*c, body);
        },
        [] {});
  }

  void on_owner_message(shm_channel& ch, const nlohmann::json& body) {
    const auto op = body.find("op");
    const auto id = body.find("id");
    const auto name = body.find("name");
    const auto key = body.find("key");
    const auto gen = body.find("generation");
    auto is_u64 = [&](nlohmann::json::const_iterator it) { return it != body.end() && it->is_number_unsigned(); };
    if (op == body.end() || *op != "open" || !is_u64(id) || name == body.end() || !name->is_string() || !is_u64(key) ||
        !is_u64(gen)) {
      log(log_level::warn, "shm transport: malformed request from a peer; closing its connection");
      ch.close();
      return;
    }
    const auto request_id = id->get<std::uint64_t>();
    const auto& segment = name->get_ref<const std::string&>();
    auto reply_error = [&](const kvx::error& e) {
      log(log_level::debug, "shm transport: refused a mapping: ", e.message());
      (void)ch.send({{"id", request_id}, {"errc", e.code().value()}, {"message", e.message()}});
    };
    auto access = table_.check_access(segment, key->get<std::uint64_t>(), 0, 0);
    if (!access) return reply_error(access.error());
    if (access->segment().generation != gen->get<std::uint64_t>())
      return reply_error(kvx::error{errc::stale, "segment '" + segment + "' generation " +
                                                     std::to_string(gen->get<std::uint64_t>()) + " is not " +
                                                     std::to_string(access->segment().generation)});
    std::shared_ptr<shm_owned> owned;
    {
      std::lock_guard lock(owner_mutex_);
      if (auto it = owned_.find(segment); it != owned_.end()) owned = it->second;
    }
    if (!owned) return reply_error(kvx::error{errc::unknown_segment, "segment '" + segment + "'"});
    const auto& region = owned->segment.region;
    nlohmann::json reply{{"id", request_id}, {"length", region.length}};
    if (owned->memfd) {
      reply["mode"] = "memfd";
      reply["offset"] = owned->fd_offset;
      (void)ch.send(reply, {owned->control.fd(), owned->data_fd.get()});
    } else {
      reply["mode"] = "vm";
      reply["pid"] = ::getpid();
      reply["address"] = reinterpret_cast<std::uintptr_t>(region.address);
      (void)ch.send(reply, {owned->control.fd()});
    }
  }

  void on_peer_message(const std::shared_ptr<shm_peer>& peer, nlohmann::json&& body, std::vector<unique_fd>&& fds) {
    if (auto op = body.find("op"); op != body.end()) {
      if (*op == "revoke" && body.contains("name") && body["name"].is_string() && body.contains("generation")) {
        std::unique_lock lock(mutex_);
        std::erase_if(peer->mappings, [&](const auto& kv) {
          return std::get<0>(kv.first) == body["name"].get_ref<const std::string&>() &&
                 body["generation"] == std::get<2>(kv.first);
        });
      }
      return;
    }
    const auto id = body.find("id");
    if (id == body.end() || !id->is_number_unsigned()) return;
    shm_peer::request req;
    {
      std::unique_lock lock(mutex_);
      auto it = peer->requests.find(id->get<std::uint64_t>());
      if (it == peer->requests.end()) return;  // timed out or cancelled; its fds close here
      req = std::move(it->second);
      peer->requests.erase(it);
    }
    req.timer->cancel();
    std::error_code ec;
    auto mapping = std::make_shared<shm_mapping>();
    if (auto e = body.find("errc"); e != body.end()) {
      ec = errc_from_wire(*e);
      const auto message = body.find("message");
      log(log_level::debug, "shm transport: owner '", peer->socket, "' refused: ",
          message != body.end() && message->is_string() ? message->get_ref<const std::string&>() : std::string());
    } else {
      ec = build_mapping(*mapping, req.key, body, fds);
    }
    if (!ec) {
      std::unique_lock lock(mutex_);
      if (peer->lost)
        ec = errc::connection_lost;
      else
        peer->mappings[req.key] = mapping;
    }
    for (auto& [op_id, op] : req.ops) op(ec, ec ? nullptr : mapping);
  }

  std::error_code build_mapping(shm_mapping& m, const shm_mapping_key& key, const nlohmann::json& body,
                                std::vector<unique_fd>& fds) {
    std::tie(m.name, m.key, m.generation) = key;
    const auto mode = body.find("mode");
    const auto length = body.find("length");
    if (mode == body.end() || !mode->is_string() || length == body.end() || !length->is_number_unsigned() ||
        fds.empty())
      return errc::protocol_error;
    m.length = length->get<std::uint64_t>();
    auto control = control_page::adopt(std::move(fds[0]));
    if (!control) {
      log(log_level::error, "shm transport: ", control.error().message());
      return control.code();
    }
    m.control = std::move(*control);
    if (*mode == "memfd") {
      const auto offset = body.find("offset");
      if (offset == body.end() || !offset->is_number_unsigned() || fds.size() < 2) return errc::protocol_error;
      auto mapped = m.map_memfd(fds[1].get(), offset->get<std::uint64_t>());
      if (!mapped) {
        log(log_level::error, "shm transport: ", mapped.error().message());
        return mapped.code();
      }
      m.memfd = true;
      return {};
    }
    if (*mode == "vm") {
      const auto pid = body.find("pid");
      const auto address = body.find("address");
      if (pid == body.end() || !pid->is_number_integer() || address == body.end() || !address->is_number_unsigned())
        return errc::protocol_error;
      m.pid = pid->get<pid_t>();
      m.remote_address = address->get<std::uintptr_t>();
      return {};
    }
    return errc::protocol_error;
  }

  void on_peer_lost(const std::shared_ptr<shm_peer>& peer) {
    std::map<std::uint64_t, shm_peer::request> requests;
    {
      std::unique_lock lock(mutex_);
      peer->lost = true;
      peer->mappings.clear();
      requests.swap(peer->requests);
    }
    log(log_level::debug, "shm transport: owner '", peer->socket, "' closed its socket");
    for (auto& [id, req] : requests) {
      req.timer->cancel();
      for (auto& [op_id, op] : req.ops) op(errc::connection_lost, nullptr);
    }
  }

  void on_open_timeout(const std::shared_ptr<shm_peer>& peer, std::uint64_t id) {
    shm_peer::request req;
    {
      std::unique_lock lock(mutex_);
      auto it = peer->requests.find(id);
      if (it == peer->requests.end()) return;
      req = std::move(it->second);
      peer->requests.erase(it);
    }
    log(log_level::warn, "shm transport: owner '", peer->socket, "' did not answer for segment '",
        std::get<0>(req.key), "' within the open timeout");
    for (auto& [op_id, op] : req.ops) op(errc::timed_out, nullptr);
  }

  void cancel_pending(const std::shared_ptr<shm_peer>& peer, std::uint64_t op_id) {
    std::unique_lock lock(mutex_);
    for (auto& [id, req] : peer->requests) {
      for (auto it = req.ops.begin(); it != req.ops.end(); ++it) {
        if (it->first != op_id) continue;
        // Completing inside the cancellation handler would tear down the slot mid-call.
        asio::post(ex_, [op = std::make_shared<shm_pending_op>(std::move(it->second))] {
          (*op)(errc::cancelled, nullptr);
        });
        req.ops.erase(it);
        return;
      }
    }
  }

  void drop_mapping(const std::shared_ptr<shm_peer>& peer, const std::shared_ptr<shm_mapping>& m) {
    std::unique_lock lock(mutex_);
    auto it = peer->mappings.find(shm_mapping_key{m->name, m->key, m->generation});
    if (it != peer->mappings.end() && it->second == m) peer->mappings.erase(it);
  }

  asio::any_io_executor ex_;
  shm_options options_;

  // owner side
  std::mutex owner_mutex_;
  memory::segment_table table_{"shm", 0};
  std::map<std::string, std::shared_ptr<shm_owned>, std::less<>> owned_;
  // Revoked registrations whose copies outlived revoke_timeout, by name and key.
  std::map<std::pair<std::string, std::uint64_t>, std::shared_ptr<shm_owned>> draining_;
  std::shared_ptr<shm_listener> listener_;
  std::vector<std::weak_ptr<shm_channel>> clients_;

  // initiator side
  std::shared_mutex mutex_;
  std::map<std::string, std::shared_ptr<shm_peer>, std::less<>> peers_;
  std::uint64_t next_id_ = 0;
  bool shutdown_ = false;
};

}  // namespace detail

//! The same-host transport (see the file comment for the two data paths and
//! what is checked where).
class shm {
 public:
  using transport_concept = transport_tag;
  using executor_type = asio::any_io_executor;
  static constexpr transport_capabilities capabilities{.memory = memory_kinds::host,
                                                       .one_sided = true,
                                                       .zero_copy = true,
                                                       .bounce_buffered = false,
                                                       .same_host_only = true,
                                                       .same_process_only = false};
  static constexpr std::string_view name() noexcept { return "shm"; }

  explicit shm(executor_type ex, shm_options options = {})
      : state_(std::make_shared<detail::shm_state>(std::move(ex), options)) {}
  shm(const shm&) = delete;
  shm& operator=(const shm&) = delete;
  //! Revokes every registration (waiting for peers' copies in flight), closes
  //! all sockets and completes queued ops with `errc::cancelled`.
  ~shm() { state_->shutdown(); }

  [[nodiscard]] executor_type get_executor() const noexcept { return state_->executor(); }

  //! Makes `seg` reachable by peers on this host; returns
  //! `{"socket": "@kvx-shm-<pid>-<n>", "pid": ..., "mode": "memfd" | "vm"}`.
  //! Memory from `shm_allocate` (or a sub-range of it) is shared by fd; other
  //! host memory through process_vm. Device memory is refused (`not_supported`).
  result<nlohmann::json> register_memory(const memory::local_segment& seg) { return state_->register_memory(seg); }

  //! Refuses new mappings of `seg`, revokes the existing ones and waits for
  //! peers' copies in flight (bounded by `shm_options::revoke_timeout`).
  //! `errc::timed_out` (naming the segment and the copies left) when a copy
  //! is still running at the timeout: the memory is then NOT free to reuse.
  //! The segment stays revoked (no new copy starts on it, no peer maps it
  //! again) and calling this again with `seg` waits for those copies again;
  //! the memory may be reused once a call succeeds.
  result<void> deregister_memory(const memory::local_segment& seg) { return state_->deregister_memory(seg); }

  //! `unreachable` unless `remote` has an `shm` entry and lives on this host
  //! (`host_id` equals `memory::this_host_id()`); `not_supported` for device memory.
  [[nodiscard]] std::error_code can_transfer(const memory::segment_descriptor& remote) const {
    return socket_of(remote) ? std::error_code{} : check(remote);
  }

  //! Reads `dst.size()` bytes at `offset` of `remote` into `dst`.
  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_read(const memory::segment_descriptor& remote, std::uint64_t offset, std::span<std::byte> dst,
                  CompletionToken&& token) {
    return asio::async_initiate<CompletionToken, void(std::error_code)>(initiation{this, true}, token, std::cref(remote),
                                                                         offset, dst.data(), dst.size());
  }

  //! Writes `src` at `offset` of `remote`.
  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_write(const memory::segment_descriptor& remote, std::uint64_t offset, std::span<const std::byte> src,
                   CompletionToken&& token) {
    // process_vm_writev and memcpy only read from `src`.
    return asio::async_initiate<CompletionToken, void(std::error_code)>(
        initiation{this, false}, token, std::cref(remote), offset, const_cast<std::byte*>(src.data()), src.size());
  }

 private:
  struct initiation {
    shm* self;
    bool read;
    template <class Handler>
    void operator()(Handler&& handler, const memory::segment_descriptor& r, std::uint64_t off, std::byte* data,
                    std::size_t size) const {
      self->start(std::forward<Handler>(handler), r, off, data, size, read);
    }
  };

  static const std::string* socket_of(const memory::segment_descriptor& remote) {
    auto it = remote.transports.find(name());
    if (it == remote.transports.end() || !it->is_object()) return nullptr;
    auto s = it->find("socket");
    if (s == it->end() || !s->is_string()) return nullptr;
    if (remote.host_id != memory::this_host_id()) return nullptr;
    if (!has(capabilities.memory, kind_of(remote.where))) return nullptr;
    return &s->get_ref<const std::string&>();
  }
  static std::error_code check(const memory::segment_descriptor& remote) {
    auto it = remote.transports.find(name());
    if (it == remote.transports.end() || !it->is_object() || !it->contains("socket")) return errc::unreachable;
    if (remote.host_id != memory::this_host_id()) return errc::unreachable;
    if (!has(capabilities.memory, kind_of(remote.where))) return errc::not_supported;
    return errc::unreachable;
  }

  template <class Handler>
  void start(Handler handler, const memory::segment_descriptor& r, std::uint64_t off, std::byte* local,
             std::size_t len, bool read) {
    const std::string* socket = socket_of(r);
    if (!socket) return kvx::detail::post_completion(state_->executor(), std::move(handler), check(r));
    if (off > r.length || len > r.length - off)
      return kvx::detail::post_completion(state_->executor(), std::move(handler), std::error_code(errc::out_of_range));
    std::shared_ptr<detail::shm_peer> peer;
    std::shared_ptr<detail::shm_mapping> mapping;
    if (auto ec = state_->find(*socket, r, peer, mapping))
      return kvx::detail::post_completion(state_->executor(), std::move(handler), ec);
    if (mapping) {
      auto ec = state_->copy(peer, mapping, off, local, len, read);
      return kvx::detail::post_completion(state_->executor(), std::move(handler), ec);
    }
    auto slot = asio::get_associated_cancellation_slot(handler);
    state_->queue_open(
        peer, r,
        detail::shm_pending_op([weak = std::weak_ptr<detail::shm_state>(state_), ex = state_->executor(),
                                weak_peer = std::weak_ptr<detail::shm_peer>(peer), off, local, len, read,
                                h = std::move(handler)](std::error_code ec,
                                                        std::shared_ptr<detail::shm_mapping> m) mutable {
          if (!ec) {
            auto self = weak.lock();
            auto p = weak_peer.lock();
            ec = self && p && m ? self->copy(p, m, off, local, len, read) : std::error_code(errc::cancelled);
          }
          // The owner's answer arrives on any thread: the slot is cleared where the caller emits.
          kvx::detail::post_completion_clearing_slot(ex, std::move(h), ec);
        }),
        slot);
  }

  std::shared_ptr<detail::shm_state> state_;
};

static_assert(check_transport<shm>());

}  // namespace kvx::transport
