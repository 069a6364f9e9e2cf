#include <kvx/cache/tiers/cuda_tier.hpp>

#include <gtest/gtest.h>

#include <cuda_runtime_api.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <kvx/cache/any_tiered_cache.hpp>
#include <kvx/testing/tier_conformance.hpp>
#include <kvx/cache/eviction/lru.hpp>
#include <kvx/cache/tiered_cache.hpp>
#include <kvx/cache/tiering/write_back.hpp>
#include <kvx/cache/tiers/dram_tier.hpp>
#include <kvx/cache/tiers/tier_stack.hpp>
#include <kvx/cuda/device.hpp>
#include <kvx/cuda/memory.hpp>
#include <kvx/memory/slab_allocator.hpp>
#include <kvx/testing/random_bytes.hpp>

namespace kc = kvx::cache;
using kvx::testing::fill_random;
using kvx::testing::first_difference;

static_assert(kc::tier<kc::cuda_tier<>>);
static_assert(kc::check_tier<kc::cuda_tier<kvx::memory::slab_allocator>>());
static_assert(!kc::is_host_accessible_v<kc::cuda_tier<>>);
static_assert(kc::detail::has_footprint<kc::cuda_tier<>>);

namespace {

constexpr std::uint64_t KiB = 1024, MiB = 1024 * KiB;

kc::cuda_tier_config tier_cfg(std::uint64_t capacity, std::size_t lanes = 4, std::uint64_t chunk = 64 * KiB) {
  kc::cuda_tier_config c;
  c.capacity = capacity;
  c.device = 0;
  c.name = "gpu";
  c.lanes = lanes;
  c.staging_chunk = chunk;
  return c;
}

std::vector<std::byte> payload(std::size_t n, std::uint64_t seed) {
  std::vector<std::byte> v(n);
  fill_random(v, seed);
  return v;
}

// Device memory's bytes, read back with a plain cudaMemcpy (the reference).
std::vector<std::byte> device_bytes(const void* p, std::size_t n) {
  std::vector<std::byte> v(n);
  EXPECT_EQ(cudaMemcpy(v.data(), p, n, cudaMemcpyDeviceToHost), cudaSuccess);
  return v;
}

// Page-aligned pageable host memory.
struct page_buffer {
  explicit page_buffer(std::size_t n) : size(n), data(static_cast<std::byte*>(std::aligned_alloc(4096, n))) {
    std::memset(data.get(), 0, n);
  }
  struct free_it {
    void operator()(std::byte* p) const noexcept { std::free(p); }
  };
  std::size_t size;
  std::unique_ptr<std::byte, free_it> data;
};

class CudaTier : public ::testing::Test {
 protected:
  void SetUp() override {
    if (kvx::cuda::device_count() == 0) GTEST_SKIP() << kvx::cuda::skip_reason();
  }
};

}  // namespace

// --- without a device: config checks and the constructor's error ------------

TEST(CudaTierConfig, BadConfigThrowsInvalidArgumentBeforeTouchingTheDevice) {
  EXPECT_THROW(kc::cuda_tier<>(tier_cfg(0)), std::invalid_argument);
  auto c = tier_cfg(MiB);
  c.alignment = 300;
  EXPECT_THROW(kc::cuda_tier<>{c}, std::invalid_argument);
  c = tier_cfg(MiB, 0);
  EXPECT_THROW(kc::cuda_tier<>{c}, std::invalid_argument);
  c = tier_cfg(MiB, 4, 0);
  EXPECT_THROW(kc::cuda_tier<>{c}, std::invalid_argument);
  c = tier_cfg(MiB);
  c.marks = {0.5, 0.9};
  EXPECT_THROW(kc::cuda_tier<>{c}, std::invalid_argument);
  c = tier_cfg(MiB);
  c.device = -1;
  EXPECT_THROW(kc::cuda_tier<>{c}, std::invalid_argument);
  try {
    kc::cuda_tier<> t(tier_cfg(0));
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("cuda_tier 'gpu': capacity is 0"), std::string::npos) << e.what();
  }
}

