#include <kvx/transport/ucx.hpp>

#include <dlfcn.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/io_context.hpp>
#include <gtest/gtest.h>

#include <kvx/memory/segment_table.hpp>

#include "support/run_until.hpp"

// The initiator remembers the peer and rkey it used last (ucx_worker.hpp),
// so consecutive operations skip hashing the worker address and building the
// rkey map key. These tests move between peers and segments, and re-register
// a segment under the same name and generation, where a stale memo would send
// bytes to the wrong place; and they cancel and re-register under reads in
// flight, where the cache must keep what those reads still use.

namespace {
// ucp_rkey_destroy calls so far: the transport's calls bind to the definition
// below (the executable's own), which counts and forwards to UCX's.
std::atomic<int> rkeys_destroyed{0};
}  // namespace

extern "C" void ucp_rkey_destroy(ucp_rkey_h rkey) {
  static const auto real = reinterpret_cast<void (*)(ucp_rkey_h)>(::dlsym(RTLD_NEXT, "ucp_rkey_destroy"));
  ++rkeys_destroyed;
  real(rkey);
}

namespace {

using namespace std::chrono_literals;
namespace asio = boost::asio;
using kvx::memory::segment_descriptor;

struct owner {
  kvx::transport::ucx t;
  kvx::memory::segment_table table;
  std::vector<kvx::transport::ucx_buffer> buffers;
  owner(asio::io_context& io, const std::string& name) : t(io.get_executor(), {.tls = "posix"}), table(name) {}

