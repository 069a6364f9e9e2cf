// http_metadata (client) and http_metadata_server: the metadata conformance
// suite through a real server on 127.0.0.1, then what the pair does when
// requests are wrong, the server misbehaves or goes away, and under load
// from several threads. Loopback only.
#include <kvx/transfer/http_metadata.hpp>
#include <kvx/transfer/http_metadata_server.hpp>

#include <kvx/testing/metadata_conformance.hpp>

#include <gtest/gtest.h>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/read_until.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>

#include <atomic>
#include <chrono>
#include <list>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <kvx/transfer/embedded_metadata.hpp>

namespace {

namespace asio = boost::asio;
using namespace std::chrono_literals;
using asio::ip::tcp;
using kvx::testing::run_op;
using kvx::transfer::embedded_metadata;
using kvx::transfer::http_metadata;
using kvx::transfer::http_metadata_config;
using kvx::transfer::http_metadata_server;
using kvx::transfer::http_metadata_server_config;
using kvx::transfer::metadata_entries;

constexpr auto use_tuple = asio::as_tuple(asio::use_awaitable);

http_metadata_config client_config(std::uint16_t port, std::chrono::milliseconds timeout = 5s) {
  http_metadata_config c;
  c.port = port;
  c.timeout = timeout;
  return c;
}

std::uint16_t start_or_throw(http_metadata_server<embedded_metadata>& server) {
  auto started = server.start();
  if (!started) throw std::runtime_error(started.error().message());
  return server.endpoint().port();
}

// The whole stack on the test's io_context: one thread drives client,
// server and backend.
struct same_io_env {
  using backend_type = http_metadata;
  explicit same_io_env(asio::io_context& io)
      : meta(io.get_executor()), server(io.get_executor(), meta), client(io.get_executor(), client_config(start_or_throw(server))) {}
  backend_type& backend() { return client; }
  embedded_metadata meta;
  http_metadata_server<embedded_metadata> server;
  http_metadata client;
};

// A backend served on its own io_context and thread, as another process would.
template <class Backend = embedded_metadata>
struct served {
  explicit served(http_metadata_server_config config = {})
      : backend(io.get_executor()), server(io.get_executor(), backend, std::move(config)) {
    auto started = server.start();
    if (!started) throw std::runtime_error(started.error().message());
    runner = std::thread([this] { io.run(); });
  }
  served(const served&) = delete;
  ~served() {
    server.stop();
    io.stop();
    runner.join();
  }
  [[nodiscard]] std::uint16_t port() const { return server.endpoint().port(); }

  asio::io_context io;
  Backend backend;
  http_metadata_server<Backend> server;
  std::thread runner;
};

struct server_thread_env {
  using backend_type = http_metadata;
  explicit server_thread_env(asio::io_context& io) : client(io.get_executor(), client_config(remote.port())) {}
  backend_type& backend() { return client; }
  served<> remote;
  http_metadata client;
};

}  // namespace

KVX_METADATA_CONFORMANCE(HttpSameIo, same_io_env);
KVX_METADATA_CONFORMANCE(HttpServerThread, server_thread_env);

namespace {

// A backend that counts the calls it gets.
struct counting_backend {
  using metadata_backend_concept = kvx::transfer::metadata_backend_tag;
  explicit counting_backend(asio::any_io_executor ex) : inner(std::move(ex)) {}
  auto get_executor() const { return inner.get_executor(); }
  template <class Token>
  auto async_put(std::string k, std::string v, Token&& t) {
    ++calls;
    return inner.async_put(std::move(k), std::move(v), std::forward<Token>(t));
  }
  template <class Token>
  auto async_get(std::string k, Token&& t) {
    ++calls;
    return inner.async_get(std::move(k), std::forward<Token>(t));
  }
  template <class Token>
  auto async_remove(std::string k, Token&& t) {
    ++calls;
    return inner.async_remove(std::move(k), std::forward<Token>(t));
  }
  template <class Token>
  auto async_list(std::string p, Token&& t) {
    ++calls;
    return inner.async_list(std::move(p), std::forward<Token>(t));
  }
  std::atomic<int> calls{0};
  embedded_metadata inner;
};

// A backend whose every call fails with errc::io_error.
struct failing_backend {
  using metadata_backend_concept = kvx::transfer::metadata_backend_tag;
  explicit failing_backend(asio::any_io_executor e) : ex(std::move(e)) {}
  asio::any_io_executor get_executor() const { return ex; }
  template <class Token>
  auto async_put(std::string, std::string, Token&& t) {
    return asio::async_initiate<Token, void(std::error_code)>(
        [this](auto h) { kvx::detail::post_completion(ex, std::move(h), make_error_code(kvx::errc::io_error)); }, t);
  }
  template <class Token>
  auto async_get(std::string, Token&& t) {
    return asio::async_initiate<Token, void(std::error_code, std::string)>(
        [this](auto h) { kvx::detail::post_completion(ex, std::move(h), make_error_code(kvx::errc::io_error), std::string{}); },
        t);
  }
  template <class Token>
  auto async_remove(std::string, Token&& t) {
    return async_put("", "", std::forward<Token>(t));
  }
  template <class Token>
  auto async_list(std::string, Token&& t) {
    return asio::async_initiate<Token, void(std::error_code, metadata_entries)>(
        [this](auto h) {
          kvx::detail::post_completion(ex, std::move(h), make_error_code(kvx::errc::io_error), metadata_entries{});
        },
        t);
  }
  asio::any_io_executor ex;
};

static_assert(kvx::transfer::check_metadata_backend<counting_backend>());
static_assert(kvx::transfer::check_metadata_backend<failing_backend>());

// Sends raw bytes to 127.0.0.1:port and returns all it answers until it
// closes (or 3 s pass).
std::string raw_exchange(std::uint16_t port, const std::string& request) {
  asio::io_context io;
  tcp::socket socket(io);
  std::string answer;
  asio::co_spawn(
      io,
      [&]() -> asio::awaitable<void> {
        auto [cec] = co_await socket.async_connect({asio::ip::make_address("127.0.0.1"), port}, use_tuple);
        if (cec) co_return;
        auto [wec, wn] = co_await asio::async_write(socket, asio::buffer(request), use_tuple);
        (void)wn;
        char buf[4096];
        for (;;) {
          auto [rec, n] = co_await socket.async_read_some(asio::buffer(buf), use_tuple);
          if (rec) co_return;
          answer.append(buf, n);
        }
      },
      asio::detached);
  io.run_for(3s);
  return answer;
}

std::string status_line(const std::string& answer) { return answer.substr(0, answer.find("\r\n")); }

// Answers every request with `answer` (nothing when empty: it holds the
// connection open and never replies).
class canned_server {
 public:
  explicit canned_server(std::string answer) : answer_(std::move(answer)) {
    asio::co_spawn(io_, accept_loop(), asio::detached);
    runner_ = std::thread([this] { io_.run(); });
  }
  ~canned_server() {
    io_.stop();
    runner_.join();
  }
  [[nodiscard]] std::uint16_t port() const { return acceptor_.local_endpoint().port(); }

