#include <kvx/transport/tcp.hpp>

#include <gtest/gtest.h>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/write.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstring>
#include <functional>
#include <future>
#include <limits>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "support/child_process.hpp"
#include "support/run_until.hpp"

namespace {

namespace asio = boost::asio;
namespace wire = kvx::transport::detail::tcp_wire;
using namespace std::chrono_literals;
using kvx::memory::memory_region;
using kvx::transport::tcp;

std::vector<std::byte> random_bytes(std::size_t n, std::uint64_t seed) {
  std::vector<std::byte> v(n);
  std::mt19937_64 rng(seed);
  for (auto& b : v) b = static_cast<std::byte>(rng());
  return v;
}

using kvx::test::run_until;

tcp::config small_slices(unsigned connections = 4) {
  tcp::config c;
  c.connections = connections;
  c.slice_size = 64 * 1024;
  return c;
}

// A descriptor naming a tcp endpoint on loopback, for peers played by a test.
kvx::memory::segment_descriptor loopback_descriptor(std::string name, std::uint64_t length, std::uint16_t port) {
  kvx::memory::segment_descriptor d;
  d.name = std::move(name);
  d.length = length;
  d.transports["tcp"] = {{"host", "127.0.0.1"}, {"port", port}};
  return d;
}

// Two transports on one io_context, a 1 MiB segment served by the owner.
struct tcp_pair : ::testing::Test {
  asio::io_context io;
  tcp owner{io.get_executor(), small_slices()};
  tcp initiator{io.get_executor(), small_slices()};
  kvx::memory::segment_table table{"owner-node"};
  std::vector<std::byte> region = random_bytes(1 << 20, 1);
  kvx::memory::local_segment seg;
  kvx::memory::segment_descriptor desc;

  void SetUp() override {
    seg = *table.add("tcp-test-kv", memory_region{region.data(), region.size()});
    auto entry = owner.register_memory(seg);
    ASSERT_TRUE(entry) << entry.error().message();
    desc = table.describe(seg);
    desc.transports["tcp"] = *entry;
  }

