#include <kvx/disagg/layout_convert.hpp>

#include <kvx/disagg/layouts/layer_first.hpp>
#include <kvx/disagg/layouts/layer_first_kv_split.hpp>
#include <kvx/disagg/layouts/page_first.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

namespace kd = kvx::disagg;
using kd::layer_kind;
using kd::layouts::layer_first;
using kd::layouts::layer_first_kv_split;
using kd::layouts::page_first;

namespace {

// A layout that is not heads-contiguous (heads outermost inside a block:
// [layer][block][head][kv][token][dim]), so convert() takes its per-head path.
class head_major {
 public:
  using kv_layout_concept = kd::kv_layout_tag;
  head_major(kd::kv_shape s, std::uint32_t blocks) : s_(std::move(s)), blocks_(blocks) {}
  const kd::kv_shape& shape() const { return s_; }
  std::uint32_t num_blocks() const { return blocks_; }
  std::uint32_t state_slots() const { return 0; }
  std::uint64_t bytes_required() const { return s_.block_bytes() * blocks_; }
  std::uint64_t offset(const kd::kv_coord& c) const {
    const std::uint64_t hb = s_.head_bytes();
    const std::uint64_t tok = hb, kv = tok * s_.block_tokens, head = 2 * kv, block = head * s_.kv_heads;
    return c.layer * block * blocks_ + c.block * block + c.head * head + c.kv * kv + c.token * tok +
           std::uint64_t{c.dim} * s_.dtype_bytes;
  }
  std::uint64_t state_offset(std::uint32_t, std::uint32_t) const { return 0; }
  kd::range_list block_ranges(std::uint32_t b) const {
    kd::range_builder r;
    for (std::uint32_t l = 0; l < s_.layers; ++l) r.add(offset({l, 0, b, 0, 0, 0}), s_.block_layer_bytes());
    return r.finish();
  }
  kd::range_list block_layer_ranges(std::uint32_t b, std::uint32_t l) const {
    kd::range_builder r;
    r.add(offset({l, 0, b, 0, 0, 0}), s_.block_layer_bytes());
    return r.finish();
  }
  kd::range_list state_ranges(std::uint32_t) const { return {}; }
  kd::range_list state_layer_ranges(std::uint32_t, std::uint32_t) const { return {}; }
  std::string_view name() const { return "head_major"; }

