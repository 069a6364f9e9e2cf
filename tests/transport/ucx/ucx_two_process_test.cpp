#include <kvx/transport/ucx.hpp>

#include <gtest/gtest.h>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>

#include <chrono>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <kvx/core/log.hpp>
#include <kvx/memory/segment_table.hpp>
#include <kvx/testing/transport_conformance.hpp>

#include "support/child_process.hpp"
#include "support/run_until.hpp"

// UCX's own leak on force-closed shared-memory endpoints; see ucx_lsan.supp for why.
extern "C" const char* __lsan_default_suppressions();
extern "C" const char* __lsan_default_suppressions() { return "leak:libuct.so\n"; }

// Two processes on loopback: tests/tools/ucx_peer.cpp serves a segment filled
// with fill_random(seed) and prints its descriptor; this process reads and
// writes it through UCX forced onto each transport.
namespace {

namespace asio = boost::asio;
using namespace std::chrono_literals;
using kvx::memory::segment_descriptor;

constexpr std::uint64_t peer_bytes = 4u << 20;
constexpr std::uint64_t peer_seed = 4242;

struct peer_process {
  kvx::test::child_process child;
  segment_descriptor desc;
  peer_process(const std::string& tls, std::uint64_t bytes, bool allocate = false)
      : child(kvx::test::child_process::tool("ucx_peer"),
              allocate ? std::vector<std::string>{tls, std::to_string(bytes), std::to_string(peer_seed), "allocate"}
                       : std::vector<std::string>{tls, std::to_string(bytes), std::to_string(peer_seed)}) {
    auto line = child.read_line(10s);
    if (!line) throw std::runtime_error("ucx_peer printed no descriptor");
    auto j = nlohmann::json::parse(*line, nullptr, false);
    auto d = segment_descriptor::from_json(j);
    if (!d) throw std::runtime_error("ucx_peer descriptor: " + d.error().message());
    desc = *d;
  }
};

struct initiator {
  asio::io_context io;
  kvx::transport::ucx t;
  kvx::memory::segment_table table{"ucx-initiator"};
  std::vector<std::byte> mem;
  kvx::memory::local_segment seg;
  explicit initiator(const std::string& tls, std::size_t bytes) : t(io.get_executor(), {.tls = tls}), mem(bytes) {
    seg = *table.add("ucx-initiator-buffer", {mem.data(), mem.size()});
    auto e = t.register_memory(seg);
    if (!e) throw std::runtime_error(e.error().message());
  }
  ~initiator() { (void)t.deregister_memory(seg); }