  std::error_code read(const kvx::memory::segment_descriptor& d, std::uint64_t off, std::span<std::byte> dst) {
    std::optional<std::error_code> out;
    initiator.async_read(d, off, dst, [&](std::error_code ec) { out = ec; });
    EXPECT_FALSE(out) << "completed inside the initiating function";
    if (!run_until(io, [&] { return out.has_value(); })) return kvx::errc::internal;
    return *out;
  }
  std::error_code write(const kvx::memory::segment_descriptor& d, std::uint64_t off, std::span<const std::byte> src) {
    std::optional<std::error_code> out;
    initiator.async_write(d, off, src, [&](std::error_code ec) { out = ec; });
    EXPECT_FALSE(out) << "completed inside the initiating function";
    if (!run_until(io, [&] { return out.has_value(); })) return kvx::errc::internal;
    return *out;
  }
};

TEST_F(tcp_pair, RegisterReturnsHostPortAndMaxRequest) {
  const auto& e = desc.transports["tcp"];
  EXPECT_EQ(e["host"], "127.0.0.1");
  EXPECT_EQ(e["port"], owner.local_endpoint().port());
  EXPECT_NE(owner.local_endpoint().port(), 0);
  EXPECT_EQ(e["max_request"], owner.settings().max_request);
  EXPECT_FALSE(initiator.can_transfer(desc));
}

TEST_F(tcp_pair, RandomizedReadsAndWritesAreByteExact) {
  std::mt19937_64 rng(7);
  std::vector<std::byte> buf(300 * 1024);
  std::vector<std::byte> shadow = region;
  for (int i = 0; i < 60; ++i) {
    const std::size_t len = i % 10 == 0 ? 1 : 1 + rng() % buf.size();
    const std::size_t off = rng() % (region.size() - len + 1);
    if (i % 2 == 0) {
      std::fill(buf.begin(), buf.end(), std::byte{0xee});
      ASSERT_FALSE(read(desc, off, std::span(buf).first(len))) << len << " at " << off;
      ASSERT_EQ(std::memcmp(buf.data(), region.data() + off, len), 0) << len << " at " << off;
      ASSERT_EQ(buf[len < buf.size() ? len : 0], len < buf.size() ? std::byte{0xee} : buf[0]) << "wrote past dst";
    } else {
      auto src = random_bytes(len, 100 + i);
      ASSERT_FALSE(write(desc, off, src)) << len << " at " << off;
      std::memcpy(shadow.data() + off, src.data(), len);
      ASSERT_EQ(std::memcmp(shadow.data(), region.data(), region.size()), 0) << len << " at " << off;
    }
  }
}

TEST_F(tcp_pair, ZeroLengthOpsAreCheckedAndSucceed) {
  std::vector<std::byte> none;
  EXPECT_FALSE(read(desc, 5, none));
  EXPECT_FALSE(write(desc, region.size(), none));
  auto bad = desc;
  bad.key ^= 1;
  EXPECT_EQ(read(bad, 0, none), kvx::errc::bad_key);
}

TEST_F(tcp_pair, ManyConcurrentOpsStripeOverSeveralConnections) {
  constexpr int ops = 256;
  constexpr std::size_t each = 4096 - 7;
  std::vector<std::byte> buf(ops * each);
  int done = 0;
  std::vector<std::error_code> results(ops);
  for (int i = 0; i < ops; ++i) {
    auto h = [&, i](std::error_code ec) {
      results[i] = ec;
      ++done;
    };
    initiator.async_read(desc, static_cast<std::uint64_t>(i) * each, std::span(buf).subspan(i * each, each), h);
  }
  ASSERT_TRUE(run_until(io, [&] { return done == ops; }));
  for (int i = 0; i < ops; ++i) ASSERT_FALSE(results[i]) << i << ": " << results[i].message();
  EXPECT_EQ(std::memcmp(buf.data(), region.data(), buf.size()), 0);
  EXPECT_EQ(initiator.stats().connections_opened, 4u);
  EXPECT_EQ(owner.stats().sessions_accepted, 4u);
  EXPECT_EQ(owner.stats().requests_served, static_cast<std::uint64_t>(ops));
}

TEST_F(tcp_pair, OneLargeOpIsSlicedAcrossConnections) {
  std::vector<std::byte> buf(region.size());
  ASSERT_FALSE(read(desc, 0, buf));
  EXPECT_EQ(buf, region);
  EXPECT_EQ(initiator.stats().connections_opened, 4u);
  EXPECT_EQ(owner.stats().requests_served, region.size() / (64 * 1024));
  auto src = random_bytes(region.size() - 3, 9);
  ASSERT_FALSE(write(desc, 3, src));
  EXPECT_EQ(std::memcmp(region.data() + 3, src.data(), src.size()), 0);
}

TEST_F(tcp_pair, RefusalsCarryTheOwnersCheckAndLeaveMemoryUntouched) {
  const auto before = region;
  std::vector<std::byte> buf(256, std::byte{0x11});
  auto unknown = desc;
  unknown.name = "no-such-segment";
  auto bad_key = desc;
  bad_key.key ^= 0x40;
  auto stale = desc;
  stale.generation += 1;
  EXPECT_EQ(read(unknown, 0, buf), kvx::errc::unknown_segment);
  EXPECT_EQ(read(bad_key, 0, buf), kvx::errc::bad_key);
  EXPECT_EQ(read(stale, 0, buf), kvx::errc::stale);
  EXPECT_EQ(read(desc, region.size() - 255, buf), kvx::errc::out_of_range);
  EXPECT_EQ(read(desc, std::numeric_limits<std::uint64_t>::max() - 10, buf), kvx::errc::out_of_range);
  EXPECT_TRUE(std::all_of(buf.begin(), buf.end(), [](std::byte b) { return b == std::byte{0x11}; }));
  EXPECT_EQ(write(unknown, 0, buf), kvx::errc::unknown_segment);
  EXPECT_EQ(write(bad_key, 0, buf), kvx::errc::bad_key);
  EXPECT_EQ(write(stale, 0, buf), kvx::errc::stale);
  EXPECT_EQ(write(desc, region.size() - 255, buf), kvx::errc::out_of_range);
  EXPECT_EQ(write(desc, std::numeric_limits<std::uint64_t>::max() - 10, buf), kvx::errc::out_of_range);
  EXPECT_EQ(region, before);
  EXPECT_EQ(owner.stats().requests_refused, 10u);
  // Refusals keep the connection: a good request on it still works.
  EXPECT_FALSE(read(desc, 0, buf));
  EXPECT_EQ(initiator.stats().connections_opened, 1u);
}

TEST_F(tcp_pair, OpsLargerThanThePeersMaxRequestAreCutToIt) {
  auto d = desc;
  d.transports["tcp"]["max_request"] = 4096;  // the peer says so: slices obey it
  std::vector<std::byte> buf(40'000);
  ASSERT_FALSE(read(d, 17, buf));
  EXPECT_EQ(std::memcmp(buf.data(), region.data() + 17, buf.size()), 0);
  EXPECT_EQ(owner.stats().requests_served, 10u);
}

TEST_F(tcp_pair, CanTransferChecksTheEntryWithoutIo) {
  auto none = desc;
  none.transports = nlohmann::json::object();
  EXPECT_EQ(initiator.can_transfer(none), kvx::errc::unreachable);
  auto no_port = desc;
  no_port.transports["tcp"].erase("port");
  EXPECT_EQ(initiator.can_transfer(no_port), kvx::errc::unreachable);
  auto hostname = desc;
  hostname.transports["tcp"]["host"] = "not an address";
  EXPECT_EQ(initiator.can_transfer(hostname), kvx::errc::unreachable);
  auto gpu = desc;
  gpu.where = kvx::memory::location::cuda(0);
  EXPECT_EQ(initiator.can_transfer(gpu), kvx::errc::not_supported);
  std::vector<std::byte> buf(8);
  EXPECT_EQ(read(none, 0, buf), kvx::errc::unreachable);
}

TEST_F(tcp_pair, DeregisterFromACompletionDoesNotHangAndLaterOpsAreRefused) {
  std::vector<std::byte> buf(64 * 1024);
  std::optional<kvx::result<void>> dereg;
  initiator.async_read(desc, 0, buf, [&](std::error_code ec) {
    EXPECT_FALSE(ec);
    dereg = owner.deregister_memory(seg);  // on the io thread
  });
  ASSERT_TRUE(run_until(io, [&] { return dereg.has_value(); }));
  EXPECT_TRUE(*dereg);
  EXPECT_EQ(read(desc, 0, std::span(buf).first(8)), kvx::errc::unknown_segment);
  EXPECT_TRUE(owner.register_memory(seg));
  EXPECT_FALSE(read(desc, 0, std::span(buf).first(8)));
}

TEST_F(tcp_pair, ClosedOwnerFailsInFlightOpsAndAReplacementOnTheSamePortIsReconnected) {
  std::vector<std::byte> buf(region.size());
  int done = 0;
  std::vector<std::error_code> results;
  for (int i = 0; i < 16; ++i)
    initiator.async_read(desc, 0, buf, [&](std::error_code ec) {
      results.push_back(ec);
      ++done;
    });
  owner.close();
  ASSERT_TRUE(run_until(io, [&] { return done == 16; }));
  int lost = 0;
  for (auto ec : results) {
    if (ec) {
      EXPECT_TRUE(ec == kvx::errc::connection_lost || ec == kvx::errc::unreachable) << ec.message();
      ++lost;
    }
  }
  EXPECT_GT(lost, 0);
  // A new owner on the same port, same segment: the initiator reconnects on next use.
  auto cfg = small_slices();
  cfg.port = owner.local_endpoint().port();
  owner = tcp(io.get_executor(), cfg);
  ASSERT_TRUE(owner.register_memory(seg));
  ASSERT_FALSE(read(desc, 0, buf));
  EXPECT_EQ(buf, region);
}

TEST(TcpTransport, ConnectionRefusedIsUnreachable) {
  asio::io_context io;
  tcp initiator(io.get_executor());
  // A port nothing listens on: bind one, note it, close it.
  std::uint16_t port = 0;
  {
    asio::ip::tcp::acceptor a(io, asio::ip::tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0));
    port = a.local_endpoint().port();
  }
  kvx::memory::segment_descriptor d;
  d.name = "nowhere";
  d.length = 100;
  d.transports["tcp"] = {{"host", "127.0.0.1"}, {"port", port}};
  std::vector<std::byte> buf(10);
  std::optional<std::error_code> out;
  initiator.async_read(d, 0, buf, [&](std::error_code ec) { out = ec; });
  ASSERT_TRUE(run_until(io, [&] { return out.has_value(); }));
  EXPECT_EQ(*out, kvx::errc::unreachable);
}

// Accepts, reads nothing, answers nothing.
struct silent_peer {
  asio::ip::tcp::acceptor acceptor;
  asio::ip::tcp::socket accepted;
  explicit silent_peer(asio::io_context& io)
      : acceptor(io, asio::ip::tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0)), accepted(io) {
    acceptor.async_accept(accepted, [](const boost::system::error_code&) {});
  }
  kvx::memory::segment_descriptor descriptor(std::uint64_t length) const {
    return loopback_descriptor("silent", length, acceptor.local_endpoint().port());
  }
};

