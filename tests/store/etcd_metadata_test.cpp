#include <kvx/store/etcd_metadata.hpp>

#include <gtest/gtest.h>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/read_until.hpp>
#include <boost/asio/streambuf.hpp>
#include <boost/asio/write.hpp>

#include <atomic>
#include <chrono>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <string>
#include <thread>

#include <kvx/testing/metadata_conformance.hpp>

#include "support/accept_each.hpp"
#include "support/servers.hpp"

namespace {

namespace asio = boost::asio;
using namespace std::chrono_literals;
using kvx::testing::run_op;

using kvx::test::shared_etcd;

struct etcd_env {
  using backend_type = kvx::store::etcd_metadata;
  static void set_up_suite() {
    if (!shared_etcd()) shared_etcd() = kvx::test::etcd_server::start();
  }
  static void tear_down_suite() {}
  static std::string skip_reason() { return shared_etcd() ? "" : kvx::test::etcd_server::missing_reason(); }
  explicit etcd_env(asio::io_context& io) : meta(io.get_executor(), {.address = shared_etcd()->address(), .prefix = kvx::test::fresh_prefix("test")}) {}
  backend_type& backend() { return meta; }
  backend_type meta;
};

}  // namespace

KVX_METADATA_CONFORMANCE(Etcd, etcd_env);

namespace {

class EtcdMetadata : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { server_ = kvx::test::etcd_server::start(); }
  static void TearDownTestSuite() { server_.reset(); }
  void SetUp() override {
    if (!server_) GTEST_SKIP() << kvx::test::etcd_server::missing_reason();
    meta_ = std::make_unique<kvx::store::etcd_metadata>(
        io_.get_executor(), kvx::store::etcd_options{.address = server_->address(), .prefix = kvx::test::fresh_prefix("test"), .timeout = 3s});
  }
  std::error_code put(const std::string& k, const std::string& v) {
    return std::get<0>(run_op(io_, [&](auto h) { meta_->async_put(k, v, std::move(h)); }));
  }
  std::tuple<std::error_code, std::string> get(const std::string& k) {
    return run_op<std::string>(io_, [&](auto h) { meta_->async_get(k, std::move(h)); });
  }
  std::error_code acquire(const std::string& name, const std::string& owner, std::chrono::milliseconds ttl) {
    return std::get<0>(run_op(io_, [&](auto h) { meta_->async_acquire_lease(name, owner, ttl, std::move(h)); }));
  }
  std::error_code renew(const std::string& name, const std::string& owner) {
    return std::get<0>(run_op(io_, [&](auto h) { meta_->async_renew_lease(name, owner, 1s, std::move(h)); }));
  }
  std::error_code release(const std::string& name, const std::string& owner) {
    return std::get<0>(run_op(io_, [&](auto h) { meta_->async_release_lease(name, owner, std::move(h)); }));
  }
  std::tuple<std::error_code, kvx::store::etcd_lease_id> grant(std::chrono::milliseconds ttl) {
    return run_op<kvx::store::etcd_lease_id>(io_, [&](auto h) { meta_->async_grant_lease(ttl, std::move(h)); });
  }

  static inline std::unique_ptr<kvx::test::etcd_server> server_;
  asio::io_context io_;
  std::unique_ptr<kvx::store::etcd_metadata> meta_;
};

TEST_F(EtcdMetadata, CreateSucceedsOnlyWhenTheKeyIsAbsent) {
  auto [ec] = run_op(io_, [&](auto h) { meta_->async_create("only-once", "first", 0, std::move(h)); });
  EXPECT_FALSE(ec) << ec.message();
  std::tie(ec) = run_op(io_, [&](auto h) { meta_->async_create("only-once", "second", 0, std::move(h)); });
  EXPECT_EQ(ec, kvx::errc::already_exists);
  auto [gec, v] = get("only-once");
  EXPECT_EQ(v, "first");
}

TEST_F(EtcdMetadata, CompareAndSwapChecksTheCurrentValue) {
  auto cas = [&](std::optional<std::string> expected, std::string desired) {
    return std::get<0>(run_op(io_, [&](auto h) { meta_->async_compare_and_swap("cas", expected, desired, std::move(h)); }));
  };
  EXPECT_FALSE(cas(std::nullopt, "1")) << "absent -> created";
  EXPECT_EQ(cas(std::nullopt, "x"), kvx::errc::busy) << "no longer absent";
  EXPECT_EQ(cas("0", "2"), kvx::errc::busy);
  EXPECT_FALSE(cas("1", "2"));
  EXPECT_EQ(std::get<1>(get("cas")), "2");
}

