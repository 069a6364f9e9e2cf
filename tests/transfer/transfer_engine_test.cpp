#include <kvx/transfer/transfer_engine.hpp>

#include <gtest/gtest.h>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/use_future.hpp>

#include <kvx/testing/test_transports.hpp>
#include <kvx/testing/random_bytes.hpp>
#include <kvx/transfer/embedded_metadata.hpp>
#include <kvx/transport/decorators/faulty.hpp>
#include <kvx/transport/local.hpp>

#include <optional>
#include <thread>
#include <vector>

namespace {

namespace asio = boost::asio;
using namespace std::chrono_literals;
using kvx::memory::memory_region;
using kvx::transfer::batch;
using kvx::transfer::batch_result;
using kvx::transfer::embedded_metadata;
using kvx::transfer::engine_options;
using kvx::transfer::transfer_op;
using kvx::transport::local;

template <class Engine>
kvx::memory::segment_descriptor register_on(asio::io_context& io, Engine& e, std::vector<std::byte>& buf, const std::string& name) {
  std::optional<std::error_code> out;
  kvx::memory::segment_descriptor d;
  e.async_register_memory(memory_region{buf.data(), buf.size()}, name, [&](std::error_code ec, kvx::memory::segment_descriptor desc) {
    out = ec;
    d = std::move(desc);
  });
  EXPECT_FALSE(out) << "completed inline";
  io.restart();
  while (!out && io.run_one_for(5s)) {
  }
  EXPECT_TRUE(out && !*out) << (out ? out->message() : "no completion");
  return d;
}

template <class Engine>
std::pair<std::error_code, batch_result> run_batch(asio::io_context& io, Engine& e, batch b) {
  std::optional<std::pair<std::error_code, batch_result>> out;
  e.async_transfer(std::move(b), [&](std::error_code ec, batch_result r) { out.emplace(ec, std::move(r)); });
  EXPECT_FALSE(out) << "completed inline";
  io.restart();
  const auto give_up = std::chrono::steady_clock::now() + 20s;
  while (!out && std::chrono::steady_clock::now() < give_up) io.run_one_for(10ms);
  if (!out) {
    ADD_FAILURE() << "batch did not complete";
    return {kvx::errc::internal, {}};
  }
  return std::move(*out);
}

std::string unique(const char* p) { return kvx::testing::unique_segment_name(p); }

// Two engines (prefill and decode) in one process, reaching each other through `local`.
struct two_engines : ::testing::Test {
  using engine_t = kvx::transfer::transfer_engine<embedded_metadata, local>;
  asio::io_context io;
  embedded_metadata meta{io.get_executor()};
  local net_p{io.get_executor()}, net_d{io.get_executor()};
  engine_t prefill{meta, {.node = "prefill-0"}, net_p};
  engine_t decode{meta, {.node = "decode-0", .slice_size = 64 * 1024}, net_d};
  std::vector<std::byte> pbuf = std::vector<std::byte>(4u << 20), dbuf = std::vector<std::byte>(4u << 20);
  std::string pname = unique("prefill-kv"), dname = unique("decode-kv");

