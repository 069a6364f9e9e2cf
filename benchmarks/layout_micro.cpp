// KV layout conversion throughput against memcpy of the same bytes in the
// same run, and the tiny engine's prefill speed and decode step time.
//
// The request: 32 blocks of 16 tokens (512 tokens) of an 8-layer model with
// 8 KV heads of 128 bf16 elements: 64 KiB per block per layer, 16 MiB in all,
// scattered over a 128-block pool by a random block table. Each conversion
// benchmark also times one memcpy of the same 16 MiB after every iteration
// (off the benchmark clock): `vs_memcpy` is conversion bytes/s over memcpy
// bytes/s, `memcpy_GBps` the reference itself.
#include <kvx/disagg/layout_convert.hpp>
#include <kvx/disagg/layouts/layer_first.hpp>
#include <kvx/disagg/layouts/layer_first_kv_split.hpp>
#include <kvx/disagg/layouts/page_first.hpp>
#include <tiny/engine.hpp>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

namespace kd = kvx::disagg;

namespace {

constexpr std::uint32_t pool_blocks = 128;
constexpr std::uint32_t request_blocks = 32;

kd::kv_shape shape(std::uint32_t heads = 8, std::uint32_t block_tokens = 16) {
  return {.layers = 8, .block_tokens = block_tokens, .kv_heads = heads, .head_dim = 128, .dtype_bytes = 2};
}

std::vector<std::uint32_t> table(std::uint32_t n, std::uint32_t pool, unsigned seed) {
  std::vector<std::uint32_t> t(pool);
  std::iota(t.begin(), t.end(), 0U);
  std::mt19937 rng(seed);
  std::shuffle(t.begin(), t.end(), rng);
  t.resize(n);
  return t;
}

std::vector<std::byte> filled(std::uint64_t n) {
  std::vector<std::byte> v(n);
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<std::byte>(i * 131 % 251);
  return v;
}

}  // namespace

// The plain reference: one memcpy of the request's 16 MiB between two warm buffers.
static void BM_MemcpyReference(benchmark::State& state) {
  const std::uint64_t bytes = shape().block_bytes() * request_blocks;
  auto src = filled(bytes);
  std::vector<std::byte> dst(bytes, std::byte{1});
  for (auto _ : state) {
    std::memcpy(dst.data(), src.data(), bytes);
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * bytes));
}
BENCHMARK(BM_MemcpyReference)->Unit(benchmark::kMicrosecond)->UseRealTime();

template <class Src, class Dst>
static void convert_bench(benchmark::State& state, std::uint32_t src_shards, std::uint32_t dst_shards,
                          std::uint32_t src_block, std::uint32_t dst_block) {
  const std::uint32_t heads = 8, tokens = request_blocks * 16;
  auto sl = Src::make(shape(heads / src_shards, src_block), pool_blocks * 16 / src_block).value();
  auto dl = Dst::make(shape(heads / dst_shards, dst_block), pool_blocks * 16 / dst_block).value();
  std::vector<std::vector<std::byte>> smem, dmem;
  for (std::uint32_t i = 0; i < src_shards; ++i) smem.push_back(filled(sl.bytes_required()));
  for (std::uint32_t i = 0; i < dst_shards; ++i) dmem.emplace_back(dl.bytes_required(), std::byte{0});
  const auto st = table(tokens / src_block, sl.num_blocks(), 1), dt = table(tokens / dst_block, dl.num_blocks(), 2);
  std::vector<kd::kv_source<Src>> s;
  std::vector<kd::kv_target<Dst>> d;
  for (std::uint32_t i = 0; i < src_shards; ++i) s.push_back({&sl, smem[i], st, i * heads / src_shards});
  for (std::uint32_t i = 0; i < dst_shards; ++i) d.push_back({&dl, dmem[i], dt, i * heads / dst_shards});
  // The same bytes as one memcpy, timed between iterations (outside the
  // benchmark's clock) so that both see the same machine load.
  const std::uint64_t bytes = shape().block_bytes() * request_blocks;
  auto ref_src = filled(bytes);
  std::vector<std::byte> ref_dst(bytes, std::byte{1});
  double convert_s = 0, memcpy_s = 0;
  using clock = std::chrono::steady_clock;
  for (auto _ : state) {
    const auto t0 = clock::now();
    auto r = kd::convert<Src, Dst>(s, d, {0, tokens});
    benchmark::ClobberMemory();
    convert_s += std::chrono::duration<double>(clock::now() - t0).count();
    if (!r || r->bytes != bytes) {
      state.SkipWithError(r ? "converted an unexpected number of bytes" : r.error().message().c_str());
      return;
    }
    state.PauseTiming();
    const auto t1 = clock::now();
    std::memcpy(ref_dst.data(), ref_src.data(), bytes);
    benchmark::ClobberMemory();
    memcpy_s += std::chrono::duration<double>(clock::now() - t1).count();
    state.ResumeTiming();
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * bytes));
  const double n = static_cast<double>(state.iterations()) * static_cast<double>(bytes);
  state.counters["memcpy_GBps"] = n / memcpy_s / 1e9;
  state.counters["vs_memcpy"] = memcpy_s / convert_s;  // conversion bytes/s over memcpy bytes/s
}