 private:
  asio::awaitable<void> accept_loop() {
    for (;;) {
      auto [ec, socket] = co_await acceptor_.async_accept(use_tuple);
      if (ec) co_return;
      asio::co_spawn(io_, reply(std::move(socket)), asio::detached);
    }
  }
  asio::awaitable<void> reply(tcp::socket socket) {
    std::string request;
    auto [rec, n] = co_await asio::async_read_until(socket, asio::dynamic_buffer(request), "\r\n\r\n", use_tuple);
    (void)n;
    if (rec) co_return;
    if (answer_.empty()) {
      asio::steady_timer forever(io_, 1h);
      co_await forever.async_wait(use_tuple);
      co_return;
    }
    co_await asio::async_write(socket, asio::buffer(answer_), use_tuple);
    boost::system::error_code ignored;
    socket.shutdown(tcp::socket::shutdown_both, ignored);
  }

  std::string answer_;
  asio::io_context io_;
  tcp::acceptor acceptor_{io_, {asio::ip::make_address("127.0.0.1"), 0}};
  std::thread runner_;
};

std::error_code put(asio::io_context& io, http_metadata& m, const std::string& k, const std::string& v) {
  return std::get<0>(run_op(io, [&](auto h) { m.async_put(k, v, std::move(h)); }));
}
std::tuple<std::error_code, std::string> get(asio::io_context& io, http_metadata& m, const std::string& k) {
  return run_op<std::string>(io, [&](auto h) { m.async_get(k, std::move(h)); });
}
std::error_code remove(asio::io_context& io, http_metadata& m, const std::string& k) {
  return std::get<0>(run_op(io, [&](auto h) { m.async_remove(k, std::move(h)); }));
}
std::tuple<std::error_code, metadata_entries> list(asio::io_context& io, http_metadata& m, const std::string& p) {
  return run_op<metadata_entries>(io, [&](auto h) { m.async_list(p, std::move(h)); });
}

// Runs `io` for `d` (the client's pool and timers need turns).
void drive(asio::io_context& io, std::chrono::milliseconds d) {
  io.restart();
  io.run_for(d);
}

// --- wire format ------------------------------------------------------------

TEST(HttpMetadataProtocol, PercentEncodingRoundTripsEveryByteAndRejectsBadEscapes) {
  std::string all;
  for (int i = 0; i < 256; ++i) all.push_back(static_cast<char>(i));
  const auto encoded = kvx::transfer::detail::percent_encode(all);
  EXPECT_EQ(encoded.find_first_not_of("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~%"), std::string::npos);
  EXPECT_EQ(kvx::transfer::detail::percent_decode(encoded), all);
  EXPECT_EQ(kvx::transfer::detail::percent_encode("a/b c%"), "a%2Fb%20c%25");
  EXPECT_EQ(kvx::transfer::detail::percent_decode("a+b%2fc"), "a+b/c");
  for (const char* bad : {"%", "%4", "%zz", "abc%g1", "%%"}) EXPECT_FALSE(kvx::transfer::detail::percent_decode(bad)) << bad;
}

TEST(HttpMetadataProtocol, ListJsonRoundTripsEveryByteAndRejectsOtherShapes) {
  std::string all;
  for (int i = 0; i < 256; ++i) all.push_back(static_cast<char>(i));
  const metadata_entries entries{{"k\"\\", all}, {all, ""}, {"plain", "{\"json\": 1}"}};
  const auto text = kvx::transfer::detail::encode_entries_json(entries);
  EXPECT_NE(text.find(R"(["plain","{\"json\": 1}"])"), std::string::npos) << text;
  EXPECT_EQ(kvx::transfer::detail::decode_entries_json(text), entries);
  for (const char* bad : {"", "{}", "[1]", R"([["a"]])", R"([["a","b","c"]])", R"([["a",1]])", "[[\"\xe2\x82\xac\",\"v\"]]"})
    EXPECT_FALSE(kvx::transfer::detail::decode_entries_json(bad)) << bad;
}

// --- configuration ------------------------------------------------------------

TEST(HttpMetadataConfig, FromUrlReadsHostAndPort) {
  auto c = http_metadata_config::from_url("http://127.0.0.1:8080");
  ASSERT_TRUE(c) << c.error().message();
  EXPECT_EQ(c->host, "127.0.0.1");
  EXPECT_EQ(c->port, 8080);
  EXPECT_EQ(c->timeout, 2s);
  EXPECT_EQ(c->pool_size, 4u);
  c = http_metadata_config::from_url("HTTP://[::1]:9/");
  ASSERT_TRUE(c) << c.error().message();
  EXPECT_EQ(c->host, "::1");
  EXPECT_EQ(c->port, 9);
  c = http_metadata_config::from_url("http://localhost:65535");
  ASSERT_TRUE(c);
  EXPECT_EQ(c->host, "localhost");
}

TEST(HttpMetadataConfig, FromUrlErrorsSayWhatIsWrong) {
  auto why = [](std::string_view url) {
    auto c = http_metadata_config::from_url(url);
    return c ? std::string("no error") : c.error().message();
  };
  EXPECT_NE(why("127.0.0.1:80").find("must start with http://"), std::string::npos) << why("127.0.0.1:80");
  EXPECT_NE(why("https://h:1").find("https is not supported"), std::string::npos);
  EXPECT_NE(why("ftp://h:1").find("scheme 'ftp'"), std::string::npos);
  EXPECT_NE(why("http://h").find("has no port"), std::string::npos);
  EXPECT_NE(why("http://h:http").find("port 'http' is not a number"), std::string::npos);
  EXPECT_NE(why("http://h:70000").find("port '70000'"), std::string::npos);
  EXPECT_NE(why("http://h:0").find("port '0'"), std::string::npos);
  EXPECT_NE(why("http://:80").find("has no host"), std::string::npos);
  EXPECT_NE(why("http://h:80/kvx/v1").find("has a path"), std::string::npos);
  EXPECT_NE(why("http://[::1:80").find("unterminated"), std::string::npos);
  EXPECT_NE(why("http://h:1").find("no error"), std::string::npos);
  EXPECT_NE(why("http://nowhere").find("metadata URL 'http://nowhere'"), std::string::npos) << why("http://nowhere");
  EXPECT_EQ(http_metadata_config::from_url("http://h").code(), kvx::errc::invalid_argument);
}

TEST(HttpMetadata, FromUrlBuildsAClientAndBadConfigsThrow) {
  asio::io_context io;
  auto m = http_metadata::from_url(io.get_executor(), "http://127.0.0.1:4321");
  ASSERT_TRUE(m) << m.error().message();
  EXPECT_EQ(m->server(), "http://127.0.0.1:4321");
  EXPECT_FALSE(http_metadata::from_url(io.get_executor(), "http://127.0.0.1"));
  http_metadata_config no_port;
  EXPECT_THROW(http_metadata(io.get_executor(), no_port), std::invalid_argument);
  auto no_pool = client_config(1);
  no_pool.pool_size = 0;
  EXPECT_THROW(http_metadata(io.get_executor(), no_pool), std::invalid_argument);
  // -1 ms read as "no deadline" (a silent server blocked for good); max()
  // wrapped to a deadline in the past (every operation timed out at once).
  for (const auto t : {-1ms, std::chrono::milliseconds::max(), std::chrono::milliseconds(std::chrono::hours(25))}) {
    try {
      http_metadata(io.get_executor(), client_config(1, t));
      ADD_FAILURE() << t.count() << " ms was accepted";
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find("'timeout' is " + std::to_string(t.count()) + " ms"), std::string::npos) << e.what();
    }
  }
  EXPECT_NO_THROW(http_metadata(io.get_executor(), client_config(1, std::chrono::hours(24))));
  EXPECT_NO_THROW(http_metadata(io.get_executor(), client_config(1, 0ms)));
}

TEST(HttpMetadataServer, StartErrorsAreClear) {
  asio::io_context io;
  embedded_metadata meta(io.get_executor());
  http_metadata_server<embedded_metadata> first(io.get_executor(), meta);
  ASSERT_TRUE(first.start());
  const auto port = first.endpoint().port();
  EXPECT_NE(port, 0);
  EXPECT_EQ(first.url(), "http://127.0.0.1:" + std::to_string(port));
  auto again = first.start();
  ASSERT_FALSE(again);
  EXPECT_NE(again.error().message().find("already started"), std::string::npos) << again.error().message();

  http_metadata_server_config same_port;
  same_port.port = port;
  http_metadata_server<embedded_metadata> second(io.get_executor(), meta, same_port);
  auto clash = second.start();
  ASSERT_FALSE(clash);
  EXPECT_NE(clash.error().message().find("cannot listen on 127.0.0.1:" + std::to_string(port)), std::string::npos)
      << clash.error().message();

  http_metadata_server_config nowhere;
  nowhere.address = "nowhere";
  http_metadata_server<embedded_metadata> third(io.get_executor(), meta, nowhere);
  auto bad = third.start();
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.code(), kvx::errc::invalid_argument);
  EXPECT_NE(bad.error().message().find("'address': 'nowhere'"), std::string::npos) << bad.error().message();

