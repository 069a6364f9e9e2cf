#include <kvx/memory/offset_allocator.hpp>

#include <gtest/gtest.h>

#include <map>
#include <random>
#include <stdexcept>
#include <vector>

namespace km = kvx::memory;

static_assert(km::allocator<km::offset_allocator>);
static_assert(km::check_allocator<km::offset_allocator>());
static_assert(km::allocator_with_placement<km::offset_allocator>);

TEST(OffsetAllocator, AllocateAtTakesExactlyTheNamedFreeRange) {
  km::offset_allocator a(16 * 1024, 1024);
  auto x = a.allocate_at(4096, 1000);
  ASSERT_TRUE(x);
  EXPECT_EQ(*x, (km::allocation{4096, 1024}));
  EXPECT_EQ(a.free_bytes(), 15U * 1024);
  EXPECT_EQ(a.free_ranges(), 2U) << "the free range split around it";
  EXPECT_FALSE(a.allocate_at(4096, 1)) << "taken";
  EXPECT_FALSE(a.allocate_at(3072, 2048)) << "overlaps the taken range";
  EXPECT_FALSE(a.allocate_at(100, 10)) << "not on a granule: nothing handed out starts there";
  EXPECT_FALSE(a.allocate_at(15 * 1024, 2048)) << "runs past the end";
  EXPECT_FALSE(a.allocate_at(~std::uint64_t{0} - 1023, 1024)) << "offset far past the end";
  auto y = a.allocate_at(0, 4096);  // the whole range below x
  ASSERT_TRUE(y);
  auto z = a.allocate_at(5120, 11 * 1024);  // the whole range above x
  ASSERT_TRUE(z);
  EXPECT_EQ(a.free_bytes(), 0U);
  EXPECT_EQ(a.free_ranges(), 0U);
  a.deallocate(*x);
  a.deallocate(*y);
  a.deallocate(*z);
  EXPECT_EQ(a.free_ranges(), 1U) << "ranges from allocate_at coalesce like any other";
  EXPECT_EQ(a.largest_free_block(), 16U * 1024);
  EXPECT_THROW((void)a.allocate_at(0, 0), std::invalid_argument);
}

TEST(OffsetAllocator, HandsOutGranuleRoundedAlignedRanges) {
  km::offset_allocator a(1 << 20, 256);
  auto x = a.allocate(1000, 1);
  ASSERT_TRUE(x);
  EXPECT_EQ(x->size, 1024U);
  EXPECT_EQ(x->offset % 256, 0U);
  auto y = a.allocate(100, 4096);
  ASSERT_TRUE(y);
  EXPECT_EQ(y->offset % 4096, 0U);
  EXPECT_EQ(a.free_bytes(), (1U << 20) - 1024 - 256);
}

TEST(OffsetAllocator, CoalescesFreedNeighboursBackToOneRange) {
  km::offset_allocator a(64 * 1024, 1024);
  std::vector<km::allocation> xs;
  for (int i = 0; i < 64; ++i) xs.push_back(*a.allocate(1024));
  EXPECT_FALSE(a.allocate(1));
  EXPECT_EQ(a.largest_free_block(), 0U);
  for (int i = 0; i < 64; i += 2) a.deallocate(xs[static_cast<std::size_t>(i)]);
  EXPECT_EQ(a.free_ranges(), 32U);  // fragmented: no two free neighbours
  EXPECT_EQ(a.largest_free_block(), 1024U);
  EXPECT_FALSE(a.allocate(2048));  // 32 KiB free, but not contiguous
  for (int i = 1; i < 64; i += 2) a.deallocate(xs[static_cast<std::size_t>(i)]);
  EXPECT_EQ(a.free_ranges(), 1U);
  EXPECT_EQ(a.largest_free_block(), 64U * 1024);
  EXPECT_TRUE(a.allocate(64 * 1024));
}

TEST(OffsetAllocator, PicksTheBestFittingFreeRange) {
  km::offset_allocator a(16 * 1024, 1024);
  auto x0 = *a.allocate(4096);  // [0,4)
  auto x1 = *a.allocate(1024);  // [4,5)
  auto x2 = *a.allocate(2048);  // [5,7)
  auto x3 = *a.allocate(1024);  // [7,8)
  (void)x1;
  (void)x3;
  a.deallocate(x0);  // free: 4 KiB at 0, 8 KiB at 8 KiB
  a.deallocate(x2);  // free: 2 KiB at 5 KiB
  auto y = a.allocate(2048);
  ASSERT_TRUE(y);
  EXPECT_EQ(y->offset, 5U * 1024);  // the 2 KiB hole, not the 4 KiB or 8 KiB ranges
}

TEST(OffsetAllocator, ExhaustionReturnsNulloptAndBadCallsThrow) {
  km::offset_allocator a(8192, 4096);
  EXPECT_FALSE(a.allocate(8193));
  auto x = a.allocate(8192);
  ASSERT_TRUE(x);
  EXPECT_FALSE(a.allocate(1));
  EXPECT_THROW((void)a.allocate(0), std::invalid_argument);
  EXPECT_THROW((void)a.allocate(10, 3), std::invalid_argument);
  a.deallocate(*x);
  EXPECT_THROW(a.deallocate(*x), std::logic_error);                     // double free
  EXPECT_THROW(a.deallocate({100, 4096}), std::logic_error);            // not granule aligned
  EXPECT_THROW(a.deallocate({4096, 8192}), std::logic_error);           // out of range
  EXPECT_THROW(km::offset_allocator(4096, 3000), std::invalid_argument);  // granule not a power of two
}

// Randomized alloc/free against a reference model: a byte map of who owns
// what. Checks no overlap, alignment, accounting and full coalescing.
TEST(OffsetAllocator, RandomizedAgainstReferenceModel) {
  constexpr std::uint64_t cap = 1 << 20, granule = 64;
  km::offset_allocator a(cap, granule);
  std::vector<int> owner(cap / granule, -1);
  std::map<int, km::allocation> live;
  std::mt19937_64 rng(42);
  std::uint64_t used = 0;
  int next_id = 0;
  for (int step = 0; step < 20000; ++step) {
    const bool do_alloc = live.empty() || rng() % 100 < 55;
    if (do_alloc) {
      const std::uint64_t size = 1 + rng() % 8192;
      const std::uint64_t align = std::uint64_t{1} << (rng() % 13);
      auto x = a.allocate(size, align);
      if (!x) {
        EXPECT_LT(a.largest_free_block(), size + (align > granule ? align : 0)) << "step " << step;
        continue;
      }
      ASSERT_GE(x->size, size);
      ASSERT_EQ(x->offset % align, 0U);
      ASSERT_LE(x->offset + x->size, cap);
      for (std::uint64_t u = x->offset / granule; u < (x->offset + x->size) / granule; ++u) {
        ASSERT_EQ(owner[u], -1) << "overlap at step " << step;
        owner[u] = next_id;
      }
      live[next_id++] = *x;
      used += x->size;
    } else {
      auto it = live.begin();
      std::advance(it, static_cast<long>(rng() % live.size()));
      for (std::uint64_t u = it->second.offset / granule; u < (it->second.offset + it->second.size) / granule; ++u)
        owner[u] = -1;
      used -= it->second.size;
      a.deallocate(it->second);
      live.erase(it);
    }
    ASSERT_EQ(a.free_bytes(), cap - used);
  }
  for (auto& [id, x] : live) a.deallocate(x);
  EXPECT_EQ(a.free_bytes(), cap);
  EXPECT_EQ(a.free_ranges(), 1U);
  EXPECT_EQ(a.largest_free_block(), cap);
}
