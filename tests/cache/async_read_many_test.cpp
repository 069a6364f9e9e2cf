#include <kvx/cache/async_read_many.hpp>

#include <gtest/gtest.h>

#include <atomic>
#include <future>
#include <thread>
#include <vector>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/thread_pool.hpp>

#include <kvx/cache/eviction/lru.hpp>
#include <kvx/cache/tiered_cache.hpp>
#include <kvx/cache/tiers/dram_tier.hpp>

namespace kc = kvx::cache;
namespace asio = boost::asio;

namespace {

constexpr std::uint64_t read_block = 4096;
using lru_dram_cache = kc::tiered_cache<kc::tier_stack<kc::dram_tier<>>, kc::eviction::lru>;

// A DRAM cache holding blocks 0..n-1 (block i all bytes i + 1), and buffers
// to read them back with keys 0..n-1 then one missing key.
struct setup {
  static constexpr std::uint64_t n = 6;
  kvx::metrics::registry reg;
  lru_dram_cache c{kc::tiered_cache_config{.block_bytes = read_block, .name = "async", .registry = &reg},
                   kc::dram_tier_config{.capacity = 8 * read_block}};
  std::vector<kc::block_key> keys;
  std::vector<std::vector<std::byte>> bufs;
  std::vector<std::span<std::byte>> outs;
  setup() {
    for (std::uint64_t i = 0; i < n; ++i) {
      keys.push_back({3, i});
      EXPECT_TRUE(c.insert(keys.back(), std::vector<std::byte>(read_block, static_cast<std::byte>(i + 1))));
    }
    keys.push_back({3, 99});
    bufs.assign(keys.size(), std::vector<std::byte>(read_block));
    outs.assign(bufs.begin(), bufs.end());
  }
};

}  // namespace

TEST(AsyncReadMany, ReportsEveryBlockOnTheExecutorThenCompletes) {
  setup f;
  asio::thread_pool pool(1);
  std::vector<std::error_code> codes(f.keys.size());
  std::vector<std::thread::id> threads;
  std::promise<std::error_code> done;
  kc::async_read_many(
      f.c, f.keys, f.outs,
      [&](std::size_t i, std::error_code ec) {
        codes[i] = ec;
        threads.push_back(std::this_thread::get_id());
      },
      pool.get_executor(), [&](std::error_code ec) { done.set_value(ec); });
  const std::error_code ec = done.get_future().get();
  EXPECT_FALSE(ec) << ec.message();
  ASSERT_EQ(threads.size(), f.keys.size());
  for (auto id : threads) EXPECT_NE(id, std::this_thread::get_id());  // on the pool, not the caller
  for (std::size_t i = 0; i < setup::n; ++i) {
    EXPECT_FALSE(codes[i]) << i;
    EXPECT_EQ(f.bufs[i], std::vector<std::byte>(read_block, static_cast<std::byte>(i + 1))) << i;
  }
  EXPECT_EQ(codes[setup::n], kvx::errc::not_found);  // a per-block error does not fail the operation
  pool.join();
}

TEST(AsyncReadMany, CancellingStopsTheBlocksNotYetReadAndCompletesWithCancelled) {
  setup f;
  asio::thread_pool pool(1);
  asio::cancellation_signal cancel;
  std::vector<std::size_t> reported, skipped;
  std::promise<std::error_code> done;
  kc::async_read_many(
      f.c, f.keys, f.outs,
      [&](std::size_t i, std::error_code ec) {
        if (ec == kvx::errc::cancelled) {
          skipped.push_back(i);
          return;
        }
        reported.push_back(i);
        if (reported.size() == 2) cancel.emit(asio::cancellation_type::terminal);  // after the second report
      },
      pool.get_executor(),
      asio::bind_cancellation_slot(cancel.slot(), [&](std::error_code ec) { done.set_value(ec); }));
  EXPECT_EQ(done.get_future().get(), kvx::errc::cancelled);
  EXPECT_EQ(reported, (std::vector<std::size_t>{6, 0}));  // the missing key (found up front), then block 0
  EXPECT_EQ(skipped, (std::vector<std::size_t>{1, 2, 3, 4, 5}));
  for (std::size_t i : skipped) EXPECT_TRUE(f.c.erase(f.keys[i])) << i;  // not left pinned
  pool.join();
}

