#pragma once
//! \file
//! `fp8_e4m3_codec<Elem>`: a lossy `kv_codec` that halves the bytes a KV
//! transfer moves. `encode` gathers blocks of an fp16 (`__half`) or bf16
//! (`__nv_bfloat16`) `paged_kv_view` and quantizes them to fp8 e4m3 on the
//! way out; `decode` dequantizes a staging buffer and scatters it into
//! blocks. Needs nvcc; sm_89 or newer converts in hardware (older GPUs use
//! the slower software path of cuda_fp8.h).
//!
//! ## Scales
//! One float scale per (block, layer, K/V): `scale = amax / 448` where `amax`
//! is the largest finite `|x|` of the block-layer's K (or V) over the slice's
//! tokens and heads, and 448 the largest e4m3 value; `code = e4m3(x / scale)`
//! rounded to nearest, saturating. Decoding is `Elem(code * scale)`. So for
//! every element `|x - decoded| <= 2^-4 |x| + scale * 2^-9` (e4m3's 3
//! mantissa bits and its smallest subnormal), plus the rounding of the result
//! to `Elem`. An all-zero K or V has scale 0 and decodes to zeros (no NaN);
//! NaN stays NaN and an infinity saturates to `±448 * scale`.
//!
//! ## Staging layout
//! `[payload][padding to 16 bytes][scales]`: the payload is one byte per
//! element in the order `gather_kv` uses
//! (`[block i][layer][K,V][token][head][element]`), then
//! `n * layers * 2` floats, scale `(i * layers + layer) * 2 + kv`.
//! `payload_bytes` and `scales_offset` give the positions; the staging buffer
//! must be 16-byte aligned (`cudaMalloc` memory is).
//!
//! Errors: those of `gather_kv` / `scatter_kv`, and `errc::invalid_argument`
//! when the view's `dtype_bytes` is not `sizeof(Elem)` or the staging buffer
//! is misaligned. Ids out of range are skipped (their payload and scale are
//! left as they were) and counted in `status`.
//!
//! \code
//! kvx::cuda::fp8_e4m3_codec<__nv_bfloat16> codec;
//! static_assert(kvx::cuda::kv_codec<decltype(codec)>);
//! auto bytes = codec.staging_bytes(view, n, slice);  // about half of kv_staging_bytes
//! KVX_TRY(codec.encode(view, {ids_dev, n}, slice, staging, bytes, stream, status_dev));
//! // ... transport moves `bytes` bytes ...
//! KVX_TRY(codec.decode(dview, {dids_dev, n}, slice, staging, bytes, stream, status_dev));
//! \endcode

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#include <kvx/core/result.hpp>
#include <kvx/cuda/kernels/kv_gather.cuh>
#include <kvx/cuda/kv_codec.hpp>
#include <kvx/cuda/paged_kv_view.hpp>