 private:
  kd::kv_shape s_;
  std::uint32_t blocks_;
};
static_assert(kd::check_kv_layout<head_major>());
static_assert(!kd::heads_contiguous_v<head_major>);

kd::kv_shape shape_of(std::uint32_t heads, std::uint32_t block_tokens, bool hybrid = false) {
  kd::kv_shape s{.layers = 3, .block_tokens = block_tokens, .kv_heads = heads, .head_dim = 4, .dtype_bytes = 2};
  if (hybrid) {
    s.kinds = {layer_kind::attention, layer_kind::recurrent, layer_kind::attention};
    s.state_bytes = 6 * heads;  // 6 bytes per head, so state reshards with the heads
  }
  return s;
}

std::vector<std::byte> random_bytes(std::size_t n, std::mt19937& rng) {
  std::vector<std::byte> v(n);
  for (auto& b : v) b = static_cast<std::byte>(rng() & 0xFF);
  return v;
}

// A block table of `n` distinct random blocks out of `pool`.
std::vector<std::uint32_t> random_table(std::uint32_t n, std::uint32_t pool, std::mt19937& rng) {
  std::vector<std::uint32_t> all(pool);
  std::iota(all.begin(), all.end(), 0U);
  std::shuffle(all.begin(), all.end(), rng);
  all.resize(n);
  return all;
}

template <class L>
struct shard {
  L layout;
  std::vector<std::byte> mem;
  std::vector<std::uint32_t> table;
  std::uint32_t head_begin;
  std::uint32_t slot;
  kd::kv_source<L> src() const { return {&layout, mem, table, head_begin, slot}; }
  kd::kv_target<L> dst() { return {&layout, mem, table, head_begin, slot}; }
};

// The naive reference: byte by byte, coordinate by coordinate.
template <class S, class D>
void reference_convert(const std::vector<shard<S>>& src, std::vector<shard<D>>& dst, kd::token_range tokens) {
  for (auto& d : dst) {
    const auto& ds = d.layout.shape();
    for (std::uint32_t layer = 0; layer < ds.layers; ++layer) {
      for (std::uint32_t g = d.head_begin; g < d.head_begin + ds.kv_heads; ++g) {
        const shard<S>* from = nullptr;
        for (const auto& s : src)
          if (g >= s.head_begin && g < s.head_begin + s.layout.shape().kv_heads) from = &s;
        ASSERT_NE(from, nullptr);
        const auto& ss = from->layout.shape();
        if (ds.is_attention(layer)) {
          for (std::uint32_t kv = 0; kv < 2; ++kv)
            for (std::uint32_t t = tokens.begin; t < tokens.end; ++t)
              for (std::uint32_t dim = 0; dim < ds.head_dim; ++dim) {
                const auto so = from->layout.offset({layer, kv, from->table[t / ss.block_tokens], t % ss.block_tokens,
                                                     g - from->head_begin, dim});
                const auto dof = d.layout.offset(
                    {layer, kv, d.table[t / ds.block_tokens], t % ds.block_tokens, g - d.head_begin, dim});
                for (std::uint32_t i = 0; i < ds.dtype_bytes; ++i) d.mem[dof + i] = from->mem[so + i];
              }
        } else {
          const std::uint64_t per_head = ds.state_bytes / ds.kv_heads;
          for (std::uint64_t i = 0; i < per_head; ++i)
            d.mem[d.layout.state_offset(d.slot, layer) + (g - d.head_begin) * per_head + i] =
                from->mem[from->layout.state_offset(from->slot, layer) + (g - from->head_begin) * per_head + i];
        }
      }
    }
  }
}

template <class S, class D>
std::vector<shard<D>> run_both(const std::vector<shard<S>>& src, const std::vector<shard<D>>& dst_init,
                               kd::token_range tokens, kd::convert_stats* stats = nullptr) {
  auto want = dst_init;
  reference_convert(src, want, tokens);
  auto got = dst_init;
  std::vector<kd::kv_source<S>> ss;
  for (const auto& s : src) ss.push_back(s.src());
  std::vector<kd::kv_target<D>> ds;
  for (auto& d : got) ds.push_back(d.dst());
  auto r = kd::convert<S, D>(ss, ds, tokens);
  EXPECT_TRUE(r) << r.error().message();
  if (stats && r) *stats = *r;
  for (std::size_t i = 0; i < got.size(); ++i) EXPECT_TRUE(got[i].mem == want[i].mem) << "destination shard " << i;
  return got;
}

template <class L>
shard<L> make_shard(kd::kv_shape s, std::uint32_t pool, std::uint32_t tokens, std::uint32_t head_begin,
                    std::mt19937& rng) {
  const std::uint32_t slots = s.recurrent_layers() ? 4U : 0U;
  auto l = L::make(s, pool, slots).value();
  const std::uint32_t blocks = (tokens + s.block_tokens - 1) / s.block_tokens;
  auto mem = random_bytes(l.bytes_required(), rng);
  return shard<L>{l, std::move(mem), random_table(blocks, pool, rng), head_begin, slots ? 2U : kd::no_state_slot};
}

}  // namespace

