#pragma once
//! \file
//! KV gather and scatter kernels: `gather_kv` copies N paged blocks (a layer
//! range, K and V, a head range) of a `paged_kv_view` into one contiguous
//! staging buffer, `scatter_kv` copies a staging buffer back into paged
//! blocks. What a prefill node runs before a transport sends the KV of a
//! request, and what a decode node runs after it arrives. Needs nvcc.
//!
//! ## Staging order
//! Block-major: `[block i][layer][K,V][token][head][element]`, dense, where
//! `i` runs over the block list, `layer` over `[layer_begin, layer_end)` and
//! `head` over `[head_begin, head_begin + head_count)`:
//!
//!     staging offset of (i, layer, kv, token, head) =
//!       (((i * L + (layer - layer_begin)) * 2 + kv) * block_tokens + token) * head_count * head_bytes
//!       + (head - head_begin) * head_bytes
//!
//! With all heads, a block's slice is exactly a `page_first` block of the
//! same layers (so a page-first receiver takes it as it is), and one layer
//! (`layer_end = layer_begin + 1`) is what layer-wise streaming sends.
//! `kv_staging_bytes(view, n, slice)` is its size.
//!
//! ## Tensor-parallel re-sharding
//! The head range selects heads of the *view* on both sides, so the same
//! kernels change TP degree:
//! - prefill TP=2 -> decode TP=1 (H heads): each prefill rank gathers all its
//!   H/2 heads; the decode rank scatters rank r's staging with
//!   `{.head_begin = r * H / 2, .head_count = H / 2}`.
//! - prefill TP=1 -> decode TP=2: the prefill rank gathers
//!   `{.head_begin = r * H / 2, .head_count = H / 2}` for decode rank r, which
//!   scatters it with all its heads.
//!
//! ## Speed
//! With all heads, each block-layer (or each K and each V, when they are not
//! adjacent as in `layer_first_kv_split`) is one run of contiguous bytes on
//! both sides; blocks of 256 threads copy 16 KiB tiles of runs with 16-byte
//! vector loads and stores (4 in flight per thread), in a grid-stride loop
//! sized to the GPU, many blocks per launch. With a head sub-range the runs
//! are one token's heads (`head_count * head_bytes` bytes) and a tile packs
//! several of them. The vector width is the largest of 16, 8, 4, 2, 1 bytes
//! that divides both base addresses, every stride and the run length, so
//! misaligned input is copied correctly, only slower.
//!
//! ## Errors
//! Launchers check their arguments on the host before enqueueing anything:
//! `errc::invalid_argument` for a bad view (`validate()`), a null pointer, a
//! reversed range or a launch larger than 2^31 runs; `errc::out_of_range` for
//! layers or heads outside the view and for a staging buffer shorter than
//! `kv_staging_bytes`. A launch failure is `kvx::cuda::make_error(cudaGetLastError())`.
//! Block ids are device memory the host cannot see: an id `>= num_blocks`
//! is never read or written through; the kernel counts it in `status` (a
//! device `kv_status`, when given; `reset_status` zeroes it, `check_status`
//! turns a host copy of it into an `errc::out_of_range` naming the position)
//! and leaves that block's staging bytes (gather) or nothing (scatter)
//! touched. Faults while the kernel runs surface on the stream
//! (`kvx::cuda::async_wait` completes with `errc::device_error`).
//!
//! The launchers only enqueue, on the caller's stream and the calling
//! thread's current device (the view, the ids and the staging buffer must be
//! accessible from it); the staging buffer and
//! the view's memory must not overlap. `scatter_kv` with a repeated block id
//! writes that block more than once, in no defined order.
//!
//! \code
//! // Prefill: gather layer l of a request's blocks (block table on the GPU).
//! kvx::cuda::kv_slice one{.layer_begin = l, .layer_end = l + 1};
//! auto n = kvx::cuda::kv_staging_bytes(view, nblocks, one);
//! KVX_TRY(kvx::cuda::gather_kv(view, {table_dev, nblocks}, one, staging, n, stream, status_dev));
//! // Decode: the same bytes back into its own blocks.
//! KVX_TRY(kvx::cuda::scatter_kv(dview, {dtable_dev, nblocks}, one, staging, n, stream, status_dev));
//! \endcode

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <span>
#include <string>
#include <string_view>

#include <kvx/core/error.hpp>
#include <kvx/core/result.hpp>
#include <kvx/cuda/error.hpp>
#include <kvx/cuda/kv_codec.hpp>
#include <kvx/cuda/paged_kv_view.hpp>

