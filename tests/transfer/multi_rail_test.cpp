// Rails through the transfer engine: tcp transports on loopback stand in for
// NICs. One transfer is striped over every rail; a rail whose far end dies
// mid-transfer is failed over without the caller seeing an error; when every
// rail is gone the batch fails instead of hanging.
#include <kvx/transport/multi_rail.hpp>

#include <gtest/gtest.h>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/io_context.hpp>

#include <optional>
#include <vector>

#include <kvx/testing/random_bytes.hpp>
#include <kvx/testing/test_transports.hpp>
#include <kvx/transfer/embedded_metadata.hpp>
#include <kvx/transfer/transfer_engine.hpp>
#include <kvx/transport/tcp.hpp>

#include "support/run_until.hpp"

namespace {

namespace asio = boost::asio;
using namespace std::chrono_literals;
using kvx::transfer::batch;
using kvx::transfer::batch_result;
using kvx::transfer::embedded_metadata;
using rails_t = kvx::transport::multi_rail<kvx::transport::tcp, kvx::topology::rail::round_robin>;
using rails_engine_t = kvx::transfer::transfer_engine<embedded_metadata, rails_t>;

// A tcp transport that serves nothing: what a rail becomes when its NIC dies.
kvx::transport::tcp dead_rail(asio::io_context& io) {
  kvx::transport::tcp::config c;
  c.serve = false;
  return kvx::transport::tcp(io.get_executor(), c);
}

rails_t make_rails(asio::io_context& io, std::size_t n) {
  std::vector<std::unique_ptr<kvx::transport::tcp>> v;
  for (std::size_t i = 0; i < n; ++i) v.push_back(std::make_unique<kvx::transport::tcp>(io.get_executor()));
  return rails_t(kvx::topology::rail::round_robin(n), std::move(v));
}

struct multi_rail_engines : ::testing::Test {
  static constexpr std::size_t size = 6u << 20, slice = 64u << 10, rails = 3;
  asio::io_context io;
  embedded_metadata meta{io.get_executor()};
  rails_t owner_rails = make_rails(io, rails), my_rails = make_rails(io, rails);
  rails_engine_t owner{meta, {.node = "owner"}, owner_rails};
  rails_engine_t me{meta, {.node = "initiator", .slice_size = slice, .max_in_flight = 6}, my_rails};
  std::vector<std::byte> remote = std::vector<std::byte>(size), mine = std::vector<std::byte>(size);
  std::string name = kvx::testing::unique_segment_name("rails");

