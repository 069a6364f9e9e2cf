#include <kvx/transport/decorators/checksummed.hpp>
#include <kvx/transport/decorators/faulty.hpp>
#include <kvx/transport/local.hpp>
#include <kvx/transport/shm.hpp>
#include <kvx/transport/tcp.hpp>

#include <gtest/gtest.h>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>

#include <atomic>
#include <chrono>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace {

// Cancellation emitted where the caller owns it while the transport completes
// elsewhere. The transfer engine gives each slice a cancellation slot whose
// signal lives on the batch's strand and emits it there until the slice's
// handler has run; a transport that clears the slot from the thread that
// finishes the op races with that emit once several threads run the
// io_context. These tests recreate it with four threads; TSan names the race.

namespace asio = boost::asio;
using namespace std::chrono_literals;
using kvx::memory::memory_region;
using kvx::memory::segment_descriptor;

constexpr std::size_t op_size = 4096;

// One op as the engine issues a slice: its own strand, a signal on it.
struct racing_op {
  explicit racing_op(asio::io_context& io) : strand(asio::make_strand(io)), timer(strand), buf(op_size) {}
  asio::strand<asio::io_context::executor_type> strand;
  asio::cancellation_signal signal;
  asio::steady_timer timer;  // emits the cancellation, on the strand
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
void cancel_while_completing(asio::io_context& io, race_shape shape, Read read, kvx::errc also = kvx::errc::cancelled) {
  auto work = asio::make_work_guard(io);
  std::vector<std::thread> threads;
  for (int i = 0; i < 4; ++i) threads.emplace_back([&] { io.run(); });
  std::atomic<int> completed{0}, unexpected{0}, emitted{0};
  const auto give_up = std::chrono::steady_clock::now() + 20s;
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
    asio::post(op->strand, [&, i, op, delay] {
      auto h = asio::bind_cancellation_slot(
          op->signal.slot(), asio::bind_executor(op->strand, [&, op](std::error_code ec) {
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
        op->signal.emit(asio::cancellation_type::terminal);
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

segment_descriptor describe(kvx::memory::segment_table& table, const kvx::memory::local_segment& seg,
                            const char* transport, const nlohmann::json& entry) {
  auto d = table.describe(seg);
  d.transports[transport] = entry;
  return d;
}

TEST(TransportCancellationRace, ShmOpsWaitingForTheOwnerClearTheirSlotWhereTheCallerEmits) {
  // Each op reads its own segment, so each waits for the owner's answer.
  constexpr int ops = 400;
  asio::io_context io;
  kvx::transport::shm owner(io.get_executor());
  kvx::transport::shm initiator(io.get_executor());
  auto mem = kvx::transport::shm_allocate(ops * op_size);
  ASSERT_TRUE(mem) << mem.error().message();
  kvx::memory::segment_table table("race-owner");
  std::vector<segment_descriptor> descs;
  for (int i = 0; i < ops; ++i) {
    auto seg = *table.add("race-shm-" + std::to_string(i), mem->region().subregion(i * op_size, op_size));
    descs.push_back(describe(table, seg, "shm", *owner.register_memory(seg)));
  }
  cancel_while_completing(io, {ops, 16, 150us}, [&](int i, racing_op& op, auto h) {
    initiator.async_read(descs[static_cast<std::size_t>(i)], 0, std::span(op.buf), std::move(h));
  });
}

TEST(TransportCancellationRace, TcpOpsClearTheirSlotWhereTheCallerEmits) {
  asio::io_context io;
  kvx::transport::tcp owner(io.get_executor());
  kvx::transport::tcp initiator(io.get_executor());
  std::vector<std::byte> mem(op_size * 16);
  kvx::memory::segment_table table("race-owner");
  auto seg = *table.add("race-tcp", memory_region{mem.data(), mem.size()});
  auto entry = owner.register_memory(seg);
  ASSERT_TRUE(entry) << entry.error().message();
  const auto d = describe(table, seg, "tcp", *entry);
  // Cancelling a request mid-frame closes its connection: its neighbours fail connection_lost.
  cancel_while_completing(
      io, {8000, 16, 200us},
      [&](int i, racing_op& op, auto h) {
        initiator.async_read(d, static_cast<std::uint64_t>(i % 16) * op_size, std::span(op.buf), std::move(h));
      },
      kvx::errc::connection_lost);
}

// Decorators over `local`: every op reads the one segment `name`.
template <class Decorated>
void race_over_local(asio::io_context& io, Decorated& t, const std::string& name, race_shape shape) {
  std::vector<std::byte> mem(op_size);
  kvx::memory::segment_table table("race-owner");
  auto seg = *table.add(name, memory_region{mem.data(), mem.size()});
  const auto d = describe(table, seg, "local", *t.register_memory(seg));
  cancel_while_completing(io, shape, [&](int, racing_op& op, auto h) { t.async_read(d, 0, std::span(op.buf), std::move(h)); });
  ASSERT_TRUE(t.deregister_memory(seg));
}

TEST(TransportCancellationRace, FaultyDelayedOpsClearTheirSlotWhereTheCallerEmits) {
  asio::io_context io;
  kvx::transport::faulty<kvx::transport::local> t({.delay = 1.0, .delay_by = 50us}, io.get_executor());
  race_over_local(io, t, "race-faulty", {2000, 16, 100us});
}

TEST(TransportCancellationRace, ChecksummedVerificationsClearTheirSlotWhereTheCallerEmits) {
  asio::io_context io;
  kvx::transport::checksummed<kvx::transport::local> t({.scratch_chunk = 1024, .scratch_chunks = 4}, io.get_executor());
  race_over_local(io, t, "race-checksummed", {4000, 4, 50us});
}

}  // namespace
