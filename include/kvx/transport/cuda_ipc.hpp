#pragma once
//! \file
//! `kvx::transport::cuda_ipc`: one-sided reads and writes of GPU memory owned
//! by another process on the same host, GPU to GPU without touching the host.
//!
//! **Export.** `register_memory` of a `cuda:N` segment asks the driver for the
//! allocation that holds it (`cuMemGetAddressRange`, through the runtime's
//! driver entry point, so nothing links libcuda) and exports it with
//! `cudaIpcGetMemHandle`. The descriptor entry carries the 64-byte handle
//! (hex), the segment's offset inside the allocation, the device's UUID and a
//! revocation slot (below); the metadata backend carries the descriptor to
//! peers like any other. Memory must come from `cudaMalloc`
//! (`kvx::cuda::device_buffer`, `device_pool`); stream-ordered pools and VMM
//! allocations cannot be exported this way (`errc::not_supported`).
//!
//! **Import.** A peer opens the handle once (`cudaIpcOpenMemHandle`, lazy peer
//! access) on the device with the exporter's UUID when it is visible, and
//! caches the mapping; then every op is one `cudaMemcpyAsync` on one of a few
//! streams per device, completed into the Asio token by a stream callback
//! (`kvx/cuda/stream.hpp`). The local buffer may be device memory or host
//! memory (pinned for DMA speed). In the exporting process itself, where the
//! driver refuses to import its own handles, the segment's own pointer is used.
//!
//! **Checks and revocation.** Every op is checked against the descriptor
//! (same host, bounds: `errc::out_of_range`). A handle whose exporter freed
//! the memory or exited fails to open (`errc::stale`: the engine then fetches
//! the descriptor again). Deregistration revokes: each exporter keeps a small
//! POSIX shared-memory table of slots `{key, ops in flight}`; a peer marks an
//! op in flight, checks that its slot still holds the descriptor's key
//! (`errc::stale` otherwise), and unmarks it on completion; `deregister_memory`
//! clears the key and waits (up to `cuda_ipc_options::revoke_timeout`) for
//! marked ops to drain, or fails with `errc::timed_out` (the memory is not
//! free to reuse yet), then closes nothing a peer still needs: peers drop
//! their mapping on the first `stale`. A peer that ignores the protocol cannot
//! be stopped: cuda_ipc trusts processes of the same user on the host, as
//! CUDA IPC itself does. An exporter that exits is noticed by its pid
//! (`kill(pid, 0)`, at most once a millisecond per segment; ops complete with
//! `errc::connection_lost` once it is seen gone) and the
//! mapping is dropped; this assumes one pid namespace for exporter and peer.
//!
//! Cancellation: a copy on a stream cannot be cancelled; ops always complete
//! after the copy has finished or failed (so buffers may then be released).
//! Thread safety: all members are thread-safe.
//!
//! \code
//! asio::io_context io;
//! kvx::transport::cuda_ipc t(io.get_executor());
//! auto gpu = kvx::cuda::device_buffer::allocate(64 << 20, 0).value();
//! auto seg = table.add("kv", gpu.region());                  // location cuda:0
//! descriptor.transports["cuda_ipc"] = *t.register_memory(*seg);
//! // in the peer process, local_gpu a span of its own device memory:
//! peer_t.async_read(descriptor, 0, local_gpu, [](std::error_code ec) { ... });
//! \endcode

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cuda.h>
#include <cuda_runtime_api.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/bind_executor.hpp>

#include <kvx/core/async.hpp>
#include <kvx/core/log.hpp>
#include <kvx/cuda/device.hpp>
#include <kvx/cuda/driver_entry.hpp>
#include <kvx/cuda/error.hpp>
#include <kvx/cuda/event_poller.hpp>
#include <kvx/cuda/stream.hpp>
#include <kvx/memory/segment_table.hpp>
#include <kvx/transport/transport.hpp>