TEST(TcpTransport, APeerThatNeverAnswersEndsInTimedOutWithCancelAfter) {
  asio::io_context io;
  tcp initiator(io.get_executor());
  silent_peer silent(io);
  const auto d = silent.descriptor(1 << 20);
  std::vector<std::byte> buf(1 << 20, std::byte{0x33});
  std::optional<std::error_code> r1, r2;
  // The handlers name the io_context as their executor, so the deadline timers run there too.
  initiator.async_read(d, 0, buf, kvx::cancel_after(200ms, asio::bind_executor(io, [&](std::error_code ec) { r1 = ec; })));
  initiator.async_write(d, 0, buf, kvx::cancel_after(200ms, asio::bind_executor(io, [&](std::error_code ec) { r2 = ec; })));
  const auto start = std::chrono::steady_clock::now();
  ASSERT_TRUE(run_until(io, [&] { return r1 && r2; }, 5s));
  EXPECT_LT(std::chrono::steady_clock::now() - start, 3s);
  EXPECT_EQ(*r1, kvx::errc::timed_out);
  EXPECT_EQ(*r2, kvx::errc::timed_out);
  EXPECT_TRUE(std::all_of(buf.begin(), buf.end(), [](std::byte b) { return b == std::byte{0x33}; }));
}

TEST(TcpTransport, ConfigFromJsonNamesTheBadField) {
  auto ok = tcp::config::from_json(nlohmann::json::parse(R"({"connections": 8, "max_request": "16MiB", "port": 0})"));
  ASSERT_TRUE(ok) << ok.error().message();
  EXPECT_EQ(ok->connections, 8u);
  EXPECT_EQ(ok->max_request, 16u << 20);
  auto zero = tcp::config::from_json(nlohmann::json::parse(R"({"connections": 0})"));
  ASSERT_FALSE(zero);
  EXPECT_NE(zero.error().message().find("tcp.connections"), std::string::npos) << zero.error().message();
  auto typo = tcp::config::from_json(nlohmann::json::parse(R"({"conections": 2})"));
  ASSERT_FALSE(typo);
  EXPECT_NE(typo.error().message().find("tcp.conections"), std::string::npos) << typo.error().message();
  auto type = tcp::config::from_json(nlohmann::json::parse(R"({"port": "eighty"})"), "transport.tcp");
  ASSERT_FALSE(type);
  EXPECT_NE(type.error().message().find("transport.tcp.port"), std::string::npos) << type.error().message();
  auto big_port = tcp::config::from_json(nlohmann::json::parse(R"({"port": 70000})"));
  EXPECT_FALSE(big_port);
  EXPECT_EQ(tcp::config::from_json(ok->to_json())->to_json(), ok->to_json());
}

TEST(TcpTransport, CreateReportsABadAddressAndThrowingConstructorThrows) {
  asio::io_context io;
  tcp::config c;
  c.address = "not-an-ip";
  auto made = tcp::create(io.get_executor(), c);
  ASSERT_FALSE(made);
  EXPECT_EQ(made.code(), kvx::errc::invalid_argument);
  EXPECT_THROW(tcp(io.get_executor(), c), std::system_error);
  tcp::config initiator_only;
  initiator_only.serve = false;
  tcp t(io.get_executor(), initiator_only);
  std::vector<std::byte> b(8);
  EXPECT_EQ(t.register_memory({"x", memory_region{b.data(), b.size()}, 1, 1}).code(), kvx::errc::not_supported);
}

// --- raw frames on a raw socket ---------------------------------------------

