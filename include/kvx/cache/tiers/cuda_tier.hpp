#pragma once
//! \file
//! `kvx::cache::cuda_tier<Allocator>`: a GPU-memory tier, one device
//! allocation (`kvx::cuda::device_pool`) carved by an allocator policy
//! (`offset_allocator`, best fit; or `slab_allocator`). It is the top of a
//! stack whose next tier is host DRAM: `tiered_cache` demotes its evicted
//! blocks into the DRAM tier and promotes hits back.
//!
//! `host_accessible` is false: the bytes are in device memory, and `store` /
//! `load` copy them with `cudaMemcpyAsync` (`cudaMemcpyDefault`, so from and to
//! any memory) on the tier's own streams, then wait; the call is blocking, as
//! the `tier` concept requires.
//!
//! ## How a copy goes
//! Each `store` / `load` looks at the bytes of the caller's buffer it copies
//! (`cudaPointerGetAttributes` of the first and the last one):
//! - device, managed or page-locked host memory (`cuda::pinned_buffer`,
//!   `cuda::host_registration`, `cudaHostAlloc`): one `cudaMemcpyAsync`
//!   straight between the buffer and the block, at DMA speed (or device
//!   speed, for device memory);
//! - pageable host memory (`std::vector`, `new`, `mmap`): through page-locked
//!   staging owned by the tier, in chunks of `staging_chunk` bytes, double
//!   buffered: the CPU fills (or drains) one chunk while the DMA engine moves
//!   the other, so a large block costs about one CPU memcpy plus one chunk of
//!   DMA, instead of the driver's own staging.
//! A buffer whose first and last bytes are of different kinds (pageable and
//! pinned) is refused with `errc::invalid_argument`: neither path could copy
//! it safely.
//!
//! ## Thread safety
//! As for every tier (`kvx/cache/tier.hpp`): every member may be called
//! concurrently; one mutex guards the index for O(1) work, the pool's own
//! mutex its allocator, and no lock is held across a copy. A copy runs on a
//! *lane*: one stream, two events and two staging chunks that only that copy
//! uses; `lanes` of them exist, so that many copies run at once and a call
//! that finds all of them busy waits for the first one free (a copy never
//! shares a stream, so its wait never includes someone else's copy).
//! Streams of distinct lanes overlap, so host-to-device and device-to-host
//! copies use both copy engines.
//!
//! ## Zero-copy access
//! `region()` is the whole device allocation (register it once as a transfer
//! segment; `locate(k)` gives a block's offset in it), `region_of(k)` a block's
//! device range. Both are views: they are valid until `erase(k)` (for a block
//! in a `tiered_cache`, until it is evicted or erased), so hold a
//! `tiered_cache::pin_handle` on `k` while a transfer (the `cuda_ipc`
//! transport, an engine's kernel) uses them. `borrow(k)` is the self-standing
//! form: a handle that keeps the block's device memory allocated even across
//! `erase(k)` (the key is gone from the index at once, the bytes are freed
//! when the last handle dies), for callers that cannot pin.
//!
//! ## Errors
//! `store`: `errc::already_exists`, `errc::capacity_exceeded` (the pool has no
//! free range for the block), `errc::invalid_argument` (an empty block, a
//! buffer of mixed kinds); `load`: `errc::not_found`, `errc::out_of_range` (the
//! buffer is smaller than the block); a failed CUDA call is mapped by
//! `kvx::cuda::make_error` (`errc::device_error` for a faulted context,
//! `errc::invalid_argument` for a bad pointer) and names the call. Nothing is
//! lost on error: a failed `store` leaves no entry and returns its
//! allocation; a failed `load` leaves the block in place. The constructor
//! throws `std::invalid_argument` for a bad config and `std::system_error`
//! (code `errc::not_supported` without a driver or device,
//! `errc::capacity_exceeded` when the device memory is not there) when the
//! pool, streams or staging cannot be made.
//!
//! \code
//! namespace kc = kvx::cache;
//! using cache_t = kc::tiered_cache<kc::tier_stack<kc::cuda_tier<>, kc::dram_tier<>>>;
//! cache_t cache({.block_bytes = 2 << 20},
//!               kc::cuda_tier_config{.capacity = 16ULL << 30, .device = 0},
//!               kc::dram_tier_config{.capacity = 64ULL << 30});
//! cache.insert(key, kv_bytes);        // into GPU memory; GPU -> DRAM on eviction
//! cache.read(key, pinned_out);        // from either tier; promoted back to the GPU
//! \endcode