namespace kvx::cuda {

namespace detail {

template <class Elem>
struct fp8_elem;
template <>
struct fp8_elem<__half> {
  using pair = __half2;
  __device__ static float2 to_float2(pair p) { return __half22float2(p); }
  __device__ static pair from_float2(float2 f) { return __float22half2_rn(f); }
  __device__ static float to_float(__half h) { return __half2float(h); }
  __device__ static __half from_float(float f) { return __float2half_rn(f); }
};
template <>
struct fp8_elem<__nv_bfloat16> {
  using pair = __nv_bfloat162;
  __device__ static float2 to_float2(pair p) { return __bfloat1622float2(p); }
  __device__ static pair from_float2(float2 f) { return __float22bfloat162_rn(f); }
  __device__ static float to_float(__nv_bfloat16 h) { return __bfloat162float(h); }
  __device__ static __nv_bfloat16 from_float(float f) { return __float2bfloat16_rn(f); }
};

inline constexpr float fp8_e4m3_max = 448.0F;
inline constexpr unsigned quant_threads = 256;

// One group = the K or the V of one (block, layer): `block_tokens` rows of
// `row_vecs` vectors of `Vec` elements each, a row per token.
struct kv_quant_plan {
  std::byte* view = nullptr;
  std::uint8_t* payload = nullptr;
  float* scales = nullptr;
  kv_status* status = nullptr;
  std::uint64_t layer_stride = 0, block_stride = 0, kv_stride = 0, token_stride = 0, head_offset = 0;
  std::uint32_t num_blocks = 0, layer_begin = 0, layers = 0, block_tokens = 0;
  std::uint32_t row_vecs = 0;  // vectors per token row
  std::uint32_t n_groups = 0;
};

// Loads `Vec` elements at `p` as floats.
template <class Elem, unsigned Vec>
__device__ inline void load_elems(const std::byte* p, float (&x)[Vec]) {
  using T = fp8_elem<Elem>;
  if constexpr (Vec == 8) {
    // Bit copies through memcpy, not pointer casts: a local uint4 read as
    // pairs would break strict aliasing (and does, in host compilers).
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    typename T::pair pr[4];
    memcpy(pr, &raw, sizeof raw);
#pragma unroll
    for (unsigned k = 0; k < 4; ++k) {
      const float2 f = T::to_float2(pr[k]);
      x[2 * k] = f.x;
      x[2 * k + 1] = f.y;
    }
  } else if constexpr (Vec == 2) {
    const float2 f = T::to_float2(*reinterpret_cast<const typename T::pair*>(p));
    x[0] = f.x;
    x[1] = f.y;
  } else {
    x[0] = T::to_float(*reinterpret_cast<const Elem*>(p));
  }
}

template <class Elem, unsigned Vec>
__device__ inline void store_elems(std::byte* p, const float (&x)[Vec]) {
  using T = fp8_elem<Elem>;
  if constexpr (Vec == 8) {
    typename T::pair pr[4];
#pragma unroll
    for (unsigned k = 0; k < 4; ++k) pr[k] = T::from_float2(make_float2(x[2 * k], x[2 * k + 1]));
    uint4 raw;
    memcpy(&raw, pr, sizeof raw);
    *reinterpret_cast<uint4*>(p) = raw;
  } else if constexpr (Vec == 2) {
    *reinterpret_cast<typename T::pair*>(p) = T::from_float2(make_float2(x[0], x[1]));
  } else {
    *reinterpret_cast<Elem*>(p) = T::from_float(x[0]);
  }
}

// Codes of `Vec` floats (already divided by the scale) at `q`.
template <unsigned Vec>
__device__ inline void store_codes(std::uint8_t* q, const float (&x)[Vec]) {
  if constexpr (Vec == 1) {
    *q = __nv_cvt_float_to_fp8(x[0], __NV_SATFINITE, __NV_E4M3);
  } else {
    unsigned short pairs[Vec / 2];
#pragma unroll
    for (unsigned k = 0; k < Vec / 2; ++k)
      pairs[k] = __nv_cvt_float2_to_fp8x2(make_float2(x[2 * k], x[2 * k + 1]), __NV_SATFINITE, __NV_E4M3);
    if constexpr (Vec == 8) {
      const unsigned lo = static_cast<unsigned>(pairs[0]) | (static_cast<unsigned>(pairs[1]) << 16);
      const unsigned hi = static_cast<unsigned>(pairs[2]) | (static_cast<unsigned>(pairs[3]) << 16);
      *reinterpret_cast<uint2*>(q) = make_uint2(lo, hi);
    } else {
      *reinterpret_cast<unsigned short*>(q) = pairs[0];
    }
  }
}

// Floats of `Vec` codes at `q`.
template <unsigned Vec>
__device__ inline void load_codes(const std::uint8_t* q, float (&x)[Vec]) {
  if constexpr (Vec == 1) {
    x[0] = __half2float(__half(__nv_cvt_fp8_to_halfraw(*q, __NV_E4M3)));
  } else {
    unsigned short pairs[Vec / 2];
    if constexpr (Vec == 8) {
      const uint2 raw = *reinterpret_cast<const uint2*>(q);
#pragma unroll
      for (unsigned k = 0; k < 4; ++k)
        pairs[k] = static_cast<unsigned short>(((k < 2 ? raw.x : raw.y) >> (16 * (k % 2))) & 0xffffU);
    } else {
      pairs[0] = *reinterpret_cast<const unsigned short*>(q);
    }
#pragma unroll
    for (unsigned k = 0; k < Vec / 2; ++k) {
      const float2 f = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(pairs[k], __NV_E4M3)));
      x[2 * k] = f.x;
      x[2 * k + 1] = f.y;
    }
  }
}

