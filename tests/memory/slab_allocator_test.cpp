#include <kvx/memory/slab_allocator.hpp>

#include <gtest/gtest.h>

#include <map>
#include <random>
#include <set>
#include <stdexcept>
#include <vector>

namespace km = kvx::memory;

static_assert(km::allocator<km::slab_allocator>);

namespace {
km::slab_config small_cfg() {
  km::slab_config c;
  c.slab_bytes = 16 * 1024;
  c.classes = {1024, 4096, 16 * 1024};
  return c;
}
}  // namespace

TEST(SlabAllocator, GrantsTheSmallestFittingClass) {
  km::slab_allocator a(64 * 1024, small_cfg());
  EXPECT_EQ(a.allocate(1)->size, 1024U);
  EXPECT_EQ(a.allocate(1025)->size, 4096U);
  EXPECT_EQ(a.allocate(16 * 1024)->size, 16U * 1024);
  EXPECT_FALSE(a.allocate(16 * 1024 + 1));  // above the largest class
}

TEST(SlabAllocator, EmptySlabReturnsToThePoolForOtherClasses) {
  km::slab_allocator a(32 * 1024, small_cfg());  // 2 slabs
  std::vector<km::allocation> small;
  for (int i = 0; i < 32; ++i) small.push_back(*a.allocate(1024));  // fills both slabs
  EXPECT_EQ(a.free_slabs(), 0U);
  EXPECT_FALSE(a.allocate(4096));
  for (int i = 0; i < 16; ++i) a.deallocate(small[static_cast<std::size_t>(i)]);  // empties slab 0
  EXPECT_EQ(a.free_slabs(), 1U);
  EXPECT_EQ(a.allocate(4096)->size, 4096U);
}

TEST(SlabAllocator, LargerClassServesWhenNoSlabIsFree) {
  km::slab_allocator a(16 * 1024, small_cfg());  // 1 slab
  auto x = a.allocate(4096);
  ASSERT_TRUE(x);
  auto y = a.allocate(100);  // no free slab for 1 KiB: taken from the 4 KiB slab
  ASSERT_TRUE(y);
  EXPECT_EQ(y->size, 4096U);
}

TEST(SlabAllocator, RejectsBadFreesAndBadConfigs) {
  km::slab_allocator a(32 * 1024, small_cfg());
  auto x = *a.allocate(1024);
  EXPECT_THROW(a.deallocate({x.offset + 1, 1024}), std::logic_error);
  EXPECT_THROW(a.deallocate({x.offset, 4096}), std::logic_error);
  EXPECT_THROW(a.deallocate({16 * 1024, 1024}), std::logic_error);  // slab not in use
  a.deallocate(x);
  EXPECT_THROW(a.deallocate(x), std::logic_error);
  EXPECT_THROW((void)a.allocate(0), std::invalid_argument);
  km::slab_config bad = small_cfg();
  bad.classes = {32 * 1024};
  EXPECT_THROW(km::slab_allocator(64 * 1024, bad), std::invalid_argument);
  bad.classes = {};
  EXPECT_THROW(km::slab_allocator(64 * 1024, bad), std::invalid_argument);
  EXPECT_THROW(km::slab_allocator(8 * 1024, small_cfg()), std::invalid_argument);  // below one slab
}

TEST(SlabAllocator, RandomizedAgainstReferenceModel) {
  km::slab_allocator a(1 << 20, small_cfg());
  std::map<std::uint64_t, std::uint64_t> live;  // offset -> size
  std::mt19937_64 rng(7);
  std::uint64_t used = 0;
  for (int step = 0; step < 20000; ++step) {
    if (live.empty() || rng() % 100 < 55) {
      const std::uint64_t size = 1 + rng() % (16 * 1024);
      auto x = a.allocate(size, 1024);
      if (!x) continue;
      ASSERT_GE(x->size, size);
      ASSERT_EQ(x->offset % 1024, 0U);
      auto next = live.lower_bound(x->offset);
      if (next != live.end()) {
        ASSERT_LE(x->offset + x->size, next->first) << "overlap";
      }
      if (next != live.begin()) {
        auto prev = std::prev(next);
        ASSERT_LE(prev->first + prev->second, x->offset) << "overlap";
      }
      live[x->offset] = x->size;
      used += x->size;
    } else {
      auto it = live.begin();
      std::advance(it, static_cast<long>(rng() % live.size()));
      a.deallocate({it->first, it->second});
      used -= it->second;
      live.erase(it);
    }
    ASSERT_EQ(a.free_bytes(), a.capacity() - used);
  }
  for (auto& [o, s] : live) a.deallocate({o, s});
  EXPECT_EQ(a.free_slabs(), a.capacity() / (16 * 1024));
}