#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <unordered_map>
#include <utility>
#include <vector>

#include <kvx/cache/block_key.hpp>
#include <kvx/cache/tier.hpp>
#include <kvx/core/result.hpp>
#include <kvx/cuda/device.hpp>
#include <kvx/cuda/error.hpp>
#include <kvx/cuda/memory.hpp>
#include <kvx/cuda/stream.hpp>
#include <kvx/memory/allocator.hpp>
#include <kvx/memory/memory_region.hpp>
#include <kvx/memory/offset_allocator.hpp>

namespace kvx::cache {

struct cuda_tier_config {
  std::uint64_t capacity = 0;                //!< device bytes (rounded down to the allocator's granule)
  int device = 0;                            //!< CUDA device ordinal
  std::string name = "cuda";                 //!< metrics label
  watermarks marks{};
  std::uint64_t alignment = 256;             //!< block start alignment (a power of two)
  std::size_t lanes = 4;                     //!< copies in flight at once (one stream and two staging chunks each)
  std::uint64_t staging_chunk = 1ULL << 20;  //!< bytes per staging chunk for pageable buffers
  //! Loads into pageable memory through the tier's staging too. Off by
  //! default: on an H100 the driver's own pageable device-to-host path ran at
  //! 1.5-2x the tier's double-buffered one (docs/benchmarks.md), while for
  //! stores the tier's staging is as fast or faster.
  bool stage_loads = false;
};

//! How a `cuda_tier`'s copies went (since construction): straight DMA from
//! or to device / page-locked memory, or staged for pageable memory.
struct cuda_tier_stats {
  std::uint64_t direct_copies = 0;
  std::uint64_t staged_copies = 0;
  std::uint64_t driver_staged_copies = 0;  //!< loads into pageable memory left to the driver
};

namespace detail {

// A CUDA event without timing (the cheapest kind), used to know when a
// staging chunk may be refilled. Move-only.
class cuda_event {
 public:
  cuda_event() = default;
  static result<cuda_event> create(int ordinal) {
    cuda::device_guard on(ordinal);
    cudaEvent_t e = nullptr;
    const auto status = cudaEventCreateWithFlags(&e, cudaEventDisableTiming);
    if (status != cudaSuccess) {
      (void)cudaGetLastError();
      return cuda::make_error(status, "cudaEventCreate on cuda:" + std::to_string(ordinal));
    }
    cuda_event ev;
    ev.e_ = e;
    ev.device_ = ordinal;
    return ev;
  }
  cuda_event(cuda_event&& o) noexcept : e_(std::exchange(o.e_, nullptr)), device_(o.device_) {}
  cuda_event& operator=(cuda_event&& o) noexcept {
    if (this != &o) {
      release();
      e_ = std::exchange(o.e_, nullptr);
      device_ = o.device_;
    }
    return *this;
  }
  ~cuda_event() { release(); }
  [[nodiscard]] cudaEvent_t native() const noexcept { return e_; }

 private:
  void release() noexcept {
    if (!e_) return;
    cuda::device_guard on(device_);
    (void)cudaEventDestroy(e_);
    e_ = nullptr;
  }
  cudaEvent_t e_ = nullptr;
  int device_ = 0;
};

// One copy's private resources. A single stream is enough for the double
// buffering: one copy goes one way, through one copy engine, so a second
// stream would add no overlap; the two events say when each staging chunk
// is free again (or filled, on the way out).
struct cuda_copy_lane {
  cuda::stream stream;
  cuda::pinned_buffer staging;  // two chunks of `chunk` bytes
  cuda_event done[2];
  std::size_t chunk = 0;
};

// The lanes and who holds them. acquire() blocks while all are in use: a
// bounded pool, so staging memory and streams are never shared by two copies.
class cuda_lane_pool {
 public:
  class lease {
   public:
    lease(cuda_lane_pool& p, cuda_copy_lane& l) noexcept : pool_(&p), lane_(&l) {}
    lease(const lease&) = delete;
    lease& operator=(const lease&) = delete;
    ~lease() { pool_->give_back(*lane_); }
    cuda_copy_lane& operator*() const noexcept { return *lane_; }
    cuda_copy_lane* operator->() const noexcept { return lane_; }

