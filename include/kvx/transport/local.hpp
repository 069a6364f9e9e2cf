#pragma once
//! \file
//! `kvx::transport::local`: transfers between segments of this process by
//! memcpy. The reference transport of the conformance suite and the test
//! double for higher layers (two engines in one process reach each other
//! through it).
//!
//! Registrations go into a process-wide table, so every `local` instance in
//! the process sees every other's segments, checked like a remote access
//! (key, bounds, generation). The copy runs on the initiating thread; the
//! completion is posted, never run inline.
//!
//! \code
//! asio::io_context io;
//! kvx::transport::local t(io.get_executor());
//! t.async_read(remote_descriptor, 0, std::span(buf), [](std::error_code ec) { ... });
//! \endcode

#include <cstring>
#include <span>
#include <string_view>

#include <boost/asio/any_io_executor.hpp>

#include <kvx/core/async.hpp>
#include <kvx/core/log.hpp>
#include <kvx/memory/segment_table.hpp>
#include <kvx/transport/transport.hpp>

namespace kvx::transport {

namespace detail {
inline memory::segment_table& local_process_table() {
  static memory::segment_table table("local-process", 0);
  return table;
}
}  // namespace detail

class local {
 public:
  using transport_concept = transport_tag;
  using executor_type = asio::any_io_executor;
  static constexpr transport_capabilities capabilities{.memory = memory_kinds::host,
                                                       .one_sided = true,
                                                       .zero_copy = true,
                                                       .bounce_buffered = false,
                                                       .same_host_only = true,
                                                       .same_process_only = true};
  static constexpr std::string_view name() noexcept { return "local"; }

  explicit local(executor_type ex) : ex_(std::move(ex)) {}

  [[nodiscard]] executor_type get_executor() const noexcept { return ex_; }

  result<nlohmann::json> register_memory(const memory::local_segment& seg) {
    if (!seg.region.where.is_host_accessible())
      return error{errc::not_supported, "local transport: segment '" + seg.name + "' is " + seg.region.where.to_string()};
    auto added = detail::local_process_table().adopt(seg);
    KVX_TRY(added);
    return nlohmann::json{{"process", process_token()}};
  }

  result<void> deregister_memory(const memory::local_segment& seg) {
    return detail::local_process_table().remove(seg.name);
  }

  [[nodiscard]] std::error_code can_transfer(const memory::segment_descriptor& remote) const {
    if (remote.host_id != memory::this_host_id()) return errc::unreachable;
    auto it = remote.transports.find(name());
    if (it == remote.transports.end() || !it->is_object()) return errc::unreachable;
    // A peer's descriptor: a "process" of another type is another process, not an exception.
    const auto process = it->find("process");
    if (process == it->end() || !process->is_string() || process->get_ref<const std::string&>() != process_token())
      return errc::unreachable;
    if (!has(capabilities.memory, kind_of(remote.where))) return errc::not_supported;
    return {};
  }

  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_read(const memory::segment_descriptor& remote, std::uint64_t offset, std::span<std::byte> dst,
                  CompletionToken&& token) {
    return asio::async_initiate<CompletionToken, void(std::error_code)>(
        [this](auto handler, const memory::segment_descriptor& r, std::uint64_t off, std::span<std::byte> d) {
          auto ec = copy(r, off, d.size(), [&](std::byte* p) { std::memcpy(d.data(), p, d.size()); });
          kvx::detail::post_completion(ex_, std::move(handler), ec);
        },
        token, std::cref(remote), offset, dst);
  }

  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_write(const memory::segment_descriptor& remote, std::uint64_t offset, std::span<const std::byte> src,
                   CompletionToken&& token) {
    return asio::async_initiate<CompletionToken, void(std::error_code)>(
        [this](auto handler, const memory::segment_descriptor& r, std::uint64_t off, std::span<const std::byte> s) {
          auto ec = copy(r, off, s.size(), [&](std::byte* p) { std::memcpy(p, s.data(), s.size()); });
          kvx::detail::post_completion(ex_, std::move(handler), ec);
        },
        token, std::cref(remote), offset, src);
  }

 private:
  // Distinguishes this process from others that publish `local` entries to a shared backend.
  static const std::string& process_token() {
    static const std::string token = memory::this_host_id() + "/" + std::to_string(memory::detail::random_u64());
    return token;
  }

  template <class Copy>
  std::error_code copy(const memory::segment_descriptor& r, std::uint64_t off, std::size_t len, Copy&& do_copy) {
    if (auto ec = can_transfer(r)) return ec;
    auto access = detail::local_process_table().check_access(r.name, r.key, off, len);
    if (!access) {
      log(log_level::debug, "local transport: ", access.error().message());
      return access.code();
    }
    if (access->segment().generation != r.generation) return errc::stale;
    if (len) do_copy(access->data());
    return {};
  }

  executor_type ex_;
};

static_assert(check_transport<local>());

}  // namespace kvx::transport
