#pragma once
// Private engine of kvx/transport/ucx.hpp: one UCP worker joined to an Asio
// executor, its endpoints, rkey cache, registrations and in-flight requests.
//
// Locking: every UCX worker call and every member below is guarded by
// `mutex_`; the worker is created UCS_THREAD_MODE_SERIALIZED because kvx
// serialises access itself (initiating threads, io_context threads and
// register/deregister callers all take the same mutex). UCX request and
// error callbacks only ever run inside ucp_worker_progress / ucp_ep_close_nbx
// calls made under that mutex, so they may touch the members directly.

#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>

#include <nlohmann/json.hpp>
#include <ucp/api/ucp.h>

#include <kvx/core/async.hpp>
#include <kvx/core/log.hpp>
#include <kvx/memory/segment.hpp>
#include <kvx/transport/detail/ucx_support.hpp>

namespace kvx::transport::detail {

//! What the worker needs from kvx::transport::ucx_options, already validated.
struct ucx_worker_settings {
  std::vector<std::pair<std::string, std::string>> ucx_config;  // ucp_config_modify(name, value)
  bool busy_poll = false;
};

// Workers and live registrations of this process: an initiator whose owner
// worker lives in the same process checks the registration synchronously, so
// a deregistered segment is refused at once (cross-process, see docs).
struct ucx_process_registry {
  std::mutex mutex;
  std::unordered_set<std::string> workers;
  std::unordered_set<std::string> registrations;  // address \n name \n generation \n rkey
  static ucx_process_registry& get() {
    static ucx_process_registry r;
    return r;
  }
  static std::string key(const std::string& address, const std::string& name, std::uint64_t generation,
                         const std::string& rkey) {
    std::string k;
    k.reserve(address.size() + name.size() + rkey.size() + 24);
    k.append(address).append(1, '\n').append(name).append(1, '\n').append(std::to_string(generation)).append(1, '\n').append(rkey);
    return k;
  }
};

class ucx_worker;
struct ucx_peer;

//! One read or write in flight. Owned by the worker from issue to completion.
struct ucx_op_base {
  ucx_worker* worker = nullptr;
  std::shared_ptr<ucx_peer> peer;
  std::uint64_t id = 0;  // names the op to cancel(), which must not touch a finished one
  bool abandoned = false;  // completed by kvx after its endpoint closed; UCX may still hold the request
  ucs_status_t issue_failure = UCS_OK;  // a piece of a batch UCX refused: the batch fails even if its flush succeeds
  virtual void deliver(std::error_code ec) = 0;  // posts the handler
  void finish(std::error_code ec) {
    deliver(ec);
    delete this;
  }
  virtual ~ucx_op_base() = default;
};

struct ucx_rkey_entry {
  std::string blob_hex;
  ucp_rkey_h rkey = nullptr;
};

//! The `ucx` entry of a descriptor, read in one pass; null where a field is
//! missing or has the wrong type.
struct ucx_entry_fields {
  const std::string* worker_address = nullptr;
  const std::string* rkey = nullptr;
  const std::string* segment = nullptr;
  const std::uint64_t* base = nullptr;
  const std::uint64_t* length = nullptr;
  const std::uint64_t* generation = nullptr;
  const std::uint64_t* key_check = nullptr;
  const std::uint64_t* blob_check = nullptr;

  [[nodiscard]] bool complete() const noexcept {
    return worker_address && rkey && segment && base && length && generation && key_check && blob_check;
  }

