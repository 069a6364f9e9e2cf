#pragma once
// Private helpers of kvx/transport/ucx.hpp: UCX status mapping, hex codec
// for the blobs published in descriptors, and the shared context/allocation
// handles that may outlive a transport object.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <system_error>

#include <ucp/api/ucp.h>

#ifndef XXH_INLINE_ALL
#define XXH_INLINE_ALL
#endif
#include <xxhash.h>

#include <kvx/core/error.hpp>
#include <kvx/core/splitmix64.hpp>
#include <kvx/core/result.hpp>

namespace kvx::transport::detail {

//! Maps a UCX status onto kvx's vocabulary; the UCX text goes into the context.
inline std::error_code ucx_code(ucs_status_t s) noexcept {
  switch (s) {
    case UCS_OK: return {};
    case UCS_ERR_CANCELED: return errc::cancelled;
    case UCS_ERR_TIMED_OUT: return errc::timed_out;
    case UCS_ERR_UNREACHABLE: return errc::unreachable;
    case UCS_ERR_CONNECTION_RESET:
    case UCS_ERR_ENDPOINT_TIMEOUT:
    case UCS_ERR_REJECTED:
    case UCS_ERR_NOT_CONNECTED: return errc::connection_lost;
    case UCS_ERR_INVALID_PARAM: return errc::invalid_argument;
    case UCS_ERR_UNSUPPORTED: return errc::not_supported;
    case UCS_ERR_NO_MEMORY:
    case UCS_ERR_NO_RESOURCE:
    case UCS_ERR_EXCEEDS_LIMIT: return errc::capacity_exceeded;
    case UCS_ERR_INVALID_ADDR: return errc::out_of_range;
    default: return errc::io_error;
  }
}

inline error ucx_error(ucs_status_t s, const std::string& what) {
  return error{ucx_code(s), what + " (UCX: " + ucs_status_string(s) + ")"};
}

inline std::string to_hex(const void* data, std::size_t n) {
  static constexpr char digits[] = "0123456789abcdef";
  std::string out(2 * n, '0');
  const auto* p = static_cast<const unsigned char*>(data);
  for (std::size_t i = 0; i < n; ++i) {
    out[2 * i] = digits[p[i] >> 4];
    out[2 * i + 1] = digits[p[i] & 15];
  }
  return out;
}

inline constexpr std::size_t ucx_blob_slack = 256;

//! Decodes lowercase or uppercase hex for UCX; an odd length or a non-hex
//! digit is malformed. The bytes are followed by `ucx_blob_slack` zero bytes
//! (counted in the size): UCX reads a blob without its length, and a blob
//! shorter than it expects must not make it read past the buffer.
inline result<std::string> from_hex(std::string_view hex, std::string_view field) {
  if (hex.empty() || hex.size() % 2 != 0)
    return error{errc::malformed_message, "ucx entry field '" + std::string(field) + "': not an even-length hex string"};
  auto nibble = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  const std::size_t n = hex.size() / 2;
  std::string out(n + ucx_blob_slack, '\0');
  for (std::size_t i = 0; i < n; ++i) {
    const int hi = nibble(hex[2 * i]);
    const int lo = nibble(hex[2 * i + 1]);
    if (hi < 0 || lo < 0)
      return error{errc::malformed_message, "ucx entry field '" + std::string(field) + "': non-hex digit"};
    out[i] = static_cast<char>((hi << 4) | lo);
  }
  return out;
}

//! A check over the worker address and rkey an entry carries. UCX parses
//! both blobs without a length, so a truncated or corrupted one would be read
//! past its end (a crash in `ucp_ep_rkey_unpack`); the initiator compares
//! this before handing a blob to UCX. It catches corruption, not forgery
//! (the rkey is the access capability, as in RDMA).
inline std::uint64_t ucx_blob_check(std::string_view address_hex, std::string_view rkey_hex) noexcept {
  return XXH3_64bits_withSeed(rkey_hex.data(), rkey_hex.size(), XXH3_64bits(address_hex.data(), address_hex.size()));
}

//! Binds a published entry to the descriptor's registration key without
//! publishing the key twice (splitmix64 finaliser: a check, not a secret;
//! the rkey is the access capability, as in RDMA).
constexpr std::uint64_t ucx_key_check(std::uint64_t key) noexcept { return splitmix64_next(key); }

//! The UCP context, shared by the transport and by the buffers it allocated
//! (a buffer may outlive its transport; the context goes last).
struct ucx_context_holder {
  ucp_context_h context = nullptr;
  ucx_context_holder() = default;
  ucx_context_holder(const ucx_context_holder&) = delete;
  ucx_context_holder& operator=(const ucx_context_holder&) = delete;
  ~ucx_context_holder() {
    if (context) ucp_cleanup(context);
  }
};

//! Memory allocated by UCX (ucp_mem_map with UCP_MEM_MAP_ALLOCATE), which the
//! shared-memory transports (posix, sysv) can expose to peers for true
//! one-sided access; user memory they can only reach through UCX's
//! active-message emulation of RMA.
struct ucx_allocation {
  std::shared_ptr<ucx_context_holder> ctx;
  ucp_mem_h memh = nullptr;
  void* address = nullptr;
  std::size_t length = 0;
  ucx_allocation() = default;
  ucx_allocation(const ucx_allocation&) = delete;
  ucx_allocation& operator=(const ucx_allocation&) = delete;
  ~ucx_allocation() {
    if (memh) ucp_mem_unmap(ctx->context, memh);
  }
};

}  // namespace kvx::transport::detail
