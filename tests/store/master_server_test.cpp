#include <kvx/store/master_server.hpp>
#include <kvx/cache/eviction/lru.hpp>
#include <kvx/store/master_client.hpp>

#include <gtest/gtest.h>

#include <boost/asio/io_context.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/write.hpp>
#include <boost/asio/use_future.hpp>

#include <array>
#include <list>
#include <optional>
#include <thread>

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

// A committed object `k` of tenant `t`, read with a long lease through `client`.
void put_and_lease(MasterServer& f, kvx::store::master_client& client) {
  ASSERT_FALSE(f.call(client, {{"op", "register_segment"}, {"node", "n"}, {"segment", "s"}, {"capacity", 1 << 20}}).first);
  auto [ec, put] = f.call(client, {{"op", "put_start"}, {"tenant", "t"}, {"key", "k"}, {"size", 100}});
  ASSERT_FALSE(ec);
  ASSERT_FALSE(f.call(client, {{"op", "put_commit"}, {"tenant", "t"}, {"key", "k"}, {"put_id", put["put_id"]}}).first);
  ASSERT_FALSE(f.call(client, {{"op", "get"}, {"tenant", "t"}, {"key", "k"}, {"lease_ms", 600000}}).first);
  ASSERT_EQ(f.call(client, {{"op", "remove"}, {"tenant", "t"}, {"key", "k"}}).first, kvx::errc::busy);
}

TEST_F(MasterServer, ANotificationRidesWithTheNextCallInOrderAndGetsNoAnswer) {
  auto client = kvx::store::master_client::create(io.get_executor(), server.endpoint());
  put_and_lease(*this, *client);
  client->notify({{"op", "release"}, {"tenant", "t"}, {"key", "k"}});
  // The release reached the master before the remove (one connection, in
  // order), though the lease has ten minutes left; no answer to the
  // notification was taken for the remove's.
  auto [ec, removed] = call(*client, {{"op", "remove"}, {"tenant", "t"}, {"key", "k"}});
  EXPECT_FALSE(ec) << ec.message() << removed.dump();
  auto [ec2, stats] = call(*client, {{"op", "stats"}});
  ASSERT_FALSE(ec2);
  EXPECT_EQ(stats["objects"], 0);
}

TEST_F(MasterServer, ANotificationWithNoCallAfterItStillLeaves) {
  auto reader = kvx::store::master_client::create(io.get_executor(), server.endpoint());
  auto other = kvx::store::master_client::create(io.get_executor(), server.endpoint());
  put_and_lease(*this, *reader);
  reader->notify({{"op", "release"}, {"tenant", "t"}, {"key", "k"}});
  // Nothing else goes through `reader`: the release leaves on its own (the
  // lease would hold the object for ten minutes), so another client's
  // remove succeeds once it has arrived.
  std::error_code ec = kvx::errc::busy;
  for (int i = 0; i < 500 && ec == kvx::errc::busy; ++i) {
    ec = call(*other, {{"op", "remove"}, {"tenant", "t"}, {"key", "k"}}).first;
    if (ec == kvx::errc::busy) {
      io.restart();
      io.run_for(10ms);
    }
  }
  EXPECT_FALSE(ec) << ec.message();
}

