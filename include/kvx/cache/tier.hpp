#pragma once
//! \file
//! The `tier` concept: one level of the cache's storage (GPU memory, host
//! DRAM, SSD), a key-value store of whole blocks with a capacity in bytes.
//!
//! A tier stores and loads a block's bytes by key into and out of a caller's
//! buffer. It does not evict: `tiered_cache` decides what leaves (eviction
//! policies) and where it goes (tiering policies), and uses the watermarks to
//! evict in batches (from above `high` down to `low`).
//!
//! ## Requirements
//!
//! For a type `T`, `t` a `T`, `ct` a `const T`, `k` a `block_key`, `in` a
//! `std::span<const std::byte>` and `out` a `std::span<std::byte>`:
//!
//! | expression | type | semantics |
//! | --- | --- | --- |
//! | `typename T::tier_concept` | `tier_tag` | opts `T` in |
//! | `T::host_accessible` | `static constexpr bool` | the bytes are in memory the CPU can address (capability, after CCCL's `host_accessible`) |
//! | `ct.name()` | `std::string_view` | for metrics labels and error messages |
//! | `ct.capacity()` | `std::uint64_t` | bytes the tier may hold |
//! | `ct.used_bytes()` | `std::uint64_t` | bytes held (allocation granularity included) |
//! | `ct.marks()` | `watermarks` | fractions of `capacity()`: evict above `high` down to `low` |
//! | `t.store(k, in)` | `result<void>` | copies `in` as block `k`; visible to `load` once it returns; `errc::already_exists` if `k` is held, `errc::capacity_exceeded` if no room |
//! | `t.load(k, out)` | `result<std::size_t>` | copies block `k` into `out` and returns its size; `errc::not_found`, `errc::out_of_range` if `out` is too small |
//! | `t.erase(k)` | `bool` | frees block `k`; false if not held |
//! | `ct.contains(k)` | `bool` | |
//! | `ct.size_of(k)` | `std::optional<std::uint64_t>` | the stored size of `k` |
//!
//! Optional: `ct.footprint(n)` -> `std::uint64_t`, the bytes a block of `n`
//! bytes occupies once stored (allocation rounding), so the cache's
//! accounting and watermarks match what the tier can hold
//! (`kvx::cache::footprint` falls back to `n`).
//!
//! Optional: `t.load_many(keys, outs, on_block)` loads several blocks with
//! reads in flight together and calls `on_block(i, std::error_code)` as each
//! one lands (`kvx::cache::load_many` falls back to a loop of `load`).
//!
//! Optional, placement: a tier that lets its caller keep where each block
//! lies, so that a cache that already has an index entry per block needs no
//! second hash map inside the tier (the DRAM tier has them). `a` is a
//! `memory::allocation`:
//!
//! | expression | type | semantics |
//! | --- | --- | --- |
//! | `t.place(n)` | `std::optional<memory::allocation>` | room for a block of `n` bytes, or `std::nullopt` if none |
//! | `t.write_at(a, in)` | `result<void>` | copies `in` into `a` (no lock held during the copy) |
//! | `t.read_at(a, out)` | `result<std::size_t>` | copies the first `out.size()` bytes of `a` into `out` |
//! | `t.unplace(a)` | `void` | returns `a` |
//!
//! A block stored this way is the caller's: `contains`, `load`, `erase` and
//! `size_of` by key do not see it (`used_bytes` does). The caller must not
//! `unplace` a range while a copy into or out of it is in flight.
//!
//! Thread safety: every member is safe to call concurrently; calls on
//! distinct keys copy bytes in parallel (a tier locks only its index and
//! allocator, never around the copy). The caller must not `erase` or
//! re-`store` a key while a `load` of it is in flight; `tiered_cache`
//! guarantees this with pins. `store`, `load` and `load_many` block for the
//! copy (memcpy for DRAM, the I/O for files).
//!
//! ## A minimal conforming tier
//! \code
//! struct map_tier {
//!   using tier_concept = kvx::cache::tier_tag;
//!   static constexpr bool host_accessible = true;
//!   std::string_view name() const { return "map"; }
//!   std::uint64_t capacity() const { return 1 << 20; }
//!   std::uint64_t used_bytes() const;                 // sum of stored sizes
//!   kvx::cache::watermarks marks() const { return {}; }
//!   kvx::result<void> store(const block_key&, std::span<const std::byte>);
//!   kvx::result<std::size_t> load(const block_key&, std::span<std::byte>);
//!   bool erase(const block_key&);
//!   bool contains(const block_key&) const;
//!   std::optional<std::uint64_t> size_of(const block_key&) const;
//! };
//! static_assert(kvx::cache::tier<map_tier>);
//! \endcode
//! docs/cache.md has a complete one (examples/11_tiered_cache.cpp).

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>

#include <kvx/cache/block_key.hpp>
#include <kvx/core/result.hpp>
#include <kvx/memory/allocator.hpp>