  template <class Pred>
  bool run_until(Pred done, std::chrono::seconds limit = 20s) {
    return kvx::test::run_until(io, done, limit);
  }
  std::error_code read(const segment_descriptor& d, std::uint64_t off, std::span<std::byte> dst) {
    std::optional<std::error_code> out;
    t.async_read(d, off, dst, kvx::cancel_after(io.get_executor(), 10s, [&](std::error_code ec) { out = ec; }));
    EXPECT_TRUE(run_until([&] { return out.has_value(); }));
    return out.value_or(kvx::errc::internal);
  }
  std::error_code write(const segment_descriptor& d, std::uint64_t off, std::span<const std::byte> src) {
    std::optional<std::error_code> out;
    t.async_write(d, off, src, kvx::cancel_after(io.get_executor(), 10s, [&](std::error_code ec) { out = ec; }));
    EXPECT_TRUE(run_until([&] { return out.has_value(); }));
    return out.value_or(kvx::errc::internal);
  }
};

class UcxTwoProcess : public ::testing::TestWithParam<std::string> {};

TEST_P(UcxTwoProcess, RandomizedBatchesAreByteExactAcrossProcesses) {
  for (bool allocate : {false, true}) {
    peer_process peer(GetParam(), peer_bytes, allocate);
    initiator ini(GetParam(), peer_bytes);
    std::vector<std::byte> shadow(peer_bytes);
    kvx::testing::fill_random(shadow, peer_seed);
    kvx::testing::test_rng rng(allocate ? 7 : 8);
    for (int batch = 0; batch < 6; ++batch) {
      // A batch: up to 16 disjoint ops in flight at once, reads and writes mixed.
      constexpr int ops = 16;
      const std::uint64_t slot = peer_bytes / ops;
      std::vector<std::error_code> ecs(ops);
      std::vector<bool> is_read(ops);
      std::vector<std::pair<std::uint64_t, std::uint64_t>> where(ops);  // remote offset, length
      int done = 0;
      for (int i = 0; i < ops; ++i) {
        const std::uint64_t len = rng.log_uniform(1, slot);
        const std::uint64_t off = i * slot + rng.uniform(0, slot - len);
        where[i] = {off, len};
        is_read[i] = (rng.next() & 1) != 0;
        auto local = std::span(ini.mem).subspan(off, len);
        auto h = [&, i](std::error_code ec) {
          ecs[i] = ec;
          ++done;
        };
        if (is_read[i]) {
          ini.t.async_read(peer.desc, off, local, h);
        } else {
          kvx::testing::fill_random(local, rng.next());
          std::memcpy(shadow.data() + off, local.data(), len);
          ini.t.async_write(peer.desc, off, std::span<const std::byte>(local), h);
        }
      }
      ASSERT_TRUE(ini.run_until([&] { return done == ops; })) << "batch " << batch << " did not complete";
      for (int i = 0; i < ops; ++i) {
        ASSERT_FALSE(ecs[i]) << "op " << i << ": " << ecs[i].message();
        if (is_read[i]) {
          auto [off, len] = where[i];
          ASSERT_EQ(kvx::testing::first_difference(std::span(ini.mem).subspan(off, len),
                                                   std::span(shadow).subspan(off, len)),
                    "")
              << "read " << len << " at " << off << " (batch " << batch << ")";
        }
      }
    }
    // Every byte the peer holds, read back in one go.
    std::vector<std::byte> check(peer_bytes);
    std::fill(ini.mem.begin(), ini.mem.end(), std::byte{0});
    ASSERT_FALSE(ini.read(peer.desc, 0, std::span(ini.mem)));
    EXPECT_EQ(kvx::testing::first_difference(ini.mem, shadow), "") << (allocate ? "ucx-allocated" : "plain") << " peer";
  }
}

TEST_P(UcxTwoProcess, PeerKilledMidBatchEndsEveryOpWithinTheDeadline) {
  peer_process peer(GetParam(), peer_bytes);
  initiator ini(GetParam(), peer_bytes);
  constexpr int ops = 64;
  constexpr std::uint64_t each = peer_bytes / ops;
  int done = 0, failed = 0;
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < ops; ++i) {
    auto local = std::span<const std::byte>(ini.mem).subspan(i * each, each);
    auto h = [&](std::error_code ec) {
      ++done;
      if (ec) {
        ++failed;
        const bool expected = ec == kvx::errc::connection_lost || ec == kvx::errc::timed_out ||
                              ec == kvx::errc::unreachable || ec == kvx::errc::io_error;
        EXPECT_TRUE(expected) << ec.message();
      }
    };
    if (i == 8) {
      ASSERT_TRUE(ini.run_until([&] { return done >= 1; }));
      peer.child.kill();
      peer.child.wait();
    }
    ini.t.async_write(peer.desc, i * each, local, kvx::cancel_after(ini.io.get_executor(), 3s, h));
  }
  ASSERT_TRUE(ini.run_until([&] { return done == ops; }, 10s)) << "ops hung after the peer died";
  EXPECT_LT(std::chrono::steady_clock::now() - start, 8s);
  // After the death, a new operation ends within its deadline, never hangs.
  // tcp reports the death (PEER error mode); UCX 1.13's posix/sysv refuse
  // PEER mode, so there only the deadline ends operations (docs/transport-ucx.md).
  const auto ec = ini.read(peer.desc, 0, std::span(ini.mem).first(4096));
  if (GetParam().find("tcp") != std::string::npos) {
    EXPECT_TRUE(ec) << "a read from a dead peer succeeded";
  }
  (void)failed;
}