namespace kvx::cuda {

//! Bytes of the staging buffer for `n` blocks of `slice` of `v` (plain bytes,
//! the order in the file comment); `UINT64_MAX` when that does not fit in 64 bits.
[[nodiscard]] inline std::uint64_t kv_staging_bytes(const paged_kv_view& v, std::uint32_t n, kv_slice slice) noexcept {
  const kv_slice s = slice.resolved(v);
  std::uint64_t total = 2;
  for (const std::uint64_t f : {std::uint64_t{v.block_tokens}, std::uint64_t{s.head_count}, std::uint64_t{v.head_bytes},
                                std::uint64_t{n}, std::uint64_t{s.layer_count()}}) {
    if (f != 0 && total > UINT64_MAX / f) return UINT64_MAX;
    total *= f;
  }
  return total;
}

//! Zeroes a device `kv_status` on `stream` (before a launch that reports into it).
inline result<void> reset_status(kv_status* status, cudaStream_t stream) {
  if (status == nullptr) return error{errc::invalid_argument, "reset_status: null status"};
  return check(cudaMemsetAsync(status, 0, sizeof(kv_status), stream), "reset_status: cudaMemsetAsync");
}

//! `errc::out_of_range` naming a bad block id when `host_copy` (a `kv_status`
//! copied back from the device after the stream finished) counted one.
inline result<void> check_status(const kv_status& host_copy, std::string_view what = "KV kernel") {
  if (host_copy.bad_ids == 0) return {};
  return error{errc::out_of_range, std::string(what) + ": " + std::to_string(host_copy.bad_ids) +
                                       " block id(s) out of range, e.g. position " +
                                       std::to_string(host_copy.bad_position) + " names block " +
                                       std::to_string(host_copy.bad_id) + "; those blocks were not copied"};
}

namespace detail {

inline constexpr unsigned kv_threads = 256;  // threads per CUDA block
inline constexpr unsigned kv_unroll = 4;     // vectors in flight per thread
inline constexpr std::uint32_t kv_max_runs = 0x7fffffffU;
// Block ids passed by value in the kernel's parameters by the host-id
// overloads: 768 ids keep the parameters under the classic 4 KiB limit.
inline constexpr std::uint32_t kv_inline_ids = 768;

enum class kv_direction : unsigned char { gather, scatter };

// The host checks shared by every KV launcher: the view, the slice (resolved)
// and the buffers. `needed` is the codec's staging size.
inline result<kv_slice> check_view_slice(const char* who, const paged_kv_view& v, kv_slice slice) {
  if (const char* why = validate(v)) return error{errc::invalid_argument, std::string(who) + ": " + why};
  if (slice.layer_begin > slice.layer_end && slice.layer_end != kv_slice::all)
    return error{errc::invalid_argument, std::string(who) + ": layer range [" + std::to_string(slice.layer_begin) +
                                             ", " + std::to_string(slice.layer_end) + ") is reversed"};
  const kv_slice s = slice.resolved(v);
  if (s.layer_end > v.layers || s.layer_begin > s.layer_end)
    return error{errc::out_of_range, std::string(who) + ": layer range [" + std::to_string(s.layer_begin) + ", " +
                                         std::to_string(s.layer_end) + ") outside the view's " +
                                         std::to_string(v.layers) + " attention layers"};
  if (s.head_count == 0 || s.head_begin >= v.kv_heads || s.head_count > v.kv_heads - s.head_begin)
    return error{errc::out_of_range, std::string(who) + ": " + std::to_string(s.head_count) + " heads from head " +
                                         std::to_string(s.head_begin) + " are not inside the view's " +
                                         std::to_string(v.kv_heads) + " heads"};
  return s;
}

inline result<void> check_buffers(const char* who, std::uint32_t n, const void* ids, const void* staging,
                                  std::uint64_t staging_bytes, std::uint64_t needed) {
  if (n > 0 && ids == nullptr) return error{errc::invalid_argument, std::string(who) + ": null block ids"};
  if (needed > 0 && staging == nullptr) return error{errc::invalid_argument, std::string(who) + ": null staging buffer"};
  if (needed == UINT64_MAX)
    return error{errc::invalid_argument, std::string(who) + ": the staging size overflows 64 bits"};
  if (staging_bytes < needed)
    return error{errc::out_of_range, std::string(who) + ": staging buffer of " + std::to_string(staging_bytes) +
                                         " bytes, " + std::to_string(n) + " blocks need " + std::to_string(needed)};
  return {};
}

// Host-side check of ids the host can see (the convenience overloads).
inline result<void> check_host_ids(const char* who, const paged_kv_view& v, std::span<const std::uint32_t> ids) {
  if (ids.size() > UINT32_MAX) return error{errc::invalid_argument, std::string(who) + ": more than 2^32 block ids"};
  for (std::size_t i = 0; i < ids.size(); ++i)
    if (ids[i] >= v.num_blocks)
      return error{errc::out_of_range, std::string(who) + ": position " + std::to_string(i) + " names block " +
                                           std::to_string(ids[i]) + " of " + std::to_string(v.num_blocks)};
  return {};
}

// Blocks to launch for `items` work items: enough to fill the GPU a few
// times over, no more (the kernels loop).
inline result<unsigned> kv_grid(std::uint64_t items, const char* who) {
  int dev = 0, sms = 0;
  KVX_TRY(check(cudaGetDevice(&dev), std::string(who) + ": cudaGetDevice"));
  KVX_TRY(check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev),
                std::string(who) + ": cudaDeviceGetAttribute(multiProcessorCount)"));
  const std::uint64_t cap = static_cast<std::uint64_t>(sms > 0 ? sms : 1) * 16;
  return static_cast<unsigned>(items < cap ? items : cap);
}

