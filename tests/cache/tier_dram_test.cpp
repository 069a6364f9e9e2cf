#include <kvx/cache/tiers/dram_tier.hpp>

#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include <kvx/memory/slab_allocator.hpp>

namespace kc = kvx::cache;

static_assert(kc::tier<kc::dram_tier<>>);
static_assert(kc::tier<kc::dram_tier<kvx::memory::slab_allocator>>);
static_assert(kc::is_host_accessible_v<kc::dram_tier<>>);
static_assert(kc::has_placement_v<kc::dram_tier<>>);

namespace {
kc::dram_tier_config dram_cfg(std::uint64_t cap) {
  kc::dram_tier_config c;
  c.capacity = cap;
  return c;
}
std::vector<std::byte> dram_pattern(std::size_t n, unsigned seed) {
  std::vector<std::byte> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<std::byte>((i * 31 + seed) & 0xFF);
  return v;
}
}  // namespace

TEST(DramTier, StoresAndLoadsBlocksByKey) {
  kc::dram_tier<> t(dram_cfg(1 << 20));
  auto a = dram_pattern(5000, 1), b = dram_pattern(100, 2);
  ASSERT_TRUE(t.store({0, 1}, a));
  ASSERT_TRUE(t.store({0, 2}, b));
  std::vector<std::byte> out(8192);
  auto n = t.load({0, 1}, out);
  ASSERT_TRUE(n);
  EXPECT_EQ(*n, 5000U);
  EXPECT_EQ(0, std::memcmp(out.data(), a.data(), a.size()));
  EXPECT_EQ(*t.load({0, 2}, out), 100U);
  EXPECT_EQ(0, std::memcmp(out.data(), b.data(), b.size()));
  EXPECT_TRUE(t.contains({0, 1}));
  EXPECT_EQ(t.size_of({0, 1}), 5000U);
  EXPECT_EQ(t.blocks(), 2U);
  // Zero-copy view: the arena holds the bytes at locate()'s offset.
  auto where = t.locate({0, 1});
  ASSERT_TRUE(where);
  EXPECT_EQ(0, std::memcmp(t.base() + where->offset, a.data(), a.size()));
  EXPECT_EQ(t.length(), 1U << 20);
}

TEST(DramTier, ReportsMissingDuplicateFullAndShortBuffer) {
  kc::dram_tier<> t(dram_cfg(64 * 1024));
  std::vector<std::byte> out(16);
  EXPECT_EQ(t.load({9, 9}, out).code(), kvx::errc::not_found);
  auto big = dram_pattern(40000, 3);
  ASSERT_TRUE(t.store({1, 1}, big));
  EXPECT_EQ(t.store({1, 1}, big).code(), kvx::errc::already_exists);
  auto r = t.store({1, 2}, big);
  EXPECT_EQ(r.code(), kvx::errc::capacity_exceeded);
  EXPECT_NE(r.error().message().find("dram"), std::string::npos);
  EXPECT_EQ(t.load({1, 1}, out).code(), kvx::errc::out_of_range);
  EXPECT_EQ(t.store({1, 3}, std::span<const std::byte>{}).code(), kvx::errc::invalid_argument);
  EXPECT_TRUE(t.erase({1, 1}));
  EXPECT_FALSE(t.erase({1, 1}));
  EXPECT_TRUE(t.store({1, 2}, big));  // room came back
}

TEST(DramTier, UsedBytesFollowStoresAndErases) {
  kc::dram_tier<> t(dram_cfg(1 << 20));
  EXPECT_EQ(t.used_bytes(), 0U);
  ASSERT_TRUE(t.store({0, 1}, dram_pattern(1000, 0)));
  EXPECT_GE(t.used_bytes(), 1000U);
  t.erase({0, 1});
  EXPECT_EQ(t.used_bytes(), 0U);
}

