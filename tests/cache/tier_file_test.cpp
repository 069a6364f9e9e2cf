#include <kvx/cache/tiers/file_tier.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <thread>
#include <vector>

#include <kvx/memory/slab_allocator.hpp>

namespace kc = kvx::cache;

static_assert(kc::tier<kc::file_tier<>>);
static_assert(kc::tier<kc::file_tier<kvx::memory::slab_allocator>>);
static_assert(!kc::is_host_accessible_v<kc::file_tier<>>);

namespace {
kc::file_tier_config file_cfg(std::uint64_t cap, std::string path = KVX_BINARY_DIR) {
  kc::file_tier_config c;
  c.path = std::move(path);
  c.capacity = cap;
  return c;
}
std::vector<std::byte> file_pattern(std::size_t n, unsigned seed) {
  std::vector<std::byte> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<std::byte>((i * 7 + seed) & 0xFF);
  return v;
}
struct aligned_vec {
  explicit aligned_vec(std::size_t n) : p(static_cast<std::byte*>(std::aligned_alloc(4096, n))), size(n) {}
  ~aligned_vec() { std::free(p); }
  std::span<std::byte> span() { return {p, size}; }
  std::byte* p;
  std::size_t size;
};
}  // namespace

TEST(FileTier, StoresAndLoadsAlignedAndUnalignedBlocks) {
  kc::file_tier<> t(file_cfg(1 << 20));
  auto odd = file_pattern(5000, 1);  // not a multiple of 4 KiB: bounce-buffered under O_DIRECT
  aligned_vec al(8192);
  auto p = file_pattern(8192, 2);
  std::memcpy(al.p, p.data(), p.size());
  ASSERT_TRUE(t.store({0, 1}, odd));
  ASSERT_TRUE(t.store({0, 2}, std::span<const std::byte>(al.p, al.size)));
  std::vector<std::byte> out(6000);
  EXPECT_EQ(*t.load({0, 1}, out), 5000U);
  EXPECT_EQ(0, std::memcmp(out.data(), odd.data(), odd.size()));
  aligned_vec back(8192);
  EXPECT_EQ(*t.load({0, 2}, back.span()), 8192U);
  EXPECT_EQ(0, std::memcmp(back.p, p.data(), p.size()));
  std::vector<std::byte> unaligned_out(8193);
  EXPECT_EQ(*t.load({0, 2}, std::span<std::byte>(unaligned_out).subspan(1)), 8192U);
  EXPECT_EQ(0, std::memcmp(unaligned_out.data() + 1, p.data(), p.size()));
  EXPECT_EQ(t.used_bytes(), 8192U + 8192U);  // whole 4 KiB units
}

TEST(FileTier, ReportsMissingDuplicateFullAndShortBuffer) {
  kc::file_tier<> t(file_cfg(16 * 1024));
  std::vector<std::byte> out(10);
  EXPECT_EQ(t.load({1, 1}, out).code(), kvx::errc::not_found);
  auto b = file_pattern(12000, 1);
  ASSERT_TRUE(t.store({1, 1}, b));
  EXPECT_EQ(t.store({1, 1}, b).code(), kvx::errc::already_exists);
  EXPECT_EQ(t.store({1, 2}, b).code(), kvx::errc::capacity_exceeded);
  EXPECT_EQ(t.load({1, 1}, out).code(), kvx::errc::out_of_range);
  EXPECT_TRUE(t.erase({1, 1}));
  EXPECT_TRUE(t.store({1, 2}, b));
}

TEST(FileTier, NamedFileIsCreatedAndSized) {
  const auto path = std::filesystem::path(KVX_BINARY_DIR) / "tiers_file_tier_test.bin";
  std::filesystem::remove(path);
  {
    kc::file_tier<> t(file_cfg(64 * 1024, path.string()));
    ASSERT_TRUE(t.store({2, 2}, file_pattern(4096, 9)));
    EXPECT_EQ(std::filesystem::file_size(path), 64U * 1024);
  }
  std::filesystem::remove(path);
}