// The largest power-of-two width <= 16 dividing `bits`.
[[nodiscard]] constexpr unsigned vector_width(std::uint64_t bits) noexcept {
  unsigned w = 16;
  while (w > 1 && (bits & (w - 1)) != 0) w /= 2;
  return w;
}

// Block ids read from device memory (the block table an engine keeps).
struct device_ids {
  const std::uint32_t* data;
  __device__ std::uint32_t operator[](std::uint32_t i) const { return data[i]; }
};
// Block ids carried in the kernel parameters (host overloads).
struct inline_ids {
  std::uint32_t data[kv_inline_ids];
  __device__ std::uint32_t operator[](std::uint32_t i) const { return data[i]; }
};

__device__ inline void report_bad_id(kv_status* s, std::uint32_t position, std::uint32_t id) {
  if (s == nullptr) return;
  if (atomicAdd(&s->bad_ids, 1U) == 0) {
    s->bad_position = position;
    s->bad_id = id;
  }
}

// What a copy launch needs on the device. A "run" is a stretch of bytes
// contiguous on both sides: run r = (i * layers + l) * runs_per_layer + k,
// k = kv * runs_per_kv + token; its staging offset is r * run_vecs vectors.
struct kv_copy_plan {
  std::byte* view = nullptr;     // view.base
  std::byte* staging = nullptr;
  kv_status* status = nullptr;
  std::uint64_t layer_stride = 0, block_stride = 0, kv_stride = 0, token_stride = 0, head_offset = 0;
  std::uint32_t num_blocks = 0;     // ids at or past this are skipped
  std::uint32_t position_base = 0;  // added to reported positions (chunks of inline ids)
  std::uint32_t layer_begin = 0, layers = 0;
  std::uint32_t runs_per_layer = 1, runs_per_kv = 1;
  std::uint32_t run_vecs = 0;       // vectors per run
  std::uint32_t tiles_per_run = 1;  // > 1: a run spans several work items
  std::uint32_t runs_per_item = 1;  // > 1: a work item holds several runs
  std::uint32_t n_runs = 0, n_items = 0;
};

// View offset of run `run`, or false when its block id is out of range
// (reported once per position, by the caller that passes `report`).
template <class Ids>
__device__ inline bool locate_run(const kv_copy_plan& p, const Ids& ids, std::uint32_t run, bool report,
                                  std::uint64_t& view_offset) {
  const std::uint32_t il = run / p.runs_per_layer;
  const std::uint32_t k = run - il * p.runs_per_layer;
  const std::uint32_t i = il / p.layers;
  const std::uint32_t l = il - i * p.layers;
  const std::uint32_t id = ids[i];
  if (id >= p.num_blocks) {
    if (report && l == 0 && k == 0) report_bad_id(p.status, p.position_base + i, id);
    return false;
  }
  const std::uint32_t kv = k / p.runs_per_kv;
  const std::uint32_t t = k - kv * p.runs_per_kv;
  view_offset = p.layer_stride * (p.layer_begin + l) + p.block_stride * id + p.kv_stride * kv + p.token_stride * t +
                p.head_offset;
  return true;
}

