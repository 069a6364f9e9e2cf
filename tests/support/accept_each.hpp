// For tests that play a server's part on loopback: accepts connections on
// `acceptor` until it closes and runs `serve(socket)` for each as its own
// coroutine.
//
//   asio::co_spawn(io, kvx::test::accept_each(acceptor, [this](tcp::socket s) { return serve(std::move(s)); }), asio::detached);
#pragma once

#include <functional>
#include <utility>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/use_awaitable.hpp>

namespace kvx::test {

inline boost::asio::awaitable<void> accept_each(
    boost::asio::ip::tcp::acceptor& acceptor,
    std::function<boost::asio::awaitable<void>(boost::asio::ip::tcp::socket)> serve) {
  namespace asio = boost::asio;
  for (;;) {
    auto [ec, socket] = co_await acceptor.async_accept(asio::as_tuple(asio::use_awaitable));
    if (ec) co_return;
    asio::co_spawn(acceptor.get_executor(), serve(std::move(socket)), asio::detached);
  }
}

}  // namespace kvx::test