TEST_P(UcxTwoProcess, BadRkeyBadAddressAndOutOfRangeAreRefused) {
  peer_process peer(GetParam(), 65536);
  initiator ini(GetParam(), 65536);
  auto buf = std::span(ini.mem).first(4096);
  ASSERT_FALSE(ini.read(peer.desc, 0, buf));

  EXPECT_EQ(ini.read(peer.desc, 65536 - 100, buf.first(101)), kvx::errc::out_of_range);
  EXPECT_EQ(ini.write(peer.desc, 1ull << 62, buf), kvx::errc::out_of_range);

  auto odd = peer.desc;
  odd.name = "ucx-peer-segment-renamed";  // a fresh cache entry, so the blob is unpacked
  odd.transports["ucx"]["segment"] = odd.name;
  odd.transports["ucx"]["rkey"] = "zz";
  EXPECT_EQ(ini.read(odd, 0, buf), kvx::errc::bad_key);
  odd.transports["ucx"]["rkey"] = "abc";
  EXPECT_EQ(ini.read(odd, 0, buf), kvx::errc::bad_key);
  odd.transports["ucx"]["rkey"] = 17;
  EXPECT_EQ(ini.read(odd, 0, buf), kvx::errc::malformed_message);

  auto no_addr = peer.desc;
  no_addr.transports["ucx"]["worker_address"] = "not hex";
  EXPECT_EQ(ini.read(no_addr, 0, buf), kvx::errc::malformed_message);
  no_addr.transports["ucx"].erase("worker_address");
  EXPECT_EQ(ini.t.can_transfer(no_addr), kvx::errc::unreachable);
  // The transport still works.
  EXPECT_FALSE(ini.read(peer.desc, 100, buf));
}

TEST_P(UcxTwoProcess, ATruncatedRkeyOrWorkerAddressIsRefusedBeforeUcxReadsIt) {
  // UCX parses both blobs without a length: a prefix of a real one made it
  // read past the buffer (a crash in ucp_ep_rkey_unpack on posix).
  peer_process peer(GetParam(), 65536, /*allocate=*/true);
  initiator ini(GetParam(), 65536);
  auto buf = std::span(ini.mem).first(4096);
  ASSERT_FALSE(ini.read(peer.desc, 0, buf));

  const auto& entry = peer.desc.transports["ucx"];
  auto truncated_rkey = peer.desc;
  truncated_rkey.name = "ucx-peer-segment-truncated";  // a fresh cache entry, so the blob would be unpacked
  truncated_rkey.transports["ucx"]["segment"] = truncated_rkey.name;
  const auto rkey = entry["rkey"].get<std::string>();
  truncated_rkey.transports["ucx"]["rkey"] = rkey.substr(0, rkey.size() / 2 & ~std::size_t{1});
  EXPECT_EQ(ini.read(truncated_rkey, 0, buf), kvx::errc::bad_key);

  auto truncated_address = peer.desc;
  const auto address = entry["worker_address"].get<std::string>();
  truncated_address.transports["ucx"]["worker_address"] = address.substr(0, address.size() / 2 & ~std::size_t{1});
  EXPECT_EQ(ini.read(truncated_address, 0, buf), kvx::errc::malformed_message);

  auto no_check = peer.desc;
  no_check.transports["ucx"].erase("blob_check");
  EXPECT_EQ(ini.read(no_check, 0, buf), kvx::errc::malformed_message);
  // The transport still works.
  EXPECT_FALSE(ini.read(peer.desc, 100, buf));
}

// Polls a posted prepared transfer until it is no longer in progress or
// `limit` passes: progressing the io_context too, as an engine thread would,
// or (spinning) only through check and ucx::progress, never the io_context.
kvx::result<kvx::transport::ucx_post_status> settle(initiator& ini, kvx::transport::ucx_prepared_transfer& p,
                                                    kvx::result<kvx::transport::ucx_post_status> r,
                                                    std::chrono::seconds limit = 10s, bool spin = false) {
  const auto until = std::chrono::steady_clock::now() + limit;
  while (r && *r == kvx::transport::ucx_post_status::in_progress && std::chrono::steady_clock::now() < until) {
    if (spin) ini.t.progress();
    else ini.io.poll();
    r = ini.t.check(p);
  }
  return r;
}

