#pragma once
//! \file
//! `layouts::layer_first_kv_split`: one tensor per attention layer,
//! `[2][num_blocks][block_tokens][kv_heads][head_dim]` (all K blocks, then all
//! V blocks); the shape of vLLM's FlashAttention backend. Recurrent state
//! follows the KV as in `layer_first`.
//!
//! A block is one strided range of `2 * attention_layers` chunks (its K and
//! its V in each layer), `num_blocks * block_tokens * token_bytes()` apart;
//! one layer of a block is two chunks (one strided range of count 2).
//!
//! Thread safety: an immutable value.
//!
//! \code
//! auto l = kvx::disagg::layouts::layer_first_kv_split::make({.layers = 2, .kv_heads = 4}, 128).value();
//! l.block_ranges(0).front().count;  // 4: K and V of two layers
//! \endcode

#include <cstdint>
#include <string_view>

#include <kvx/disagg/detail/strided_kv_layout.hpp>
#include <kvx/disagg/kv_layout.hpp>

namespace kvx::disagg::layouts {

class layer_first_kv_split : public detail::strided_kv_layout {
 public:
  //! `errc::invalid_argument` when the shape is invalid, `num_blocks` is 0,
  //! or recurrent layers have no state slot.
  static result<layer_first_kv_split> make(kv_shape shape, std::uint32_t num_blocks, std::uint32_t state_slots = 0) {
    KVX_TRY(check_make(shape, num_blocks, state_slots, "layer_first_kv_split"));
    return layer_first_kv_split(std::move(shape), num_blocks, state_slots);
  }
  [[nodiscard]] static constexpr std::string_view name() noexcept { return "layer_first_kv_split"; }

 private:
  layer_first_kv_split(kv_shape shape, std::uint32_t num_blocks, std::uint32_t state_slots)
      : strided_kv_layout(std::move(shape), num_blocks, state_slots, order::layer_kv_block) {}
};

static_assert(check_kv_layout<layer_first_kv_split>());

}  // namespace kvx::disagg::layouts
