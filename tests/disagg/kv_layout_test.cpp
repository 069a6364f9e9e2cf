#include <kvx/disagg/kv_layout.hpp>
#include <kvx/disagg/layouts/any_kv_layout.hpp>
#include <kvx/disagg/layouts/layer_first.hpp>
#include <kvx/disagg/layouts/layer_first_kv_split.hpp>
#include <kvx/disagg/layouts/page_first.hpp>

#include <gtest/gtest.h>

#include <cstdint>
#include <set>
#include <vector>

namespace kd = kvx::disagg;
using kd::layer_kind;

namespace {

kd::kv_shape small_shape() {
  return kd::kv_shape{.layers = 3, .block_tokens = 4, .kv_heads = 2, .head_dim = 3, .dtype_bytes = 2};
}
kd::kv_shape hybrid_shape() {
  auto s = small_shape();
  s.layers = 4;
  s.kinds = {layer_kind::attention, layer_kind::recurrent, layer_kind::attention, layer_kind::recurrent};
  s.state_bytes = 10;
  return s;
}

// Every byte of the pool, visited through offset() and state_offset(): each
// must be hit exactly once, and nothing beyond bytes_required().
template <class L>
void expect_bijection(const L& l) {
  const auto& s = l.shape();
  std::vector<int> hits(l.bytes_required(), 0);
  for (std::uint32_t layer = 0; layer < s.layers; ++layer) {
    if (s.is_attention(layer)) {
      for (std::uint32_t kv = 0; kv < 2; ++kv)
        for (std::uint32_t b = 0; b < l.num_blocks(); ++b)
          for (std::uint32_t t = 0; t < s.block_tokens; ++t)
            for (std::uint32_t h = 0; h < s.kv_heads; ++h)
              for (std::uint32_t d = 0; d < s.head_dim; ++d) {
                const auto off = l.offset({layer, kv, b, t, h, d});
                ASSERT_LE(off + s.dtype_bytes, hits.size());
                for (std::uint32_t i = 0; i < s.dtype_bytes; ++i) ++hits[off + i];
              }
    } else {
      for (std::uint32_t slot = 0; slot < l.state_slots(); ++slot)
        for (std::uint64_t i = 0; i < s.state_bytes; ++i) ++hits[l.state_offset(slot, layer) + i];
    }
  }
  for (std::size_t i = 0; i < hits.size(); ++i) ASSERT_EQ(hits[i], 1) << l.name() << " byte " << i;
}

std::set<std::uint64_t> bytes_of(const kd::range_list& rs) {
  std::set<std::uint64_t> out;
  for (const auto& r : rs)
    for (std::uint64_t c = 0; c < r.count; ++c)
      for (std::uint64_t i = 0; i < r.length; ++i) out.insert(r.chunk(c) + i);
  return out;
}

template <class L>
std::set<std::uint64_t> block_bytes_by_coord(const L& l, std::uint32_t b, std::uint32_t only_layer = UINT32_MAX) {
  const auto& s = l.shape();
  std::set<std::uint64_t> out;
  for (std::uint32_t layer = 0; layer < s.layers; ++layer) {
    if (!s.is_attention(layer) || (only_layer != UINT32_MAX && layer != only_layer)) continue;
    for (std::uint32_t kv = 0; kv < 2; ++kv)
      for (std::uint32_t t = 0; t < s.block_tokens; ++t)
        for (std::uint32_t h = 0; h < s.kv_heads; ++h)
          for (std::uint32_t d = 0; d < s.head_dim; ++d)
            for (std::uint32_t i = 0; i < s.dtype_bytes; ++i) out.insert(l.offset({layer, kv, b, t, h, d}) + i);
  }
  return out;
}

template <class L>
void expect_ranges_match_offsets(const L& l) {
  const auto& s = l.shape();
  for (std::uint32_t b = 0; b < l.num_blocks(); ++b) {
    EXPECT_EQ(bytes_of(l.block_ranges(b)), block_bytes_by_coord(l, b)) << l.name() << " block " << b;
    EXPECT_EQ(kd::total_bytes(l.block_ranges(b)), s.block_bytes());
    for (std::uint32_t layer = 0; layer < s.layers; ++layer)
      EXPECT_EQ(bytes_of(l.block_layer_ranges(b, layer)), block_bytes_by_coord(l, b, layer));
  }
  for (std::uint32_t slot = 0; slot < l.state_slots(); ++slot) {
    std::set<std::uint64_t> want;
    for (std::uint32_t layer = 0; layer < s.layers; ++layer) {
      if (s.is_attention(layer)) {
        EXPECT_TRUE(l.state_layer_ranges(slot, layer).empty());
        continue;
      }
      for (std::uint64_t i = 0; i < s.state_bytes; ++i) want.insert(l.state_offset(slot, layer) + i);
      EXPECT_EQ(kd::total_bytes(l.state_layer_ranges(slot, layer)), s.state_bytes);
    }
    EXPECT_EQ(bytes_of(l.state_ranges(slot)), want);
  }
}

// A type that is not a layout, for the negative concept checks.
struct not_a_layout {
  using kv_layout_concept = kd::kv_layout_tag;
  const kd::kv_shape& shape() const;
};

}  // namespace

