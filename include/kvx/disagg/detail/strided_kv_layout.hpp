#pragma once
// The common machinery of the built-in layouts: every one of them is an
// affine map (a stride per mode) that differs only in the order of the modes,
// so the offsets and the range lists are computed once, here.

#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

#include <kvx/disagg/kv_layout.hpp>

namespace kvx::disagg::detail {

//! Strides of the five outer modes; tokens, heads and dims are always dense
//! inside a (layer, K/V, block) chunk in the built-in layouts.
struct kv_strides {
  std::uint64_t layer = 0;  // between attention layers (by attention index)
  std::uint64_t kv = 0;     // between K and V
  std::uint64_t block = 0;  // between blocks
  friend bool operator==(const kv_strides&, const kv_strides&) = default;
};
struct state_strides {
  std::uint64_t layer = 0;  // between recurrent layers (by recurrent index)
  std::uint64_t slot = 0;   // between request slots
  friend bool operator==(const state_strides&, const state_strides&) = default;
};

//! Base of the built-in layouts. `Derived` supplies the strides through its
//! constructor; everything else is shared.
class strided_kv_layout {
 public:
  using kv_layout_concept = kv_layout_tag;
  static constexpr bool heads_contiguous = true;

  [[nodiscard]] const kv_shape& shape() const noexcept { return shape_; }
  [[nodiscard]] std::uint32_t num_blocks() const noexcept { return num_blocks_; }
  [[nodiscard]] std::uint32_t state_slots() const noexcept { return state_slots_; }
  [[nodiscard]] std::uint64_t bytes_required() const noexcept { return kv_bytes_ + state_region_bytes_; }
  //! Bytes of the paged KV part; the state region starts here.
  [[nodiscard]] std::uint64_t kv_region_bytes() const noexcept { return kv_bytes_; }

  [[nodiscard]] std::uint64_t offset(const kv_coord& c) const noexcept {
    return kv_.layer * attn_index_[c.layer] + kv_.kv * c.kv + kv_.block * c.block +
           shape_.token_bytes() * c.token + shape_.head_bytes() * c.head + std::uint64_t{shape_.dtype_bytes} * c.dim;
  }
  [[nodiscard]] std::uint64_t state_offset(std::uint32_t slot, std::uint32_t layer) const noexcept {
    return kv_bytes_ + st_.layer * rec_index_[layer] + st_.slot * slot;
  }

  [[nodiscard]] range_list block_ranges(std::uint32_t block) const {
    range_builder b;
    add_block_chunks(b, block);
    return b.finish();
  }
  [[nodiscard]] range_list block_layer_ranges(std::uint32_t block, std::uint32_t layer) const {
    range_builder b;
    if (shape_.is_attention(layer)) add_block_layer_chunks(b, block, layer);
    return b.finish();
  }
  [[nodiscard]] range_list state_ranges(std::uint32_t slot) const {
    range_builder b;
    // Both state orders put a slot's layers at ascending offsets.
    for (std::uint32_t l = 0; l < shape_.layers; ++l)
      if (!shape_.is_attention(l)) b.add(state_offset(slot, l), shape_.state_bytes);
    return b.finish();
  }
  [[nodiscard]] range_list state_layer_ranges(std::uint32_t slot, std::uint32_t layer) const {
    range_builder b;
    if (!shape_.is_attention(layer)) b.add(state_offset(slot, layer), shape_.state_bytes);
    return b.finish();
  }

  friend bool operator==(const strided_kv_layout&, const strided_kv_layout&) = default;

 protected:
  enum class order : std::uint8_t { layer_block_kv, layer_kv_block, block_layer_kv };

  strided_kv_layout(kv_shape shape, std::uint32_t num_blocks, std::uint32_t state_slots, order o)
      : shape_(std::move(shape)), num_blocks_(num_blocks), state_slots_(state_slots) {
    const std::uint64_t chunk = shape_.token_bytes() * shape_.block_tokens;
    const std::uint64_t attn = shape_.attention_layers();
    const std::uint64_t rec = shape_.recurrent_layers();
    switch (o) {
      case order::layer_block_kv:  // [layer][block][kv][token][head][dim]
        kv_ = {2 * chunk * num_blocks, chunk, 2 * chunk};
        st_ = {shape_.state_bytes * state_slots, shape_.state_bytes};
        break;
      case order::layer_kv_block:  // [layer][kv][block][token][head][dim]
        kv_ = {2 * chunk * num_blocks, chunk * num_blocks, chunk};
        st_ = {shape_.state_bytes * state_slots, shape_.state_bytes};
        break;
      case order::block_layer_kv:  // [block][layer][kv][token][head][dim]
        kv_ = {2 * chunk, chunk, 2 * chunk * attn};
        st_ = {shape_.state_bytes, shape_.state_bytes * rec};
        break;
    }
    kv_bytes_ = 2 * chunk * attn * num_blocks;
    state_region_bytes_ = shape_.state_bytes * rec * state_slots;
    attn_index_.assign(shape_.layers, 0);
    rec_index_.assign(shape_.layers, 0);
    std::uint32_t a = 0, r = 0;
    for (std::uint32_t l = 0; l < shape_.layers; ++l) {
      if (shape_.is_attention(l))
        attn_index_[l] = a++;
      else
        rec_index_[l] = r++;
    }
  }

  //! The checks every built-in `make()` runs before constructing.
  static result<void> check_make(const kv_shape& shape, std::uint32_t num_blocks, std::uint32_t state_slots,
                                 std::string_view who) {
    KVX_TRY(shape.validate());
    if (num_blocks == 0) return error{errc::invalid_argument, std::string(who) + ": num_blocks must be positive"};
    if (shape.recurrent_layers() > 0 && state_slots == 0)
      return error{errc::invalid_argument,
                   std::string(who) + ": the shape has recurrent layers, so state_slots must be positive"};
    const long double total = static_cast<long double>(shape.block_bytes()) * num_blocks +
                              static_cast<long double>(shape.request_state_bytes()) * state_slots;
    if (total > static_cast<long double>(std::numeric_limits<std::uint64_t>::max() / 2))
      return error{errc::invalid_argument, std::string(who) + ": the pool does not fit in 63 bits of offsets"};
    return {};
  }

 private:
  void add_block_layer_chunks(range_builder& b, std::uint32_t block, std::uint32_t layer) const {
    const std::uint64_t chunk = shape_.token_bytes() * shape_.block_tokens;
    const std::uint64_t k = kv_.layer * attn_index_[layer] + kv_.block * block;
    b.add(k, chunk);
    b.add(k + kv_.kv, chunk);
  }
  void add_block_chunks(range_builder& b, std::uint32_t block) const {
    for (std::uint32_t l = 0; l < shape_.layers; ++l)
      if (shape_.is_attention(l)) add_block_layer_chunks(b, block, l);
  }

  kv_shape shape_;
  std::uint32_t num_blocks_ = 0;
  std::uint32_t state_slots_ = 0;
  kv_strides kv_{};
  state_strides st_{};
  std::uint64_t kv_bytes_ = 0;
  std::uint64_t state_region_bytes_ = 0;
  std::vector<std::uint32_t> attn_index_;
  std::vector<std::uint32_t> rec_index_;
};

}  // namespace kvx::disagg::detail