static void BM_Convert_LayerFirst_To_PageFirst(benchmark::State& s) {
  convert_bench<kd::layouts::layer_first, kd::layouts::page_first>(s, 1, 1, 16, 16);
}
static void BM_Convert_PageFirst_To_LayerFirst(benchmark::State& s) {
  convert_bench<kd::layouts::page_first, kd::layouts::layer_first>(s, 1, 1, 16, 16);
}
static void BM_Convert_KvSplit_To_PageFirst(benchmark::State& s) {
  convert_bench<kd::layouts::layer_first_kv_split, kd::layouts::page_first>(s, 1, 1, 16, 16);
}
static void BM_Convert_LayerFirst_Same_Layout(benchmark::State& s) {
  convert_bench<kd::layouts::layer_first, kd::layouts::layer_first>(s, 1, 1, 16, 16);
}
static void BM_Convert_TP2_To_TP1(benchmark::State& s) {
  convert_bench<kd::layouts::layer_first, kd::layouts::page_first>(s, 2, 1, 16, 16);
}
static void BM_Convert_TP1_To_TP2(benchmark::State& s) {
  convert_bench<kd::layouts::page_first, kd::layouts::layer_first>(s, 1, 2, 16, 16);
}
static void BM_Convert_Block16_To_Block32(benchmark::State& s) {
  convert_bench<kd::layouts::layer_first, kd::layouts::page_first>(s, 1, 1, 16, 32);
}
BENCHMARK(BM_Convert_LayerFirst_To_PageFirst)->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK(BM_Convert_PageFirst_To_LayerFirst)->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK(BM_Convert_KvSplit_To_PageFirst)->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK(BM_Convert_LayerFirst_Same_Layout)->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK(BM_Convert_TP2_To_TP1)->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK(BM_Convert_TP1_To_TP2)->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK(BM_Convert_Block16_To_Block32)->Unit(benchmark::kMicrosecond)->UseRealTime();

// The tiny model: 4 layers, model width 256 (8 KV heads of 32), bf16 KV.
static tiny::model_config tiny_model() {
  return {.layers = 4, .kv_heads = 8, .head_dim = 32, .block_tokens = 16, .vocab = 1024, .dtype = tiny::kv_dtype::bf16};
}

static void BM_TinyEnginePrefill(benchmark::State& state) {
  const auto n = static_cast<std::uint32_t>(state.range(0));
  auto l = kd::layouts::layer_first::make(tiny_model().shard_shape(), n / 16 + 1).value();
  std::vector<std::byte> mem(l.bytes_required(), std::byte{0});
  auto eng = tiny::engine<kd::layouts::layer_first>::make(tiny_model(), l, mem).value();
  std::vector<std::uint32_t> t(n / 16 + 1), prompt(n);
  std::iota(t.begin(), t.end(), 0U);
  for (std::uint32_t i = 0; i < n; ++i) prompt[i] = i * 7 % 1024;
  for (auto _ : state) benchmark::DoNotOptimize(eng.prefill(prompt, {t}).value());
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations() * n));  // items/s = prompt tokens/s
}
BENCHMARK(BM_TinyEnginePrefill)->Arg(128)->Arg(512)->Unit(benchmark::kMillisecond)->UseRealTime();

static void BM_TinyEngineDecodeStep(benchmark::State& state) {
  const auto n = static_cast<std::uint32_t>(state.range(0));
  auto l = kd::layouts::layer_first::make(tiny_model().shard_shape(), n / 16 + 1).value();
  std::vector<std::byte> mem(l.bytes_required(), std::byte{0});
  auto eng = tiny::engine<kd::layouts::layer_first>::make(tiny_model(), l, mem).value();
  std::vector<std::uint32_t> t(n / 16 + 1), prompt(n);
  std::iota(t.begin(), t.end(), 0U);
  for (std::uint32_t i = 0; i < n; ++i) prompt[i] = i * 7 % 1024;
  const auto first = eng.prefill(prompt, {t}).value();
  for (auto _ : state) benchmark::DoNotOptimize(eng.decode(first, n, {t}).value());  // context n + 1
}
BENCHMARK(BM_TinyEngineDecodeStep)->Arg(128)->Arg(512)->Unit(benchmark::kMicrosecond)->UseRealTime();