TEST_P(UcxTwoProcess, PreparedBatchesArePostedPolledAndRepostedByteExact) {
  peer_process peer(GetParam(), peer_bytes);
  initiator ini(GetParam(), peer_bytes);
  std::vector<std::byte> shadow(peer_bytes);
  kvx::testing::fill_random(shadow, peer_seed);
  kvx::testing::test_rng rng(11);
  // Pieces in disjoint slots of the first half; writes come from the local
  // buffer at the same offset, reads land in its second half.
  constexpr int pieces = 12;
  const std::uint64_t half = peer_bytes / 2, slot = half / pieces;
  std::vector<kvx::transport::ucx_piece> out, in;
  for (int i = 0; i < pieces; ++i) {
    const std::uint64_t len = rng.log_uniform(1, slot);
    const std::uint64_t off = i * slot + rng.uniform(0, slot - len);
    out.push_back({off, std::span(ini.mem).subspan(off, len)});
    in.push_back({off, std::span(ini.mem).subspan(half + off, len)});
  }
  auto w = ini.t.prepare_write(peer.desc, out);
  ASSERT_TRUE(w) << w.error().message();
  auto r = ini.t.prepare_read(peer.desc, in);
  ASSERT_TRUE(r) << r.error().message();
  EXPECT_EQ(w->pieces(), std::size_t{pieces});
  EXPECT_TRUE(w->is_write());
  EXPECT_FALSE(r->is_write());
  for (int round = 0; round < 4; ++round) {
    for (const auto& piece : out) {
      kvx::testing::fill_random(piece.local, rng.next());
      std::memcpy(shadow.data() + piece.remote_offset, piece.local.data(), piece.local.size());
    }
    if (round == 3) {  // the same transfer, completed through a token
      std::optional<std::error_code> ec;
      ini.t.async_post(*w, [&](std::error_code e) { ec = e; });
      ASSERT_TRUE(ini.run_until([&] { return ec.has_value(); }));
      ASSERT_FALSE(*ec) << ec->message();
    } else {
      auto posted = settle(ini, *w, ini.t.post(*w));
      ASSERT_TRUE(posted) << "round " << round << ": " << posted.error().message();
      ASSERT_EQ(*posted, kvx::transport::ucx_post_status::done) << "round " << round << " did not finish";
    }
    std::fill(ini.mem.begin() + static_cast<std::ptrdiff_t>(half), ini.mem.end(), std::byte{0});
    auto got = settle(ini, *r, ini.t.post(*r), 10s, /*spin=*/round % 2 == 1);
    ASSERT_TRUE(got) << got.error().message();
    ASSERT_EQ(*got, kvx::transport::ucx_post_status::done);
    for (const auto& piece : in)
      ASSERT_EQ(kvx::testing::first_difference(piece.local, std::span(shadow).subspan(piece.remote_offset, piece.local.size())),
                "")
          << "round " << round << ", " << piece.local.size() << " bytes at " << piece.remote_offset;
  }
  // A single read needs no flush: it takes the plain get path.
  std::fill(ini.mem.begin(), ini.mem.end(), std::byte{0});
  std::vector<kvx::transport::ucx_piece> whole{{0, std::span(ini.mem)}};
  auto all = ini.t.prepare_read(peer.desc, whole);
  ASSERT_TRUE(all);
  auto got = settle(ini, *all, ini.t.post(*all));
  ASSERT_TRUE(got && *got == kvx::transport::ucx_post_status::done);
  EXPECT_EQ(kvx::testing::first_difference(ini.mem, shadow), "");
}