  // One walk over the object instead of a map lookup per field: this runs on
  // every operation, and small-op latency is what it costs.
  static ucx_entry_fields read(const nlohmann::json& e) {
    ucx_entry_fields f;
    for (auto it = e.begin(); it != e.end(); ++it) {
      const std::string& k = it.key();
      const nlohmann::json& v = *it;
      const auto* str = v.is_string() ? &v.get_ref<const std::string&>() : nullptr;
      const auto* num = v.is_number_unsigned() ? v.get_ptr<const std::uint64_t*>() : nullptr;
      switch (k.size()) {
        case 14: if (k == "worker_address") f.worker_address = str; break;
        case 4:
          if (k == "rkey") f.rkey = str;
          else if (k == "base") f.base = num;
          break;
        case 7: if (k == "segment") f.segment = str; break;
        case 6: if (k == "length") f.length = num; break;
        case 10:
          if (k == "generation") f.generation = num;
          else if (k == "blob_check") f.blob_check = num;
          break;
        case 9: if (k == "key_check") f.key_check = num; break;
        default: break;
      }
    }
    return f;
  }
};

//! An endpoint to one remote worker and the rkeys unpacked on it.
struct ucx_peer {
  std::string address;  // hex, the cache key
  ucp_ep_h ep = nullptr;
  bool same_process = false;
  bool failed = false;
  ucs_status_t failure = UCS_OK;
  ucx_op_base* cancelled_by = nullptr;
  std::unordered_map<std::string, ucx_rkey_entry> rkeys;  // name \n generation
  std::vector<ucp_rkey_h> retired_rkeys;  // replaced by a re-registration; destroyed with the endpoint
  // The rkey used last and what it was resolved from: consecutive operations
  // on one segment skip building the map key and hashing it.
  const ucx_rkey_entry* last_rkey = nullptr;
  std::string last_rkey_segment;
  std::uint64_t last_rkey_generation = 0;
  std::unordered_set<ucx_op_base*> ops;
  ucx_worker* owner = nullptr;  // outlives every callback that names this peer
};

//! What a validated descriptor resolves to.
struct ucx_target {
  std::shared_ptr<ucx_peer> peer;
  ucp_rkey_h rkey = nullptr;
  std::uint64_t remote_address = 0;
};

//! One piece of a prepared batch, resolved: where it goes and where from.
struct ucx_piece_target {
  std::uint64_t remote_address = 0;
  void* local = nullptr;
  std::size_t length = 0;
};

class ucx_worker : public std::enable_shared_from_this<ucx_worker> {
 public:
  struct registration {
    memory::local_segment seg;
    ucp_mem_h memh = nullptr;
    std::shared_ptr<ucx_allocation> allocation;  // set when the memory came from allocate()
    std::string rkey_hex;
    std::string registry_key;
  };

  static result<std::shared_ptr<ucx_worker>> create(asio::any_io_executor ex, const ucx_worker_settings& settings) {
    auto w = std::shared_ptr<ucx_worker>(new ucx_worker(std::move(ex), settings.busy_poll));
    KVX_TRY(w->init(settings));
    return w;
  }

  ucx_worker(const ucx_worker&) = delete;
  ucx_worker& operator=(const ucx_worker&) = delete;
  ~ucx_worker() { shutdown(); }

  [[nodiscard]] const asio::any_io_executor& executor() const noexcept { return ex_; }
  //! Unique in this process for the process's life (an address may be reused).
  [[nodiscard]] std::uint64_t serial() const noexcept { return serial_; }
  [[nodiscard]] const std::string& address() const noexcept { return address_hex_; }
  [[nodiscard]] const std::shared_ptr<ucx_context_holder>& context() const noexcept { return ctx_; }
  [[nodiscard]] bool supports_cuda() const noexcept { return (memory_types_ & UCS_BIT(UCS_MEMORY_TYPE_CUDA)) != 0; }
  [[nodiscard]] std::uint64_t memory_types() const noexcept { return memory_types_; }

  // ---- registration --------------------------------------------------------

  result<nlohmann::json> register_memory(const memory::local_segment& seg) {
    if (seg.name.empty() || seg.region.address == nullptr || seg.region.length == 0)
      return error{errc::invalid_argument, "ucx register: segment '" + seg.name + "' has an empty name or region"};
    ucs_memory_type_t type = UCS_MEMORY_TYPE_HOST;
    if (seg.region.where.kind == memory::location_kind::cuda) {
      if (!supports_cuda())
        return error{errc::not_supported, "ucx register: segment '" + seg.name + "' is " + seg.region.where.to_string() +
                                              " but this UCX build reports no CUDA memory support"};
      type = UCS_MEMORY_TYPE_CUDA;
    }
    std::lock_guard lock(mutex_);
    if (shut_down_) return error{errc::cancelled, "ucx register: transport is shut down"};
    if (registrations_.count(seg.name))
      return error{errc::already_exists, "ucx register: segment '" + seg.name + "' is already registered"};
    registration reg;
    reg.seg = seg;
    reg.allocation = find_allocation(seg.region.address, seg.region.length);
    if (reg.allocation) {
      reg.memh = reg.allocation->memh;
    } else {
      ucp_mem_map_params_t mp{};
      mp.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH | UCP_MEM_MAP_PARAM_FIELD_MEMORY_TYPE;
      mp.address = seg.region.address;
      mp.length = seg.region.length;
      mp.memory_type = type;
      if (auto s = ucp_mem_map(ctx_->context, &mp, &reg.memh); s != UCS_OK)
        return ucx_error(s, "ucx register: ucp_mem_map of segment '" + seg.name + "'");
    }
    void* packed = nullptr;
    std::size_t packed_size = 0;
    if (auto s = ucp_rkey_pack(ctx_->context, reg.memh, &packed, &packed_size); s != UCS_OK) {
      if (!reg.allocation) ucp_mem_unmap(ctx_->context, reg.memh);
      return ucx_error(s, "ucx register: ucp_rkey_pack of segment '" + seg.name + "'");
    }
    reg.rkey_hex = to_hex(packed, packed_size);
    ucp_rkey_buffer_release(packed);
    reg.registry_key = ucx_process_registry::key(address_hex_, seg.name, seg.generation, reg.rkey_hex);
    {
      auto& r = ucx_process_registry::get();
      std::lock_guard rl(r.mutex);
      r.registrations.insert(reg.registry_key);
    }
    nlohmann::json entry{{"worker_address", address_hex_},
                         {"rkey", reg.rkey_hex},
                         {"base", reinterpret_cast<std::uint64_t>(seg.region.address)},
                         {"length", static_cast<std::uint64_t>(seg.region.length)},
                         {"segment", seg.name},
                         {"generation", seg.generation},
                         {"key_check", ucx_key_check(seg.key)},
                         {"blob_check", ucx_blob_check(address_hex_, reg.rkey_hex)}};
    registrations_.emplace(seg.name, std::move(reg));
    return entry;
  }

