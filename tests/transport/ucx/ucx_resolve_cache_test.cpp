#include <kvx/transport/ucx.hpp>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include <boost/asio/io_context.hpp>
#include <gtest/gtest.h>

#include <kvx/memory/segment_table.hpp>

// The initiator remembers the peer and rkey it used last (ucx_worker.hpp),
// so consecutive operations skip hashing the worker address and building the
// rkey map key. These tests move between peers and segments, and re-register
// a segment under the same name and generation, where a stale memo would send
// bytes to the wrong place.

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

}  // namespace
