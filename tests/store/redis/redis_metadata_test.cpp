#include <kvx/store/redis_metadata.hpp>

#include <gtest/gtest.h>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/io_context.hpp>

#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <thread>

#include <kvx/store/metadata.hpp>
#include <kvx/testing/metadata_conformance.hpp>

#include "support/servers.hpp"

namespace {

namespace asio = boost::asio;
using namespace std::chrono_literals;
using kvx::testing::run_op;

// One redis-server for the whole executable; each test gets its own prefix.
std::unique_ptr<kvx::test::redis_server>& shared_server() {
  static std::unique_ptr<kvx::test::redis_server> server;
  return server;
}
std::string fresh_prefix() {
  static std::atomic<int> n{0};
  return "test-" + std::to_string(::getpid()) + "-" + std::to_string(n++) + "/";
}

struct redis_env {
  using backend_type = kvx::store::redis_metadata;
  static void set_up_suite() {
    if (!shared_server()) shared_server() = kvx::test::redis_server::start();
  }
  static void tear_down_suite() {}
  static std::string skip_reason() { return shared_server() ? "" : kvx::test::redis_server::missing_reason(); }
  explicit redis_env(asio::io_context& io)
      : meta(io.get_executor(), {.address = shared_server()->address(), .prefix = fresh_prefix()}) {}
  backend_type& backend() { return meta; }
  backend_type meta;
};

// The same server through the run-time wrapper, as a tool would build it.
struct any_redis_env {
  using backend_type = kvx::store::any_metadata_backend;
  static void set_up_suite() { redis_env::set_up_suite(); }
  static void tear_down_suite() {}
  static std::string skip_reason() { return redis_env::skip_reason(); }
  explicit any_redis_env(asio::io_context& io)
      : meta(kvx::store::any_metadata_backend::from_json(io.get_executor(), R"({"backend": "redis", "address": ")" +
                                                                                shared_server()->address() +
                                                                                R"(", "prefix": ")" + fresh_prefix() + R"("})")
                 .value()) {}
  backend_type& backend() { return meta; }
  backend_type meta;
};

}  // namespace

KVX_METADATA_CONFORMANCE(Redis, redis_env);
KVX_METADATA_CONFORMANCE(AnyRedis, any_redis_env);

namespace {

// Fault tests restart or pause the server: each suite has its own.
class RedisMetadata : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { server_ = kvx::test::redis_server::start(); }
  static void TearDownTestSuite() { server_.reset(); }
  void SetUp() override {
    if (!server_) GTEST_SKIP() << kvx::test::redis_server::missing_reason();
    meta_ = std::make_unique<kvx::store::redis_metadata>(
        io_.get_executor(), kvx::store::redis_options{.address = server_->address(), .prefix = fresh_prefix(), .timeout = 2s});
  }
  std::error_code put(const std::string& k, const std::string& v, std::chrono::milliseconds deadline = 10s) {
    return std::get<0>(run_op(io_, [&](auto h) { meta_->async_put(k, v, std::move(h)); }, deadline));
  }
  std::tuple<std::error_code, std::string> get(const std::string& k) {
    return run_op<std::string>(io_, [&](auto h) { meta_->async_get(k, std::move(h)); });
  }
  std::error_code acquire(const std::string& name, const std::string& owner, std::chrono::milliseconds ttl) {
    return std::get<0>(run_op(io_, [&](auto h) { meta_->async_acquire_lease(name, owner, ttl, std::move(h)); }));
  }
  std::error_code renew(const std::string& name, const std::string& owner, std::chrono::milliseconds ttl) {
    return std::get<0>(run_op(io_, [&](auto h) { meta_->async_renew_lease(name, owner, ttl, std::move(h)); }));
  }
  std::error_code release(const std::string& name, const std::string& owner) {
    return std::get<0>(run_op(io_, [&](auto h) { meta_->async_release_lease(name, owner, std::move(h)); }));
  }
  std::tuple<std::error_code, std::string> holder(const std::string& name) {
    return run_op<std::string>(io_, [&](auto h) { meta_->async_lease_holder(name, std::move(h)); });
  }

