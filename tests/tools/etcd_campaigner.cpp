// A second process for the election failover test: campaigns for a role on
// an etcd server and reports on stdout, one line each:
//   "campaigning"            started
//   "leader <revision>"      became the leader
//   "lost"                   stopped leading (then campaigns again)
//   "error <message>"        campaigning failed
// Usage: kvx_test_etcd_campaigner <address> <prefix> <role> <candidate> <ttl_ms>
// It runs until killed: the test kills it with SIGKILL to play a dead master.

#include <kvx/store/etcd_election.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace asio = boost::asio;

int main(int argc, char** argv) {
  if (argc != 6) {
    std::fprintf(stderr, "usage: %s <address> <prefix> <role> <candidate> <ttl_ms>\n", argv[0]);
    return 2;
  }
  asio::io_context io;
  kvx::store::etcd_metadata etcd(io.get_executor(), {.address = argv[1], .prefix = argv[2]});
  kvx::store::etcd_election election(etcd, argv[3], argv[4],
                                     {.ttl = std::chrono::milliseconds(std::atol(argv[5])), .poll_interval = std::chrono::milliseconds(100)});
  asio::co_spawn(
      io,
      [&]() -> asio::awaitable<void> {
        for (;;) {
          std::printf("campaigning\n");
          std::fflush(stdout);
          std::error_code ec = co_await election.async_campaign(asio::use_awaitable);
          if (ec) {
            std::printf("error %s\n", ec.message().c_str());
            std::fflush(stdout);
            co_return;
          }
          std::printf("leader %lld\n", static_cast<long long>(election.leader_revision()));
          std::fflush(stdout);
          co_await election.async_wait_lost(asio::use_awaitable);
          std::printf("lost\n");
          std::fflush(stdout);
        }
      },
      asio::detached);
  io.run();
  return 0;
}