  http_metadata_server_config negative;
  negative.idle_timeout = -1ms;
  http_metadata_server<embedded_metadata> fourth(io.get_executor(), meta, negative);
  auto refused = fourth.start();
  ASSERT_FALSE(refused) << "a negative idle_timeout closes every connection before its first request";
  EXPECT_EQ(refused.code(), kvx::errc::invalid_argument);
  EXPECT_NE(refused.error().message().find("'idle_timeout'"), std::string::npos) << refused.error().message();

  http_metadata_server_config huge;
  huge.idle_timeout = std::chrono::milliseconds::max();  // wrapped to -1 ms: every connection closed unanswered
  http_metadata_server<embedded_metadata> fifth(io.get_executor(), meta, huge);
  auto too_long = fifth.start();
  ASSERT_FALSE(too_long);
  EXPECT_EQ(too_long.code(), kvx::errc::invalid_argument);
  EXPECT_NE(too_long.error().message().find("is longer than 86400000 ms"), std::string::npos) << too_long.error().message();

  first.stop();
  auto restarted = first.start();
  ASSERT_FALSE(restarted);
  EXPECT_NE(restarted.error().message().find("stopped"), std::string::npos);
}

// --- the server refuses what it cannot serve -----------------------------------

TEST(HttpMetadataServer, RefusesBadRequestsWithoutTouchingTheBackend) {
  served<counting_backend> s;
  struct refused_case {
    std::string request;
    std::string status;
    std::string reason;
  };
  const std::vector<refused_case> cases{
      {"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", "HTTP/1.1 404 Not Found", "no such route"},
      {"GET /kvx/v1/keysx HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", "HTTP/1.1 404 Not Found", "no such route"},
      {"POST /kvx/v1/keys/a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nConnection: close\r\n\r\nv",
       "HTTP/1.1 405 Method Not Allowed", "POST is not allowed"},
      {"PUT /kvx/v1/list HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
       "HTTP/1.1 405 Method Not Allowed", "allowed: GET"},
      {"GET /kvx/v1/keys/a%zz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", "HTTP/1.1 400 Bad Request",
       "bad percent-encoding in the key"},
      {"GET /kvx/v1/keys/a%4 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", "HTTP/1.1 400 Bad Request",
       "bad percent-encoding"},
      {"GET /kvx/v1/keys/a?b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", "HTTP/1.1 400 Bad Request", "no query"},
      {"GET /kvx/v1/list?prefix=%G0 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", "HTTP/1.1 400 Bad Request",
       "bad percent-encoding in the prefix"},
      {"GET /kvx/v1/list?colour=red HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", "HTTP/1.1 400 Bad Request",
       "unknown query parameter 'colour'"},
      {"HELLO\r\n\r\n", "HTTP/1.1 400 Bad Request", "malformed HTTP request"},
      {"GET / HTTP/9.9\r\n\r\n", "HTTP/1.1 400 Bad Request", "malformed HTTP request"},
      {"PUT /kvx/v1/keys/a HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n",
       "HTTP/1.1 400 Bad Request", "malformed HTTP request"},
      {"GET /kvx/v1/keys/a HTTP/1.1\r\nHost: x\r\nX-Big: " + std::string(70 * 1024, 'x') + "\r\n\r\n",
       "HTTP/1.1 431 Request Header Fields Too Large", "headers above"},
  };
  for (const auto& c : cases) {
    const auto answer = raw_exchange(s.port(), c.request);
    EXPECT_EQ(status_line(answer), c.status) << c.request.substr(0, 80) << "\n" << answer;
    EXPECT_NE(answer.find(c.reason), std::string::npos) << c.request.substr(0, 80) << "\n" << answer;
    EXPECT_NE(answer.find("kvx-error: "), std::string::npos) << answer;
  }
  EXPECT_EQ(s.backend.calls.load(), 0);
  // ... and it still serves.
  const auto ok = raw_exchange(s.port(), "PUT /kvx/v1/keys/a HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi");
  EXPECT_EQ(status_line(ok), "HTTP/1.1 204 No Content") << ok;
  EXPECT_EQ(s.backend.calls.load(), 1);
}