TEST_P(UcxTwoProcess, APreparedTransferRefusesBadPiecesAndASecondPostInFlight) {
  peer_process peer(GetParam(), peer_bytes);
  initiator ini(GetParam(), peer_bytes);
  auto buf = std::span(ini.mem);
  using pieces = std::vector<kvx::transport::ucx_piece>;

  auto none = ini.t.prepare_write(peer.desc, pieces{});
  ASSERT_FALSE(none);
  EXPECT_EQ(none.code(), kvx::errc::invalid_argument);
  auto empty = ini.t.prepare_write(peer.desc, pieces{{0, buf.first(16)}, {64, buf.subspan(64, 0)}});
  ASSERT_FALSE(empty);
  EXPECT_EQ(empty.code(), kvx::errc::invalid_argument);
  EXPECT_NE(empty.error().context().find("piece 1"), std::string::npos) << empty.error().context();
  auto past = ini.t.prepare_read(peer.desc, pieces{{0, buf.first(16)}, {peer_bytes - 8, buf.subspan(64, 16)}});
  ASSERT_FALSE(past);
  EXPECT_EQ(past.code(), kvx::errc::out_of_range);
  EXPECT_NE(past.error().context().find("piece 1"), std::string::npos) << past.error().context();
  auto stale = peer.desc;
  stale.generation += 1;
  EXPECT_EQ(ini.t.prepare_read(stale, pieces{{0, buf.first(16)}}).code(), kvx::errc::stale);
  auto wrong_key = peer.desc;
  wrong_key.key ^= 1;
  EXPECT_EQ(ini.t.prepare_read(wrong_key, pieces{{0, buf.first(16)}}).code(), kvx::errc::bad_key);

  kvx::transport::ucx_prepared_transfer unprepared;
  EXPECT_EQ(ini.t.post(unprepared).code(), kvx::errc::invalid_argument);
  EXPECT_EQ(ini.t.check(unprepared).code(), kvx::errc::invalid_argument);
  auto small = ini.t.prepare_write(peer.desc, pieces{{0, buf.first(4096)}});
  ASSERT_TRUE(small);
  EXPECT_EQ(ini.t.check(*small).code(), kvx::errc::invalid_argument) << "nothing was posted yet";
  {
    asio::io_context other_io;
    kvx::transport::ucx other(other_io.get_executor(), {.tls = GetParam()});
    auto foreign = other.post(*small);
    ASSERT_FALSE(foreign);
    EXPECT_EQ(foreign.code(), kvx::errc::invalid_argument) << "a transfer prepared on another transport";
  }

  // Over tcp a write waits for the owner's answers, so a 4 MiB one is in
  // flight when post returns; posting it again then is refused, not doubled.
  auto big = ini.t.prepare_write(peer.desc, pieces{{0, buf}});
  ASSERT_TRUE(big);
  auto first = ini.t.post(*big);
  ASSERT_TRUE(first) << first.error().message();
  if (GetParam().find("tcp") != std::string::npos) {
    ASSERT_EQ(*first, kvx::transport::ucx_post_status::in_progress);
  }
  if (*first == kvx::transport::ucx_post_status::in_progress) {
    auto again = ini.t.post(*big);
    ASSERT_FALSE(again);
    EXPECT_EQ(again.code(), kvx::errc::busy);
    auto end = settle(ini, *big, ini.t.check(*big));
    ASSERT_TRUE(end) << end.error().message();
    EXPECT_EQ(*end, kvx::transport::ucx_post_status::done);
  }
  // Reported once, it is idle again and can be posted anew.
  auto next = settle(ini, *big, ini.t.post(*big));
  ASSERT_TRUE(next && *next == kvx::transport::ucx_post_status::done);
}

TEST_P(UcxTwoProcess, ACancelledPreparedTransferReportsItAndTheNextPostReconnects) {
  if (GetParam().find("tcp") == std::string::npos)
    GTEST_SKIP() << "on " << GetParam() << " a write finishes inside post (a copy into the peer's memory): nothing to cancel";
  peer_process peer(GetParam(), peer_bytes);
  initiator ini(GetParam(), peer_bytes);
  std::vector<kvx::transport::ucx_piece> whole{{0, std::span(ini.mem)}};
  auto big = ini.t.prepare_write(peer.desc, whole);
  ASSERT_TRUE(big);
  auto first = ini.t.post(*big);
  ASSERT_TRUE(first && *first == kvx::transport::ucx_post_status::in_progress);
  ini.t.cancel(*big);
  auto end = settle(ini, *big, ini.t.check(*big));
  ASSERT_FALSE(end) << "a cancelled transfer reported success";
  EXPECT_EQ(end.code(), kvx::errc::cancelled) << end.error().message();
  // Its endpoint was closed by the cancel: the next post opens another.
  kvx::testing::fill_random(ini.mem, 99);
  auto again = settle(ini, *big, ini.t.post(*big));
  ASSERT_TRUE(again) << again.error().message();
  ASSERT_EQ(*again, kvx::transport::ucx_post_status::done);
  std::vector<std::byte> back(peer_bytes);
  ASSERT_FALSE(ini.read(peer.desc, 0, back));
  EXPECT_EQ(kvx::testing::first_difference(back, ini.mem), "");
}