  result<void> deregister_memory(const memory::local_segment& seg) {
    std::lock_guard lock(mutex_);
    auto it = registrations_.find(seg.name);
    if (it == registrations_.end()) return error{errc::unknown_segment, "ucx deregister: segment '" + seg.name + "'"};
    release(it->second);
    registrations_.erase(it);
    return {};
  }

  result<std::shared_ptr<ucx_allocation>> allocate(std::size_t length, ucs_memory_type_t type) {
    if (length == 0) return error{errc::invalid_argument, "ucx allocate: zero bytes"};
    auto a = std::make_shared<ucx_allocation>();
    a->ctx = ctx_;
    ucp_mem_map_params_t mp{};
    mp.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH | UCP_MEM_MAP_PARAM_FIELD_FLAGS |
                    UCP_MEM_MAP_PARAM_FIELD_MEMORY_TYPE;
    mp.address = nullptr;
    mp.length = length;
    mp.flags = UCP_MEM_MAP_ALLOCATE;
    mp.memory_type = type;
    if (auto s = ucp_mem_map(ctx_->context, &mp, &a->memh); s != UCS_OK)
      return ucx_error(s, "ucx allocate: ucp_mem_map of " + std::to_string(length) + " bytes");
    ucp_mem_attr_t attr{};
    attr.field_mask = UCP_MEM_ATTR_FIELD_ADDRESS | UCP_MEM_ATTR_FIELD_LENGTH;
    if (auto s = ucp_mem_query(a->memh, &attr); s != UCS_OK) return ucx_error(s, "ucx allocate: ucp_mem_query");
    a->address = attr.address;
    a->length = length;
    std::lock_guard lock(mutex_);
    std::erase_if(allocations_, [](const std::weak_ptr<ucx_allocation>& w) { return w.expired(); });
    allocations_.push_back(a);
    return a;
  }

  // ---- the data path ------------------------------------------------------

  std::mutex& mutex() noexcept { return mutex_; }
  [[nodiscard]] bool is_shut_down() const noexcept { return shut_down_; }

  //! Validates `remote` and resolves it to an endpoint and rkey. Lock held.
  std::error_code resolve(const memory::segment_descriptor& remote, std::uint64_t offset, std::uint64_t length,
                          ucx_target& out) {
    if (shut_down_) return errc::cancelled;
    auto it = remote.transports.find("ucx");
    if (it == remote.transports.end() || !it->is_object()) return errc::unreachable;
    if (auto ec = kind_ok(remote.where)) return ec;
    const auto f = ucx_entry_fields::read(*it);
    if (!f.complete()) {
      log(log_level::debug, "ucx: malformed entry for segment '", remote.name, "'");
      return errc::malformed_message;
    }
    const auto* addr = f.worker_address;
    const auto* rkey = f.rkey;
    const auto* base = f.base;
    const auto* len = f.length;
    if (*f.segment != remote.name) return errc::unknown_segment;
    if (*f.key_check != ucx_key_check(remote.key)) return errc::bad_key;
    if (*f.generation != remote.generation) return errc::stale;
    const std::uint64_t limit = std::min<std::uint64_t>(remote.length, *len);
    if (offset > limit || length > limit - offset) return errc::out_of_range;
    auto peer = get_peer(*addr, *rkey, *f.blob_check);
    if (!peer) {
      log(log_level::debug, "ucx: ", peer.error().message());
      return peer.code();
    }
    if ((*peer)->same_process) {
      auto& r = ucx_process_registry::get();
      std::lock_guard rl(r.mutex);
      if (!r.registrations.count(ucx_process_registry::key(*addr, remote.name, remote.generation, *rkey)))
        return errc::unknown_segment;
    }
    auto rk = get_rkey(**peer, remote, *rkey, *addr, *f.blob_check);
    if (!rk) {
      log(log_level::debug, "ucx: ", rk.error().message());
      return rk.code();
    }
    out.peer = std::move(*peer);
    out.rkey = *rk;
    out.remote_address = *base + offset;
    return {};
  }