namespace kvx::transport {

struct cuda_ipc_options {
  std::size_t streams_per_device = 4;  //!< copies in flight without ordering among them
  std::chrono::milliseconds revoke_timeout{5000};  //!< how long deregistration waits for peers' ops
  std::size_t max_segments = 4096;     //!< slots in the revocation table
  //! How copy completions reach handlers: `poll` (default) completes within
  //! microseconds and keeps one core busy while copies are in flight;
  //! `callback` spins nothing and adds ~25 us per op (kvx/cuda/event_poller.hpp).
  cuda::completion_mode completion = cuda::completion_mode::poll;
};

namespace detail {

// One slot of an exporter's revocation table, shared with peers through POSIX shm.
struct cuda_ipc_slot {
  std::uint64_t key;        // the registration key while registered, 0 once revoked
  std::uint64_t in_flight;  // peers' ops marked in flight
};

// A mapping of an exporter's revocation table (owner: created; peer: opened).
class cuda_ipc_slot_table {
 public:
  static result<std::shared_ptr<cuda_ipc_slot_table>> create(std::string name, std::size_t slots) {
    const int fd = ::shm_open(name.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
    if (fd < 0) return kvx::error{errc::io_error, "shm_open(" + name + "): " + std::strerror(errno)};
    const auto bytes = slots * sizeof(cuda_ipc_slot);
    if (::ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
      const int e = errno;
      ::close(fd);
      ::shm_unlink(name.c_str());
      return kvx::error{errc::io_error, "ftruncate(" + name + "): " + std::strerror(e)};
    }
    return map(fd, std::move(name), bytes, true);
  }
  static result<std::shared_ptr<cuda_ipc_slot_table>> open(std::string name) {
    const int fd = ::shm_open(name.c_str(), O_RDWR, 0);
    if (fd < 0) return kvx::error{errno == ENOENT ? errc::stale : errc::io_error, "shm_open(" + name + "): " + std::strerror(errno)};
    struct stat st {};
    if (::fstat(fd, &st) != 0 || st.st_size <= 0) {
      ::close(fd);
      return kvx::error{errc::stale, "revocation table " + name + " is empty"};
    }
    return map(fd, std::move(name), static_cast<std::size_t>(st.st_size), false);
  }
  cuda_ipc_slot_table(const cuda_ipc_slot_table&) = delete;
  cuda_ipc_slot_table& operator=(const cuda_ipc_slot_table&) = delete;
  ~cuda_ipc_slot_table() {
    ::munmap(base_, bytes_);
    if (owner_) ::shm_unlink(name_.c_str());
  }

  [[nodiscard]] std::size_t size() const noexcept { return bytes_ / sizeof(cuda_ipc_slot); }
  [[nodiscard]] std::atomic_ref<std::uint64_t> key(std::size_t i) const noexcept { return std::atomic_ref(slots()[i].key); }
  [[nodiscard]] std::atomic_ref<std::uint64_t> in_flight(std::size_t i) const noexcept {
    return std::atomic_ref(slots()[i].in_flight);
  }
  [[nodiscard]] const std::string& name() const noexcept { return name_; }

 private:
  static result<std::shared_ptr<cuda_ipc_slot_table>> map(int fd, std::string name, std::size_t bytes, bool owner) {
    void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    const int e = errno;
    ::close(fd);
    if (p == MAP_FAILED) {
      if (owner) ::shm_unlink(name.c_str());
      return kvx::error{errc::io_error, "mmap(" + name + "): " + std::strerror(e)};
    }
    return std::shared_ptr<cuda_ipc_slot_table>(new cuda_ipc_slot_table(p, bytes, std::move(name), owner));
  }
  cuda_ipc_slot_table(void* p, std::size_t bytes, std::string name, bool owner)
      : base_(p), bytes_(bytes), name_(std::move(name)), owner_(owner) {}
  cuda_ipc_slot* slots() const noexcept { return static_cast<cuda_ipc_slot*>(base_); }

  void* base_;
  std::size_t bytes_;
  std::string name_;
  bool owner_;
};

inline std::string to_hex(const void* data, std::size_t n) {
  static constexpr char digits[] = "0123456789abcdef";
  std::string s;
  s.reserve(2 * n);
  for (std::size_t i = 0; i < n; ++i) {
    const auto b = static_cast<const unsigned char*>(data)[i];
    s += digits[b >> 4];
    s += digits[b & 15];
  }
  return s;
}

inline bool from_hex(std::string_view s, void* out, std::size_t n) {
  if (s.size() != 2 * n) return false;
  auto nibble = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  for (std::size_t i = 0; i < n; ++i) {
    const int hi = nibble(s[2 * i]), lo = nibble(s[2 * i + 1]);
    if (hi < 0 || lo < 0) return false;
    static_cast<unsigned char*>(out)[i] = static_cast<unsigned char>(hi << 4 | lo);
  }
  return true;
}

// The allocation holding `p`: its base address and size (driver API, reached
// through the runtime so that nothing links libcuda).
inline result<std::pair<std::uintptr_t, std::size_t>> allocation_range(const void* p) {
  using get_range_fn = CUresult (*)(CUdeviceptr*, std::size_t*, CUdeviceptr);
  static const auto fn = kvx::cuda::driver_entry<get_range_fn>("cuMemGetAddressRange", 12000);
  if (!fn) return kvx::error{errc::not_supported, "cuMemGetAddressRange is not available from the CUDA driver"};
  CUdeviceptr base = 0;
  std::size_t size = 0;
  if (fn(&base, &size, reinterpret_cast<CUdeviceptr>(p)) != CUDA_SUCCESS)
    return kvx::error{errc::invalid_argument, "cuMemGetAddressRange: address is not device memory from cudaMalloc"};
  return std::pair{static_cast<std::uintptr_t>(base), size};
}

}  // namespace detail

class cuda_ipc {
 public:
  using transport_concept = transport_tag;
  using executor_type = asio::any_io_executor;
  //! Host memory is touched only as the local side of an op (a pinned
  //! staging buffer, say); remote segments must be device memory.
  static constexpr transport_capabilities capabilities{.memory = memory_kinds::cuda | memory_kinds::host,
                                                       .one_sided = true,
                                                       .zero_copy = true,
                                                       .bounce_buffered = false,
                                                       .same_host_only = true,
                                                       .same_process_only = false,
                                                       // One copy at GPU memory speed costs what ~10 us of
                                                       // bookkeeping costs: only large slices amortize it.
                                                       .min_slice = 64ULL << 20};
  static constexpr std::string_view name() noexcept { return "cuda_ipc"; }

