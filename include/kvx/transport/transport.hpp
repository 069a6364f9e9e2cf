#pragma once
//! \file
//! The `transport` concept: how bytes move between this process's registered
//! memory and a (possibly remote) segment. The transfer engine slices,
//! stripes, retries and chooses among transports; a transport moves one
//! contiguous slice at a time, many slices in flight.
//!
//! ## Requirements
//! For a transport `T`, `t` a `T&`, `ct` a `const T&`, `seg` a `const kvx::memory::local_segment&`,
//! `remote` a `const kvx::memory::segment_descriptor&`, `off` a `std::uint64_t`,
//! `dst` a `std::span<std::byte>`, `src` a `std::span<const std::byte>`, `token` a completion token:
//!
//! | expression | type | semantics |
//! | --- | --- | --- |
//! | `typename T::transport_concept` | `kvx::transport::transport_tag` | opts in |
//! | `T::name()` | `std::string_view` | "tcp", "shm", ... (the key of its entry in a descriptor's `transports`) |
//! | `T::capabilities` | `constexpr transport_capabilities` | compile-time properties callers constrain on |
//! | `t.get_executor()` | an Asio executor | where completions run |
//! | `t.register_memory(seg)` | `result<nlohmann::json>` | makes `seg` reachable through this transport; returns the entry peers need (published in the descriptor under `name()`). May block (pins pages, maps rkeys). Thread-safe. |
//! | `t.deregister_memory(seg)` | `result<void>` | undoes it; waits for remote accesses in flight on `seg` |
//! | `ct.can_transfer(remote)` | `std::error_code` | run-time check: can this transport reach `remote` (entry present, same host for shm, memory kind supported)? No I/O. |
//! | `t.async_read(remote, off, dst, token)` | per token, `void(std::error_code)` | copies `dst.size()` bytes at `off` of `remote` into `dst`; `dst` lies in memory registered with this transport |
//! | `t.async_write(remote, off, src, token)` | per token, `void(std::error_code)` | copies `src` to `off` of `remote` |
//!
//! Async operations never block the calling thread, honour per-operation
//! cancellation (terminal cancellation may leave the destination bytes
//! partially written, never memory outside it), and complete with a
//! `kvx::errc` code: `unknown_segment`, `bad_key`, `out_of_range` from the
//! owner's checks; `connection_lost`, `unreachable`, `timed_out`, `stale`
//! (descriptor generation no longer matches the owner's) from the link.
//! Buffers must stay valid until completion. A transport assigns the
//! handler's cancellation slot in the initiating function and clears it only
//! on the handler's associated executor, where the caller emits (the transfer
//! engine on a batch's strand), never from the thread that finished the op.
//!
//! A minimal conforming transport is `kvx::transport::local` (memcpy within
//! this process), the reference for the conformance suite in
//! `kvx/testing/transport_conformance.hpp`.

#include <concepts>
#include <cstdint>
#include <span>
#include <string_view>
#include <system_error>
#include <type_traits>

#include <nlohmann/json.hpp>

#include <kvx/core/async.hpp>
#include <kvx/core/result.hpp>
#include <kvx/memory/segment.hpp>