  //! Issues a get (read), or a put followed by an endpoint flush (write):
  //! the operation is done when the bytes are in `dst`, or remotely visible.
  //! Returns UCS_OK or an error status when UCX finished at once (no op is
  //! needed then; see `code_of`), else the request still in flight, which the
  //! caller must hand to `track` before releasing the lock. Lock held.
  ucs_status_ptr_t post(const ucx_target& t, void* local, std::size_t length, bool is_write) {
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK;
    p.cb.send = &ucx_worker::on_request_done;
    if (!is_write) return ucp_get_nbx(t.peer->ep, local, length, t.remote_address, t.rkey, &p);
    ucp_request_param_t put{};
    // The put's own completion only means the source may be reused; the
    // flush below is what says the bytes are visible at the target.
    ucs_status_ptr_t pr = ucp_put_nbx(t.peer->ep, local, length, t.remote_address, t.rkey, &put);
    if (UCS_PTR_IS_ERR(pr)) return pr;
    if (pr != nullptr) ucp_request_free(pr);
    return ucp_ep_flush_nbx(t.peer->ep, &p);
  }

  //! Issues every piece (all to `t`'s endpoint and rkey), then one endpoint
  //! flush that completes when all of them have (UCX's flush covers gets as
  //! well as puts); a single read needs no flush. Returns as `post` does. A
  //! piece UCX refuses stops the issue; the pieces before it are still
  //! waited for: finished at once, the refusal is the status returned; in
  //! flight, `failure` holds it for the op (`ucx_op_base::issue_failure`).
  //! Lock held.
  ucs_status_ptr_t post_batch(const ucx_target& t, std::span<const ucx_piece_target> pieces, bool is_write,
                              ucs_status_t& failure) {
    failure = UCS_OK;
    if (pieces.size() == 1 && !is_write) return post({t.peer, t.rkey, pieces[0].remote_address}, pieces[0].local,
                                                     pieces[0].length, false);
    ucp_request_param_t none{};
    for (const auto& piece : pieces) {
      ucs_status_ptr_t r = is_write
                               ? ucp_put_nbx(t.peer->ep, piece.local, piece.length, piece.remote_address, t.rkey, &none)
                               : ucp_get_nbx(t.peer->ep, piece.local, piece.length, piece.remote_address, t.rkey, &none);
      if (UCS_PTR_IS_ERR(r)) {
        failure = UCS_PTR_STATUS(r);
        break;
      }
      if (r != nullptr) ucp_request_free(r);  // UCX frees it when done; the flush says when
    }
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK;
    p.cb.send = &ucx_worker::on_request_done;
    const ucs_status_ptr_t flushed = ucp_ep_flush_nbx(t.peer->ep, &p);
    if (failure != UCS_OK && flushed == nullptr) return UCS_STATUS_PTR(failure);
    return flushed;
  }

  //! Whether a target resolved earlier may still be posted to: its endpoint
  //! is open, has not failed and is not being closed by a cancel. Lock held.
  [[nodiscard]] static bool usable(const ucx_target& t) noexcept {
    return t.peer && t.peer->ep != nullptr && !t.peer->failed && t.peer->cancelled_by == nullptr;
  }

  //! Progresses the worker once (a caller polling a posted batch). Lock held.
  std::size_t progress_once() {
    return worker_ && !shut_down_ ? ucp_worker_progress(worker_) : 0;
  }

  //! The error an operation that `post` finished at once ends with.
  static std::error_code code_of(ucs_status_t s) {
    if (s == UCS_OK) return {};
    log(log_level::debug, "ucx: op to peer failed: ", ucs_status_string(s));
    if (s == UCS_ERR_CANCELED) return errc::connection_lost;  // its endpoint closed; it was not cancelled itself
    return ucx_code(s);
  }

  //! Binds `op` to the in-flight `request` `post` returned: UCX's callback
  //! finds the op in the space reserved in every request (request_size).
  //! Lock held, so no progress (and no callback) ran in between.
  void track(ucx_op_base* op, const ucx_target& t, void* request) {
    op->worker = this;
    op->peer = t.peer;
    op->id = ++next_op_id_;
    live_.emplace(op->id, op);
    t.peer->ops.insert(op);
    ++in_flight_;
    *static_cast<ucx_op_base**>(request) = op;
    kick();
  }

  //! Asks for the op's endpoint to be force-closed (later, not inside the
  //! cancellation handler): UCX then completes its requests with CANCELED.
  //! By id: the caller's cancellation may be emitted after the op finished
  //! (and was freed) but before its handler ran.
  void cancel(std::uint64_t id) {
    std::lock_guard lock(mutex_);
    const auto live = live_.find(id);
    if (shut_down_ || live == live_.end()) return;
    auto* op = live->second;
    if (!op->peer || !op->peer->ops.count(op)) return;
    auto peer = op->peer;
    if (!peer->cancelled_by) peer->cancelled_by = op;
    // The address may already name a newer endpoint (an earlier cancel closed
    // this one): only this peer leaves the cache.
    if (auto it = peers_.find(peer->address); it != peers_.end() && it->second == peer) peers_.erase(it);
    if (last_peer_ == peer) last_peer_.reset();
    asio::post(ex_, [weak = weak_from_this(), peer] {
      if (auto self = weak.lock()) {
        std::lock_guard l(self->mutex_);
        self->close_peer(peer);
      }
    });
  }