  explicit cuda_ipc(executor_type ex, cuda_ipc_options opts = {})
      : ex_(std::move(ex)), state_(std::make_shared<state>(std::move(opts))) {}

  [[nodiscard]] executor_type get_executor() const noexcept { return ex_; }

  //! Exports a `cuda:N` segment (host segments register with an entry that
  //! only says so: cuda_ipc never reaches remote host memory).
  result<nlohmann::json> register_memory(const memory::local_segment& seg) { return state_->register_memory(seg); }
  //! Revokes: peers' next ops complete with `errc::stale`; waits for theirs in
  //! flight. `errc::timed_out` (naming the segment and the ops left) when one
  //! is still marked at `cuda_ipc_options::revoke_timeout`: the memory is then
  //! NOT free to reuse. The segment stays revoked and calling this again with
  //! `seg` waits again; free the memory once a call succeeds.
  result<void> deregister_memory(const memory::local_segment& seg) { return state_->deregister_memory(seg); }

  [[nodiscard]] std::error_code can_transfer(const memory::segment_descriptor& remote) const {
    if (remote.host_id != memory::this_host_id()) return errc::unreachable;
    if (remote.where.kind != memory::location_kind::cuda) return errc::not_supported;
    auto it = remote.transports.find(name());
    if (it == remote.transports.end() || !it->is_object() || !it->contains("handle")) return errc::unreachable;
    return {};
  }

  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_read(const memory::segment_descriptor& remote, std::uint64_t offset, std::span<std::byte> dst,
                  CompletionToken&& token) {
    return asio::async_initiate<CompletionToken, void(std::error_code)>(
        initiation{this}, token, std::cref(remote), offset, static_cast<void*>(dst.data()), dst.size(), true);
  }

  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_write(const memory::segment_descriptor& remote, std::uint64_t offset, std::span<const std::byte> src,
                   CompletionToken&& token) {
    return asio::async_initiate<CompletionToken, void(std::error_code)>(
        initiation{this}, token, std::cref(remote), offset,
        const_cast<void*>(static_cast<const void*>(src.data())), src.size(), false);
  }