TEST_F(EtcdMetadata, AKeyBoundToALeaseVanishesWhenTheLeaseIsRevoked) {
  auto [ec, granted] = grant(5s);
  ASSERT_FALSE(ec) << ec.message();
  const kvx::store::etcd_lease_id lease = granted;  // lambdas below capture it (clang 14: not a binding)
  std::tie(ec) = run_op(io_, [&](auto h) { meta_->async_put_with_lease("ephemeral", "x", lease, std::move(h)); });
  ASSERT_FALSE(ec) << ec.message();
  auto [eec, entry] = run_op<kvx::store::etcd_entry>(io_, [&](auto h) { meta_->async_get_entry("ephemeral", std::move(h)); });
  ASSERT_FALSE(eec);
  EXPECT_EQ(entry.lease, lease);
  EXPECT_EQ(entry.key, "ephemeral");
  EXPECT_GT(entry.create_revision, 0);
  auto [kec, ttl] = run_op<std::int64_t>(io_, [&](auto h) { meta_->async_keep_alive_lease(lease, std::move(h)); });
  EXPECT_FALSE(kec) << kec.message();
  EXPECT_GT(ttl, 0);
  std::tie(ec) = run_op(io_, [&](auto h) { meta_->async_revoke_lease(lease, std::move(h)); });
  EXPECT_FALSE(ec) << ec.message();
  EXPECT_EQ(std::get<0>(get("ephemeral")), kvx::errc::not_found);
  std::tie(kec, ttl) = run_op<std::int64_t>(io_, [&](auto h) { meta_->async_keep_alive_lease(lease, std::move(h)); });
  EXPECT_EQ(kec, kvx::errc::not_found);
  std::tie(ec) = run_op(io_, [&](auto h) { meta_->async_revoke_lease(lease, std::move(h)); });
  EXPECT_EQ(ec, kvx::errc::not_found);
}

TEST_F(EtcdMetadata, NamedLeasesAreExclusiveUntilReleased) {
  EXPECT_FALSE(acquire("master", "node-1", 5s));
  EXPECT_FALSE(acquire("master", "node-1", 5s)) << "re-acquiring one's own lease succeeds";
  EXPECT_EQ(acquire("master", "node-2", 5s), kvx::errc::busy);
  EXPECT_FALSE(renew("master", "node-1"));
  EXPECT_EQ(renew("master", "node-2"), kvx::errc::busy);
  auto [hec, who] = run_op<std::string>(io_, [&](auto h) { meta_->async_lease_holder("master", std::move(h)); });
  EXPECT_EQ(who, "node-1");
  EXPECT_EQ(release("master", "node-2"), kvx::errc::busy);
  EXPECT_FALSE(release("master", "node-1"));
  EXPECT_EQ(release("master", "node-1"), kvx::errc::not_found);
  EXPECT_EQ(renew("master", "node-1"), kvx::errc::not_found);
  EXPECT_FALSE(acquire("master", "node-2", 5s));
}

TEST_F(EtcdMetadata, ANamedLeaseExpiresWhenNotRenewed) {
  ASSERT_FALSE(acquire("short", "a", 1s));
  // etcd checks expiry about every 500 ms after the TTL: poll, bounded.
  std::error_code ec;
  const auto give_up = std::chrono::steady_clock::now() + 6s;
  do {
    std::this_thread::sleep_for(200ms);
    ec = acquire("short", "b", 5s);
  } while (ec == kvx::errc::busy && std::chrono::steady_clock::now() < give_up);
  EXPECT_FALSE(ec) << ec.message();
  EXPECT_EQ(renew("short", "a"), kvx::errc::busy);
}

TEST_F(EtcdMetadata, BadArgumentsAreRejected) {
  EXPECT_EQ(acquire("x", "a", 0ms), kvx::errc::invalid_argument);
  EXPECT_EQ(acquire("", "a", 1s), kvx::errc::invalid_argument);
  EXPECT_EQ(std::get<0>(grant(0ms)), kvx::errc::invalid_argument);
  auto [ec] = run_op(io_, [&](auto h) { meta_->async_put_with_lease("k", "v", 12345, std::move(h)); });
  EXPECT_EQ(ec, kvx::errc::not_found) << "no such lease: " << ec.message();
}

TEST_F(EtcdMetadata, AValueAboveTheServerLimitIsAnErrorNotAHang) {
  std::string huge(20 << 20, 'x');  // the test server allows 16 MiB requests
  auto [ec] = run_op(io_, [&](auto h) { meta_->async_put("huge", huge, std::move(h)); });
  EXPECT_TRUE(ec) << "a 20 MiB value must be refused";
  EXPECT_FALSE(put("small", "ok")) << "the backend still works afterwards";
}