// The group's view base, or nullptr for an id out of range (reported once).
__device__ inline std::byte* quant_group_base(const kv_quant_plan& p, const std::uint32_t* ids, std::uint32_t g) {
  const std::uint32_t per_block = p.layers * 2;
  const std::uint32_t i = g / per_block;
  const std::uint32_t rem = g - i * per_block;
  const std::uint32_t l = rem / 2, kv = rem % 2;
  const std::uint32_t id = ids[i];
  if (id >= p.num_blocks) {
    if (threadIdx.x == 0 && rem == 0) report_bad_id(p.status, i, id);
    return nullptr;
  }
  return p.view + p.layer_stride * (p.layer_begin + l) + p.block_stride * id + p.kv_stride * kv + p.head_offset;
}

// Max over the CUDA block; every thread gets the result.
__device__ inline float block_max(float v, float* shared /* quant_threads / 32 + 1 */) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffU, v, o));
  const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < blockDim.x / 32 ? shared[lane] : 0.0F;
#pragma unroll
    for (int o = 16; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffU, v, o));
    if (lane == 0) shared[quant_threads / 32] = v;
  }
  __syncthreads();
  return shared[quant_threads / 32];
}

template <class Elem, unsigned Vec>
__global__ void __launch_bounds__(quant_threads) fp8_encode_kernel(const kv_quant_plan p, const std::uint32_t* ids) {
  __shared__ float shared[quant_threads / 32 + 1];
  const std::uint32_t group_vecs = p.block_tokens * p.row_vecs;
  for (std::uint32_t g = blockIdx.x; g < p.n_groups; g += gridDim.x) {
    const std::byte* base = quant_group_base(p, ids, g);  // uniform over the CUDA block
    if (base == nullptr) continue;
    float amax = 0.0F;
    for (std::uint32_t j = threadIdx.x; j < group_vecs; j += quant_threads) {
      const std::uint32_t t = j / p.row_vecs, c = j - t * p.row_vecs;
      float x[Vec];
      load_elems<Elem, Vec>(base + p.token_stride * t + std::uint64_t{c} * Vec * sizeof(Elem), x);
#pragma unroll
      for (unsigned k = 0; k < Vec; ++k)
        if (isfinite(x[k])) amax = fmaxf(amax, fabsf(x[k]));
    }
    amax = block_max(amax, shared);
    const float inv = amax > 0.0F ? fp8_e4m3_max / amax : 0.0F;
    if (threadIdx.x == 0) p.scales[g] = amax / fp8_e4m3_max;
    std::uint8_t* out = p.payload + std::uint64_t{g} * group_vecs * Vec;
    // Second pass over the same bytes: a group is at most a few hundred KiB,
    // so it is still in L2.
    for (std::uint32_t j = threadIdx.x; j < group_vecs; j += quant_threads) {
      const std::uint32_t t = j / p.row_vecs, c = j - t * p.row_vecs;
      float x[Vec];
      load_elems<Elem, Vec>(base + p.token_stride * t + std::uint64_t{c} * Vec * sizeof(Elem), x);
#pragma unroll
      for (unsigned k = 0; k < Vec; ++k) x[k] *= inv;
      store_codes<Vec>(out + std::uint64_t{j} * Vec, x);
    }
    __syncthreads();  // `shared` is reused by the next group's reduction
  }
}