  //! Imported mappings currently cached (for tests and metrics).
  [[nodiscard]] std::size_t imported_count() const { return state_->imported_count(); }

 private:
  // What an op needs once its checks pass.
  struct prepared {
    std::byte* remote = nullptr;  // mapped address of the remote bytes
    int device = 0;               // the device whose streams carry the copy
    std::shared_ptr<detail::cuda_ipc_slot_table> table;  // peer side: the slot marked in flight
    std::size_t slot = 0;
  };

  // A remote segment once parsed and mapped: ops on it skip the JSON.
  struct route {
    std::uint64_t key = 0, generation = 0, length = 0;
    std::string handle;  // hex, the import it uses
    std::byte* base = nullptr;  // segment start in this process
    int device = 0;
    int pid = 0;
    std::shared_ptr<detail::cuda_ipc_slot_table> table;
    std::size_t slot = 0;
  };

  struct imported {
    void* base = nullptr;  // from cudaIpcOpenMemHandle
    int device = 0;
  };

  // A segment this process exports. Process-wide, because the driver will not
  // import a handle into the process that exported it: every cuda_ipc of the
  // process reaches these directly.
  struct exported {
    std::uintptr_t address = 0;
    std::uint64_t length = 0;
    std::uint64_t key = 0;
    std::uint64_t generation = 0;
    int device = 0;
  };
  static std::mutex& exports_mutex() {
    static std::mutex m;
    return m;
  }
  static std::map<std::string, exported>& exports() {
    static std::map<std::string, exported> m;
    return m;
  }

  class state {
   public:
    explicit state(cuda_ipc_options o) : opts_(std::move(o)) {}
    state(const state&) = delete;
    state& operator=(const state&) = delete;
    ~state() {
      // Copies still on our streams read imported mappings: let them finish first.
      for (auto& [device, pool] : streams_) (void)pool.synchronize();
      for (auto& [handle, m] : imported_) {
        cuda::device_guard on(m.device);
        (void)cudaIpcCloseMemHandle(m.base);
      }
      // Exports this transport still holds leave the process-wide table, so the
      // names can be registered again by another transport.
      std::lock_guard lock(exports_mutex());
      for (const auto& [name, slot] : slots_) exports().erase(name);
    }

    [[nodiscard]] const cuda_ipc_options& options() const noexcept { return opts_; }