// The owner's io_context runs on a thread; the test talks to it with a
// blocking socket, frame by frame.
struct tcp_raw : ::testing::Test {
  asio::io_context io;
  tcp owner{io.get_executor()};
  kvx::memory::segment_table table{"raw-owner"};
  std::vector<std::byte> region = random_bytes(4096, 3);
  kvx::memory::local_segment seg;
  std::thread runner;
  asio::io_context client_io;
  asio::ip::tcp::socket sock{client_io};

  void SetUp() override {
    seg = *table.add("raw-kv", memory_region{region.data(), region.size()});
    ASSERT_TRUE(owner.register_memory(seg));
    runner = std::thread([this] {
      auto guard = asio::make_work_guard(io);
      io.run();
    });
    sock.connect(owner.local_endpoint());
    // Never block forever on a broken server.
    timeval tv{5, 0};
    ::setsockopt(sock.native_handle(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  }
  void TearDown() override {
    boost::system::error_code ignored;
    sock.close(ignored);
    io.stop();
    runner.join();
  }

  wire::request_header header(wire::opcode op, std::uint64_t off, std::uint64_t len) const {
    wire::request_header h;
    h.op = op;
    h.name_length = static_cast<std::uint16_t>(seg.name.size());
    h.request_id = 77;
    h.key = seg.key;
    h.generation = seg.generation;
    h.offset = off;
    h.length = len;
    return h;
  }
  std::vector<std::byte> frame(const wire::request_header& h, std::string_view name, std::span<const std::byte> payload = {}) {
    const auto hb = wire::encode_request(h);
    std::vector<std::byte> out(hb.begin(), hb.end());
    for (char c : name) out.push_back(static_cast<std::byte>(c));
    out.insert(out.end(), payload.begin(), payload.end());
    return out;
  }
  void send(std::span<const std::byte> bytes) { asio::write(sock, asio::buffer(bytes.data(), bytes.size())); }

  struct reply {
    wire::response_header header;
    std::string text;
    std::vector<std::byte> payload;
    std::uint64_t payload_at = 0;  // offset of the payload in the server's stream
  };
  std::uint64_t received = 0;  // bytes of the server's stream read so far
  std::optional<reply> receive() {
    wire::response_bytes hb;
    boost::system::error_code ec;
    asio::read(sock, asio::buffer(hb), ec);
    if (ec) return std::nullopt;
    auto p = wire::parse_response_header(hb);
    EXPECT_EQ(p.state, wire::parse_state::complete) << p.reason;
    reply r{p.header, {}, {}, received + hb.size() + p.header.pad};
    std::vector<std::byte> pad(p.header.pad, std::byte{0xee});
    asio::read(sock, asio::buffer(pad), ec);
    EXPECT_TRUE(std::all_of(pad.begin(), pad.end(), [](std::byte b) { return b == std::byte{0}; }));
    if (p.header.status != 0) {
      r.text.resize(p.header.length);
      asio::read(sock, asio::buffer(r.text), ec);
    } else {
      r.payload.resize(p.header.length);
      asio::read(sock, asio::buffer(r.payload), ec);
    }
    EXPECT_FALSE(ec) << ec.message();
    received = r.payload_at + p.header.length;
    return r;
  }
  bool closed_by_server() {
    std::byte b;
    boost::system::error_code ec;
    sock.read_some(asio::buffer(&b, 1), ec);
    return ec == asio::error::eof || ec == asio::error::connection_reset;
  }
  void expect_error(const std::optional<reply>& r, kvx::errc code) {
    ASSERT_TRUE(r) << "no error frame";
    EXPECT_EQ(r->header.status, static_cast<std::uint8_t>(code)) << r->text;
    EXPECT_FALSE(r->text.empty());
  }
};

TEST_F(tcp_raw, PipelinedGoodFramesAreAnsweredInOrder) {
  auto payload = random_bytes(100, 4);
  auto f1 = frame(header(wire::opcode::write, 10, 100), seg.name, payload);
  auto h2 = header(wire::opcode::read, 10, 100);
  h2.request_id = 78;
  auto f2 = frame(h2, seg.name);
  f1.insert(f1.end(), f2.begin(), f2.end());
  send(f1);
  auto r1 = receive();
  ASSERT_TRUE(r1);
  EXPECT_EQ(r1->header.status, 0);
  EXPECT_EQ(r1->header.request_id, 77u);
  auto r2 = receive();
  ASSERT_TRUE(r2);
  EXPECT_EQ(r2->header.request_id, 78u);
  EXPECT_EQ(r2->payload, payload);
}

// Every read payload starts at a multiple of 64 in the server's stream
// (whatever the region offset, and after unpadded error frames), so the
// kernel's copies on a loopback link avoid the slow mutually-misaligned
// `rep movsb` (tcp_protocol.hpp).
TEST_F(tcp_raw, ReadPayloadsArePaddedToTheRegionsAlignment) {
  for (std::uint64_t off = 0; off < 70; ++off) {
    auto h = header(wire::opcode::read, off, 100 + off);
    h.request_id = 1000 + off;
    send(frame(h, seg.name));
    if (off % 7 == 0) {  // an error frame in between shifts the stream
      auto bad = header(wire::opcode::read, 4096, 1);
      send(frame(bad, seg.name));
    }
  }
  for (std::uint64_t off = 0; off < 70; ++off) {
    auto r = receive();
    ASSERT_TRUE(r);
    ASSERT_EQ(r->header.status, 0) << r->text;
    EXPECT_EQ(r->header.request_id, 1000 + off);
    EXPECT_LT(r->header.pad, wire::payload_alignment);
    EXPECT_EQ(r->payload_at % wire::payload_alignment, 0u) << "offset " << off;
    EXPECT_EQ(std::memcmp(r->payload.data(), region.data() + off, r->payload.size()), 0);
    if (off % 7 == 0) {
      auto e = receive();
      expect_error(e, kvx::errc::out_of_range);
      EXPECT_EQ(e->header.pad, 0);
    }
  }
}

TEST_F(tcp_raw, BadMagicGetsAnErrorFrameAndACleanClose) {
  auto f = frame(header(wire::opcode::read, 0, 8), seg.name);
  f[0] = std::byte{'X'};
  send(f);
  auto r = receive();
  expect_error(r, kvx::errc::malformed_message);
  EXPECT_EQ(r->header.request_id, 0u);
  EXPECT_TRUE(closed_by_server());
}

TEST_F(tcp_raw, TruncatedHeaderGetsAnErrorFrameAndACleanClose) {
  auto f = frame(header(wire::opcode::read, 0, 8), seg.name);
  send(std::span(f).first(20));
  sock.shutdown(asio::socket_base::shutdown_send);
  expect_error(receive(), kvx::errc::truncated_message);
  EXPECT_TRUE(closed_by_server());
}

TEST_F(tcp_raw, TruncatedWritePayloadGetsAnErrorFrame) {
  auto payload = random_bytes(100, 5);
  auto f = frame(header(wire::opcode::write, 0, 100), seg.name, payload);
  send(std::span(f).first(f.size() - 40));
  sock.shutdown(asio::socket_base::shutdown_send);
  expect_error(receive(), kvx::errc::truncated_message);
  EXPECT_TRUE(closed_by_server());
}

TEST_F(tcp_raw, OversizedLengthIsRefusedWithoutReadingIt) {
  send(frame(header(wire::opcode::write, 0, owner.settings().max_request + 1), seg.name));
  expect_error(receive(), kvx::errc::capacity_exceeded);
  EXPECT_TRUE(closed_by_server());
}

TEST_F(tcp_raw, BadVersionOpAndNameLengthAreRefused) {
  auto f = frame(header(wire::opcode::read, 0, 8), seg.name);
  f[4] = std::byte{9};
  send(f);
  expect_error(receive(), kvx::errc::not_supported);
  EXPECT_TRUE(closed_by_server());

  for (int which = 0; which < 2; ++which) {
    asio::ip::tcp::socket s(client_io);
    s.connect(owner.local_endpoint());
    std::swap(s, sock);
    auto g = frame(header(wire::opcode::read, 0, 8), seg.name);
    if (which == 0)
      g[5] = std::byte{7};  // op
    else
      g[6] = g[7] = std::byte{0};  // name length 0
    send(g);
    expect_error(receive(), kvx::errc::malformed_message);
    EXPECT_TRUE(closed_by_server());
  }
}

TEST_F(tcp_raw, RefusedRequestsKeepTheConnectionAndTouchNothing) {
  const auto before = region;
  auto payload = random_bytes(64, 6);
  struct {
    std::string name;
    std::uint64_t key_xor, gen_add, off;
    kvx::errc want;
  } cases[] = {
      {"raw-kv-unknown", 0, 0, 0, kvx::errc::unknown_segment},
      {"raw-kv", 1, 0, 0, kvx::errc::bad_key},
      {"raw-kv", 0, 1, 0, kvx::errc::stale},
      {"raw-kv", 0, 0, 4096 - 63, kvx::errc::out_of_range},
      {"raw-kv", 0, 0, std::numeric_limits<std::uint64_t>::max() - 32, kvx::errc::out_of_range},  // offset overflow
  };
  for (auto& c : cases) {
    for (auto op : {wire::opcode::write, wire::opcode::read}) {
      auto h = header(op, c.off, payload.size());
      h.name_length = static_cast<std::uint16_t>(c.name.size());
      h.key ^= c.key_xor;
      h.generation += c.gen_add;
      send(frame(h, c.name, op == wire::opcode::write ? std::span<const std::byte>(payload) : std::span<const std::byte>()));
      auto r = receive();
      expect_error(r, c.want);
      EXPECT_EQ(r->header.request_id, 77u);
    }
  }
  // Still in step: a good read on the same connection.
  send(frame(header(wire::opcode::read, 4096 - 64, 64), seg.name));
  auto r = receive();
  ASSERT_TRUE(r);
  EXPECT_EQ(r->header.status, 0);
  EXPECT_EQ(std::memcmp(r->payload.data(), region.data() + 4096 - 64, 64), 0);
  EXPECT_EQ(region, before);
}

// --- the pure parser -----------------------------------------------------------

TEST(TcpWire, ParserWaitsForWholeFramesAndReportsWhy) {
  wire::request_header h;
  h.op = wire::opcode::write;
  h.name_length = 2;
  h.request_id = 5;
  h.length = 3;
  const auto hb = wire::encode_request(h);
  std::vector<std::byte> f(hb.begin(), hb.end());
  f.push_back(std::byte{'k'});
  f.push_back(std::byte{'v'});
  for (int i = 0; i < 3; ++i) f.push_back(std::byte{1});
  const wire::limits lim{1024};
  for (std::size_t n = 0; n < f.size(); ++n)
    EXPECT_EQ(wire::parse_request(std::span(f).first(n), lim).state, wire::parse_state::need_more) << n;
  auto p = wire::parse_request(f, lim);
  ASSERT_EQ(p.state, wire::parse_state::complete);
  EXPECT_EQ(p.name, "kv");
  EXPECT_EQ(p.payload.size(), 3u);
  EXPECT_EQ(p.consumed, f.size());
  EXPECT_EQ(wire::parse_request(f, wire::limits{2}).code, kvx::errc::capacity_exceeded);
  auto resp = wire::encode_response(static_cast<std::uint8_t>(kvx::errc::bad_key), 9, 4);
  auto r = wire::parse_response_header(resp);
  ASSERT_EQ(r.state, wire::parse_state::complete);
  EXPECT_EQ(r.header.request_id, 9u);
  resp[5] = std::byte{200};
  EXPECT_EQ(wire::parse_response_header(resp).state, wire::parse_state::invalid);

  // The pad: below 64, and only before read data.
  auto padded = wire::encode_response(0, 9, 100, 63);
  auto pr = wire::parse_response_header(padded);
  ASSERT_EQ(pr.state, wire::parse_state::complete) << pr.reason;
  EXPECT_EQ(pr.header.pad, 63);
  auto too_much = wire::parse_response_header(wire::encode_response(0, 9, 100, 64));
  EXPECT_EQ(too_much.state, wire::parse_state::invalid);
  EXPECT_EQ(too_much.reason, "response padding of 64 bytes or more");
  auto padded_error = wire::parse_response_header(wire::encode_response(static_cast<std::uint8_t>(kvx::errc::bad_key), 9, 4, 8));
  EXPECT_EQ(padded_error.state, wire::parse_state::invalid);
  EXPECT_EQ(padded_error.reason, "error response carries padding");
  // read_padding starts the payload at the next multiple of 64.
  for (std::uint64_t stream = 0; stream < 200; ++stream) {
    const auto pad = wire::read_padding(stream);
    EXPECT_LT(pad, wire::payload_alignment);
    EXPECT_EQ((stream + wire::response_header_size + pad) % 64, 0u) << stream;
  }
}

// A server that answers a write with a padded acknowledgement breaks the
// protocol: the op fails with protocol_error instead of skipping bytes.
TEST(TcpTransport, APaddedWriteAcknowledgementIsAProtocolError) {
  asio::io_context io;
  tcp initiator(io.get_executor());
  asio::ip::tcp::acceptor fake(io, asio::ip::tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0));
  const std::string name = "fake";
  std::vector<std::byte> buf(100, std::byte{1});
  std::thread server([&] {
    asio::io_context sio;
    asio::ip::tcp::socket s(sio);
    fake.accept(s);
    std::vector<std::byte> request(wire::request_header_size + name.size() + buf.size());
    asio::read(s, asio::buffer(request));
    const auto h = wire::parse_request_header(request, wire::limits{});
    const auto ack = wire::encode_response(0, h.header.request_id, 0, 8);
    asio::write(s, asio::buffer(ack));
    std::byte b;
    boost::system::error_code ignored;
    s.read_some(asio::buffer(&b, 1), ignored);  // until the initiator closes
  });
  kvx::memory::segment_descriptor d;
  d.name = name;
  d.length = 1 << 20;
  d.transports["tcp"] = {{"host", "127.0.0.1"}, {"port", fake.local_endpoint().port()}};
  std::optional<std::error_code> out;
  initiator.async_write(d, 0, std::span<const std::byte>(buf), [&](std::error_code ec) { out = ec; });
  const bool done = run_until(io, [&] { return out.has_value(); });
  initiator.close();
  io.run_for(100ms);
  server.join();
  ASSERT_TRUE(done);
  EXPECT_EQ(*out, kvx::errc::protocol_error);
}

// --- two processes -----------------------------------------------------------

struct peer_process {
  kvx::test::child_process child;
  kvx::memory::segment_descriptor desc;
  explicit peer_process(std::uint64_t size)
      : child(kvx::test::child_process::tool("tcp_peer"), {"serve", "--size", std::to_string(size), "--seed", "42"}) {
    auto line = child.read_line(10s);
    if (!line) throw std::runtime_error("tcp_peer printed no descriptor");
    auto d = kvx::memory::segment_descriptor::from_json(nlohmann::json::parse(*line));
    if (!d) throw std::runtime_error(d.error().message());
    desc = *d;
  }
};

// The peer fills its segment with this pattern (tests/tools/tcp_peer.cpp).
std::byte pattern_at(std::uint64_t i, std::uint64_t seed) {
  return static_cast<std::byte>((i * 131 + seed * 7 + (i >> 9)) & 0xff);
}

TEST(TcpTwoProcesses, ReadsAndWritesAcrossProcessesAreByteExact) {
  constexpr std::uint64_t size = 8 << 20;
  peer_process peer(size);
  asio::io_context io;
  tcp initiator(io.get_executor(), small_slices());
  std::vector<std::byte> expected(size);
  for (std::uint64_t k = 0; k < size; ++k) expected[k] = pattern_at(k, 42);
  std::mt19937_64 rng(11);
  std::vector<std::byte> buf(2 << 20);
  for (int i = 0; i < 20; ++i) {
    const std::size_t len = 1 + rng() % buf.size();
    const std::uint64_t off = rng() % (size - len + 1);
    std::optional<std::error_code> out;
    initiator.async_read(peer.desc, off, std::span(buf).first(len), [&](std::error_code ec) { out = ec; });
    ASSERT_TRUE(run_until(io, [&] { return out.has_value(); }));
    ASSERT_FALSE(*out) << out->message();
    ASSERT_EQ(std::memcmp(buf.data(), expected.data() + off, len), 0) << "read " << len << " at " << off;
  }
  auto src = random_bytes(3 << 20, 12);
  std::optional<std::error_code> w;
  initiator.async_write(peer.desc, 12345, src, [&](std::error_code ec) { w = ec; });
  ASSERT_TRUE(run_until(io, [&] { return w.has_value(); }));
  ASSERT_FALSE(*w);
  std::vector<std::byte> back(src.size());
  std::optional<std::error_code> r;
  initiator.async_read(peer.desc, 12345, back, [&](std::error_code ec) { r = ec; });
  ASSERT_TRUE(run_until(io, [&] { return r.has_value(); }));
  ASSERT_FALSE(*r);
  EXPECT_EQ(back, src);
}

// Reads kept in flight against a peer process until it is killed or stopped;
// every op carries a deadline.
struct flowing_reads {
  tcp& t;
  const kvx::memory::segment_descriptor& desc;
  std::chrono::milliseconds deadline;
  std::vector<std::vector<std::byte>> bufs;
  int issued = 0, done = 0, ok = 0;
  std::vector<std::error_code> errors;