  void SetUp() override {
    kvx::testing::fill_random(pbuf, 1);
    kvx::testing::fill_random(dbuf, 2);
    register_on(io, prefill, pbuf, pname);
    register_on(io, decode, dbuf, dname);
  }
};

TEST_F(two_engines, ReadsAndWritesAreByteExact) {
  batch b;
  b.read(std::span(dbuf).subspan(3, 1000003), pname, 17);                                  // sliced: 16 slices
  b.write(std::span<const std::byte>(dbuf).subspan(2u << 20, 5000), pname, (3u << 20) + 1);  // unaligned
  auto [ec, r] = run_batch(io, decode, std::move(b));
  ASSERT_FALSE(ec) << r.first_error().message();
  ASSERT_EQ(r.ops.size(), 2u);
  EXPECT_EQ(r.ops[0].transport, "local");
  EXPECT_EQ(r.bytes, 1000003u + 5000u);
  EXPECT_TRUE(std::equal(dbuf.begin() + 3, dbuf.begin() + 3 + 1000003, pbuf.begin() + 17));
  EXPECT_TRUE(std::equal(pbuf.begin() + (3u << 20) + 1, pbuf.begin() + (3u << 20) + 5001, dbuf.begin() + (2u << 20)));
}

TEST_F(two_engines, StridedDescriptorsMoveEveryBlockOfA64LayerTransfer) {
  // 64 layers x 250 blocks of 16 bytes: 64 descriptors (16,000 slices: strides differ on the two sides). Remote: blocks 32 bytes apart,
  // layers 32000 apart. Local: blocks 48 bytes apart, layers 48000 apart.
  batch b;
  for (std::uint64_t layer = 0; layer < 64; ++layer)
    b.add(transfer_op::read_blocks({dbuf.data() + layer * 48000, 48}, {pname, layer * 32000, 32}, 250, 16));
  auto [ec, r] = run_batch(io, decode, std::move(b));
  ASSERT_FALSE(ec) << r.first_error().message();
  EXPECT_EQ(r.bytes, 64u * 250u * 16u);
  for (std::uint64_t layer = 0; layer < 64; ++layer)
    for (std::uint64_t blk = 0; blk < 250; ++blk)
      ASSERT_TRUE(std::equal(dbuf.begin() + static_cast<std::ptrdiff_t>(layer * 48000 + blk * 48),
                             dbuf.begin() + static_cast<std::ptrdiff_t>(layer * 48000 + blk * 48 + 16),
                             pbuf.begin() + static_cast<std::ptrdiff_t>(layer * 32000 + blk * 32)))
          << "layer " << layer << " block " << blk;
  // Bytes between local blocks are untouched (the gap keeps its old random value: compare with a fresh fill).
  std::vector<std::byte> original(dbuf.size());
  kvx::testing::fill_random(original, 2);
  EXPECT_EQ(dbuf[16], original[16]);
  EXPECT_EQ(dbuf[47], original[47]);
}

TEST_F(two_engines, ErrorsCarryContextAndOtherOpsStillSucceed) {
  std::vector<std::byte> unregistered(64);
  batch b;
  b.read(std::span(dbuf).first(100), "no-such-segment", 0);
  b.read(std::span(dbuf).subspan(100, 100), pname, (4u << 20) - 50);  // runs past the end
  b.read(std::span(unregistered), pname, 0);                         // local memory not registered
  b.read(std::span(dbuf).subspan(1000, 100), pname, 123);             // fine
  auto [ec, r] = run_batch(io, decode, std::move(b));
  EXPECT_EQ(ec, kvx::errc::unknown_segment);
  ASSERT_EQ(r.ops.size(), 4u);
  EXPECT_EQ(r.ops[0].code, kvx::errc::unknown_segment);
  EXPECT_NE(r.ops[0].context.find("op 0"), std::string::npos) << r.ops[0].context;
  EXPECT_NE(r.ops[0].context.find("no-such-segment"), std::string::npos) << r.ops[0].context;
  EXPECT_EQ(r.ops[1].code, kvx::errc::out_of_range);
  EXPECT_NE(r.ops[1].context.find("prefill-0"), std::string::npos) << r.ops[1].context;
  EXPECT_NE(r.ops[1].context.find(std::to_string((4u << 20) - 50)), std::string::npos) << r.ops[1].context;
  EXPECT_EQ(r.ops[2].code, kvx::errc::out_of_range);
  EXPECT_NE(r.ops[2].context.find("not inside memory registered"), std::string::npos) << r.ops[2].context;
  EXPECT_TRUE(r.ops[3].ok()) << r.ops[3].context;
  EXPECT_TRUE(std::equal(dbuf.begin() + 1000, dbuf.begin() + 1100, pbuf.begin() + 123));
}

TEST_F(two_engines, SubRangesOfARegisteredRegionNeedNoNewRegistration) {
  batch b;
  for (int i = 0; i < 10; ++i) b.read(std::span(dbuf).subspan(1000u * i + 7, 999), pname, 4096u * i);
  auto [ec, r] = run_batch(io, decode, std::move(b));
  ASSERT_FALSE(ec) << r.first_error().message();
  EXPECT_EQ(decode.segments().find(dname).has_value(), true);
}

TEST_F(two_engines, AnOpPinnedToARegistrationKeyFailsOnAnyOtherRegistration) {
  batch pinned;
  pinned.read(std::span(dbuf).first(4096), pname, 0);
  auto desc = prefill.segments().find(pname);
  ASSERT_TRUE(desc.has_value());
  pinned.ops.back().remote.key = desc->key;
  auto [ok, r1] = run_batch(io, decode, std::move(pinned));
  ASSERT_FALSE(ok) << r1.first_error().message();
  batch wrong;
  wrong.read(std::span(dbuf).first(4096), pname, 0);
  wrong.ops.back().remote.key = desc->key + 1;  // planned against another registration
  auto [ec, r2] = run_batch(io, decode, std::move(wrong));
  EXPECT_EQ(ec, kvx::errc::stale);
  EXPECT_NE(r2.ops[0].context.find("registered again"), std::string::npos) << r2.ops[0].context;
}

TEST_F(two_engines, OwnerRestartUnderTheSameNameIsReResolved) {
  batch b1;
  b1.read(std::span(dbuf).first(4096), pname, 0);
  ASSERT_FALSE(run_batch(io, decode, std::move(b1)).first);  // descriptor now cached
  // The owner "restarts": withdraws the segment; a new incarnation registers the same name elsewhere.
  std::optional<std::error_code> out;
  prefill.async_deregister_memory(pname, [&](std::error_code ec) { out = ec; });
  io.restart();
  while (!out && io.run_one_for(5s)) {
  }
  ASSERT_TRUE(out && !*out);
  local net_p2(io.get_executor());
  engine_t prefill2(meta, {.node = "prefill-0"}, net_p2);
  std::vector<std::byte> fresh(4u << 20);
  kvx::testing::fill_random(fresh, 99);
  auto d2 = register_on(io, prefill2, fresh, pname);
  batch b2;
  b2.read(std::span(dbuf).first(8192), pname, 100);
  auto [ec, r] = run_batch(io, decode, std::move(b2));
  ASSERT_FALSE(ec) << r.first_error().message();
  EXPECT_EQ(r.re_resolutions, 1u);
  EXPECT_TRUE(std::equal(dbuf.begin(), dbuf.begin() + 8192, fresh.begin() + 100));
  // Gone for good: the re-fetch finds nothing and the error says so.
  std::optional<std::error_code> out2;
  prefill2.async_deregister_memory(pname, [&](std::error_code ec) { out2 = ec; });
  io.restart();
  while (!out2 && io.run_one_for(5s)) {
  }
  batch b3;
  b3.read(std::span(dbuf).first(64), pname, 0);
  auto [ec3, r3] = run_batch(io, decode, std::move(b3));
  EXPECT_TRUE(ec3 == kvx::errc::unknown_segment || ec3 == kvx::errc::stale) << ec3.message();
  EXPECT_NE(r3.ops[0].context.find(pname), std::string::npos) << r3.ops[0].context;
}

TEST_F(two_engines, CoroutinesAndFuturesBothWork) {
  std::optional<std::size_t> moved;
  asio::co_spawn(
      io,
      [&]() -> asio::awaitable<void> {
        batch b;
        b.read(std::span(dbuf).first(10000), pname, 5);
        // kvx completions lead with std::error_code, which Asio 1.26 hands back in a tuple.
        auto [ec, r] = co_await decode.async_transfer(std::move(b), asio::use_awaitable);
        if (!ec) moved = r.bytes;
      },
      asio::detached);
  io.restart();
  io.run_for(5s);
  ASSERT_TRUE(moved);
  EXPECT_EQ(*moved, 10000u);

  auto work = asio::make_work_guard(io);
  io.restart();
  std::thread runner([&] { io.run(); });
  batch b;
  b.write(std::span<const std::byte>(dbuf).first(777), pname, 1);
  auto fut = decode.async_transfer(std::move(b), asio::use_future);
  ASSERT_EQ(fut.wait_for(10s), std::future_status::ready);
  auto [ec, r] = fut.get();
  EXPECT_FALSE(ec);
  EXPECT_EQ(r.bytes, 777u);
  work.reset();
  io.stop();
  runner.join();
  EXPECT_TRUE(std::equal(dbuf.begin(), dbuf.begin() + 777, pbuf.begin() + 1));
}

TEST_F(two_engines, CancellationThroughTheTokenCompletesWithCancelled) {
  // Cancel before the loop runs: nothing may be half-reported.
  asio::cancellation_signal sig;
  std::optional<std::pair<std::error_code, batch_result>> out;
  batch b;
  b.read(std::span(dbuf).first(2u << 20), pname, 0);
  decode.async_transfer(std::move(b), asio::bind_cancellation_slot(sig.slot(), [&](std::error_code ec, batch_result r) {
                          out.emplace(ec, std::move(r));
                        }));
  sig.emit(asio::cancellation_type::terminal);
  io.restart();
  while (!out && io.run_one_for(5s)) {
  }
  ASSERT_TRUE(out);
  EXPECT_EQ(out->first, kvx::errc::cancelled);
  EXPECT_EQ(out->second.ops[0].code, kvx::errc::cancelled);
}

// ---- deterministic engines over test doubles --------------------------------

struct impulse_engines : ::testing::Test {
  asio::io_context io;
  embedded_metadata meta{io.get_executor()};
  local owner_net{io.get_executor()};
  kvx::testing::impulse<> net{io.get_executor()};
  kvx::transfer::transfer_engine<embedded_metadata, local> owner{meta, {.node = "owner"}, owner_net};
  std::vector<std::byte> remote = std::vector<std::byte>(1u << 20), mine = std::vector<std::byte>(1u << 20);
  std::string name = unique("impulse-remote");
  void SetUp() override {
    kvx::testing::fill_random(remote, 5);
    register_on(io, owner, remote, name);
  }
  // Registers `mine` with `e`, starts one 1000-byte read through it and runs
  // what is ready; the result lands in the returned optional.
  template <class Engine>
  std::optional<std::pair<std::error_code, batch_result>>& start_small_read(Engine& e) {
    register_on(io, e, mine, unique("impulse-local"));
    batch b;
    b.read(std::span(mine).first(1000), name, 0);
    e.async_transfer(std::move(b), [this](std::error_code ec, batch_result r) { small_read.emplace(ec, std::move(r)); });
    io.restart();
    io.poll();
    return small_read;
  }
  std::optional<std::pair<std::error_code, batch_result>> small_read;
};

TEST_F(impulse_engines, SlicesStripeWithinTheWindowOneReleaseAtATime) {
  kvx::transfer::transfer_engine<embedded_metadata, kvx::testing::impulse<>> e(
      meta, {.node = "initiator", .slice_size = 4096, .max_in_flight = 4}, net);
  register_on(io, e, mine, unique("impulse-local"));
  std::optional<std::pair<std::error_code, batch_result>> out;
  batch b;
  b.read(std::span(mine).first(10 * 4096 + 100), name, 0);  // 11 slices
  b.read(std::span(mine).subspan(100000, 4096), name, 200000);  // 1 slice
  e.async_transfer(std::move(b), [&](std::error_code ec, batch_result r) { out.emplace(ec, std::move(r)); });
  io.restart();
  io.poll();
  EXPECT_EQ(net.pending(), 4u) << "the window bounds slices in flight";
  std::size_t released = 0;
  while (!out) {
    ASSERT_LE(net.pending(), 4u);
    if (net.release_one()) ++released;
    io.restart();
    io.poll();
    ASSERT_LT(released, 100u);
  }
  EXPECT_EQ(released, 12u);
  EXPECT_EQ(net.started(), 12u);
  ASSERT_FALSE(out->first) << out->second.first_error().message();
  EXPECT_TRUE(std::equal(mine.begin(), mine.begin() + 10 * 4096 + 100, remote.begin()));
  EXPECT_TRUE(std::equal(mine.begin() + 100000, mine.begin() + 100000 + 4096, remote.begin() + 200000));
}

TEST_F(impulse_engines, TransientErrorsAreRetriedThenReported) {
  kvx::transfer::transfer_engine<embedded_metadata, kvx::testing::impulse<>> e(
      meta, {.node = "initiator", .max_retries = 2, .retry_backoff = {}}, net);
  auto& out = start_small_read(e);
  ASSERT_TRUE(net.fail_one(kvx::errc::connection_lost));
  io.restart();
  io.poll();
  ASSERT_TRUE(net.fail_one(kvx::errc::timed_out));
  io.restart();
  io.poll();
  ASSERT_TRUE(net.fail_one(kvx::errc::connection_lost));  // third failure: out of retries
  io.restart();
  io.poll();
  ASSERT_TRUE(out);
  EXPECT_EQ(out->first, kvx::errc::connection_lost);
  EXPECT_EQ(out->second.ops[0].retries, 2u);
  EXPECT_NE(out->second.ops[0].context.find("after 2 retries"), std::string::npos) << out->second.ops[0].context;
}

TEST_F(impulse_engines, RetriesWaitOutABackoffThatDoublesPerAttempt) {
  using namespace std::chrono;
  kvx::transfer::transfer_engine<embedded_metadata, kvx::testing::impulse<>> e(
      meta, {.node = "initiator", .max_retries = 3, .retry_backoff = milliseconds(20), .max_retry_backoff = milliseconds(30)},
      net);
  auto& out = start_small_read(e);
  // Each failure: nothing is re-issued at once; the retry comes after the
  // backoff (20 ms, then 30 ms: doubled, capped), never earlier.
  for (auto wait : {milliseconds(20), milliseconds(30), milliseconds(30)}) {
    ASSERT_TRUE(net.fail_one(kvx::errc::timed_out));
    const auto failed_at = steady_clock::now();
    io.restart();
    io.poll();
    EXPECT_EQ(net.pending(), 0u) << "re-issued without waiting";
    while (net.pending() == 0 && steady_clock::now() - failed_at < seconds(5)) io.run_one_for(milliseconds(1));
    ASSERT_EQ(net.pending(), 1u);
    EXPECT_GE(steady_clock::now() - failed_at, wait);
  }
  ASSERT_TRUE(net.release_one());
  io.restart();
  while (!out && io.run_one_for(seconds(5))) {
  }
  ASSERT_TRUE(out);
  EXPECT_FALSE(out->first) << out->first.message();
  EXPECT_EQ(out->second.ops[0].retries, 3u);
}

TEST_F(impulse_engines, CancellationDuringABackoffCompletesPromptly) {
  using namespace std::chrono;
  kvx::transfer::transfer_engine<embedded_metadata, kvx::testing::impulse<>> e(
      meta, {.node = "initiator", .retry_backoff = seconds(30), .max_retry_backoff = seconds(30)}, net);
  register_on(io, e, mine, unique("impulse-local"));
  std::optional<std::error_code> out;
  asio::cancellation_signal cancel;
  batch b;
  b.read(std::span(mine).first(1000), name, 0);
  e.async_transfer(std::move(b), asio::bind_cancellation_slot(cancel.slot(), [&](std::error_code ec, batch_result) { out = ec; }));
  io.restart();
  io.poll();
  ASSERT_TRUE(net.fail_one(kvx::errc::connection_lost));  // now waiting 30 s to retry
  io.restart();
  io.poll();
  cancel.emit(asio::cancellation_type::terminal);
  const auto t0 = steady_clock::now();
  while (!out && steady_clock::now() - t0 < seconds(5)) io.run_one_for(milliseconds(5));
  ASSERT_TRUE(out);
  EXPECT_EQ(*out, kvx::errc::cancelled);
}

TEST_F(impulse_engines, ADeadPeerTimesOutWithinTheDeadline) {
  kvx::transfer::transfer_engine<embedded_metadata, kvx::testing::impulse<>> e(meta, {.node = "initiator"}, net);
  register_on(io, e, mine, unique("impulse-local"));
  for (int variant = 0; variant < 2; ++variant) {
    std::optional<std::pair<std::error_code, batch_result>> out;
    batch b;
    b.read(std::span(mine).first(3u << 20 >> 2), name, 0);
    auto h = [&](std::error_code ec, batch_result r) { out.emplace(ec, std::move(r)); };
    const auto start = std::chrono::steady_clock::now();
    if (variant == 0) {
      b.deadline = 30ms;
      e.async_transfer(std::move(b), h);
    } else {
      e.async_transfer(std::move(b), kvx::cancel_after(io.get_executor(), 30ms, h));
    }
    io.restart();
    while (!out && io.run_one_for(5s)) {
    }
    ASSERT_TRUE(out) << "variant " << variant;
    EXPECT_EQ(out->first, kvx::errc::timed_out) << "variant " << variant << ": " << out->first.message();
    // A batch deadline names itself in each op; kvx::cancel_after turns only the batch code into timed_out.
    EXPECT_EQ(out->second.ops[0].code, variant == 0 ? kvx::errc::timed_out : kvx::errc::cancelled);
    EXPECT_LT(std::chrono::steady_clock::now() - start, 10s);
    EXPECT_EQ(net.pending(), 0u) << "every slice was cancelled";
  }
}

// The owner registers the segment again while an op is half done: the
// slices still to come would go to the new registration, the ones done went
// to the old. The op fails (stale) instead of reporting success with bytes
// of two incarnations; for a write, the new one would lack the first slice.
template <bool Write>
void an_op_split_across_an_owner_restart_fails(impulse_engines& f) {
  kvx::transfer::transfer_engine<embedded_metadata, kvx::testing::impulse<>> e(
      f.meta, {.node = "initiator", .slice_size = 4096, .max_in_flight = 1}, f.net);
  register_on(f.io, e, f.mine, unique("impulse-local"));
  kvx::testing::fill_random(f.mine, 31);
  std::optional<std::pair<std::error_code, batch_result>> out;
  batch b;
  if (Write)
    b.write(std::span<const std::byte>(f.mine).first(3 * 4096), f.name, 0);
  else
    b.read(std::span(f.mine).first(3 * 4096), f.name, 0);
  e.async_transfer(std::move(b), [&](std::error_code ec, batch_result r) { out.emplace(ec, std::move(r)); });
  f.io.restart();
  f.io.poll();
  ASSERT_TRUE(f.net.release_one());  // slice 0 moves under the first registration
  f.io.restart();
  f.io.poll();
  std::optional<std::error_code> gone;
  f.owner.async_deregister_memory(f.name, [&](std::error_code ec) { gone = ec; });
  f.io.restart();
  while (!gone && f.io.run_one_for(5s)) {
  }
  ASSERT_TRUE(gone && !*gone);
  local net2(f.io.get_executor());
  kvx::transfer::transfer_engine<embedded_metadata, local> owner2(f.meta, {.node = "owner"}, net2);
  std::vector<std::byte> fresh(1u << 20);
  kvx::testing::fill_random(fresh, 77);
  const std::vector<std::byte> fresh_before(fresh.begin(), fresh.begin() + 3 * 4096);
  register_on(f.io, owner2, fresh, f.name);
  for (int i = 0; !out && i < 100; ++i) {  // slice 1 meets the new registration: re-resolved
    f.net.release_one();
    f.io.restart();
    f.io.poll();
  }
  ASSERT_TRUE(out) << "the batch never completed";
  ASSERT_EQ(out->first, kvx::errc::stale) << out->second.first_error().message();
  EXPECT_EQ(out->second.re_resolutions, 1u);
  EXPECT_NE(out->second.ops[0].context.find("registered again"), std::string::npos) << out->second.ops[0].context;
  if (Write) {
    EXPECT_TRUE(std::equal(fresh_before.begin(), fresh_before.end(), fresh.begin()))
        << "the new registration got part of an operation begun on the old one";
  }
}

TEST_F(impulse_engines, AReadSplitAcrossAnOwnerRestartFailsInsteadOfMixingTwoIncarnations) {
  an_op_split_across_an_owner_restart_fails<false>(*this);
}
TEST_F(impulse_engines, AWriteSplitAcrossAnOwnerRestartFailsInsteadOfCompletingHalfOfIt) {
  an_op_split_across_an_owner_restart_fails<true>(*this);
}

TEST_F(impulse_engines, NoTransportThatReachesTheSegmentIsAnError) {
  kvx::testing::failing_transport failing(io.get_executor());
  kvx::transfer::transfer_engine<embedded_metadata, kvx::testing::failing_transport> e(meta, {.node = "initiator"}, failing);
  register_on(io, e, mine, unique("failing-local"));
  batch b;
  b.read(std::span(mine).first(10), name, 0);  // published with a "local" entry only
  auto [ec, r] = run_batch(io, e, std::move(b));
  EXPECT_EQ(ec, kvx::errc::unreachable);
  EXPECT_NE(r.ops[0].context.find("no transport reaches"), std::string::npos) << r.ops[0].context;
  EXPECT_EQ(failing.operations(), 0u);
}

TEST_F(impulse_engines, RetriesUnderAFaultySchedulEndInExactBytesOrAnError) {
  kvx::transport::faulty<local> faulty_net(
      {.seed = 11, .drop = 0.1, .disconnect = 0.1, .delay = 0.2, .delay_by = 20us, .drop_timeout = 50us, .disconnect_ops = 1},
      io.get_executor());
  kvx::transfer::transfer_engine<embedded_metadata, kvx::transport::faulty<local>> e(
      meta, {.node = "initiator", .slice_size = 8192, .max_in_flight = 8, .max_retries = 6}, faulty_net);
  register_on(io, e, mine, unique("faulty-local"));
  kvx::testing::test_rng rng(3);
  int ok = 0;
  for (int round = 0; round < 20; ++round) {
    batch b;
    std::vector<std::pair<std::uint64_t, std::uint64_t>> spans;  // (local/remote offset, len)
    for (int i = 0; i < 4; ++i) {
      const std::uint64_t len = rng.uniform(1, 40000);
      const std::uint64_t off = static_cast<std::uint64_t>(i) * 50000 + rng.uniform(0, 9000);
      spans.emplace_back(off, len);
      if (round % 2)
        b.read(std::span(mine).subspan(off, len), name, off);
      else
        b.write(std::span<const std::byte>(mine).subspan(off, len), name, off);
    }
    if (round % 2 == 0) kvx::testing::fill_random(mine, 1000 + static_cast<std::uint64_t>(round));
    auto [ec, r] = run_batch(io, e, std::move(b));
    for (std::size_t i = 0; i < spans.size(); ++i) {
      if (!r.ops[i].ok()) {
        EXPECT_TRUE(r.ops[i].code == kvx::errc::connection_lost || r.ops[i].code == kvx::errc::timed_out) << r.ops[i].context;
        continue;
      }
      ++ok;
      auto [off, len] = spans[i];
      ASSERT_TRUE(std::equal(mine.begin() + static_cast<std::ptrdiff_t>(off), mine.begin() + static_cast<std::ptrdiff_t>(off + len),
                             remote.begin() + static_cast<std::ptrdiff_t>(off)))
          << "silent corruption in round " << round << " op " << i;
    }
  }
  EXPECT_GT(ok, 60);
  auto c = faulty_net.counts();
  EXPECT_GT(c.dropped + c.disconnected, 5u) << "the schedule injected faults";
}

TEST(TransferEngineStress, ConcurrentBatchesFromSeveralThreads) {
  asio::io_context io;
  embedded_metadata meta(io.get_executor());
  local a(io.get_executor()), b(io.get_executor());
  kvx::transfer::transfer_engine<embedded_metadata, local> owner(meta, {.node = "owner"}, a);
  kvx::transfer::transfer_engine<embedded_metadata, local> user(meta, {.node = "user", .slice_size = 16384, .max_in_flight = 8}, b);
  std::vector<std::byte> remote(1u << 20), mine(1u << 20);
  kvx::testing::fill_random(remote, 8);
  const auto rname = unique("stress-remote");
  register_on(io, owner, remote, rname);
  register_on(io, user, mine, unique("stress-local"));
  auto work = asio::make_work_guard(io);
  io.restart();
  std::vector<std::thread> runners;
  for (int i = 0; i < 2; ++i) runners.emplace_back([&] { io.run(); });
  std::vector<std::string> failures(4);
  std::vector<std::thread> users;
  for (int t = 0; t < 4; ++t) {
    users.emplace_back([&, t] {
      const std::uint64_t base = static_cast<std::uint64_t>(t) * (256u << 10);
      kvx::testing::test_rng rng(40 + static_cast<std::uint64_t>(t));
      for (int round = 0; round < 15 && failures[t].empty(); ++round) {
        const std::uint64_t len = rng.uniform(1, 200000);
        const std::uint64_t off = base + rng.uniform(0, (256u << 10) - len);
        batch bt;
        const bool is_read = rng.next() & 1;
        if (is_read) {
          bt.read(std::span(mine).subspan(off, len), rname, off);
        } else {
          kvx::testing::fill_random(std::span(mine).subspan(off, len), rng.next());
          bt.write(std::span<const std::byte>(mine).subspan(off, len), rname, off);
        }
        auto [ec, r] = user.async_transfer(std::move(bt), asio::use_future).get();
        if (ec) failures[t] = r.first_error().message();
        else failures[t] = kvx::testing::first_difference(std::span(mine).subspan(off, len), std::span(remote).subspan(off, len));
      }
    });
  }
  for (auto& u : users) u.join();
  work.reset();
  io.stop();
  for (auto& r : runners) r.join();
  for (int t = 0; t < 4; ++t) EXPECT_EQ(failures[t], "") << "thread " << t;
}

}  // namespace

