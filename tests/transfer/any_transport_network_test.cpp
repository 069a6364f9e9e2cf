// any_transport over kvx's tcp and shm transports, built from JSON through
// the registry (kvx/transfer/registered_transports.hpp) and driven by engines.
#include <kvx/transfer/registered_transports.hpp>

#include <gtest/gtest.h>

#include <boost/asio/io_context.hpp>

#include <kvx/testing/random_bytes.hpp>
#include <kvx/transfer/embedded_metadata.hpp>
#include <kvx/transfer/transfer_engine.hpp>

#include <chrono>
#include <optional>
#include <string>
#include <vector>

#include "support/run_until.hpp"

namespace {

namespace asio = boost::asio;
using namespace std::chrono_literals;
using kvx::transfer::any_transport;
using network_engine_t = kvx::transfer::transfer_engine<kvx::transfer::embedded_metadata, any_transport>;

struct AnyNetworkTransport : ::testing::TestWithParam<const char*> {
  asio::io_context io;
  kvx::transfer::embedded_metadata meta{io.get_executor()};

  template <class Pred>
  void run_until(Pred done) {
    kvx::test::run_until(io, done, 20s);
  }
  void reg(network_engine_t& e, std::vector<std::byte>& buf, const std::string& name) {
    std::optional<std::error_code> out;
    e.async_register_memory({buf.data(), buf.size()}, name, [&](std::error_code ec, const kvx::memory::segment_descriptor& d) {
      out = ec;
      if (!ec) {
        EXPECT_TRUE(d.transports.contains(GetParam())) << d.to_json().dump();  // published under runtime_name
      }
    });
    run_until([&] { return out.has_value(); });
    ASSERT_TRUE(out && !*out) << (out ? out->message() : "no completion");
  }
  std::error_code transfer(network_engine_t& e, kvx::transfer::batch b) {
    std::optional<std::error_code> out;
    e.async_transfer(std::move(b), [&](std::error_code ec, kvx::transfer::batch_result) { out = ec; });
    run_until([&] { return out.has_value(); });
    return out.value_or(kvx::make_error_code(kvx::errc::timed_out));
  }
};

TEST_P(AnyNetworkTransport, BuiltFromJsonMovesBytesBothWaysThroughEngines) {
  auto a = kvx::transfer::make_transport(io.get_executor(), nlohmann::json{{"transport", GetParam()}});
  auto b = kvx::transfer::make_transport(io.get_executor(), nlohmann::json{{"transport", GetParam()}});
  ASSERT_TRUE(a) << a.error().message();
  ASSERT_TRUE(b) << b.error().message();
  EXPECT_EQ(a->runtime_name(), GetParam());
  network_engine_t owner(meta, {.node = "owner"}, *a), user(meta, {.node = "user"}, *b);
  std::vector<std::byte> remote(3u << 20), mine(3u << 20);
  kvx::testing::fill_random(remote, 11);
  kvx::testing::fill_random(mine, 12);
  const auto rname = kvx::testing::unique_segment_name("any-net-remote");
  reg(owner, remote, rname);
  reg(user, mine, kvx::testing::unique_segment_name("any-net-local"));

  kvx::transfer::batch rd;  // an unaligned read larger than one slice
  rd.read(std::span(mine).subspan(3, (2u << 20) + 5), rname, 17);
  const auto read_ec = transfer(user, std::move(rd));
  ASSERT_FALSE(read_ec) << read_ec.message();
  EXPECT_EQ(kvx::testing::first_difference(std::span(mine).subspan(3, (2u << 20) + 5),
                                           std::span(remote).subspan(17, (2u << 20) + 5)),
            "");

  kvx::testing::fill_random(mine, 13);
  kvx::transfer::batch wr;
  wr.write(std::span<const std::byte>(mine).first(4096), rname, (3u << 20) - 4096);
  const auto write_ec = transfer(user, std::move(wr));
  ASSERT_FALSE(write_ec) << write_ec.message();
  EXPECT_EQ(kvx::testing::first_difference(std::span(mine).first(4096), std::span(remote).last(4096)), "");

  kvx::transfer::batch oob;  // past the end of the remote segment: refused, nothing written
  oob.write(std::span<const std::byte>(mine).first(4096), rname, (3u << 20) - 100);
  EXPECT_TRUE(transfer(user, std::move(oob)));
}

INSTANTIATE_TEST_SUITE_P(Registered, AnyNetworkTransport, ::testing::Values("tcp", "shm"),
                         [](const auto& info) { return std::string(info.param); });

TEST(AnyNetworkTransportConfig, BadFieldsAreErrorsNamingTheField) {
  asio::io_context io;
  auto check = [&](const nlohmann::json& cfg, const std::string& field) {
    auto t = kvx::transfer::make_transport(io.get_executor(), cfg, "net");
    ASSERT_FALSE(t) << cfg.dump();
    EXPECT_NE(t.error().message().find(field), std::string::npos) << t.error().message();
  };
  check({{"transport", "tcp"}, {"connections", 0}}, "net.connections");
  check({{"transport", "tcp"}, {"conections", 2}}, "net.conections");
  check({{"transport", "tcp"}, {"port", "high"}}, "net.port");
  check({{"transport", "shm"}, {"open_timeout_ms", -1}}, "net.open_timeout_ms");
  check({{"transport", "shm"}, {"port", 1}}, "net.port");
  auto unknown = kvx::transfer::make_transport(io.get_executor(), nlohmann::json{{"transport", "rdma"}}, "net");
  ASSERT_FALSE(unknown);
  for (const char* known : {"local", "shm", "tcp"})
    EXPECT_NE(unknown.error().message().find(known), std::string::npos) << unknown.error().message();
}

}  // namespace