TEST_P(UcxTwoProcess, ThreadsPostAndCheckTheirOwnTransfersWhileTheIoContextProgresses) {
  // Each thread posts and checks its own prepared write and read (progressing
  // UCX from its check calls) while another thread runs the io_context,
  // which progresses the same worker: every round trip byte-exact.
  peer_process peer(GetParam(), peer_bytes);
  initiator ini(GetParam(), peer_bytes);
  constexpr int threads = 3, rounds = 60;
  const std::uint64_t slot = peer_bytes / 2 / threads;
  auto guard = asio::make_work_guard(ini.io);
  std::thread runner([&] { ini.io.run(); });
  std::vector<std::string> failures(threads);
  std::vector<std::thread> workers;
  for (int w = 0; w < threads; ++w) {
    workers.emplace_back([&, w] {
      const std::uint64_t off = w * slot, len = slot / 2;
      auto src = std::span(ini.mem).subspan(off, len);
      auto dst = std::span(ini.mem).subspan(peer_bytes / 2 + off, len);
      const std::vector<kvx::transport::ucx_piece> out{{off, src}}, in{{off, dst}};
      auto pw = ini.t.prepare_write(peer.desc, out);
      auto pr = ini.t.prepare_read(peer.desc, in);
      if (!pw || !pr) {
        failures[w] = "prepare failed";
        return;
      }
      auto finish = [&](kvx::transport::ucx_prepared_transfer& p) {
        // Spinning: the io_context runs on another thread.
        auto r = settle(ini, p, ini.t.post(p), 10s, /*spin=*/true);
        if (!r) return r.error().message();
        return *r == kvx::transport::ucx_post_status::done ? std::string() : std::string("no answer within 10 s");
      };
      for (int round = 0; round < rounds && failures[w].empty(); ++round) {
        kvx::testing::fill_random(src, static_cast<std::uint64_t>(w * 1000 + round));
        std::fill(dst.begin(), dst.end(), std::byte{0});
        if (auto e = finish(*pw); !e.empty()) failures[w] = "write, round " + std::to_string(round) + ": " + e;
        else if (auto e2 = finish(*pr); !e2.empty()) failures[w] = "read, round " + std::to_string(round) + ": " + e2;
        else if (auto d = kvx::testing::first_difference(dst, src); !d.empty()) failures[w] = "round " + std::to_string(round) + ": " + d;
      }
    });
  }
  for (auto& t : workers) t.join();
  guard.reset();
  ini.io.stop();
  runner.join();
  ini.io.restart();
  for (int w = 0; w < threads; ++w) EXPECT_EQ(failures[w], "") << "thread " << w;
}

TEST_P(UcxTwoProcess, APreparedTransferToAKilledPeerFailsWithinTheDeadline) {
  if (GetParam().find("tcp") == std::string::npos)
    GTEST_SKIP() << "UCX 1.13's " << GetParam() << " cannot report a dead peer (error mode PEER refused); "
                 << "a write there lands in the shared memory the dead peer left";
  peer_process peer(GetParam(), peer_bytes);
  initiator ini(GetParam(), peer_bytes);
  std::vector<kvx::transport::ucx_piece> piece{{0, std::span(ini.mem).first(65536)}};
  auto w = ini.t.prepare_write(peer.desc, piece);
  ASSERT_TRUE(w);
  auto ok = settle(ini, *w, ini.t.post(*w));
  ASSERT_TRUE(ok && *ok == kvx::transport::ucx_post_status::done);
  peer.child.kill();
  peer.child.wait();
  const auto start = std::chrono::steady_clock::now();
  auto end = ini.t.post(*w);
  if (end && *end == kvx::transport::ucx_post_status::done) end = ini.t.post(*w);  // raced the report
  if (end && *end == kvx::transport::ucx_post_status::in_progress) {
    // The io_context alone ends it; until it is checked, posting again is
    // refused rather than losing its outcome.
    ini.run_until([] { return false; }, 1s);
    auto again = ini.t.post(*w);
    ASSERT_FALSE(again);
    EXPECT_EQ(again.code(), kvx::errc::busy);
    end = settle(ini, *w, ini.t.check(*w));
  }
  ASSERT_FALSE(end && *end == kvx::transport::ucx_post_status::in_progress) << "no answer within 10 s";
  ASSERT_FALSE(end) << "a write to a dead peer succeeded";
  const bool expected = end.code() == kvx::errc::connection_lost || end.code() == kvx::errc::unreachable ||
                        end.code() == kvx::errc::io_error || end.code() == kvx::errc::timed_out;
  EXPECT_TRUE(expected) << end.error().message();
  EXPECT_LT(std::chrono::steady_clock::now() - start, 10s);
}