TEST(LayoutConvert, LayerFirstToPageFirstAndBackRoundTripsRandomBlocks) {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 8; ++trial) {
    const std::uint32_t tokens = 1 + rng() % 60;
    std::vector<shard<layer_first>> a{make_shard<layer_first>(shape_of(4, 8), 16, tokens, 0, rng)};
    std::vector<shard<page_first>> b{make_shard<page_first>(shape_of(4, 8), 16, tokens, 0, rng)};
    auto mid = run_both(a, b, {0, tokens});
    auto back_init = a;
    for (auto& x : back_init.front().mem) x = std::byte{0xEE};
    auto back = run_both(mid, back_init, {0, tokens});
    // Every byte of the request's tokens came back; everything else kept 0xEE.
    std::vector<std::byte> expect(back_init.front().mem.size(), std::byte{0xEE});
    const auto& l = a.front().layout;
    for (std::uint32_t layer = 0; layer < 3; ++layer)
      for (std::uint32_t kv = 0; kv < 2; ++kv)
        for (std::uint32_t t = 0; t < tokens; ++t) {
          const auto off = l.offset({layer, kv, a.front().table[t / 8], t % 8, 0, 0});
          std::copy_n(a.front().mem.begin() + static_cast<std::ptrdiff_t>(off), 4 * 4 * 2,
                      expect.begin() + static_cast<std::ptrdiff_t>(off));
        }
    EXPECT_TRUE(back.front().mem == expect) << "trial " << trial;
  }
}

TEST(LayoutConvert, SameLayoutSameBlocksCopiesWholeChunksInFewMemcpys) {
  std::mt19937 rng(1);
  std::vector<shard<page_first>> a{make_shard<page_first>(shape_of(4, 8), 8, 64, 0, rng)};
  auto b = a;
  std::iota(b.front().table.begin(), b.front().table.end(), 0U);  // contiguous destination blocks
  std::iota(a.front().table.begin(), a.front().table.end(), 0U);
  for (auto& x : b.front().mem) x = std::byte{0};
  kd::convert_stats st;
  run_both(a, b, {0, 64}, &st);
  EXPECT_EQ(st.bytes, 8 * shape_of(4, 8).block_bytes());
  // Page-first: per (layer, kv) the tokens of consecutive blocks are not adjacent, so
  // one copy per block per layer per K/V at most.
  EXPECT_LE(st.copies, 8U * 3U * 2U);
}

TEST(LayoutConvert, KvSplitAndHeadMajorLayoutsConvertAgainstTheReference) {
  std::mt19937 rng(3);
  std::vector<shard<layer_first_kv_split>> a{make_shard<layer_first_kv_split>(shape_of(4, 8), 10, 37, 0, rng)};
  auto hm_shape = shape_of(4, 8);
  head_major hm(hm_shape, 10);
  std::vector<shard<head_major>> b{{hm, random_bytes(hm.bytes_required(), rng), random_table(5, 10, rng), 0, 0}};
  auto mid = run_both(a, b, {0, 37});
  std::vector<shard<page_first>> c{make_shard<page_first>(shape_of(4, 8), 10, 37, 0, rng)};
  run_both(mid, c, {0, 37});
}

TEST(LayoutConvert, TensorParallelTwoShardsMergeIntoOne) {
  std::mt19937 rng(11);
  for (int trial = 0; trial < 4; ++trial) {
    const std::uint32_t tokens = 1 + rng() % 50;
    std::vector<shard<layer_first>> tp2{make_shard<layer_first>(shape_of(2, 16), 8, tokens, 0, rng),
                                        make_shard<layer_first>(shape_of(2, 16), 8, tokens, 2, rng)};
    tp2[1].table = tp2[0].table;  // TP ranks share block ids, as vLLM does
    std::vector<shard<page_first>> tp1{make_shard<page_first>(shape_of(4, 16), 8, tokens, 0, rng)};
    run_both(tp2, tp1, {0, tokens});
  }
}

TEST(LayoutConvert, TensorParallelOneShardSplitsIntoTwoAndMergesBack) {
  std::mt19937 rng(12);
  const std::uint32_t tokens = 45;
  std::vector<shard<page_first>> tp1{make_shard<page_first>(shape_of(4, 16), 8, tokens, 0, rng)};
  std::vector<shard<layer_first>> tp2{make_shard<layer_first>(shape_of(2, 16), 8, tokens, 0, rng),
                                      make_shard<layer_first>(shape_of(2, 16), 8, tokens, 2, rng)};
  auto split = run_both(tp1, tp2, {0, tokens});
  auto back = run_both(split, tp1, {0, tokens});
  EXPECT_TRUE(back.front().mem == tp1.front().mem);  // tp1 already held those bytes
}

