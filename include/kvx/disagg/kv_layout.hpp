#pragma once
//! \file
//! The `kv_layout` concept: how an engine holds its KV cache in memory, as a
//! value that maps coordinates to byte offsets (in the manner of CuTe layouts).
//!
//! A layout describes one tensor-parallel shard's KV pool: `num_blocks()`
//! paged blocks of `shape().block_tokens` tokens, for each attention layer a
//! K and a V entry of `kv_heads` heads of `head_dim` elements of
//! `dtype_bytes` bytes; and beside it `state_slots()` per-request slots of
//! fixed-size recurrent state (`state_bytes` per recurrent layer: the Mamba /
//! linear-attention layers of hybrid models), so such models transfer whole.
//! A layout never owns memory: it says where bytes are inside one region of
//! `bytes_required()` bytes that the engine allocated (and registered).
//!
//! ## Requirements
//!
//! For a type `L`, `l` a `const L`, `c` a `kv_coord`, `b`, `s`, `layer` `std::uint32_t`:
//!
//! | expression | type | semantics |
//! | --- | --- | --- |
//! | `typename L::kv_layout_concept` | `kv_layout_tag` | opts `L` in |
//! | `l.shape()` | `const kv_shape&` | the logical shape (valid: `shape().validate()` succeeds) |
//! | `l.num_blocks()` | `std::uint32_t` | paged blocks in the pool |
//! | `l.state_slots()` | `std::uint32_t` | per-request state slots (0 when the model has no recurrent layer) |
//! | `l.bytes_required()` | `std::uint64_t` | size of the region the layout addresses |
//! | `l.offset(c)` | `std::uint64_t` | byte offset of element `c`. Precondition: `c.layer` is an attention layer, every index in range. Elements of one head vector are contiguous (`offset(dim + 1) == offset(dim) + dtype_bytes`), and distinct coordinates never overlap |
//! | `l.state_offset(s, layer)` | `std::uint64_t` | byte offset of the `state_bytes` contiguous bytes of slot `s` for recurrent layer `layer` |
//! | `l.block_ranges(b)` | `range_list` | every byte of block `b` (all attention layers, K and V), as strided ranges in ascending offset order |
//! | `l.block_layer_ranges(b, layer)` | `range_list` | the bytes of block `b` in one layer (empty for a recurrent layer): what layer-wise streaming sends |
//! | `l.state_ranges(s)` | `range_list` | every state byte of slot `s` |
//! | `l.state_layer_ranges(s, layer)` | `range_list` | the state bytes of slot `s` in one layer (empty for an attention layer) |
//! | `l.name()` | `std::string_view` | a short name for logs and config ("layer_first") |
//!
//! Optional: `static constexpr bool heads_contiguous = true;` promises that
//! within one (layer, K/V, block, token) the heads follow each other with
//! stride `head_dim * dtype_bytes`; `convert()` then copies whole tokens at a
//! time instead of one head vector at a time.
//!
//! Thread safety: layouts are immutable values; any number of threads may
//! call them. Nothing blocks; only the `*_ranges` calls may allocate (more than
//! two ranges).
//!
//! ## A minimal conforming layout
//! The built-in layouts (`layouts::layer_first`, `layouts::page_first`,
//! `layouts::layer_first_kv_split`) are the examples; a user layout
//! typically derives its ranges with `range_builder` (below). `check_kv_layout<L>()` states,
//! one `static_assert` per requirement, what a type that is not a layout lacks.
//!
//! \code
//! auto shape = kvx::disagg::kv_shape{.layers = 4, .block_tokens = 16, .kv_heads = 8, .head_dim = 128, .dtype_bytes = 2};
//! auto l = kvx::disagg::layouts::layer_first::make(shape, /*num_blocks=*/1024).value();
//! std::vector<std::byte> pool(l.bytes_required());
//! for (auto r : l.block_ranges(7))  // one range: 4 chunks of 64 KiB, one per layer
//!   post_write(r.offset, r.length, r.stride, r.count);
//! \endcode

#include <boost/container/small_vector.hpp>

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include <kvx/core/result.hpp>

