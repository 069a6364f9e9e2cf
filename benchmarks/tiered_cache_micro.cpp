// Per-block cost of the tiered cache's index at 1M blocks: lookup (hit and
// miss), insert with eviction, pin/unpin; against the bare hash-map find and
// the copy of the same bytes measured in the same run. Blocks are 64 bytes so
// that the index, not the copy, is what is timed. Each operation runs with
// LRU and with the default policy (`eviction_auto`).
//
//   tiered_cache_micro --benchmark_min_time=0.5
#include <benchmark/benchmark.h>

#include <cstring>
#include <memory>
#include <random>
#include <unordered_map>
#include <vector>

#include <kvx/cache/eviction/eviction_auto.hpp>
#include <kvx/cache/eviction/lru.hpp>
#include <kvx/cache/tiered_cache.hpp>
#include <kvx/cache/tiers/dram_tier.hpp>

namespace kc = kvx::cache;

namespace {
constexpr std::size_t n_blocks = 1 << 20;
constexpr std::size_t block_bytes = 64;

kc::block_key key(std::uint64_t i) { return {i * 0x9E3779B97F4A7C15ULL, i}; }

template <class Policy>
struct fixture {
  using cache_t = kc::tiered_cache<kc::tier_stack<kc::dram_tier<>>, Policy>;
  kvx::metrics::registry reg;
  std::unique_ptr<cache_t> cache;
  std::vector<std::byte> bytes = std::vector<std::byte>(block_bytes, std::byte{7});
  std::uint64_t next = n_blocks;
  fixture() {
    kc::tiered_cache_config cc;
    cc.block_bytes = block_bytes;
    cc.registry = &reg;
    kc::dram_tier_config d;
    d.capacity = n_blocks * block_bytes;
    d.marks = {1.0, 1.0};
    cache = std::make_unique<cache_t>(cc, d);
    for (std::uint64_t i = 0; i < n_blocks; ++i) (void)cache->insert(key(i), bytes);
    // Then churn 5M more blocks through it, so what is timed is the steady
    // state: the policy's history (reuse_class remembers 4x capacity evicted
    // keys) full and its tables done growing.
    for (std::uint64_t i = 0; i < 5 * n_blocks; ++i) (void)cache->insert(key(next++), bytes);
  }
};
// One filled cache per policy, shared by that policy's benchmarks.
template <class Policy>
fixture<Policy>& fx() {
  static fixture<Policy> f;
  return f;
}

void BM_reference_unordered_map_find(benchmark::State& st) {
  std::unordered_map<kc::block_key, std::uint64_t, kc::block_key_hash> m;
  m.reserve(n_blocks);
  for (std::uint64_t i = 0; i < n_blocks; ++i) m.emplace(key(i), i);
  std::mt19937_64 rng(1);
  for (auto _ : st) benchmark::DoNotOptimize(m.find(key(rng() % n_blocks)));
  st.SetItemsProcessed(st.iterations());
}
BENCHMARK(BM_reference_unordered_map_find);

void BM_reference_memcpy_block(benchmark::State& st) {
  std::vector<std::byte> a(block_bytes), b(block_bytes);
  for (auto _ : st) {
    std::memcpy(b.data(), a.data(), block_bytes);
    benchmark::ClobberMemory();
  }
  st.SetBytesProcessed(static_cast<std::int64_t>(st.iterations() * block_bytes));
}
BENCHMARK(BM_reference_memcpy_block);

template <class Policy>
void BM_lookup_hit(benchmark::State& st) {
  auto& f = fx<Policy>();
  auto& c = *f.cache;
  std::mt19937_64 rng(2);
  std::uint8_t tier = 0;
  for (auto _ : st) {
    const kc::block_key k = key(f.next - n_blocks + rng() % n_blocks);  // the resident ones
    benchmark::DoNotOptimize(c.lookup(std::span(&k, 1), std::span(&tier, 1)));
  }
  st.SetItemsProcessed(st.iterations());
}
BENCHMARK(BM_lookup_hit<kc::eviction::lru>);
BENCHMARK(BM_lookup_hit<kc::eviction::eviction_auto>);

template <class Policy>
void BM_lookup_prefix_32_blocks(benchmark::State& st) {
  auto& f = fx<Policy>();
  auto& c = *f.cache;
  std::mt19937_64 rng(3);
  std::vector<kc::block_key> keys(32);
  std::vector<std::uint8_t> tiers(32);
  for (auto _ : st) {
    const std::uint64_t base = f.next - n_blocks + rng() % (n_blocks - 32);
    for (std::size_t i = 0; i < 32; ++i) keys[i] = key(base + i);
    benchmark::DoNotOptimize(c.lookup(keys, tiers));
  }
  st.SetItemsProcessed(st.iterations() * 32);  // per block
}
BENCHMARK(BM_lookup_prefix_32_blocks<kc::eviction::lru>);
BENCHMARK(BM_lookup_prefix_32_blocks<kc::eviction::eviction_auto>);

template <class Policy>
void BM_lookup_miss(benchmark::State& st) {
  auto& c = *fx<Policy>().cache;
  std::uint64_t i = 1ULL << 40;
  for (auto _ : st) {
    const kc::block_key k = key(i++);
    benchmark::DoNotOptimize(c.lookup(std::span(&k, 1), {}));
  }
  st.SetItemsProcessed(st.iterations());
}
BENCHMARK(BM_lookup_miss<kc::eviction::lru>);
BENCHMARK(BM_lookup_miss<kc::eviction::eviction_auto>);

// The cache is full: every insert evicts a block first.
template <class Policy>
void BM_insert_with_eviction(benchmark::State& st) {
  auto& f = fx<Policy>();
  for (auto _ : st) benchmark::DoNotOptimize(f.cache->insert(key(f.next++), f.bytes));
  st.SetItemsProcessed(st.iterations());
}
BENCHMARK(BM_insert_with_eviction<kc::eviction::lru>);
BENCHMARK(BM_insert_with_eviction<kc::eviction::eviction_auto>);

template <class Policy>
void BM_pin_unpin(benchmark::State& st) {
  auto& f = fx<Policy>();
  std::mt19937_64 rng(4);
  for (auto _ : st) {
    auto p = f.cache->pin(key(f.next - 1 - rng() % (n_blocks / 2)));
    benchmark::DoNotOptimize(p);
  }
  st.SetItemsProcessed(st.iterations());
}
BENCHMARK(BM_pin_unpin<kc::eviction::lru>);
BENCHMARK(BM_pin_unpin<kc::eviction::eviction_auto>);

}  // namespace