  flowing_reads(tcp& tr, const kvx::memory::segment_descriptor& d, std::chrono::milliseconds dl, int n, std::size_t len)
      : t(tr), desc(d), deadline(dl), bufs(n, std::vector<std::byte>(len)) {
    for (int i = 0; i < n; ++i) issue(i);
  }
  void issue(int i) {
    ++issued;
    t.async_read(desc, 0, bufs[i], kvx::cancel_after(deadline, asio::bind_executor(t.get_executor(), [this, i](std::error_code ec) {
                   ++done;
                   if (ec) return errors.push_back(ec);
                   ++ok;
                   if (errors.empty()) issue(i);
                 })));
  }
  bool all_ended() const { return !errors.empty() && issued == done; }
};

// --- peers that misbehave -----------------------------------------------------

// A blocking socket served by a thread of its own; reads time out instead of hanging.
struct scripted_peer {
  asio::io_context io;
  asio::ip::tcp::acceptor acceptor{io, asio::ip::tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0)};
  asio::ip::tcp::socket socket{io};

  kvx::memory::segment_descriptor descriptor(std::uint64_t length) const {
    return loopback_descriptor("scripted", length, acceptor.local_endpoint().port());
  }
  void accept(int receive_buffer = 0) {
    if (receive_buffer > 0) acceptor.set_option(asio::socket_base::receive_buffer_size(receive_buffer));
    acceptor.accept(socket);
    timeval tv{2, 0};
    ::setsockopt(socket.native_handle(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  }
  wire::request_header read_request_head() {
    wire::request_bytes hb;
    asio::read(socket, asio::buffer(hb));
    auto p = wire::parse_request_header(hb, wire::limits{});
    EXPECT_EQ(p.state, wire::parse_state::complete) << p.reason;
    std::string name(p.header.name_length, '\0');
    asio::read(socket, asio::buffer(name));
    return p.header;
  }
  void refuse(const wire::request_header& h, kvx::errc code, std::string_view text) {
    const auto rh = wire::encode_response(static_cast<std::uint8_t>(code), h.request_id, text.size());
    asio::write(socket, asio::buffer(rh));
    asio::write(socket, asio::buffer(text.data(), text.size()));
  }
};

// An owner that answers a write (refuses it, or acknowledges it) before it has
// read the payload: the caller may reuse its buffer as soon as the write
// completes, so no byte of it may leave after that.
void expect_no_byte_sent_after_completion(kvx::errc answer) {
  scripted_peer peer;
  std::atomic<bool> reused_bytes_seen{false};
  std::atomic<std::uint64_t> payload_seen{0};
  std::thread server([&] {
    peer.accept(64 << 10);
    const auto h = peer.read_request_head();
    if (answer == kvx::errc{})
      asio::write(peer.socket, asio::buffer(wire::encode_response(0, h.request_id, 0)));
    else
      peer.refuse(h, answer, "larger than this server takes");
    std::this_thread::sleep_for(300ms);  // a handler run now would reuse the buffer mid-send
    std::vector<std::byte> buf(64 << 10);
    boost::system::error_code ec;
    for (;;) {
      const auto n = peer.socket.read_some(asio::buffer(buf), ec);
      if (ec) break;
      payload_seen += n;
      if (std::any_of(buf.begin(), buf.begin() + static_cast<std::ptrdiff_t>(n), [](std::byte b) { return b == std::byte{0xab}; }))
        reused_bytes_seen = true;
    }
  });
  asio::io_context io;
  tcp::config c;
  c.serve = false;
  c.connections = 1;
  c.slice_size = 16 << 20;
  c.socket_buffer = 64 << 10;
  tcp initiator(io.get_executor(), c);
  auto src = random_bytes(16 << 20, 9);
  std::replace(src.begin(), src.end(), std::byte{0xab}, std::byte{0xac});
  std::optional<std::error_code> out;
  initiator.async_write(peer.descriptor(src.size()), 0, src, [&](std::error_code ec) {
    out = ec;
    std::fill(src.begin(), src.end(), std::byte{0xab});  // the caller reuses its buffer
  });
  EXPECT_TRUE(run_until(io, [&] { return out.has_value(); }, 5s));
  if (out && answer == kvx::errc{}) {
    EXPECT_FALSE(*out) << out->message();
  } else if (out) {
    EXPECT_EQ(*out, answer) << out->message();
  }
  initiator.close();
  io.run_for(100ms);
  server.join();
  EXPECT_FALSE(reused_bytes_seen) << "bytes written into the buffer after completion went out (" << payload_seen << " payload bytes seen)";
}

TEST(TcpTransport, AWriteRefusedBeforeItsPayloadIsSentCompletesOnlyOnceItsBufferIsNoLongerRead) {
  expect_no_byte_sent_after_completion(kvx::errc::capacity_exceeded);
}

TEST(TcpTransport, AWriteAcknowledgedBeforeItsPayloadIsSentCompletesOnlyOnceItsBufferIsNoLongerRead) {
  expect_no_byte_sent_after_completion(kvx::errc{});
}

TEST(TcpTransport, ACancellationEmittedOnTheStrandBeforeTheOpStartsIsKept) {
  asio::io_context io;
  tcp initiator(io.get_executor());
  silent_peer silent(io);
  const auto d = silent.descriptor(4096);
  std::vector<std::byte> buf(4096);
  asio::cancellation_signal signal;
  std::optional<std::error_code> out;
  // On the strand: the slot's handler runs inline there, before the op's start.
  asio::post(initiator.get_executor(), [&] {
    initiator.async_read(d, 0, buf, asio::bind_cancellation_slot(signal.slot(), [&](std::error_code ec) { out = ec; }));
    signal.emit(asio::cancellation_type::terminal);
  });
  ASSERT_TRUE(run_until(io, [&] { return out.has_value(); }, 3s)) << "the cancellation was lost";
  EXPECT_EQ(*out, kvx::errc::cancelled);
}

TEST(TcpTransport, ATinyMaxRequestIsRefusedInConfigAndInAPeersDescriptor) {
  asio::io_context io;
  tcp initiator(io.get_executor());
  kvx::memory::segment_descriptor d;
  d.name = "tiny";
  d.length = 64 << 20;
  d.transports["tcp"] = {{"host", "127.0.0.1"}, {"port", 9}, {"max_request", 1}};
  EXPECT_EQ(initiator.can_transfer(d), kvx::errc::protocol_error);
  std::vector<std::byte> buf(1 << 20);
  std::optional<std::error_code> out;
  initiator.async_read(d, 0, buf, [&](std::error_code ec) { out = ec; });
  ASSERT_TRUE(run_until(io, [&] { return out.has_value(); }));
  EXPECT_EQ(*out, kvx::errc::protocol_error);
  d.transports["tcp"]["max_request"] = "64MiB";
  EXPECT_EQ(initiator.can_transfer(d), kvx::errc::protocol_error);
  for (const auto& [field, value] : {std::pair<std::string, int>{"slice_size", 1}, {"max_request", 100}}) {
    auto c = tcp::config::from_json(nlohmann::json{{field, value}});
    ASSERT_FALSE(c) << field;
    EXPECT_NE(c.error().message().find("tcp." + field), std::string::npos) << c.error().message();
  }
  EXPECT_TRUE(tcp::config::from_json(nlohmann::json::parse(R"({"slice_size": 0})")));
}

TEST(TcpTransport, DeregisterOffTheIoThreadClosesASessionStalledMidPayload) {
  asio::io_context io;
  tcp owner(io.get_executor());
  kvx::memory::segment_table table("stall-owner");
  std::vector<std::byte> region(1 << 20);
  auto seg = *table.add("stall-kv", memory_region{region.data(), region.size()});
  ASSERT_TRUE(owner.register_memory(seg));
  std::thread runner([&] {
    auto guard = asio::make_work_guard(io);
    io.run();
  });
  asio::io_context client_io;
  asio::ip::tcp::socket sock(client_io);
  sock.connect(owner.local_endpoint());
  // A write of 4096 bytes whose payload stops after 100: the session waits, pinned.
  wire::request_header h;
  h.op = wire::opcode::write;
  h.name_length = static_cast<std::uint16_t>(seg.name.size());
  h.request_id = 5;
  h.key = seg.key;
  h.generation = seg.generation;
  h.offset = 0;
  h.length = 4096;
  const auto hb = wire::encode_request(h);
  asio::write(sock, asio::buffer(hb));
  asio::write(sock, asio::buffer(seg.name));
  std::vector<std::byte> part(100, std::byte{7});
  asio::write(sock, asio::buffer(part));
  std::this_thread::sleep_for(100ms);  // the session has read the head and pinned the segment
  auto dereg = std::async(std::launch::async, [&] { return owner.deregister_memory(seg); });
  const bool returned = dereg.wait_for(3s) == std::future_status::ready;
  boost::system::error_code ec;
  sock.close(ec);  // lets a hung deregister end, so the test fails instead of hanging
  EXPECT_TRUE(returned) << "deregister_memory waited on a stalled peer";
  EXPECT_TRUE(dereg.get());
  io.stop();
  runner.join();
}

TEST(TcpTwoProcesses, KilledPeerFailsInFlightOpsWithConnectionLostQuickly) {
  peer_process peer(16 << 20);
  asio::io_context io;
  tcp initiator(io.get_executor(), small_slices(2));
  flowing_reads reads(initiator, peer.desc, 5s, 4, 16 << 20);
  ASSERT_TRUE(run_until(io, [&] { return reads.ok >= 2; }));
  peer.child.kill(SIGKILL);
  const auto killed = std::chrono::steady_clock::now();
  ASSERT_TRUE(run_until(io, [&] { return reads.all_ended(); }, 8s)) << "ops still pending after the kill";
  EXPECT_LT(std::chrono::steady_clock::now() - killed, 4s) << "the kill was noticed by the deadline, not the link";
  for (auto ec : reads.errors)
    EXPECT_TRUE(ec == kvx::errc::connection_lost || ec == kvx::errc::unreachable) << ec.message();
}

TEST(TcpTwoProcesses, StoppedPeerEndsInFlightOpsAtTheDeadline) {
  peer_process peer(16 << 20);
  asio::io_context io;
  tcp initiator(io.get_executor(), small_slices(2));
  flowing_reads reads(initiator, peer.desc, 1s, 4, 1 << 20);
  ASSERT_TRUE(run_until(io, [&] { return reads.ok >= 2; }));
  peer.child.kill(SIGSTOP);  // hangs: the socket stays open, nothing answers
  ASSERT_TRUE(run_until(io, [&] { return reads.all_ended(); }, 8s)) << "ops hang on a stopped peer";
  for (auto ec : reads.errors)
    EXPECT_TRUE(ec == kvx::errc::timed_out || ec == kvx::errc::connection_lost) << ec.message();
  EXPECT_TRUE(std::any_of(reads.errors.begin(), reads.errors.end(),
                          [](std::error_code ec) { return ec == kvx::errc::timed_out; }));
  peer.child.kill(SIGKILL);
}

}  // namespace
