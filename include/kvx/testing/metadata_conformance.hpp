#pragma once
//! \file
//! The `metadata_backend` conformance suite: typed GoogleTest cases every
//! backend passes (embedded, Redis, etcd, `any_metadata_backend`, and yours).
//!
//! Give it an environment type: one object per test, on a fresh io_context,
//! whose backend sees an empty key space (use a fresh prefix per test when the
//! server is shared). Optional static hooks start a server once per suite.
//!
//! | member | required | meaning |
//! | --- | --- | --- |
//! | `using backend_type = M;` | yes | the backend under test (`check_metadata_backend<M>()` is asserted) |
//! | `explicit Env(boost::asio::io_context&)` | yes | builds the backend |
//! | `backend_type& backend()` | yes | the backend |
//! | `static void set_up_suite()` / `tear_down_suite()` | no | start / stop a shared server |
//! | `static std::string skip_reason()` | no | non-empty: every test skips with it (server binary missing) |
//!
//! \code
//! struct my_env {
//!   using backend_type = kvx::transfer::embedded_metadata;
//!   explicit my_env(boost::asio::io_context& io) : meta(io.get_executor()) {}
//!   backend_type& backend() { return meta; }
//!   backend_type meta;
//! };
//! KVX_METADATA_CONFORMANCE(Embedded, my_env);
//! \endcode
//!
//! Include it from a test file only (it includes GoogleTest).

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <optional>
#include <string>
#include <system_error>
#include <tuple>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include <boost/asio/bind_executor.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <kvx/core/async.hpp>
#include <kvx/transfer/metadata_backend.hpp>

namespace kvx::testing {

//! Runs one operation on `io` to completion (bounded by `deadline`, after
//! which the operation reports `errc::timed_out`) and returns its arguments.
template <class... Ts, class Start>
std::tuple<std::error_code, Ts...> run_op(boost::asio::io_context& io, Start start,
                                          std::chrono::milliseconds deadline = std::chrono::seconds(10)) {
  std::optional<std::tuple<std::error_code, Ts...>> out;
  // Bound to `io`, so the deadline's timer and the completion run there.
  start(kvx::cancel_after(deadline, boost::asio::bind_executor(io.get_executor(), [&](std::error_code ec, Ts... values) {
                            out.emplace(ec, std::move(values)...);
                          })));
  io.restart();
  const auto give_up = std::chrono::steady_clock::now() + deadline + std::chrono::seconds(5);
  while (!out && std::chrono::steady_clock::now() < give_up) io.run_one_for(std::chrono::milliseconds(100));
  if (!out) return {make_error_code(errc::internal), Ts{}...};
  return std::move(*out);
}

namespace detail {
template <class Env>
concept has_suite_hooks = requires {
  Env::set_up_suite();
  Env::tear_down_suite();
};
template <class Env>
concept has_skip_reason = requires {
  { Env::skip_reason() } -> std::convertible_to<std::string>;
};
}  // namespace detail

template <class Env>
class metadata_conformance : public ::testing::Test {
 protected:
  using backend_type = typename Env::backend_type;
  static_assert(transfer::check_metadata_backend<backend_type>());

  static void SetUpTestSuite() {
    if constexpr (detail::has_suite_hooks<Env>) Env::set_up_suite();
  }
  static void TearDownTestSuite() {
    if constexpr (detail::has_suite_hooks<Env>) Env::tear_down_suite();
  }
  void SetUp() override {
    if constexpr (detail::has_skip_reason<Env>) {
      if (auto why = Env::skip_reason(); !why.empty()) GTEST_SKIP() << why;
    }
    env_.emplace(io_);
  }

  backend_type& backend() { return env_->backend(); }

  std::error_code put(const std::string& k, const std::string& v) {
    auto [ec] = run_op(io_, [&](auto h) { backend().async_put(k, v, std::move(h)); });
    return ec;
  }
  std::tuple<std::error_code, std::string> get(const std::string& k) {
    return run_op<std::string>(io_, [&](auto h) { backend().async_get(k, std::move(h)); });
  }
  std::error_code remove(const std::string& k) {
    auto [ec] = run_op(io_, [&](auto h) { backend().async_remove(k, std::move(h)); });
    return ec;
  }
  std::tuple<std::error_code, transfer::metadata_entries> list(const std::string& p) {
    return run_op<transfer::metadata_entries>(io_, [&](auto h) { backend().async_list(p, std::move(h)); });
  }