  //! Starts waiting on the worker's event fd (after construction by the owner).
  void start() {
    std::lock_guard lock(mutex_);
    drain();
    wait();
  }

  void shutdown() {
    std::lock_guard lock(mutex_);
    if (shut_down_ || worker_ == nullptr) {
      shut_down_ = true;
      return;
    }
    shut_down_ = true;
    std::vector<std::shared_ptr<ucx_peer>> all;
    for (auto& [_, p] : peers_) all.push_back(p);
    peers_.clear();
    last_peer_.reset();
    for (auto& p : all) close_peer(p);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
    while ((in_flight_ > 0 || !closing_.empty()) && std::chrono::steady_clock::now() < deadline)
      ucp_worker_progress(worker_);
    for (auto& c : closing_)  // a close that did not finish in time: drop its rkeys anyway
      destroy_rkeys(*c);
    closing_.clear();
    for (auto& [_, reg] : registrations_) release(reg);
    registrations_.clear();
    {
      auto& r = ucx_process_registry::get();
      std::lock_guard rl(r.mutex);
      r.workers.erase(address_hex_);
    }
    if (efd_) {
      boost::system::error_code ignored;
      efd_->close(ignored);
      efd_.reset();
    }
    ucp_worker_destroy(worker_);
    worker_ = nullptr;
    for (auto* op : abandoned_) delete op;
    abandoned_.clear();
    ctx_.reset();
  }

 private:
  ucx_worker(asio::any_io_executor ex, bool busy_poll) : ex_(std::move(ex)), busy_poll_(busy_poll) {}

  result<void> init(const ucx_worker_settings& settings) {
    ucp_config_t* config = nullptr;
    if (auto s = ucp_config_read(nullptr, nullptr, &config); s != UCS_OK) return ucx_error(s, "ucx: ucp_config_read");
    for (const auto& [name, value] : settings.ucx_config) {
      if (auto s = ucp_config_modify(config, name.c_str(), value.c_str()); s != UCS_OK) {
        ucp_config_release(config);
        return ucx_error(s, "ucx: setting UCX_" + name + "=" + value);
      }
    }
    ucp_params_t params{};
    params.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_MT_WORKERS_SHARED | UCP_PARAM_FIELD_NAME |
                        UCP_PARAM_FIELD_REQUEST_SIZE;
    params.features = UCP_FEATURE_RMA | UCP_FEATURE_WAKEUP;
    // Room in every UCX request for the op it completes (see track): an
    // operation UCX finishes at once then needs no op object at all.
    params.request_size = sizeof(ucx_op_base*);
    // The context is shared with register/deregister callers on other threads.
    params.mt_workers_shared = 1;
    params.name = "kvx";
    ctx_ = std::make_shared<ucx_context_holder>();
    const auto s = ucp_init(&params, config, &ctx_->context);
    ucp_config_release(config);
    if (s != UCS_OK) return ucx_error(s, "ucx: ucp_init");
    ucp_context_attr_t attr{};
    attr.field_mask = UCP_ATTR_FIELD_MEMORY_TYPES;
    if (ucp_context_query(ctx_->context, &attr) == UCS_OK) memory_types_ = attr.memory_types;

    ucp_worker_params_t wp{};
    wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
    wp.thread_mode = UCS_THREAD_MODE_SERIALIZED;
    if (auto ws = ucp_worker_create(ctx_->context, &wp, &worker_); ws != UCS_OK)
      return ucx_error(ws, "ucx: ucp_worker_create (check UCX_TLS / ucx.tls names an available transport)");
    ucp_address_t* addr = nullptr;
    std::size_t addr_len = 0;
    if (auto as = ucp_worker_get_address(worker_, &addr, &addr_len); as != UCS_OK)
      return ucx_error(as, "ucx: ucp_worker_get_address");
    address_hex_ = to_hex(addr, addr_len);
    ucp_worker_release_address(worker_, addr);
    int fd = -1;
    if (auto es = ucp_worker_get_efd(worker_, &fd); es != UCS_OK) return ucx_error(es, "ucx: ucp_worker_get_efd");
    // The descriptor object closes what it holds; UCX owns `fd`, so hold a duplicate.
    const int dup_fd = ::dup(fd);
    if (dup_fd < 0) return error{errc::io_error, "ucx: dup of the worker event fd failed"};
    efd_.emplace(ex_, dup_fd);
    auto& r = ucx_process_registry::get();
    std::lock_guard rl(r.mutex);
    r.workers.insert(address_hex_);
    return {};
  }

