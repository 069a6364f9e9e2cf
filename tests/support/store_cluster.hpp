#pragma once
// Where in-process store tests start: a master (state and server on
// loopback, ticking every 50 ms) and an embedded metadata backend on one
// io_context. A fixture derives from it and passes the master's config.
//
//   struct MyTest : ::testing::Test, kvx::test::store_cluster<state_type> {
//     MyTest() : store_cluster(my_config()) {}
//   };

#include <chrono>
#include <utility>

#include <boost/asio/io_context.hpp>

#include <kvx/core/metrics.hpp>
#include <kvx/store/master_server.hpp>
#include <kvx/store/master_state.hpp>
#include <kvx/transfer/embedded_metadata.hpp>

#include "support/store_parties.hpp"

namespace kvx::test {

template <class State>
struct store_cluster {
  boost::asio::io_context io;
  kvx::metrics::registry registry;
  kvx::store::master_config config;
  State state{config, {}, registry};
  kvx::store::master_server<State> server{
      io.get_executor(), state,
      kvx::store::master_server_config{.address = "127.0.0.1", .port = 0, .tick_interval = std::chrono::milliseconds(50)}};
  kvx::transfer::embedded_metadata meta{io.get_executor()};

  explicit store_cluster(kvx::store::master_config c) : config(std::move(c)) {}

  //! Stops the master, then lets the io_context finish what stopping started.
  void stop_master() {
    server.stop();
    io.restart();
    io.run_for(std::chrono::milliseconds(100));
  }
  //! Runs `op()` (a coroutine) on `io` to completion; see `run_coroutine`.
  template <class Op>
  auto wait(Op op) {
    return run_coroutine(io, std::move(op));
  }
};

}  // namespace kvx::test