TEST(FileTier, BadConfigThrowsNamingTheProblem) {
  EXPECT_THROW(kc::file_tier<>(file_cfg(1 << 20, "")), std::invalid_argument);
  EXPECT_THROW(kc::file_tier<>(file_cfg(100)), std::invalid_argument);
  try {
    kc::file_tier<> t(file_cfg(1 << 20, "/nonexistent-dir-kvx/x/y"));
    FAIL() << "opened a file in a missing directory";
  } catch (const std::system_error& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent-dir-kvx/x/y"), std::string::npos);
  }
}

// Loads 40 blocks of mixed sizes, one missing key and one short buffer with
// `readers` preads in flight; returns the order in which they were reported.
std::vector<std::size_t> load_many_with(unsigned readers) {
  auto cfg = file_cfg(1 << 20);
  cfg.readers = readers;
  kc::file_tier<> t(cfg);
  std::vector<kc::block_key> keys;
  std::vector<std::vector<std::byte>> want, bufs;
  for (std::uint64_t i = 0; i < 40; ++i) {
    keys.push_back({7, i});
    want.push_back(file_pattern(4096 * (1 + i % 3), static_cast<unsigned>(i)));
    EXPECT_TRUE(t.store(keys.back(), want.back()));
    bufs.emplace_back(want.back().size());
  }
  keys.push_back({7, 99});  // missing
  bufs.emplace_back(10);
  bufs[5].resize(100);  // short
  std::vector<std::span<std::byte>> outs(bufs.begin(), bufs.end());
  std::vector<std::size_t> order;
  std::vector<std::error_code> codes(keys.size());
  const auto caller = std::this_thread::get_id();
  kc::load_many(t, keys, outs, [&](std::size_t i, std::error_code ec) {
    EXPECT_EQ(std::this_thread::get_id(), caller);  // reported on the calling thread
    order.push_back(i);
    codes[i] = ec;
  });
  EXPECT_EQ(order.size(), keys.size());
  for (std::size_t i = 0; i < 40; ++i) {
    if (i == 5) continue;
    EXPECT_FALSE(codes[i]) << i;
    EXPECT_EQ(bufs[i], want[i]) << i;
  }
  EXPECT_EQ(codes[5], kvx::errc::out_of_range);
  EXPECT_EQ(codes[40], kvx::errc::not_found);
  return order;
}

TEST(FileTier, LoadManyWithOneReaderReportsEachBlockInOrder) {
  std::vector<std::size_t> in_order(41);
  for (std::size_t i = 0; i < in_order.size(); ++i) in_order[i] = i;
  EXPECT_EQ(load_many_with(1), in_order);
}

TEST(FileTier, LoadManyWithSeveralReadersReportsEachBlockOnceOnTheCallingThread) {
  auto order = load_many_with(4);
  std::sort(order.begin(), order.end());
  std::vector<std::size_t> each_once(41);
  for (std::size_t i = 0; i < each_once.size(); ++i) each_once[i] = i;
  EXPECT_EQ(order, each_once);
}

TEST(FileTier, ConcurrentStoresAndLoadsOfDistinctKeys) {
  kc::file_tier<> t(file_cfg(4 << 20));
  std::vector<std::thread> ths;
  for (unsigned w = 0; w < 4; ++w)
    ths.emplace_back([&, w] {
      std::vector<std::byte> out(4096);
      for (std::uint64_t i = 0; i < 50; ++i) {
        const kc::block_key k{w, i};
        auto p = file_pattern(4096, static_cast<unsigned>(w * 100 + i));
        ASSERT_TRUE(t.store(k, p));
        ASSERT_TRUE(t.load(k, out));
        ASSERT_EQ(out, p);
      }
    });
  for (auto& th : ths) th.join();
  EXPECT_EQ(t.blocks(), 200U);
}