namespace kvx::transport {

//! Transports opt in with `using transport_concept = kvx::transport::transport_tag;`.
struct transport_tag {};

//! Memory kinds a transport can touch, as a bit set.
enum class memory_kinds : unsigned { none = 0, host = 1, cuda = 2, file = 4 };
constexpr memory_kinds operator|(memory_kinds a, memory_kinds b) noexcept {
  return static_cast<memory_kinds>(static_cast<unsigned>(a) | static_cast<unsigned>(b));
}
constexpr bool has(memory_kinds set, memory_kinds k) noexcept {
  return (static_cast<unsigned>(set) & static_cast<unsigned>(k)) != 0;
}
constexpr memory_kinds kind_of(const memory::location& l) noexcept {
  switch (l.kind) {
    case memory::location_kind::host: return memory_kinds::host;
    case memory::location_kind::cuda: return memory_kinds::cuda;
    case memory::location_kind::file: return memory_kinds::file;
  }
  return memory_kinds::none;
}

//! Compile-time properties of a transport (in the manner of cuda::mr properties).
struct transport_capabilities {
  memory_kinds memory = memory_kinds::host;  //!< memory it can read and write
  bool one_sided = true;        //!< the remote CPU does not take part (RDMA, shm); false when a peer server copies
  bool zero_copy = true;        //!< no staging copy on the data path
  bool bounce_buffered = false; //!< bytes pass through an intermediate buffer (TCP socket buffers)
  bool same_host_only = false;  //!< reaches only segments on this host
  bool same_process_only = false;  //!< reaches only segments of this process
  //! Slices handed to this transport are at least this large (when the op
  //! is): a transport whose per-op cost only large copies amortize (cuda_ipc
  //! at GPU memory speed) raises the engine's `slice_size` for its ops. 0: the engine's.
  std::uint64_t min_slice = 0;
};

namespace detail {
struct archetype_handler {
  void operator()(std::error_code) const {}
};
}  // namespace detail

template <class T>
concept transport =
    std::same_as<typename T::transport_concept, transport_tag> &&
    requires(T& t, const T& ct, const memory::local_segment& seg, const memory::segment_descriptor& remote,
             std::uint64_t off, std::span<std::byte> dst, std::span<const std::byte> src) {
      { T::name() } -> std::convertible_to<std::string_view>;
      { T::capabilities } -> std::convertible_to<transport_capabilities>;
      t.get_executor();
      { t.register_memory(seg) } -> std::same_as<result<nlohmann::json>>;
      { t.deregister_memory(seg) } -> std::same_as<result<void>>;
      { ct.can_transfer(remote) } -> std::same_as<std::error_code>;
      t.async_read(remote, off, dst, detail::archetype_handler{});
      t.async_write(remote, off, src, detail::archetype_handler{});
    };

//! Checks `T` requirement by requirement so a custom transport fails with a
//! sentence naming what it lacks. Call it at composition points.
template <class T>
constexpr bool check_transport() {
  static_assert(requires { typename T::transport_concept; },
                "kvx: transport T lacks `using transport_concept = kvx::transport::transport_tag;`");
  static_assert(std::same_as<typename T::transport_concept, transport_tag>,
                "kvx: transport T's transport_concept must be kvx::transport::transport_tag");
  static_assert(requires { { T::name() } -> std::convertible_to<std::string_view>; },
                "kvx: transport T lacks static name() -> std::string_view");
  static_assert(requires { { T::capabilities } -> std::convertible_to<transport_capabilities>; },
                "kvx: transport T lacks static constexpr transport_capabilities capabilities");
  static_assert(requires(T& t) { t.get_executor(); }, "kvx: transport T lacks get_executor()");
  static_assert(requires(T& t, const memory::local_segment& s) {
    { t.register_memory(s) } -> std::same_as<result<nlohmann::json>>;
  }, "kvx: transport T lacks register_memory(const local_segment&) -> result<nlohmann::json>");
  static_assert(requires(T& t, const memory::local_segment& s) {
    { t.deregister_memory(s) } -> std::same_as<result<void>>;
  }, "kvx: transport T lacks deregister_memory(const local_segment&) -> result<void>");
  static_assert(requires(const T& t, const memory::segment_descriptor& d) {
    { t.can_transfer(d) } -> std::same_as<std::error_code>;
  }, "kvx: transport T lacks can_transfer(const segment_descriptor&) const -> std::error_code");
  static_assert(requires(T& t, const memory::segment_descriptor& d, std::span<std::byte> dst) {
    t.async_read(d, std::uint64_t{}, dst, detail::archetype_handler{});
  }, "kvx: transport T lacks async_read(remote, offset, std::span<std::byte>, CompletionToken) with completion void(std::error_code)");
  static_assert(requires(T& t, const memory::segment_descriptor& d, std::span<const std::byte> src) {
    t.async_write(d, std::uint64_t{}, src, detail::archetype_handler{});
  }, "kvx: transport T lacks async_write(remote, offset, std::span<const std::byte>, CompletionToken) with completion void(std::error_code)");
  return true;
}

}  // namespace kvx::transport