   private:
    cuda_lane_pool* pool_;
    cuda_copy_lane* lane_;
  };

  void add(std::unique_ptr<cuda_copy_lane> l) {
    free_.push_back(l.get());
    all_.push_back(std::move(l));
  }
  lease acquire() {
    std::unique_lock lock(mu_);
    cv_.wait(lock, [this] { return !free_.empty(); });
    cuda_copy_lane* l = free_.back();
    free_.pop_back();
    return lease(*this, *l);
  }
  [[nodiscard]] std::size_t size() const noexcept { return all_.size(); }

 private:
  void give_back(cuda_copy_lane& l) noexcept {
    {
      std::lock_guard lock(mu_);
      free_.push_back(&l);
    }
    cv_.notify_one();
  }
  std::vector<std::unique_ptr<cuda_copy_lane>> all_;
  std::vector<cuda_copy_lane*> free_;
  std::mutex mu_;
  std::condition_variable cv_;
};

// Waits for what the lane's stream holds and reports the first failure,
// `status` (an enqueue that failed) first. On failure the stream is still
// drained, so no DMA touches the staging chunks or the caller's buffer after
// the call returns.
inline result<void> finish_copy(cuda_copy_lane& l, cudaError_t status, std::string_view what) {
  if (status != cudaSuccess) {
    (void)cudaGetLastError();
    (void)cudaStreamSynchronize(l.stream.native());
    (void)cudaGetLastError();
    return cuda::make_error(status, what);
  }
  status = cudaStreamSynchronize(l.stream.native());
  if (status != cudaSuccess) {
    (void)cudaGetLastError();
    return cuda::make_error(status, what);
  }
  return {};
}

// Whether [p, p + n) can be given to the DMA engine as is (device, managed or
// page-locked memory) or is pageable and must be staged.
inline result<bool> is_dma_ready(const void* p, std::size_t n) {
  auto kind_at = [](const void* q) -> result<cudaMemoryType> {
    cudaPointerAttributes a{};
    const auto status = cudaPointerGetAttributes(&a, q);
    if (status == cudaSuccess) return a.type;
    (void)cudaGetLastError();
    // Before CUDA 11 this was the answer for pageable memory.
    if (status == cudaErrorInvalidValue) return cudaMemoryTypeUnregistered;
    return cuda::make_error(status, "cudaPointerGetAttributes");
  };
  auto first = kind_at(p);
  KVX_TRY(first);
  auto last = kind_at(static_cast<const std::byte*>(p) + (n - 1));
  KVX_TRY(last);
  const bool a = *first != cudaMemoryTypeUnregistered;
  const bool b = *last != cudaMemoryTypeUnregistered;
  if (a != b)
    return error{errc::invalid_argument, "a buffer of " + std::to_string(n) +
                                             " bytes starts and ends in memory of different kinds (pageable and "
                                             "page-locked or device)"};
  return a;
}

// Host to device through the lane's staging: fill chunk i while the DMA
// engine moves chunk i - 1; chunk i reuses the buffer of chunk i - 2 once
// that one's copy has finished.
inline cudaError_t staged_to_device(cuda_copy_lane& l, std::byte* dev, const std::byte* src, std::size_t n) {
  const std::size_t c = l.chunk;
  std::byte* const buf[2] = {l.staging.data(), l.staging.data() + c};
  cudaError_t status = cudaSuccess;
  for (std::size_t i = 0, off = 0; off < n; ++i, off += c) {
    const std::size_t len = std::min(c, n - off);
    const std::size_t b = i & 1;
    if (i >= 2 && (status = cudaEventSynchronize(l.done[b].native())) != cudaSuccess) break;
    std::memcpy(buf[b], src + off, len);
    if ((status = cudaMemcpyAsync(dev + off, buf[b], len, cudaMemcpyHostToDevice, l.stream.native())) != cudaSuccess)
      break;
    if ((status = cudaEventRecord(l.done[b].native(), l.stream.native())) != cudaSuccess) break;
  }
  return status;
}

// Device to host through the lane's staging: two chunks in flight; drain
// chunk i once its event fires, then reuse its buffer for chunk i + 2.
inline cudaError_t staged_from_device(cuda_copy_lane& l, std::byte* dst, const std::byte* dev, std::size_t n) {
  const std::size_t c = l.chunk;
  std::byte* const buf[2] = {l.staging.data(), l.staging.data() + c};
  const std::size_t chunks = (n + c - 1) / c;
  auto enqueue = [&](std::size_t i) {
    const std::size_t off = i * c;
    auto status = cudaMemcpyAsync(buf[i & 1], dev + off, std::min(c, n - off), cudaMemcpyDeviceToHost, l.stream.native());
    if (status == cudaSuccess) status = cudaEventRecord(l.done[i & 1].native(), l.stream.native());
    return status;
  };
  cudaError_t status = enqueue(0);
  if (status == cudaSuccess && chunks > 1) status = enqueue(1);
  for (std::size_t i = 0; status == cudaSuccess && i < chunks; ++i) {
    if ((status = cudaEventSynchronize(l.done[i & 1].native())) != cudaSuccess) break;
    const std::size_t off = i * c;
    std::memcpy(dst + off, buf[i & 1], std::min(c, n - off));
    if (i + 2 < chunks) status = enqueue(i + 2);
  }
  return status;
}

}  // namespace detail

template <class Allocator = memory::offset_allocator>
class cuda_tier {
  static_assert(memory::check_allocator<Allocator>());
  using pool_type = cuda::device_pool<Allocator>;