  static inline std::unique_ptr<kvx::test::redis_server> server_;
  asio::io_context io_;
  std::unique_ptr<kvx::store::redis_metadata> meta_;
};

TEST_F(RedisMetadata, KeysLiveUnderThePrefixInTheKvNamespace) {
  ASSERT_FALSE(put("kvx/segment/a", "d"));
  auto [ec, reply] = run_op<kvx::store::redis_reply>(
      io_, [&](auto h) { meta_->async_execute({"GET", meta_->options().prefix + "kv/kvx/segment/a"}, std::move(h)); });
  ASSERT_FALSE(ec) << ec.message();
  EXPECT_EQ(reply.str, "d");
}

TEST_F(RedisMetadata, ALeaseIsExclusiveUntilReleased) {
  EXPECT_FALSE(acquire("master", "node-1", 10s));
  EXPECT_FALSE(acquire("master", "node-1", 10s)) << "re-acquiring one's own lease succeeds";
  EXPECT_EQ(acquire("master", "node-2", 10s), kvx::errc::busy);
  auto [ec, who] = holder("master");
  ASSERT_FALSE(ec);
  EXPECT_EQ(who, "node-1");
  EXPECT_EQ(release("master", "node-2"), kvx::errc::busy) << "only the owner releases";
  EXPECT_FALSE(release("master", "node-1"));
  EXPECT_EQ(release("master", "node-1"), kvx::errc::not_found);
  EXPECT_FALSE(acquire("master", "node-2", 10s));
}

TEST_F(RedisMetadata, ALeaseExpiresAfterItsTtlAndCannotBeRenewedThen) {
  ASSERT_FALSE(acquire("short", "a", 100ms));
  EXPECT_FALSE(renew("short", "a", 100ms));
  EXPECT_EQ(renew("short", "b", 100ms), kvx::errc::busy);
  std::this_thread::sleep_for(300ms);  // let the server expire it
  EXPECT_EQ(renew("short", "a", 100ms), kvx::errc::not_found);
  auto [ec, who] = holder("short");
  EXPECT_EQ(ec, kvx::errc::not_found);
  EXPECT_FALSE(acquire("short", "b", 10s));
}

TEST_F(RedisMetadata, BadLeaseArgumentsAreRejected) {
  EXPECT_EQ(acquire("x", "a", 0ms), kvx::errc::invalid_argument);
  EXPECT_EQ(acquire("", "a", 1s), kvx::errc::invalid_argument);
}

TEST_F(RedisMetadata, AnUnreachableServerIsAnErrorNotAHang) {
  kvx::store::redis_metadata nowhere(io_.get_executor(),
                                     {.address = "127.0.0.1:" + std::to_string(kvx::test::free_loopback_port()), .prefix = {}});
  auto [ec] = run_op(io_, [&](auto h) { nowhere.async_put("k", "v", std::move(h)); });
  EXPECT_EQ(ec, kvx::errc::unreachable) << ec.message();
}

TEST_F(RedisMetadata, AHungServerTimesOutWithinTheDeadline) {
  ASSERT_FALSE(put("before", "x"));
  server_->pause();
  auto [ec] = run_op(io_, [&](auto h) { meta_->async_put("during", "x", kvx::cancel_after(300ms, std::move(h))); });
  server_->resume();
  EXPECT_EQ(ec, kvx::errc::timed_out) << ec.message();
  EXPECT_FALSE(put("after", "x")) << "the timed-out connection was dropped, a fresh one works";
}

TEST_F(RedisMetadata, DefaultTimeoutFromOptionsApplies) {
  kvx::store::redis_metadata quick(io_.get_executor(), {.address = server_->address(), .prefix = {}, .timeout = 200ms});
  server_->pause();
  auto [ec] = run_op(io_, [&](auto h) { quick.async_put("k", "v", std::move(h)); });
  server_->resume();
  EXPECT_EQ(ec, kvx::errc::timed_out) << ec.message();
}

