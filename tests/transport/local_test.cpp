#include <kvx/transport/local.hpp>

#include <gtest/gtest.h>

#include <boost/asio/io_context.hpp>

#include <numeric>
#include <optional>
#include <vector>

namespace {

namespace asio = boost::asio;
using kvx::memory::memory_region;

struct local_fixture : ::testing::Test {
  asio::io_context io;
  kvx::memory::segment_table owner{"owner"};
  kvx::transport::local t{io.get_executor()};
  std::vector<std::byte> remote_bytes = std::vector<std::byte>(4096);
  std::vector<std::byte> local_bytes = std::vector<std::byte>(4096);
  kvx::memory::local_segment seg;
  kvx::memory::segment_descriptor desc;

  void SetUp() override {
    for (std::size_t i = 0; i < remote_bytes.size(); ++i) remote_bytes[i] = std::byte(i * 7);
    seg = *owner.add("local-test-remote", memory_region{remote_bytes.data(), remote_bytes.size()});
    auto entry = t.register_memory(seg);
    ASSERT_TRUE(entry) << entry.error().message();
    desc = owner.describe(seg);
    desc.transports["local"] = *entry;
  }
  void TearDown() override { ASSERT_TRUE(t.deregister_memory(seg)); }

  std::error_code read(std::uint64_t off, std::span<std::byte> dst, const kvx::memory::segment_descriptor& d) {
    std::optional<std::error_code> out;
    t.async_read(d, off, dst, [&](std::error_code ec) { out = ec; });
    EXPECT_FALSE(out) << "completion ran inside the initiating function";
    io.restart();
    io.run();
    return out.value_or(kvx::errc::internal);
  }
};

TEST_F(local_fixture, ReadsAndWritesCheckedBytes) {
  ASSERT_FALSE(read(100, std::span(local_bytes).first(1000), desc));
  EXPECT_TRUE(std::equal(local_bytes.begin(), local_bytes.begin() + 1000, remote_bytes.begin() + 100));
  std::fill(local_bytes.begin(), local_bytes.end(), std::byte{0x5a});
  std::optional<std::error_code> out;
  t.async_write(desc, 4000, std::span<const std::byte>(local_bytes).first(96), [&](std::error_code ec) { out = ec; });
  io.restart();
  io.run();
  ASSERT_TRUE(out);
  EXPECT_FALSE(*out);
  EXPECT_EQ(remote_bytes[4095], std::byte{0x5a});
  EXPECT_EQ(remote_bytes[3999], std::byte(3999 * 7));
}

TEST_F(local_fixture, RefusesOutOfRangeBadKeyUnknownSegmentAndStaleGeneration) {
  EXPECT_EQ(read(4000, std::span(local_bytes).first(97), desc), kvx::errc::out_of_range);
  EXPECT_EQ(read(UINT64_MAX, std::span(local_bytes).first(2), desc), kvx::errc::out_of_range);
  auto bad_key = desc;
  bad_key.key ^= 1;
  EXPECT_EQ(read(0, std::span(local_bytes).first(8), bad_key), kvx::errc::bad_key);
  auto unknown = desc;
  unknown.name = "no-such-segment";
  EXPECT_EQ(read(0, std::span(local_bytes).first(8), unknown), kvx::errc::unknown_segment);
  auto stale = desc;
  stale.generation += 1;
  EXPECT_EQ(read(0, std::span(local_bytes).first(8), stale), kvx::errc::stale);
  auto elsewhere = desc;
  elsewhere.transports["local"]["process"] = "another-process";
  EXPECT_EQ(t.can_transfer(elsewhere), kvx::errc::unreachable);
  EXPECT_EQ(read(0, std::span(local_bytes).first(8), elsewhere), kvx::errc::unreachable);
  // A peer's descriptor with a field of another type is another process, not an exception.
  for (const auto& wrong : {nlohmann::json(7), nlohmann::json::array(), nlohmann::json(nullptr)}) {
    auto odd = desc;
    odd.transports["local"]["process"] = wrong;
    EXPECT_NO_THROW(EXPECT_EQ(t.can_transfer(odd), kvx::errc::unreachable)) << wrong;
    EXPECT_NO_THROW(EXPECT_EQ(read(0, std::span(local_bytes).first(8), odd), kvx::errc::unreachable)) << wrong;
  }
  auto no_process = desc;
  no_process.transports["local"] = nlohmann::json::object();
  EXPECT_EQ(t.can_transfer(no_process), kvx::errc::unreachable);
}

TEST(LocalTransport, RegisteringTwiceOrDeviceMemoryIsRefused) {
  asio::io_context io;
  kvx::transport::local t(io.get_executor());
  std::vector<std::byte> b(64);
  kvx::memory::segment_table owner("n");
  auto seg = *owner.add("local-twice", memory_region{b.data(), b.size()});
  ASSERT_TRUE(t.register_memory(seg));
  EXPECT_EQ(t.register_memory(seg).code(), kvx::errc::already_exists);
  EXPECT_TRUE(t.deregister_memory(seg));
  EXPECT_EQ(t.deregister_memory(seg).code(), kvx::errc::unknown_segment);
  auto dev = seg;
  dev.name = "local-dev";
  dev.region.where = kvx::memory::location::cuda(0);
  EXPECT_EQ(t.register_memory(dev).code(), kvx::errc::not_supported);
}

}  // namespace
