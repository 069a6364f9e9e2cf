#include <tiny/engine.hpp>

#include <kvx/disagg/layout_convert.hpp>
#include <kvx/disagg/layouts/layer_first.hpp>
#include <kvx/disagg/layouts/page_first.hpp>

#include <gtest/gtest.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <thread>
#include <vector>

namespace kd = kvx::disagg;
using kd::layer_kind;
using kd::layouts::layer_first;
using kd::layouts::page_first;

namespace {

tiny::model_config small_config(tiny::kv_dtype dt = tiny::kv_dtype::f32, bool hybrid = false) {
  tiny::model_config c{.layers = 3, .kv_heads = 4, .q_per_kv = 2, .head_dim = 8, .block_tokens = 16, .vocab = 97, .dtype = dt};
  if (hybrid) {
    c.kinds = {layer_kind::attention, layer_kind::recurrent, layer_kind::attention};
    c.state_dim = 16;
  }
  return c;
}

std::vector<std::uint32_t> prompt_of(std::size_t n, std::uint32_t salt = 0) {
  std::vector<std::uint32_t> p(n);
  for (std::size_t i = 0; i < n; ++i) p[i] = static_cast<std::uint32_t>((i * 31 + salt * 7 + 5) % 97);
  return p;
}

// One instance's KV pool (one or more TP shards) and its engine.
template <class L>
struct instance {
  std::vector<std::vector<std::byte>> pools;
  std::vector<kd::kv_shard<L>> shards;
  std::optional<tiny::engine<L>> engine;

  instance(tiny::model_config cfg, std::uint32_t blocks, std::uint32_t slots = 4) {
    pools.reserve(cfg.tp);
    for (std::uint32_t i = 0; i < cfg.tp; ++i) {
      auto l = L::make(cfg.shard_shape(), blocks, slots).value();
      pools.emplace_back(l.bytes_required(), std::byte{0x5A});
      shards.push_back({l, pools.back()});
    }
    auto e = tiny::engine<L>::make(cfg, shards);
    EXPECT_TRUE(e) << e.error().message();
    engine.emplace(std::move(e).value());
  }
  kd::kv_source<L> src(std::size_t shard, std::span<const std::uint32_t> table, std::uint32_t slot) const {
    return {&shards[shard].layout, pools[shard], table, static_cast<std::uint32_t>(shard * shards[0].layout.shape().kv_heads), slot};
  }
  kd::kv_target<L> dst(std::size_t shard, std::span<const std::uint32_t> table, std::uint32_t slot) {
    return {&shards[shard].layout, pools[shard], table, static_cast<std::uint32_t>(shard * shards[0].layout.shape().kv_heads), slot};
  }
};

std::vector<std::uint32_t> colocated(tiny::model_config cfg, const std::vector<std::uint32_t>& prompt, std::uint32_t n) {
  instance<layer_first> a(cfg, 8);
  std::vector<std::uint32_t> table{5, 2, 7, 0, 3, 1, 6, 4};
  return a.engine->generate(prompt, n, {table, 1}).value();
}

}  // namespace

TEST(TinyEngine, SameSeedSameTokensAndOtherSeedOtherTokens) {
  const auto p = prompt_of(40);
  const auto a = colocated(small_config(), p, 6);
  EXPECT_EQ(a, colocated(small_config(), p, 6));
  auto other = small_config();
  other.seed = 43;
  EXPECT_NE(a, colocated(other, p, 6));
  EXPECT_NE(a, colocated(small_config(), prompt_of(40, 1), 6));
}

TEST(TinyEngine, LayoutDoesNotChangeTheTokensAndConvertedKvIsIdentical) {
  for (auto dt : {tiny::kv_dtype::f32, tiny::kv_dtype::bf16}) {
    const auto cfg = small_config(dt, true);
    const auto p = prompt_of(37);
    instance<layer_first> a(cfg, 6);
    instance<page_first> b(cfg, 6);
    std::vector<std::uint32_t> ta{4, 1, 3}, tb{0, 5, 2};
    const auto ga = a.engine->prefill(p, {ta, 2}).value();
    const auto gb = b.engine->prefill(p, {tb, 0}).value();
    EXPECT_EQ(ga, gb);
    // a's KV converted into a third pool in page-first equals b's bytes for those blocks.
    instance<page_first> c(cfg, 6);
    ASSERT_TRUE(kd::convert(a.src(0, ta, 2), c.dst(0, tb, 0), {0, 37}));
    for (std::uint32_t t = 0; t < 37; ++t)
      for (std::uint32_t layer : {0U, 2U})
        for (std::uint32_t kv = 0; kv < 2; ++kv) {
          const auto off = b.shards[0].layout.offset({layer, kv, tb[t / 16], t % 16, 0, 0});
          ASSERT_EQ(0, std::memcmp(c.pools[0].data() + off, b.pools[0].data() + off, cfg.shard_shape().token_bytes()));
        }
    const auto so = b.shards[0].layout.state_offset(0, 1);
    EXPECT_EQ(0, std::memcmp(c.pools[0].data() + so, b.pools[0].data() + so, 64));
  }
}