template <class Elem, unsigned Vec>
__global__ void __launch_bounds__(quant_threads) fp8_decode_kernel(const kv_quant_plan p, const std::uint32_t* ids) {
  const std::uint32_t group_vecs = p.block_tokens * p.row_vecs;
  for (std::uint32_t g = blockIdx.x; g < p.n_groups; g += gridDim.x) {
    std::byte* base = quant_group_base(p, ids, g);
    if (base == nullptr) continue;
    const float scale = p.scales[g];
    const std::uint8_t* in = p.payload + std::uint64_t{g} * group_vecs * Vec;
    for (std::uint32_t j = threadIdx.x; j < group_vecs; j += quant_threads) {
      const std::uint32_t t = j / p.row_vecs, c = j - t * p.row_vecs;
      float x[Vec];
      load_codes<Vec>(in + std::uint64_t{j} * Vec, x);
#pragma unroll
      for (unsigned k = 0; k < Vec; ++k) x[k] *= scale;
      store_elems<Elem, Vec>(base + p.token_stride * t + std::uint64_t{c} * Vec * sizeof(Elem), x);
    }
  }
}

}  // namespace detail

//! fp16 / bf16 KV to fp8 e4m3 with per-(block, layer, K/V) scales; see the
//! file comment. `Elem` is `__half` or `__nv_bfloat16`.
template <class Elem>
struct fp8_e4m3_codec {
  static_assert(std::same_as<Elem, __half> || std::same_as<Elem, __nv_bfloat16>,
                "kvx: fp8_e4m3_codec<Elem>: Elem must be __half or __nv_bfloat16");
  using kv_codec_concept = kv_codec_tag;
  static constexpr bool lossless = false;

  //! Payload bytes (one per element) of `n` blocks of `slice`.
  [[nodiscard]] static std::uint64_t payload_bytes(const paged_kv_view& v, std::uint32_t n, kv_slice slice) noexcept {
    if (v.dtype_bytes == 0) return UINT64_MAX;
    const std::uint64_t b = kv_staging_bytes(v, n, slice);
    return b == UINT64_MAX ? b : b / v.dtype_bytes;
  }
  //! Offset of the first scale in the staging buffer.
  [[nodiscard]] static std::uint64_t scales_offset(const paged_kv_view& v, std::uint32_t n, kv_slice slice) noexcept {
    const std::uint64_t p = payload_bytes(v, n, slice);
    return p > UINT64_MAX - 15 ? UINT64_MAX : (p + 15) / 16 * 16;
  }
  [[nodiscard]] std::uint64_t staging_bytes(const paged_kv_view& v, std::uint32_t n, kv_slice slice) const noexcept {
    const std::uint64_t off = scales_offset(v, n, slice);
    const std::uint64_t groups = std::uint64_t{n} * slice.resolved(v).layer_count() * 2;
    if (off == UINT64_MAX || groups > (UINT64_MAX - off) / sizeof(float)) return UINT64_MAX;
    return off + groups * sizeof(float);
  }

  result<void> encode(const paged_kv_view& v, device_block_ids ids, kv_slice slice, void* out, std::uint64_t bytes,
                      cudaStream_t stream, kv_status* status) const {
    return run<true>("fp8_e4m3_codec::encode", v, ids, slice, static_cast<std::byte*>(out), bytes, stream, status);
  }
  result<void> decode(const paged_kv_view& v, device_block_ids ids, kv_slice slice, const void* in,
                      std::uint64_t bytes, cudaStream_t stream, kv_status* status) const {
    // The decode kernel only reads the staging buffer.
    return run<false>("fp8_e4m3_codec::decode", v, ids, slice, static_cast<std::byte*>(const_cast<void*>(in)), bytes,
                      stream, status);
  }

