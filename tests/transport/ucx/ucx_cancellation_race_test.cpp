#include <kvx/transport/ucx.hpp>

#include <gtest/gtest.h>

#include <boost/asio/io_context.hpp>

#include <vector>

#include <kvx/memory/segment_table.hpp>

#include "support/cancellation_race.hpp"

namespace {

using namespace std::chrono_literals;
using kvx::memory::memory_region;

// As tests/transport/cancellation_race_test.cpp, over UCX's tcp transport,
// whose ops complete from the worker's progress on any thread. A cancellation
// emitted after the op finished, before its handler ran, reached a freed op
// (heap-use-after-free under TSan): the op's slot was never cleared.
TEST(TransportCancellationRace, UcxOpsClearTheirSlotWhereTheCallerEmitsAndNeverCancelAFinishedOp) {
  constexpr std::size_t op_size = kvx::test::racing_op::size;
  boost::asio::io_context io;
  kvx::transport::ucx_options o;
  o.tls = "tcp";
  kvx::transport::ucx owner(io.get_executor(), o);
  kvx::transport::ucx initiator(io.get_executor(), o);
  std::vector<std::byte> mem(op_size * 16), local(op_size * 64);
  kvx::memory::segment_table owner_table("race-owner"), initiator_table("race-initiator");
  auto seg = *owner_table.add("race-ucx", memory_region{mem.data(), mem.size()});
  auto entry = owner.register_memory(seg);
  ASSERT_TRUE(entry) << entry.error().message();
  auto d = owner_table.describe(seg);
  d.transports["ucx"] = *entry;
  auto local_seg = *initiator_table.add("race-ucx-local", memory_region{local.data(), local.size()});
  ASSERT_TRUE(initiator.register_memory(local_seg));
  // A cancelled op closes its endpoint: the others on it fail connection_lost.
  kvx::test::cancel_while_completing(
      io, {4000, 16, 200us},
      [&](int i, kvx::test::racing_op&, auto h) {
        const auto slot = static_cast<std::size_t>(i % 64) * op_size;
        initiator.async_read(d, static_cast<std::uint64_t>(i % 16) * op_size, std::span(local).subspan(slot, op_size),
                             std::move(h));
      },
      kvx::errc::connection_lost);
  // Let the endpoints that cancels opened and closed finish their wire-up:
  // UCX 1.13 asserts in ucp_worker_destroy on a wire-up request still pending.
  io.restart();
  io.run_for(500ms);
}

}  // namespace