TEST(TinyEngine, PrefillOnACachedPrefixEqualsAFullPrefill) {
  const auto cfg = small_config(tiny::kv_dtype::bf16, true);
  const auto p = prompt_of(45);
  instance<layer_first> full(cfg, 4), split(cfg, 4);
  std::vector<std::uint32_t> table{3, 0, 2};
  const auto want = full.engine->prefill(p, {table, 1}).value();
  ASSERT_TRUE(split.engine->prefill(std::span(p).first(32), {table, 1}));
  EXPECT_EQ(split.engine->prefill(p, {table, 1}, 32).value(), want);
  EXPECT_TRUE(full.pools[0] == split.pools[0]);
}

TEST(TinyEngine, DisaggregatedDecodeOnTransferredKvMatchesColocated) {
  // Prefill on a TP=2 layer-first instance, ship KV and state to a TP=1
  // page-first instance with another block size' worth of other block ids,
  // decode there: same tokens as one colocated instance.
  auto cfg = small_config(tiny::kv_dtype::bf16, true);
  const auto p = prompt_of(50);
  const auto want = colocated(cfg, p, 8);

  auto pcfg = cfg;
  pcfg.tp = 2;
  instance<layer_first> prefill(pcfg, 8);
  std::vector<std::uint32_t> pt{6, 1, 4, 7};
  const auto first = prefill.engine->prefill(p, {pt, 3}).value();
  EXPECT_EQ(first, want[0]);

  instance<page_first> decode(cfg, 8);
  std::vector<std::uint32_t> dt{2, 5, 0, 3, 7};
  std::vector<kd::kv_source<layer_first>> src{prefill.src(0, pt, 3), prefill.src(1, pt, 3)};
  std::vector<kd::kv_target<page_first>> dst{decode.dst(0, dt, 1)};
  ASSERT_TRUE((kd::convert<layer_first, page_first>(src, dst, {0, 50})));
  std::vector<std::uint32_t> got{first};
  for (std::uint32_t i = 1; i < 8; ++i) got.push_back(decode.engine->decode(got.back(), 49 + i, {dt, 1}).value());
  EXPECT_EQ(got, want);
}

TEST(TinyEngine, AnyChangedKvOrStateByteOfTheRequestChangesTheNextToken) {
  const auto cfg = small_config(tiny::kv_dtype::f32, true);
  const auto p = prompt_of(20);
  instance<page_first> a(cfg, 4);
  std::vector<std::uint32_t> table{1, 3};
  const auto first = a.engine->prefill(p, {table, 0}).value();
  const auto base = a.pools[0];
  const auto want = a.engine->decode(first, 20, {table, 0}).value();
  const auto& l = a.shards[0].layout;
  struct probe {
    std::uint64_t offset;
    bool matters;
  };
  const std::vector<probe> probes{
      {l.offset({0, 0, 1, 0, 0, 0}), true},          // K of token 0, first byte
      {l.offset({2, 1, 3, 3, 3, 7}) + 3, true},      // V of token 19, last byte
      {l.state_offset(0, 1) + 17, true},             // the request's state
      {l.offset({0, 0, 0, 5, 1, 0}), false},         // a block the request does not own
      {l.state_offset(2, 1), false},                 // another request's state
      {l.offset({2, 1, 3, 5, 0, 0}), false},         // past the end of the request (token 21)
  };
  for (const auto& pr : probes) {
    a.pools[0] = base;
    a.pools[0][pr.offset] ^= std::byte{0x01};
    const auto got = a.engine->decode(first, 20, {table, 0}).value();
    if (pr.matters)
      EXPECT_NE(got, want) << "offset " << pr.offset;
    else
      EXPECT_EQ(got, want) << "offset " << pr.offset;
  }
}

TEST(TinyEngine, HooksRunPerLayerInOrderAndALoadErrorStopsTheStep) {
  const auto cfg = small_config();
  instance<layer_first> a(cfg, 4);
  std::vector<std::uint32_t> table{0, 1};
  std::vector<std::string> calls;
  kd::layer_hooks hooks{.before_layer = [&](std::uint32_t l) {
                          calls.push_back("load" + std::to_string(l));
                          return std::error_code{};
                        },
                        .after_layer = [&](std::uint32_t l) { calls.push_back("save" + std::to_string(l)); }};
  ASSERT_TRUE(a.engine->prefill(prompt_of(10), {table}, 0, hooks));
  EXPECT_EQ(calls, (std::vector<std::string>{"load0", "save0", "load1", "save1", "load2", "save2"}));
  kd::layer_hooks failing{.before_layer = [](std::uint32_t l) {
    return l == 1 ? make_error_code(kvx::errc::timed_out) : std::error_code{};
  }};
  auto r = a.engine->decode(3, 10, {table}, failing);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.code(), kvx::errc::timed_out);
  EXPECT_NE(r.error().message().find("loading layer 1"), std::string::npos);
}