TEST(LayoutConvert, BlockSizeChangesHandleAPartialLastBlock) {
  std::mt19937 rng(5);
  for (std::uint32_t tokens : {1U, 15U, 16U, 17U, 45U, 64U}) {
    std::vector<shard<layer_first>> b16{make_shard<layer_first>(shape_of(4, 16), 12, tokens, 0, rng)};
    std::vector<shard<page_first>> b32{make_shard<page_first>(shape_of(4, 32), 6, tokens, 0, rng)};
    auto big = run_both(b16, b32, {0, tokens});
    auto back = run_both(big, b16, {0, tokens});
    EXPECT_TRUE(back.front().mem == b16.front().mem) << tokens << " tokens";
  }
}

TEST(LayoutConvert, ASuffixRangeCopiesOnlyThoseTokens) {
  std::mt19937 rng(6);
  std::vector<shard<layer_first>> a{make_shard<layer_first>(shape_of(4, 16), 8, 70, 0, rng)};
  std::vector<shard<layer_first>> b{make_shard<layer_first>(shape_of(4, 16), 8, 70, 0, rng)};
  run_both(a, b, {33, 70});
}

TEST(LayoutConvert, HybridStateTravelsWithTheKvAndReshardsByHeads) {
  std::mt19937 rng(8);
  const std::uint32_t tokens = 29;
  std::vector<shard<layer_first>> tp2{make_shard<layer_first>(shape_of(2, 8, true), 8, tokens, 0, rng),
                                      make_shard<layer_first>(shape_of(2, 8, true), 8, tokens, 2, rng)};
  std::vector<shard<page_first>> tp1{make_shard<page_first>(shape_of(4, 8, true), 8, tokens, 0, rng)};
  tp1.front().slot = 3;
  auto merged = run_both(tp2, tp1, {0, tokens});
  // The state region of slot 3 is the two shards' states, head order.
  const auto& l = merged.front().layout;
  for (std::uint32_t s = 0; s < 2; ++s)
    for (std::uint64_t i = 0; i < 12; ++i)
      EXPECT_EQ(merged.front().mem[l.state_offset(3, 1) + s * 12 + i],
                tp2[s].mem[tp2[s].layout.state_offset(2, 1) + i]);
  run_both(merged, tp2, {0, tokens});
}

TEST(LayoutConvert, OneLayerAtATimeCopiesOnlyThatLayer) {
  std::mt19937 rng(9);
  auto a = make_shard<layer_first>(shape_of(4, 8, true), 8, 20, 0, rng);
  auto b = make_shard<page_first>(shape_of(4, 8, true), 8, 20, 0, rng);
  const auto before = b.mem;
  auto r = kd::convert(a.src(), b.dst(), {0, 20}, {.layer_begin = 1, .layer_end = 2});
  ASSERT_TRUE(r);
  EXPECT_EQ(r->bytes, 24U);  // layer 1 is recurrent: only its 24 state bytes
  r = kd::convert(a.src(), b.dst(), {0, 20}, {.layer_begin = 2, .layer_end = 3});
  ASSERT_TRUE(r);
  EXPECT_EQ(r->bytes, 2U * 20U * 4U * 8U);
  std::size_t changed = 0;
  for (std::size_t i = 0; i < before.size(); ++i) changed += before[i] != b.mem[i];
  EXPECT_GT(changed, 0U);
  for (std::uint32_t t = 0; t < 20; ++t)  // layer 0 untouched
    EXPECT_EQ(b.mem[b.layout.offset({0, 0, b.table[t / 8], t % 8, 0, 0})],
              before[b.layout.offset({0, 0, b.table[t / 8], t % 8, 0, 0})]);
}