TEST_F(EtcdMetadata, AnUnreachableServerIsAnErrorNotAHang) {
  kvx::store::etcd_metadata nowhere(io_.get_executor(),
                                    {.address = "127.0.0.1:" + std::to_string(kvx::test::free_loopback_port()), .prefix = {}});
  auto [ec] = run_op(io_, [&](auto h) { nowhere.async_put("k", "v", std::move(h)); });
  EXPECT_EQ(ec, kvx::errc::unreachable) << ec.message();
}

TEST_F(EtcdMetadata, AHungServerTimesOutWithinTheDeadline) {
  ASSERT_FALSE(put("before", "x"));
  server_->pause();
  auto [ec] = run_op(io_, [&](auto h) { meta_->async_put("during", "x", kvx::cancel_after(300ms, std::move(h))); });
  server_->resume();
  EXPECT_EQ(ec, kvx::errc::timed_out) << ec.message();
  EXPECT_FALSE(put("after", "x"));
}

TEST_F(EtcdMetadata, AServerKilledMidOperationFailsItAndARestartedOneIsReconnected) {
  ASSERT_FALSE(put("k", "v"));
  server_->pause();
  std::optional<std::error_code> result;
  meta_->async_get("k", asio::bind_executor(io_, [&](std::error_code ec, std::string) { result = ec; }));
  io_.restart();
  io_.run_for(100ms);  // the request is in flight, unanswered
  server_->kill();
  const auto give_up = std::chrono::steady_clock::now() + 10s;
  while (!result && std::chrono::steady_clock::now() < give_up) io_.run_one_for(100ms);
  ASSERT_TRUE(result);
  // Lost on the pooled connection before any reply byte, the request is
  // retried once on a fresh one, which finds nobody listening.
  EXPECT_TRUE(*result == kvx::errc::connection_lost || *result == kvx::errc::unreachable) << result->message();

  server_->restart();
  EXPECT_FALSE(put("k2", "v2")) << "the backend reconnects by itself";
  auto [ec, v] = get("k");
  EXPECT_FALSE(ec) << "etcd's data survived the restart: " << ec.message();
  EXPECT_EQ(v, "v");
}

TEST_F(EtcdMetadata, AnIdleConnectionToARestartedServerIsReplacedTransparently) {
  ASSERT_FALSE(put("k", "v"));
  server_->restart();
  EXPECT_FALSE(put("k", "v")) << "the stale pooled connection is retried on a fresh one";
}

TEST_F(EtcdMetadata, CallerCancellationCompletesWithCancelled) {
  server_->pause();
  asio::cancellation_signal signal;
  std::optional<std::error_code> result;
  meta_->async_get("k", asio::bind_cancellation_slot(signal.slot(), asio::bind_executor(io_, [&](std::error_code ec, std::string) {
                                                       result = ec;
                                                     })));
  io_.restart();
  io_.run_for(50ms);
  signal.emit(asio::cancellation_type::terminal);
  const auto give_up = std::chrono::steady_clock::now() + 5s;
  while (!result && std::chrono::steady_clock::now() < give_up) io_.run_one_for(100ms);
  server_->resume();
  ASSERT_TRUE(result);
  EXPECT_EQ(*result, kvx::errc::cancelled) << result->message();
}

// An HTTP server on loopback that answers each etcd gateway path with the
// next scripted body (200 OK), "{}" once they run out: replies etcd would
// never send, to check each is an error naming its shape, not an exception.
struct scripted_etcd {
  asio::ip::tcp::acceptor acceptor;
  std::map<std::string, std::deque<std::string>> replies;  // path -> bodies, in order

  explicit scripted_etcd(asio::io_context& io) : acceptor(io, {asio::ip::make_address("127.0.0.1"), 0}) {
    asio::co_spawn(io, kvx::test::accept_each(acceptor, [this](asio::ip::tcp::socket s) { return serve(std::move(s)); }),
                   asio::detached);
  }
  [[nodiscard]] std::string address() const { return "127.0.0.1:" + std::to_string(acceptor.local_endpoint().port()); }

  asio::awaitable<void> serve(asio::ip::tcp::socket socket) {
    asio::streambuf in;
    for (;;) {
      auto [ec, n] = co_await asio::async_read_until(socket, in, "\r\n\r\n", asio::as_tuple(asio::use_awaitable));
      if (ec) co_return;
      std::string head(asio::buffers_begin(in.data()), asio::buffers_begin(in.data()) + static_cast<std::ptrdiff_t>(n));
      in.consume(n);
      const auto path = head.substr(head.find(' ') + 1, head.find(' ', head.find(' ') + 1) - head.find(' ') - 1);
      std::size_t length = 0;
      for (const char* name : {"Content-Length: ", "content-length: "})
        if (auto at = head.find(name); at != std::string::npos) length = std::stoul(head.substr(at + std::strlen(name)));
      if (in.size() < length) {
        auto [rec, r] = co_await asio::async_read(socket, in, asio::transfer_exactly(length - in.size()), asio::as_tuple(asio::use_awaitable));
        if (rec) co_return;
      }
      in.consume(length);
      std::string body = "{}";
      if (auto& q = replies[path]; !q.empty()) {
        body = q.front();
        q.pop_front();
      }
      static thread_local std::string out;
      out = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body;
      auto [wec, w] = co_await asio::async_write(socket, asio::buffer(out), asio::as_tuple(asio::use_awaitable));
      if (wec) co_return;
    }
  }
};