static_assert(kd::kv_layout<kd::layouts::layer_first>);
static_assert(kd::kv_layout<kd::layouts::page_first>);
static_assert(kd::kv_layout<kd::layouts::layer_first_kv_split>);
static_assert(kd::heads_contiguous_v<kd::layouts::page_first>);
static_assert(!kd::kv_layout<not_a_layout>);
static_assert(!kd::kv_layout<int>);
static_assert(!kd::heads_contiguous_v<not_a_layout>);

TEST(KvShape, ValidateNamesTheBadField) {
  auto s = small_shape();
  EXPECT_TRUE(s.validate());
  s.kv_heads = 0;
  auto r = s.validate();
  ASSERT_FALSE(r);
  EXPECT_EQ(r.code(), kvx::errc::invalid_argument);
  EXPECT_NE(r.error().message().find("kv_heads"), std::string::npos);

  s = small_shape();
  s.kinds = {layer_kind::attention};
  EXPECT_NE(s.validate().error().message().find("kinds has 1 entries for 3 layers"), std::string::npos);

  s = hybrid_shape();
  s.state_bytes = 0;
  EXPECT_NE(s.validate().error().message().find("state_bytes"), std::string::npos);
}

TEST(KvShape, SizesThatOverflow64BitsAreRefused) {
  // head_dim x dtype_bytes x kv_heads x 2 x block_tokens = 2^64: it wrapped to 0 and passed the 1 TiB check.
  kd::kv_shape s{.layers = 1, .block_tokens = 2, .kv_heads = 1, .head_dim = 1U << 31, .dtype_bytes = 1U << 31};
  auto r = s.validate();
  ASSERT_FALSE(r);
  EXPECT_EQ(r.code(), kvx::errc::invalid_argument);
  EXPECT_NE(r.error().message().find("overflows 64 bits"), std::string::npos) << r.error().message();
  EXPECT_FALSE(kd::layouts::layer_first::make(s, 4));

  // 2^24 + 1 attention layers of 1 TiB blocks each.
  s = {.layers = (1U << 24) + 1, .block_tokens = 1U << 19, .kv_heads = 1, .head_dim = 1U << 18, .dtype_bytes = 4};
  ASSERT_EQ(s.block_layer_bytes(), std::uint64_t{1} << 40);
  r = s.validate();
  ASSERT_FALSE(r);
  EXPECT_NE(r.error().message().find("all attention layers"), std::string::npos) << r.error().message();

  // Two recurrent layers of 2^63 state bytes: request_state_bytes wrapped to 0.
  s = hybrid_shape();
  s.state_bytes = std::uint64_t{1} << 63;
  r = s.validate();
  ASSERT_FALSE(r);
  EXPECT_NE(r.error().message().find("state_bytes"), std::string::npos) << r.error().message();
}

