#pragma once
//! \file
//! `paged_kv_view`: one tensor-parallel shard's paged KV pool in device
//! memory, as the handful of strides a kernel needs to find every byte. A
//! plain aggregate, passed to kernels by value; this header includes nothing
//! but `<cstdint>`, `<cstddef>` and `<span>`, so it compiles with nvcc and with a host
//! compiler that has no CUDA headers.
//!
//! Addressing (all offsets in bytes from `base`; `l` is the attention-layer
//! index, 0 for the first attention layer, so the recurrent layers of hybrid
//! models are simply not in the view; `kv` is 0 for K, 1 for V):
//!
//! | what | offset |
//! | --- | --- |
//! | K of (block `b`, layer `l`) | `l * layer_stride + b * block_stride` (`chunk_offset(b, l)`) |
//! | K or V of (`b`, `l`) | `chunk_offset(b, l) + kv * kv_stride` (`kv_offset`) |
//! | head vector (`l`, `kv`, `b`, `token`, `head`) | `kv_offset(b, l, kv) + (token * kv_heads + head) * head_bytes` |
//!
//! Inside one K (or V) of one block-layer, tokens, heads and elements are
//! dense: `block_tokens * kv_heads * head_bytes` bytes (`kv_bytes()`). When
//! `kv_stride == kv_bytes()` (`kv_contiguous()`), the K and V of a block-layer
//! are one contiguous chunk of `block_layer_bytes()`; that holds for
//! `layouts::layer_first` (`[layer][block][K,V][token][head][dim]`) and
//! `layouts::page_first` (`[block][layer][K,V][token][head][dim]`), and not
//! for `layouts::layer_first_kv_split` (`[layer][K,V][block]...`), whose K and
//! V lie `num_blocks * kv_bytes()` apart; the kernels handle both.
//!
//! | layout | `layer_stride` | `block_stride` | `kv_stride` |
//! | --- | --- | --- | --- |
//! | `layer_first` | `num_blocks * block_layer_bytes` | `block_layer_bytes` | `kv_bytes` |
//! | `page_first` | `block_layer_bytes` | `attention_layers * block_layer_bytes` | `kv_bytes` |
//! | `layer_first_kv_split` | `num_blocks * block_layer_bytes` | `kv_bytes` | `num_blocks * kv_bytes` |
//!
//! Build one from a `kvx::disagg` layout and a device region with
//! `kvx::cuda::paged_kv_view_of` (kvx/cuda/paged_kv_view_of.hpp), which checks
//! the region's size; `validate()` below checks a hand-made one.
//!
//! Thread safety: a value; it does not own the memory it describes.
//!
//! \code
//! kvx::cuda::paged_kv_view v = kvx::cuda::paged_kv_view_of(layout, gpu.region()).value();
//! std::byte* k = v.element(/*layer=*/3, /*kv=*/0, /*block=*/17, /*token=*/5, /*head=*/2);
//! \endcode

#include <cstddef>
#include <cstdint>
#include <span>

//! `__host__ __device__` under nvcc (and clang's CUDA mode), nothing otherwise.
#if defined(__CUDACC__)
#define KVX_HOST_DEVICE __host__ __device__
#else
#define KVX_HOST_DEVICE
#endif

namespace kvx::cuda {

//! One shard's paged KV pool in device memory; see the file comment.
struct paged_kv_view {
  std::byte* base = nullptr;       //!< device address of K of (block 0, attention layer 0), token 0, head 0
  std::uint64_t bytes = 0;         //!< bytes addressable from `base` (for bounds checks on the host)
  std::uint64_t layer_stride = 0;  //!< between consecutive attention layers
  std::uint64_t block_stride = 0;  //!< between consecutive blocks
  std::uint64_t kv_stride = 0;     //!< from K to V of one block-layer
  std::uint32_t layers = 0;        //!< attention layers in the view
  std::uint32_t num_blocks = 0;    //!< paged blocks in the pool
  std::uint32_t block_tokens = 0;  //!< tokens per block
  std::uint32_t kv_heads = 0;      //!< KV heads this shard holds
  std::uint32_t head_bytes = 0;    //!< bytes of one head vector (`head_dim * dtype_bytes`)
  std::uint32_t dtype_bytes = 0;   //!< bytes of one element (2 for fp16 / bf16)