  [[nodiscard]] std::error_code kind_ok(const memory::location& where) const {
    if (where.kind == memory::location_kind::host) return {};
    if (where.kind == memory::location_kind::cuda && supports_cuda()) return {};
    return errc::not_supported;
  }

  std::shared_ptr<ucx_allocation> find_allocation(const void* p, std::size_t len) {
    for (auto& w : allocations_) {
      if (auto a = w.lock()) {
        memory::memory_region r{a->address, a->length};
        if (r.contains(p, len)) return a;
      }
    }
    return nullptr;
  }

  void release(registration& reg) {
    {
      auto& r = ucx_process_registry::get();
      std::lock_guard rl(r.mutex);
      r.registrations.erase(reg.registry_key);
    }
    if (!reg.allocation && reg.memh) ucp_mem_unmap(ctx_->context, reg.memh);
    reg.memh = nullptr;
    reg.allocation.reset();
  }

  // Checks the blobs before UCX parses one (see ucx_blob_check): only on a
  // cache miss, so the per-operation path stays a comparison.
  static result<void> check_blobs(const std::string& address_hex, const std::string& rkey_hex, std::uint64_t check) {
    if (ucx_blob_check(address_hex, rkey_hex) != check)
      return error{errc::malformed_message, "ucx: the entry's worker_address or rkey does not match its blob_check "
                                            "(truncated or corrupted in the metadata)"};
    return {};
  }

  result<std::shared_ptr<ucx_peer>> get_peer(const std::string& address, const std::string& rkey_hex, std::uint64_t blob_check) {
    // Consecutive operations usually go to one peer: compare before hashing
    // the (long) address. The pointer is cleared wherever peers_ drops a peer.
    if (last_peer_ && last_peer_->address == address) return last_peer_;
    if (auto it = peers_.find(address); it != peers_.end()) {
      last_peer_ = it->second;
      return it->second;
    }
    KVX_TRY(check_blobs(address, rkey_hex, blob_check));
    auto bytes = from_hex(address, "worker_address");
    KVX_TRY(bytes);
    auto peer = std::make_shared<ucx_peer>();
    peer->address = address;
    peer->owner = this;
    ucp_ep_params_t ep{};
    ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                    UCP_EP_PARAM_FIELD_ERR_HANDLER | UCP_EP_PARAM_FIELD_NAME;
    ep.address = reinterpret_cast<const ucp_address_t*>(bytes->data());
    // PEER mode: a dead peer fails the endpoint (and its requests) instead of
    // hanging. UCX 1.13's shared-memory transports (posix, sysv) cannot detect
    // a dead peer and refuse PEER mode; there the endpoint falls back to mode
    // NONE (remembered per worker) and deadlines end operations to a dead peer.
    ep.err_mode = peer_mode_ ? UCP_ERR_HANDLING_MODE_PEER : UCP_ERR_HANDLING_MODE_NONE;
    ep.err_handler.cb = &ucx_worker::on_ep_error;
    ep.err_handler.arg = peer.get();
    ep.name = "kvx";
    auto s = ucp_ep_create(worker_, &ep, &peer->ep);
    if (s == UCS_ERR_UNREACHABLE && peer_mode_) {
      ep.err_mode = UCP_ERR_HANDLING_MODE_NONE;
      s = ucp_ep_create(worker_, &ep, &peer->ep);
      // Only a transport that refused PEER mode switches the worker over; a
      // peer that is simply unreachable must not cost every later endpoint
      // its dead-peer reports.
      if (s == UCS_OK) {
        peer_mode_ = false;
        log(log_level::info, "ucx: these transports cannot report a dead peer (error mode PEER refused); using mode NONE");
      }
    }
    if (s != UCS_OK) {
      // UCX reads the address blob without a length; a corrupt blob surfaces here.
      return ucx_error(s == UCS_ERR_INVALID_PARAM ? UCS_ERR_UNREACHABLE : s, "ucx: ucp_ep_create to a peer worker");
    }
    {
      auto& r = ucx_process_registry::get();
      std::lock_guard rl(r.mutex);
      peer->same_process = r.workers.count(address) != 0;
    }
    peers_.emplace(address, peer);
    last_peer_ = peer;
    return peer;
  }