    result<nlohmann::json> register_memory(const memory::local_segment& seg) {
      const auto& r = seg.region;
      nlohmann::json entry{{"process", process_token()}};
      if (r.where.kind == memory::location_kind::host) {
        entry["host"] = true;
        return entry;
      }
      if (r.where.kind != memory::location_kind::cuda)
        return kvx::error{errc::not_supported, "cuda_ipc: segment '" + seg.name + "' is " + r.where.to_string()};
      const int device = r.where.device;
      cuda::device_guard on(device);
      auto range = detail::allocation_range(r.address);
      if (!range) return kvx::error{range.code(), "cuda_ipc: segment '" + seg.name + "': " + range.error().message()};
      const auto addr = reinterpret_cast<std::uintptr_t>(r.address);
      if (addr + r.length > range->first + range->second)
        return kvx::error{errc::invalid_argument, "cuda_ipc: segment '" + seg.name + "' spans more than one allocation"};
      cudaIpcMemHandle_t handle{};
      if (auto st = cudaIpcGetMemHandle(&handle, reinterpret_cast<void*>(range->first)); st != cudaSuccess) {
        (void)cudaGetLastError();
        return cuda::make_error(st == cudaErrorInvalidValue ? cudaErrorNotSupported : st,
                                "cuda_ipc: cudaIpcGetMemHandle for segment '" + seg.name +
                                    "' (memory must come from cudaMalloc)");
      }
      auto id = cuda::identify(device);
      KVX_TRY(id);
      std::lock_guard lock(mu_);
      KVX_TRY(ensure_table());
      if (slots_.contains(seg.name)) return kvx::error{errc::already_exists, "cuda_ipc: segment '" + seg.name + "' is registered"};
      if (free_.empty())
        return kvx::error{errc::capacity_exceeded, "cuda_ipc: more than " + std::to_string(opts_.max_segments) +
                                                       " segments registered (cuda_ipc_options::max_segments)"};
      {
        std::lock_guard exports_lock(exports_mutex());
        if (!exports().emplace(seg.name, exported{addr, r.length, seg.key, seg.generation, device}).second)
          return kvx::error{errc::already_exists, "cuda_ipc: segment '" + seg.name + "' is exported by this process"};
      }
      const auto slot = free_.back();
      free_.pop_back();
      table_->in_flight(slot).store(0);
      table_->key(slot).store(seg.key);
      slots_[seg.name] = slot;
      entry["handle"] = detail::to_hex(&handle, sizeof handle);
      entry["offset"] = addr - range->first;
      entry["device_uuid"] = id->uuid;
      entry["revocation"] = table_->name();
      entry["pid"] = ::getpid();
      entry["slot"] = slot;
      return entry;
    }

    result<void> deregister_memory(const memory::local_segment& seg) {
      if (seg.region.where.kind == memory::location_kind::host) return {};
      const std::pair id{seg.name, seg.key};
      std::size_t slot = 0;
      bool again = false;
      {
        std::lock_guard lock(mu_);
        auto it = slots_.find(seg.name);
        if (it != slots_.end() && table_->key(it->second).load() == seg.key) {
          slot = it->second;
          table_->key(slot).store(0);  // peers checking after this see the revocation
          slots_.erase(it);
          std::lock_guard exports_lock(exports_mutex());
          exports().erase(seg.name);
        } else if (auto d = draining_.find(id); d != draining_.end()) {
          slot = d->second;  // an earlier call timed out on it: wait for its ops again
          again = true;
        } else {
          return kvx::error{errc::unknown_segment, "cuda_ipc: segment '" + seg.name + "' is not registered"};
        }
      }
      const auto deadline = std::chrono::steady_clock::now() + opts_.revoke_timeout;
      std::uint64_t left = 0;
      while ((left = table_->in_flight(slot).load()) != 0 && std::chrono::steady_clock::now() <= deadline)
        std::this_thread::sleep_for(std::chrono::microseconds(200));
      std::lock_guard lock(mu_);
      if (left != 0) {
        // A peer may still copy into or out of the memory: the slot stays
        // revoked and retired, and the caller must not reuse the memory yet.
        draining_[id] = slot;
        return kvx::error{errc::timed_out, "cuda_ipc: segment '" + seg.name + "': " + std::to_string(left) +
                                               " peer ops still marked in flight after the revoke timeout (" +
                                               std::to_string(opts_.revoke_timeout.count()) +
                                               " ms; a stopped peer, or one that died mid-op); the segment stays "
                                               "revoked and its memory is not free to reuse until deregister_memory "
                                               "succeeds"};
      }
      if (again && draining_.erase(id) == 0) return {};  // a concurrent call already freed the slot
      free_.push_back(slot);
      return {};
    }

