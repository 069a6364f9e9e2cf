#pragma once
// Outstanding work on a completion handler's associated executor, held by an
// operation from its start until its handler is posted (so a context that
// runs only that executor's work does not run out of work in between).
//
// Not asio::make_work_guard: for a standard executor wrapped in a strand,
// such as the transfer engine's `strand<any_io_executor>`, Boost.Asio (1.81
// to at least 1.84, chriskohlhoff/asio#1394) picks the Networking TS
// specialisation of executor_work_guard, whose on_work_started() the inner
// any_io_executor does not have: an operation started with a strand-bound
// handler did not compile. Standard executors are asked for
// `outstanding_work.tracked` (what Asio's own operations do); only executors
// that are Networking TS executors alone (io_context::strand, asio::executor)
// get an executor_work_guard.

#include <optional>
#include <type_traits>
#include <utility>

#include <boost/asio/associated_executor.hpp>
#include <boost/asio/execution/executor.hpp>
#include <boost/asio/execution/outstanding_work.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/prefer.hpp>

namespace kvx::transport::detail {

//! `ex` with outstanding work counted on its context until the result goes.
template <class Executor>
auto track_work(const Executor& ex) {
  if constexpr (boost::asio::execution::is_executor<Executor>::value)
    return boost::asio::prefer(ex, boost::asio::execution::outstanding_work.tracked);
  else
    return boost::asio::make_work_guard(ex);
}

//! Work on the executor associated with a `Handler` (`IoExecutor` where it
//! has none), from construction until `reset()` or destruction.
template <class Handler, class IoExecutor>
class handler_work {
 public:
  using handler_executor = boost::asio::associated_executor_t<Handler, IoExecutor>;
  using tracked_type = std::decay_t<decltype(track_work(std::declval<const handler_executor&>()))>;

  handler_work(const Handler& handler, const IoExecutor& io_ex)
      : work_(track_work(boost::asio::get_associated_executor(handler, io_ex))) {}

  void reset() noexcept { work_.reset(); }

 private:
  std::optional<tracked_type> work_;
};

}  // namespace kvx::transport::detail