 private:
  template <bool Encode>
  result<void> run(const char* who, const paged_kv_view& v, device_block_ids ids, kv_slice slice, std::byte* staging,
                   std::uint64_t bytes, cudaStream_t stream, kv_status* status) const {
    auto s = detail::check_view_slice(who, v, slice);
    KVX_TRY(s);
    if (v.dtype_bytes != sizeof(Elem))
      return error{errc::invalid_argument, std::string(who) + ": the view holds " + std::to_string(v.dtype_bytes) +
                                               "-byte elements, the codec " + std::to_string(sizeof(Elem)) + "-byte ones"};
    const std::uint64_t needed = staging_bytes(v, ids.size, *s);
    KVX_TRY(detail::check_buffers(who, ids.size, ids.data, staging, bytes, needed));
    if (ids.size == 0 || s->layer_count() == 0) return {};
    if (reinterpret_cast<std::uintptr_t>(staging) % 16 != 0)
      return error{errc::invalid_argument, std::string(who) + ": the staging buffer is not 16-byte aligned"};
    const std::uint64_t groups = std::uint64_t{ids.size} * s->layer_count() * 2;
    if (groups > detail::kv_max_runs)
      return error{errc::invalid_argument, std::string(who) + ": more than 2^31 block-layers in one launch"};

    detail::kv_quant_plan p;
    p.view = v.base;
    p.payload = reinterpret_cast<std::uint8_t*>(staging);
    p.scales = reinterpret_cast<float*>(staging + scales_offset(v, ids.size, *s));
    p.status = status;
    p.layer_stride = v.layer_stride;
    p.block_stride = v.block_stride;
    p.kv_stride = v.kv_stride;
    p.token_stride = v.token_bytes();
    p.head_offset = std::uint64_t{s->head_begin} * v.head_bytes;
    p.num_blocks = v.num_blocks;
    p.layer_begin = s->layer_begin;
    p.layers = s->layer_count();
    p.block_tokens = v.block_tokens;
    p.n_groups = static_cast<std::uint32_t>(groups);
    const std::uint64_t row_bytes = std::uint64_t{s->head_count} * v.head_bytes;
    const std::uint64_t bits = reinterpret_cast<std::uintptr_t>(v.base) | v.layer_stride | v.block_stride |
                               v.kv_stride | p.token_stride | p.head_offset | row_bytes;
    const unsigned vec = bits % 16 == 0 ? 8 : bits % 4 == 0 ? 2 : 1;
    const std::uint64_t row_vecs = row_bytes / sizeof(Elem) / vec;
    if (row_vecs * v.block_tokens > detail::kv_max_runs)
      return error{errc::invalid_argument, std::string(who) + ": one block-layer holds more than 2^31 vectors"};
    p.row_vecs = static_cast<std::uint32_t>(row_vecs);

    auto grid = detail::kv_grid(groups, who);
    KVX_TRY(grid);
    const dim3 g(*grid), b(detail::quant_threads);
    if constexpr (Encode) {
      switch (vec) {
        case 8: detail::fp8_encode_kernel<Elem, 8><<<g, b, 0, stream>>>(p, ids.data); break;
        case 2: detail::fp8_encode_kernel<Elem, 2><<<g, b, 0, stream>>>(p, ids.data); break;
        default: detail::fp8_encode_kernel<Elem, 1><<<g, b, 0, stream>>>(p, ids.data); break;
      }
    } else {
      switch (vec) {
        case 8: detail::fp8_decode_kernel<Elem, 8><<<g, b, 0, stream>>>(p, ids.data); break;
        case 2: detail::fp8_decode_kernel<Elem, 2><<<g, b, 0, stream>>>(p, ids.data); break;
        default: detail::fp8_decode_kernel<Elem, 1><<<g, b, 0, stream>>>(p, ids.data); break;
      }
    }
    return check(cudaGetLastError(), std::string(who) + ": kernel launch");
  }
};

static_assert(check_kv_codec<fp8_e4m3_codec<__half>>());
static_assert(check_kv_codec<fp8_e4m3_codec<__nv_bfloat16>>());

}  // namespace kvx::cuda