    // Checks an op and finds (or maps) the remote bytes.
    result<prepared> prepare(const memory::segment_descriptor& remote, std::uint64_t offset, std::size_t len,
                             const void* local) {
      if (!memory::memory_region{nullptr, static_cast<std::size_t>(remote.length)}.contains(offset, len))
        return kvx::error{errc::out_of_range, "cuda_ipc: [" + std::to_string(offset) + ", +" + std::to_string(len) +
                                                  ") outside segment '" + remote.name + "' of " + std::to_string(remote.length) +
                                                  " bytes"};
      route r;
      if (!cached_route(remote, r)) {
        auto fresh = open_route(remote, local);
        KVX_TRY(fresh);
        r = std::move(*fresh);
      }
      if (!r.table) return prepared{r.base + offset, r.device, nullptr, 0};  // this process's own export
      // A dead exporter leaves its mapping and slots behind: ask the kernel
      // (at most once a millisecond per segment: a syscall per small op shows).
      if (r.pid > 0 && owner_check_due(remote.name) && ::kill(r.pid, 0) != 0 && errno == ESRCH) {
        drop_import(r.handle);
        return kvx::error{errc::connection_lost, "cuda_ipc: the owner of segment '" + remote.name + "' (pid " +
                                                     std::to_string(r.pid) + ") has exited"};
      }
      // Mark in flight, then check: the owner clears the key, then waits for marks.
      r.table->in_flight(r.slot).fetch_add(1);
      if (r.table->key(r.slot).load() != remote.key) {
        r.table->in_flight(r.slot).fetch_sub(1);
        drop_import(r.handle);
        return kvx::error{errc::stale, "cuda_ipc: segment '" + remote.name + "' was deregistered by its owner"};
      }
      return prepared{r.base + offset, r.device, std::move(r.table), r.slot};
    }

    cudaStream_t stream_for(int device) {
      std::lock_guard lock(mu_);
      auto it = streams_.find(device);
      if (it == streams_.end()) {
        auto pool = cuda::stream_pool::create(device, opts_.streams_per_device);
        if (!pool) return nullptr;
        it = streams_.emplace(device, std::move(*pool)).first;
      }
      return it->second.next();
    }

    std::size_t imported_count() const {
      std::lock_guard lock(mu_);
      return imported_.size();
    }

   private:
    static const std::string& process_token() {
      static const std::string token = memory::this_host_id() + "/" + std::to_string(::getpid()) + "/" +
                                       std::to_string(memory::detail::random_u64());
      return token;
    }

    bool owner_check_due(const std::string& name) {
      const auto now = std::chrono::steady_clock::now();
      std::lock_guard lock(mu_);
      auto& last = owner_checked_[name];
      if (now - last < std::chrono::milliseconds(1)) return false;
      last = now;
      return true;
    }

    bool cached_route(const memory::segment_descriptor& remote, route& out) {
      std::lock_guard lock(mu_);
      auto it = routes_.find(remote.name);
      if (it == routes_.end() || it->second.key != remote.key || it->second.generation != remote.generation ||
          it->second.length != remote.length)
        return false;
      out = it->second;
      return true;
    }

