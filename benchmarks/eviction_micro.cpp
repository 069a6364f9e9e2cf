// Per-operation cost of each eviction policy's in-memory index at 1M blocks:
// a hit (lookup and reorder) and an insert that evicts (victim + on_insert).
// Reference, same run: one lookup in a std::unordered_map of 1M block keys,
// the floor any hashed index pays.
#include <cstdint>
#include <random>
#include <unordered_map>
#include <vector>

#include <benchmark/benchmark.h>

#include <kvx/cache/eviction.hpp>

namespace ev = kvx::cache::eviction;
using kvx::cache::access_context;
using kvx::cache::block_key;

namespace {

constexpr std::size_t blocks = 1'000'000;

block_key key(std::uint64_t i) { return block_key{0x9E3779B97F4A7C15ULL * (i + 1), i}; }

std::vector<std::uint64_t> random_indices(std::size_t n, std::size_t range) {
  std::mt19937_64 rng(1);
  std::vector<std::uint64_t> v(n);
  for (auto& x : v) x = rng() % range;
  return v;
}

template <class P>
void fill(P& p) {
  for (std::uint64_t i = 0; i < blocks; ++i) {
    const block_key parent = key(i - 1);
    p.on_insert(key(i), access_context{i, i + blocks, 0, i % 16 ? &parent : nullptr});
  }
}

template <class P>
void BM_hit(benchmark::State& state) {
  P p(blocks);
  fill(p);
  const auto idx = random_indices(1 << 20, blocks);
  std::uint64_t now = blocks, n = 0;
  for (auto _ : state) {
    const auto i = idx[n++ & ((1 << 20) - 1)];
    p.on_hit(key(i), access_context{++now, now + blocks});
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()));
}

template <class P>
void BM_insert_evict(benchmark::State& state) {
  P p(blocks);
  fill(p);
  auto all = [](const block_key&) { return true; };
  std::uint64_t next = blocks, now = blocks;
  for (auto _ : state) {
    auto v = p.victim(all);
    benchmark::DoNotOptimize(v);
    const block_key parent = key(next - 1);
    p.on_insert(key(next), access_context{++now, now + blocks, 0, next % 16 ? &parent : nullptr});
    ++next;
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()));
}

void BM_reference_unordered_map_lookup(benchmark::State& state) {
  std::unordered_map<block_key, std::uint64_t, kvx::cache::block_key_hash> m;
  m.reserve(blocks);
  for (std::uint64_t i = 0; i < blocks; ++i) m.emplace(key(i), i);
  const auto idx = random_indices(1 << 20, blocks);
  std::uint64_t n = 0;
  for (auto _ : state) {
    auto it = m.find(key(idx[n++ & ((1 << 20) - 1)]));
    benchmark::DoNotOptimize(it);
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()));
}

}  // namespace

BENCHMARK(BM_reference_unordered_map_lookup);
#define KVX_EVICTION_BENCH(P)                 \
  BENCHMARK_TEMPLATE(BM_hit, ev::P);          \
  BENCHMARK_TEMPLATE(BM_insert_evict, ev::P);
KVX_EVICTION_BENCH(lru)
KVX_EVICTION_BENCH(lfu)
KVX_EVICTION_BENCH(s3fifo)
KVX_EVICTION_BENCH(arc)
KVX_EVICTION_BENCH(sieve)
KVX_EVICTION_BENCH(prefix_aware)
KVX_EVICTION_BENCH(belady)
KVX_EVICTION_BENCH(reuse_class)