TEST(TinyEngine, BadConfigsAndRequestsAreRejected) {
  auto cfg = small_config();
  cfg.tp = 3;
  EXPECT_NE(cfg.validate().error().message().find("does not split over tp = 3"), std::string::npos);
  cfg = small_config();
  cfg.head_dim = 7;
  EXPECT_EQ(cfg.validate().code(), kvx::errc::invalid_argument);
  cfg = small_config(tiny::kv_dtype::f32, true);
  cfg.state_dim = 6;
  EXPECT_NE(cfg.validate().error().message().find("state_dim"), std::string::npos);

  // A layout whose shape is not the config's.
  auto wrong = layer_first::make(small_config(tiny::kv_dtype::bf16).shard_shape(), 4).value();
  std::vector<std::byte> mem(wrong.bytes_required());
  EXPECT_NE(tiny::engine<layer_first>::make(small_config(), wrong, mem).error().message().find("shard_shape"),
            std::string::npos);
  auto right = layer_first::make(small_config().shard_shape(), 4).value();
  std::vector<std::byte> small(16);
  EXPECT_EQ(tiny::engine<layer_first>::make(small_config(), right, small).code(), kvx::errc::out_of_range);

  instance<layer_first> a(small_config(tiny::kv_dtype::f32, true), 4, 2);
  std::vector<std::uint32_t> table{0, 1};
  const auto p = prompt_of(20);
  EXPECT_EQ(a.engine->prefill(p, {table}).code(), kvx::errc::out_of_range);  // no state slot
  EXPECT_EQ(a.engine->prefill(p, {table, 2}).code(), kvx::errc::out_of_range);
  EXPECT_EQ(a.engine->prefill(p, {std::span(table).first(1), 0}).code(), kvx::errc::out_of_range);
  std::vector<std::uint32_t> bad_table{0, 9};
  EXPECT_NE(a.engine->prefill(p, {bad_table, 0}).error().message().find("names block 9"), std::string::npos);
  EXPECT_EQ(a.engine->prefill(std::vector<std::uint32_t>{1, 200}, {table, 0}).code(), kvx::errc::invalid_argument);
  EXPECT_EQ(a.engine->prefill(p, {table, 0}, 20).code(), kvx::errc::invalid_argument);
}

TEST(TinyEngine, MeasureReportsPositiveSpeeds) {
  auto s = tiny::measure_engine<page_first>(small_config(), 32, 4);
  ASSERT_TRUE(s) << s.error().message();
  EXPECT_GT(s->prefill_tokens_per_s, 0.0);
  EXPECT_GT(s->decode_step_s, 0.0);
  EXPECT_EQ(tiny::measure_engine<page_first>(small_config(), 0, 4).code(), kvx::errc::invalid_argument);
}

// The clock is the caller's: one that reads 0, 1, 2, 3 ... seconds makes the
// prefill take 1 s and the 4 decode steps 1 s together, whatever the machine does.
TEST(TinyEngine, MeasureTimesEachPhaseWithTheCallersClock) {
  double now = 0;
  auto s = tiny::measure_engine<page_first>(small_config(), 32, 4, [&now] { return now++; });
  ASSERT_TRUE(s) << s.error().message();
  EXPECT_DOUBLE_EQ(s->prefill_tokens_per_s, 32.0);
  EXPECT_DOUBLE_EQ(s->decode_step_s, 0.25);
  EXPECT_EQ(s->context_tokens, 34U);
  EXPECT_DOUBLE_EQ(now, 3.0);  // read before the prefill, after it, after the last step
}

TEST(TinyEngine, ConcurrentRequestsOnDisjointBlocksMatchSequentialOnes) {
  const auto cfg = small_config(tiny::kv_dtype::bf16, true);
  instance<page_first> a(cfg, 8);
  const auto p0 = prompt_of(30, 1), p1 = prompt_of(30, 2);
  std::vector<std::uint32_t> t0{0, 1, 2}, t1{3, 4, 5};
  const auto want0 = colocated(cfg, p0, 4), want1 = colocated(cfg, p1, 4);
  std::vector<std::uint32_t> got0, got1;
  std::thread th([&] { got0 = a.engine->generate(p0, 4, {t0, 0}).value(); });
  got1 = a.engine->generate(p1, 4, {t1, 1}).value();
  th.join();
  EXPECT_EQ(got0, want0);
  EXPECT_EQ(got1, want1);
}