// A stand-in server that refuses every request on its headers, as a kvx
// server does a body above its max_body, and counts the body bytes the
// client sent anyway within 300 ms.
struct refusing_listener {
  asio::io_context io;
  tcp::acceptor acceptor{io, {asio::ip::make_address("127.0.0.1"), 0}};
  std::atomic<std::size_t> body_bytes{0};
  std::thread runner;
  refusing_listener() {
    asio::co_spawn(
        io,
        [this]() -> asio::awaitable<void> {
          auto accepted = co_await acceptor.async_accept(use_tuple);
          if (std::get<0>(accepted)) co_return;
          tcp::socket& socket = std::get<1>(accepted);
          std::string got;
          char buf[65536];
          while (got.find("\r\n\r\n") == std::string::npos) {
            auto [rec, n] = co_await socket.async_read_some(asio::buffer(buf), use_tuple);
            if (rec) co_return;
            got.append(buf, n);
          }
          body_bytes += got.size() - (got.find("\r\n\r\n") + 4);
          asio::steady_timer quiet(io, 300ms);
          quiet.async_wait([&socket](boost::system::error_code) { socket.cancel(); });
          for (;;) {
            auto [rec, n] = co_await socket.async_read_some(asio::buffer(buf), use_tuple);
            if (rec) break;
            body_bytes += n;
          }
          const std::string refusal =
              "HTTP/1.1 413 Payload Too Large\r\nkvx-error: capacity_exceeded\r\nContent-Length: 0\r\n"
              "Connection: close\r\n\r\n";
          auto [wec, wn] = co_await asio::async_write(socket, asio::buffer(refusal), use_tuple);
          (void)wec, (void)wn;
        },
        asio::detached);
    runner = std::thread([this] { io.run_for(10s); });
  }
  ~refusing_listener() {
    io.stop();
    runner.join();
  }
  std::uint16_t port() const { return acceptor.local_endpoint().port(); }
};