TEST(CudaTierConfig, WithoutADeviceTheConstructorThrowsSystemErrorNamingTheTier) {
  if (kvx::cuda::device_count() > 0) GTEST_SKIP() << "a CUDA device is present";
  try {
    kc::cuda_tier<> t(tier_cfg(MiB));
    FAIL() << "constructed a cuda_tier without a device";
  } catch (const std::system_error& e) {
    EXPECT_TRUE(e.code());
    EXPECT_STREQ(e.code().category().name(), "kvx");
    EXPECT_NE(std::string(e.what()).find("cuda_tier 'gpu'"), std::string::npos) << e.what();
  }
}

// --- round trips ---------------------------------------------------------------

TEST_F(CudaTier, RoundTripFromPageableHostThroughStagingOfManyChunks) {
  auto cfg = tier_cfg(16 * MiB, 2, 64 * KiB);
  cfg.stage_loads = true;  // both directions through the tier's staging
  kc::cuda_tier<> t(cfg);
  const std::size_t sizes[] = {1, 255, 4096, 64 * KiB, 64 * KiB + 1, 3 * 64 * KiB + 17, MiB + 3};
  std::uint64_t id = 0;
  for (auto n : sizes) {
    auto in = payload(n, id);
    ASSERT_TRUE(t.store({1, id}, in)) << n;
    EXPECT_EQ(t.size_of({1, id}), n);
    std::vector<std::byte> out(n + 100, std::byte{0xEE});
    auto got = t.load({1, id}, out);
    ASSERT_TRUE(got) << got.error().message();
    EXPECT_EQ(*got, n);
    EXPECT_EQ(first_difference(std::span(out).first(n), in), "") << "block of " << n << " bytes";
    EXPECT_EQ(out[n], std::byte{0xEE}) << "load wrote past the block";
    // The device holds exactly the bytes (checked with a plain cudaMemcpy).
    auto r = t.region_of({1, id});
    ASSERT_TRUE(r);
    EXPECT_EQ(first_difference(device_bytes(r->address, n), in), "");
    ++id;
  }
  EXPECT_EQ(t.stats().direct_copies, 0U);
  EXPECT_EQ(t.stats().staged_copies, 2 * std::size(sizes));
  EXPECT_EQ(t.blocks(), std::size(sizes));
}

TEST_F(CudaTier, LoadsIntoPageableMemoryAreLeftToTheDriverByDefault) {
  kc::cuda_tier<> t(tier_cfg(16 * MiB, 2, 64 * KiB));
  auto in = payload(MiB + 3, 5);
  ASSERT_TRUE(t.store({1, 5}, in));
  std::vector<std::byte> out(in.size());
  ASSERT_TRUE(t.load({1, 5}, out));
  EXPECT_EQ(first_difference(out, in), "");
  EXPECT_EQ(t.stats().staged_copies, 1U);
  EXPECT_EQ(t.stats().driver_staged_copies, 1U);
}

TEST_F(CudaTier, RoundTripFromPinnedHostIsDirect) {
  kc::cuda_tier<> t(tier_cfg(16 * MiB));
  const std::size_t n = 3 * MiB + 5;
  auto in = kvx::cuda::pinned_buffer::allocate(n).value();
  auto out = kvx::cuda::pinned_buffer::allocate(n).value();
  fill_random({in.data(), n}, 7);
  ASSERT_TRUE(t.store({2, 1}, {in.data(), n}));
  auto got = t.load({2, 1}, {out.data(), n});
  ASSERT_TRUE(got) << got.error().message();
  EXPECT_EQ(*got, n);
  EXPECT_EQ(first_difference({out.data(), n}, {in.data(), n}), "");
  EXPECT_EQ(t.stats().direct_copies, 2U);
  EXPECT_EQ(t.stats().staged_copies, 0U);
}

TEST_F(CudaTier, RoundTripFromRegisteredHostMemoryIsDirect) {
  kc::cuda_tier<> t(tier_cfg(4 * MiB));
  page_buffer in(MiB), out(MiB);
  fill_random({in.data.get(), in.size}, 8);
  auto pin_in = kvx::cuda::host_registration::pin({in.data.get(), in.size, kvx::memory::location::host()}).value();
  auto pin_out = kvx::cuda::host_registration::pin({out.data.get(), out.size, kvx::memory::location::host()}).value();
  ASSERT_TRUE(t.store({2, 2}, {in.data.get(), in.size}));
  ASSERT_TRUE(t.load({2, 2}, {out.data.get(), out.size}));
  EXPECT_EQ(first_difference({out.data.get(), out.size}, {in.data.get(), in.size}), "");
  EXPECT_EQ(t.stats().direct_copies, 2U);
}