TEST(EtcdMetadataGarbage, RepliesOfTheWrongShapeAreMalformedMessageNotInternal) {
  asio::io_context io;
  scripted_etcd etcd(io);
  kvx::store::etcd_metadata meta(io.get_executor(), {.address = etcd.address(), .prefix = "g", .timeout = 3s});
  etcd.replies["/v3/kv/range"] = {R"({"kvs": [{"key": 5}]})", "not json", R"({"kvs": [{"key": "a2V5", "value": 7}]})",
                                  R"({"kvs": [{"key": "a2V5", "value": "bw=="}]})"};
  etcd.replies["/v3/kv/txn"] = {R"({"succeeded": "yes"})", R"({"responses": [5]})",
                                R"({"responses": [{"response_range": 7}]})", R"({"succeeded": 1})"};
  auto get = [&] { return std::get<0>(run_op<std::string>(io, [&](auto h) { meta.async_get("k", std::move(h)); })); };
  auto create = [&] { return std::get<0>(run_op(io, [&](auto h) { meta.async_create("k", "v", 0, std::move(h)); })); };
  for (int i = 0; i < 3; ++i) {
    const auto ec = get();
    EXPECT_EQ(ec, kvx::errc::malformed_message) << "range reply " << i << ": " << ec.message();
  }
  for (int i = 0; i < 2; ++i) {
    const auto ec = create();
    EXPECT_EQ(ec, kvx::errc::malformed_message) << "txn reply " << i << ": " << ec.message();
  }
  // The lease's holder is "o" (the fourth range reply); the delete's txn answers garbage.
  const auto released = std::get<0>(run_op(io, [&](auto h) { meta.async_release_lease("n", "o", std::move(h)); }));
  EXPECT_EQ(released, kvx::errc::malformed_message) << released.message();
  const auto swapped =
      std::get<0>(run_op(io, [&](auto h) { meta.async_compare_and_swap("k", std::nullopt, "v", std::move(h)); }));
  EXPECT_EQ(swapped, kvx::errc::malformed_message) << swapped.message();
  EXPECT_TRUE(etcd.replies["/v3/kv/range"].empty());
  EXPECT_TRUE(etcd.replies["/v3/kv/txn"].empty());
}

TEST(EtcdHelpers, Base64RoundTripsEveryByteAndRejectsGarbage) {
  std::string all;
  for (int i = 0; i < 256; ++i) all.push_back(static_cast<char>(i));
  for (std::size_t n = 0; n < 8; ++n) {
    const auto s = all.substr(0, 250 + n);
    EXPECT_EQ(kvx::store::detail::base64_decode(kvx::store::detail::base64_encode(s)), s);
  }
  EXPECT_EQ(kvx::store::detail::base64_encode("foo"), "Zm9v");
  EXPECT_EQ(kvx::store::detail::base64_encode("fo"), "Zm8=");
  EXPECT_FALSE(kvx::store::detail::base64_decode("Zm9v!"));
  EXPECT_FALSE(kvx::store::detail::base64_decode("Z"));
}

TEST(EtcdHelpers, PrefixEndIsTheFirstKeyAfterThePrefix) {
  EXPECT_EQ(kvx::store::detail::etcd_prefix_end("a/"), "a0");
  EXPECT_EQ(kvx::store::detail::etcd_prefix_end(std::string("a\xff", 2)), "b");
  EXPECT_EQ(kvx::store::detail::etcd_prefix_end(""), std::string(1, '\0'));
}

TEST(EtcdOptions, ConfigErrorsNameTheField) {
  auto doc = kvx::config::parse(R"({"address": "127.0.0.1:99999"})");
  auto o = kvx::store::etcd_options::from_config(kvx::config::view(*doc));
  ASSERT_FALSE(o);
  EXPECT_NE(o.error().message().find("'address'"), std::string::npos) << o.error().message();
  doc = kvx::config::parse(R"({"prefix": 3})");
  o = kvx::store::etcd_options::from_config(kvx::config::view(*doc));
  ASSERT_FALSE(o);
  EXPECT_NE(o.error().message().find("'prefix'"), std::string::npos) << o.error().message();
}

}  // namespace
