// For tests of a transport's cancellation under several threads: runs ops
// the way the transfer engine issues slices (each on its own strand, its
// cancellation signal emitted from that strand while the op is outstanding)
// on an io_context run by four threads, so that TSan sees a transport that
// assigns or clears the slot anywhere else.
//
//   kvx::test::cancel_while_completing(io, {4000, 16, 200us}, [&](int i, kvx::test::racing_op& op, auto h) {
//     t.async_read(desc, 0, std::span(op.buf), std::move(h));
//   });
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <memory>
#include <random>
#include <system_error>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>

#include <kvx/core/error.hpp>

namespace kvx::test {

// One op as the engine issues a slice: its own strand, a signal on it.
struct racing_op {
  static constexpr std::size_t size = 4096;  // of `buf`
  explicit racing_op(boost::asio::io_context& io) : strand(boost::asio::make_strand(io)), timer(strand), buf(size) {}
  boost::asio::strand<boost::asio::io_context::executor_type> strand;
  boost::asio::cancellation_signal signal;
  boost::asio::steady_timer timer;  // emits the cancellation, on the strand
  std::vector<std::byte> buf;
  bool done = false;  // on the strand
};

// How ops are issued: `wave` at a time, each cancelled after a random delay
// of up to `max_delay`. Chosen per transport so that many cancellations land
// just as ops complete (found by trying: waves far larger than the threads
// delay every op past its cancellation).
struct race_shape {
  int ops;
  int wave;
  std::chrono::microseconds max_delay;
};

// Runs `shape.ops` reads, `read(i, op, handler)` starting the i-th, on `io`
// run by four threads. Each op is cancelled from its strand after a random
// delay unless its handler ran first, as the engine's stop() does; every op
// must then complete, with success, `cancelled` or `also`.
template <class Read>
void cancel_while_completing(boost::asio::io_context& io, race_shape shape, Read read,
                             kvx::errc also = kvx::errc::cancelled) {
  auto work = boost::asio::make_work_guard(io);
  std::vector<std::thread> threads;
  for (int i = 0; i < 4; ++i) threads.emplace_back([&] { io.run(); });
  std::atomic<int> completed{0}, unexpected{0}, emitted{0};
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  auto settled = [&](int n) {
    while (completed.load() < n && std::chrono::steady_clock::now() < give_up) std::this_thread::yield();
    return completed.load() >= n;
  };
  std::mt19937 rng(11);
  int issued = 0;
  while (issued < shape.ops) {
    const int i = issued++;
    auto op = std::make_shared<racing_op>(io);
    const auto delay = std::chrono::microseconds(rng() % (shape.max_delay.count() + 1));
    boost::asio::post(op->strand, [&, i, op, delay] {
      auto h = boost::asio::bind_cancellation_slot(
          op->signal.slot(), boost::asio::bind_executor(op->strand, [&, op](std::error_code ec) {
            op->done = true;
            op->timer.cancel();
            if (ec && ec != kvx::errc::cancelled && ec != also && unexpected.fetch_add(1) == 0)
              ADD_FAILURE() << "an op failed with " << ec.message();
            completed.fetch_add(1);
          }));
      read(i, *op, std::move(h));
      op->timer.expires_after(delay);
      op->timer.async_wait([op, &emitted](boost::system::error_code e) {
        if (e || op->done) return;
        emitted.fetch_add(1);
        op->signal.emit(boost::asio::cancellation_type::terminal);
      });
    });
    if (issued % shape.wave == 0 && !settled(issued)) break;
  }
  EXPECT_TRUE(settled(issued)) << issued - completed.load() << " ops never completed";
  EXPECT_EQ(issued, shape.ops);
  EXPECT_EQ(unexpected.load(), 0) << "ops that failed otherwise";
  EXPECT_GT(emitted.load(), 0) << "no op was cancelled while outstanding: the test raced nothing";
  work.reset();
  io.stop();
  for (auto& t : threads) t.join();
}

}  // namespace kvx::test
