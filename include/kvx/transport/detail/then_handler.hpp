#pragma once
// A completion handler that runs `then(handler, ec)` and keeps every
// association (executor, allocator, cancellation slot) of the wrapped
// handler, so a decorator adding work after an inner operation is invisible
// to the caller's executor and cancellation.

#include <system_error>
#include <utility>

#include <boost/asio/associator.hpp>

namespace kvx::transport::detail {

template <class Handler, class Then>
struct then_handler {
  Handler handler;
  Then then;

  void operator()(std::error_code ec) { std::move(then)(std::move(handler), ec); }
};

template <class Handler, class Then>
then_handler<std::decay_t<Handler>, std::decay_t<Then>> make_then_handler(Handler&& h, Then&& t) {
  return {std::forward<Handler>(h), std::forward<Then>(t)};
}

}  // namespace kvx::transport::detail

template <template <class, class> class Associator, class Handler, class Then, class DefaultCandidate>
struct boost::asio::associator<Associator, kvx::transport::detail::then_handler<Handler, Then>, DefaultCandidate> {
  using type = typename Associator<Handler, DefaultCandidate>::type;
  static type get(const kvx::transport::detail::then_handler<Handler, Then>& h) noexcept {
    return Associator<Handler, DefaultCandidate>::get(h.handler);
  }
  static auto get(const kvx::transport::detail::then_handler<Handler, Then>& h, const DefaultCandidate& c) noexcept
      -> decltype(Associator<Handler, DefaultCandidate>::get(h.handler, c)) {
    return Associator<Handler, DefaultCandidate>::get(h.handler, c);
  }
};