TEST(LayoutConvert, CopyBlocksMovesWholeBlocksBetweenLayouts) {
  std::mt19937 rng(10);
  auto a = make_shard<layer_first>(shape_of(4, 8), 8, 24, 0, rng);
  auto b = make_shard<page_first>(shape_of(4, 8), 8, 24, 0, rng);
  auto r = kd::copy_blocks(a.layout, std::span<const std::byte>(a.mem), std::span<const std::uint32_t>(a.table),
                           b.layout, std::span<std::byte>(b.mem), std::span<const std::uint32_t>(b.table));
  ASSERT_TRUE(r) << r.error().message();
  EXPECT_EQ(r->bytes, 3 * shape_of(4, 8).block_bytes());
  for (std::size_t i = 0; i < 3; ++i)
    EXPECT_EQ(b.mem[b.layout.offset({2, 1, b.table[i], 7, 3, 3})], a.mem[a.layout.offset({2, 1, a.table[i], 7, 3, 3})]);
  std::vector<std::uint32_t> two{0, 1};
  auto bad = kd::copy_blocks(a.layout, std::span<const std::byte>(a.mem), std::span<const std::uint32_t>(a.table),
                             b.layout, std::span<std::byte>(b.mem), std::span<const std::uint32_t>(two));
  EXPECT_EQ(bad.code(), kvx::errc::invalid_argument);
}

TEST(LayoutConvert, BadInputIsRejectedWithContextBeforeAnyByteIsWritten) {
  std::mt19937 rng(13);
  auto a = make_shard<layer_first>(shape_of(4, 8, true), 8, 24, 0, rng);
  auto b = make_shard<page_first>(shape_of(4, 8, true), 8, 24, 0, rng);
  const auto before = b.mem;
  auto expect_error = [&](kd::kv_source<layer_first> s, kd::kv_target<page_first> d, kd::token_range t,
                          kvx::errc code, const char* words) {
    auto r = kd::convert(s, d, t);
    ASSERT_FALSE(r);
    EXPECT_EQ(r.code(), code);
    EXPECT_NE(r.error().message().find(words), std::string::npos) << r.error().message();
    EXPECT_TRUE(b.mem == before);
  };
  expect_error(a.src(), b.dst(), {0, 25}, kvx::errc::out_of_range, "source shard 0 block table covers 24 tokens");
  auto bad_table = a;
  bad_table.table[1] = 99;
  expect_error(bad_table.src(), b.dst(), {0, 24}, kvx::errc::out_of_range, "names block 99");
  auto short_mem = b.dst();
  short_mem.memory = short_mem.memory.first(10);
  expect_error(a.src(), short_mem, {0, 24}, kvx::errc::out_of_range, "destination shard 0 memory holds 10 bytes");
  auto no_slot = b.dst();
  no_slot.state_slot = kd::no_state_slot;
  expect_error(a.src(), no_slot, {0, 24}, kvx::errc::out_of_range, "state slot is not set");
  auto other_heads = a.src();
  other_heads.head_begin = 2;
  expect_error(other_heads, b.dst(), {0, 24}, kvx::errc::invalid_argument, "head 0 is held by no source shard");
  expect_error(a.src(), b.dst(), {5, 3}, kvx::errc::invalid_argument, "ends before it begins");

  auto wide = make_shard<page_first>([] {
    auto s = shape_of(4, 8, true);
    s.head_dim = 8;
    return s;
  }(), 8, 24, 0, rng);
  auto r = kd::convert(a.src(), wide.dst(), {0, 24});
  ASSERT_FALSE(r);
  EXPECT_NE(r.error().message().find("head_dim (4 vs 8)"), std::string::npos);
  auto no_layout = a.src();
  no_layout.layout = nullptr;
  EXPECT_EQ(kd::convert(no_layout, b.dst(), {0, 1}).code(), kvx::errc::invalid_argument);
}