namespace kvx::disagg {

//! The tag a type names as `kv_layout_concept` to opt in.
struct kv_layout_tag {};

//! What a layer keeps per request: paged K/V (attention) or a fixed-size
//! recurrent state (Mamba, linear attention).
enum class layer_kind : std::uint8_t { attention, recurrent };

//! The logical shape of one shard's KV: what is stored, not where.
struct kv_shape {
  std::uint32_t layers = 1;        //!< all layers, attention and recurrent
  std::uint32_t block_tokens = 16; //!< tokens per paged block
  std::uint32_t kv_heads = 1;      //!< KV heads held by this shard
  std::uint32_t head_dim = 64;     //!< elements per head vector
  std::uint32_t dtype_bytes = 2;   //!< bytes per element (2: bf16/fp16, 4: fp32)
  std::uint64_t state_bytes = 0;   //!< recurrent state per recurrent layer per request, this shard
  std::vector<layer_kind> kinds{}; //!< one per layer; empty means every layer is attention

  [[nodiscard]] layer_kind kind(std::uint32_t layer) const noexcept {
    return kinds.empty() ? layer_kind::attention : kinds[layer];
  }
  [[nodiscard]] bool is_attention(std::uint32_t layer) const noexcept { return kind(layer) == layer_kind::attention; }
  [[nodiscard]] std::uint32_t attention_layers() const noexcept {
    std::uint32_t n = 0;
    for (std::uint32_t l = 0; l < layers; ++l) n += is_attention(l) ? 1U : 0U;
    return n;
  }
  [[nodiscard]] std::uint32_t recurrent_layers() const noexcept { return layers - attention_layers(); }
  //! Bytes of one head vector.
  [[nodiscard]] std::uint64_t head_bytes() const noexcept { return std::uint64_t{head_dim} * dtype_bytes; }
  //! Bytes of one token's K (or V) in one layer, all heads.
  [[nodiscard]] std::uint64_t token_bytes() const noexcept { return head_bytes() * kv_heads; }
  //! Bytes of one block's K and V in one attention layer.
  [[nodiscard]] std::uint64_t block_layer_bytes() const noexcept { return 2 * token_bytes() * block_tokens; }
  //! Bytes of one block over all attention layers.
  [[nodiscard]] std::uint64_t block_bytes() const noexcept { return block_layer_bytes() * attention_layers(); }
  //! Bytes of one request's recurrent state over all recurrent layers.
  [[nodiscard]] std::uint64_t request_state_bytes() const noexcept { return state_bytes * recurrent_layers(); }

  //! `errc::invalid_argument`, naming the field, unless every size is positive,
  //! `kinds` is empty or has one entry per layer, recurrent layers have state,
  //! one block of one layer is at most 1 TiB and every size above fits 64 bits.
  [[nodiscard]] result<void> validate() const {
    auto bad = [](std::string what) { return error{errc::invalid_argument, "kv_shape: " + std::move(what)}; };
    if (layers == 0) return bad("layers must be positive");
    if (block_tokens == 0) return bad("block_tokens must be positive");
    if (kv_heads == 0) return bad("kv_heads must be positive");
    if (head_dim == 0) return bad("head_dim must be positive");
    if (dtype_bytes == 0) return bad("dtype_bytes must be positive");
    if (!kinds.empty() && kinds.size() != layers)
      return bad("kinds has " + std::to_string(kinds.size()) + " entries for " + std::to_string(layers) + " layers");
    const std::uint32_t attention = attention_layers(), recurrent = layers - attention;  // one pass: layers may be many
    if (recurrent > 0 && state_bytes == 0) return bad("recurrent layers need state_bytes > 0");
    // Keep every offset inside 64 bits (and far inside): a shape this large is
    // a typo. Each product is checked as it is formed, since a wrapped one
    // (2^64 -> 0) would pass any bound checked afterwards.
    auto dims = [&] {
      return "head_dim x dtype_bytes x kv_heads x 2 x block_tokens (" + std::to_string(head_dim) + " x " + std::to_string(dtype_bytes) +
             " x " + std::to_string(kv_heads) + " x 2 x " + std::to_string(block_tokens) + ")";
    };
    std::uint64_t bytes = head_bytes();  // two 32-bit factors cannot overflow
    if (__builtin_mul_overflow(bytes, std::uint64_t{kv_heads}, &bytes) || __builtin_mul_overflow(bytes, std::uint64_t{2}, &bytes) ||
        __builtin_mul_overflow(bytes, std::uint64_t{block_tokens}, &bytes))
      return bad(dims() + " overflows 64 bits");
    if (bytes > (std::uint64_t{1} << 40)) return bad(dims() + ": one block of one layer exceeds 1 TiB");
    const std::uint64_t layer_bytes = bytes;
    if (__builtin_mul_overflow(layer_bytes, std::uint64_t{attention}, &bytes))
      return bad("one block over all attention layers (" + std::to_string(attention) + " x " + std::to_string(layer_bytes) +
                 " bytes) overflows 64 bits");
    if (__builtin_mul_overflow(state_bytes, std::uint64_t{recurrent}, &bytes))
      return bad("state_bytes x recurrent layers (" + std::to_string(state_bytes) + " x " + std::to_string(recurrent) +
                 ") overflows 64 bits");
    return {};
  }

