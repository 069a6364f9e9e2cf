// Drives an io_context until a condition holds, with a deadline: a test that
// would hang fails instead.
#pragma once

#include <boost/asio/io_context.hpp>

#include <chrono>

namespace kvx::test {

//! Runs `io`'s handlers until `done()`; false once `limit` has passed.
template <class Pred>
bool run_until(boost::asio::io_context& io, Pred done, std::chrono::milliseconds limit = std::chrono::seconds(10)) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (!done()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    if (io.stopped()) io.restart();
    io.run_one_for(std::chrono::milliseconds(5));
  }
  return true;
}

}  // namespace kvx::test
