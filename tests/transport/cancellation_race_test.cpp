#include <kvx/transport/decorators/checksummed.hpp>
#include <kvx/transport/decorators/faulty.hpp>
#include <kvx/transport/local.hpp>
#include <kvx/transport/shm.hpp>
#include <kvx/transport/tcp.hpp>

#include <gtest/gtest.h>

#include <boost/asio/io_context.hpp>

#include <chrono>
#include <string>
#include <vector>

#include "support/cancellation_race.hpp"

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
using kvx::test::cancel_while_completing;
using kvx::test::race_shape;
using kvx::test::racing_op;
constexpr std::size_t op_size = racing_op::size;

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
