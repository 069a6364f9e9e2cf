// Costs of the core pieces that sit on hot paths: a counter add and a
// histogram observation (every transfer does both).
#include <kvx/core/metrics.hpp>

#include <benchmark/benchmark.h>

static void BM_CounterAdd(benchmark::State& state) {
  kvx::metrics::registry reg;
  auto& c = reg.counter("kvx_bench_total", "bench");
  for (auto _ : state) c.add(4096);
  benchmark::DoNotOptimize(c.value());
}
BENCHMARK(BM_CounterAdd)->ThreadRange(1, 2);

static void BM_HistogramObserve(benchmark::State& state) {
  kvx::metrics::registry reg;
  auto& h = reg.histogram("kvx_bench_seconds", "bench");
  double v = 1e-6;
  for (auto _ : state) {
    h.observe(v);
    v = v < 1.0 ? v * 1.5 : 1e-6;
  }
  benchmark::DoNotOptimize(h.count());
}
BENCHMARK(BM_HistogramObserve)->ThreadRange(1, 2);