namespace {

// `local` that asks for slices of at least 1 MiB and counts the reads it gets.
class big_slice_local : public kvx::transport::local {
 public:
  using local::local;
  static constexpr kvx::transport::transport_capabilities capabilities = [] {
    auto c = local::capabilities;
    c.min_slice = 1u << 20;
    return c;
  }();
  template <class Token>
  auto async_read(const kvx::memory::segment_descriptor& d, std::uint64_t off, std::span<std::byte> dst, Token&& token) {
    ++reads;
    return local::async_read(d, off, dst, std::forward<Token>(token));
  }
  int reads = 0;
};

TEST_F(two_engines, ATransportsMinSliceRaisesTheEnginesSliceSize) {
  big_slice_local net(io.get_executor());
  kvx::transfer::transfer_engine<embedded_metadata, big_slice_local> e(meta, {.node = "big", .slice_size = 64 * 1024}, net);
  std::vector<std::byte> mine(4u << 20);
  register_on(io, e, mine, unique("big-slices"));
  batch b;
  b.read(std::span(mine), pname, 0);
  auto [ec, r] = run_batch(io, e, std::move(b));
  ASSERT_FALSE(ec) << r.first_error().message();
  EXPECT_EQ(net.reads, 4) << "4 MiB in 1 MiB slices, not 64 KiB ones";
  EXPECT_EQ(mine, pbuf);
}

}  // namespace