// A key or name that is not UTF-8 made the encoding throw inside the
// client's strand handler, out of io.run(): std::terminate (`kvx-store admin
// drain $'\xff'`). The call is refused, the connection carries on.
TEST_F(MasterServer, ACallWithAFieldThatIsNotUtf8IsInvalidArgumentNotACrash) {
  auto client = kvx::store::master_client::create(io.get_executor(), server.endpoint());
  auto [ec, body] = call(*client, {{"op", "get"}, {"tenant", "t"}, {"key", "\xff"}});
  EXPECT_EQ(ec, kvx::errc::invalid_argument) << ec.message();
  EXPECT_NE(body.value("message", std::string()).find("'key'"), std::string::npos) << body.dump();
  auto [ec2, body2] = call(*client, {{"op", "drain_node"}, {"node", "n\xc3"}});
  EXPECT_EQ(ec2, kvx::errc::invalid_argument) << ec2.message();
  auto [ec3, body3] = call(*client, {{"op", "longest_prefix"}, {"tenant", "t"}, {"keys", {"a", "\xed\xa0\x80"}}});
  EXPECT_EQ(ec3, kvx::errc::invalid_argument) << ec3.message();
  EXPECT_NE(body3.value("message", std::string()).find("'keys[1]'"), std::string::npos) << body3.dump();
  client->notify({{"op", "release"}, {"tenant", "t"}, {"key", "\xff"}});  // dropped, logged
  auto [ec4, exists] = call(*client, {{"op", "exists"}, {"tenant", "t"}, {"key", "caf\xc3\xa9 \xf0\x9f\x98\x80"}});
  EXPECT_FALSE(ec4) << ec4.message() << " (valid UTF-8 still goes through)";
  EXPECT_EQ(exists["exists"], false) << exists.dump();
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

// close() while a write is stuck (the peer reads nothing): the aborted write
// and read of that connection must not touch the next one. A call made right
// after close() goes out on a fresh connection and gets its answer (it used
// to fail with "write failed: Operation canceled" when the old write's
// completion ran after the new connection began).
TEST(MasterClient, ACallAfterCloseWithAWriteStuckGoesOutOnAFreshConnection) {
  asio::io_context io;
  asio::ip::tcp::acceptor master(io);
  master.open(asio::ip::tcp::v4());
  master.set_option(asio::socket_base::receive_buffer_size(4096));  // accepted sockets inherit it: the write stalls
  master.bind({asio::ip::make_address("127.0.0.1"), 0});
  master.listen();
  asio::ip::tcp::socket first(io), second(io);
  bool first_accepted = false;
  std::array<unsigned char, 4> header{};
  std::string body;
  master.async_accept(first, [&](boost::system::error_code ec) {
    ASSERT_FALSE(ec) << ec.message();
    first_accepted = true;
    master.async_accept(second, [&](boost::system::error_code ec2) {
      ASSERT_FALSE(ec2) << ec2.message();
      asio::async_read(second, asio::buffer(header), [&](boost::system::error_code ec3, std::size_t) {
        ASSERT_FALSE(ec3) << ec3.message();
        body.resize(header[0] | header[1] << 8 | header[2] << 16 | static_cast<std::size_t>(header[3]) << 24);
        asio::async_read(second, asio::buffer(body), [&](boost::system::error_code ec4, std::size_t) {
          ASSERT_FALSE(ec4) << ec4.message();
          const auto request = json::parse(body);
          static std::string answer;
          answer = kvx::store::protocol::encode_frame({{"id", request["id"]}, {"ok", true}, {"answer", 42}});
          asio::async_write(second, asio::buffer(answer), [](boost::system::error_code, std::size_t) {});
        });
      });
    });
  });
  auto client = kvx::store::master_client::create(io.get_executor(), "127.0.0.1:" + std::to_string(master.local_endpoint().port()));
  std::optional<std::error_code> stuck;
  client->async_call({{"op", "stats"}, {"pad", std::string(8u << 20, 'x')}}, [&](std::error_code ec, json) { stuck = ec; });
  while (!first_accepted && io.run_one_for(5s)) {
  }
  ASSERT_TRUE(first_accepted);
  io.run_for(50ms);  // the client writes what the buffers take; the rest waits
  ASSERT_FALSE(stuck) << "the 8 MiB write was expected to stall";
  client->close();
  std::optional<std::pair<std::error_code, json>> next;
  client->async_call({{"op", "stats"}}, [&](std::error_code ec, json b) { next.emplace(ec, std::move(b)); });
  while (!next && io.run_one_for(5s)) {
  }
  ASSERT_TRUE(stuck);
  EXPECT_EQ(*stuck, kvx::errc::connection_lost);
  ASSERT_TRUE(next);
  ASSERT_FALSE(next->first) << next->first.message() << " " << next->second.dump();
  EXPECT_EQ(next->second.value("answer", 0), 42);
}

// A master (or a standby) on its own thread, for tests that write the wire
// format themselves.
struct running_master {
  asio::io_context io;
  kvx::metrics::registry registry;
  state_type state{{}, {}, registry};
  std::optional<kvx::store::master_server<state_type>> server;
  std::thread runner;

  explicit running_master(bool standby = false) {
    if (standby)
      server.emplace(io.get_executor(), kvx::store::master_server_config{});
    else
      server.emplace(io.get_executor(), state);
    EXPECT_TRUE(server->start());
    runner = std::thread([this] { io.run_for(5s); });
  }
  ~running_master() {
    io.stop();
    runner.join();
  }
};

TEST(MasterServerRaw, OversizedFrameGetsAnErrorAndTheConnectionCloses) {
  running_master master;
  asio::io_context cio;
  asio::ip::tcp::socket s(cio);
  s.connect({asio::ip::make_address("127.0.0.1"), master.server->port()});
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
}

// Sends three requests in one write (a call, a notification, a call) to the
// server on `port` and reads every answer until the server closes.
std::vector<json> answers_to_call_notify_call(std::uint16_t port) {
  asio::io_context cio;
  asio::ip::tcp::socket s(cio);
  s.connect({asio::ip::make_address("127.0.0.1"), port});
  std::string frames = kvx::store::protocol::encode_frame({{"id", 1}, {"op", "exists"}, {"tenant", "t"}, {"key", "a"}}) +
                       kvx::store::protocol::encode_frame({{"id", 2}, {"op", "release"}, {"tenant", "t"}, {"key", "a"}, {"reply", false}}) +
                       kvx::store::protocol::encode_frame({{"id", 3}, {"op", "stats"}});
  asio::write(s, asio::buffer(frames));
  // Closing our side ends the session once it has answered what it read.
  s.shutdown(asio::ip::tcp::socket::shutdown_send);
  kvx::store::protocol::frame_decoder decoder;
  std::vector<json> answers;
  std::array<char, 4096> buf;
  boost::system::error_code ec;
  for (;;) {
    auto n = s.read_some(asio::buffer(buf), ec);
    if (ec) break;
    decoder.feed(std::string_view(buf.data(), n));
    for (auto body = decoder.next(); body && *body; body = decoder.next()) answers.push_back(json::parse(**body));
  }
  EXPECT_EQ(ec, asio::error::eof);
  return answers;
}

TEST(MasterServerRaw, FramesOfOneWriteAreAnsweredInOrderAndANotificationNotAtAll) {
  running_master master;
  auto answers = answers_to_call_notify_call(master.server->port());
  ASSERT_EQ(answers.size(), 2u);
  EXPECT_EQ(answers[0]["id"], 1);
  EXPECT_TRUE(answers[0]["ok"]);
  EXPECT_EQ(answers[1]["id"], 3);
  EXPECT_TRUE(answers[1]["ok"]);
}

TEST(MasterServerRaw, AStandbyRefusesCallsAndDropsNotificationsSilently) {
  running_master standby(/*standby=*/true);
  auto answers = answers_to_call_notify_call(standby.server->port());
  ASSERT_EQ(answers.size(), 2u);
  EXPECT_EQ(answers[0]["id"], 1);
  EXPECT_EQ(answers[0]["error"], "stale");
  EXPECT_EQ(answers[1]["id"], 3);
  EXPECT_EQ(answers[1]["error"], "stale");
}

}  // namespace