  void SetUp() override {
    kvx::testing::fill_random(remote, 3);
    reg(owner, remote, name);
    reg(me, mine, name + "-local");
  }
  void reg(rails_engine_t& e, std::vector<std::byte>& buf, const std::string& n) {
    std::optional<std::error_code> out;
    e.async_register_memory({buf.data(), buf.size()}, n, [&](std::error_code ec, const kvx::memory::segment_descriptor& d) {
      out = ec;
      if (!ec) {
        EXPECT_EQ(d.transports.at("tcp").at("rails").size(), rails);
      }
    });
    run_until([&] { return out.has_value(); });
    ASSERT_TRUE(out && !*out) << (out ? out->message() : "no completion");
  }
  template <class Pred>
  void run_until(Pred done) {
    kvx::test::run_until(io, done, 20s);
  }
  std::uint64_t carried_total() {
    std::uint64_t n = 0;
    for (auto c : my_rails.ops_per_rail()) n += c;
    return n;
  }
};

TEST_F(multi_rail_engines, OneTransferIsStripedOverEveryRail) {
  batch b;
  b.read(std::span(mine), name, 0);
  std::optional<std::pair<std::error_code, batch_result>> out;
  me.async_transfer(std::move(b), [&](std::error_code ec, batch_result r) { out.emplace(ec, std::move(r)); });
  run_until([&] { return out.has_value(); });
  ASSERT_TRUE(out);
  ASSERT_FALSE(out->first) << out->second.first_error().message();
  EXPECT_EQ(mine, remote);
  const auto per_rail = my_rails.ops_per_rail();
  for (std::size_t r = 0; r < rails; ++r) EXPECT_EQ(per_rail[r], size / slice / rails) << "rail " << r;
}

TEST_F(multi_rail_engines, ARailThatDiesMidTransferIsFailedOverInvisibly) {
  batch b;
  b.read(std::span(mine), name, 0);
  std::optional<std::pair<std::error_code, batch_result>> out;
  me.async_transfer(std::move(b), [&](std::error_code ec, batch_result r) { out.emplace(ec, std::move(r)); });
  run_until([&] { return out.has_value() || carried_total() >= 12; });
  ASSERT_FALSE(out) << "the transfer finished before the rail could fail";
  const auto before = my_rails.ops_per_rail()[1];
  // The owner's NIC 1 dies: its server and every connection to it close.
  owner_rails.rail(1) = dead_rail(io);
  run_until([&] { return out.has_value(); });
  ASSERT_TRUE(out);
  ASSERT_FALSE(out->first) << out->second.first_error().message();
  EXPECT_EQ(mine, remote) << "every byte arrived over the remaining rails";
  EXPECT_EQ(out->second.retries, 0u) << "failover happened below the engine";
  EXPECT_LE(my_rails.ops_per_rail()[1], before + 6) << "at most a window's worth more on the dead rail";
  EXPECT_EQ(carried_total(), size / slice);
}

TEST_F(multi_rail_engines, WhenEveryRailIsGoneTheBatchFailsInsteadOfHanging) {
  for (std::size_t r = 0; r < rails; ++r) owner_rails.rail(r) = dead_rail(io);
  batch b;
  b.read(std::span(mine).first(256u << 10), name, 0);
  std::optional<std::pair<std::error_code, batch_result>> out;
  me.async_transfer(std::move(b), [&](std::error_code ec, batch_result r) { out.emplace(ec, std::move(r)); });
  run_until([&] { return out.has_value(); });
  ASSERT_TRUE(out) << "no completion: the batch hung";
  EXPECT_TRUE(out->first == kvx::errc::unreachable || out->first == kvx::errc::connection_lost) << out->first.message();
}

TEST(MultiRail, RailCountMustMatchTheSelector) {
  asio::io_context io;
  std::vector<std::unique_ptr<kvx::transport::tcp>> two;
  for (int i = 0; i < 2; ++i) two.push_back(std::make_unique<kvx::transport::tcp>(io.get_executor()));
  EXPECT_THROW(rails_t(kvx::topology::rail::round_robin(3), std::move(two)), std::invalid_argument);
  EXPECT_THROW(rails_t(kvx::topology::rail::round_robin(0), {}), std::invalid_argument);
}

TEST(MultiRail, ADescriptorWithoutRailsIsUnreachable) {
  asio::io_context io;
  auto r = make_rails(io, 2);
  kvx::memory::segment_descriptor d;
  d.name = "x";
  d.host_id = kvx::memory::this_host_id();
  d.transports["tcp"] = {{"host", "127.0.0.1"}, {"port", 1}};  // a single-rail entry
  EXPECT_EQ(r.can_transfer(d), kvx::errc::unreachable);
  std::vector<std::byte> buf(16);
  std::optional<std::error_code> out;
  r.async_read(d, 0, std::span(buf), [&](std::error_code ec) { out = ec; });
  EXPECT_FALSE(out) << "never inline";
  for (int i = 0; i < 500 && !out; ++i) io.run_one_for(10ms);  // the rails' acceptors keep io busy
  ASSERT_TRUE(out);
  EXPECT_EQ(*out, kvx::errc::unreachable);
}

// Two impulse rails: the test decides when each rail's operation ends.
using impulse_rails_t = kvx::transport::multi_rail<kvx::testing::impulse<>, kvx::topology::rail::round_robin>;

impulse_rails_t make_impulse_rails(asio::io_context& io) {
  std::vector<std::unique_ptr<kvx::testing::impulse<>>> v;
  for (int i = 0; i < 2; ++i) v.push_back(std::make_unique<kvx::testing::impulse<>>(io.get_executor()));
  return impulse_rails_t(kvx::topology::rail::round_robin(2), std::move(v));
}

// A descriptor with one rail entry per rail; impulse rails never look inside.
kvx::memory::segment_descriptor two_rail_descriptor() {
  kvx::memory::segment_descriptor d;
  d.name = "remote";
  d.length = 4096;
  d.transports["local"] = {{"rails", {nlohmann::json::object(), nlohmann::json::object()}}};
  return d;
}

std::size_t rail_pending(impulse_rails_t& r, std::size_t i) { return r.rail(i).pending(); }

// A read on two impulse rails, bound to a cancellation signal, started and polled once.
struct cancellable_rail_read {
  asio::io_context io;
  impulse_rails_t r = make_impulse_rails(io);
  std::vector<std::byte> buf = std::vector<std::byte>(16);
  asio::cancellation_signal sig;
  std::optional<std::error_code> out;

  cancellable_rail_read() {
    r.async_read(two_rail_descriptor(), 0, std::span(buf),
                 asio::bind_cancellation_slot(sig.slot(), [this](std::error_code ec) { out = ec; }));
    io.poll();
  }
  void cancel_and_poll() {
    sig.emit(asio::cancellation_type::terminal);
    io.restart();
    io.poll();
  }
};

TEST(MultiRail, ACancellationReachesTheRailsOperation) {
  cancellable_rail_read rd;
  ASSERT_EQ(rail_pending(rd.r, 0) + rail_pending(rd.r, 1), 1u);
  rd.cancel_and_poll();
  ASSERT_TRUE(rd.out) << "the cancellation did not reach the rail";
  EXPECT_EQ(*rd.out, kvx::errc::cancelled);
  EXPECT_EQ(rail_pending(rd.r, 0) + rail_pending(rd.r, 1), 0u);
}

// The batch deadline fires while a failed rail's completion waits to be
// failed over: the cancellation lands in the finished operation, and the
// operation on the next rail must not start as if nothing happened.
TEST(MultiRail, ACancellationDuringFailoverIsNotLost) {
  cancellable_rail_read rd;
  const std::size_t first = rail_pending(rd.r, 0) == 1 ? 0 : 1;
  ASSERT_EQ(rail_pending(rd.r, first), 1u);
  ASSERT_TRUE(rd.r.rail(first).fail_one(kvx::errc::connection_lost));  // its completion is queued, not run
  rd.cancel_and_poll();
  ASSERT_TRUE(rd.out) << "the cancellation was lost: rail " << 1 - first << " has " << rail_pending(rd.r, 1 - first)
                      << " operation(s) that nothing will end";
  EXPECT_EQ(*rd.out, kvx::errc::cancelled);
  EXPECT_EQ(rail_pending(rd.r, 0) + rail_pending(rd.r, 1), 0u);
}

}  // namespace