TEST_F(RedisMetadata, AServerKilledMidOperationFailsItAndARestartedOneIsReconnected) {
  ASSERT_FALSE(put("k", "v"));  // leaves an idle pooled connection
  std::string big(8 << 20, 'x');
  std::optional<std::error_code> result;
  meta_->async_put("big", big, asio::bind_executor(io_, [&](std::error_code ec) { result = ec; }));
  io_.restart();
  io_.poll();  // the write is in flight
  server_->kill();
  const auto give_up = std::chrono::steady_clock::now() + 10s;
  while (!result && std::chrono::steady_clock::now() < give_up) io_.run_one_for(100ms);
  ASSERT_TRUE(result);
  EXPECT_TRUE(*result == kvx::errc::connection_lost || *result == kvx::errc::unreachable || !*result)
      << result->message();

  auto [dead] = run_op(io_, [&](auto h) { meta_->async_put("k", "v", std::move(h)); });
  EXPECT_EQ(dead, kvx::errc::unreachable) << dead.message();

  server_->restart();
  EXPECT_FALSE(put("k2", "v2")) << "the backend reconnects by itself";
  auto [ec, v] = get("k2");
  EXPECT_FALSE(ec);
  EXPECT_EQ(v, "v2");
}

TEST_F(RedisMetadata, AnIdleConnectionToARestartedServerIsReplacedTransparently) {
  ASSERT_FALSE(put("k", "v"));
  server_->restart();
  EXPECT_FALSE(put("k", "v")) << "the stale pooled connection is retried on a fresh one";
}

