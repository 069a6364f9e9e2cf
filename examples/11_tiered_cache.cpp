// 11_tiered_cache: prefix-hashed KV blocks in a DRAM + SSD cache.
//
// A prompt is cut into 16-token blocks and keyed by a chained hash; the
// blocks' KV bytes go into a two-tier cache (a small DRAM tier that writes
// back to a file tier); a second request sharing the prefix finds it, pins
// it and reads it back, some of it from the file tier.
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <numeric>
#include <vector>

#include <kvx/cache.hpp>

namespace kc = kvx::cache;

int main() {
  // 1. Keys: namespace + block size + tokens, nothing else.
  kc::hasher_config hc;
  hc.block_tokens = 16;
  hc.ns.model = "llama-3-8b";
  hc.ns.tenant = "acme";
  auto hasher = kc::block_hasher::make(hc);
  if (!hasher) return std::fprintf(stderr, "%s\n", hasher.error().message().c_str()), 1;
  std::vector<std::uint32_t> prompt(16 * 8 + 5);  // 8 full blocks; the last 5 tokens are not keyed
  std::iota(prompt.begin(), prompt.end(), 1000U);
  const std::vector<kc::block_key> keys = hasher->keys(prompt);

  // 2. The cache: 4 blocks of DRAM over 64 blocks of file, LRU, write-back.
  constexpr std::uint64_t block_bytes = 64 * 1024;
  kc::dram_tier_config dram;
  dram.capacity = 4 * block_bytes;
  dram.alignment = 4096;
  dram.marks = {1.0, 0.75};
  kc::file_tier_config ssd;
  ssd.path = std::filesystem::temp_directory_path().string();
  ssd.capacity = 64 * block_bytes;
  kvx::metrics::registry metrics;
  kc::tiered_cache_config cc;
  cc.block_bytes = block_bytes;
  cc.name = "example";
  cc.registry = &metrics;
  using cache_t = kc::tiered_cache<kc::tier_stack<kc::dram_tier<>, kc::file_tier<>>, kc::eviction::lru,
                                   kc::tiering::write_back>;
  cache_t cache(cc, dram, ssd);

  // 3. Prefill computed the KV of every block: cache it (parent = previous key).
  std::vector<std::byte> kv(block_bytes);
  for (std::size_t i = 0; i < keys.size(); ++i) {
    std::memset(kv.data(), static_cast<int>(i), kv.size());
    auto r = cache.insert(keys[i], kv, i ? std::optional(keys[i - 1]) : std::nullopt);
    if (!r) return std::fprintf(stderr, "insert: %s\n", r.error().message().c_str()), 1;
  }

  // 4. The next request shares the prompt: how much of it is cached, where?
  auto hit = cache.lookup(keys);
  std::printf("cached prefix: %zu of %zu blocks;", hit.blocks, keys.size());
  for (auto t : hit.tiers) std::printf(" %s", t == 0 ? "dram" : "file");
  std::printf("\n");

  // 5. Pin the prefix (nothing of it is evicted meanwhile) and read it back.
  auto pins = cache.pin_prefix(keys);
  for (std::size_t i = 0; i < pins.size(); ++i) {
    auto r = cache.read(keys[i], kv);
    if (!r || kv[0] != static_cast<std::byte>(i)) return std::fprintf(stderr, "block %zu read back wrong\n", i), 1;
  }
  pins.clear();
  // While all 8 were pinned, DRAM had no room to promote into. Now block 0's
  // hit in the file tier is copied up (write-back promotes on hit).
  if (auto r = cache.read(keys[0], kv); !r || !r->promoted) return std::fprintf(stderr, "block 0 not promoted\n"), 1;
  std::printf("read %zu blocks back intact; dram now holds %llu blocks\n", hit.blocks,
              static_cast<unsigned long long>(cache.stats(0).blocks));
  std::printf("evictions from dram %llu, demotions to file %llu, promotions from file %llu\n",
              static_cast<unsigned long long>(cache.stats(0).evictions),
              static_cast<unsigned long long>(cache.stats(1).demotions),
              static_cast<unsigned long long>(cache.stats(1).promotions));
  return hit.blocks == keys.size() ? 0 : 1;
}