  result<ucp_rkey_h> get_rkey(ucx_peer& peer, const memory::segment_descriptor& remote, const std::string& blob_hex,
                              const std::string& address_hex, std::uint64_t blob_check) {
    if (peer.last_rkey && peer.last_rkey_generation == remote.generation && peer.last_rkey_segment == remote.name &&
        peer.last_rkey->blob_hex == blob_hex)
      return peer.last_rkey->rkey;
    std::string key = remote.name;
    key.append(1, '\n').append(std::to_string(remote.generation));
    peer.last_rkey = nullptr;
    auto it = peer.rkeys.find(key);
    if (it != peer.rkeys.end() && it->second.blob_hex == blob_hex) {
      remember_rkey(peer, remote, it->second);
      return it->second.rkey;
    }
    if (auto ok = check_blobs(address_hex, blob_hex, blob_check); !ok)
      return error{errc::bad_key, "ucx: rkey of segment '" + remote.name + "': " + ok.error().context()};
    auto blob = from_hex(blob_hex, "rkey");
    if (!blob) return error{errc::bad_key, "ucx: rkey of segment '" + remote.name + "': " + blob.error().context()};
    ucp_rkey_h rkey = nullptr;
    if (auto s = ucp_ep_rkey_unpack(peer.ep, blob->data(), &rkey); s != UCS_OK)
      return error{errc::bad_key, "ucx: ucp_ep_rkey_unpack for segment '" + remote.name + "' failed (UCX: " +
                                      std::string(ucs_status_string(s)) + ")"};
    if (it != peer.rkeys.end()) {
      // Re-registered under the same name and generation. Operations in
      // flight may still use the old rkey, which UCX lets go only once they
      // are flushed: it is destroyed with the endpoint.
      peer.retired_rkeys.push_back(it->second.rkey);
      peer.rkeys.erase(it);
    }
    auto placed = peer.rkeys.emplace(std::move(key), ucx_rkey_entry{blob_hex, rkey});
    remember_rkey(peer, remote, placed.first->second);
    return rkey;
  }

  static void remember_rkey(ucx_peer& peer, const memory::segment_descriptor& remote, const ucx_rkey_entry& e) {
    peer.last_rkey = &e;  // map nodes do not move; cleared wherever rkeys loses entries
    peer.last_rkey_segment = remote.name;
    peer.last_rkey_generation = remote.generation;
  }

  void complete(ucx_op_base* op, ucs_status_t s) {
    --in_flight_;
    std::error_code ec = ucx_code(s);
    auto& peer = *op->peer;
    peer.ops.erase(op);
    live_.erase(op->id);
    if (s == UCS_ERR_CANCELED && peer.cancelled_by != op) ec = errc::connection_lost;  // closed for another op
    if (s != UCS_OK && s != UCS_ERR_CANCELED)
      log(log_level::debug, "ucx: op to peer failed: ", ucs_status_string(s));
    if (s != UCS_OK && peer.failed && s == UCS_ERR_CANCELED) ec = errc::connection_lost;
    if (!ec && op->issue_failure != UCS_OK) ec = code_of(op->issue_failure);
    op->finish(ec);
  }

  static void on_request_done(void* request, ucs_status_t status, void*) {
    auto* op = *static_cast<ucx_op_base**>(request);
    ucp_request_free(request);
    if (!op->abandoned) op->worker->complete(op, status);
  }

  static void on_ep_error(void* arg, ucp_ep_h, ucs_status_t status) {
    auto* peer = static_cast<ucx_peer*>(arg);
    auto* self = peer->owner;
    peer->failed = true;
    peer->failure = status;
    log(log_level::warn, "ucx: endpoint to a peer failed: ", ucs_status_string(status));
    auto it = self->peers_.find(peer->address);
    if (it == self->peers_.end() || it->second.get() != peer) return;  // already closing
    auto shared = it->second;
    self->peers_.erase(it);
    self->last_peer_.reset();
    // Close outside the callback, as UCX asks.
    asio::post(self->ex_, [weak = self->weak_from_this(), shared] {
      if (auto w = weak.lock()) {
        std::lock_guard l(w->mutex_);
        w->close_peer(shared);
      }
    });
  }

  static void on_close_done(void* request, ucs_status_t, void* user) {
    auto* peer = static_cast<ucx_peer*>(user);
    ucp_request_free(request);
    peer->owner->closed(peer);
  }

  //! Force-closes `peer`'s endpoint; its requests complete with errors. Lock held.
  void close_peer(const std::shared_ptr<ucx_peer>& peer) {
    if (!peer->ep) return;
    if (auto it = peers_.find(peer->address); it != peers_.end() && it->second == peer) peers_.erase(it);
    if (last_peer_ == peer) last_peer_.reset();
    ucp_ep_h ep = std::exchange(peer->ep, nullptr);
    closing_.push_back(peer);
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS | UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    p.flags = UCP_EP_CLOSE_FLAG_FORCE;
    p.cb.send = &ucx_worker::on_close_done;
    p.user_data = peer.get();
    ucs_status_ptr_t r = ucp_ep_close_nbx(ep, &p);
    if (!UCS_PTR_IS_PTR(r)) closed(peer.get());
    else kick();
  }

