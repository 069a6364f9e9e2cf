#pragma once
// The connector moves one block of one layer as a *stream*: the bytes of its
// `block_layer_ranges` in ascending offset order. The built-in layouts all lay
// that stream out as [K|V][token][head][dim], so two layouts of the same shard
// shape agree on it byte for byte and a push is a range-to-range copy; shapes
// that differ (TP, block size) go through a page_first staging area and
// `convert`.

#include <boost/container/small_vector.hpp>

#include <cstdint>
#include <optional>
#include <string>

#include <kvx/core/result.hpp>
#include <kvx/disagg/kv_layout.hpp>

namespace kvx::disagg::detail {

struct stream_chunk {
  std::uint64_t offset = 0;
  std::uint64_t length = 0;
};
using stream_chunks = boost::container::small_vector<stream_chunk, 4>;

template <class Ranges>
stream_chunks expand(const Ranges& ranges) {
  stream_chunks out;
  for (const auto& r : ranges)
    for (std::uint64_t i = 0; i < r.count; ++i) out.push_back({r.chunk(i), r.length});
  return out;
}

//! The bytes `ranges` describe, or nothing when counting them overflows 64
//! bits (a decoded target's ranges are the peer's to choose).
template <class Ranges>
std::optional<std::uint64_t> checked_total_bytes(const Ranges& ranges) noexcept {
  std::uint64_t total = 0;
  for (const auto& r : ranges) {
    std::uint64_t n = 0;
    if (__builtin_mul_overflow(r.length, r.count, &n) || __builtin_add_overflow(total, n, &total)) return std::nullopt;
  }
  return total;
}

//! Pairs the pieces of two streams of equal length: `emit(src_offset, dst_offset, length)`.
//! It stops at the end of the shorter one, so callers check the lengths
//! first (`kv_connector` does when it takes a push target).
template <class Src, class Dst, class Emit>
void pair_streams(const Src& src, const Dst& dst, Emit&& emit) {
  const auto a = expand(src), b = expand(dst);
  std::size_t i = 0, j = 0;
  std::uint64_t ai = 0, bj = 0;
  while (i < a.size() && j < b.size()) {
    const std::uint64_t n = std::min(a[i].length - ai, b[j].length - bj);
    emit(a[i].offset + ai, b[j].offset + bj, n);
    ai += n;
    bj += n;
    if (ai == a[i].length) ++i, ai = 0;
    if (bj == b[j].length) ++j, bj = 0;
  }
}

//! True when `ranges` is one contiguous chunk.
inline bool contiguous(const range_list& ranges) noexcept {
  return ranges.size() == 1 && (ranges[0].count == 1 || ranges[0].stride == ranges[0].length);
}

//! Checks that `l` lays a block's layer out as the canonical stream
//! [K|V][token][head][dim] (heads contiguous, tokens in order, K before V).
template <kv_layout L>
result<void> check_canonical_stream(const L& l) {
  const kv_shape& s = l.shape();
  std::uint32_t layer = 0;
  while (layer < s.layers && !s.is_attention(layer)) ++layer;
  if (layer == s.layers) return {};
  if (!heads_contiguous_v<L>)
    return error{errc::not_supported, "kv_connector: layout '" + std::string(l.name()) +
                                          "' does not promise contiguous heads (heads_contiguous)"};
  const auto chunks = expand(l.block_layer_ranges(0, layer));
  auto stream_offset = [&](std::uint64_t pos) -> std::uint64_t {
    for (const auto& c : chunks) {
      if (pos < c.length) return c.offset + pos;
      pos -= c.length;
    }
    return UINT64_MAX;
  };
  if (total_bytes(l.block_layer_ranges(0, layer)) != s.block_layer_bytes())
    return error{errc::not_supported, "kv_connector: layout '" + std::string(l.name()) +
                                          "': block_layer_ranges do not cover one block of one layer"};
  for (std::uint32_t kv = 0; kv < 2; ++kv)
    for (std::uint32_t t = 0; t < s.block_tokens; ++t) {
      const std::uint64_t pos = (std::uint64_t{kv} * s.block_tokens + t) * s.token_bytes();
      if (l.offset({layer, kv, 0, t, 0, 0}) != stream_offset(pos))
        return error{errc::not_supported, "kv_connector: layout '" + std::string(l.name()) +
                                              "' does not lay a block's layer out as [K|V][token][head][dim]"};
    }
  return {};
}

}  // namespace kvx::disagg::detail