namespace kvx::cache {

//! The tag a type names as `tier_concept` to opt in.
struct tier_tag {};

//! Eviction thresholds as fractions of a tier's capacity: an insert that
//! takes the tier above `high` evicts until it is at or below `low`.
struct watermarks {
  double high = 0.95;
  double low = 0.85;
  friend constexpr bool operator==(const watermarks&, const watermarks&) = default;
};

//! An error unless `0 < low <= high <= 1`; `what` names the config field.
inline result<void> validate(const watermarks& m, std::string_view what = "watermarks") {
  if (!(m.high > 0.0 && m.high <= 1.0) || !(m.low > 0.0 && m.low <= m.high))
    return error{errc::invalid_argument, std::string(what) + ": need 0 < low <= high <= 1, got low " +
                                             std::to_string(m.low) + " high " + std::to_string(m.high)};
  return {};
}

namespace detail {
template <class T>
concept has_tier_tag = requires { typename T::tier_concept; } && std::same_as<typename T::tier_concept, tier_tag>;
template <class T>
concept has_host_accessible = requires {
  { std::bool_constant<T::host_accessible>{} };
};
template <class T>
concept has_tier_info = requires(const T& t) {
  { t.name() } -> std::convertible_to<std::string_view>;
  { t.capacity() } -> std::convertible_to<std::uint64_t>;
  { t.used_bytes() } -> std::convertible_to<std::uint64_t>;
  { t.marks() } -> std::same_as<watermarks>;
};
template <class T>
concept has_store = requires(T& t, const block_key& k, std::span<const std::byte> in) {
  { t.store(k, in) } -> std::same_as<result<void>>;
};
template <class T>
concept has_load = requires(T& t, const block_key& k, std::span<std::byte> out) {
  { t.load(k, out) } -> std::same_as<result<std::size_t>>;
};
template <class T>
concept has_erase = requires(T& t, const block_key& k) {
  { t.erase(k) } -> std::same_as<bool>;
};
template <class T>
concept has_lookup = requires(const T& t, const block_key& k) {
  { t.contains(k) } -> std::same_as<bool>;
  { t.size_of(k) } -> std::same_as<std::optional<std::uint64_t>>;
};
struct on_block_archetype {
  void operator()(std::size_t, std::error_code) const;
};
template <class T>
concept has_footprint = requires(const T& t, std::uint64_t n) {
  { t.footprint(n) } -> std::convertible_to<std::uint64_t>;
};
template <class T>
concept has_placement = requires(T& t, const T& ct, std::uint64_t n, const memory::allocation& a,
                                 std::span<const std::byte> in, std::span<std::byte> out) {
  { t.place(n) } -> std::same_as<std::optional<memory::allocation>>;
  { t.write_at(a, in) } -> std::same_as<result<void>>;
  { ct.read_at(a, out) } -> std::same_as<result<std::size_t>>;
  t.unplace(a);
};
template <class T>
concept has_load_many = requires(T& t, std::span<const block_key> keys, std::span<const std::span<std::byte>> outs,
                                 on_block_archetype f) { t.load_many(keys, outs, f); };
}  // namespace detail

//! `T` is one level of cache storage; see the requirements table above.
template <class T>
concept tier = detail::has_tier_tag<T> && detail::has_host_accessible<T> && detail::has_tier_info<T> &&
               detail::has_store<T> && detail::has_load<T> && detail::has_erase<T> && detail::has_lookup<T>;

//! One `static_assert` per requirement, each a sentence naming what `T` lacks.
template <class T>
constexpr bool check_tier() {
  static_assert(detail::has_tier_tag<T>, "kvx: tier T lacks `using tier_concept = kvx::cache::tier_tag;`");
  static_assert(detail::has_host_accessible<T>, "kvx: tier T lacks `static constexpr bool host_accessible`");
  static_assert(detail::has_tier_info<T>,
                "kvx: tier T lacks name(), capacity(), used_bytes() or marks() (const; marks() -> watermarks)");
  static_assert(detail::has_store<T>, "kvx: tier T lacks store(const block_key&, std::span<const std::byte>) -> result<void>");
  static_assert(detail::has_load<T>, "kvx: tier T lacks load(const block_key&, std::span<std::byte>) -> result<std::size_t>");
  static_assert(detail::has_erase<T>, "kvx: tier T lacks erase(const block_key&) -> bool");
  static_assert(detail::has_lookup<T>,
                "kvx: tier T lacks contains(const block_key&) -> bool or size_of(const block_key&) -> "
                "std::optional<std::uint64_t> (const)");
  return tier<T>;
}

//! Whether tier `T` lets its caller keep block placements (see the table
//! above); `tiered_cache` then indexes such a tier's blocks itself.
template <class T>
inline constexpr bool has_placement_v = detail::has_placement<T>;

//! Whether tier `T` keeps its bytes in host-addressable memory.
template <tier T>
inline constexpr bool is_host_accessible_v = T::host_accessible;

//! Bytes a block of `n` bytes occupies in `t` once stored.
template <tier T>
std::uint64_t footprint(const T& t, std::uint64_t n) {
  if constexpr (detail::has_footprint<T>)
    return t.footprint(n);
  else
    return n;
}

//! Loads `keys[i]` into `outs[i]` for every i, calling `on_block(i, ec)` as
//! each block lands: the tier's own pipelined `load_many` when it has one,
//! else one `load` after another. Blocks the calling thread until all landed.
template <tier T, class OnBlock>
void load_many(T& t, std::span<const block_key> keys, std::span<const std::span<std::byte>> outs, OnBlock&& on_block) {
  if constexpr (detail::has_load_many<T>) {
    t.load_many(keys, outs, on_block);
  } else {
    for (std::size_t i = 0; i < keys.size(); ++i) {
      auto r = i < outs.size() ? t.load(keys[i], outs[i]) : result<std::size_t>(errc::out_of_range);
      on_block(i, r ? std::error_code{} : r.code());
    }
  }
}

}  // namespace kvx::cache