// The caller's signal is emitted where asio says it must be, on the handler's
// executor (an io_context run by its own thread), while the reads run on the
// pool: the operation may touch the slot only there too. The emit comes while
// on_block(at) runs, and on_block waits for it. During the last block the wait
// is through a relaxed flag, so that nothing orders the emit before what the
// pool thread does next and TSan reports any slot access there (a clear on
// the pool thread did race it); during the first, the pool must see the stop
// (it skips the rest), so the flag orders.
TEST(AsyncReadMany, CancellationEmittedOnTheHandlersExecutorWhileReadsRunElsewhereCompletesCorrectly) {
  setup f;
  asio::thread_pool pool(1);
  asio::io_context io;
  auto work = asio::make_work_guard(io);
  std::thread io_thread([&] { io.run(); });
  const std::span<const kc::block_key> keys(f.keys.data(), 3);  // blocks 0, 1, 2
  for (const std::size_t at : {std::size_t{2}, std::size_t{0}}) {  // during the last block, then the first
    SCOPED_TRACE(at);
    const bool last = at + 1 == keys.size();
    std::vector<std::vector<std::byte>> bufs(keys.size(), std::vector<std::byte>(read_block));
    std::vector<std::span<std::byte>> outs(bufs.begin(), bufs.end());
    asio::cancellation_signal cancel;
    std::atomic<bool> emitted{false};
    std::vector<std::error_code> codes(keys.size(), make_error_code(kvx::errc::internal));
    std::promise<std::pair<std::error_code, std::thread::id>> done;
    int completions = 0;
    kc::async_read_many(
        f.c, keys, std::span<const std::span<std::byte>>(outs),
        [&](std::size_t i, std::error_code ec) {
          codes[i] = ec;
          if (i != at) return;
          asio::post(io, [&] {
            cancel.emit(asio::cancellation_type::terminal);
            emitted.store(true, last ? std::memory_order_relaxed : std::memory_order_release);
          });
          while (!emitted.load(last ? std::memory_order_relaxed : std::memory_order_acquire)) std::this_thread::yield();
        },
        pool.get_executor(),
        asio::bind_cancellation_slot(cancel.slot(), asio::bind_executor(io, [&](std::error_code ec) {
                                       ++completions;
                                       done.set_value({ec, std::this_thread::get_id()});
                                     })));
    const auto [ec, where] = done.get_future().get();
    // The handler has run; let anything still queued on io finish before `cancel` goes.
    std::promise<void> drained;
    asio::post(io, [&] { drained.set_value(); });
    drained.get_future().wait();
    EXPECT_EQ(completions, 1);
    EXPECT_EQ(where, io_thread.get_id());  // on the handler's executor
    for (std::size_t i = 0; i <= at; ++i) {
      EXPECT_FALSE(codes[i]) << i;
      EXPECT_EQ(bufs[i], std::vector<std::byte>(read_block, static_cast<std::byte>(i + 1))) << i;
    }
    for (std::size_t i = at + 1; i < keys.size(); ++i) EXPECT_EQ(codes[i], kvx::errc::cancelled) << i;
    // Every block read before the emit: success; blocks skipped: cancelled.
    EXPECT_EQ(ec, last ? std::error_code{} : make_error_code(kvx::errc::cancelled)) << ec.message();
  }
  for (const auto& k : keys) EXPECT_TRUE(f.c.erase(k)) << k.to_string();  // none left pinned
  work.reset();
  io_thread.join();
  pool.join();
}