    // Parses the descriptor's entry and maps the segment (first op on it).
    result<route> open_route(const memory::segment_descriptor& remote, const void* local) {
      if (remote.host_id != memory::this_host_id())
        return kvx::error{errc::unreachable, "cuda_ipc: segment '" + remote.name + "' is on another host"};
      if (remote.where.kind != memory::location_kind::cuda)
        return kvx::error{errc::not_supported, "cuda_ipc: segment '" + remote.name + "' is " + remote.where.to_string()};
      auto it = remote.transports.find("cuda_ipc");
      if (it == remote.transports.end() || !it->is_object())
        return kvx::error{errc::unreachable, "cuda_ipc: segment '" + remote.name + "' has no cuda_ipc entry"};
      const auto& e = *it;
      // The entry comes from a peer: a field of the wrong type is malformed,
      // not an exception out of the initiating function (json's value() throws).
      auto text = [&e](const char* field) -> std::optional<std::string> {
        auto f = e.find(field);
        if (f == e.end()) return std::string();
        if (!f->is_string()) return std::nullopt;
        return f->template get<std::string>();
      };
      const auto malformed = [&remote] {
        return kvx::error{errc::malformed_message, "cuda_ipc: malformed entry for segment '" + remote.name + "'"};
      };
      const auto process = text("process");
      if (!process) return malformed();
      route r;
      r.key = remote.key;
      r.generation = remote.generation;
      r.length = remote.length;
      if (*process == process_token()) {
        std::lock_guard lock(exports_mutex());
        auto x = exports().find(remote.name);
        if (x == exports().end())
          return kvx::error{errc::unknown_segment, "cuda_ipc: segment '" + remote.name + "' is not exported by this process"};
        if (x->second.key != remote.key) return kvx::error{errc::bad_key, "cuda_ipc: segment '" + remote.name + "'"};
        if (x->second.generation != remote.generation || x->second.length != remote.length)
          return kvx::error{errc::stale, "cuda_ipc: segment '" + remote.name + "' was registered again"};
        // Not cached: deregistration in this process must be seen by the next op.
        r.base = reinterpret_cast<std::byte*>(x->second.address);
        r.device = x->second.device;
        return r;
      }
      cudaIpcMemHandle_t handle{};
      const auto handle_hex = text("handle");
      const auto table_name = text("revocation");
      const auto uuid_text = text("device_uuid");
      auto non_negative = [&](const char* field) {
        auto f = e.find(field);
        return f != e.end() && f->is_number_integer() && f->template get<std::int64_t>() >= 0;
      };
      const auto pid = e.find("pid");
      if (!handle_hex || !table_name || !uuid_text || (pid != e.end() && !pid->is_number_integer())) return malformed();
      r.handle = *handle_hex;
      const auto& uuid = *uuid_text;
      if (!detail::from_hex(r.handle, &handle, sizeof handle) || table_name->empty() || !non_negative("slot") ||
          !non_negative("offset"))
        return malformed();
      r.slot = e["slot"].get<std::size_t>();
      r.pid = pid == e.end() ? 0 : pid->template get<int>();
      const auto base_offset = e["offset"].get<std::uint64_t>();
      auto table = peer_table(*table_name);
      KVX_TRY(table);
      r.table = std::move(*table);
      if (r.slot >= r.table->size())
        return kvx::error{errc::malformed_message, "cuda_ipc: slot " + std::to_string(r.slot) + " outside " + *table_name};
      if (r.pid > 0 && ::kill(r.pid, 0) != 0 && errno == ESRCH)
        return kvx::error{errc::connection_lost, "cuda_ipc: the owner of segment '" + remote.name + "' (pid " +
                                                     std::to_string(r.pid) + ") has exited"};
      if (r.table->key(r.slot).load() != remote.key)
        return kvx::error{errc::stale, "cuda_ipc: segment '" + remote.name + "' was deregistered by its owner"};
      auto m = import(r.handle, handle, uuid, local);
      if (!m) return kvx::error{m.code(), "cuda_ipc: segment '" + remote.name + "': " + m.error().message()};
      r.base = static_cast<std::byte*>(m->base) + base_offset;
      r.device = m->device;
      std::lock_guard lock(mu_);
      routes_[remote.name] = r;
      return r;
    }

    result<std::shared_ptr<detail::cuda_ipc_slot_table>> peer_table(const std::string& name) {
      std::lock_guard lock(mu_);
      if (auto it = peer_tables_.find(name); it != peer_tables_.end()) return it->second;
      auto t = detail::cuda_ipc_slot_table::open(name);
      KVX_TRY(t);
      peer_tables_.emplace(name, *t);
      return *t;
    }

    // Opens `handle` once; on the exporter's device when this process sees
    // it, else on the device of the local buffer (peer access is enabled lazily).
    result<imported> import(const std::string& hex, const cudaIpcMemHandle_t& handle, const std::string& uuid,
                            const void* local) {
      std::lock_guard lock(mu_);
      if (auto it = imported_.find(hex); it != imported_.end()) return it->second;
      int device = 0;
      if (auto d = cuda::ordinal_of(uuid)) {
        device = *d;
      } else {
        cudaPointerAttributes a{};
        if (cudaPointerGetAttributes(&a, local) == cudaSuccess && a.type == cudaMemoryTypeDevice) device = a.device;
        (void)cudaGetLastError();
      }
      cuda::device_guard on(device);
      void* base = nullptr;
      if (auto st = cudaIpcOpenMemHandle(&base, handle, cudaIpcMemLazyEnablePeerAccess); st != cudaSuccess) {
        (void)cudaGetLastError();
        // The exporter is gone or freed the allocation: the descriptor is stale.
        return cuda::make_error(st == cudaErrorInvalidValue ? cudaErrorInvalidResourceHandle : st, "cudaIpcOpenMemHandle");
      }
      imported m{base, device};
      imported_.emplace(hex, m);
      return m;
    }

