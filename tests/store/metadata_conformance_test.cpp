// The metadata conformance suite on the backends of the core build (the
// embedded reference and, through any_metadata_backend, etcd), and
// any_metadata_backend's config handling. Redis runs the suite in
// tests/store/redis/.
#include <kvx/testing/metadata_conformance.hpp>

#include <gtest/gtest.h>

#include <boost/asio/io_context.hpp>

#include <atomic>
#include <memory>
#include <string>

#include <kvx/store/metadata.hpp>

#include "support/servers.hpp"

namespace {

namespace asio = boost::asio;
using namespace std::chrono_literals;
using kvx::testing::run_op;

struct embedded_env {
  using backend_type = kvx::transfer::embedded_metadata;
  explicit embedded_env(asio::io_context& io) : meta(io.get_executor()) {}
  backend_type& backend() { return meta; }
  backend_type meta;
};

struct any_embedded_env {
  using backend_type = kvx::store::any_metadata_backend;
  explicit any_embedded_env(asio::io_context& io)
      : meta(kvx::store::any_metadata_backend::from_json(io.get_executor(), R"({"backend": "embedded"})").value()) {}
  backend_type& backend() { return meta; }
  backend_type meta;
};

using kvx::test::shared_etcd;

struct any_etcd_env {
  using backend_type = kvx::store::any_metadata_backend;
  static void set_up_suite() {
    if (!shared_etcd()) shared_etcd() = kvx::test::etcd_server::start();
  }
  static void tear_down_suite() {}
  static std::string skip_reason() { return shared_etcd() ? "" : kvx::test::etcd_server::missing_reason(); }
  static std::string config() {
    static std::atomic<int> n{0};
    return R"({"backend": "etcd", "address": ")" + shared_etcd()->address() + R"(", "prefix": "any-)" +
           std::to_string(n++) + R"(/", "timeout_ms": 5000})";
  }
  explicit any_etcd_env(asio::io_context& io)
      : meta(kvx::store::any_metadata_backend::from_json(io.get_executor(), config()).value()) {}
  backend_type& backend() { return meta; }
  backend_type meta;
};

}  // namespace

KVX_METADATA_CONFORMANCE(Embedded, embedded_env);
KVX_METADATA_CONFORMANCE(AnyEmbedded, any_embedded_env);
KVX_METADATA_CONFORMANCE(AnyEtcd, any_etcd_env);

namespace {

std::string config_error(std::string_view text) {
  asio::io_context io;
  auto m = kvx::store::any_metadata_backend::from_json(io.get_executor(), text);
  return m ? std::string("no error") : m.error().message();
}

TEST(AnyMetadataBackend, ConfigErrorsNameTheField) {
  EXPECT_NE(config_error("{}").find("'backend' is required"), std::string::npos) << config_error("{}");
  EXPECT_NE(config_error(R"({"backend": "zookeeper"})").find("unknown backend \"zookeeper\""), std::string::npos);
  EXPECT_NE(config_error(R"({"backend": 7})").find("'backend'"), std::string::npos);
  EXPECT_NE(config_error(R"({"backend": "etcd", "adress": "127.0.0.1:2379"})").find("unknown config field 'adress'"),
            std::string::npos);
  EXPECT_NE(config_error(R"({"backend": "etcd", "address": "nowhere"})").find("'address'"), std::string::npos);
  EXPECT_NE(config_error(R"({"backend": "etcd", "timeout_ms": "soon"})").find("'timeout_ms'"), std::string::npos);
  EXPECT_NE(config_error(R"({"backend": "embedded", "prefix": "x/"})").find("unknown config field 'prefix'"),
            std::string::npos);
  EXPECT_NE(config_error("not json").find("not valid JSON"), std::string::npos);
#if !KVX_WITH_REDIS
  EXPECT_NE(config_error(R"({"backend": "redis"})").find("hiredis"), std::string::npos) << config_error(R"({"backend": "redis"})");
#endif
}

TEST(AnyMetadataBackend, ReportsItsBackendAndExposesTheTarget) {
  asio::io_context io;
  auto m = kvx::store::any_metadata_backend::from_json(io.get_executor(), R"({"backend": "etcd", "address": "127.0.0.1:1"})");
  ASSERT_TRUE(m) << m.error().message();
  EXPECT_EQ(m->backend_name(), "etcd");
  EXPECT_TRUE(m->supports_leases());
  ASSERT_TRUE(m->target<kvx::store::etcd_metadata>());
  EXPECT_EQ(m->target<kvx::store::etcd_metadata>()->options().address, "127.0.0.1:1");
  EXPECT_FALSE(m->target<kvx::transfer::embedded_metadata>());
}

TEST(AnyMetadataBackend, LeasesOnABackendWithoutThemAreNotSupported) {
  asio::io_context io;
  auto m = kvx::store::any_metadata_backend::from_json(io.get_executor(), R"({"backend": "embedded"})");
  ASSERT_TRUE(m);
  EXPECT_FALSE(m->supports_leases());
  auto [ec] = run_op(io, [&](auto h) { m->async_acquire_lease("master", "a", 1s, std::move(h)); });
  EXPECT_EQ(ec, kvx::errc::not_supported);
  auto [hec, who] = run_op<std::string>(io, [&](auto h) { m->async_lease_holder("master", std::move(h)); });
  EXPECT_EQ(hec, kvx::errc::not_supported);
}

TEST(AnyMetadataBackend, ForwardsLeasesToEtcd) {
  auto server = kvx::test::etcd_server::start();
  if (!server) GTEST_SKIP() << kvx::test::etcd_server::missing_reason();
  asio::io_context io;
  auto m = kvx::store::any_metadata_backend::from_json(
      io.get_executor(), R"({"backend": "etcd", "address": ")" + server->address() + R"("})");
  ASSERT_TRUE(m);
  EXPECT_FALSE(std::get<0>(run_op(io, [&](auto h) { m->async_acquire_lease("master", "a", 5s, std::move(h)); })));
  EXPECT_EQ(std::get<0>(run_op(io, [&](auto h) { m->async_acquire_lease("master", "b", 5s, std::move(h)); })),
            kvx::errc::busy);
  EXPECT_EQ(std::get<1>(run_op<std::string>(io, [&](auto h) { m->async_lease_holder("master", std::move(h)); })), "a");
  EXPECT_FALSE(std::get<0>(run_op(io, [&](auto h) { m->async_release_lease("master", "a", std::move(h)); })));
}

}  // namespace