TEST(KvShape, SizesCountOnlyAttentionLayersForKv) {
  auto s = hybrid_shape();
  EXPECT_EQ(s.attention_layers(), 2U);
  EXPECT_EQ(s.recurrent_layers(), 2U);
  EXPECT_EQ(s.head_bytes(), 6U);
  EXPECT_EQ(s.token_bytes(), 12U);
  EXPECT_EQ(s.block_layer_bytes(), 2U * 12U * 4U);
  EXPECT_EQ(s.block_bytes(), 2U * 96U);
  EXPECT_EQ(s.request_state_bytes(), 20U);
}

TEST(Layouts, MakeRejectsZeroBlocksAndMissingStateSlots) {
  auto r = kd::layouts::layer_first::make(small_shape(), 0);
  ASSERT_FALSE(r);
  EXPECT_NE(r.error().message().find("num_blocks"), std::string::npos);
  auto h = kd::layouts::page_first::make(hybrid_shape(), 4, 0);
  ASSERT_FALSE(h);
  EXPECT_NE(h.error().message().find("state_slots"), std::string::npos);
  auto bad = small_shape();
  bad.head_dim = 0;
  EXPECT_EQ(kd::layouts::layer_first_kv_split::make(bad, 4).code(), kvx::errc::invalid_argument);
}

TEST(Layouts, OffsetsCoverThePoolExactlyOnce) {
  for (const auto& shape : {small_shape(), hybrid_shape()}) {
    expect_bijection(kd::layouts::layer_first::make(shape, 5, 3).value());
    expect_bijection(kd::layouts::page_first::make(shape, 5, 3).value());
    expect_bijection(kd::layouts::layer_first_kv_split::make(shape, 5, 3).value());
  }
}

TEST(Layouts, BlockAndStateRangesAreExactlyTheBytesOfTheirCoordinates) {
  for (const auto& shape : {small_shape(), hybrid_shape()}) {
    expect_ranges_match_offsets(kd::layouts::layer_first::make(shape, 5, 3).value());
    expect_ranges_match_offsets(kd::layouts::page_first::make(shape, 5, 3).value());
    expect_ranges_match_offsets(kd::layouts::layer_first_kv_split::make(shape, 5, 3).value());
  }
}

TEST(Layouts, LayerFirstBlockIsOneChunkPerLayerAtTheLayerStride) {
  auto l = kd::layouts::layer_first::make(small_shape(), 5).value();
  const auto r = l.block_ranges(2);
  ASSERT_EQ(r.size(), 1U);
  const std::uint64_t chunk = small_shape().block_layer_bytes();
  EXPECT_EQ(r[0], (kd::strided_range{2 * chunk, chunk, 5 * chunk, 3}));
  const auto one = l.block_layer_ranges(2, 1);
  ASSERT_EQ(one.size(), 1U);
  EXPECT_EQ(one[0], (kd::strided_range{5 * chunk + 2 * chunk, chunk, chunk, 1}));
}

TEST(Layouts, PageFirstBlockIsOneContiguousRange) {
  auto l = kd::layouts::page_first::make(small_shape(), 5).value();
  const auto r = l.block_ranges(3);
  ASSERT_EQ(r.size(), 1U);
  EXPECT_EQ(r[0], (kd::strided_range{3 * small_shape().block_bytes(), small_shape().block_bytes(),
                                     small_shape().block_bytes(), 1}));
}

TEST(Layouts, KvSplitBlockIsOneStridedRangeOfTwoChunksPerLayer) {
  auto l = kd::layouts::layer_first_kv_split::make(small_shape(), 5).value();
  const auto r = l.block_ranges(1);
  ASSERT_EQ(r.size(), 1U);
  const std::uint64_t half = small_shape().block_layer_bytes() / 2;
  EXPECT_EQ(r[0], (kd::strided_range{half, half, 5 * half, 6}));
}