TEST(DramTier, RejectsBadConfig) {
  EXPECT_THROW(kc::dram_tier<>(dram_cfg(0)), std::invalid_argument);
  auto c = dram_cfg(4096);
  c.marks = {0.5, 0.9};  // low above high
  EXPECT_THROW(kc::dram_tier<> t(c), std::invalid_argument);
  c = dram_cfg(4096);
  c.alignment = 48;
  EXPECT_THROW(kc::dram_tier<> t(c), std::invalid_argument);
  c = dram_cfg(4096);
  c.alignment = 8192;  // the tier would hold nothing
  try {
    kc::dram_tier<> t(c);
    ADD_FAILURE() << "a tier smaller than one alignment unit was built";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("below one alignment unit"), std::string::npos) << e.what();
  }
}

TEST(DramTier, ConcurrentStoresAndLoadsOfDistinctKeys) {
  kc::dram_tier<> t(dram_cfg(8 << 20));
  std::vector<std::thread> ths;
  for (unsigned w = 0; w < 4; ++w)
    ths.emplace_back([&, w] {
      std::vector<std::byte> out(4096);
      for (std::uint64_t i = 0; i < 200; ++i) {
        const kc::block_key k{w, i};
        auto p = dram_pattern(4096, static_cast<unsigned>(w * 1000 + i));
        ASSERT_TRUE(t.store(k, p));
        ASSERT_TRUE(t.load(k, out));
        ASSERT_EQ(0, std::memcmp(out.data(), p.data(), p.size()));
        if (i % 2) {
          ASSERT_TRUE(t.erase(k));
        }
      }
    });
  for (auto& th : ths) th.join();
  EXPECT_EQ(t.blocks(), 400U);
}

TEST(DramTier, SlabAllocatorCarvesTheArenaInSizeClasses) {
  auto c = dram_cfg(2 << 20);  // two 1 MiB slabs of the default classes (4 KiB .. 1 MiB)
  c.alignment = 4096;
  kc::dram_tier<kvx::memory::slab_allocator> t(c);
  EXPECT_EQ(t.footprint(5000), 8192U);  // the 8 KiB class
  auto a = dram_pattern(5000, 4);
  ASSERT_TRUE(t.store({3, 3}, a));
  std::vector<std::byte> out(5000);
  ASSERT_TRUE(t.load({3, 3}, out));
  EXPECT_EQ(out, a);
  EXPECT_EQ(t.used_bytes(), 8192U);
}

TEST(DramTier, PlacementsAreTheCallersAndShareTheArena) {
  kc::dram_tier<> t(dram_cfg(64 * 1024));
  auto a = t.place(5000);
  ASSERT_TRUE(a);
  EXPECT_EQ(a->size, t.footprint(5000));
  auto bytes = dram_pattern(5000, 4);
  ASSERT_TRUE(t.write_at(*a, bytes));
  std::vector<std::byte> out(5000);
  auto n = t.read_at(*a, out);
  ASSERT_TRUE(n);
  EXPECT_EQ(*n, 5000U);
  EXPECT_EQ(out, bytes);
  EXPECT_EQ(0, std::memcmp(t.base() + a->offset, bytes.data(), bytes.size()));
  EXPECT_EQ(t.used_bytes(), a->size);  // counted by the arena
  EXPECT_EQ(t.blocks(), 0U);            // but in no key index
  // Keyed blocks take other ranges of the same arena.
  ASSERT_TRUE(t.store({0, 1}, dram_pattern(100, 5)));
  EXPECT_NE(t.locate({0, 1})->offset, a->offset);
  t.unplace(*a);
  EXPECT_EQ(t.used_bytes(), t.footprint(100));
}

TEST(DramTier, PlacementRefusesEmptyOversizedAndOverrunningCopies) {
  kc::dram_tier<> t(dram_cfg(64 * 1024));
  EXPECT_FALSE(t.place(0));
  EXPECT_FALSE(t.place(64 * 1024 + 1));
  auto a = t.place(64);
  ASSERT_TRUE(a);
  std::vector<std::byte> big(a->size + 1);
  EXPECT_EQ(t.write_at(*a, big).code(), kvx::errc::out_of_range);
  EXPECT_EQ(t.read_at(*a, big).code(), kvx::errc::out_of_range);
  t.unplace(*a);
  EXPECT_EQ(t.used_bytes(), 0U);
}