namespace {

// embedded_metadata whose gets answer only after `delay`: a slow backend.
class slow_metadata {
 public:
  using metadata_backend_concept = kvx::transfer::metadata_backend_tag;
  slow_metadata(asio::io_context& io, std::chrono::milliseconds delay) : io_(io), inner_(io.get_executor()), delay_(delay) {}
  auto get_executor() const { return io_.get_executor(); }
  template <class Token>
  auto async_put(std::string k, std::string v, Token&& t) { return inner_.async_put(std::move(k), std::move(v), std::forward<Token>(t)); }
  template <class Token>
  auto async_remove(std::string k, Token&& t) { return inner_.async_remove(std::move(k), std::forward<Token>(t)); }
  template <class Token>
  auto async_list(std::string p, Token&& t) { return inner_.async_list(std::move(p), std::forward<Token>(t)); }
  template <class Handler>
  void async_get(std::string k, Handler&& h) {
    auto timer = std::make_shared<asio::steady_timer>(io_, delay_);
    timer->async_wait([this, timer, k = std::move(k), h = std::forward<Handler>(h)](boost::system::error_code) mutable {
      inner_.async_get(std::move(k), std::move(h));
    });
  }

 private:
  asio::io_context& io_;
  embedded_metadata inner_;
  std::chrono::milliseconds delay_;
};

TEST(TransferEngineSlowMetadata, ABatchThatTimesOutWhileResolvingIgnoresTheLateAnswer) {
  using namespace std::chrono;
  asio::io_context io;
  slow_metadata meta(io, milliseconds(150));
  local owner_net(io.get_executor()), net(io.get_executor());
  kvx::transfer::transfer_engine<slow_metadata, local> owner(meta, {.node = "owner"}, owner_net);
  kvx::transfer::transfer_engine<slow_metadata, local> e(meta, {.node = "n"}, net);
  std::vector<std::byte> remote(4096), mine(4096);
  const auto name = unique("slow-remote");
  register_on(io, owner, remote, name);
  register_on(io, e, mine, unique("slow-local"));
  batch b;
  b.read(std::span(mine), name, 0);
  b.deadline = milliseconds(20);
  std::optional<std::error_code> out;
  e.async_transfer(std::move(b), [&](std::error_code ec, batch_result) { out = ec; });
  io.restart();
  const auto t0 = steady_clock::now();
  while (steady_clock::now() - t0 < milliseconds(400)) io.run_one_for(milliseconds(5));  // past the late answer
  ASSERT_TRUE(out);
  EXPECT_EQ(*out, kvx::errc::timed_out);
}

}  // namespace

