// kvx::transfer::detail::bounded_resolve: a name lookup that ends at its
// deadline or at the caller's cancellation even when the resolver never
// answers (getaddrinfo stuck on a silent DNS server), and whose late answer
// is harmless.
#include <kvx/transfer/detail/bounded_resolve.hpp>

#include <gtest/gtest.h>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/strand.hpp>

#include <chrono>
#include <memory>
#include <optional>

namespace {

namespace asio = boost::asio;
using namespace std::chrono_literals;
using kvx::transfer::detail::bounded_resolve;
using clock_type = std::chrono::steady_clock;

// Answers after `delay` whatever cancel() says, as Asio's resolver does while
// getaddrinfo runs; counts its answers.
struct slow_resolver {
  using results_type = asio::ip::tcp::resolver::results_type;
  static inline clock_type::duration delay = 400ms;
  static inline int answered = 0;
  static inline int cancels = 0;
  explicit slow_resolver(const asio::any_io_executor& ex) : timer(ex) {}
  template <class Handler>
  void async_resolve(const std::string& host, const std::string& service, Handler&& h) {
    timer.expires_after(delay);
    timer.async_wait([h = std::forward<Handler>(h), host, service](boost::system::error_code) mutable {
      ++answered;
      std::move(h)(boost::system::error_code{},
                   results_type::create(asio::ip::tcp::endpoint(asio::ip::make_address("127.0.0.1"), 7), host, service));
    });
  }
  void cancel() { ++cancels; }
  asio::steady_timer timer;
};

struct outcome {
  boost::system::error_code ec;
  std::size_t results = 0;
  clock_type::duration took{};
};

template <class Resolver>
std::optional<outcome> run_lookup(asio::io_context& io, std::string host, clock_type::time_point deadline,
                                  asio::cancellation_signal* cancel = nullptr) {
  std::optional<outcome> out;
  const auto start = clock_type::now();
  auto strand = asio::make_strand(io);
  auto done = [&](std::exception_ptr e, std::tuple<boost::system::error_code, typename Resolver::results_type> r) {
    ASSERT_FALSE(e);
    out = outcome{std::get<0>(r), std::get<1>(r).size(), clock_type::now() - start};
  };
  if (cancel)
    asio::co_spawn(strand, bounded_resolve<Resolver>(std::move(host), "80", deadline),
                   asio::bind_cancellation_slot(cancel->slot(), done));
  else
    asio::co_spawn(strand, bounded_resolve<Resolver>(std::move(host), "80", deadline), done);
  io.run_for(5s);
  io.restart();
  return out;
}

TEST(BoundedResolve, ALookupThatDoesNotAnswerEndsAtTheDeadlineAndItsLateAnswerIsHarmless) {
  slow_resolver::answered = slow_resolver::cancels = 0;
  slow_resolver::delay = 400ms;
  asio::io_context io;
  std::optional<outcome> out;
  const auto start = clock_type::now();
  asio::co_spawn(io, bounded_resolve<slow_resolver>("silent.example", "80", start + 50ms),
                 [&](std::exception_ptr, std::tuple<boost::system::error_code, slow_resolver::results_type> r) {
                   out = outcome{std::get<0>(r), std::get<1>(r).size(), clock_type::now() - start};
                 });
  while (!out && io.run_one()) {
  }
  ASSERT_TRUE(out);
  EXPECT_EQ(out->ec, asio::error::timed_out);
  EXPECT_LT(out->took, 350ms) << "waited for the resolver instead of the deadline";
  EXPECT_EQ(slow_resolver::cancels, 1);
  EXPECT_EQ(slow_resolver::answered, 0);
  io.run();  // the late answer arrives into state nobody waits on
  EXPECT_EQ(slow_resolver::answered, 1);
}

TEST(BoundedResolve, AnAnswerBeforeTheDeadlineIsReturned) {
  slow_resolver::answered = slow_resolver::cancels = 0;
  slow_resolver::delay = 10ms;
  asio::io_context io;
  auto out = run_lookup<slow_resolver>(io, "fast.example", clock_type::now() + 2s);
  ASSERT_TRUE(out);
  EXPECT_FALSE(out->ec) << out->ec.message();
  EXPECT_EQ(out->results, 1u);
  EXPECT_EQ(slow_resolver::cancels, 0);
}

TEST(BoundedResolve, TheCallersCancellationEndsTheWaitWithoutADeadline) {
  slow_resolver::answered = slow_resolver::cancels = 0;
  slow_resolver::delay = 800ms;
  asio::io_context io;
  asio::cancellation_signal cancel;
  asio::steady_timer emit(io, 50ms);
  emit.async_wait([&](boost::system::error_code) { cancel.emit(asio::cancellation_type::terminal); });
  auto out = run_lookup<slow_resolver>(io, "silent.example", clock_type::time_point::max(), &cancel);
  ASSERT_TRUE(out);
  EXPECT_EQ(out->ec, asio::error::operation_aborted);
  EXPECT_LT(out->took, 500ms);
}

TEST(BoundedResolve, TheRealResolverFindsLocalhost) {
  asio::io_context io;
  auto out = run_lookup<asio::ip::tcp::resolver>(io, "localhost", clock_type::now() + 4s);
  ASSERT_TRUE(out);
  ASSERT_FALSE(out->ec) << out->ec.message();
  EXPECT_GE(out->results, 1u);
}

}  // namespace