  boost::asio::io_context io_;
  std::optional<Env> env_;
};

TYPED_TEST_SUITE_P(metadata_conformance);

TYPED_TEST_P(metadata_conformance, PutThenGetReturnsTheValue) {
  ASSERT_FALSE(this->put("kvx/segment/a", "descriptor-a"));
  auto [ec, v] = this->get("kvx/segment/a");
  ASSERT_FALSE(ec) << ec.message();
  EXPECT_EQ(v, "descriptor-a");
}

TYPED_TEST_P(metadata_conformance, PutOverwritesTheOldValue) {
  ASSERT_FALSE(this->put("k", "one"));
  ASSERT_FALSE(this->put("k", "two"));
  auto [ec, v] = this->get("k");
  ASSERT_FALSE(ec) << ec.message();
  EXPECT_EQ(v, "two");
}

TYPED_TEST_P(metadata_conformance, GetOfAnAbsentKeyIsNotFound) {
  auto [ec, v] = this->get("never-written");
  EXPECT_EQ(ec, kvx::errc::not_found) << ec.message();
}

TYPED_TEST_P(metadata_conformance, RemoveDeletesAndASecondRemoveIsNotFound) {
  ASSERT_FALSE(this->put("gone", "x"));
  EXPECT_FALSE(this->remove("gone"));
  auto [ec, v] = this->get("gone");
  EXPECT_EQ(ec, kvx::errc::not_found);
  EXPECT_EQ(this->remove("gone"), kvx::errc::not_found);
}

TYPED_TEST_P(metadata_conformance, ListReturnsExactlyThePrefixSortedByKey) {
  for (auto k : {"seg/b", "seg/a", "seg/c/1", "seg/ab", "segment", "other/a", "se"}) ASSERT_FALSE(this->put(k, std::string("v:") + k));
  auto [ec, entries] = this->list("seg/");
  ASSERT_FALSE(ec) << ec.message();
  const kvx::transfer::metadata_entries expected{
      {"seg/a", "v:seg/a"}, {"seg/ab", "v:seg/ab"}, {"seg/b", "v:seg/b"}, {"seg/c/1", "v:seg/c/1"}};
  EXPECT_EQ(entries, expected);
}

TYPED_TEST_P(metadata_conformance, ListOfAnUnknownPrefixIsEmpty) {
  ASSERT_FALSE(this->put("a/1", "x"));
  auto [ec, entries] = this->list("zzz/");
  ASSERT_FALSE(ec) << ec.message();
  EXPECT_TRUE(entries.empty());
}

TYPED_TEST_P(metadata_conformance, ListOfTheEmptyPrefixReturnsEverything) {
  ASSERT_FALSE(this->put("b", "2"));
  ASSERT_FALSE(this->put("a", "1"));
  auto [ec, entries] = this->list("");
  ASSERT_FALSE(ec) << ec.message();
  const kvx::transfer::metadata_entries expected{{"a", "1"}, {"b", "2"}};
  EXPECT_EQ(entries, expected);
}

TYPED_TEST_P(metadata_conformance, KeysAndValuesAreBinarySafe) {
  const std::string key("bin/\x01*?[x]\\ \xff", 13);
  std::string value;
  for (int i = 0; i < 512; ++i) value.push_back(static_cast<char>(i % 256));
  value += "\r\n$3\r\n*1\r\n";
  ASSERT_FALSE(this->put(key, value));
  ASSERT_FALSE(this->put("bin/plain", "p"));
  auto [ec, v] = this->get(key);
  ASSERT_FALSE(ec) << ec.message();
  EXPECT_EQ(v, value);
  // Glob or range metacharacters in a prefix are taken literally.
  auto [lec, entries] = this->list(std::string("bin/\x01*?[", 8));
  ASSERT_FALSE(lec) << lec.message();
  ASSERT_EQ(entries.size(), 1u);
  EXPECT_EQ(entries[0].first, key);
}

TYPED_TEST_P(metadata_conformance, EmptyValueIsAValueNotAbsence) {
  ASSERT_FALSE(this->put("empty", ""));
  auto [ec, v] = this->get("empty");
  ASSERT_FALSE(ec) << ec.message();
  EXPECT_EQ(v, "");
}

TYPED_TEST_P(metadata_conformance, OneMebibyteValuesRoundTrip) {
  std::string big(1 << 20, '\0');
  for (std::size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>((i * 131) ^ (i >> 9));
  ASSERT_FALSE(this->put("big/1", big));
  ASSERT_FALSE(this->put("big/2", big));
  auto [ec, v] = this->get("big/1");
  ASSERT_FALSE(ec) << ec.message();
  EXPECT_TRUE(v == big);
  auto [lec, entries] = this->list("big/");
  ASSERT_FALSE(lec) << lec.message();
  ASSERT_EQ(entries.size(), 2u);
  EXPECT_TRUE(entries[1].second == big);
}

TYPED_TEST_P(metadata_conformance, ManyConcurrentOperationsAllComplete) {
  constexpr int n = 200;
  int done = 0;
  std::vector<std::error_code> errors;
  auto& m = this->backend();
  for (int i = 0; i < n; ++i)
    m.async_put("many/" + std::to_string(1000 + i), std::to_string(i), [&](std::error_code ec) {
      ++done;
      if (ec) errors.push_back(ec);
    });
  this->io_.restart();
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (done < n && std::chrono::steady_clock::now() < give_up) this->io_.run_one_for(std::chrono::milliseconds(100));
  ASSERT_EQ(done, n);
  EXPECT_TRUE(errors.empty()) << errors.front().message();

  done = 0;
  int matched = 0;
  for (int i = 0; i < n; ++i)
    m.async_get("many/" + std::to_string(1000 + i), [&, i](std::error_code ec, std::string v) {
      ++done;
      if (!ec && v == std::to_string(i)) ++matched;
    });
  this->io_.restart();
  while (done < n && std::chrono::steady_clock::now() < give_up) this->io_.run_one_for(std::chrono::milliseconds(100));
  ASSERT_EQ(done, n);
  EXPECT_EQ(matched, n);

  auto [ec, entries] = this->list("many/");
  ASSERT_FALSE(ec) << ec.message();
  ASSERT_EQ(entries.size(), static_cast<std::size_t>(n));
  EXPECT_TRUE(std::is_sorted(entries.begin(), entries.end()));
}

TYPED_TEST_P(metadata_conformance, CompletionNeverRunsInsideTheInitiatingCall) {
  bool called = false;
  this->backend().async_put("inline", "x", [&](std::error_code) { called = true; });
  EXPECT_FALSE(called);
  this->io_.restart();
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!called && std::chrono::steady_clock::now() < give_up) this->io_.run_one_for(std::chrono::milliseconds(100));
  EXPECT_TRUE(called);
}

TYPED_TEST_P(metadata_conformance, WorksFromCoroutines) {
  std::optional<std::string> got;
  boost::asio::co_spawn(
      this->io_,
      [&]() -> boost::asio::awaitable<void> {
        // kvx completes with std::error_code, which use_awaitable hands back
        // rather than throwing.
        std::error_code put_ec = co_await this->backend().async_put("coro", "value", boost::asio::use_awaitable);
        if (put_ec) co_return;
        auto [ec, value] = co_await this->backend().async_get("coro", boost::asio::use_awaitable);
        if (!ec) got = std::move(value);
      },
      boost::asio::detached);
  this->io_.restart();
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!got && std::chrono::steady_clock::now() < give_up) this->io_.run_one_for(std::chrono::milliseconds(100));
  ASSERT_TRUE(got);
  EXPECT_EQ(*got, "value");
}

REGISTER_TYPED_TEST_SUITE_P(metadata_conformance, PutThenGetReturnsTheValue, PutOverwritesTheOldValue,
                            GetOfAnAbsentKeyIsNotFound, RemoveDeletesAndASecondRemoveIsNotFound,
                            ListReturnsExactlyThePrefixSortedByKey, ListOfAnUnknownPrefixIsEmpty,
                            ListOfTheEmptyPrefixReturnsEverything, KeysAndValuesAreBinarySafe,
                            EmptyValueIsAValueNotAbsence, OneMebibyteValuesRoundTrip,
                            ManyConcurrentOperationsAllComplete, CompletionNeverRunsInsideTheInitiatingCall,
                            WorksFromCoroutines);

}  // namespace kvx::testing

//! Instantiates the metadata conformance suite as `Name` for environment `Env`.
//! Use it at namespace scope; `Env` must be visible from `kvx::testing`
//! (global or anonymous namespace, or qualified).
#define KVX_METADATA_CONFORMANCE(Name, Env)                                          \
  namespace kvx::testing {                                                         \
  INSTANTIATE_TYPED_TEST_SUITE_P(Name, metadata_conformance, ::testing::Types<Env>); \
  }                                                                                \
  static_assert(true, "")