  static void destroy_rkeys(ucx_peer& peer) {
    for (auto& [_, rk] : peer.rkeys) ucp_rkey_destroy(rk.rkey);
    peer.rkeys.clear();
    for (auto rk : peer.retired_rkeys) ucp_rkey_destroy(rk);
    peer.retired_rkeys.clear();
  }

  void closed(ucx_peer* peer) {
    destroy_rkeys(*peer);
    peer->last_rkey = nullptr;
    // With error mode NONE (posix, sysv) a forced close leaves requests that
    // were queued on the endpoint uncompleted; the endpoint is gone, so UCX
    // will not touch their buffers again: end them here, and keep the op
    // objects until the worker is destroyed in case UCX calls back late.
    std::vector<ucx_op_base*> left(peer->ops.begin(), peer->ops.end());
    for (auto* op : left) {
      --in_flight_;
      peer->ops.erase(op);
      live_.erase(op->id);
      op->abandoned = true;
      op->deliver(peer->cancelled_by == op ? std::error_code(errc::cancelled) : std::error_code(errc::connection_lost));
      abandoned_.push_back(op);
    }
    std::erase_if(closing_, [peer](const std::shared_ptr<ucx_peer>& p) { return p.get() == peer; });
  }

  // ---- progress -----------------------------------------------------------

  //! Progresses, then arms the worker so its event fd signals the next event.
  //! When arming finds events pending (UCS_ERR_BUSY) the rest is posted, not
  //! looped on: another worker on this io_context (a peer in the same
  //! process) may have to run first. Lock held.
  void drain() {
    if (!worker_) return;
    for (int i = 0; i < 256 && ucp_worker_progress(worker_) != 0; ++i) {
    }
    if (ucp_worker_arm(worker_) == UCS_ERR_BUSY) post_drain();
  }

  void post_drain() {  // lock held
    if (drain_posted_) return;
    drain_posted_ = true;
    asio::post(ex_, [weak = weak_from_this()] {
      if (auto self = weak.lock()) {
        std::lock_guard l(self->mutex_);
        self->drain_posted_ = false;
        if (!self->shut_down_) self->drain();
      }
    });
  }

  //! After issuing: busy-poll mode schedules polling on the executor; event
  //! mode re-arms, and progresses later if events are already pending. Lock held.
  void kick() {
    if (busy_poll_) {
      if (!poll_scheduled_) {
        poll_scheduled_ = true;
        asio::post(ex_, [weak = weak_from_this()] {
          if (auto self = weak.lock()) self->poll();
        });
      }
      return;
    }
    if (ucp_worker_arm(worker_) == UCS_ERR_BUSY) post_drain();
  }

  void poll() {
    std::lock_guard lock(mutex_);
    if (shut_down_) return;
    ucp_worker_progress(worker_);
    if (in_flight_ > 0 || !closing_.empty()) {
      asio::post(ex_, [weak = weak_from_this()] {
        if (auto self = weak.lock()) self->poll();
      });
    } else {
      poll_scheduled_ = false;
      drain();
    }
  }

  void wait() {  // lock held
    if (!efd_) return;
    efd_->async_wait(asio::posix::stream_descriptor::wait_read, [weak = weak_from_this()](const boost::system::error_code& ec) {
      if (ec) return;
      if (auto self = weak.lock()) {
        std::lock_guard l(self->mutex_);
        if (self->shut_down_) return;
        self->drain();
        self->wait();
      }
    });
  }

  static std::uint64_t next_serial() noexcept {
    static std::atomic<std::uint64_t> n{0};
    return ++n;
  }

  asio::any_io_executor ex_;
  std::uint64_t serial_ = next_serial();
  bool busy_poll_ = false;
  bool poll_scheduled_ = false;
  bool drain_posted_ = false;
  bool shut_down_ = false;
  bool peer_mode_ = true;
  std::mutex mutex_;
  std::shared_ptr<ucx_context_holder> ctx_;
  ucp_worker_h worker_ = nullptr;
  std::uint64_t memory_types_ = UCS_BIT(UCS_MEMORY_TYPE_HOST);
  std::string address_hex_;
  std::optional<asio::posix::stream_descriptor> efd_;
  std::unordered_map<std::string, registration> registrations_;
  std::vector<std::weak_ptr<ucx_allocation>> allocations_;
  std::unordered_map<std::string, std::shared_ptr<ucx_peer>> peers_;
  std::shared_ptr<ucx_peer> last_peer_;  // the peer get_peer found last; always one in peers_
  std::vector<std::shared_ptr<ucx_peer>> closing_;
  std::size_t in_flight_ = 0;
  std::unordered_map<std::uint64_t, ucx_op_base*> live_;  // tracked ops not yet completed, by id
  std::uint64_t next_op_id_ = 0;
  std::vector<ucx_op_base*> abandoned_;
};

}  // namespace kvx::transport::detail