    void drop_import(const std::string& hex) {
      std::lock_guard lock(mu_);
      std::erase_if(routes_, [&](const auto& kv) { return kv.second.handle == hex; });
      auto it = imported_.find(hex);
      if (it == imported_.end()) return;
      cuda::device_guard on(it->second.device);
      // Ops of this process still running on the mapping must finish before
      // it is unmapped; none can start (the slot is revoked or the owner gone).
      for (auto& [d, pool] : streams_) (void)pool.synchronize();
      (void)cudaIpcCloseMemHandle(it->second.base);
      imported_.erase(it);
    }

    result<void> ensure_table() {
      if (table_) return {};
      const auto name = "/kvx-cuda-ipc-" + std::to_string(::getpid()) + "-" + std::to_string(memory::detail::random_u64());
      auto t = detail::cuda_ipc_slot_table::create(name, opts_.max_segments);
      KVX_TRY(t);
      table_ = std::move(*t);
      for (std::size_t i = opts_.max_segments; i-- > 0;) free_.push_back(i);
      return {};
    }

    cuda_ipc_options opts_;
    mutable std::mutex mu_;
    std::shared_ptr<detail::cuda_ipc_slot_table> table_;  // ours, as exporter
    std::vector<std::size_t> free_;
    std::map<std::string, std::size_t> slots_;  // our exports: name -> slot
    // Revoked exports whose peers' ops outlived revoke_timeout: (name, key) -> slot.
    std::map<std::pair<std::string, std::uint64_t>, std::size_t> draining_;
    std::map<std::string, route> routes_;
    std::map<std::string, std::chrono::steady_clock::time_point> owner_checked_;
    std::map<std::string, std::shared_ptr<detail::cuda_ipc_slot_table>> peer_tables_;
    std::map<std::string, imported> imported_;
    std::map<int, cuda::stream_pool> streams_;
  };

  struct initiation {
    cuda_ipc* self;
    template <class Handler>
    void operator()(Handler&& handler, const memory::segment_descriptor& remote, std::uint64_t offset, void* local,
                    std::size_t len, bool read) const {
      auto p = self->state_->prepare(remote, offset, len, local);
      if (!p) {
        log(log_level::debug, p.error().message());
        kvx::detail::post_completion(self->ex_, std::forward<Handler>(handler), p.code());
        return;
      }
      cudaStream_t s = self->state_->stream_for(p->device);
      // Keep the handler's associated executor: completion runs where the caller asked.
      auto handler_ex = asio::get_associated_executor(handler, self->ex_);
      auto done = asio::bind_executor(
          handler_ex, [h = std::forward<Handler>(handler), table = p->table, slot = p->slot](std::error_code ec) mutable {
            if (table) table->in_flight(slot).fetch_sub(1);
            std::move(h)(ec);
          });
      if (!s) {
        kvx::detail::post_completion(self->ex_, std::move(done), make_error_code(errc::device_error));
        return;
      }
      void* to = read ? local : static_cast<void*>(p->remote);
      const void* from = read ? static_cast<const void*>(p->remote) : local;
      if (self->state_->options().completion == cuda::completion_mode::poll)
        cuda::event_poller::instance().async_copy(s, p->device, to, from, len, self->ex_, std::move(done));
      else
        cuda::async_copy(s, to, from, len, self->ex_, std::move(done));
    }
  };

  executor_type ex_;
  std::shared_ptr<state> state_;
};

static_assert(check_transport<cuda_ipc>());

}  // namespace kvx::transport