TEST(Layouts, HybridStateLivesAfterTheKvAndRecurrentLayersHaveNoBlockBytes) {
  auto l = kd::layouts::page_first::make(hybrid_shape(), 5, 3).value();
  EXPECT_EQ(l.bytes_required(), 5 * hybrid_shape().block_bytes() + 3 * 20U);
  EXPECT_TRUE(l.block_layer_ranges(0, 1).empty());
  EXPECT_EQ(l.state_offset(0, 1), l.kv_region_bytes());
  // Page-first keeps a request's state contiguous; layer-first keeps a layer's.
  const auto ps = l.state_ranges(2);
  ASSERT_EQ(ps.size(), 1U);
  EXPECT_EQ(ps[0].bytes(), 20U);
  auto lf = kd::layouts::layer_first::make(hybrid_shape(), 5, 3).value();
  const auto ls = lf.state_ranges(2);
  ASSERT_EQ(ls.size(), 1U);
  EXPECT_EQ(ls[0].count, 2U);
  EXPECT_EQ(ls[0].stride, 30U);
}

TEST(RangeBuilder, MergesTouchingChunksThenFoldsConstantStrides) {
  kd::range_builder b;
  b.add(0, 4);
  b.add(4, 4);    // touches: one chunk of 8
  b.add(100, 8);  // stride 100
  b.add(200, 8);
  b.add(250, 3);  // different length: a new range
  const auto r = b.finish();
  ASSERT_EQ(r.size(), 2U);
  EXPECT_EQ(r[0], (kd::strided_range{0, 8, 100, 3}));
  EXPECT_EQ(r[1], (kd::strided_range{250, 3, 3, 1}));
  EXPECT_TRUE(kd::range_builder{}.finish().empty());
}

TEST(Layouts, AreComparableValues) {
  auto a = kd::layouts::layer_first::make(small_shape(), 5).value();
  auto b = a;
  EXPECT_TRUE(a == b);
  EXPECT_FALSE(a == kd::layouts::layer_first::make(small_shape(), 6).value());
}

// ---- any_kv_layout: a layout chosen by configuration ----------------------------

namespace {

using kd::layouts::any_kv_layout;

std::string hybrid_json(const std::string& layout) {
  return R"({"layout": ")" + layout + R"(", "num_blocks": 12, "state_slots": 3,
      "shape": {"layers": 4, "block_tokens": 8, "kv_heads": 2, "head_dim": 16, "dtype": "bf16", "state_bytes": 96,
                "kinds": ["attention", "recurrent", "attention", "attention"]}})";
}

// Every offset and range of `a` equals those of the layout it was configured as.
template <class L>
void expect_same_layout(const any_kv_layout& a, const L& l) {
  EXPECT_EQ(a.name(), l.name());
  EXPECT_EQ(a.shape(), l.shape());
  EXPECT_EQ(a.num_blocks(), l.num_blocks());
  EXPECT_EQ(a.state_slots(), l.state_slots());
  EXPECT_EQ(a.bytes_required(), l.bytes_required());
  for (std::uint32_t b = 0; b < l.num_blocks(); b += 5) {
    EXPECT_EQ(a.block_ranges(b), l.block_ranges(b));
    for (std::uint32_t layer = 0; layer < l.shape().layers; ++layer) {
      EXPECT_EQ(a.block_layer_ranges(b, layer), l.block_layer_ranges(b, layer));
      if (!l.shape().is_attention(layer)) continue;
      const kd::kv_coord c{layer, 1, b, 7, 1, 15};
      EXPECT_EQ(a.offset(c), l.offset(c));
    }
  }
  for (std::uint32_t s = 0; s < l.state_slots(); ++s) {
    EXPECT_EQ(a.state_ranges(s), l.state_ranges(s));
    EXPECT_EQ(a.state_offset(s, 1), l.state_offset(s, 1));
  }
}

