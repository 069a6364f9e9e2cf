#pragma once
//! \file
//! The `kv_codec` concept: how paged KV blocks become bytes in a contiguous
//! staging buffer on the way out of a GPU (`encode`: gather, maybe compress)
//! and back into paged blocks on the way in (`decode`: scatter, maybe
//! decompress). A transfer policy: the staging bytes are what a transport
//! moves, so a lossy codec trades accuracy for link bandwidth.
//!
//! Models: `identity_codec` (kvx/cuda/kernels/kv_gather.cuh: plain gather and
//! scatter, byte-exact) and `fp8_e4m3_codec<Elem>` (kvx/cuda/kernels/kv_quant.cuh:
//! fp16/bf16 to fp8 e4m3 with a float scale per block, layer and K/V: half
//! the bytes). Both are kernels, so their headers need nvcc; this header does
//! not (the CUDA runtime API headers only).
//!
//! ## Requirements
//!
//! For a type `C`, `c` a `const C`, `v` a `paged_kv_view`, `ids` a
//! `device_block_ids`, `n` a `std::uint32_t`, `s` a `kv_slice`, `out` a
//! `void*`, `in` a `const void*`, `bytes` a `std::uint64_t`, `st` a
//! `cudaStream_t` and `status` a `kv_status*` (device memory, may be null):
//!
//! | expression | type | semantics |
//! | --- | --- | --- |
//! | `typename C::kv_codec_concept` | `kv_codec_tag` | opts `C` in |
//! | `c.staging_bytes(v, n, s)` | `std::uint64_t` | bytes of the staging buffer that `n` blocks of slice `s` of `v` encode to (the same for decode) |
//! | `c.encode(v, ids, s, out, bytes, st, status)` | `result<void>` | enqueues on `st` the encoding of blocks `ids` (slice `s` of `v`) into `out` (`bytes` long, at least `staging_bytes`); arguments are checked on the host before anything is enqueued (`errc::invalid_argument`, `errc::out_of_range`); ids `>= v.num_blocks` are skipped on the device and reported in `status` |
//! | `c.decode(v, ids, s, in, bytes, st, status)` | `result<void>` | enqueues on `st` the inverse: the staging bytes `in` into blocks `ids` of `v`; same checks |
//!
//! Optional: `static constexpr bool lossless = true;` states that decode
//! restores the bytes exactly (`kv_codec_lossless_v<C>`).
//!
//! Both calls only enqueue: completion is observed on the stream
//! (`kvx::cuda::async_wait`, or `cudaStreamSynchronize`); launch failures
//! come back as `errc` through `kvx::cuda::make_error`. Thread safety: a codec
//! is an immutable value; calls from several threads on different streams
//! are safe. Nothing blocks.
//!
//! ## A minimal conforming codec
//! \code
//! struct my_codec {
//!   using kv_codec_concept = kvx::cuda::kv_codec_tag;
//!   std::uint64_t staging_bytes(const kvx::cuda::paged_kv_view& v, std::uint32_t n, kvx::cuda::kv_slice s) const;
//!   kvx::result<void> encode(const kvx::cuda::paged_kv_view&, kvx::cuda::device_block_ids, kvx::cuda::kv_slice,
//!                            void* out, std::uint64_t bytes, cudaStream_t, kvx::cuda::kv_status*) const;
//!   kvx::result<void> decode(const kvx::cuda::paged_kv_view&, kvx::cuda::device_block_ids, kvx::cuda::kv_slice,
//!                            const void* in, std::uint64_t bytes, cudaStream_t, kvx::cuda::kv_status*) const;
//! };
//! static_assert(kvx::cuda::check_kv_codec<my_codec>());
//! \endcode

#include <cuda_runtime_api.h>

#include <concepts>
#include <cstdint>

#include <kvx/core/result.hpp>
#include <kvx/cuda/paged_kv_view.hpp>

namespace kvx::cuda {

//! The tag a type names as `kv_codec_concept` to opt in.
struct kv_codec_tag {};

namespace detail {
template <class C>
concept has_codec_tag = requires { typename C::kv_codec_concept; } &&
                        std::same_as<typename C::kv_codec_concept, kv_codec_tag>;
template <class C>
concept has_staging_bytes = requires(const C& c, const paged_kv_view& v, std::uint32_t n, kv_slice s) {
  { c.staging_bytes(v, n, s) } -> std::same_as<std::uint64_t>;
};
template <class C>
concept has_encode = requires(const C& c, const paged_kv_view& v, device_block_ids ids, kv_slice s, void* out,
                              std::uint64_t bytes, cudaStream_t st, kv_status* status) {
  { c.encode(v, ids, s, out, bytes, st, status) } -> std::same_as<result<void>>;
};
template <class C>
concept has_decode = requires(const C& c, const paged_kv_view& v, device_block_ids ids, kv_slice s, const void* in,
                              std::uint64_t bytes, cudaStream_t st, kv_status* status) {
  { c.decode(v, ids, s, in, bytes, st, status) } -> std::same_as<result<void>>;
};
}  // namespace detail

//! `C` moves paged KV blocks to and from a staging buffer; see the table above.
template <class C>
concept kv_codec = detail::has_codec_tag<C> && std::copy_constructible<C> && detail::has_staging_bytes<C> &&
                   detail::has_encode<C> && detail::has_decode<C>;

//! True when `C` promises a byte-exact round trip (see above).
template <class C>
inline constexpr bool kv_codec_lossless_v = [] {
  if constexpr (requires { C::lossless; })
    return static_cast<bool>(C::lossless);
  else
    return false;
}();

//! One `static_assert` per requirement, each a sentence naming what `C`
//! lacks. Returns true so it can sit in a `static_assert`.
template <class C>
constexpr bool check_kv_codec() {
  static_assert(detail::has_codec_tag<C>, "kvx: KV codec C lacks `using kv_codec_concept = kvx::cuda::kv_codec_tag;`");
  static_assert(std::copy_constructible<C>, "kvx: KV codec C is not copy constructible (codecs are values)");
  static_assert(detail::has_staging_bytes<C>,
                "kvx: KV codec C lacks staging_bytes(const paged_kv_view&, std::uint32_t, kv_slice) const -> "
                "std::uint64_t");
  static_assert(detail::has_encode<C>,
                "kvx: KV codec C lacks encode(const paged_kv_view&, device_block_ids, kv_slice, void*, std::uint64_t, "
                "cudaStream_t, kv_status*) const -> kvx::result<void>");
  static_assert(detail::has_decode<C>,
                "kvx: KV codec C lacks decode(const paged_kv_view&, device_block_ids, kv_slice, const void*, "
                "std::uint64_t, cudaStream_t, kv_status*) const -> kvx::result<void>");
  return kv_codec<C>;
}

}  // namespace kvx::cuda