TEST_F(CudaTier, RoundTripFromAndToDeviceMemory) {
  kc::cuda_tier<> t(tier_cfg(16 * MiB));
  const std::size_t n = 2 * MiB + 100;
  auto want = payload(n, 9);
  auto src = kvx::cuda::device_buffer::allocate(n, 0).value();
  auto dst = kvx::cuda::device_buffer::allocate(n, 0).value();
  ASSERT_EQ(cudaMemcpy(src.data(), want.data(), n, cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemset(dst.data(), 0, n), cudaSuccess);
  // Both may still be in flight on the legacy stream, which the tier's
  // non-blocking streams do not wait for.
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  ASSERT_TRUE(t.store({3, 1}, {src.data(), n}));
  auto got = t.load({3, 1}, {dst.data(), n});
  ASSERT_TRUE(got) << got.error().message();
  EXPECT_EQ(*got, n);
  EXPECT_EQ(first_difference(device_bytes(dst.data(), n), want), "");
  EXPECT_EQ(t.stats().direct_copies, 2U);
  // Mixed: a block stored from device memory loads into pageable memory.
  std::vector<std::byte> host(n);
  ASSERT_TRUE(t.load({3, 1}, host));
  EXPECT_EQ(first_difference(host, want), "");
}

TEST_F(CudaTier, SlabAllocatorTierRoundTrips) {
  kc::cuda_tier<kvx::memory::slab_allocator> t(tier_cfg(8 * MiB));
  auto in = payload(100 * KiB, 10);
  ASSERT_TRUE(t.store({4, 1}, in));
  EXPECT_EQ(t.footprint(100 * KiB), 128 * KiB);  // the 128 KiB class
  EXPECT_EQ(t.used_bytes(), 128 * KiB);
  std::vector<std::byte> out(in.size());
  ASSERT_TRUE(t.load({4, 1}, out));
  EXPECT_EQ(first_difference(out, in), "");
}

// --- errors --------------------------------------------------------------------

TEST_F(CudaTier, ReportsMissingDuplicateShortBufferAndEmptyBlock) {
  kc::cuda_tier<> t(tier_cfg(MiB));
  std::vector<std::byte> out(16);
  auto miss = t.load({9, 9}, out);
  EXPECT_EQ(miss.code(), kvx::errc::not_found);
  EXPECT_NE(miss.error().message().find("cuda_tier 'gpu'"), std::string::npos) << miss.error().message();
  auto in = payload(5000, 11);
  ASSERT_TRUE(t.store({5, 1}, in));
  EXPECT_EQ(t.store({5, 1}, in).code(), kvx::errc::already_exists);
  auto shortr = t.load({5, 1}, out);
  EXPECT_EQ(shortr.code(), kvx::errc::out_of_range);
  EXPECT_NE(shortr.error().message().find("5000"), std::string::npos) << shortr.error().message();
  EXPECT_EQ(t.store({5, 2}, std::span<const std::byte>{}).code(), kvx::errc::invalid_argument);
  EXPECT_FALSE(t.contains({5, 2}));
  EXPECT_TRUE(t.erase({5, 1}));
  EXPECT_FALSE(t.erase({5, 1}));
  EXPECT_EQ(t.load({5, 1}, out).code(), kvx::errc::not_found);
  EXPECT_EQ(t.used_bytes(), 0U);
}

TEST_F(CudaTier, FullTierRefusesWithCapacityExceededAndLosesNothing) {
  kc::cuda_tier<> t(tier_cfg(MiB));
  EXPECT_EQ(t.capacity(), MiB);
  auto big = payload(600 * KiB, 12);
  ASSERT_TRUE(t.store({6, 1}, big));
  const auto used = t.used_bytes();
  EXPECT_EQ(used, t.footprint(big.size()));
  auto r = t.store({6, 2}, big);
  EXPECT_EQ(r.code(), kvx::errc::capacity_exceeded);
  EXPECT_NE(r.error().message().find("cuda_tier 'gpu'"), std::string::npos) << r.error().message();
  EXPECT_FALSE(t.contains({6, 2}));
  EXPECT_EQ(t.used_bytes(), used);
  EXPECT_EQ(t.store({6, 3}, payload(2 * MiB, 0)).code(), kvx::errc::capacity_exceeded);  // larger than the tier
  // The first block is intact, and its room comes back on erase.
  std::vector<std::byte> out(big.size());
  ASSERT_TRUE(t.load({6, 1}, out));
  EXPECT_EQ(first_difference(out, big), "");
  EXPECT_TRUE(t.erase({6, 1}));
  EXPECT_TRUE(t.store({6, 2}, big));
}

TEST_F(CudaTier, BufferOfMixedKindsIsRefusedAndTheFailedStoreFreesItsAllocation) {
  kc::cuda_tier<> t(tier_cfg(4 * MiB));
  // Three pages-worth of 64 KiB; only the middle one is page-locked.
  page_buffer host(3 * 64 * KiB);
  fill_random({host.data.get(), host.size}, 13);
  std::byte* middle = host.data.get() + 64 * KiB;
  auto pinned = kvx::cuda::host_registration::pin({middle, 64 * KiB, kvx::memory::location::host()}).value();
  auto r = t.store({7, 1}, {middle, 128 * KiB});  // pinned start, pageable end
  EXPECT_EQ(r.code(), kvx::errc::invalid_argument);
  EXPECT_FALSE(t.contains({7, 1}));
  EXPECT_EQ(t.used_bytes(), 0U);
  ASSERT_TRUE(t.store({7, 1}, {middle, 64 * KiB}));
  auto l = t.load({7, 1}, {middle - 1, 64 * KiB});  // pageable start, pinned end
  EXPECT_EQ(l.code(), kvx::errc::invalid_argument);
  EXPECT_TRUE(t.contains({7, 1}));  // a failed load leaves the block
}

// --- zero-copy access ----------------------------------------------------------

TEST_F(CudaTier, RegionOfAndLocateNameTheBlockOnTheDevice) {
  kc::cuda_tier<> t(tier_cfg(4 * MiB));
  auto in = payload(100 * KiB, 14);
  ASSERT_TRUE(t.store({8, 1}, in));
  auto r = t.region_of({8, 1});
  ASSERT_TRUE(r);
  EXPECT_EQ(r->where, kvx::memory::location::cuda(0));
  EXPECT_EQ(r->length, in.size());
  auto where = t.locate({8, 1});
  ASSERT_TRUE(where);
  EXPECT_EQ(t.region().data() + where->offset, r->data());
  EXPECT_TRUE(t.region().contains(r->address, r->length));
  EXPECT_EQ(first_difference(device_bytes(r->address, r->length), in), "");
  EXPECT_FALSE(t.region_of({8, 2}));
  EXPECT_FALSE(t.borrow({8, 2}));
}

TEST_F(CudaTier, BorrowedBlockOutlivesEraseAndIsFreedWithTheLastHandle) {
  kc::cuda_tier<> t(tier_cfg(4 * MiB));
  auto in = payload(100 * KiB, 15);
  ASSERT_TRUE(t.store({8, 3}, in));
  auto b = t.borrow({8, 3});
  ASSERT_TRUE(b && *b);
  const auto fp = t.footprint(in.size());
  EXPECT_TRUE(t.erase({8, 3}));
  EXPECT_FALSE(t.contains({8, 3}));
  EXPECT_EQ(t.used_bytes(), fp);  // still allocated: the handle holds it
  EXPECT_EQ(first_difference(device_bytes(b->region().address, b->region().length), in), "");
  // The key can be stored again meanwhile, into other memory.
  auto again = payload(100 * KiB, 16);
  ASSERT_TRUE(t.store({8, 3}, again));
  EXPECT_NE(t.region_of({8, 3})->address, b->region().address);
  EXPECT_EQ(t.used_bytes(), 2 * fp);
  b.reset();
  EXPECT_EQ(t.used_bytes(), fp);
}

// --- concurrency ---------------------------------------------------------------

TEST_F(CudaTier, ConcurrentStoresAndLoadsOfDistinctKeysFromManyThreads) {
  // Fewer lanes than threads, so callers also wait for lanes.
  kc::cuda_tier<> t(tier_cfg(128 * MiB, 3, 64 * KiB));
  constexpr int threads = 8, per_thread = 24;
  std::atomic<int> failures{0};
  std::vector<std::thread> pool;
  for (int th = 0; th < threads; ++th)
    pool.emplace_back([&, th] {
      kvx::testing::test_rng rng(static_cast<std::uint64_t>(th) + 1);
      auto pinned = kvx::cuda::pinned_buffer::allocate(512 * KiB).value();
      for (int i = 0; i < per_thread; ++i) {
        const kc::block_key k{static_cast<std::uint64_t>(th), static_cast<std::uint64_t>(i)};
        const auto n = static_cast<std::size_t>(rng.uniform(1, 300 * KiB));
        auto in = payload(n, static_cast<std::uint64_t>(th * 1000 + i));
        std::span<const std::byte> src = in;
        if (i % 3 == 0) {  // every third one from pinned memory
          std::memcpy(pinned.data(), in.data(), n);
          src = {pinned.data(), n};
        }
        if (!t.store(k, src)) ++failures;
        std::vector<std::byte> out(n);
        auto got = t.load(k, out);
        if (!got || *got != n || first_difference(out, in) != "") ++failures;
        if (i % 2 == 1 && !t.erase(k)) ++failures;
      }
    });
  for (auto& th : pool) th.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(t.blocks(), static_cast<std::size_t>(threads * per_thread / 2));
  EXPECT_GT(t.stats().direct_copies, 0U);
  EXPECT_GT(t.stats().staged_copies, 0U);
}

TEST_F(CudaTier, ConcurrentStoresOfOneKeyLeaveOneBlock) {
  kc::cuda_tier<> t(tier_cfg(64 * MiB, 4));
  constexpr int threads = 8;
  std::atomic<int> won{0}, lost{0};
  std::vector<std::thread> pool;
  for (int th = 0; th < threads; ++th)
    pool.emplace_back([&, th] {
      auto in = payload(256 * KiB, static_cast<std::uint64_t>(th));
      auto r = t.store({9, 1}, in);
      if (r)
        ++won;
      else if (r.code() == kvx::errc::already_exists)
        ++lost;
    });
  for (auto& th : pool) th.join();
  EXPECT_EQ(won.load(), 1);
  EXPECT_EQ(lost.load(), threads - 1);
  EXPECT_EQ(t.used_bytes(), t.footprint(256 * KiB));  // the losers' allocations went back
}

// --- under tiered_cache: GPU above DRAM ----------------------------------------

namespace {

constexpr std::uint64_t block = 64 * KiB;
using gpu_dram_cache = kc::tiered_cache<kc::tier_stack<kc::cuda_tier<>, kc::dram_tier<>>, kc::eviction::lru,
                                        kc::tiering::write_back>;

kc::tiered_cache_config cache_cfg(kvx::metrics::registry& reg) {
  kc::tiered_cache_config c;
  c.block_bytes = block;
  c.name = "gpu-dram";
  c.registry = &reg;
  return c;
}
kc::cuda_tier_config gpu_blocks(std::uint64_t blocks) {
  auto c = tier_cfg(blocks * block, 4, 16 * KiB);
  c.marks = {1.0, 1.0};
  return c;
}
kc::dram_tier_config dram_blocks(std::uint64_t blocks) {
  kc::dram_tier_config c;
  c.capacity = blocks * block;
  c.marks = {1.0, 1.0};
  c.alignment = 4096;
  return c;
}

}  // namespace

TEST_F(CudaTier, UnderTieredCacheEvictionDemotesToDramAndReadsPromoteBackByteExact) {
  kvx::metrics::registry reg;
  gpu_dram_cache cache(cache_cfg(reg), gpu_blocks(16), dram_blocks(64));
  constexpr std::uint64_t n = 40;
  std::vector<std::vector<std::byte>> data;
  for (std::uint64_t i = 0; i < n; ++i) {
    data.push_back(payload(block, 100 + i));
    auto r = cache.insert({10, i}, data.back());
    ASSERT_TRUE(r) << r.error().message();
    ASSERT_EQ(*r, kc::insert_status::inserted);
  }
  // 16 blocks fit the GPU; the 24 oldest moved to DRAM.
  EXPECT_EQ(cache.stats(0).evictions, n - 16);
  EXPECT_EQ(cache.stats(1).demotions, n - 16);
  EXPECT_EQ(cache.tiers().get<0>().blocks(), 16U);
  EXPECT_EQ(cache.stats(1).blocks, n - 16);
  for (std::uint64_t i = 0; i < n; ++i)
    EXPECT_EQ(cache.tier_of({10, i}), i < n - 16 ? 1U : 0U) << i;
  // Demoted bytes are byte-exact in DRAM, where the cache placed them (the
  // DRAM tier takes placements, so the cache's index says where).
  auto where = cache.locate({10, 0}, 1);
  ASSERT_TRUE(where);
  std::vector<std::byte> out(cache.tiers().get<1>().base() + where->offset,
                             cache.tiers().get<1>().base() + where->offset + block);
  EXPECT_EQ(first_difference(out, data[0]), "");

  // Reading a DRAM block serves it from DRAM and promotes it to the GPU.
  for (std::uint64_t i = 0; i < 4; ++i) {
    std::fill(out.begin(), out.end(), std::byte{0});
    auto r = cache.read({10, i}, out);
    ASSERT_TRUE(r) << r.error().message();
    EXPECT_EQ(r->tier, 1U);
    EXPECT_TRUE(r->promoted);
    EXPECT_EQ(first_difference(out, data[i]), "");
    EXPECT_EQ(cache.tier_of({10, i}), 0U);
    auto region = cache.tiers().get<0>().region_of({10, i});
    ASSERT_TRUE(region);
    EXPECT_EQ(first_difference(device_bytes(region->address, region->length), data[i]), "");
  }
  EXPECT_EQ(cache.stats(1).promotions, 4U);
  // Every block, wherever it is now, reads back byte-exact, into pinned memory too.
  auto pinned = kvx::cuda::pinned_buffer::allocate(block).value();
  for (std::uint64_t i = 0; i < n; ++i) {
    auto r = cache.read({10, i}, {pinned.data(), block});
    ASSERT_TRUE(r) << r.error().message();
    EXPECT_EQ(r->bytes, block);
    EXPECT_EQ(first_difference({pinned.data(), block}, data[i]), "") << "block " << i << " from tier " << r->tier;
  }
  EXPECT_EQ(cache.size(), n);
}

TEST_F(CudaTier, UnderTieredCachePinnedBlockStaysOnTheGpuForZeroCopyUse) {
  kvx::metrics::registry reg;
  gpu_dram_cache cache(cache_cfg(reg), gpu_blocks(4), dram_blocks(64));
  auto first = payload(block, 200);
  ASSERT_TRUE(cache.insert({11, 0}, first));
  auto pin = cache.pin({11, 0});
  ASSERT_TRUE(pin);
  auto region = cache.tiers().get<0>().region_of({11, 0});
  ASSERT_TRUE(region);
  for (std::uint64_t i = 1; i < 20; ++i) ASSERT_TRUE(cache.insert({11, i}, payload(block, 200 + i)));
  // Pinned: never evicted, so the region stayed valid and unchanged.
  EXPECT_EQ(cache.tier_of({11, 0}), 0U);
  EXPECT_EQ(cache.tiers().get<0>().region_of({11, 0})->address, region->address);
  EXPECT_EQ(first_difference(device_bytes(region->address, region->length), first), "");
}

TEST_F(CudaTier, UnderTieredCacheConcurrentInsertsAndReadsStayByteExact) {
  kvx::metrics::registry reg;
  constexpr int threads = 4, per_thread = 32;
  gpu_dram_cache cache(cache_cfg(reg), gpu_blocks(24), dram_blocks(threads * per_thread + 16));
  std::atomic<int> failures{0};
  std::vector<std::thread> pool;
  for (int th = 0; th < threads; ++th)
    pool.emplace_back([&, th] {
      std::vector<std::byte> out(block);
      for (int i = 0; i < per_thread; ++i) {
        const kc::block_key k{12, static_cast<std::uint64_t>(th * 1000 + i)};
        auto in = payload(block, static_cast<std::uint64_t>(th * 1000 + i));
        if (!cache.insert(k, in)) ++failures;
        // Read back one of this thread's earlier blocks (maybe demoted by now).
        const int j = i / 2;
        const kc::block_key old{12, static_cast<std::uint64_t>(th * 1000 + j)};
        auto r = cache.read(old, out);
        if (!r || first_difference(out, payload(block, static_cast<std::uint64_t>(th * 1000 + j))) != "") ++failures;
      }
    });
  for (auto& th : pool) th.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(cache.size(), static_cast<std::size_t>(threads * per_thread));
  EXPECT_GT(cache.stats(1).demotions, 0U);
}

// ---- from JSON: any_tiered_cache -------------------------------------------------

namespace {

const char* gpu_over_dram_config = R"({"name": "gpu-cfg", "block_bytes": 65536, "eviction": "lru",
    "tiers": [{"kind": "cuda", "name": "gpu", "capacity": "256KiB", "device": 0, "lanes": 2},
              {"kind": "dram", "name": "dram", "capacity": "4MiB"}]})";