  //! Elements per head vector.
  [[nodiscard]] KVX_HOST_DEVICE constexpr std::uint32_t head_dim() const noexcept {
    return dtype_bytes ? head_bytes / dtype_bytes : 0;
  }
  //! Bytes of one token's K (or V), all heads.
  [[nodiscard]] KVX_HOST_DEVICE constexpr std::uint64_t token_bytes() const noexcept {
    return std::uint64_t{kv_heads} * head_bytes;
  }
  //! Bytes of the K (or the V) of one block-layer.
  [[nodiscard]] KVX_HOST_DEVICE constexpr std::uint64_t kv_bytes() const noexcept {
    return token_bytes() * block_tokens;
  }
  //! Bytes of the K and V of one block-layer.
  [[nodiscard]] KVX_HOST_DEVICE constexpr std::uint64_t block_layer_bytes() const noexcept { return 2 * kv_bytes(); }
  //! K and V of a block-layer form one contiguous chunk.
  [[nodiscard]] KVX_HOST_DEVICE constexpr bool kv_contiguous() const noexcept { return kv_stride == kv_bytes(); }

  //! Offset of attention layer `l` (block 0, K).
  [[nodiscard]] KVX_HOST_DEVICE constexpr std::uint64_t layer_offset(std::uint32_t l) const noexcept {
    return layer_stride * l;
  }
  //! Offset of the K of (block `b`, layer `l`); with `kv_contiguous()`, of the whole block-layer chunk.
  [[nodiscard]] KVX_HOST_DEVICE constexpr std::uint64_t chunk_offset(std::uint32_t b, std::uint32_t l) const noexcept {
    return layer_offset(l) + block_stride * b;
  }
  //! Offset of the K (`kv == 0`) or V (`kv == 1`) of (block `b`, layer `l`).
  [[nodiscard]] KVX_HOST_DEVICE constexpr std::uint64_t kv_offset(std::uint32_t b, std::uint32_t l,
                                                                   std::uint32_t kv) const noexcept {
    return chunk_offset(b, l) + kv_stride * kv;
  }
  //! Offset of one head vector.
  [[nodiscard]] KVX_HOST_DEVICE constexpr std::uint64_t element_offset(std::uint32_t l, std::uint32_t kv,
                                                                        std::uint32_t b, std::uint32_t token,
                                                                        std::uint32_t head) const noexcept {
    return kv_offset(b, l, kv) + (std::uint64_t{token} * kv_heads + head) * head_bytes;
  }
  [[nodiscard]] KVX_HOST_DEVICE constexpr std::byte* chunk(std::uint32_t b, std::uint32_t l) const noexcept {
    return base + chunk_offset(b, l);
  }
  [[nodiscard]] KVX_HOST_DEVICE constexpr std::byte* element(std::uint32_t l, std::uint32_t kv, std::uint32_t b,
                                                             std::uint32_t token, std::uint32_t head) const noexcept {
    return base + element_offset(l, kv, b, token, head);
  }
};

//! Which part of each block a kernel moves: attention layers
//! `[layer_begin, layer_end)` (attention-layer indices, as in the view) and
//! heads `[head_begin, head_begin + head_count)`. `all` in `layer_end` or
//! `head_count` means "to the end" (`layers`, `kv_heads - head_begin`).
//!
//! \code
//! kvx::cuda::kv_slice every{};                                     // all layers, all heads
//! kvx::cuda::kv_slice one_layer{.layer_begin = l, .layer_end = l + 1};
//! kvx::cuda::kv_slice upper_half{.head_begin = 4, .head_count = 4};  // TP=1 -> TP=2, rank 1
//! \endcode
struct kv_slice {
  static constexpr std::uint32_t all = 0xffffffffU;
  std::uint32_t layer_begin = 0;
  std::uint32_t layer_end = all;
  std::uint32_t head_begin = 0;
  std::uint32_t head_count = all;

