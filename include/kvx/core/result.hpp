#pragma once
//! \file
//! `kvx::result<T>`: the value of a synchronous call or the `kvx::error` that
//! says why there is none.
//!
//! kvx writes its own small expected type rather than using Boost.Outcome:
//! `std::expected` is C++23, Outcome drags its own config macros and a large
//! header into every translation unit, and kvx needs only the subset below.
//! It builds with `-fno-exceptions`: `value()` on an error is a contract
//! violation and aborts with the message there.
//!
//! \code
//! kvx::result<int> parse(std::string_view s) {
//!   if (s.empty()) return kvx::error{kvx::errc::invalid_argument, "empty"};
//!   return 42;
//! }
//! if (auto r = parse("x")) use(*r); else log(r.error().message());
//! \endcode

#include <cstdio>
#include <cstdlib>
#include <type_traits>
#include <utility>
#include <variant>

#include <kvx/core/error.hpp>

namespace kvx {

namespace detail {
[[noreturn]] inline void bad_result_access(const error& e) noexcept {
  std::fprintf(stderr, "kvx: value() of a result that holds an error: %s\n", e.message().c_str());
  std::abort();
}
}  // namespace detail

template <class T>
class [[nodiscard]] result {
  static_assert(!std::is_reference_v<T>, "kvx::result<T>: T must not be a reference");
  static_assert(!std::is_same_v<std::remove_cv_t<T>, kvx::error>, "kvx::result<T>: T must not be kvx::error");

 public:
  using value_type = T;

  template <class U = T>
    requires std::is_constructible_v<T, U&&> && (!std::is_same_v<std::remove_cvref_t<U>, result>) &&
             (!std::is_same_v<std::remove_cvref_t<U>, kvx::error>) && (!std::is_same_v<std::remove_cvref_t<U>, errc>)
  result(U&& value) : state_(std::in_place_index<0>, std::forward<U>(value)) {}
  result(kvx::error e) : state_(std::in_place_index<1>, std::move(e)) {}
  result(errc e) : state_(std::in_place_index<1>, kvx::error{e}) {}

  [[nodiscard]] bool has_value() const noexcept { return state_.index() == 0; }
  explicit operator bool() const noexcept { return has_value(); }

  T& value() & {
    check();
    return *std::get_if<0>(&state_);
  }
  const T& value() const& {
    check();
    return *std::get_if<0>(&state_);
  }
  T&& value() && {
    check();
    return std::move(*std::get_if<0>(&state_));
  }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T&& operator*() && { return std::move(*this).value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

  template <class U>
  T value_or(U&& fallback) const& {
    return has_value() ? *std::get_if<0>(&state_) : static_cast<T>(std::forward<U>(fallback));
  }

  //! The error; only meaningful when `!has_value()`.
  [[nodiscard]] const kvx::error& error() const& noexcept {
    static const kvx::error none{};
    const auto* e = std::get_if<1>(&state_);
    return e ? *e : none;
  }
  [[nodiscard]] std::error_code code() const noexcept { return error().code(); }

 private:
  void check() const noexcept {
    if (!has_value()) detail::bad_result_access(*std::get_if<1>(&state_));
  }
  std::variant<T, kvx::error> state_;
};

template <>
class [[nodiscard]] result<void> {
 public:
  using value_type = void;
  result() = default;
  result(kvx::error e) : error_(std::move(e)) {}
  result(errc e) : error_(kvx::error{e}) {}
  [[nodiscard]] bool has_value() const noexcept { return !error_; }
  explicit operator bool() const noexcept { return has_value(); }
  void value() const {
    if (error_) detail::bad_result_access(error_);
  }
  [[nodiscard]] const kvx::error& error() const& noexcept { return error_; }
  [[nodiscard]] std::error_code code() const noexcept { return error_.code(); }

 private:
  kvx::error error_{};
};

//! Returns from the enclosing function with the error of `expr` (a result) if
//! it holds one.
#define KVX_TRY(expr)                                       \
  do {                                                      \
    if (auto&& kvx_try_r_ = (expr); !kvx_try_r_.has_value()) \
      return kvx_try_r_.error();                            \
  } while (false)

}  // namespace kvx
