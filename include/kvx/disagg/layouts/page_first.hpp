#pragma once
//! \file
//! `layouts::page_first`: `[num_blocks][attention_layers][2][block_tokens][kv_heads][head_dim]`,
//! every byte of a block in one place; the host-pool shape of SGLang HiCache
//! and LMCache, where whole pages move between tiers and machines. Recurrent
//! state follows the KV slot-major, `[state_slots][recurrent_layers][state_bytes]`,
//! so one request's state is one contiguous range too.
//!
//! A block is one contiguous range of `block_bytes()`; one layer of a block is
//! one contiguous chunk inside it.
//!
//! Thread safety: an immutable value.
//!
//! \code
//! auto l = kvx::disagg::layouts::page_first::make({.layers = 2, .kv_heads = 4, .head_dim = 64}, 128).value();
//! l.block_ranges(3);  // {offset = 3 * 32 KiB, length = 32 KiB, count = 1}
//! \endcode

#include <cstdint>
#include <string_view>

#include <kvx/disagg/detail/strided_kv_layout.hpp>
#include <kvx/disagg/kv_layout.hpp>

namespace kvx::disagg::layouts {

class page_first : public detail::strided_kv_layout {
 public:
  //! `errc::invalid_argument` when the shape is invalid, `num_blocks` is 0,
  //! or recurrent layers have no state slot.
  static result<page_first> make(kv_shape shape, std::uint32_t num_blocks, std::uint32_t state_slots = 0) {
    KVX_TRY(check_make(shape, num_blocks, state_slots, "page_first"));
    return page_first(std::move(shape), num_blocks, state_slots);
  }
  [[nodiscard]] static constexpr std::string_view name() noexcept { return "page_first"; }

 private:
  page_first(kv_shape shape, std::uint32_t num_blocks, std::uint32_t state_slots)
      : strided_kv_layout(std::move(shape), num_blocks, state_slots, order::block_layer_kv) {}
};

static_assert(check_kv_layout<page_first>());

}  // namespace kvx::disagg::layouts