  friend bool operator==(const kv_shape&, const kv_shape&) = default;
};

//! One element of the paged KV: `kv` is 0 for K, 1 for V; `token` is the
//! position inside the block; `head` is the shard-local head.
struct kv_coord {
  std::uint32_t layer = 0;
  std::uint32_t kv = 0;
  std::uint32_t block = 0;
  std::uint32_t token = 0;
  std::uint32_t head = 0;
  std::uint32_t dim = 0;
};

//! `count` chunks of `length` bytes, the i-th at `offset + i * stride`: the
//! descriptor the transfer engine takes (a contiguous range has `count == 1`).
struct strided_range {
  std::uint64_t offset = 0;
  std::uint64_t length = 0;
  std::uint64_t stride = 0;
  std::uint64_t count = 1;

  //! Total bytes described.
  [[nodiscard]] std::uint64_t bytes() const noexcept { return length * count; }
  //! Offset of chunk `i`.
  [[nodiscard]] std::uint64_t chunk(std::uint64_t i) const noexcept { return offset + i * stride; }
  friend bool operator==(const strided_range&, const strided_range&) = default;
};

//! A short list of strided ranges; up to two live inline (every built-in
//! layout describes a block with one).
using range_list = boost::container::small_vector<strided_range, 2>;

//! Total bytes of a list of ranges.
[[nodiscard]] inline std::uint64_t total_bytes(const range_list& ranges) noexcept {
  std::uint64_t n = 0;
  for (const auto& r : ranges) n += r.bytes();
  return n;
}

//! Builds a `range_list` from chunks appended in ascending offset order:
//! touching chunks merge into one, then runs of equal-length chunks at a
//! constant stride fold into one strided range (merging goes first: K then V
//! of a block are one chunk, not two). How a custom layout computes its ranges.
//!
//! \code
//! kvx::disagg::range_builder b;
//! for (std::uint32_t l = 0; l < layers; ++l) b.add(layer_base(l) + block * chunk, chunk);
//! kvx::disagg::range_list ranges = b.finish();  // one strided range
//! \endcode
class range_builder {
 public:
  void add(std::uint64_t offset, std::uint64_t length) {
    if (length == 0) return;
    if (!chunks_.empty() && chunks_.back().offset + chunks_.back().length == offset) {
      chunks_.back().length += length;
      return;
    }
    chunks_.push_back({offset, length, 0, 1});
  }
  [[nodiscard]] range_list finish() const {
    range_list out;
    for (const auto& c : chunks_) {
      if (!out.empty()) {
        auto& r = out.back();
        if (r.length == c.length && c.offset > r.offset) {
          if (r.count == 1) {
            r.stride = c.offset - r.offset;
            r.count = 2;
            continue;
          }
          if (c.offset == r.offset + r.stride * r.count) {
            ++r.count;
            continue;
          }
        }
      }
      out.push_back(c);
    }
    for (auto& r : out)
      if (r.count == 1) r.stride = r.length;
    return out;
  }

