#include <kvx/transfer/any_transport.hpp>

#include <gtest/gtest.h>

#include <boost/asio/io_context.hpp>

#include <kvx/testing/random_bytes.hpp>
#include <kvx/testing/test_transports.hpp>
#include <kvx/transfer/embedded_metadata.hpp>
#include <kvx/transfer/transfer_engine.hpp>

#include <optional>
#include <vector>

namespace {

namespace asio = boost::asio;
using kvx::transfer::any_transport;

TEST(AnyTransport, BuildsLocalFromJsonAndMovesBytesThroughAnEngine) {
  asio::io_context io;
  auto a = kvx::transfer::make_transport(io.get_executor(), nlohmann::json{{"transport", "local"}});
  auto b = kvx::transfer::make_transport(io.get_executor(), nlohmann::json{{"transport", "local"}});
  ASSERT_TRUE(a) << a.error().message();
  ASSERT_TRUE(b);
  EXPECT_EQ(a->runtime_name(), "local");
  EXPECT_TRUE(a->runtime_capabilities().same_process_only);
  kvx::transfer::embedded_metadata meta(io.get_executor());
  using engine_t = kvx::transfer::transfer_engine<kvx::transfer::embedded_metadata, any_transport>;
  engine_t owner(meta, {.node = "owner"}, *a), user(meta, {.node = "user"}, *b);
  std::vector<std::byte> remote(8192), mine(8192);
  kvx::testing::fill_random(remote, 4);
  const auto rname = kvx::testing::unique_segment_name("any-remote");
  int registered = 0;
  owner.async_register_memory({remote.data(), remote.size()}, rname,
                              [&](std::error_code ec, kvx::memory::segment_descriptor d) {
                                EXPECT_FALSE(ec);
                                EXPECT_TRUE(d.transports.contains("local")) << d.to_json().dump();  // runtime_name is the key
                                ++registered;
                              });
  user.async_register_memory({mine.data(), mine.size()}, kvx::testing::unique_segment_name("any-local"),
                             [&](std::error_code ec, kvx::memory::segment_descriptor) { registered += !ec; });
  io.run();
  ASSERT_EQ(registered, 2);
  std::optional<std::error_code> out;
  kvx::transfer::batch bt;
  bt.read(std::span(mine).first(5000), rname, 100);
  user.async_transfer(std::move(bt), [&](std::error_code ec, kvx::transfer::batch_result) { out = ec; });
  io.restart();
  io.run();
  ASSERT_TRUE(out);
  EXPECT_FALSE(*out) << out->message();
  EXPECT_EQ(kvx::testing::first_difference(std::span(mine).first(5000), std::span(remote).subspan(100, 5000)), "");
}

TEST(AnyTransport, UnknownNamesAndBadFieldsAreErrorsNamingTheField) {
  asio::io_context io;
  auto unknown = kvx::transfer::make_transport(io.get_executor(), nlohmann::json{{"transport", "carrier-pigeon"}}, "net");
  ASSERT_FALSE(unknown);
  EXPECT_NE(unknown.error().message().find("net.transport"), std::string::npos) << unknown.error().message();
  EXPECT_NE(unknown.error().message().find("carrier-pigeon"), std::string::npos);
  EXPECT_NE(unknown.error().message().find("local"), std::string::npos) << "lists the known transports";
  auto missing = kvx::transfer::make_transport(io.get_executor(), nlohmann::json::object(), "net");
  ASSERT_FALSE(missing);
  EXPECT_NE(missing.error().message().find("net.transport"), std::string::npos) << missing.error().message();
  auto extra = kvx::transfer::make_transport(io.get_executor(), nlohmann::json{{"transport", "local"}, {"port", 1}}, "net");
  ASSERT_FALSE(extra);
  EXPECT_NE(extra.error().message().find("net.port"), std::string::npos) << extra.error().message();
  auto wrong_type = kvx::transfer::make_transport(io.get_executor(), nlohmann::json{{"transport", 3}}, "net");
  EXPECT_FALSE(wrong_type);
}

TEST(AnyTransport, BackendsAddTheirOwnFactories) {
  auto& reg = kvx::transfer::transport_registry::instance();
  const std::string name = kvx::testing::unique_segment_name("test-transport");
  ASSERT_TRUE(reg.add(name, [](kvx::asio::any_io_executor ex, const kvx::config::view&) -> kvx::result<any_transport> {
    return any_transport(std::in_place_type<kvx::transport::local>, std::move(ex));
  }));
  EXPECT_EQ(reg.add(name, {}).code(), kvx::errc::already_exists);
  asio::io_context io;
  auto t = kvx::transfer::make_transport(io.get_executor(), nlohmann::json{{"transport", name}});
  ASSERT_TRUE(t) << t.error().message();
  EXPECT_EQ(t->runtime_name(), "local");
}

// any_transport's static capabilities claim every memory kind and no
// locality; the engine must rank and register by what the wrapped transport
// says at run time, or a same-process `local` loses to a transport listed
// before it, and memory it cannot touch is offered to it.
TEST(AnyTransport, TheEngineRanksAndRegistersByRuntimeCapabilities) {
  asio::io_context io;
  kvx::transfer::embedded_metadata meta(io.get_executor());
  kvx::testing::failing_transport owner_failing(io.get_executor()), failing(io.get_executor());
  kvx::transport::local owner_local(io.get_executor());
  auto any_local = kvx::transfer::make_transport(io.get_executor(), nlohmann::json{{"transport", "local"}});
  ASSERT_TRUE(any_local) << any_local.error().message();
  kvx::transfer::transfer_engine<kvx::transfer::embedded_metadata, kvx::testing::failing_transport, kvx::transport::local>
      owner(meta, {.node = "owner"}, owner_failing, owner_local);
  kvx::transfer::transfer_engine<kvx::transfer::embedded_metadata, kvx::testing::failing_transport, any_transport> user(
      meta, {.node = "user", .max_retries = 0}, failing, *any_local);
  std::vector<std::byte> remote(4096), mine(4096);
  kvx::testing::fill_random(remote, 6);
  const auto rname = kvx::testing::unique_segment_name("any-ranked");
  std::optional<std::error_code> owner_reg, user_reg, gpu_reg;
  std::string gpu_error;
  owner.async_register_memory({remote.data(), remote.size()}, rname,
                              [&](std::error_code ec, kvx::memory::segment_descriptor) { owner_reg = ec; });
  user.async_register_memory({mine.data(), mine.size()}, kvx::testing::unique_segment_name("any-mine"),
                             [&](std::error_code ec, kvx::memory::segment_descriptor) { user_reg = ec; });
  // Host bytes labelled as GPU memory: only the labels decide who is asked.
  std::vector<std::byte> labelled(4096);
  user.async_register_memory({labelled.data(), labelled.size(), kvx::memory::location::cuda(0)},
                             kvx::testing::unique_segment_name("any-gpu"),
                             [&](std::error_code ec, kvx::memory::segment_descriptor) { gpu_reg = ec; });
  io.run();
  ASSERT_EQ(owner_reg, std::error_code{});
  ASSERT_EQ(user_reg, std::error_code{});
  ASSERT_TRUE(gpu_reg);
  EXPECT_EQ(*gpu_reg, kvx::errc::not_supported);
  std::optional<std::pair<std::error_code, kvx::transfer::batch_result>> out;
  kvx::transfer::batch bt;
  bt.read(std::span(mine), rname, 0);
  user.async_transfer(std::move(bt), [&](std::error_code ec, kvx::transfer::batch_result r) { out.emplace(ec, std::move(r)); });
  io.restart();
  io.run();
  ASSERT_TRUE(out);
  EXPECT_FALSE(out->first) << out->second.first_error().message();
  EXPECT_EQ(out->second.ops[0].transport, "local") << "same-process local ranks before the failing transport";
  EXPECT_EQ(failing.operations(), 0u);
  EXPECT_TRUE(mine == remote);
}

}  // namespace
