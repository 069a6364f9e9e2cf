#pragma once
//! \file
//! `layouts::layer_first`: one tensor per attention layer,
//! `[num_blocks][2][block_tokens][kv_heads][head_dim]` (K then V inside a
//! block), the layers one after another; the shape vLLM's FlashInfer backend
//! and most paged-attention kernels use. Recurrent state follows the KV, one
//! tensor per recurrent layer: `[state_slots][state_bytes]`.
//!
//! A block is one strided range: one chunk of `block_layer_bytes()` per
//! attention layer, `num_blocks * block_layer_bytes()` apart. One layer of a
//! block is one contiguous chunk (what layer-wise streaming sends).
//!
//! Thread safety: an immutable value.
//!
//! \code
//! auto l = kvx::disagg::layouts::layer_first::make({.layers = 2, .kv_heads = 4, .head_dim = 64}, 128).value();
//! l.block_ranges(3);  // {offset = 3 * 16 KiB, length = 16 KiB, stride = 2 MiB, count = 2}
//! \endcode

#include <cstdint>
#include <string_view>

#include <kvx/disagg/detail/strided_kv_layout.hpp>
#include <kvx/disagg/kv_layout.hpp>

namespace kvx::disagg::layouts {

class layer_first : public detail::strided_kv_layout {
 public:
  //! `errc::invalid_argument` when the shape is invalid, `num_blocks` is 0,
  //! or recurrent layers have no state slot.
  static result<layer_first> make(kv_shape shape, std::uint32_t num_blocks, std::uint32_t state_slots = 0) {
    KVX_TRY(check_make(shape, num_blocks, state_slots, "layer_first"));
    return layer_first(std::move(shape), num_blocks, state_slots);
  }
  [[nodiscard]] static constexpr std::string_view name() noexcept { return "layer_first"; }

 private:
  layer_first(kv_shape shape, std::uint32_t num_blocks, std::uint32_t state_slots)
      : strided_kv_layout(std::move(shape), num_blocks, state_slots, order::layer_block_kv) {}
};

static_assert(check_kv_layout<layer_first>());

}  // namespace kvx::disagg::layouts