 private:
  boost::container::small_vector<strided_range, 8> chunks_;
};

namespace detail {
template <class L>
concept has_layout_tag = requires { typename L::kv_layout_concept; } &&
                         std::same_as<typename L::kv_layout_concept, kv_layout_tag>;
template <class L>
concept has_shape = requires(const L& l) {
  { l.shape() } -> std::same_as<const kv_shape&>;
};
template <class L>
concept has_sizes = requires(const L& l) {
  { l.num_blocks() } -> std::same_as<std::uint32_t>;
  { l.state_slots() } -> std::same_as<std::uint32_t>;
  { l.bytes_required() } -> std::same_as<std::uint64_t>;
};
template <class L>
concept has_offset = requires(const L& l, const kv_coord& c) {
  { l.offset(c) } -> std::same_as<std::uint64_t>;
};
template <class L>
concept has_state_offset = requires(const L& l, std::uint32_t s) {
  { l.state_offset(s, s) } -> std::same_as<std::uint64_t>;
};
template <class L>
concept has_block_ranges = requires(const L& l, std::uint32_t b) {
  { l.block_ranges(b) } -> std::same_as<range_list>;
  { l.block_layer_ranges(b, b) } -> std::same_as<range_list>;
};
template <class L>
concept has_state_ranges = requires(const L& l, std::uint32_t s) {
  { l.state_ranges(s) } -> std::same_as<range_list>;
  { l.state_layer_ranges(s, s) } -> std::same_as<range_list>;
};
template <class L>
concept has_name = requires(const L& l) {
  { l.name() } -> std::convertible_to<std::string_view>;
};
}  // namespace detail

//! `L` describes where an engine keeps its KV; see the requirements table above.
template <class L>
concept kv_layout = detail::has_layout_tag<L> && std::copy_constructible<L> && detail::has_shape<L> &&
                    detail::has_sizes<L> && detail::has_offset<L> && detail::has_state_offset<L> &&
                    detail::has_block_ranges<L> && detail::has_state_ranges<L> && detail::has_name<L>;

//! True when `L` promises contiguous heads inside a token (see above).
template <class L>
inline constexpr bool heads_contiguous_v = [] {
  if constexpr (requires { L::heads_contiguous; })
    return static_cast<bool>(L::heads_contiguous);
  else
    return false;
}();

//! Fails to compile, with one sentence per missing requirement, unless `L` is
//! a KV layout. Returns true so it can sit in a `static_assert`.
template <class L>
constexpr bool check_kv_layout() {
  static_assert(detail::has_layout_tag<L>,
                "kvx: KV layout L lacks `using kv_layout_concept = kvx::disagg::kv_layout_tag;`");
  static_assert(std::copy_constructible<L>, "kvx: KV layout L is not copy constructible (layouts are values)");
  static_assert(detail::has_shape<L>, "kvx: KV layout L lacks shape() const -> const kv_shape&");
  static_assert(detail::has_sizes<L>,
                "kvx: KV layout L lacks num_blocks(), state_slots() -> std::uint32_t or bytes_required() -> std::uint64_t");
  static_assert(detail::has_offset<L>, "kvx: KV layout L lacks offset(const kv_coord&) const -> std::uint64_t");
  static_assert(detail::has_state_offset<L>,
                "kvx: KV layout L lacks state_offset(std::uint32_t slot, std::uint32_t layer) const -> std::uint64_t");
  static_assert(detail::has_block_ranges<L>,
                "kvx: KV layout L lacks block_ranges(block) or block_layer_ranges(block, layer) const -> range_list");
  static_assert(detail::has_state_ranges<L>,
                "kvx: KV layout L lacks state_ranges(slot) or state_layer_ranges(slot, layer) const -> range_list");
  static_assert(detail::has_name<L>, "kvx: KV layout L lacks name() const -> std::string_view");
  return kv_layout<L>;
}

}  // namespace kvx::disagg
