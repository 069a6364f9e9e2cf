#include <kvx/store/master_server.hpp>
#include <kvx/cache/eviction/lru.hpp>
#include <kvx/store/master_client.hpp>

#include <gtest/gtest.h>

#include <boost/asio/io_context.hpp>
#include <boost/asio/use_future.hpp>

#include <list>
#include <optional>

namespace {

namespace asio = boost::asio;
using json = nlohmann::json;
using namespace std::chrono_literals;


using state_type = kvx::store::master_state<kvx::cache::eviction::lru>;

struct MasterServer : ::testing::Test {
  asio::io_context io;
  kvx::metrics::registry registry;
  state_type state{{}, {}, registry};
  kvx::store::master_server<state_type> server{io.get_executor(), state};

  void SetUp() override { ASSERT_TRUE(server.start()); }

  std::pair<std::error_code, json> call(kvx::store::master_client& c, json req) {
    std::optional<std::pair<std::error_code, json>> out;
    c.async_call(std::move(req), [&](std::error_code ec, json body) { out.emplace(ec, std::move(body)); });
    io.restart();
    while (!out && io.run_one_for(5s)) {
    }
    return out.value_or(std::pair{make_error_code(kvx::errc::internal), json{}});
  }
};

TEST_F(MasterServer, ClientRunsAPutGetCycleOverLoopback) {
  auto client = kvx::store::master_client::create(io.get_executor(), server.endpoint());
  auto [ec1, r1] = call(*client, {{"op", "register_segment"}, {"node", "n"}, {"segment", "s"}, {"capacity", 1 << 20}});
  ASSERT_FALSE(ec1) << ec1.message() << r1.dump();
  auto [ec2, put] = call(*client, {{"op", "put_start"}, {"tenant", "t"}, {"key", "k"}, {"size", 100}});
  ASSERT_FALSE(ec2);
  auto [ec3, r3] = call(*client, {{"op", "put_commit"}, {"tenant", "t"}, {"key", "k"}, {"put_id", put["put_id"]}});
  ASSERT_FALSE(ec3);
  auto [ec4, got] = call(*client, {{"op", "get"}, {"tenant", "t"}, {"key", "k"}});
  ASSERT_FALSE(ec4);
  EXPECT_EQ(got["size"], 100);
  auto [ec5, miss] = call(*client, {{"op", "get"}, {"tenant", "t"}, {"key", "other"}});
  EXPECT_EQ(ec5, kvx::errc::not_found);
  EXPECT_NE(miss["message"].get<std::string>().find("t/other"), std::string::npos);
}

TEST_F(MasterServer, ManyPipelinedCallsAllComplete) {
  auto client = kvx::store::master_client::create(io.get_executor(), server.endpoint());
  int done = 0;
  for (int i = 0; i < 200; ++i)
    client->async_call({{"op", "exists"}, {"tenant", "t"}, {"key", std::to_string(i)}}, [&](std::error_code ec, json r) {
      EXPECT_FALSE(ec);
      EXPECT_FALSE(r["exists"]);
      ++done;
    });
  while (done < 200 && io.run_one_for(5s)) {
  }
  EXPECT_EQ(done, 200);
}

TEST_F(MasterServer, StoppedMasterGivesConnectionLostThenUnreachable) {
  auto client = kvx::store::master_client::create(io.get_executor(), server.endpoint());
  ASSERT_FALSE(call(*client, {{"op", "stats"}}).first);
  server.stop();
  io.restart();
  io.poll();
  auto [ec, body] = call(*client, {{"op", "stats"}});
  EXPECT_TRUE(ec == kvx::errc::connection_lost || ec == kvx::errc::unreachable) << ec.message();
  auto [ec2, body2] = call(*client, {{"op", "stats"}});
  EXPECT_EQ(ec2, kvx::errc::unreachable) << ec2.message();
}

TEST(MasterClient, DeadlineTurnsASilentMasterIntoTimedOut) {
  asio::io_context io;
  asio::ip::tcp::acceptor silent(io, {asio::ip::make_address("127.0.0.1"), 0});
  asio::ip::tcp::socket accepted(io);
  silent.async_accept(accepted, [](boost::system::error_code) {});
  auto client = kvx::store::master_client::create(io.get_executor(), "127.0.0.1:" + std::to_string(silent.local_endpoint().port()));
  std::optional<std::error_code> out;
  client->async_call({{"op", "stats"}}, kvx::cancel_after(io.get_executor(), 50ms, [&](std::error_code ec, json) { out = ec; }));
  while (!out && io.run_one_for(5s)) {
  }
  ASSERT_TRUE(out);
  EXPECT_EQ(*out, kvx::errc::timed_out);
}

TEST(MasterServerRaw, OversizedFrameGetsAnErrorAndTheConnectionCloses) {
  asio::io_context io;
  kvx::metrics::registry registry;
  state_type state{{}, {}, registry};
  kvx::store::master_server<state_type> server(io.get_executor(), state);
  ASSERT_TRUE(server.start());
  std::thread runner([&] { io.run_for(5s); });
  asio::io_context cio;
  asio::ip::tcp::socket s(cio);
  s.connect({asio::ip::make_address("127.0.0.1"), server.port()});
  const char huge[4] = {'\xff', '\xff', '\xff', '\x7f'};
  asio::write(s, asio::buffer(huge));
  std::string reply;
  boost::system::error_code ec;
  std::array<char, 4096> buf;
  for (;;) {
    auto n = s.read_some(asio::buffer(buf), ec);
    if (ec) break;
    reply.append(buf.data(), n);
  }
  EXPECT_EQ(ec, asio::error::eof);
  ASSERT_GT(reply.size(), 4u);
  auto body = json::parse(reply.substr(4));
  EXPECT_EQ(body["error"], "malformed_message");
  io.stop();
  runner.join();
}

}  // namespace