template <class Vec, kv_direction Dir, class Ids>
__global__ void __launch_bounds__(kv_threads) kv_copy_kernel(const kv_copy_plan p, const Ids ids) {
  constexpr std::uint32_t item_vecs = kv_threads * kv_unroll;
  for (std::uint32_t item = blockIdx.x; item < p.n_items; item += gridDim.x) {
    Vec buf[kv_unroll];
    if (p.runs_per_item == 1) {
      // One run (or one tile of a long run) per item: every thread of the
      // CUDA block agrees on the run, so the branch below is uniform.
      const std::uint32_t run = item / p.tiles_per_run;
      const std::uint32_t tile = item - run * p.tiles_per_run;
      std::uint64_t off = 0;
      if (!locate_run(p, ids, run, tile == 0 && threadIdx.x == 0, off)) continue;
      Vec* view = reinterpret_cast<Vec*>(p.view + off);
      Vec* stg = reinterpret_cast<Vec*>(p.staging) + std::uint64_t{run} * p.run_vecs;
      const Vec* src = Dir == kv_direction::gather ? view : stg;
      Vec* dst = Dir == kv_direction::gather ? stg : view;
      const std::uint32_t first = tile * item_vecs + threadIdx.x;
#pragma unroll
      for (unsigned u = 0; u < kv_unroll; ++u) {
        const std::uint32_t v = first + u * kv_threads;
        if (v < p.run_vecs) buf[u] = src[v];
      }
#pragma unroll
      for (unsigned u = 0; u < kv_unroll; ++u) {
        const std::uint32_t v = first + u * kv_threads;
        if (v < p.run_vecs) dst[v] = buf[u];
      }
    } else {
      // Several short runs per item (a head sub-range): each thread finds
      // the run of each of its vectors.
      const std::uint32_t first_run = item * p.runs_per_item;
      Vec* dsts[kv_unroll];
#pragma unroll
      for (unsigned u = 0; u < kv_unroll; ++u) {
        dsts[u] = nullptr;
        const std::uint32_t j = threadIdx.x + u * kv_threads;
        const std::uint32_t r = j / p.run_vecs;
        const std::uint32_t v = j - r * p.run_vecs;
        const std::uint32_t run = first_run + r;
        std::uint64_t off = 0;
        if (r < p.runs_per_item && run < p.n_runs && locate_run(p, ids, run, v == 0, off)) {
          Vec* view = reinterpret_cast<Vec*>(p.view + off) + v;
          Vec* stg = reinterpret_cast<Vec*>(p.staging) + std::uint64_t{run} * p.run_vecs + v;
          buf[u] = Dir == kv_direction::gather ? *view : *stg;
          dsts[u] = Dir == kv_direction::gather ? stg : view;
        }
      }
#pragma unroll
      for (unsigned u = 0; u < kv_unroll; ++u)
        if (dsts[u] != nullptr) *dsts[u] = buf[u];
    }
  }
}

// Plans a copy of `n` blocks (checked arguments) and the vector width.
struct kv_copy_setup {
  kv_copy_plan plan;
  unsigned width = 1;
};

