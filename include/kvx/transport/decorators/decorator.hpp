#pragma once
//! \file
//! `decorator<T>`: what every transport decorator (`metered`, `faulty`,
//! `checksummed`, the testing `impulse`) shares: it owns the transport it
//! wraps, declares the same capabilities and name, and forwards executor,
//! registration and `can_transfer` to it unchanged. A decorator derives from
//! it and writes only `async_read` / `async_write` (and what it adds):
//!
//! \code
//! template <class T>
//! class traced : public kvx::transport::decorator<T> {
//!  public:
//!   template <class... Args>
//!   explicit traced(Args&&... inner_args) : kvx::transport::decorator<T>(std::in_place, std::forward<Args>(inner_args)...) {}
//!   template <class Token> auto async_read(const kvx::memory::segment_descriptor& r, std::uint64_t off,
//!                                          std::span<std::byte> dst, Token&& token) {
//!     log(r, off, dst.size());
//!     return this->inner().async_read(r, off, dst, std::forward<Token>(token));
//!   }
//!   // async_write likewise
//! };
//! \endcode
//!
//! The wrapped transport is the first thing constructed and the last
//! destroyed, so a decorator's own members may refer to it.

#include <string_view>
#include <system_error>
#include <utility>

#include <nlohmann/json.hpp>

#include <kvx/core/result.hpp>
#include <kvx/memory/segment.hpp>
#include <kvx/transport/transport.hpp>

namespace kvx::transport {

template <class T>
class decorator {
  static_assert(check_transport<T>());

 public:
  using transport_concept = transport_tag;
  using inner_type = T;
  using executor_type = decltype(std::declval<T&>().get_executor());
  static constexpr transport_capabilities capabilities = T::capabilities;
  static constexpr std::string_view name() noexcept { return T::name(); }

  [[nodiscard]] executor_type get_executor() const noexcept { return inner_.get_executor(); }
  T& inner() noexcept { return inner_; }
  const T& inner() const noexcept { return inner_; }

  result<nlohmann::json> register_memory(const memory::local_segment& s) { return inner_.register_memory(s); }
  result<void> deregister_memory(const memory::local_segment& s) { return inner_.deregister_memory(s); }
  [[nodiscard]] std::error_code can_transfer(const memory::segment_descriptor& r) const { return inner_.can_transfer(r); }

 protected:
  //! Constructs the wrapped transport from `inner_args`.
  template <class... Args>
  explicit decorator(std::in_place_t, Args&&... inner_args) : inner_(std::forward<Args>(inner_args)...) {}

  T inner_;
};

}  // namespace kvx::transport
