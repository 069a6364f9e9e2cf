#pragma once
//! \file
//! The `metadata_backend` concept: where cluster state lives (segment
//! descriptors, node endpoints; the store adds leases and master election).
//! kvx ships `embedded` (in process) here; Redis and etcd come with the store.
//!
//! ## Requirements
//! For a backend `M`, `m` an `M&`, `key`, `value`, `prefix` `std::string`s and `token` a completion token:
//!
//! | expression | completion | semantics |
//! | --- | --- | --- |
//! | `typename M::metadata_backend_concept` | | `kvx::transfer::metadata_backend_tag` |
//! | `m.get_executor()` | | where completions run |
//! | `m.async_put(key, value, token)` | `void(std::error_code)` | create or overwrite |
//! | `m.async_get(key, token)` | `void(std::error_code, std::string)` | `errc::not_found` when absent |
//! | `m.async_remove(key, token)` | `void(std::error_code)` | `errc::not_found` when absent |
//! | `m.async_list(prefix, token)` | `void(std::error_code, std::vector<std::pair<std::string, std::string>>)` | every key with the prefix, sorted |
//!
//! Keys used by kvx: `kvx/segment/<name>` (a `segment_descriptor` as JSON).
//! Thread-safe: operations may be started from any thread.

#include <concepts>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

namespace kvx::transfer {

struct metadata_backend_tag {};

using metadata_entries = std::vector<std::pair<std::string, std::string>>;

namespace detail {
struct metadata_archetype_handler {
  void operator()(std::error_code) const {}
  void operator()(std::error_code, std::string) const {}
  void operator()(std::error_code, metadata_entries) const {}
};
}  // namespace detail

template <class M>
concept metadata_backend = std::same_as<typename M::metadata_backend_concept, metadata_backend_tag> &&
                           requires(M& m, std::string s) {
                             m.get_executor();
                             m.async_put(s, s, detail::metadata_archetype_handler{});
                             m.async_get(s, detail::metadata_archetype_handler{});
                             m.async_remove(s, detail::metadata_archetype_handler{});
                             m.async_list(s, detail::metadata_archetype_handler{});
                           };

template <class M>
constexpr bool check_metadata_backend() {
  static_assert(requires { typename M::metadata_backend_concept; },
                "kvx: metadata backend M lacks `using metadata_backend_concept = kvx::transfer::metadata_backend_tag;`");
  static_assert(requires(M& m) { m.get_executor(); }, "kvx: metadata backend M lacks get_executor()");
  static_assert(requires(M& m, std::string s) { m.async_put(s, s, detail::metadata_archetype_handler{}); },
                "kvx: metadata backend M lacks async_put(key, value, token) completing with void(std::error_code)");
  static_assert(requires(M& m, std::string s) { m.async_get(s, detail::metadata_archetype_handler{}); },
                "kvx: metadata backend M lacks async_get(key, token) completing with void(std::error_code, std::string)");
  static_assert(requires(M& m, std::string s) { m.async_remove(s, detail::metadata_archetype_handler{}); },
                "kvx: metadata backend M lacks async_remove(key, token) completing with void(std::error_code)");
  static_assert(requires(M& m, std::string s) { m.async_list(s, detail::metadata_archetype_handler{}); },
                "kvx: metadata backend M lacks async_list(prefix, token) completing with void(std::error_code, metadata_entries)");
  return true;
}

inline std::string segment_metadata_key(const std::string& segment) { return "kvx/segment/" + segment; }

}  // namespace kvx::transfer