inline result<kv_copy_setup> plan_kv_copy(const char* who, const paged_kv_view& v, const kv_slice& s, std::uint32_t n,
                                          std::byte* staging, kv_status* status) {
  kv_copy_setup out;
  kv_copy_plan& p = out.plan;
  p.view = v.base;
  p.staging = staging;
  p.status = status;
  p.layer_stride = v.layer_stride;
  p.block_stride = v.block_stride;
  p.kv_stride = v.kv_stride;
  p.num_blocks = v.num_blocks;
  p.layer_begin = s.layer_begin;
  p.layers = s.layer_count();
  const bool all_heads = s.head_begin == 0 && s.head_count == v.kv_heads;
  std::uint64_t run_bytes = 0;
  std::uint64_t bits = reinterpret_cast<std::uintptr_t>(v.base) | reinterpret_cast<std::uintptr_t>(staging) |
                       v.layer_stride | v.block_stride;
  if (all_heads && v.kv_contiguous()) {
    p.runs_per_layer = 1;  // K and V together
    run_bytes = v.block_layer_bytes();
  } else if (all_heads) {
    p.runs_per_layer = 2;  // K, then V
    run_bytes = v.kv_bytes();
    bits |= v.kv_stride;
  } else {
    p.runs_per_kv = v.block_tokens;  // one token's heads at a time
    p.runs_per_layer = 2 * v.block_tokens;
    p.token_stride = v.token_bytes();
    p.head_offset = std::uint64_t{s.head_begin} * v.head_bytes;
    run_bytes = std::uint64_t{s.head_count} * v.head_bytes;
    bits |= v.kv_stride | p.token_stride | p.head_offset;
  }
  bits |= run_bytes;
  out.width = vector_width(bits);
  const std::uint64_t run_vecs = run_bytes / out.width;
  const std::uint64_t n_runs = std::uint64_t{n} * p.layers * p.runs_per_layer;
  if (run_vecs == 0 || run_vecs > kv_max_runs || n_runs > kv_max_runs)
    return error{errc::invalid_argument, std::string(who) + ": " + std::to_string(n_runs) + " runs of " +
                                             std::to_string(run_bytes) +
                                             " bytes in one launch; split the block list (at most 2^31 runs)"};
  p.run_vecs = static_cast<std::uint32_t>(run_vecs);
  p.n_runs = static_cast<std::uint32_t>(n_runs);
  constexpr std::uint64_t item_vecs = kv_threads * kv_unroll;
  const std::uint64_t runs_per_item = run_vecs >= item_vecs ? 1 : item_vecs / run_vecs;
  std::uint64_t n_items = 0;
  if (runs_per_item == 1) {
    p.tiles_per_run = static_cast<std::uint32_t>((run_vecs + item_vecs - 1) / item_vecs);
    n_items = n_runs * p.tiles_per_run;
  } else {
    p.runs_per_item = static_cast<std::uint32_t>(runs_per_item);
    n_items = (n_runs + runs_per_item - 1) / runs_per_item;
  }
  if (n_items > kv_max_runs)
    return error{errc::invalid_argument, std::string(who) + ": more than 2^31 tiles in one launch; split the block list"};
  p.n_items = static_cast<std::uint32_t>(n_items);
  return out;
}

template <kv_direction Dir, class Ids>
result<void> launch_kv_copy(const char* who, const kv_copy_setup& setup, const Ids& ids, cudaStream_t stream) {
  if (setup.plan.n_items == 0) return {};
  auto grid = kv_grid(setup.plan.n_items, who);
  KVX_TRY(grid);
  const dim3 g(*grid), b(kv_threads);
  switch (setup.width) {
    case 16: kv_copy_kernel<uint4, Dir, Ids><<<g, b, 0, stream>>>(setup.plan, ids); break;
    case 8: kv_copy_kernel<uint2, Dir, Ids><<<g, b, 0, stream>>>(setup.plan, ids); break;
    case 4: kv_copy_kernel<unsigned int, Dir, Ids><<<g, b, 0, stream>>>(setup.plan, ids); break;
    case 2: kv_copy_kernel<unsigned short, Dir, Ids><<<g, b, 0, stream>>>(setup.plan, ids); break;
    default: kv_copy_kernel<unsigned char, Dir, Ids><<<g, b, 0, stream>>>(setup.plan, ids); break;
  }
  return check(cudaGetLastError(), std::string(who) + ": kernel launch");
}

template <kv_direction Dir>
result<void> kv_copy(const char* who, const paged_kv_view& v, device_block_ids ids, kv_slice slice, std::byte* staging,
                     std::uint64_t staging_bytes, cudaStream_t stream, kv_status* status) {
  auto s = check_view_slice(who, v, slice);
  KVX_TRY(s);
  const std::uint64_t needed = kv_staging_bytes(v, ids.size, *s);
  KVX_TRY(check_buffers(who, ids.size, ids.data, staging, staging_bytes, needed));
  if (needed == 0) return {};
  auto setup = plan_kv_copy(who, v, *s, ids.size, staging, status);
  KVX_TRY(setup);
  return launch_kv_copy<Dir>(who, *setup, device_ids{ids.data}, stream);
}