  // A stored block's device memory, returned to the pool when the last owner
  // (the index, a load in flight, a `borrowed_block`) lets go.
  struct held_block {
    pool_type* pool;
    typename pool_type::block blk;
    held_block(pool_type* p, typename pool_type::block b) noexcept : pool(p), blk(b) {}
    held_block(const held_block&) = delete;
    held_block& operator=(const held_block&) = delete;
    ~held_block() { pool->deallocate(blk); }
  };

 public:
  using tier_concept = tier_tag;
  static constexpr bool host_accessible = false;

  //! A stored block's device memory, kept allocated while the handle lives
  //! (even after `erase`). Must not outlive the tier.
  class borrowed_block {
   public:
    borrowed_block() = default;
    //! The block's bytes on the device (`location::cuda(device)`).
    [[nodiscard]] const memory::memory_region& region() const noexcept { return region_; }
    explicit operator bool() const noexcept { return hold_ != nullptr; }

   private:
    friend class cuda_tier;
    borrowed_block(std::shared_ptr<const held_block> h, memory::memory_region r) noexcept
        : hold_(std::move(h)), region_(r) {}
    std::shared_ptr<const held_block> hold_;
    memory::memory_region region_{};
  };

  explicit cuda_tier(cuda_tier_config cfg)
      : cfg_(validated(std::move(cfg))),
        geometry_(cfg_.capacity),
        pool_(make_pool(cfg_, geometry_.capacity())) {
    add_lanes();
  }
  cuda_tier(const cuda_tier&) = delete;
  cuda_tier& operator=(const cuda_tier&) = delete;
  ~cuda_tier() = default;

  [[nodiscard]] std::string_view name() const noexcept { return cfg_.name; }
  [[nodiscard]] std::uint64_t capacity() const noexcept { return pool_.capacity(); }
  //! Device bytes allocated, borrowed blocks that were erased included.
  [[nodiscard]] std::uint64_t used_bytes() const { return pool_.capacity() - pool_.free_bytes(); }
  [[nodiscard]] watermarks marks() const noexcept { return cfg_.marks; }
  //! Bytes a block of `n` bytes occupies in the pool.
  [[nodiscard]] std::uint64_t footprint(std::uint64_t n) const noexcept {
    const std::uint64_t aligned = memory::detail::align_up(n, cfg_.alignment);
    if constexpr (requires { geometry_.granted_size(n); })
      return std::max<std::uint64_t>(geometry_.granted_size(n), aligned);
    else
      return aligned;
  }
  [[nodiscard]] int device() const noexcept { return cfg_.device; }
  [[nodiscard]] cuda_tier_stats stats() const noexcept {
    return {direct_.load(std::memory_order_relaxed), staged_.load(std::memory_order_relaxed),
            driver_staged_.load(std::memory_order_relaxed)};
  }