INSTANTIATE_TEST_SUITE_P(Transports, UcxTwoProcess, ::testing::Values("posix", "sysv", "cma,tcp", "tcp"),
                         [](const auto& info) {
                           std::string n = info.param;
                           for (auto& c : n) if (c == ',') c = '_';
                           return n;
                         });

TEST(UcxOptions, ConfigErrorsNameTheField) {
  auto j = nlohmann::json::parse(R"({"tls": "posix", "progress": "busy_poll", "settings": {"RNDV_THRESH": "8k"}})");
  auto ok = kvx::transport::ucx_options::from_config(kvx::config::view(j, "transport.ucx"));
  ASSERT_TRUE(ok) << ok.error().message();
  EXPECT_EQ(ok->tls, "posix");
  EXPECT_TRUE(ok->busy_poll);
  ASSERT_EQ(ok->settings.size(), 1u);
  EXPECT_EQ(ok->settings[0].first, "RNDV_THRESH");

  const char* bad[][2] = {{R"({"tls": 5})", "transport.ucx.tls"},
                          {R"({"progress": "spin"})", "transport.ucx.progress"},
                          {R"({"settings": {"UCX_TLS": "tcp"}})", "transport.ucx.settings.UCX_TLS"},
                          {R"({"settings": {"TLS": 1}})", "transport.ucx.settings.TLS"},
                          {R"({"tsl": "tcp"})", "transport.ucx.tsl"}};
  for (auto& [text, field] : bad) {
    auto r = kvx::transport::ucx_options::from_config(kvx::config::view(nlohmann::json::parse(text), "transport.ucx"));
    ASSERT_FALSE(r) << text;
    EXPECT_EQ(r.code(), kvx::errc::invalid_argument);
    EXPECT_NE(r.error().message().find(field), std::string::npos) << r.error().message();
  }
}

TEST(UcxOptions, AnUnavailableTransportIsASetUpError) {
  asio::io_context io;
  auto t = kvx::transport::ucx::create(io.get_executor(), {.tls = "no_such_transport"});
  ASSERT_FALSE(t);
  EXPECT_NE(t.error().message().find("ucp_init"), std::string::npos) << t.error().message();
  EXPECT_THROW(kvx::transport::ucx(io.get_executor(), {.tls = "no_such_transport"}), std::system_error);
}

TEST(UcxEndpoints, AnUnreachablePeerDoesNotTurnOffDeadPeerReportsForLaterEndpoints) {
  // A tcp-only initiator cannot reach a posix-only worker in either error
  // mode; only a transport that refuses PEER mode may switch the worker to
  // mode NONE (which loses dead-peer reports for every endpoint after).
  asio::io_context io;
  kvx::transport::ucx owner(io.get_executor(), {.tls = "posix"});
  kvx::transport::ucx tcp_only(io.get_executor(), {.tls = "tcp"});
  auto mem = owner.allocate(4096);
  ASSERT_TRUE(mem) << mem.error().message();
  kvx::memory::segment_table table("ucx-posix-owner");
  auto seg = *table.add("ucx-posix-only", mem->region());
  auto entry = owner.register_memory(seg);
  ASSERT_TRUE(entry) << entry.error().message();
  auto d = table.describe(seg);
  d.transports["ucx"] = *entry;
  std::vector<std::string> lines;
  kvx::set_log_level(kvx::log_level::info);
  kvx::set_log_sink([&](kvx::log_level, std::string_view msg) { lines.emplace_back(msg); });
  std::vector<std::byte> buf(64);
  std::optional<std::error_code> out;
  tcp_only.async_read(d, 0, buf, [&](std::error_code ec) { out = ec; });
  const bool done = kvx::test::run_until(io, [&] { return out.has_value(); });
  kvx::set_log_sink({});
  kvx::set_log_level(kvx::log_level::warn);
  ASSERT_TRUE(done);
  EXPECT_EQ(*out, kvx::errc::unreachable) << out->message();
  for (const auto& l : lines) EXPECT_EQ(l.find("using mode NONE"), std::string::npos) << l;
  (void)owner.deregister_memory(seg);
}