  // A segment over fresh UCX memory (one-sided on posix), zeroed.
  std::pair<kvx::memory::local_segment, std::span<std::byte>> add(const std::string& name, std::size_t bytes) {
    auto buf = t.allocate(bytes);
    if (!buf) throw std::runtime_error(buf.error().message());
    std::memset(buf->data(), 0, bytes);
    auto seg = table.add(name, buf->region());
    if (!seg) throw std::runtime_error(seg.error().message());
    buffers.push_back(std::move(*buf));
    return {*seg, buffers.back().bytes()};
  }
  segment_descriptor publish(const kvx::memory::local_segment& seg) {
    auto entry = t.register_memory(seg);
    if (!entry) throw std::runtime_error(entry.error().message());
    auto d = table.describe(seg);
    d.transports["ucx"] = *entry;
    return d;
  }
};

std::error_code write(asio::io_context& io, kvx::transport::ucx& t, const segment_descriptor& d, std::uint64_t off,
                      std::span<const std::byte> src) {
  std::optional<std::error_code> out;
  t.async_write(d, off, src, [&](std::error_code ec) { out = ec; });
  const auto deadline = std::chrono::steady_clock::now() + 10s;
  while (!out && std::chrono::steady_clock::now() < deadline) io.run_one_for(5ms);
  EXPECT_TRUE(out.has_value()) << "write did not complete";
  return out.value_or(kvx::errc::internal);
}

bool all_equal(std::span<const std::byte> bytes, std::byte v) {
  return std::all_of(bytes.begin(), bytes.end(), [v](std::byte b) { return b == v; });
}

TEST(UcxResolveCache, AlternatingPeersAndSegmentsLandInTheRightPlace) {
  asio::io_context io;
  owner a(io, "ucx-cache-a");
  owner b(io, "ucx-cache-b");
  kvx::transport::ucx ini(io.get_executor(), {.tls = "posix"});
  constexpr std::size_t n = 4096;
  auto [a1, a1_bytes] = a.add("a1", n);
  auto [a2, a2_bytes] = a.add("a2", n);
  auto [b1, b1_bytes] = b.add("b1", n);
  const std::vector<segment_descriptor> targets{a.publish(a1), b.publish(b1), a.publish(a2)};
  const std::vector<std::span<std::byte>> memory{a1_bytes, b1_bytes, a2_bytes};

  std::vector<std::byte> src(n / 4);
  // Round r writes quarter r of every target, target i with value 1 + i + 3r:
  // a memo that picked the wrong peer or rkey leaves a quarter wrong.
  for (std::size_t r = 0; r < 4; ++r) {
    for (std::size_t i = 0; i < targets.size(); ++i) {
      std::fill(src.begin(), src.end(), std::byte(1 + i + 3 * r));
      ASSERT_FALSE(write(io, ini, targets[i], r * src.size(), src)) << "round " << r << " target " << i;
    }
  }
  for (std::size_t i = 0; i < targets.size(); ++i)
    for (std::size_t r = 0; r < 4; ++r)
      EXPECT_TRUE(all_equal(memory[i].subspan(r * src.size(), src.size()), std::byte(1 + i + 3 * r)))
          << "target " << i << " quarter " << r;
}

TEST(UcxResolveCache, ReRegisteringUnderTheSameNameAndGenerationUsesTheNewRkey) {
  asio::io_context io;
  owner a(io, "ucx-cache-rereg");
  kvx::transport::ucx ini(io.get_executor(), {.tls = "posix"});
  constexpr std::size_t n = 8192;
  auto [seg, first] = a.add("moving", n);
  const auto old_desc = a.publish(seg);
  std::vector<std::byte> src(n, std::byte{7});
  ASSERT_FALSE(write(io, ini, old_desc, 0, src));  // the initiator now remembers this rkey
  ASSERT_TRUE(all_equal(first, std::byte{7}));

  // Same name, key and generation; another allocation, so another rkey and base.
  ASSERT_TRUE(a.t.deregister_memory(seg));
  auto other = a.t.allocate(n);
  ASSERT_TRUE(other) << other.error().message();
  std::memset(other->data(), 0, n);
  auto moved = seg;
  moved.region = other->region();
  auto entry = a.t.register_memory(moved);
  ASSERT_TRUE(entry) << entry.error().message();
  auto new_desc = a.table.describe(seg);
  new_desc.transports["ucx"] = *entry;
  ASSERT_NE(new_desc.transports["ucx"]["rkey"], old_desc.transports["ucx"]["rkey"]);

  std::fill(src.begin(), src.end(), std::byte{9});
  ASSERT_FALSE(write(io, ini, new_desc, 0, src));
  EXPECT_TRUE(all_equal(other->bytes(), std::byte{9})) << "the write did not reach the new registration";
  EXPECT_TRUE(all_equal(first, std::byte{7})) << "the write went through the remembered (old) rkey";
  // The old entry names a registration that is gone (owner in this process).
  EXPECT_EQ(write(io, ini, old_desc, 0, src), kvx::errc::unknown_segment);
  EXPECT_TRUE(a.t.deregister_memory(moved));
}

TEST(UcxResolveCache, ACancelOnAReplacedEndpointLeavesTheNewerEndpointCached) {
  // A cancel closes its op's endpoint and the next op to the peer opens a
  // new one; a second cancel on the old endpoint dropped the new one from the
  // cache (never closed it), so the op after it opened a third. Both
  // transports carry reads as active messages here: every read below stays
  // in flight until the io_context runs the owner.
  for (const std::string tls : {"posix", "tcp"}) {
    SCOPED_TRACE(tls);
    asio::io_context io;
    constexpr std::size_t n = 4096;
    std::vector<std::byte> memory(n, std::byte{5});
    struct read_op {
      asio::cancellation_signal cancel;
      std::vector<std::byte> dst = std::vector<std::byte>(n);
      std::optional<std::error_code> ec;
    };
    std::array<read_op, 4> ops;
    kvx::transport::ucx own(io.get_executor(), {.tls = tls});
    kvx::memory::segment_table table("ucx-cache-cancel");
    auto seg = *table.add("cancelled", {memory.data(), n});
    auto entry = own.register_memory(seg);
    ASSERT_TRUE(entry) << entry.error().message();
    auto d = table.describe(seg);
    d.transports["ucx"] = *entry;
    kvx::transport::ucx ini(io.get_executor(), {.tls = tls});
    auto issue = [&](read_op& op) {
      ini.async_read(d, 0, op.dst,
                     asio::bind_cancellation_slot(op.cancel.slot(), [&op](std::error_code ec) { op.ec = ec; }));
    };
    constexpr auto terminal = asio::cancellation_type::terminal;
    issue(ops[0]);
    issue(ops[1]);                 // both on the first endpoint
    ops[1].cancel.emit(terminal);  // the first endpoint leaves the cache
    issue(ops[2]);                 // opens the second endpoint
    ops[0].cancel.emit(terminal);  // on the first endpoint still: the second must stay cached
    issue(ops[3]);                 // shares the second endpoint with ops[2]
    ops[3].cancel.emit(terminal);  // closes the second endpoint
    ASSERT_TRUE(kvx::test::run_until(io, [&] {
      return std::all_of(ops.begin(), ops.end(), [](const read_op& op) { return op.ec.has_value(); });
    }, 20s));
    EXPECT_EQ(*ops[1].ec, kvx::errc::cancelled) << ops[1].ec->message();
    EXPECT_TRUE(*ops[0].ec) << "a cancelled read succeeded";
    EXPECT_EQ(*ops[3].ec, kvx::errc::cancelled) << ops[3].ec->message();
    EXPECT_EQ(*ops[2].ec, kvx::errc::connection_lost)
        << ops[2].ec->message() << ": ops[3] did not share ops[2]'s endpoint (it was dropped from the cache)";

    // The peer is reached again through a fresh endpoint.
    read_op again;
    issue(again);
    ASSERT_TRUE(kvx::test::run_until(io, [&] { return again.ec.has_value(); }, 20s));
    EXPECT_FALSE(*again.ec) << again.ec->message();
    EXPECT_TRUE(all_equal(again.dst, std::byte{5}));
    EXPECT_TRUE(own.deregister_memory(seg));
  }
}

TEST(UcxResolveCache, AReplacedRkeyIsNotDestroyedUnderAReadInFlight) {
  // An owner that re-registers a segment under the same name and generation
  // gives it a new rkey; the initiator's first op with it replaces the
  // cached one, while an op with the old one may be in flight (UCX wants an
  // rkey kept until its ops are done). The initiator is tcp-only, so its
  // reads are active messages, in flight until the owner progresses; the
  // owner's UCX memory gives each registration its own rkey.
  asio::io_context io;
  constexpr std::size_t n = 4096;
  kvx::transport::ucx own(io.get_executor(), {.tls = "posix,tcp"});
  auto first = own.allocate(n);
  auto second = own.allocate(n);
  ASSERT_TRUE(first && second);
  std::memset(first->data(), 1, n);
  std::memset(second->data(), 2, n);
  kvx::memory::segment_table table("ucx-cache-retired-rkey");
  auto seg = *table.add("retired", first->region());
  auto entry = own.register_memory(seg);
  ASSERT_TRUE(entry) << entry.error().message();
  auto old_desc = table.describe(seg);
  old_desc.transports["ucx"] = *entry;

  std::vector<std::byte> old_dst(n), new_dst(n);
  std::optional<std::error_code> old_ec, new_ec;
  const int before = rkeys_destroyed;
  int destroyed_when_old_read_ended = -1;
  std::optional<kvx::transport::ucx> ini(std::in_place, io.get_executor(), kvx::transport::ucx_options{.tls = "tcp"});
  ini->async_read(old_desc, 0, old_dst, [&](std::error_code ec) {
    old_ec = ec;
    destroyed_when_old_read_ended = rkeys_destroyed - before;
  });

  ASSERT_TRUE(own.deregister_memory(seg));
  auto moved = seg;
  moved.region = second->region();
  entry = own.register_memory(moved);
  ASSERT_TRUE(entry) << entry.error().message();
  auto new_desc = table.describe(moved);
  new_desc.transports["ucx"] = *entry;
  ASSERT_NE(new_desc.transports["ucx"]["rkey"], old_desc.transports["ucx"]["rkey"]);
  ini->async_read(new_desc, 0, new_dst, [&](std::error_code ec) { new_ec = ec; });
  EXPECT_EQ(rkeys_destroyed - before, 0) << "the replaced rkey was destroyed under the read in flight";

  ASSERT_TRUE(kvx::test::run_until(io, [&] { return old_ec && new_ec; }, 20s));
  EXPECT_EQ(destroyed_when_old_read_ended, 0);  // its outcome is not checked: its registration is gone
  EXPECT_FALSE(*new_ec) << new_ec->message();
  EXPECT_TRUE(all_equal(new_dst, std::byte{2})) << "the read did not use the new registration";
  // Both rkeys go with the endpoint (and the count sees the transport's calls).
  ini.reset();
  EXPECT_EQ(rkeys_destroyed - before, 2);
  EXPECT_TRUE(own.deregister_memory(moved));
}

}  // namespace
