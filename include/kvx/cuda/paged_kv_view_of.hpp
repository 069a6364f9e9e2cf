#pragma once
//! \file
//! `paged_kv_view_of(layout, region)`: the `paged_kv_view` kernels use, built
//! from a `kvx::disagg` KV layout and the device region the engine allocated
//! for it. Plain C++ (no CUDA header, no nvcc needed).
//!
//! Any layout whose attention KV is an affine map works: the built-in
//! `layouts::layer_first`, `layouts::page_first` and
//! `layouts::layer_first_kv_split`, and a user layout of the same kind. The
//! strides are read from `layout.offset()` and then checked against it at
//! every layer, the last block, the last token and the last head; a layout
//! that is not such a map (a block table of its own, a swizzle) is refused
//! with `errc::not_supported` rather than addressed wrongly.
//!
//! Recurrent layers of hybrid models are not in the view: the view's layer
//! `l` is the `l`-th *attention* layer (`attention_layer_index()` maps a model
//! layer to it). Recurrent state is one contiguous range per (slot, layer)
//! (`layout.state_offset()`), which `cudaMemcpyAsync` moves as it is.
//!
//! Errors: `errc::invalid_argument` when the region is not device memory
//! (`location::cuda(N)`) or the shape has no attention layer;
//! `errc::out_of_range` when the region is shorter than
//! `layout.bytes_required()`; `errc::not_supported` as above.
//!
//! \code
//! auto layout = kvx::disagg::layouts::layer_first::make(shape, 4096).value();
//! auto gpu = kvx::cuda::device_buffer::allocate(layout.bytes_required(), 0).value();
//! kvx::cuda::paged_kv_view view = kvx::cuda::paged_kv_view_of(layout, gpu.region()).value();
//! \endcode

#include <cstdint>
#include <string>
#include <vector>

#include <kvx/core/error.hpp>
#include <kvx/core/result.hpp>
#include <kvx/cuda/paged_kv_view.hpp>
#include <kvx/disagg/kv_layout.hpp>
#include <kvx/memory/memory_region.hpp>

namespace kvx::cuda {

//! The view's layer index of model layer `layer`: how many attention layers
//! precede it. `errc::invalid_argument` for a recurrent layer,
//! `errc::out_of_range` past the last layer.
[[nodiscard]] inline result<std::uint32_t> attention_layer_index(const disagg::kv_shape& shape, std::uint32_t layer) {
  if (layer >= shape.layers)
    return error{errc::out_of_range,
                 "layer " + std::to_string(layer) + " of a model with " + std::to_string(shape.layers) + " layers"};
  if (!shape.is_attention(layer))
    return error{errc::invalid_argument, "layer " + std::to_string(layer) + " is recurrent: it has no paged KV"};
  std::uint32_t a = 0;
  for (std::uint32_t l = 0; l < layer; ++l) a += shape.is_attention(l) ? 1U : 0U;
  return a;
}

//! The view of `layout`'s paged KV inside `region` (device memory of at least
//! `layout.bytes_required()` bytes). See the file comment for the errors.
template <disagg::kv_layout Layout>
[[nodiscard]] result<paged_kv_view> paged_kv_view_of(const Layout& layout, const memory::memory_region& region) {
  const disagg::kv_shape& s = layout.shape();
  const std::string who = "paged_kv_view_of(" + std::string(layout.name()) + ")";
  if (region.where.kind != memory::location_kind::cuda)
    return error{errc::invalid_argument, who + ": the region is " + region.where.to_string() +
                                             " memory; the kernels address device memory (cuda:N)"};
  if (region.address == nullptr) return error{errc::invalid_argument, who + ": the region has no address"};
  if (region.length < layout.bytes_required())
    return error{errc::out_of_range, who + ": the region holds " + std::to_string(region.length) +
                                         " bytes, the layout needs " + std::to_string(layout.bytes_required())};
  if (s.attention_layers() == 0)
    return error{errc::invalid_argument, who + ": the model has no attention layer, so no paged KV"};

  // Model layer of each attention layer.
  std::vector<std::uint32_t> attn;
  attn.reserve(s.attention_layers());
  for (std::uint32_t l = 0; l < s.layers; ++l)
    if (s.is_attention(l)) attn.push_back(l);

  auto at = [&](std::uint32_t a, std::uint32_t kv, std::uint32_t block, std::uint32_t token, std::uint32_t head,
                std::uint32_t dim) {
    return layout.offset(disagg::kv_coord{attn[a], kv, block, token, head, dim});
  };
  const std::uint64_t origin = at(0, 0, 0, 0, 0, 0);
  auto rel = [&](std::uint64_t off, std::uint64_t& out) {
    if (off < origin) return false;  // a stride pointing backwards: not representable
    out = off - origin;
    return true;
  };

  paged_kv_view v;
  v.base = region.data() + origin;
  v.bytes = region.length - origin;
  v.layers = s.attention_layers();
  v.num_blocks = layout.num_blocks();
  v.block_tokens = s.block_tokens;
  v.kv_heads = s.kv_heads;
  v.head_bytes = static_cast<std::uint32_t>(s.head_bytes());
  v.dtype_bytes = s.dtype_bytes;
  const auto not_affine = [&](const char* what) {
    return error{errc::not_supported, who + ": the layout is not an affine paged layout the kernels can address (" +
                                          what + ")"};
  };
  if (s.head_bytes() >= (std::uint64_t{1} << 31)) return not_affine("a head vector of 2 GiB or more");
  bool ok = rel(at(0, 1, 0, 0, 0, 0), v.kv_stride);
  if (v.layers > 1) ok = ok && rel(at(1, 0, 0, 0, 0, 0), v.layer_stride);
  if (v.num_blocks > 1) ok = ok && rel(at(0, 0, 1, 0, 0, 0), v.block_stride);
  if (!ok) return not_affine("a stride points backwards");
  if (v.layers == 1) v.layer_stride = v.block_layer_bytes() * v.num_blocks;  // unused; any value that validates
  if (v.num_blocks == 1) v.block_stride = v.block_layer_bytes();

  // Check the map where it could differ: each layer's first and last block,
  // the last token, head and element of both K and V.
  if ((v.block_tokens > 1 && at(0, 0, 0, 1, 0, 0) != origin + v.token_bytes()) ||
      (v.kv_heads > 1 && at(0, 0, 0, 0, 1, 0) != origin + v.head_bytes) ||
      (s.head_dim > 1 && at(0, 0, 0, 0, 0, 1) != origin + s.dtype_bytes))
    return not_affine("tokens, heads and elements are not dense inside a block-layer");
  const std::uint32_t lb = v.num_blocks - 1, lt = v.block_tokens - 1, lh = v.kv_heads - 1, ld = s.head_dim - 1;
  for (std::uint32_t a = 0; a < v.layers; ++a)
    for (std::uint32_t kv = 0; kv < 2; ++kv)
      for (std::uint32_t b : {0U, lb}) {
        if (at(a, kv, b, 0, 0, 0) != origin + v.kv_offset(b, a, kv)) return not_affine("block or layer stride");
        if (at(a, kv, b, lt, lh, ld) !=
            origin + v.element_offset(a, kv, b, lt, lh) + std::uint64_t{ld} * s.dtype_bytes)
          return not_affine("tokens, heads and elements are not dense inside a block-layer");
      }
  if (const char* why = validate(v)) return error{errc::out_of_range, who + ": " + why};
  return v;
}

}  // namespace kvx::cuda