TEST(AnyTieredCacheCuda, ACudaTierWithoutADeviceIsNotSupportedAndSaysWhy) {
  if (kvx::cuda::device_count() > 0) GTEST_SKIP() << "a CUDA device is present";
  kvx::metrics::registry reg;
  auto c = kc::any_tiered_cache::make(gpu_over_dram_config, &reg);
  ASSERT_FALSE(c);
  EXPECT_EQ(c.code(), kvx::errc::not_supported);
  EXPECT_NE(c.error().message().find("tiers[0].device"), std::string::npos) << c.error().message();
}

TEST(AnyTieredCacheCuda, UnknownFieldsOfACudaTierAreRefused) {
  kvx::metrics::registry reg;
  auto c = kc::any_tiered_cache::make(R"({"block_bytes": 4096,
      "tiers": [{"kind": "cuda", "capacity": "1MiB", "path": "/tmp"}]})", &reg);
  ASSERT_FALSE(c);
  EXPECT_EQ(c.code(), kvx::errc::invalid_argument) << c.error().message();
}

TEST(AnyTieredCacheCuda, BuildsAGpuOverDramStackThatEvictsToDramAndReadsBack) {
  if (kvx::cuda::device_count() == 0) GTEST_SKIP() << kvx::cuda::skip_reason();
  kvx::metrics::registry reg;
  auto c = kc::any_tiered_cache::make(gpu_over_dram_config, &reg);
  ASSERT_TRUE(c) << c.error().message();
  auto& cache = **c;
  EXPECT_EQ(cache.tier_name(0), "gpu");
  std::vector<std::vector<std::byte>> blocks;
  for (std::uint64_t i = 0; i < 8; ++i) {
    auto& b = blocks.emplace_back(65536);
    fill_random(b, 40 + i);
    ASSERT_TRUE(cache.insert({9, i}, b));
  }
  EXPECT_EQ(cache.tier_of({9, 0}), 1U) << "4 blocks of GPU: the oldest went to DRAM";
  for (std::uint64_t i = 0; i < 8; ++i) {
    std::vector<std::byte> out(65536);
    auto r = cache.read({9, i}, out);
    ASSERT_TRUE(r) << r.error().message();
    EXPECT_EQ(first_difference(out, blocks[i]), "") << "block " << i;
  }
}

}  // namespace

// ---- the shared tier conformance suite ------------------------------------------

namespace {

struct cuda_factory {
  using tier_type = kc::cuda_tier<>;
  static std::unique_ptr<tier_type> make(std::uint64_t capacity) {
    kc::cuda_tier_config c;
    c.capacity = capacity;
    c.lanes = 2;
    return std::make_unique<tier_type>(c);
  }
  static std::string skip_reason() { return kvx::cuda::skip_reason(); }
};

}  // namespace

KVX_INSTANTIATE_TIER_CONFORMANCE(CudaTierConformance, cuda_factory);