namespace {

// ---- a metadata backend that fails on demand ---------------------------------

// embedded_metadata whose puts and removes fail with a chosen error while one
// is set. A failing put may still land (`put_lands`): its answer was lost,
// as when a timed-out request reached the server after all.
class flaky_metadata {
 public:
  using metadata_backend_concept = kvx::transfer::metadata_backend_tag;
  explicit flaky_metadata(asio::any_io_executor ex) : inner(std::move(ex)) {}
  auto get_executor() const { return inner.get_executor(); }
  template <class Handler>
  void async_put(std::string k, std::string v, Handler&& h) {
    ++puts;
    if (!put_error) return inner.async_put(std::move(k), std::move(v), std::forward<Handler>(h));
    if (put_lands) inner.async_put(std::move(k), std::move(v), [](std::error_code) {});
    kvx::detail::post_completion(inner.get_executor(), std::forward<Handler>(h), put_error);
  }
  template <class Handler>
  void async_get(std::string k, Handler&& h) {
    inner.async_get(std::move(k), std::forward<Handler>(h));
  }
  template <class Handler>
  void async_remove(std::string k, Handler&& h) {
    ++removes;
    if (!remove_error) return inner.async_remove(std::move(k), std::forward<Handler>(h));
    kvx::detail::post_completion(inner.get_executor(), std::forward<Handler>(h), remove_error);
  }
  template <class Handler>
  void async_list(std::string p, Handler&& h) {
    inner.async_list(std::move(p), std::forward<Handler>(h));
  }