  //! Copies `in` (device, pinned or pageable memory) into the GPU as block `k`.
  result<void> store(const block_key& k, std::span<const std::byte> in) {
    if (in.empty()) return fail(errc::invalid_argument, "store of an empty block", k);
    {
      std::lock_guard lock(mu_);
      if (index_.contains(k)) return fail(errc::already_exists, "store", k);
    }
    auto got = pool_.allocate(in.size(), cfg_.alignment);
    if (!got) return fail(got.code(), "store: " + got.error().context(), k);
    // Owns the allocation from here on: every early return frees it.
    auto mem = std::make_shared<held_block>(&pool_, *got);
    if (auto r = copy(mem->blk.region.data(), in.data(), in.size(), true); !r)
      return fail(r.code(), "store: " + r.error().context(), k);
    std::lock_guard lock(mu_);
    if (!index_.try_emplace(k, slot{std::move(mem), in.size()}).second)
      return fail(errc::already_exists, "store", k);  // a concurrent store of the same key won
    return {};
  }

  //! Copies block `k` into `out` (device, pinned or pageable memory); returns its size.
  result<std::size_t> load(const block_key& k, std::span<std::byte> out) const {
    slot s;
    {
      std::lock_guard lock(mu_);
      auto it = index_.find(k);
      if (it == index_.end()) return fail(errc::not_found, "load", k);
      s = it->second;
    }
    if (out.size() < s.size)
      return fail(errc::out_of_range, "load: block has " + std::to_string(s.size) + " bytes, buffer " +
                                          std::to_string(out.size()), k);
    if (auto r = copy(out.data(), s.mem->blk.region.data(), static_cast<std::size_t>(s.size), false); !r)
      return fail(r.code(), "load: " + r.error().context(), k);
    return static_cast<std::size_t>(s.size);
  }

  bool erase(const block_key& k) {
    std::shared_ptr<held_block> dying;  // freed after the lock is released
    {
      std::lock_guard lock(mu_);
      auto it = index_.find(k);
      if (it == index_.end()) return false;
      dying = std::move(it->second.mem);
      index_.erase(it);
    }
    return true;
  }

  [[nodiscard]] bool contains(const block_key& k) const {
    std::lock_guard lock(mu_);
    return index_.contains(k);
  }
  [[nodiscard]] std::optional<std::uint64_t> size_of(const block_key& k) const {
    std::lock_guard lock(mu_);
    auto it = index_.find(k);
    if (it == index_.end()) return std::nullopt;
    return it->second.size;
  }
  [[nodiscard]] std::size_t blocks() const {
    std::lock_guard lock(mu_);
    return index_.size();
  }

  //! The whole device allocation, for registration as a transfer segment.
  [[nodiscard]] memory::memory_region region() const noexcept { return pool_.region(); }
  //! Where block `k` sits in `region()` (offset and stored size). Valid until `erase(k)`.
  [[nodiscard]] std::optional<memory::allocation> locate(const block_key& k) const {
    std::lock_guard lock(mu_);
    auto it = index_.find(k);
    if (it == index_.end()) return std::nullopt;
    return memory::allocation{it->second.mem->blk.slot.offset, it->second.size};
  }
  //! Block `k`'s device range. A view, valid until `erase(k)`: pin the block
  //! in its `tiered_cache` (or use `borrow`) while it is used.
  [[nodiscard]] std::optional<memory::memory_region> region_of(const block_key& k) const {
    std::lock_guard lock(mu_);
    auto it = index_.find(k);
    if (it == index_.end()) return std::nullopt;
    return it->second.mem->blk.region;
  }
  //! Block `k`'s device range with a handle that keeps it allocated across `erase(k)`.
  [[nodiscard]] std::optional<borrowed_block> borrow(const block_key& k) const {
    std::lock_guard lock(mu_);
    auto it = index_.find(k);
    if (it == index_.end()) return std::nullopt;
    return borrowed_block(it->second.mem, it->second.mem->blk.region);
  }

 private:
  struct slot {
    std::shared_ptr<held_block> mem;
    std::uint64_t size = 0;
  };