TEST(HttpMetadataServer, AnOversizedPutIsRefusedOnItsHeadersWithoutItsBodyBeingSent) {
  // A client that sends its body at once loses the refusal when the body
  // takes longer than the server's drain (min(idle_timeout, 2 s)) to send:
  // the server closes with bytes unread and the client sees a reset. Above
  // expect_continue_above (64 KiB) the client asks first (Expect:
  // 100-continue) and a refused body is never sent.
  {
    refusing_listener stand_in;
    asio::io_context io;
    http_metadata client(io.get_executor(), client_config(stand_in.port()));
    EXPECT_EQ(put(io, client, "huge", std::string(8 << 20, 'x')), kvx::errc::capacity_exceeded);
    EXPECT_EQ(stand_in.body_bytes.load(), 0u) << "the client sent its body before the server asked for it";
  }
  {
    // The check fails without it: the same client told never to ask sends the body.
    refusing_listener stand_in;
    asio::io_context io;
    auto eager = client_config(stand_in.port());
    eager.expect_continue_above = 0;
    http_metadata client(io.get_executor(), eager);
    (void)put(io, client, "huge", std::string(8 << 20, 'x'));
    EXPECT_GT(stand_in.body_bytes.load(), 0u);
  }
  // The kvx server refuses on the headers, without 100 Continue...
  http_metadata_server_config config;
  config.max_body = 1 << 20;
  served<counting_backend> s(config);
  const auto answer = raw_exchange(s.port(), "PUT /kvx/v1/keys/k HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n"
                                             "Expect: 100-continue\r\n\r\n");
  EXPECT_EQ(status_line(answer), "HTTP/1.1 413 Payload Too Large") << answer;
  EXPECT_EQ(answer.find("100 Continue"), std::string::npos) << answer;
  asio::io_context io;
  http_metadata client(io.get_executor(), client_config(s.port()));
  EXPECT_EQ(put(io, client, "huge", std::string(64 << 20, 'x')), kvx::errc::capacity_exceeded);
  EXPECT_EQ(s.backend.calls.load(), 0);
  // ... and a body under its limit but above the threshold goes through the
  // 100 Continue exchange and is stored; the connection serves on.
  EXPECT_FALSE(put(io, client, "big", std::string(512 << 10, 'y')));
  auto [ec, v] = get(io, client, "big");
  ASSERT_FALSE(ec) << ec.message();
  EXPECT_EQ(v, std::string(512 << 10, 'y'));
}

TEST(HttpMetadataServer, OversizedPutIsRefusedWith413AndNothingIsStored) {
  http_metadata_server_config config;
  config.max_body = 1000;
  served<> s(config);
  asio::io_context io;
  http_metadata client(io.get_executor(), client_config(s.port()));

  EXPECT_EQ(put(io, client, "big", std::string(1001, 'x')), kvx::errc::capacity_exceeded);
  // A body far above the limit: the client still reads the refusal rather than a reset.
  EXPECT_EQ(put(io, client, "big", std::string(4 << 20, 'x')), kvx::errc::capacity_exceeded);
  const auto answer = raw_exchange(
      s.port(), "PUT /kvx/v1/keys/big HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n" + std::string(2000, 'y'));
  EXPECT_EQ(status_line(answer), "HTTP/1.1 413 Payload Too Large") << answer;
  EXPECT_NE(answer.find("kvx-error: capacity_exceeded"), std::string::npos) << answer;
  EXPECT_NE(answer.find("max_body"), std::string::npos) << answer;
  EXPECT_EQ(std::get<0>(get(io, client, "big")), kvx::errc::not_found);

  EXPECT_FALSE(put(io, client, "big", std::string(1000, 'x')));  // the limit itself is allowed
  auto [ec, v] = get(io, client, "big");
  ASSERT_FALSE(ec) << ec.message();
  EXPECT_EQ(v.size(), 1000u);
}

