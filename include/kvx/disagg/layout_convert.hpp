#pragma once
//! \file
//! CPU conversion of KV between layouts: copy the KV of one request (a token
//! range, addressed through block tables) from layout A in memory X to layout
//! B in memory Y, across tensor-parallel head sharding changes (prefill TP=2
//! into decode TP=1 merges two shards; TP=1 into TP=2 splits one), across
//! block sizes (16-token blocks into 32-token blocks and back, with a partial
//! last block), and with the per-request recurrent state of hybrid models.
//!
//! A *view* names one shard of one request: its layout, its memory (a host
//! region of at least `layout.bytes_required()` bytes), its block table
//! (`block_table[i]` holds tokens `[i * block_tokens, (i + 1) * block_tokens)`,
//! as in vLLM), the global index of its first KV head, and its state slot.
//! Every destination head must be held by some source shard; bytes outside
//! the token range (the tail of a partial last block) are left untouched.
//!
//! Recurrent state is treated as head-major and sharded like the heads: a
//! shard holding heads `[a, b)` of `H` holds state bytes
//! `[a * S / H, b * S / H)` of the global `S` bytes per layer (Mamba-2's SSM
//! state, `[heads][head_dim][d_state]`, is such a state). An engine whose state
//! shards differently converts its state itself.
//!
//! Thread safety: a call reads the sources and writes the destinations only;
//! concurrent calls are safe when their destination bytes do not overlap.
//! Nothing blocks. CUDA kernels for device memory come with the CUDA backend.
//!
//! \code
//! using namespace kvx::disagg;
//! // Prefill ran TP=2 (heads 0-3 and 4-7), decode runs TP=1 with all 8 heads.
//! kv_source<layouts::layer_first> p0{&pl, shard0_mem, table, 0}, p1{&pl, shard1_mem, table, 4};
//! kv_target<layouts::page_first> d{&dl, decode_mem, decode_table, 0};
//! auto stats = convert<layouts::layer_first, layouts::page_first>({{p0, p1}}, {{d}}, {0, prompt_len});
//! \endcode

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <vector>

#include <kvx/core/result.hpp>
#include <kvx/disagg/kv_layout.hpp>

namespace kvx::disagg {

//! "This view has no recurrent state slot."
inline constexpr std::uint32_t no_state_slot = UINT32_MAX;

//! A half-open range of token positions `[begin, end)`.
struct token_range {
  std::uint32_t begin = 0;
  std::uint32_t end = 0;
  [[nodiscard]] std::uint32_t size() const noexcept { return end > begin ? end - begin : 0; }
};

//! One shard of one request, read side.
template <kv_layout Layout>
struct kv_source {
  const Layout* layout = nullptr;
  std::span<const std::byte> memory{};
  std::span<const std::uint32_t> block_table{};
  std::uint32_t head_begin = 0;               //!< global index of this shard's head 0
  std::uint32_t state_slot = no_state_slot;   //!< the request's state slot, if the model has state
};

//! One shard of one request, write side.
template <kv_layout Layout>
struct kv_target {
  const Layout* layout = nullptr;
  std::span<std::byte> memory{};
  std::span<const std::uint32_t> block_table{};
  std::uint32_t head_begin = 0;
  std::uint32_t state_slot = no_state_slot;
};

//! What to copy besides the token range.
struct convert_options {
  std::uint32_t layer_begin = 0;          //!< first layer (layer-wise streaming converts one layer at a time)
  std::uint32_t layer_end = UINT32_MAX;   //!< one past the last layer; clamped to the shape
  bool copy_kv = true;                    //!< copy the paged K/V of attention layers
  bool copy_state = true;                 //!< copy recurrent state (needs state slots on both sides)
};

//! What a conversion did.
struct convert_stats {
  std::uint64_t bytes = 0;   //!< bytes written
  std::uint64_t copies = 0;  //!< memcpy calls after coalescing (a measure of fragmentation)
};

namespace detail {

//! Coalesces consecutive copies whose source and destination both continue
//! where the previous copy ended, so dense layouts copy in large memcpys.
class coalescing_copier {
 public:
  coalescing_copier(const std::byte* src, std::byte* dst) : src_(src), dst_(dst) {}
  void copy(std::uint64_t src_off, std::uint64_t dst_off, std::uint64_t len) {
    if (len_ != 0 && src_off == s_ + len_ && dst_off == d_ + len_) {
      len_ += len;
      return;
    }
    flush();
    s_ = src_off;
    d_ = dst_off;
    len_ = len;
  }
  void flush() {
    if (len_ == 0) return;
    std::memcpy(dst_ + d_, src_ + s_, static_cast<std::size_t>(len_));
    stats_.bytes += len_;
    ++stats_.copies;
    len_ = 0;
  }
  [[nodiscard]] const convert_stats& stats() const noexcept { return stats_; }