  //! `all` replaced by the view's extents; no range check (the launchers check).
  [[nodiscard]] constexpr kv_slice resolved(const paged_kv_view& v) const noexcept {
    kv_slice s = *this;
    if (s.layer_end == all) s.layer_end = v.layers;
    if (s.head_count == all) s.head_count = v.kv_heads > head_begin ? v.kv_heads - head_begin : 0;
    return s;
  }
  [[nodiscard]] constexpr std::uint32_t layer_count() const noexcept {
    return layer_end > layer_begin ? layer_end - layer_begin : 0;
  }
};

//! Block ids (indices into the view's pool) in device memory: `size` entries
//! at `data`, as engines keep their block tables on the GPU.
struct device_block_ids {
  const std::uint32_t* data = nullptr;
  std::uint32_t size = 0;
};

//! Block ids in host memory, for the convenience overloads of the launchers
//! (checked on the host and passed to the kernels by value).
struct host_block_ids {
  std::span<const std::uint32_t> ids;
};

//! Where kernels report block ids that name no block of the pool (device
//! memory; zero it before use, e.g. with `reset_status`). Such ids are never
//! read or written through; their bytes in the staging buffer are left as
//! they were. Each bad position is counted once per launch.
struct kv_status {
  unsigned int bad_ids = 0;        //!< positions whose id was `>= num_blocks` (summed over launches)
  unsigned int bad_position = 0;   //!< the position of one of them (the first one counted)
  unsigned int bad_id = 0;         //!< the id found there
};

//! Why `v` cannot be used by the kernels, or `nullptr` when it can: every
//! extent is positive, K and V of a block-layer do not overlap, and every
//! chunk lies inside `[base, base + bytes)`. Offsets are computed without
//! overflow. The strides are trusted not to make distinct block-layers alias
//! (`paged_kv_view_of` derives them from a layout, which guarantees it).
[[nodiscard]] constexpr const char* validate(const paged_kv_view& v) noexcept {
  if (v.base == nullptr) return "the view has no base address";
  if (v.layers == 0) return "the view has no attention layer";
  if (v.num_blocks == 0) return "the view has no block";
  if (v.block_tokens == 0 || v.kv_heads == 0 || v.head_bytes == 0 || v.dtype_bytes == 0)
    return "block_tokens, kv_heads, head_bytes and dtype_bytes must be positive";
  if (v.head_bytes % v.dtype_bytes != 0) return "head_bytes is not a multiple of dtype_bytes";
  constexpr std::uint64_t limit = std::uint64_t{1} << 62;
  // Each factor below 2^31 and each product checked against 2^62 before it is
  // used, so the sum below cannot wrap.
  if (v.block_tokens >= (1U << 31) || v.kv_heads >= (1U << 31) || v.head_bytes >= (1U << 31) ||
      v.token_bytes() >= limit || (v.token_bytes() != 0 && v.block_tokens > limit / v.token_bytes()))
    return "one block-layer is larger than 2^62 bytes";
  const std::uint64_t kvb = v.kv_bytes();
  if (v.kv_stride < kvb) return "kv_stride is smaller than the K of a block-layer: K and V would overlap";
  if (v.layer_stride >= limit || v.block_stride >= limit || v.kv_stride >= limit)
    return "a stride is larger than 2^62 bytes";
  if (v.layers > 1 && v.layer_stride > limit / (v.layers - 1)) return "the layers span more than 2^62 bytes";
  if (v.num_blocks > 1 && v.block_stride > limit / (v.num_blocks - 1)) return "the blocks span more than 2^62 bytes";
  const std::uint64_t end = v.layer_stride * (v.layers - 1) + v.block_stride * (v.num_blocks - 1) + v.kv_stride + kvb;
  if (end > v.bytes) return "the view addresses bytes past `base + bytes`";
  return nullptr;
}

}  // namespace kvx::cuda