TEST(AnyKvLayout, FromJsonMatchesEveryBuiltInLayout) {
  static_assert(kd::check_kv_layout<any_kv_layout>());
  auto shape = any_kv_layout::shape_from_config(kvx::config::view(
      nlohmann::json::parse(R"({"layers": 4, "block_tokens": 8, "kv_heads": 2, "head_dim": 16, "dtype": "bf16",
          "state_bytes": 96, "kinds": ["attention", "recurrent", "attention", "attention"]})"), "shape"));
  ASSERT_TRUE(shape) << shape.error().message();
  auto lf = any_kv_layout::from_json(hybrid_json("layer_first"));
  ASSERT_TRUE(lf) << lf.error().message();
  expect_same_layout(*lf, kd::layouts::layer_first::make(*shape, 12, 3).value());
  auto pf = any_kv_layout::from_json(hybrid_json("page_first"));
  ASSERT_TRUE(pf) << pf.error().message();
  expect_same_layout(*pf, kd::layouts::page_first::make(*shape, 12, 3).value());
  auto ks = any_kv_layout::from_json(hybrid_json("layer_first_kv_split"));
  ASSERT_TRUE(ks) << ks.error().message();
  expect_same_layout(*ks, kd::layouts::layer_first_kv_split::make(*shape, 12, 3).value());
  auto copy = *pf;  // a value: copies share the layout
  EXPECT_EQ(copy.bytes_required(), pf->bytes_required());
}

TEST(AnyKvLayout, DtypeBytesAndDtypeNamesAreEquivalent) {
  auto a = any_kv_layout::from_json(R"({"layout": "page_first", "num_blocks": 4,
      "shape": {"layers": 2, "block_tokens": 16, "kv_heads": 8, "head_dim": 128, "dtype": "fp32"}})");
  auto b = any_kv_layout::from_json(R"({"layout": "page_first", "num_blocks": 4,
      "shape": {"layers": 2, "block_tokens": 16, "kv_heads": 8, "head_dim": 128, "dtype_bytes": 4}})");
  ASSERT_TRUE(a && b);
  EXPECT_EQ(a->shape(), b->shape());
  EXPECT_EQ(a->shape().dtype_bytes, 4u);
}

TEST(AnyKvLayout, BadConfigsNameTheField) {
  auto error_of = [](const std::string& json) {
    auto l = any_kv_layout::from_json(json);
    EXPECT_FALSE(l) << json;
    return l ? std::string() : l.error().message();
  };
  const std::string shape = R"("shape": {"layers": 2, "block_tokens": 16, "kv_heads": 8, "head_dim": 128, "dtype": "bf16"})";
  EXPECT_NE(error_of(R"({"layout": "ring", "num_blocks": 4, )" + shape + "}").find("kv.layout"), std::string::npos);
  EXPECT_NE(error_of(R"({"layout": "page_first", )" + shape + "}").find("num_blocks"), std::string::npos);
  EXPECT_NE(error_of(R"({"layout": "page_first", "num_blocks": 4, "colour": 1, )" + shape + "}").find("colour"),
            std::string::npos);
  EXPECT_NE(error_of(R"({"layout": "page_first", "num_blocks": 4,
      "shape": {"layers": 2, "block_tokens": 16, "kv_heads": 8, "head_dim": 128, "dtype": "int3"}})").find("kv.shape.dtype"),
            std::string::npos);
  EXPECT_NE(error_of(R"({"layout": "page_first", "num_blocks": 4,
      "shape": {"layers": 2, "block_tokens": 16, "kv_heads": 8, "head_dim": 128}})").find("dtype"),
            std::string::npos);
  EXPECT_NE(error_of(R"({"layout": "page_first", "num_blocks": 4,
      "shape": {"layers": 2, "block_tokens": 16, "kv_heads": 8, "head_dim": 128, "dtype": "bf16", "kinds": ["attention", "mamba"]}})")
                .find("kinds[1]"),
            std::string::npos);
  EXPECT_NE(error_of(R"({"layout": "page_first", "num_blocks": 0, )" + shape + "}").find("num_blocks"), std::string::npos);
  EXPECT_NE(error_of(R"({"layout": "page_first", "num_blocks": 4,
      "shape": {"layers": 2, "block_tokens": 16, "kv_heads": 0, "head_dim": 128, "dtype": "bf16"}})").find("kv_heads"),
            std::string::npos);
  const auto wraps = error_of(R"({"layout": "page_first", "num_blocks": 4,
      "shape": {"layers": 1, "block_tokens": 2, "kv_heads": 1, "head_dim": 2147483648, "dtype_bytes": 2147483648}})");
  EXPECT_NE(wraps.find("'kv.shape'"), std::string::npos) << wraps;
  EXPECT_NE(wraps.find("overflows 64 bits"), std::string::npos) << wraps;
  EXPECT_NE(error_of("{not json").find("JSON"), std::string::npos);
}

}  // namespace