 private:
  const std::byte* src_;
  std::byte* dst_;
  std::uint64_t s_ = 0, d_ = 0, len_ = 0;
  convert_stats stats_{};
};

template <class View>
result<void> check_view(const View& v, const char* side, std::size_t index, token_range tokens,
                        const convert_options& opt) {
  const std::string who = std::string("convert: ") + side + " shard " + std::to_string(index);
  if (v.layout == nullptr) return error{errc::invalid_argument, who + " has no layout"};
  const auto& l = *v.layout;
  const kv_shape& s = l.shape();
  if (v.memory.size() < l.bytes_required())
    return error{errc::out_of_range, who + " memory holds " + std::to_string(v.memory.size()) + " bytes, the " +
                                         std::string(l.name()) + " layout needs " +
                                         std::to_string(l.bytes_required())};
  if (opt.copy_kv && s.attention_layers() > 0 && tokens.size() > 0) {
    const std::uint64_t need = (std::uint64_t{tokens.end} + s.block_tokens - 1) / s.block_tokens;
    if (v.block_table.size() < need)
      return error{errc::out_of_range, who + " block table covers " +
                                           std::to_string(v.block_table.size() * std::uint64_t{s.block_tokens}) +
                                           " tokens, the range ends at " + std::to_string(tokens.end)};
    for (std::uint64_t i = tokens.begin / s.block_tokens; i < need; ++i)
      if (v.block_table[i] >= l.num_blocks())
        return error{errc::out_of_range, who + " block table entry " + std::to_string(i) + " names block " +
                                             std::to_string(v.block_table[i]) + " of " +
                                             std::to_string(l.num_blocks())};
  }
  if (opt.copy_state && s.recurrent_layers() > 0 && v.state_slot >= l.state_slots())
    return error{errc::out_of_range, who + " state slot " +
                                         (v.state_slot == no_state_slot ? std::string("is not set")
                                                                        : std::to_string(v.state_slot)) +
                                         " but the layout has " + std::to_string(l.state_slots()) + " slots"};
  return {};
}

inline result<void> check_compatible(const kv_shape& a, const kv_shape& b, const std::string& what) {
  auto bad = [&](const std::string& field, std::uint64_t x, std::uint64_t y) {
    return error{errc::invalid_argument,
                 "convert: " + what + " disagree on " + field + " (" + std::to_string(x) + " vs " + std::to_string(y) + ")"};
  };
  if (a.layers != b.layers) return bad("layers", a.layers, b.layers);
  if (a.head_dim != b.head_dim) return bad("head_dim", a.head_dim, b.head_dim);
  if (a.dtype_bytes != b.dtype_bytes) return bad("dtype_bytes", a.dtype_bytes, b.dtype_bytes);
  for (std::uint32_t l = 0; l < a.layers; ++l)
    if (a.kind(l) != b.kind(l))
      return error{errc::invalid_argument, "convert: " + what + " disagree on the kind of layer " + std::to_string(l)};
  return {};
}

}  // namespace detail

//! Copies the KV (and state) of `tokens` from the source shards to the
//! destination shards. Errors (`invalid_argument`: incompatible shapes,
//! uncovered heads; `out_of_range`: short memory or block table, bad block
//! id or state slot) are reported before any byte is written.
template <kv_layout Src, kv_layout Dst>
result<convert_stats> convert(std::span<const kv_source<Src>> src, std::span<const kv_target<Dst>> dst,
                              token_range tokens, const convert_options& opt = {}) {
  if (src.empty() || dst.empty()) return error{errc::invalid_argument, "convert: no source or no destination shard"};
  if (tokens.end < tokens.begin) return error{errc::invalid_argument, "convert: token range ends before it begins"};
  for (std::size_t i = 0; i < src.size(); ++i) KVX_TRY(detail::check_view(src[i], "source", i, tokens, opt));
  for (std::size_t i = 0; i < dst.size(); ++i) KVX_TRY(detail::check_view(dst[i], "destination", i, tokens, opt));
  const kv_shape& s0 = src[0].layout->shape();
  const kv_shape& d0 = dst[0].layout->shape();
  for (std::size_t i = 1; i < src.size(); ++i) {
    KVX_TRY(detail::check_compatible(s0, src[i].layout->shape(), "source shards"));
    if (src[i].layout->shape().block_tokens != s0.block_tokens)
      return error{errc::invalid_argument, "convert: source shards disagree on block_tokens"};
  }
  for (std::size_t i = 1; i < dst.size(); ++i) {
    KVX_TRY(detail::check_compatible(d0, dst[i].layout->shape(), "destination shards"));
    if (dst[i].layout->shape().block_tokens != d0.block_tokens)
      return error{errc::invalid_argument, "convert: destination shards disagree on block_tokens"};
  }
  KVX_TRY(detail::check_compatible(s0, d0, "source and destination"));

  // Every destination head must come from some source shard.
  for (std::size_t di = 0; di < dst.size(); ++di) {
    const std::uint32_t begin = dst[di].head_begin, end = begin + dst[di].layout->shape().kv_heads;
    std::vector<bool> covered(end - begin, false);
    for (const auto& s : src) {
      const std::uint32_t a = std::max(begin, s.head_begin), b = std::min(end, s.head_begin + s.layout->shape().kv_heads);
      for (std::uint32_t h = a; h < b; ++h) covered[h - begin] = true;
    }
    for (std::uint32_t h = begin; h < end; ++h)
      if (!covered[h - begin])
        return error{errc::invalid_argument, "convert: destination shard " + std::to_string(di) + " head " +
                                                 std::to_string(h) + " is held by no source shard"};
  }

  // Recurrent state is split in proportion to heads; both sides must agree on
  // the bytes per head unless one whole shard maps onto one whole shard.
  const bool state = opt.copy_state && s0.recurrent_layers() > 0;
  const bool whole_state = src.size() == 1 && dst.size() == 1 && s0.kv_heads == d0.kv_heads &&
                           src[0].head_begin == dst[0].head_begin;
  if (state && !whole_state) {
    for (const auto* sh : {&s0, &d0})
      if (sh->state_bytes % sh->kv_heads != 0)
        return error{errc::invalid_argument, "convert: state_bytes " + std::to_string(sh->state_bytes) +
                                                 " does not split over " + std::to_string(sh->kv_heads) +
                                                 " heads, so state cannot be resharded"};
    if (s0.state_bytes / s0.kv_heads != d0.state_bytes / d0.kv_heads)
      return error{errc::invalid_argument, "convert: source and destination disagree on state bytes per head"};
  }
  if (state && whole_state && s0.state_bytes != d0.state_bytes)
    return error{errc::invalid_argument, "convert: source and destination disagree on state_bytes"};

  const std::uint32_t layer_end = std::min(opt.layer_end, s0.layers);
  const std::uint64_t hb = s0.head_bytes();
  convert_stats total{};
  for (const auto& d : dst) {
    const Dst& dl = *d.layout;
    const std::uint32_t dbt = dl.shape().block_tokens;
    const std::uint32_t dh0 = d.head_begin, dh1 = dh0 + dl.shape().kv_heads;
    for (const auto& s : src) {
      const Src& sl = *s.layout;
      const std::uint32_t sbt = sl.shape().block_tokens;
      const std::uint32_t h0 = std::max(dh0, s.head_begin), h1 = std::min(dh1, s.head_begin + sl.shape().kv_heads);
      if (h0 >= h1) continue;
      detail::coalescing_copier cp(s.memory.data(), d.memory.data());
      for (std::uint32_t layer = opt.layer_begin; layer < layer_end; ++layer) {
        if (s0.is_attention(layer)) {
          if (!opt.copy_kv) continue;
          for (std::uint32_t kv = 0; kv < 2; ++kv)
            for (std::uint32_t t = tokens.begin; t < tokens.end; ++t) {
              kv_coord sc{layer, kv, s.block_table[t / sbt], t % sbt, h0 - s.head_begin, 0};
              kv_coord dc{layer, kv, d.block_table[t / dbt], t % dbt, h0 - dh0, 0};
              if constexpr (heads_contiguous_v<Src> && heads_contiguous_v<Dst>) {
                cp.copy(sl.offset(sc), dl.offset(dc), hb * (h1 - h0));
              } else {
                for (std::uint32_t h = 0; h < h1 - h0; ++h, ++sc.head, ++dc.head)
                  cp.copy(sl.offset(sc), dl.offset(dc), hb);
              }
            }
        } else if (state) {
          std::uint64_t so = sl.state_offset(s.state_slot, layer), dof = dl.state_offset(d.state_slot, layer);
          std::uint64_t len = s0.state_bytes;
          if (!whole_state) {
            const std::uint64_t per_head = s0.state_bytes / s0.kv_heads;
            so += (h0 - s.head_begin) * per_head;
            dof += (h0 - dh0) * per_head;
            len = (h1 - h0) * per_head;
          }
          cp.copy(so, dof, len);
        }
      }
      cp.flush();
      total.bytes += cp.stats().bytes;
      total.copies += cp.stats().copies;
    }
  }
  return total;
}

//! One shard to one shard.
template <kv_layout Src, kv_layout Dst>
result<convert_stats> convert(const kv_source<Src>& src, const kv_target<Dst>& dst, token_range tokens,
                              const convert_options& opt = {}) {
  return convert<Src, Dst>(std::span<const kv_source<Src>>(&src, 1), std::span<const kv_target<Dst>>(&dst, 1), tokens,
                           opt);
}

//! Copies whole blocks: `src_blocks[i]` of `src` into `dst_blocks[i]` of `dst`
//! (same block size and heads; no state). What a connector does when both
//! sides share a block size but not a layout.
template <kv_layout Src, kv_layout Dst>
result<convert_stats> copy_blocks(const Src& src, std::span<const std::byte> src_memory,
                                  std::span<const std::uint32_t> src_blocks, const Dst& dst,
                                  std::span<std::byte> dst_memory, std::span<const std::uint32_t> dst_blocks) {
  if (src_blocks.size() != dst_blocks.size())
    return error{errc::invalid_argument, "copy_blocks: " + std::to_string(src_blocks.size()) + " source blocks but " +
                                             std::to_string(dst_blocks.size()) + " destination blocks"};
  if (src.shape().block_tokens != dst.shape().block_tokens || src.shape().kv_heads != dst.shape().kv_heads)
    return error{errc::invalid_argument, "copy_blocks: block_tokens and kv_heads must match (use convert())"};
  const auto n = static_cast<std::uint32_t>(src_blocks.size() * src.shape().block_tokens);
  kv_source<Src> s{&src, src_memory, src_blocks, 0, no_state_slot};
  kv_target<Dst> d{&dst, dst_memory, dst_blocks, 0, no_state_slot};
  return convert(s, d, token_range{0, n}, convert_options{.copy_state = false});
}

}  // namespace kvx::disagg
