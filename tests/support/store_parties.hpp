#pragma once
// In-process store tests: every party (node, client) has its own transfer
// engine and local transport over one shared embedded metadata backend (a
// `slow_store_party`'s transport starts each transfer late); and
// `run_coroutine`, which runs one coroutine on the test's io_context until
// it completes.
//
//   kvx::test::store_party p(io, meta, "node-a");
//   kvx::test::slow_store_party stalled(io, meta, "reader", std::chrono::seconds(2));
//   auto ec = kvx::test::run_coroutine(io, [&]() -> asio::awaitable<std::error_code> { ... });

#include <chrono>
#include <optional>
#include <string>

#include <boost/asio/awaitable.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>

#include <gtest/gtest.h>

#include <kvx/transfer/embedded_metadata.hpp>
#include <kvx/transfer/transfer_engine.hpp>
#include <kvx/transport/decorators/faulty.hpp>
#include <kvx/transport/local.hpp>

namespace kvx::test {

using store_engine = kvx::transfer::transfer_engine<kvx::transfer::embedded_metadata, kvx::transport::local>;

struct store_party {
  kvx::transport::local transport;
  store_engine engine;
  store_party(boost::asio::io_context& io, kvx::transfer::embedded_metadata& meta, const std::string& name)
      : transport(io.get_executor()), engine(meta, {.node = name}, transport) {}
};

using slow_store_transport = kvx::transport::faulty<kvx::transport::local>;
using slow_store_engine = kvx::transfer::transfer_engine<kvx::transfer::embedded_metadata, slow_store_transport>;

//! A party whose every transfer starts `delay` late (a stalled link, an
//! overloaded host): it outlasts leases set a fraction of `delay`.
struct slow_store_party {
  slow_store_transport transport;
  slow_store_engine engine;
  slow_store_party(boost::asio::io_context& io, kvx::transfer::embedded_metadata& meta, const std::string& name,
                   std::chrono::milliseconds delay)
      : transport(kvx::transport::faulty_config{.seed = 1, .delay = 1.0, .delay_by = delay}, io.get_executor()),
        engine(meta, {.node = name}, transport) {}
};

namespace detail {
template <class T>
struct awaited;
template <class T>
struct awaited<boost::asio::awaitable<T>> {
  using type = T;
};
}  // namespace detail

//! Spawns `op()` on `io` and runs `io` until it completes (at most `limit`);
//! a failed expectation and a value-initialised result when it does not.
template <class Op>
auto run_coroutine(boost::asio::io_context& io, Op op, std::chrono::milliseconds limit = std::chrono::seconds(10)) {
  using value_type = typename detail::awaited<decltype(op())>::type;
  std::optional<value_type> out;
  boost::asio::co_spawn(io, [&]() -> boost::asio::awaitable<void> { out = co_await op(); }, boost::asio::detached);
  io.restart();
  const auto give_up = std::chrono::steady_clock::now() + limit;
  while (!out && std::chrono::steady_clock::now() < give_up) io.run_one_for(std::chrono::milliseconds(20));
  EXPECT_TRUE(out) << "operation did not complete";
  return out.value_or(value_type{});
}

}  // namespace kvx::test
