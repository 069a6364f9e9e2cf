#include <kvx/transport/shm.hpp>

#include <gtest/gtest.h>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/io_context.hpp>

#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <limits>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "support/child_process.hpp"
#include "support/run_until.hpp"

namespace {

namespace asio = boost::asio;
using kvx::memory::memory_region;
using kvx::memory::segment_descriptor;
using namespace std::chrono_literals;

std::byte peer_pattern(std::size_t i, unsigned seed) {
  return std::byte(static_cast<unsigned char>((i * 131 + seed) ^ (i >> 9)));
}

using kvx::test::run_until;

std::error_code read(asio::io_context& io, kvx::transport::shm& t, const segment_descriptor& d, std::uint64_t off,
                     std::span<std::byte> dst) {
  std::optional<std::error_code> out;
  t.async_read(d, off, dst, [&](std::error_code ec) { out = ec; });
  EXPECT_FALSE(out) << "completion ran inside the initiating function";
  EXPECT_TRUE(run_until(io, [&] { return out.has_value(); })) << "read did not complete";
  return out.value_or(kvx::errc::internal);
}

std::error_code write(asio::io_context& io, kvx::transport::shm& t, const segment_descriptor& d, std::uint64_t off,
                      std::span<const std::byte> src) {
  std::optional<std::error_code> out;
  t.async_write(d, off, src, [&](std::error_code ec) { out = ec; });
  EXPECT_FALSE(out) << "completion ran inside the initiating function";
  EXPECT_TRUE(run_until(io, [&] { return out.has_value(); })) << "write did not complete";
  return out.value_or(kvx::errc::internal);
}

// An owner and an initiator (two transports) in one process, one segment of
// each memory kind: memfd-backed (mapped by the peer) and heap (process_vm).
struct shm_fixture : ::testing::Test {
  static constexpr std::size_t size = 1 << 20;
  asio::io_context io;
  kvx::memory::segment_table table{"shm-owner"};
  kvx::transport::shm owner{io.get_executor()};
  kvx::transport::shm initiator{io.get_executor()};
  kvx::transport::shm_memory shared;
  std::vector<std::byte> heap = std::vector<std::byte>(size);
  kvx::memory::local_segment memfd_seg, heap_seg;
  segment_descriptor memfd_desc, heap_desc;

  void SetUp() override {
    auto m = kvx::transport::shm_allocate(size);
    ASSERT_TRUE(m) << m.error().message();
    shared = std::move(*m);
    for (std::size_t i = 0; i < size; ++i) shared.data()[i] = heap[i] = peer_pattern(i, 3);
    memfd_seg = *table.add("shm-test-memfd", shared.region());
    heap_seg = *table.add("shm-test-heap", memory_region{heap.data(), heap.size()});
    memfd_desc = describe(memfd_seg);
    heap_desc = describe(heap_seg);
    ASSERT_EQ(memfd_desc.transports["shm"]["mode"], "memfd");
    ASSERT_EQ(heap_desc.transports["shm"]["mode"], "vm");
  }