  embedded_metadata inner;
  std::error_code put_error, remove_error;
  bool put_lands = false;
  int puts = 0, removes = 0;
};

using flaky_engine_t = kvx::transfer::transfer_engine<flaky_metadata, local>;

template <class Engine>
std::optional<std::error_code> register_now(asio::io_context& io, Engine& e, std::vector<std::byte>& buf,
                                            const std::string& name) {
  std::optional<std::error_code> out;
  e.async_register_memory(memory_region{buf.data(), buf.size()}, name,
                          [&](std::error_code ec, kvx::memory::segment_descriptor) { out = ec; });
  io.restart();
  while (!out && io.run_one_for(5s)) {
  }
  return out;
}

template <class Engine>
std::optional<std::error_code> deregister_now(asio::io_context& io, Engine& e, const std::string& name) {
  std::optional<std::error_code> out;
  e.async_deregister_memory(name, [&](std::error_code ec) { out = ec; });
  io.restart();
  while (!out && io.run_one_for(5s)) {
  }
  return out;
}

bool published(asio::io_context& io, flaky_metadata& meta, const std::string& name) {
  std::optional<bool> found;
  meta.inner.async_get(kvx::transfer::segment_metadata_key(name), [&](std::error_code ec, std::string) { found = !ec; });
  io.restart();
  while (!found && io.run_one_for(5s)) {
  }
  return found.value_or(false);
}

// An engine over a metadata backend whose puts and removes fail on demand.
struct TransferEngineMetadataFailures : ::testing::Test {
  asio::io_context io;
  flaky_metadata meta{io.get_executor()};
  local net{io.get_executor()};
  flaky_engine_t e{meta, {.node = "n"}, net};
  std::vector<std::byte> buf = std::vector<std::byte>(4096);
};

TEST_F(TransferEngineMetadataFailures, AFailedPublishUndoesTheRegistrationAndARetrySucceeds) {
  const auto name = unique("unpublished");
  for (auto error : {kvx::errc::internal, kvx::errc::timed_out}) {
    meta.put_error = error;
    meta.put_lands = error == kvx::errc::timed_out;  // the put reached the backend, its answer did not
    const int removes_before = meta.removes;
    auto out = register_now(io, e, buf, name);
    ASSERT_TRUE(out) << "no completion";
    EXPECT_EQ(*out, error);
    EXPECT_EQ(e.segments().find(name).code(), kvx::errc::unknown_segment) << "the table still holds the segment";
    EXPECT_FALSE(published(io, meta, name)) << "a descriptor nobody serves stays published";
    EXPECT_EQ(meta.removes - removes_before, error == kvx::errc::timed_out ? 1 : 0)
        << "only a put whose outcome is unknown is withdrawn";
  }
  meta.put_error = {};
  auto again = register_now(io, e, buf, name);
  ASSERT_TRUE(again);
  EXPECT_FALSE(*again) << again->message() << ": the transports still held the first registration";
  EXPECT_TRUE(published(io, meta, name));
}

TEST_F(TransferEngineMetadataFailures, ANameThatIsNotUtf8IsRefusedWithoutThrowing) {
  const std::string name = unique("bad") + "\xff";
  std::optional<std::error_code> out;
  EXPECT_NO_THROW(out = register_now(io, e, buf, name));
  ASSERT_TRUE(out) << "no completion";
  EXPECT_EQ(*out, kvx::errc::invalid_argument);
  EXPECT_EQ(e.segments().find(name).code(), kvx::errc::unknown_segment);
  EXPECT_EQ(meta.puts, 0);
}

TEST_F(TransferEngineMetadataFailures, AFailedWithdrawalIsRetriedByTheNextDeregister) {
  const auto name = unique("withdrawn");
  ASSERT_EQ(register_now(io, e, buf, name), std::error_code{});
  meta.remove_error = kvx::errc::connection_lost;
  EXPECT_EQ(deregister_now(io, e, name), std::error_code{kvx::errc::connection_lost});
  EXPECT_TRUE(published(io, meta, name));
  meta.remove_error = {};
  EXPECT_EQ(deregister_now(io, e, name), std::error_code{}) << "the retry withdraws the stale descriptor";
  EXPECT_FALSE(published(io, meta, name));
  EXPECT_EQ(deregister_now(io, e, name), std::error_code{kvx::errc::unknown_segment}) << "and then it is gone";
}

// ---- a transport still holding a segment -------------------------------------

// What shm and cuda_ipc report when a peer's copy outlives their revoke
// timeout, on demand: deregistration fails with timed_out while `holding`.
struct holding_transport : kvx::testing::failing_transport {
  using failing_transport::failing_transport;
  kvx::result<void> deregister_memory(const kvx::memory::local_segment& s) {
    ++deregisters;
    if (holding) return kvx::error{kvx::errc::timed_out, "segment '" + s.name + "': 1 peer copies still in flight"};
    return {};
  }
  bool holding = false;
  int deregisters = 0;
};

struct TransferEngineRevokeTimeout : ::testing::Test {
  asio::io_context io;
  flaky_metadata meta{io.get_executor()};
  local net{io.get_executor()};
  holding_transport held{io.get_executor()};
  kvx::transfer::transfer_engine<flaky_metadata, local, holding_transport> e{meta, {.node = "n"}, net, held};
  std::vector<std::byte> buf = std::vector<std::byte>(4096);
};

TEST_F(TransferEngineRevokeTimeout, DeregistrationFailsUntilTheTransportLetsGoAndEachRetryAsksItAgain) {
  const auto name = unique("held");
  ASSERT_EQ(register_now(io, e, buf, name), std::error_code{});
  held.holding = true;
  EXPECT_EQ(deregister_now(io, e, name), std::error_code{kvx::errc::timed_out}) << "the memory was reported free";
  EXPECT_EQ(held.deregisters, 1);
  EXPECT_FALSE(published(io, meta, name)) << "peers still find the descriptor";
  EXPECT_EQ(e.segments().find(name).code(), kvx::errc::unknown_segment) << "the table still serves the segment";
  EXPECT_EQ(deregister_now(io, e, name), std::error_code{kvx::errc::timed_out});
  EXPECT_EQ(held.deregisters, 2) << "the retry did not ask the transport again";
  held.holding = false;
  EXPECT_EQ(deregister_now(io, e, name), std::error_code{}) << "the transport let go";
  EXPECT_EQ(held.deregisters, 3);
  EXPECT_EQ(deregister_now(io, e, name), std::error_code{kvx::errc::unknown_segment}) << "and then it is gone";
  EXPECT_EQ(held.deregisters, 3);
}

TEST_F(TransferEngineRevokeTimeout, AFailedPublishWhoseUndoTimesOutReportsTheUndoAndLeavesItToDeregister) {
  const auto name = unique("held-unpublished");
  meta.put_error = kvx::errc::internal;
  held.holding = true;
  EXPECT_EQ(register_now(io, e, buf, name), std::error_code{kvx::errc::timed_out})
      << "the backend's error hid that the memory is not free";
  held.holding = false;
  meta.put_error = {};
  EXPECT_EQ(deregister_now(io, e, name), std::error_code{});
  EXPECT_EQ(held.deregisters, 2);
  EXPECT_EQ(deregister_now(io, e, name), std::error_code{kvx::errc::unknown_segment});
}

// ---- descriptors from peers are untrusted ------------------------------------

TEST(TransferEngineUntrustedMetadata, DeeplyNestedOrInvalidDescriptorsAreMalformedNotACrash) {
  asio::io_context io;
  embedded_metadata meta(io.get_executor());
  local net(io.get_executor());
  kvx::transfer::transfer_engine<embedded_metadata, local> e(meta, {.node = "n"}, net);
  std::vector<std::byte> mine(4096);
  register_on(io, e, mine, unique("untrusted-local"));
  // 100,000 nested arrays: copying or printing them recursively overflows the stack.
  const std::string deep = std::string(100'000, '[') + std::string(100'000, ']');
  const std::string fields = R"("node": "peer", "length": 4096, "location": "host", "key": 1, "generation": 1)";
  const std::vector<std::pair<std::string, std::string>> descriptors = {
      {unique("deep-transports"), R"({"name": "x", )" + fields + R"(, "transports": {"tcp": )" + deep + "}}"},
      {unique("deep-name"), R"({"name": )" + deep + ", " + fields + "}"},
      {unique("no-key"), R"({"name": "x", "node": "peer", "length": 4096, "location": "host", "generation": 1})"},
      {unique("not-json"), "{"},
  };
  batch b;
  for (const auto& [segment, text] : descriptors) {
    meta.async_put(kvx::transfer::segment_metadata_key(segment), text, [](std::error_code) {});
    b.read(std::span(mine).first(16), segment, 0);
  }
  auto [ec, r] = run_batch(io, e, std::move(b));
  EXPECT_EQ(ec, kvx::errc::malformed_message);
  ASSERT_EQ(r.ops.size(), descriptors.size());
  for (std::size_t i = 0; i < descriptors.size(); ++i) {
    EXPECT_EQ(r.ops[i].code, kvx::errc::malformed_message) << r.ops[i].context;
    EXPECT_NE(r.ops[i].context.find(descriptors[i].first), std::string::npos) << r.ops[i].context;
    EXPECT_LT(r.ops[i].context.size(), 1000u) << "the error quotes a bounded prefix at most";
  }
}

TEST(TransferEngineUntrustedMetadata, DescriptorsParseWithABoundedDepth) {
  const std::string deep = std::string(100'000, '[') + std::string(100'000, ']');
  auto parsed = kvx::memory::segment_descriptor::parse(R"({"transports": {"tcp": )" + deep + "}}");
  EXPECT_EQ(parsed.code(), kvx::errc::malformed_message);
  EXPECT_NE(parsed.error().message().find("deeper"), std::string::npos) << parsed.error().message();
  // from_json on a document parsed elsewhere (no depth bound) refuses it too.
  auto j = nlohmann::json::parse(R"({"name": "x", "node": "n", "length": 1, "location": "host", "key": 1, "generation": 1,
                                     "transports": {"tcp": )" + deep + "}}");
  auto d = kvx::memory::segment_descriptor::from_json(j);
  EXPECT_EQ(d.code(), kvx::errc::invalid_argument);
  EXPECT_NE(d.error().message().find("segment.transports"), std::string::npos) << d.error().message();
  // A real descriptor round-trips.
  kvx::memory::segment_descriptor ok;
  ok.name = "kv";
  ok.node = "n";
  ok.length = 4096;
  ok.transports["tcp"] = {{"rails", {{{"host", "10.0.0.1"}, {"port", 1}}, {{"host", "10.0.1.1"}, {"port", 2}}}}};
  auto back = kvx::memory::segment_descriptor::parse(ok.to_json().dump());
  ASSERT_TRUE(back) << back.error().message();
  EXPECT_EQ(back->to_json(), ok.to_json());
}

// ---- limits -----------------------------------------------------------------

TEST_F(two_engines, AnUnboundedMaxInFlightIsAcceptedNotThrown) {
  local net(io.get_executor());
  kvx::transfer::transfer_engine<embedded_metadata, local> e(
      meta, {.node = "unbounded", .slice_size = 4096, .max_in_flight = SIZE_MAX}, net);
  std::vector<std::byte> mine(1u << 20);
  register_on(io, e, mine, unique("unbounded-local"));
  batch b;
  b.read(std::span(mine), pname, 0);
  std::pair<std::error_code, batch_result> out;
  ASSERT_NO_THROW(out = run_batch(io, e, std::move(b)));
  ASSERT_FALSE(out.first) << out.second.first_error().message();
  EXPECT_TRUE(std::equal(mine.begin(), mine.end(), pbuf.begin()));
}

}  // namespace