TEST(UcxEndpoints, AnUnreachablePeerDoesNotCostALaterPeerItsDeathReport) {
  // With posix and tcp, error mode PEER leaves posix out (it cannot detect a
  // dead peer) and reaches a peer over tcp; mode NONE would take posix, where
  // an operation to a dead peer waits for its deadline. A failed connect to
  // a sysv-only worker (unreachable in either mode) must leave the transport
  // in mode PEER for the peers after it.
  initiator ini("posix,tcp", 65536);
  kvx::transport::ucx sysv_only(ini.io.get_executor(), {.tls = "sysv"});
  std::vector<std::byte> sysv_mem(4096);
  kvx::memory::segment_table table("ucx-sysv-owner");
  auto seg = *table.add("ucx-sysv-only", {sysv_mem.data(), sysv_mem.size()});
  auto entry = sysv_only.register_memory(seg);
  ASSERT_TRUE(entry) << entry.error().message();
  auto unreachable = table.describe(seg);
  unreachable.transports["ucx"] = *entry;
  auto buf = std::span(ini.mem).first(4096);
  ASSERT_EQ(ini.read(unreachable, 0, buf), kvx::errc::unreachable);

  peer_process peer("posix,tcp", 65536);
  ASSERT_FALSE(ini.read(peer.desc, 0, buf));  // the endpoint exists before the death
  peer.child.kill();
  peer.child.wait();
  // The deadline is there so that a lost report fails instead of hanging.
  std::optional<std::error_code> out;
  ini.t.async_read(peer.desc, 0, buf,
                   kvx::cancel_after(ini.io.get_executor(), 20s, [&](std::error_code ec) { out = ec; }));
  ASSERT_TRUE(ini.run_until([&] { return out.has_value(); }, 30s));
  EXPECT_TRUE(*out) << "a read from a dead peer succeeded";
  EXPECT_NE(*out, kvx::errc::timed_out) << "the death was not reported: the read ran into its deadline";
  (void)sysv_only.deregister_memory(seg);
}

TEST(UcxMemory, HostAlwaysCudaOnlyWhenUcxReportsIt) {
  asio::io_context io;
  kvx::transport::ucx t(io.get_executor(), {.tls = "posix"});
  EXPECT_TRUE(kvx::transport::has(t.runtime_memory(), kvx::transport::memory_kinds::host));
  kvx::memory::segment_table table("n");
  std::vector<std::byte> b(64);
  auto seg = *table.add("ucx-dev", {b.data(), b.size(), kvx::memory::location::cuda(0)});
  auto r = t.register_memory(seg);
  if (kvx::transport::has(t.runtime_memory(), kvx::transport::memory_kinds::cuda)) {
    GTEST_SKIP() << "this UCX has CUDA support; device registration is covered on a GPU machine";
  }
  EXPECT_EQ(r.code(), kvx::errc::not_supported);
  EXPECT_EQ(t.allocate(64, kvx::memory::location::cuda(0)).code(), kvx::errc::not_supported);
  auto host = seg;
  host.name = "ucx-host";
  host.region.where = kvx::memory::location::host();
  ASSERT_TRUE(t.register_memory(host));
  EXPECT_EQ(t.register_memory(host).code(), kvx::errc::already_exists);
  EXPECT_TRUE(t.deregister_memory(host));
  EXPECT_EQ(t.deregister_memory(host).code(), kvx::errc::unknown_segment);
}

TEST(UcxMemory, SubRangesOfAnAllocationShareItsMapping) {
  asio::io_context io;
  kvx::transport::ucx t(io.get_executor(), {.tls = "posix"});
  auto buf = t.allocate(1 << 20);
  ASSERT_TRUE(buf) << buf.error().message();
  kvx::memory::segment_table table("n");
  auto a = *table.add("ucx-alloc-a", buf->region().subregion(0, 4096));
  auto b = *table.add("ucx-alloc-b", buf->region().subregion(8192, 4096));
  auto ea = t.register_memory(a);
  auto eb = t.register_memory(b);
  ASSERT_TRUE(ea && eb);
  EXPECT_EQ((*ea)["rkey"], (*eb)["rkey"]) << "one mapping, one rkey";
  EXPECT_NE((*ea)["base"], (*eb)["base"]);
  EXPECT_TRUE(t.deregister_memory(a));
  EXPECT_TRUE(t.deregister_memory(b));
}

}  // namespace
