#pragma once
// Name resolution that ends at a deadline or at the caller's cancellation
// even while getaddrinfo is still running. Asio's resolver runs getaddrinfo
// on a private thread that cancel() cannot interrupt, so a DNS server that
// never answers held every client that resolved a name for glibc's own
// timeouts (seconds to minutes), past the operation's deadline. Here the
// lookup is left to finish in the background: its resolver and result live
// in shared state that the late completion releases.
//
// Call it from a strand (or a single-threaded io_context): the lookup's
// completion and the waiting coroutine share the state without a lock.

#include <chrono>
#include <memory>
#include <string>
#include <tuple>
#include <utility>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/error.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

namespace kvx::transfer::detail {

//! Resolves `host`:`service`; completes with the resolver's own result, or
//! `asio::error::timed_out` once `deadline` passes, or
//! `asio::error::operation_aborted` when the awaiting coroutine is
//! cancelled, whichever comes first. `Resolver` is `asio::ip::tcp::resolver`
//! (a test substitutes one that never answers).
template <class Resolver = boost::asio::ip::tcp::resolver>
boost::asio::awaitable<std::tuple<boost::system::error_code, typename Resolver::results_type>> bounded_resolve(
    std::string host, std::string service, std::chrono::steady_clock::time_point deadline) {
  namespace asio = boost::asio;
  using results_type = typename Resolver::results_type;
  const auto ex = co_await asio::this_coro::executor;
  struct lookup {
    explicit lookup(const asio::any_io_executor& e) : resolver(e), wake(e) {}
    Resolver resolver;
    asio::steady_timer wake;
    bool done = false;
    boost::system::error_code ec;
    results_type results;
  };
  auto st = std::make_shared<lookup>(ex);
  st->wake.expires_at(deadline);
  st->resolver.async_resolve(host, service,
                             asio::bind_executor(ex, [st](boost::system::error_code ec, results_type results) {
                               st->done = true;
                               st->ec = ec;
                               st->results = std::move(results);
                               st->wake.cancel();
                             }));
  auto [wait_ec] = co_await st->wake.async_wait(asio::as_tuple(asio::use_awaitable));
  if (st->done) co_return std::tuple{st->ec, std::move(st->results)};
  st->resolver.cancel();  // ends it early where it can; its completion still holds `st`
  co_return std::tuple{wait_ec == asio::error::operation_aborted ? boost::system::error_code(asio::error::operation_aborted)
                                                                 : boost::system::error_code(asio::error::timed_out),
                       results_type{}};
}

}  // namespace kvx::transfer::detail
