#include <kvx/transport/decorators/checksummed.hpp>
#include <kvx/transport/decorators/faulty.hpp>
#include <kvx/transport/decorators/metered.hpp>

#include <gtest/gtest.h>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/io_context.hpp>

#include <kvx/testing/transport_conformance.hpp>

#include <optional>
#include <vector>

namespace {

namespace asio = boost::asio;
using kvx::memory::memory_region;
using kvx::transport::local;

// One remote segment served through `local`, plus a local buffer.
struct segment_pair {
  kvx::memory::segment_table table{"decorators-owner"};
  std::vector<std::byte> remote = std::vector<std::byte>(1 << 16);
  std::vector<std::byte> mine = std::vector<std::byte>(1 << 16);
  kvx::memory::local_segment seg;
  kvx::memory::segment_descriptor desc;
  local registrar;

  explicit segment_pair(asio::io_context& io) : registrar(io.get_executor()) {
    kvx::testing::fill_random(remote, 1);
    kvx::testing::fill_random(mine, 2);
    seg = *table.add(kvx::testing::unique_segment_name("decorators"), memory_region{remote.data(), remote.size()});
    desc = table.describe(seg);
    desc.transports["local"] = *registrar.register_memory(seg);
  }
  ~segment_pair() { (void)registrar.deregister_memory(seg); }
};

template <class T>
std::error_code run_read(asio::io_context& io, T& t, const kvx::memory::segment_descriptor& d, std::uint64_t off,
                         std::span<std::byte> dst) {
  std::optional<std::error_code> out;
  t.async_read(d, off, dst, [&](std::error_code ec) { out = ec; });
  io.restart();
  io.run_for(std::chrono::seconds(10));
  return out.value_or(kvx::errc::internal);
}

template <class T>
std::error_code run_write(asio::io_context& io, T& t, const kvx::memory::segment_descriptor& d, std::uint64_t off,
                          std::span<const std::byte> src) {
  std::optional<std::error_code> out;
  t.async_write(d, off, src, [&](std::error_code ec) { out = ec; });
  io.restart();
  io.run_for(std::chrono::seconds(10));
  return out.value_or(kvx::errc::internal);
}

TEST(Metered, RecordsBytesOpsErrorsAndLatencyPerOp) {
  asio::io_context io;
  segment_pair p(io);
  kvx::metrics::registry reg;
  kvx::transport::metered<local> t({.registry = &reg, .label = "local-metered"}, io.get_executor());
  ASSERT_FALSE(run_read(io, t, p.desc, 0, std::span(p.mine).first(1000)));
  ASSERT_FALSE(run_write(io, t, p.desc, 0, std::span<const std::byte>(p.mine).first(300)));
  auto bad = p.desc;
  bad.key ^= 1;
  ASSERT_EQ(run_read(io, t, bad, 0, std::span(p.mine).first(10)), kvx::errc::bad_key);
  const kvx::metrics::labels rd{{"transport", "local-metered"}, {"op", "read"}};
  const kvx::metrics::labels wr{{"transport", "local-metered"}, {"op", "write"}};
  EXPECT_EQ(reg.counter("kvx_transport_bytes_total", "", rd).value(), 1000u);
  EXPECT_EQ(reg.counter("kvx_transport_bytes_total", "", wr).value(), 300u);
  EXPECT_EQ(reg.counter("kvx_transport_ops_total", "", rd).value(), 2u);
  EXPECT_EQ(reg.counter("kvx_transport_errors_total", "", rd).value(), 1u);
  EXPECT_EQ(reg.histogram("kvx_transport_latency_seconds", "", wr).count(), 1u);
  EXPECT_NE(reg.prometheus_text().find("kvx_transport_bytes_total{transport=\"local-metered\",op=\"read\"} 1000"),
            std::string::npos);
}

TEST(Faulty, SameSeedGivesTheSameSchedule) {
  asio::io_context io;
  segment_pair p(io);
  const kvx::transport::faulty_config cfg{.seed = 42, .drop = 0.2, .disconnect = 0.1, .corrupt = 0.2, .delay = 0.2,
                                          .delay_by = std::chrono::microseconds(10), .drop_timeout = std::chrono::microseconds(10)};
  std::vector<std::error_code> first, second;
  for (auto* out : {&first, &second}) {
    kvx::transport::faulty<local> t(cfg, io.get_executor());
    for (int i = 0; i < 60; ++i) out->push_back(run_read(io, t, p.desc, 0, std::span(p.mine).first(64)));
    auto c = t.counts();
    EXPECT_GT(c.dropped, 0u);
    EXPECT_GT(c.disconnected, 0u);
    EXPECT_GT(c.corrupted, 0u);
    EXPECT_GT(c.delayed, 0u);
    EXPECT_EQ(c.dropped + c.disconnected + c.failed_while_down + c.corrupted + c.delayed + c.clean, 60u);
  }
  EXPECT_EQ(first, second);
}

TEST(Faulty, EachFaultHasItsDocumentedEffect) {
  asio::io_context io;
  segment_pair p(io);
  {  // corrupt: success, exactly one byte differs
    kvx::transport::faulty<local> t({.corrupt = 1.0}, io.get_executor());
    ASSERT_FALSE(run_read(io, t, p.desc, 100, std::span(p.mine).first(4096)));
    int differ = 0;
    for (int i = 0; i < 4096; ++i) differ += p.mine[i] != p.remote[100 + i];
    EXPECT_EQ(differ, 1);
    std::vector<std::byte> before = p.remote;
    ASSERT_FALSE(run_write(io, t, p.desc, 0, std::span<const std::byte>(p.mine).first(4096)));
    differ = 0;
    for (int i = 0; i < 4096; ++i) differ += p.mine[i] != p.remote[i];
    EXPECT_EQ(differ, 1) << "a corrupted write lands one wrong byte";
  }
  {  // drop: timed_out, nothing moved
    kvx::transport::faulty<local> t({.drop = 1.0}, io.get_executor());
    std::vector<std::byte> dst(64, std::byte{0});
    EXPECT_EQ(run_read(io, t, p.desc, 0, dst), kvx::errc::timed_out);
    EXPECT_EQ(dst, std::vector<std::byte>(64, std::byte{0}));
  }
  {  // disconnect: half moved, then the link is down for disconnect_ops ops
    kvx::transport::faulty<local> t({.disconnect = 1.0, .disconnect_ops = 2}, io.get_executor());
    std::vector<std::byte> dst(64, std::byte{0});
    EXPECT_EQ(run_read(io, t, p.desc, 0, dst), kvx::errc::connection_lost);
    EXPECT_TRUE(std::equal(dst.begin(), dst.begin() + 32, p.remote.begin()));
    EXPECT_EQ(dst[40], std::byte{0});
    EXPECT_EQ(run_read(io, t, p.desc, 0, dst), kvx::errc::connection_lost);
    EXPECT_EQ(run_read(io, t, p.desc, 0, dst), kvx::errc::connection_lost);
    EXPECT_EQ(t.counts().failed_while_down, 2u);
  }
  {  // delay: succeeds; a cancelled delayed op completes with cancelled
    kvx::transport::faulty<local> t({.delay = 1.0, .delay_by = std::chrono::seconds(30)}, io.get_executor());
    asio::cancellation_signal sig;
    std::optional<std::error_code> out;
    t.async_read(p.desc, 0, std::span(p.mine).first(8), asio::bind_cancellation_slot(sig.slot(), [&](std::error_code ec) { out = ec; }));
    io.restart();
    io.poll();
    EXPECT_FALSE(out);
    sig.emit(asio::cancellation_type::terminal);
    io.run_for(std::chrono::seconds(5));
    ASSERT_TRUE(out);
    EXPECT_EQ(*out, kvx::errc::cancelled);
  }
}

TEST(Faulty, ConfigErrorsNameTheField) {
  auto doc = nlohmann::json::parse(R"({"drop": 1.5})");
  auto c = kvx::transport::faulty_config::from_json(kvx::config::view(doc, "faulty"));
  ASSERT_FALSE(c);
  EXPECT_NE(c.error().message().find("faulty.drop"), std::string::npos) << c.error().message();
  doc = nlohmann::json::parse(R"({"dorp": 0.5})");
  c = kvx::transport::faulty_config::from_json(kvx::config::view(doc, "faulty"));
  ASSERT_FALSE(c);
  EXPECT_NE(c.error().message().find("faulty.dorp"), std::string::npos) << c.error().message();
  doc = nlohmann::json::parse(R"({"drop": 0.6, "corrupt": 0.6})");
  EXPECT_FALSE(kvx::transport::faulty_config::from_json(kvx::config::view(doc, "faulty")));
  doc = nlohmann::json::parse(R"({"seed": 9, "delay": 0.5, "delay_us": 5})");
  c = kvx::transport::faulty_config::from_json(kvx::config::view(doc, "faulty"));
  ASSERT_TRUE(c) << c.error().message();
  EXPECT_EQ(c->seed, 9u);
  EXPECT_EQ(c->delay_by, std::chrono::microseconds(5));
}

TEST(Checksummed, CatchesEveryCorruptedReadAndWrite) {
  asio::io_context io;
  segment_pair p(io);
  // Every transfer flips one bit, the verification reads included: the hashes still differ.
  kvx::transport::checksummed<kvx::transport::faulty<local>> t({.scratch_chunk = 1024, .scratch_chunks = 2},
                                                                kvx::transport::faulty_config{.corrupt = 1.0},
                                                                io.get_executor());
  EXPECT_EQ(run_read(io, t, p.desc, 7, std::span(p.mine).first(5000)), kvx::errc::checksum_mismatch);
  EXPECT_EQ(run_write(io, t, p.desc, 9, std::span<const std::byte>(p.mine).first(5000)), kvx::errc::checksum_mismatch);
}

TEST(Checksummed, CleanTransfersAreByteExact) {
  asio::io_context io;
  segment_pair p(io);
  kvx::transport::checksummed<local> t({.scratch_chunk = 1000, .scratch_chunks = 1}, io.get_executor());
  ASSERT_FALSE(run_read(io, t, p.desc, 3, std::span(p.mine).first(20000)));
  EXPECT_TRUE(std::equal(p.mine.begin(), p.mine.begin() + 20000, p.remote.begin() + 3));
  kvx::testing::fill_random(p.mine, 9);
  ASSERT_FALSE(run_write(io, t, p.desc, 11, std::span<const std::byte>(p.mine).first(30000)));
  EXPECT_TRUE(std::equal(p.mine.begin(), p.mine.begin() + 30000, p.remote.begin() + 11));
}

// The property the decorators exist for: under any fault schedule, retried
// operations end in success with exact bytes or in an error; never in
// silently wrong bytes.
TEST(Checksummed, RetriedOpsUnderFaultsEndInExactBytesOrAnError) {
  asio::io_context io;
  segment_pair p(io);
  kvx::transport::checksummed<kvx::transport::faulty<local>> t(
      {.scratch_chunk = 4096, .scratch_chunks = 2},
      kvx::transport::faulty_config{.seed = 5, .drop = 0.1, .disconnect = 0.1, .corrupt = 0.25, .delay = 0.1,
                                    .delay_by = std::chrono::microseconds(5), .drop_timeout = std::chrono::microseconds(5)},
      io.get_executor());
  kvx::testing::test_rng rng(77);
  int succeeded = 0, failed = 0;
  for (int i = 0; i < 150; ++i) {
    const std::uint64_t len = rng.uniform(64, 16384);
    const std::uint64_t off = rng.uniform(0, p.remote.size() - len);
    const bool is_read = rng.next() & 1;
    auto buf = std::span(p.mine).first(len);
    if (!is_read) kvx::testing::fill_random(buf, rng.next());
    std::error_code ec;
    for (int attempt = 0; attempt < 10; ++attempt) {
      ec = is_read ? run_read(io, t, p.desc, off, buf) : run_write(io, t, p.desc, off, buf);
      if (!ec) break;
      ASSERT_TRUE(ec == kvx::errc::checksum_mismatch || ec == kvx::errc::timed_out || ec == kvx::errc::connection_lost)
          << ec.message();
    }
    if (ec) {
      ++failed;
      continue;
    }
    ++succeeded;
    ASSERT_TRUE(std::equal(buf.begin(), buf.end(), p.remote.begin() + static_cast<std::ptrdiff_t>(off)))
        << "silent corruption: op " << i << (is_read ? " read " : " write ") << len << " at " << off;
  }
  EXPECT_GT(succeeded, 50);  // each op is 2-8 transfers, each faulty 65% of the time
  EXPECT_GT(t.inner().counts().corrupted, 10u);
  (void)failed;
}

// Each decorator passes the transport conformance suite.
struct metered_env {
  using transport_type = kvx::transport::metered<local>;
  explicit metered_env(asio::io_context& io) : t({.registry = &reg, .label = ""}, io.get_executor()) {}
  transport_type& owner() { return t; }
  transport_type& initiator() { return t; }
  kvx::metrics::registry reg;
  transport_type t;
};

struct checksummed_env {
  using transport_type = kvx::transport::checksummed<local>;
  explicit checksummed_env(asio::io_context& io) : t({}, io.get_executor()) {}
  transport_type& owner() { return t; }
  transport_type& initiator() { return t; }
  transport_type t;
};

struct delaying_env {  // faulty with only delays stays correct
  using transport_type = kvx::transport::faulty<local>;
  explicit delaying_env(asio::io_context& io)
      : t({.seed = 3, .delay = 0.5, .delay_by = std::chrono::microseconds(20)}, io.get_executor()) {}
  transport_type& owner() { return t; }
  transport_type& initiator() { return t; }
  transport_type t;
};

}  // namespace

KVX_TRANSPORT_CONFORMANCE(Metered, metered_env);
KVX_TRANSPORT_CONFORMANCE(Checksummed, checksummed_env);
KVX_TRANSPORT_CONFORMANCE(FaultyDelaysOnly, delaying_env);