  segment_descriptor describe(const kvx::memory::local_segment& seg) {
    auto entry = owner.register_memory(seg);
    EXPECT_TRUE(entry) << entry.error().message();
    auto d = table.describe(seg);
    d.transports["shm"] = entry ? *entry : nlohmann::json::object();
    return d;
  }
};

TEST_F(shm_fixture, RandomizedReadsAndWritesAreByteExactInBothModes) {
  std::mt19937_64 rng(42);
  for (auto* which : {&memfd_desc, &heap_desc}) {
    std::byte* remote = which == &memfd_desc ? shared.data() : heap.data();
    std::vector<std::byte> buf(size);
    for (int i = 0; i < 120; ++i) {
      const std::size_t len = rng() % 3 == 0 ? rng() % 16 : rng() % (size / 8);
      const std::size_t off = rng() % (size - len + 1);
      if (rng() % 2) {
        for (std::size_t k = 0; k < len; ++k) buf[k] = std::byte(rng());
        ASSERT_FALSE(write(io, initiator, *which, off, std::span(buf).first(len)));
        ASSERT_TRUE(std::equal(buf.begin(), buf.begin() + len, remote + off)) << "write at " << off << " len " << len;
      } else {
        ASSERT_FALSE(read(io, initiator, *which, off, std::span(buf).first(len)));
        ASSERT_TRUE(std::equal(buf.begin(), buf.begin() + len, remote + off)) << "read at " << off << " len " << len;
      }
    }
  }
}

TEST_F(shm_fixture, SubRangeOfSharedMemoryIsSharedByFdAtItsOffset) {
  auto sub = *table.add("shm-test-sub", shared.region().subregion(12345, 4096));
  auto d = describe(sub);
  EXPECT_EQ(d.transports["shm"]["mode"], "memfd");
  std::vector<std::byte> buf(4096);
  ASSERT_FALSE(read(io, initiator, d, 0, buf));
  EXPECT_TRUE(std::equal(buf.begin(), buf.end(), shared.data() + 12345));
  EXPECT_EQ(read(io, initiator, d, 1, buf), kvx::errc::out_of_range);
  ASSERT_TRUE(owner.deregister_memory(sub));
}

TEST_F(shm_fixture, RefusesOutOfRangeBadKeyUnknownSegmentAndStaleGeneration) {
  std::vector<std::byte> buf(64);
  for (auto* d : {&memfd_desc, &heap_desc}) {
    EXPECT_EQ(read(io, initiator, *d, size - 63, buf), kvx::errc::out_of_range);
    EXPECT_EQ(write(io, initiator, *d, UINT64_MAX, std::span<const std::byte>(buf).first(2)), kvx::errc::out_of_range);
    auto bad_key = *d;
    bad_key.key ^= 1;
    EXPECT_EQ(read(io, initiator, bad_key, 0, buf), kvx::errc::bad_key);
    auto unknown = *d;
    unknown.name = "no-such-segment";
    EXPECT_EQ(read(io, initiator, unknown, 0, buf), kvx::errc::unknown_segment);
    auto stale = *d;
    stale.generation += 1;
    EXPECT_EQ(read(io, initiator, stale, 0, buf), kvx::errc::stale);
    // A descriptor that lies about the length is held to the owner's length.
    auto longer = *d;
    longer.length = 2 * size;
    EXPECT_EQ(read(io, initiator, longer, size, buf), kvx::errc::out_of_range);
    EXPECT_FALSE(read(io, initiator, *d, size - 64, buf)) << "the good descriptor still works after the refusals";
  }
}

TEST_F(shm_fixture, CrossHostMissingEntryOrDeviceDescriptorIsRefusedWithoutIo) {
  auto elsewhere = memfd_desc;
  elsewhere.host_id = "another-host";
  EXPECT_EQ(initiator.can_transfer(elsewhere), kvx::errc::unreachable);
  std::vector<std::byte> buf(8);
  EXPECT_EQ(read(io, initiator, elsewhere, 0, buf), kvx::errc::unreachable);
  auto no_entry = memfd_desc;
  no_entry.transports.erase("shm");
  EXPECT_EQ(initiator.can_transfer(no_entry), kvx::errc::unreachable);
  auto device = memfd_desc;
  device.where = kvx::memory::location::cuda(0);
  EXPECT_EQ(initiator.can_transfer(device), kvx::errc::not_supported);
  auto gone = memfd_desc;
  gone.transports["shm"]["socket"] = "@kvx-shm-nobody-listens-here";
  EXPECT_FALSE(initiator.can_transfer(gone));
  EXPECT_EQ(read(io, initiator, gone, 0, buf), kvx::errc::unreachable);
  EXPECT_FALSE(initiator.can_transfer(memfd_desc));
}

TEST_F(shm_fixture, DeregisteredSegmentIsRevokedForMappedPeersAndRefusedToNewOnes) {
  std::vector<std::byte> buf(64);
  for (auto* seg : {&memfd_seg, &heap_seg}) {
    auto& d = seg == &memfd_seg ? memfd_desc : heap_desc;
    ASSERT_FALSE(read(io, initiator, d, 0, buf));
    ASSERT_TRUE(owner.deregister_memory(*seg));
    EXPECT_EQ(write(io, initiator, d, 0, buf), kvx::errc::stale) << "a mapped peer must not keep writing";
    EXPECT_EQ(read(io, initiator, d, 0, buf), kvx::errc::unknown_segment) << "the owner refuses to map it again";
    EXPECT_EQ(owner.deregister_memory(*seg).code(), kvx::errc::unknown_segment);
  }
  // Registered again (a new incarnation), the old descriptor is stale and the new one works.
  auto again = *table.add("shm-test-again", shared.region());
  auto d = describe(again);
  auto old = d;
  old.generation ^= 0x55;
  EXPECT_EQ(read(io, initiator, old, 0, buf), kvx::errc::stale);
  EXPECT_FALSE(read(io, initiator, d, 0, buf));
}

TEST_F(shm_fixture, ZeroLengthOpsAreCheckedAndSucceed) {
  EXPECT_FALSE(read(io, initiator, memfd_desc, size, {}));
  auto bad_key = memfd_desc;
  bad_key.key ^= 2;
  EXPECT_EQ(read(io, initiator, bad_key, 0, {}), kvx::errc::bad_key);
}

TEST_F(shm_fixture, OneTransportServesItself) {
  std::vector<std::byte> buf(4096);
  ASSERT_FALSE(read(io, owner, memfd_desc, 100, buf));
  EXPECT_TRUE(std::equal(buf.begin(), buf.end(), shared.data() + 100));
}

TEST_F(shm_fixture, ManyConcurrentOpsFromSeveralThreadsAreByteExact) {
  // Each thread owns a disjoint slice; io runs on two threads while four initiate.
  constexpr int threads = 4, ops = 300;
  constexpr std::size_t slice = size / threads;
  std::atomic<int> done{0}, failed{0};
  auto guard = asio::make_work_guard(io);
  std::vector<std::thread> runners;
  for (int i = 0; i < 2; ++i) runners.emplace_back([&] { io.run(); });
  std::vector<std::thread> workers;
  for (int w = 0; w < threads; ++w) {
    workers.emplace_back([&, w] {
      std::mt19937_64 rng(w);
      auto& d = w % 2 ? heap_desc : memfd_desc;
      std::byte* remote = (w % 2 ? heap.data() : shared.data()) + w * slice;
      std::vector<std::vector<std::byte>> bufs(ops);
      for (int i = 0; i < ops; ++i) {
        const std::size_t len = 1 + rng() % 4096;
        const std::size_t off = rng() % (slice - len);
        bufs[i].resize(len);
        for (auto& b : bufs[i]) b = std::byte(rng());
        // Writes only: each lands in this thread's slice, the last writer of a byte wins in op order.
        std::optional<std::error_code> ec;
        std::atomic<bool> flag{false};
        initiator.async_write(d, w * slice + off, std::span<const std::byte>(bufs[i]), [&](std::error_code e) {
          ec = e;
          flag.store(true, std::memory_order_release);
        });
        while (!flag.load(std::memory_order_acquire)) std::this_thread::yield();
        if (*ec || !std::equal(bufs[i].begin(), bufs[i].end(), remote + off)) failed.fetch_add(1);
        done.fetch_add(1);
      }
    });
  }
  for (auto& t : workers) t.join();
  guard.reset();
  io.stop();
  for (auto& t : runners) t.join();
  EXPECT_EQ(done.load(), threads * ops);
  EXPECT_EQ(failed.load(), 0);
}

TEST_F(shm_fixture, ManyOpsInFlightAtOnceAllComplete) {
  constexpr int n = 256;
  std::vector<std::vector<std::byte>> bufs(n, std::vector<std::byte>(512));
  int completed = 0, errors = 0;
  for (int i = 0; i < n; ++i) {
    auto& d = i % 2 ? heap_desc : memfd_desc;
    initiator.async_read(d, static_cast<std::uint64_t>(i) * 512, std::span(bufs[i]), [&](std::error_code ec) {
      ++completed;
      errors += ec ? 1 : 0;
    });
  }
  ASSERT_TRUE(run_until(io, [&] { return completed == n; }));
  EXPECT_EQ(errors, 0);
  for (int i = 0; i < n; ++i)
    EXPECT_TRUE(std::equal(bufs[i].begin(), bufs[i].end(), (i % 2 ? heap.data() : shared.data()) + i * 512));
}

// An owner whose executor never runs never answers: the first op waits, and
// the wait ends by cancellation or by the open timeout, never by hanging.
TEST(ShmTransport, UnansweredOpenEndsByCancellationOrTimeout) {
  asio::io_context owner_io, io;
  kvx::memory::segment_table table("silent-owner");
  kvx::transport::shm owner(owner_io.get_executor());
  std::vector<std::byte> mem(4096);
  auto seg = *table.add("silent", memory_region{mem.data(), mem.size()});
  auto d = table.describe(seg);
  d.transports["shm"] = *owner.register_memory(seg);

  kvx::transport::shm initiator(io.get_executor(), kvx::transport::shm_options{.open_timeout = 100ms});
  std::vector<std::byte> buf(16);
  asio::cancellation_signal signal;
  std::optional<std::error_code> cancelled, timed_out;
  initiator.async_read(d, 0, std::span(buf),
                       asio::bind_cancellation_slot(signal.slot(), [&](std::error_code ec) { cancelled = ec; }));
  io.poll();
  EXPECT_FALSE(cancelled);
  signal.emit(asio::cancellation_type::terminal);
  ASSERT_TRUE(run_until(io, [&] { return cancelled.has_value(); }));
  EXPECT_EQ(*cancelled, kvx::errc::cancelled);

  initiator.async_read(d, 0, std::span(buf), [&](std::error_code ec) { timed_out = ec; });
  ASSERT_TRUE(run_until(io, [&] { return timed_out.has_value(); }));
  EXPECT_EQ(*timed_out, kvx::errc::timed_out);
}

TEST(ShmTransport, RegistrationIsCheckedAndAllocationRefusesZero) {
  asio::io_context io;
  kvx::transport::shm t(io.get_executor());
  std::vector<std::byte> b(64);
  kvx::memory::local_segment seg{"twice", memory_region{b.data(), b.size()}, 1, 1};
  ASSERT_TRUE(t.register_memory(seg));
  EXPECT_EQ(t.register_memory(seg).error(), kvx::errc::already_exists);
  kvx::memory::local_segment device{"device", memory_region{b.data(), b.size(), kvx::memory::location::cuda(0)}, 1, 1};
  EXPECT_EQ(t.register_memory(device).error(), kvx::errc::not_supported);
  EXPECT_EQ(t.deregister_memory(device).code(), kvx::errc::unknown_segment);
  EXPECT_EQ(kvx::transport::shm_allocate(0).error(), kvx::errc::invalid_argument);
  EXPECT_TRUE(t.deregister_memory(seg));
}

TEST(ShmTransport, OwnerHangsUpOnAMalformedRequestAndKeepsServing) {
  asio::io_context io;
  kvx::memory::segment_table table("owner");
  kvx::transport::shm owner(io.get_executor());
  kvx::transport::shm initiator(io.get_executor());
  std::vector<std::byte> mem(4096, std::byte{7});
  auto seg = *table.add("served", memory_region{mem.data(), mem.size()});
  auto d = table.describe(seg);
  d.transports["shm"] = *owner.register_memory(seg);

  auto raw = kvx::transport::detail::shm_channel::connect(io.get_executor(), d.transports["shm"]["socket"]);
  ASSERT_TRUE(raw);
  bool hung_up = false;
  (*raw)->start([](nlohmann::json&&, std::vector<kvx::transport::detail::unique_fd>&&) {}, [&] { hung_up = true; });
  ASSERT_FALSE((*raw)->send({{"op", "open"}, {"id", -1}, {"name", 5}}));
  ASSERT_TRUE(run_until(io, [&] { return hung_up; }));

  std::vector<std::byte> buf(16);
  ASSERT_FALSE(read(io, initiator, d, 0, buf));
  EXPECT_EQ(buf[15], std::byte{7});
}

// A peer stopped in the middle of a copy, modelled by a raw peer that maps the
// segment and marks a copy in flight as shm's copy does, holds the memory past
// the revoke timeout: deregistration must not report it free to reuse.
TEST(ShmTransport, ACopyOutlivingTheRevokeTimeoutFailsDeregistrationAndKeepsTheSegmentRevoked) {
  namespace d = kvx::transport::detail;
  asio::io_context io;
  kvx::memory::segment_table table("revoking-owner");
  kvx::transport::shm owner(io.get_executor(), kvx::transport::shm_options{.revoke_timeout = 50ms});
  kvx::transport::shm initiator(io.get_executor());
  auto mem = kvx::transport::shm_allocate(4096);
  ASSERT_TRUE(mem) << mem.error().message();
  auto seg = *table.add("held", mem->region());
  auto desc = table.describe(seg);
  desc.transports["shm"] = *owner.register_memory(seg);
  std::vector<std::byte> buf(64);
  ASSERT_FALSE(read(io, initiator, desc, 0, buf)) << "the initiator maps the segment";

  auto raw = d::shm_channel::connect(io.get_executor(), desc.transports["shm"]["socket"]);
  ASSERT_TRUE(raw) << raw.error().message();
  std::optional<d::control_page> control;
  (*raw)->start(
      [&](nlohmann::json&&, std::vector<d::unique_fd>&& fds) {
        if (fds.empty()) return;
        if (auto c = d::control_page::adopt(std::move(fds[0]))) control = std::move(*c);
      },
      [] {});
  ASSERT_FALSE((*raw)->send(
      {{"op", "open"}, {"id", 1u}, {"name", seg.name}, {"key", seg.key}, {"generation", seg.generation}}));
  ASSERT_TRUE(run_until(io, [&] { return control.has_value(); })) << "the owner sent no control page";
  control->block().in_flight.fetch_add(1, std::memory_order_seq_cst);

  auto held = owner.deregister_memory(seg);
  ASSERT_FALSE(held) << "deregistration reported memory free while a peer's copy was in flight";
  EXPECT_EQ(held.code(), kvx::errc::timed_out);
  EXPECT_NE(held.error().message().find("'held': 1 peer copies still in flight"), std::string::npos)
      << held.error().message();
  EXPECT_EQ(write(io, initiator, desc, 0, buf), kvx::errc::stale) << "a mapped peer started a new copy";
  kvx::transport::shm fresh(io.get_executor());
  EXPECT_EQ(read(io, fresh, desc, 0, buf), kvx::errc::unknown_segment) << "the segment was handed out again";
  EXPECT_EQ(owner.deregister_memory(seg).code(), kvx::errc::timed_out) << "a second call waits for the copy again";

  // The name registered anew while the old registration drains is served,
  // and the old one's deregistration leaves it alone.
  ASSERT_TRUE(table.remove("held"));
  auto again = *table.add("held", mem->region());
  auto again_desc = table.describe(again);
  again_desc.transports["shm"] = *owner.register_memory(again);
  EXPECT_FALSE(read(io, fresh, again_desc, 0, buf));

  control->block().in_flight.fetch_sub(1, std::memory_order_seq_cst);
  EXPECT_TRUE(owner.deregister_memory(seg)) << "the copy ended: the old registration is released";
  EXPECT_EQ(owner.deregister_memory(seg).code(), kvx::errc::unknown_segment);
  EXPECT_FALSE(read(io, fresh, again_desc, 0, buf)) << "releasing the old registration revoked the new one";
  EXPECT_TRUE(owner.deregister_memory(again));
}

TEST(ShmTransport, AnOwnerClaimingMoreBytesThanItsFileHoldsIsAProtocolErrorNotASigbus) {
  namespace d = kvx::transport::detail;
  asio::io_context io;
  kvx::memory::segment_table table("lying-owner");
  kvx::transport::shm owner(io.get_executor());
  kvx::transport::shm initiator(io.get_executor());
  std::vector<std::byte> mem(1 << 20);
  auto seg = *table.add("lying", memory_region{mem.data(), mem.size()});
  auto desc = table.describe(seg);
  desc.transports["shm"] = *owner.register_memory(seg);
  // A fake owner on its own socket: it answers every open with a 4 KiB memfd
  // but says the segment is 1 MiB long (or lies about the offset).
  const std::string name = "@kvx-test-lying-" + std::to_string(::getpid());
  auto listener = d::shm_listener::open(io.get_executor(), name);
  ASSERT_TRUE(listener) << listener.error().message();
  auto control = d::control_page::create();
  ASSERT_TRUE(control);
  d::unique_fd data(::memfd_create("kvx-test-lying", MFD_CLOEXEC));
  ASSERT_GE(data.get(), 0);
  ASSERT_EQ(::ftruncate(data.get(), 4096), 0);
  nlohmann::json claim{{"length", 1 << 20}, {"offset", 0}};
  std::vector<std::shared_ptr<d::shm_channel>> channels;
  (*listener)->start([&](std::shared_ptr<d::shm_channel> ch) {
    channels.push_back(ch);
    std::weak_ptr<d::shm_channel> weak = ch;
    ch->start(
        [&, weak](nlohmann::json&& body, std::vector<d::unique_fd>&&) {
          auto c = weak.lock();
          if (!c) return;
          nlohmann::json reply = claim;
          reply["id"] = body["id"];
          reply["mode"] = "memfd";
          (void)c->send(reply, {control->fd(), data.get()});
        },
        [] {});
  });
  desc.transports["shm"]["socket"] = name;
  std::vector<std::byte> buf(8192);
  EXPECT_EQ(read(io, initiator, desc, 0, buf), kvx::errc::protocol_error);
  // Same file, a length that fits, an offset past its end.
  claim = {{"length", 4096}, {"offset", 4096}};
  kvx::transport::shm second(io.get_executor());  // no cached mapping
  EXPECT_EQ(read(io, second, desc, 0, std::span(buf).first(16)), kvx::errc::protocol_error);
  // And a length whose page rounding would wrap.
  claim = {{"length", std::numeric_limits<std::uint64_t>::max()}, {"offset", 4095}};
  kvx::transport::shm third(io.get_executor());
  EXPECT_EQ(read(io, third, desc, 0, std::span(buf).first(16)), kvx::errc::protocol_error);
  (*listener)->close();
}

// ---- two processes -------------------------------------------------------------

struct two_process_case {
  const char* memory;
};

class ShmTwoProcess : public ::testing::TestWithParam<two_process_case> {};

TEST_P(ShmTwoProcess, ReadsWritesByteExactAndAKilledOwnerIsAnErrorNotAHang) {
  constexpr std::size_t size = 1 << 20;
  kvx::test::child_process peer(kvx::test::child_process::tool("shm_peer"),
                                {"--size", std::to_string(size), "--memory", GetParam().memory, "--seed", "9"});
  auto line = peer.read_line(5s);
  ASSERT_TRUE(line) << "shm_peer printed no descriptor";
  auto d = segment_descriptor::from_json(nlohmann::json::parse(*line));
  ASSERT_TRUE(d) << d.error().message();

  asio::io_context io;
  kvx::transport::shm t(io.get_executor());
  ASSERT_FALSE(t.can_transfer(*d));
  std::mt19937_64 rng(5);
  std::vector<std::byte> shadow(size);
  for (std::size_t i = 0; i < size; ++i) shadow[i] = peer_pattern(i, 9);
  std::vector<std::byte> buf(size);
  for (int i = 0; i < 100; ++i) {
    const std::size_t len = 1 + rng() % (size / 4);
    const std::size_t off = rng() % (size - len + 1);
    if (rng() % 2) {
      for (std::size_t k = 0; k < len; ++k) buf[k] = shadow[off + k] = std::byte(rng());
      ASSERT_FALSE(write(io, t, *d, off, std::span(buf).first(len)));
    } else {
      ASSERT_FALSE(read(io, t, *d, off, std::span(buf).first(len)));
      ASSERT_TRUE(std::equal(buf.begin(), buf.begin() + len, shadow.begin() + off)) << "read at " << off;
    }
  }
  ASSERT_FALSE(read(io, t, *d, 0, buf));
  EXPECT_TRUE(buf == shadow);

  peer.kill();
  peer.wait();
  std::error_code last;
  const auto deadline = std::chrono::steady_clock::now() + 5s;
  while (!last && std::chrono::steady_clock::now() < deadline) last = read(io, t, *d, 0, std::span(buf).first(4096));
  EXPECT_EQ(last, kvx::errc::connection_lost);
  EXPECT_EQ(write(io, t, *d, 0, std::span(buf).first(16)), kvx::errc::connection_lost);
}

INSTANTIATE_TEST_SUITE_P(Memory, ShmTwoProcess,
                         ::testing::Values(two_process_case{"memfd"}, two_process_case{"heap"}),
                         [](const auto& info) { return std::string(info.param.memory); });

}  // namespace