// Host ids: checked here, then passed by value, `kv_inline_ids` per launch.
template <kv_direction Dir>
result<void> kv_copy_host(const char* who, const paged_kv_view& v, std::span<const std::uint32_t> ids, kv_slice slice,
                          std::byte* staging, std::uint64_t staging_bytes, cudaStream_t stream) {
  auto s = check_view_slice(who, v, slice);
  KVX_TRY(s);
  KVX_TRY(check_host_ids(who, v, ids));
  const auto n = static_cast<std::uint32_t>(ids.size());
  const std::uint64_t needed = kv_staging_bytes(v, n, *s);
  KVX_TRY(check_buffers(who, n, ids.data(), staging, staging_bytes, needed));
  if (needed == 0) return {};
  const std::uint64_t per_block = kv_staging_bytes(v, 1, *s);
  for (std::uint32_t first = 0; first < n; first += kv_inline_ids) {
    const std::uint32_t count = n - first < kv_inline_ids ? n - first : kv_inline_ids;
    auto setup = plan_kv_copy(who, v, *s, count, staging + per_block * first, nullptr);
    KVX_TRY(setup);
    inline_ids chunk{};
    for (std::uint32_t i = 0; i < count; ++i) chunk.data[i] = ids[first + i];
    KVX_TRY(launch_kv_copy<Dir>(who, *setup, chunk, stream));
  }
  return {};
}

}  // namespace detail

//! Enqueues on `stream` the copy of blocks `ids` (device memory), slice
//! `slice` of `src`, into `staging` (`staging_bytes` long, at least
//! `kv_staging_bytes(src, ids.size, slice)`), block-major. Ids out of range
//! are skipped and counted in `status` (device memory, may be null). See the
//! file comment for the order and the errors.
inline result<void> gather_kv(const paged_kv_view& src, device_block_ids ids, kv_slice slice, void* staging,
                              std::uint64_t staging_bytes, cudaStream_t stream, kv_status* status = nullptr) {
  return detail::kv_copy<detail::kv_direction::gather>("gather_kv", src, ids, slice, static_cast<std::byte*>(staging),
                                                       staging_bytes, stream, status);
}

//! As above with the block ids in host memory: they are checked on the host
//! (`errc::out_of_range` naming the first bad position, before anything is
//! enqueued) and passed to the kernels by value (up to 768 per launch), so
//! `ids` may be released as soon as the call returns.
inline result<void> gather_kv(const paged_kv_view& src, host_block_ids ids, kv_slice slice, void* staging,
                              std::uint64_t staging_bytes, cudaStream_t stream) {
  return detail::kv_copy_host<detail::kv_direction::gather>("gather_kv", src, ids.ids, slice,
                                                            static_cast<std::byte*>(staging), staging_bytes, stream);
}

//! Enqueues on `stream` the inverse of `gather_kv`: `staging` (laid out as
//! `gather_kv` writes it) into blocks `ids` (device memory), slice `slice` of
//! `dst`. Bytes of `dst` outside the slice of the named blocks are not
//! touched; ids out of range are skipped and counted in `status`.
inline result<void> scatter_kv(const paged_kv_view& dst, device_block_ids ids, kv_slice slice, const void* staging,
                               std::uint64_t staging_bytes, cudaStream_t stream, kv_status* status = nullptr) {
  // The kernel reads through this pointer only; the cast saves a second plan type.
  return detail::kv_copy<detail::kv_direction::scatter>("scatter_kv", dst, ids, slice,
                                                        static_cast<std::byte*>(const_cast<void*>(staging)),
                                                        staging_bytes, stream, status);
}

//! `scatter_kv` with host block ids (checked on the host, passed by value).
inline result<void> scatter_kv(const paged_kv_view& dst, host_block_ids ids, kv_slice slice, const void* staging,
                               std::uint64_t staging_bytes, cudaStream_t stream) {
  return detail::kv_copy_host<detail::kv_direction::scatter>(
      "scatter_kv", dst, ids.ids, slice, static_cast<std::byte*>(const_cast<void*>(staging)), staging_bytes, stream);
}

//! The lossless codec: `encode` is `gather_kv`, `decode` is `scatter_kv`.
struct identity_codec {
  using kv_codec_concept = kv_codec_tag;
  static constexpr bool lossless = true;

  [[nodiscard]] std::uint64_t staging_bytes(const paged_kv_view& v, std::uint32_t n, kv_slice s) const noexcept {
    return kv_staging_bytes(v, n, s);
  }
  result<void> encode(const paged_kv_view& v, device_block_ids ids, kv_slice s, void* out, std::uint64_t bytes,
                      cudaStream_t stream, kv_status* status) const {
    return gather_kv(v, ids, s, out, bytes, stream, status);
  }
  result<void> decode(const paged_kv_view& v, device_block_ids ids, kv_slice s, const void* in, std::uint64_t bytes,
                      cudaStream_t stream, kv_status* status) const {
    return scatter_kv(v, ids, s, in, bytes, stream, status);
  }
};

static_assert(check_kv_codec<identity_codec>());

}  // namespace kvx::cuda
