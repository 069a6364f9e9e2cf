#include <kvx/core/async.hpp>

#include <gtest/gtest.h>

#include <boost/asio/any_completion_handler.hpp>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <chrono>
#include <optional>

namespace {

namespace asio = boost::asio;
using namespace std::chrono_literals;

TEST(CancelAfter, DeadlineTurnsAHangIntoTimedOut) {
  asio::io_context io;
  asio::steady_timer never(io, 1h);
  std::optional<boost::system::error_code> result;
  never.async_wait(kvx::cancel_after(5ms, [&](boost::system::error_code ec) { result = ec; }));
  io.run_for(5s);
  ASSERT_TRUE(result);
  EXPECT_EQ(*result, kvx::errc::timed_out);
}

TEST(CancelAfter, OperationThatFinishesFirstIsUntouched) {
  asio::io_context io;
  asio::steady_timer quick(io, 1ms);
  std::optional<boost::system::error_code> result;
  quick.async_wait(kvx::cancel_after(10s, [&](boost::system::error_code ec) { result = ec; }));
  const auto start = std::chrono::steady_clock::now();
  io.run();  // returns once the op is done: the deadline timer must not keep the loop alive
  ASSERT_TRUE(result);
  EXPECT_FALSE(*result);
  EXPECT_LT(std::chrono::steady_clock::now() - start, 5s);
}

TEST(CancelAfter, CallerCancellationStillReachesTheOperation) {
  asio::io_context io;
  asio::steady_timer never(io, 1h);
  asio::cancellation_signal signal;
  std::optional<boost::system::error_code> result;
  never.async_wait(asio::bind_cancellation_slot(
      signal.slot(), kvx::cancel_after(io.get_executor(), 1h, [&](boost::system::error_code ec) { result = ec; })));
  io.poll();
  signal.emit(asio::cancellation_type::terminal);
  io.run_for(5s);
  ASSERT_TRUE(result);
  EXPECT_EQ(*result, asio::error::operation_aborted);  // cancelled by the caller, not timed out
}

TEST(CancelAfter, WorksWithCoroutines) {
  asio::io_context io;
  std::optional<boost::system::error_code> result;
  asio::co_spawn(
      io,
      [&]() -> asio::awaitable<void> {
        asio::steady_timer never(co_await asio::this_coro::executor, 1h);
        auto [ec] = co_await never.async_wait(kvx::cancel_after(5ms, asio::as_tuple(asio::use_awaitable)));
        result = ec;
      },
      asio::detached);
  io.run_for(5s);
  ASSERT_TRUE(result);
  EXPECT_EQ(*result, kvx::errc::timed_out);
}

TEST(ExceptionMessage, NamesWhatOrSaysItIsNotAStdException) {
  EXPECT_EQ(kvx::exception_message(std::make_exception_ptr(std::runtime_error("the disk is gone"))), "the disk is gone");
  EXPECT_EQ(kvx::exception_message(std::make_exception_ptr(42)), "an exception that is not a std::exception");
}

TEST(ToStd, MapsAsioErrorsOntoKvxCodes) {
  EXPECT_EQ(kvx::to_std(asio::error::operation_aborted), kvx::errc::cancelled);
  EXPECT_EQ(kvx::to_std(asio::error::eof), kvx::errc::connection_lost);
  EXPECT_EQ(kvx::to_std(asio::error::connection_refused), kvx::errc::unreachable);
  EXPECT_FALSE(kvx::to_std({}));
}

}  // namespace

namespace {
TEST(CancelAfter, ExplicitExecutorServesHandlersWithoutAnIoExecutor) {
  boost::asio::io_context io;
  boost::asio::steady_timer never(io, std::chrono::hours(1));
  std::optional<boost::system::error_code> result;
  // A type-erased handler's associated executor is not an I/O executor.
  boost::asio::any_completion_handler<void(boost::system::error_code)> h = [&](boost::system::error_code ec) { result = ec; };
  never.async_wait(kvx::cancel_after(io.get_executor(), std::chrono::milliseconds(5), std::move(h)));
  io.run_for(std::chrono::seconds(5));
  ASSERT_TRUE(result);
  EXPECT_EQ(*result, kvx::errc::timed_out);
}
}  // namespace
