#pragma once
//! \file
//! kvx's one error vocabulary: `kvx::errc`, its `std::error_category`, and
//! `kvx::error`, an error code with the context a reader needs to act on it
//! (peer, segment, operation, offset).
//!
//! \code
//! std::error_code ec = kvx::errc::out_of_range;
//! kvx::error e{kvx::errc::unknown_segment, "read from peer 'decode-0' segment 'kv'"};
//! std::cerr << e.message();  // "unknown segment: read from peer 'decode-0' segment 'kv'"
//! \endcode

#include <string>
#include <string_view>
#include <system_error>
#include <utility>

namespace kvx {

//! Every way a kvx operation fails for a reason outside the caller's control.
enum class errc : int {
  invalid_argument = 1,  //!< a parameter or config value is wrong
  out_of_range,          //!< an access falls outside a registered region or a buffer
  not_found,             //!< a named thing (key, object, peer) does not exist
  already_exists,        //!< a name is taken
  unknown_segment,       //!< no segment of that name is registered
  bad_key,               //!< a registration key does not match
  malformed_message,     //!< a wire message could not be parsed
  truncated_message,     //!< a wire message ended early
  connection_lost,       //!< the peer closed or reset the connection
  unreachable,           //!< the peer could not be reached
  timed_out,             //!< the operation's deadline passed
  cancelled,             //!< the operation was cancelled
  capacity_exceeded,     //!< a tier, pool or quota is full
  checksum_mismatch,     //!< bytes arrived corrupted
  not_supported,         //!< no transport or backend can do this
  stale,                 //!< an endpoint or registration belongs to an older incarnation
  busy,                  //!< the resource is pinned or leased
  io_error,              //!< the operating system reported an I/O failure
  protocol_error,        //!< the peer broke the protocol (unexpected message)
  device_error,          //!< the GPU runtime or driver reported a failure (a faulted kernel, a lost device)
  internal,              //!< a kvx bug; please report it
};

namespace detail {
class error_category_impl final : public std::error_category {
 public:
  const char* name() const noexcept override { return "kvx"; }
  std::string message(int value) const override {
    switch (static_cast<errc>(value)) {
      case errc::invalid_argument: return "invalid argument";
      case errc::out_of_range: return "out of range";
      case errc::not_found: return "not found";
      case errc::already_exists: return "already exists";
      case errc::unknown_segment: return "unknown segment";
      case errc::bad_key: return "bad registration key";
      case errc::malformed_message: return "malformed message";
      case errc::truncated_message: return "truncated message";
      case errc::connection_lost: return "connection lost";
      case errc::unreachable: return "peer unreachable";
      case errc::timed_out: return "timed out";
      case errc::cancelled: return "cancelled";
      case errc::capacity_exceeded: return "capacity exceeded";
      case errc::checksum_mismatch: return "checksum mismatch";
      case errc::not_supported: return "not supported";
      case errc::stale: return "stale endpoint or registration";
      case errc::busy: return "busy";
      case errc::io_error: return "I/O error";
      case errc::protocol_error: return "protocol error";
      case errc::device_error: return "device error";
      case errc::internal: return "internal error";
    }
    return "unknown kvx error";
  }
  std::error_condition default_error_condition(int value) const noexcept override {
    switch (static_cast<errc>(value)) {
      case errc::invalid_argument: return std::errc::invalid_argument;
      case errc::timed_out: return std::errc::timed_out;
      case errc::cancelled: return std::errc::operation_canceled;
      case errc::not_supported: return std::errc::not_supported;
      case errc::connection_lost: return std::errc::connection_reset;
      default: return {value, *this};
    }
  }
};
}  // namespace detail

//! The identifier of an `errc` value ("out_of_range"), for wire protocols and logs.
inline const char* to_string(errc e) noexcept {
  switch (e) {
#define KVX_ERRC_NAME(x) \
  case errc::x: return #x;
    KVX_ERRC_NAME(invalid_argument) KVX_ERRC_NAME(out_of_range) KVX_ERRC_NAME(not_found)
    KVX_ERRC_NAME(already_exists) KVX_ERRC_NAME(unknown_segment) KVX_ERRC_NAME(bad_key)
    KVX_ERRC_NAME(malformed_message) KVX_ERRC_NAME(truncated_message) KVX_ERRC_NAME(connection_lost)
    KVX_ERRC_NAME(unreachable) KVX_ERRC_NAME(timed_out) KVX_ERRC_NAME(cancelled)
    KVX_ERRC_NAME(capacity_exceeded) KVX_ERRC_NAME(checksum_mismatch) KVX_ERRC_NAME(not_supported)
    KVX_ERRC_NAME(stale) KVX_ERRC_NAME(busy) KVX_ERRC_NAME(io_error) KVX_ERRC_NAME(protocol_error)
    KVX_ERRC_NAME(device_error) KVX_ERRC_NAME(internal)
#undef KVX_ERRC_NAME
  }
  return "unknown";
}

//! The `errc` named `name`, or `errc::internal` for a name this build does not know.
inline errc errc_from_string(std::string_view name) noexcept {
  for (int v = 1; v <= static_cast<int>(errc::internal); ++v)
    if (name == to_string(static_cast<errc>(v))) return static_cast<errc>(v);
  return errc::internal;
}

//! The category of `kvx::errc` codes.
inline const std::error_category& error_category() noexcept {
  static const detail::error_category_impl category;
  return category;
}

inline std::error_code make_error_code(errc e) noexcept {
  return {static_cast<int>(e), error_category()};
}

inline std::error_condition make_error_condition(errc e) noexcept {
  return {static_cast<int>(e), error_category()};
}

//! An error code and the context that locates it. `message()` reads
//! "<code message>: <context>".
class error {
 public:
  error() = default;
  error(std::error_code code, std::string context = {}) : code_(code), context_(std::move(context)) {}
  error(errc code, std::string context = {}) : code_(make_error_code(code)), context_(std::move(context)) {}

  [[nodiscard]] const std::error_code& code() const noexcept { return code_; }
  [[nodiscard]] const std::string& context() const noexcept { return context_; }
  [[nodiscard]] std::string message() const {
    return context_.empty() ? code_.message() : code_.message() + ": " + context_;
  }
  explicit operator bool() const noexcept { return static_cast<bool>(code_); }

  friend bool operator==(const error& e, errc c) noexcept { return e.code_ == make_error_code(c); }

 private:
  std::error_code code_{};
  std::string context_{};
};

}  // namespace kvx

template <>
struct std::is_error_code_enum<kvx::errc> : std::true_type {};