TEST_F(RedisMetadata, CallerCancellationCompletesWithCancelled) {
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

TEST_F(RedisMetadata, AnyMetadataBackendForwardsLeasesToRedis) {
  auto m = kvx::store::any_metadata_backend::from_json(
      io_.get_executor(), R"({"backend": "redis", "address": ")" + server_->address() + R"(", "prefix": ")" + fresh_prefix() + R"("})");
  ASSERT_TRUE(m) << m.error().message();
  EXPECT_EQ(m->backend_name(), "redis");
  EXPECT_TRUE(m->supports_leases());
  EXPECT_TRUE(m->target<kvx::store::redis_metadata>());
  EXPECT_FALSE(std::get<0>(run_op(io_, [&](auto h) { m->async_acquire_lease("master", "a", 5s, std::move(h)); })));
  EXPECT_EQ(std::get<0>(run_op(io_, [&](auto h) { m->async_acquire_lease("master", "b", 5s, std::move(h)); })),
            kvx::errc::busy);
  EXPECT_FALSE(std::get<0>(run_op(io_, [&](auto h) { m->async_release_lease("master", "a", std::move(h)); })));
}

TEST(RedisProtocol, MalformedRepliesAreErrorsNotCrashes) {
  auto feed = [](kvx::store::detail::redis_reader& r, std::string_view bytes) { return r.feed(bytes.data(), bytes.size()); };
  kvx::store::detail::redis_reader reader;
  ASSERT_TRUE(feed(reader, "$5\r\nhel"));
  auto partial = reader.next();
  ASSERT_TRUE(partial);
  EXPECT_FALSE(*partial) << "incomplete: more bytes needed";
  ASSERT_TRUE(feed(reader, "lo\r\n*2\r\n:7\r\n$-1\r\n"));
  auto first = reader.next();
  ASSERT_TRUE(first && *first);
  EXPECT_EQ((*first)->str, "hello");
  auto second = reader.next();
  ASSERT_TRUE(second && *second);
  ASSERT_EQ((*second)->elements.size(), 2u);
  EXPECT_EQ((*second)->elements[0].integer, 7);
  EXPECT_TRUE((*second)->elements[1].is_nil());

  kvx::store::detail::redis_reader bad;
  ASSERT_TRUE(feed(bad, "!oops\r\n"));
  auto r = bad.next();
  ASSERT_FALSE(r);
  EXPECT_EQ(r.code(), kvx::errc::malformed_message);
}

// An array header is a count the server claims, not memory to set aside:
// a huge one is refused (no allocation, nothing thrown through hiredis's C
// frames) and a large honest one grows as its elements arrive.
TEST(RedisProtocol, AHugeArrayHeaderIsAnErrorNotAnAllocation) {
  kvx::store::detail::redis_reader reader;
  const std::string_view huge = "*2147483647\r\n";
  ASSERT_TRUE(reader.feed(huge.data(), huge.size()));
  kvx::result<std::optional<kvx::store::detail::redis_reply>> r = std::optional<kvx::store::detail::redis_reply>{};
  EXPECT_NO_THROW(r = reader.next());
  ASSERT_FALSE(r);
  EXPECT_EQ(r.code(), kvx::errc::malformed_message);
  EXPECT_NE(r.error().message().find("2147483647"), std::string::npos) << r.error().message();

  kvx::store::detail::redis_reader nested;
  const std::string_view inner = "*2\r\n:1\r\n*20000000\r\n";
  ASSERT_TRUE(nested.feed(inner.data(), inner.size()));
  auto n = nested.next();
  ASSERT_FALSE(n);
  EXPECT_EQ(n.code(), kvx::errc::malformed_message);

  kvx::store::detail::redis_reader honest;
  std::string wire = "*3\r\n*2\r\n$1\r\na\r\n:5\r\n$-1\r\n*1000\r\n";
  for (int i = 0; i < 1000; ++i) wire += ":" + std::to_string(i) + "\r\n";
  ASSERT_TRUE(honest.feed(wire.data(), wire.size()));
  auto h = honest.next();
  ASSERT_TRUE(h && *h) << (h ? "incomplete" : h.error().message());
  const auto& top = **h;
  ASSERT_EQ(top.elements.size(), 3u);
  ASSERT_EQ(top.elements[0].elements.size(), 2u);
  EXPECT_EQ(top.elements[0].elements[0].str, "a");
  EXPECT_EQ(top.elements[0].elements[1].integer, 5);
  EXPECT_TRUE(top.elements[1].is_nil());
  ASSERT_EQ(top.elements[2].elements.size(), 1000u);
  EXPECT_EQ(top.elements[2].elements[999].integer, 999);
}

TEST(RedisProtocol, CommandsAreFramedAsBulkStringArrays) {
  const std::string big(5000, 'v');
  kvx::store::detail::redis_command c;
  c.arg("SET").arg("k").arg(big).arg(42LL);
  std::string frame;
  std::vector<boost::asio::const_buffer> buffers;
  c.gather(frame, buffers);
  std::string wire;
  for (auto b : buffers) wire.append(static_cast<const char*>(b.data()), b.size());
  EXPECT_EQ(wire, "*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$5000\r\n" + big + "\r\n$2\r\n42\r\n");
  EXPECT_EQ(buffers.size(), 3u) << "the large argument is referenced, not copied";
}

TEST(RedisOptions, ConfigErrorsNameTheField) {
  auto doc = kvx::config::parse(R"({"address": "localhost", "prefix": "p/"})");
  auto o = kvx::store::redis_options::from_config(kvx::config::view(*doc));
  ASSERT_FALSE(o);
  EXPECT_NE(o.error().message().find("'address'"), std::string::npos) << o.error().message();

  doc = kvx::config::parse(R"({"address": "127.0.0.1:7000", "timeout_ms": -1})");
  o = kvx::store::redis_options::from_config(kvx::config::view(*doc));
  ASSERT_FALSE(o);
  EXPECT_NE(o.error().message().find("'timeout_ms'"), std::string::npos) << o.error().message();

  doc = kvx::config::parse(R"({"address": "127.0.0.1:7000", "prefix": "p/", "timeout_ms": 250})");
  o = kvx::store::redis_options::from_config(kvx::config::view(*doc));
  ASSERT_TRUE(o) << o.error().message();
  EXPECT_EQ(o->timeout, 250ms);
  EXPECT_EQ(o->prefix, "p/");
}

TEST(RedisOptions, AListBatchTheReplyParserCannotTakeIsRefusedAtConstruction) {
  boost::asio::io_context io;
  for (std::size_t bad : {std::size_t{0}, static_cast<std::size_t>(kvx::store::detail::max_reply_elements) + 1}) {
    kvx::store::redis_options o;
    o.list_batch = bad;
    EXPECT_THROW(kvx::store::redis_metadata(io.get_executor(), o), std::invalid_argument) << bad;
  }
  kvx::store::redis_options ok;
  ok.list_batch = static_cast<std::size_t>(kvx::store::detail::max_reply_elements);
  EXPECT_NO_THROW(kvx::store::redis_metadata(io.get_executor(), ok));
}

}  // namespace