TEST(HttpMetadataServer, BackendErrorsAre5xxCarryingTheMessage) {
  served<failing_backend> s;
  const auto answer = raw_exchange(s.port(), "GET /kvx/v1/keys/k HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
  EXPECT_EQ(status_line(answer), "HTTP/1.1 500 Internal Server Error") << answer;
  EXPECT_NE(answer.find("kvx-error: io_error"), std::string::npos) << answer;
  EXPECT_NE(answer.find("metadata backend: I/O error"), std::string::npos) << answer;

  asio::io_context io;
  http_metadata client(io.get_executor(), client_config(s.port()));
  EXPECT_EQ(put(io, client, "k", "v"), kvx::errc::io_error);
  EXPECT_EQ(std::get<0>(get(io, client, "k")), kvx::errc::io_error);
  EXPECT_EQ(remove(io, client, "k"), kvx::errc::io_error);
  EXPECT_EQ(std::get<0>(list(io, client, "")), kvx::errc::io_error);
}

// --- keys ------------------------------------------------------------------------

TEST(HttpMetadata, AwkwardKeysRoundTrip) {
  served<> s;
  asio::io_context io;
  http_metadata client(io.get_executor(), client_config(s.port()));
  const std::vector<std::string> keys{"odd/a/b",          "odd/with space",    "odd/100%",        "odd/%41",
                                      "odd/caf\xc3\xa9",  std::string("odd/\xff\x00z", 7), "odd/?x=1&y#z", "odd/+plus",
                                      "odd/..",           "odd/"};
  for (const auto& k : keys) ASSERT_FALSE(put(io, client, k, "v:" + k)) << kvx::transfer::detail::printable(k);
  for (const auto& k : keys) {
    auto [ec, v] = get(io, client, k);
    ASSERT_FALSE(ec) << ec.message();
    EXPECT_EQ(v, "v:" + k);
  }
  auto [lec, entries] = list(io, client, "odd/");
  ASSERT_FALSE(lec) << lec.message();
  ASSERT_EQ(entries.size(), keys.size());
  for (const auto& [k, v] : entries) EXPECT_EQ(v, "v:" + k);
  auto [pec, one] = list(io, client, "odd/caf\xc3");
  ASSERT_FALSE(pec);
  ASSERT_EQ(one.size(), 1u);
  EXPECT_EQ(one[0].first, "odd/caf\xc3\xa9");

  // What curl users type: a literal '/' in the path is part of the key, and
  // "%41" on the wire is the key "A" while the key "%41" is sent as "%2541".
  auto answer = raw_exchange(s.port(), "GET /kvx/v1/keys/odd/a/b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
  EXPECT_EQ(status_line(answer), "HTTP/1.1 200 OK") << answer;
  EXPECT_TRUE(answer.ends_with("\r\n\r\nv:odd/a/b")) << answer;
  answer = raw_exchange(s.port(), "GET /kvx/v1/keys/odd%2F%2541 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
  EXPECT_TRUE(answer.ends_with("\r\n\r\nv:odd/%41")) << answer;
  answer = raw_exchange(s.port(), "GET /kvx/v1/list?prefix=odd%2Fcaf HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
  EXPECT_TRUE(answer.ends_with("\r\n\r\n[[\"odd/caf\xc3\x83\xc2\xa9\",\"v:odd/caf\xc3\x83\xc2\xa9\"]]")) << answer;

  for (const auto& k : keys) EXPECT_FALSE(remove(io, client, k));
  EXPECT_EQ(remove(io, client, keys[0]), kvx::errc::not_found);
  EXPECT_TRUE(std::get<1>(list(io, client, "odd/")).empty());
}

TEST(HttpMetadataServer, AnswersExpect100ContinueAndServesKeepAliveRequestsInTurn) {
  served<> s;
  const std::string body(2000, 'b');
  auto answer = raw_exchange(s.port(), "PUT /kvx/v1/keys/curl HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2000\r\n"
                                       "Connection: close\r\n\r\n" + body);
  EXPECT_TRUE(answer.starts_with("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n")) << answer;
  // Two requests on one connection, answered in order.
  answer = raw_exchange(s.port(), "GET /kvx/v1/keys/curl HTTP/1.1\r\nHost: x\r\n\r\n"
                                  "GET /kvx/v1/keys/absent HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
  const auto second = answer.find("HTTP/1.1 404 Not Found");
  EXPECT_TRUE(answer.starts_with("HTTP/1.1 200 OK")) << answer;
  ASSERT_NE(second, std::string::npos) << answer;
  EXPECT_NE(answer.substr(0, second).find(body), std::string::npos);
  EXPECT_NE(answer.find("kvx-error: not_found", second), std::string::npos) << answer;
  EXPECT_EQ(s.server.connections_accepted(), 2u);
}

// --- failures ---------------------------------------------------------------------

TEST(HttpMetadata, AStoppedServerIsAnErrorNotAHang) {
  auto s = std::make_unique<served<>>();
  asio::io_context io;
  http_metadata client(io.get_executor(), client_config(s->port(), 5s));
  ASSERT_FALSE(put(io, client, "k", "v"));
  s->server.stop();
  std::this_thread::sleep_for(50ms);  // the listener closes on the server's thread

  const auto t0 = std::chrono::steady_clock::now();
  auto [ec, v] = get(io, client, "k");
  EXPECT_TRUE(ec == kvx::errc::unreachable || ec == kvx::errc::connection_lost) << ec.message();
  s.reset();
  auto [ec2, v2] = get(io, client, "k");
  EXPECT_EQ(ec2, kvx::errc::unreachable) << ec2.message();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 2s);
}

TEST(HttpMetadata, ASilentServerTimesOutPerRequest) {
  asio::io_context listener_io;
  tcp::acceptor silent(listener_io, {asio::ip::make_address("127.0.0.1"), 0});  // listens, never accepts
  asio::io_context io;
  http_metadata client(io.get_executor(), client_config(silent.local_endpoint().port(), 300ms));
  const auto t0 = std::chrono::steady_clock::now();
  auto [ec, v] = get(io, client, "k");
  const auto took = std::chrono::steady_clock::now() - t0;
  EXPECT_EQ(ec, kvx::errc::timed_out) << ec.message();
  EXPECT_GE(took, 250ms);
  EXPECT_LT(took, 2s);
}

TEST(HttpMetadata, OperationsQueuedForAConnectionShareTheirDeadline) {
  canned_server silent("");  // accepts, reads, never answers
  asio::io_context io;
  auto config = client_config(silent.port(), 300ms);
  config.pool_size = 1;
  http_metadata client(io.get_executor(), config);
  std::vector<std::error_code> results;
  for (int i = 0; i < 4; ++i) client.async_get("k", [&](std::error_code ec, std::string) { results.push_back(ec); });
  const auto t0 = std::chrono::steady_clock::now();
  while (results.size() < 4 && std::chrono::steady_clock::now() - t0 < 5s) io.run_one_for(100ms);
  const auto took = std::chrono::steady_clock::now() - t0;
  ASSERT_EQ(results.size(), 4u);
  for (auto ec : results) EXPECT_EQ(ec, kvx::errc::timed_out) << ec.message();
  EXPECT_LT(took, 1500ms);  // not one timeout after another
}

TEST(HttpMetadata, TheCallersDeadlineCancelsARequest) {
  canned_server silent("");
  asio::io_context io;
  http_metadata client(io.get_executor(), client_config(silent.port(), 30s));
  const auto t0 = std::chrono::steady_clock::now();
  auto [ec, v] = run_op<std::string>(io, [&](auto h) { client.async_get("k", std::move(h)); }, 200ms);
  EXPECT_EQ(ec, kvx::errc::timed_out) << ec.message();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 2s);
  // The pool slot came back: the next operation is not stuck behind it.
  auto [ec2, v2] = run_op<std::string>(io, [&](auto h) { client.async_get("k", std::move(h)); }, 200ms);
  EXPECT_EQ(ec2, kvx::errc::timed_out) << ec2.message();
}

TEST(HttpMetadata, ACancelThatArrivesWhileTheNameIsResolvedOrBetweenStepsIsNotLost) {
  // The resolver ignores cancellation slots, and a cancel between two steps
  // reached no operation: the request then ran on to its 30 s timeout.
  canned_server silent("");
  asio::io_context io;
  auto config = client_config(silent.port(), 30s);
  config.host = "localhost";  // resolved per connection
  http_metadata client(io.get_executor(), config);
  std::list<asio::cancellation_signal> signals;  // each outlives its operation, even when a check fails
  for (int polls = 0; polls < 12; ++polls) {
    auto& sig = signals.emplace_back();
    auto got = std::make_shared<std::optional<std::error_code>>();
    client.async_get("k", asio::bind_cancellation_slot(sig.slot(), [got](std::error_code ec, std::string) { *got = ec; }));
    io.restart();
    for (int i = 0; i < polls; ++i) io.poll_one();
    sig.emit(asio::cancellation_type::terminal);
    for (const auto until = std::chrono::steady_clock::now() + 3s; !*got && std::chrono::steady_clock::now() < until;) io.run_one_for(50ms);
    ASSERT_TRUE(*got) << "a cancel after " << polls << " polls was lost";
    EXPECT_EQ(**got, kvx::errc::cancelled) << polls << " polls: " << (*got)->message();
  }
}

TEST(HttpMetadata, GarbageAnswersAreMalformedAndForeignRefusalsAProtocolError) {
  {
    canned_server garbage("SPROING\r\n\r\n");
    asio::io_context io;
    http_metadata client(io.get_executor(), client_config(garbage.port()));
    EXPECT_EQ(std::get<0>(get(io, client, "k")), kvx::errc::malformed_message);
    EXPECT_EQ(put(io, client, "k", "v"), kvx::errc::malformed_message);
  }
  {
    canned_server not_json("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello");
    asio::io_context io;
    http_metadata client(io.get_executor(), client_config(not_json.port()));
    EXPECT_EQ(std::get<0>(list(io, client, "")), kvx::errc::malformed_message);
  }
  {
    canned_server truncated("HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nhello");
    asio::io_context io;
    http_metadata client(io.get_executor(), client_config(truncated.port()));
    EXPECT_EQ(std::get<0>(get(io, client, "k")), kvx::errc::connection_lost);
  }
  {
    canned_server foreign("HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot here\n");
    asio::io_context io;
    http_metadata client(io.get_executor(), client_config(foreign.port()));
    EXPECT_EQ(std::get<0>(get(io, client, "k")), kvx::errc::protocol_error);
  }
}

TEST(HttpMetadata, ReusesConnectionsAndReconnectsWhenTheServerClosedThem) {
  http_metadata_server_config config;
  config.idle_timeout = 150ms;
  served<> s(config);
  asio::io_context io;
  http_metadata client(io.get_executor(), client_config(s.port()));
  ASSERT_FALSE(put(io, client, "k", "v"));
  ASSERT_FALSE(std::get<0>(get(io, client, "k")));
  EXPECT_EQ(s.server.connections_accepted(), 1u);
  std::this_thread::sleep_for(400ms);  // the server drops the idle connection
  drive(io, 20ms);
  auto [ec, v] = get(io, client, "k");
  ASSERT_FALSE(ec) << ec.message();
  EXPECT_EQ(v, "v");
  EXPECT_EQ(s.server.connections_accepted(), 2u);
}

TEST(HttpMetadata, AfterTheServerClosedSeveralIdleConnectionsTheRetryOpensAFreshOne) {
  // The retry of an operation whose pooled connection was closed took the
  // next pooled one, closed as idle at the same time: connection_lost with
  // the server up.
  http_metadata_server_config config;
  config.idle_timeout = 150ms;
  served<> s(config);
  asio::io_context io;
  http_metadata client(io.get_executor(), client_config(s.port()));
  int done = 0;
  std::error_code first, second;
  client.async_put("a", "1", [&](std::error_code ec) { first = ec, ++done; });
  client.async_put("b", "2", [&](std::error_code ec) { second = ec, ++done; });
  io.restart();
  while (done < 2 && io.run_one_for(5s) > 0) {
  }
  ASSERT_EQ(done, 2);
  ASSERT_FALSE(first) << first.message();
  ASSERT_FALSE(second) << second.message();
  ASSERT_EQ(s.server.connections_accepted(), 2u) << "two operations at once: two pooled connections";
  std::this_thread::sleep_for(400ms);  // the server drops both idle connections
  drive(io, 20ms);
  auto [ec, v] = get(io, client, "a");
  ASSERT_FALSE(ec) << ec.message();
  EXPECT_EQ(v, "1");
  EXPECT_EQ(s.server.connections_accepted(), 3u);
}

TEST(HttpMetadata, AZeroIdleTimeoutKeepsConnectionsOpen) {
  http_metadata_server_config config;
  config.idle_timeout = 0ms;  // as the client's timeout: 0 = none
  served<> s(config);
  asio::io_context io;
  http_metadata client(io.get_executor(), client_config(s.port()));
  auto stored = put(io, client, "k", "v");
  ASSERT_FALSE(stored) << stored.message();
  std::this_thread::sleep_for(50ms);
  auto [ec, v] = get(io, client, "k");
  ASSERT_FALSE(ec) << ec.message();
  EXPECT_EQ(v, "v");
  EXPECT_EQ(s.server.connections_accepted(), 1u) << "the idle connection was closed";
}

TEST(HttpMetadata, ReconnectsToARestartedServer) {
  auto s = std::make_unique<served<>>();
  const auto port = s->port();
  asio::io_context io;
  http_metadata client(io.get_executor(), client_config(port));
  ASSERT_FALSE(put(io, client, "k", "v"));
  s.reset();
  http_metadata_server_config same_port;
  same_port.port = port;
  s = std::make_unique<served<>>(same_port);
  EXPECT_EQ(std::get<0>(get(io, client, "k")), kvx::errc::not_found);  // a new, empty backend
  EXPECT_FALSE(put(io, client, "k", "w"));
  EXPECT_EQ(std::get<1>(get(io, client, "k")), "w");
}

// --- load -------------------------------------------------------------------------

TEST(HttpMetadata, ManyOperationsFromSeveralThreadsOverABoundedPool) {
  served<> s;
  asio::io_context io;
  auto guard = asio::make_work_guard(io);
  std::vector<std::thread> runners;
  for (int i = 0; i < 3; ++i) runners.emplace_back([&] { io.run(); });
  auto config = client_config(s.port(), 10s);
  config.pool_size = 3;
  http_metadata client(io.get_executor(), config);

  constexpr int threads = 4, per_thread = 150;
  std::atomic<int> done{0}, failed{0}, matched{0};
  auto wait_for = [&](int n) {
    const auto give_up = std::chrono::steady_clock::now() + 20s;
    while (done.load() < n && std::chrono::steady_clock::now() < give_up) std::this_thread::sleep_for(5ms);
  };
  std::vector<std::thread> starters;
  for (int t = 0; t < threads; ++t)
    starters.emplace_back([&, t] {
      for (int i = 0; i < per_thread; ++i)
        client.async_put("load/" + std::to_string(t) + "/" + std::to_string(i), std::to_string(t * 1000 + i),
                         [&](std::error_code ec) {
                           if (ec) ++failed;
                           ++done;
                         });
    });
  for (auto& th : starters) th.join();
  starters.clear();
  wait_for(threads * per_thread);
  ASSERT_EQ(done.load(), threads * per_thread);
  EXPECT_EQ(failed.load(), 0);

  done = 0;
  for (int t = 0; t < threads; ++t)
    starters.emplace_back([&, t] {
      for (int i = 0; i < per_thread; ++i) {
        const auto key = "load/" + std::to_string(t) + "/" + std::to_string(i);
        if (i % 3 == 0) {
          client.async_list("load/" + std::to_string(t) + "/", [&](std::error_code ec, metadata_entries e) {
            if (ec || e.size() != static_cast<std::size_t>(per_thread)) ++failed;
            ++done;
          });
        } else {
          client.async_get(key, [&, want = std::to_string(t * 1000 + i)](std::error_code ec, std::string v) {
            if (!ec && v == want) ++matched;
            if (ec) ++failed;
            ++done;
          });
        }
      }
    });
  for (auto& th : starters) th.join();
  wait_for(threads * per_thread);
  EXPECT_EQ(done.load(), threads * per_thread);
  EXPECT_EQ(failed.load(), 0);
  EXPECT_EQ(matched.load(), threads * (per_thread - per_thread / 3));
  EXPECT_LE(s.server.connections_accepted(), 3u);  // the pool bounds connections and reuses them

  guard.reset();
  io.stop();
  for (auto& r : runners) r.join();
}

}  // namespace