  static cuda_tier_config validated(cuda_tier_config c) {
    const std::string who = "kvx: cuda_tier '" + c.name + "': ";
    if (c.capacity == 0) throw std::invalid_argument(who + "capacity is 0");
    if (!memory::detail::is_pow2(c.alignment)) throw std::invalid_argument(who + "alignment is not a power of two");
    if (c.lanes == 0) throw std::invalid_argument(who + "lanes is 0");
    if (c.staging_chunk == 0) throw std::invalid_argument(who + "staging_chunk is 0");
    if (c.device < 0) throw std::invalid_argument(who + "device ordinal " + std::to_string(c.device) + " is negative");
    if (auto ok = validate(c.marks, "cuda_tier '" + c.name + "' watermarks"); !ok)
      throw std::invalid_argument("kvx: " + ok.error().message());
    return c;
  }
  [[noreturn]] static void raise(const cuda_tier_config& c, const kvx::error& e) {
    throw std::system_error(e.code(), "kvx: cuda_tier '" + c.name + "': " + e.context());
  }
  // The pool is exactly as large as the allocator's usable capacity, so the
  // pool's capacity and free bytes are the allocator's.
  static pool_type make_pool(const cuda_tier_config& c, std::uint64_t usable) {
    if (usable == 0)
      throw std::invalid_argument("kvx: cuda_tier '" + c.name + "': capacity " + std::to_string(c.capacity) +
                                  " is below one allocation granule");
    auto p = pool_type::create(usable, c.device);
    if (!p) raise(c, p.error());
    return std::move(*p);
  }
  void add_lanes() {
    const cuda_tier_config& c = cfg_;
    for (std::size_t i = 0; i < c.lanes; ++i) {
      auto l = std::make_unique<detail::cuda_copy_lane>();
      auto s = cuda::stream::create(c.device);
      if (!s) raise(c, s.error());
      l->stream = std::move(*s);
      auto b = cuda::pinned_buffer::allocate(2 * c.staging_chunk);
      if (!b) raise(c, b.error());
      l->staging = std::move(*b);
      for (auto& e : l->done) {
        auto ev = detail::cuda_event::create(c.device);
        if (!ev) raise(c, ev.error());
        e = std::move(*ev);
      }
      l->chunk = static_cast<std::size_t>(c.staging_chunk);
      lanes_.add(std::move(l));
    }
  }

  // `to_device`: dst is the block, src the caller's buffer; else the reverse.
  result<void> copy(std::byte* dst, const std::byte* src, std::size_t n, bool to_device) const {
    cuda::device_guard on(cfg_.device);
    const std::byte* user = to_device ? src : dst;
    auto direct = detail::is_dma_ready(user, n);
    KVX_TRY(direct);
    if (!*direct && !to_device && !cfg_.stage_loads) {
      // Pageable destination: the driver stages it (see cuda_tier_config::stage_loads).
      driver_staged_.fetch_add(1, std::memory_order_relaxed);
      auto lane = lanes_.acquire();
      return detail::finish_copy(*lane, cudaMemcpyAsync(dst, src, n, cudaMemcpyDefault, lane->stream.native()),
                                 "cudaMemcpyAsync from cuda:" + std::to_string(cfg_.device) + " of " + std::to_string(n) +
                                     " bytes into pageable memory");
    }
    auto lane = lanes_.acquire();
    (*direct ? direct_ : staged_).fetch_add(1, std::memory_order_relaxed);
    cudaError_t status;
    if (*direct)
      status = cudaMemcpyAsync(dst, src, n, cudaMemcpyDefault, lane->stream.native());
    else if (to_device)
      status = detail::staged_to_device(*lane, dst, src, n);
    else
      status = detail::staged_from_device(*lane, dst, src, n);
    return detail::finish_copy(*lane, status,
                               std::string(*direct ? "cudaMemcpyAsync " : "staged cudaMemcpyAsync ") +
                                   (to_device ? "to " : "from ") + "cuda:" + std::to_string(cfg_.device) + " of " +
                                   std::to_string(n) + " bytes");
  }

  kvx::error fail(std::error_code code, const std::string& what, const block_key& k) const {
    return kvx::error{code, "cuda_tier '" + cfg_.name + "': " + what + " (block " + k.to_string() + ")"};
  }
  kvx::error fail(errc code, const std::string& what, const block_key& k) const {
    return fail(make_error_code(code), what, k);
  }

  cuda_tier_config cfg_;
  // Answers only geometry questions (usable capacity, granted sizes) for the
  // pool's allocator of the same type and capacity, which device_pool keeps
  // private; it never allocates.
  Allocator geometry_;
  pool_type pool_;
  mutable detail::cuda_lane_pool lanes_;
  mutable std::mutex mu_;
  std::unordered_map<block_key, slot, block_key_hash> index_;
  mutable std::atomic<std::uint64_t> direct_{0}, staged_{0}, driver_staged_{0};
};

}  // namespace kvx::cache
