#pragma once
//! \file
//! The `allocator` concept: how a pool segment (a DRAM arena, a file, a
//! registered GPU buffer) is carved into blocks. An allocator hands out
//! offsets into a range `[0, capacity())` it never touches; the bytes live
//! elsewhere, so one allocator type serves every tier and the store.
//!
//! ## Requirements
//!
//! For a type `A`, `a` an `A`, `ca` a `const A`, `n` and `align` of type
//! `std::uint64_t` and `x` an `allocation` that `a` returned:
//!
//! | expression | type | semantics |
//! | --- | --- | --- |
//! | `typename A::allocator_concept` | `allocator_tag` | opts `A` in |
//! | `A(std::uint64_t capacity)` | | manages `[0, capacity)` |
//! | `a.allocate(n, align)` | `std::optional<allocation>` | a range of at least `n` bytes at an offset that is a multiple of `align` (a power of two); `size` is what was granted (`>= n`); `std::nullopt` when no free range fits. `n == 0` or `align` not a power of two is a contract violation (`std::invalid_argument`) |
//! | `a.deallocate(x)` | `void` | returns `x`; freeing what was not handed out (or twice) is a contract violation (`std::logic_error`) where the allocator can see it |
//! | `ca.capacity()` | `std::uint64_t` | bytes managed |
//! | `ca.free_bytes()` | `std::uint64_t` | bytes not handed out |
//! | `ca.largest_free_block()` | `std::uint64_t` | the largest `n` that `allocate(n, 1)` can currently satisfy |
//!
//! Optional: `ca.granted_size(n)` -> `std::uint64_t`, the size an allocation
//! of `n` bytes occupies, so an owner can account for rounding up front
//! (`UINT64_MAX` when no allocation of `n` bytes is ever granted); and
//! `a.allocate_at(offset, n)` -> `std::optional<allocation>`, exactly the
//! range `[offset, offset + granted)` if all of it is free, else
//! `std::nullopt` (the store master rebuilds its books from what nodes
//! report after a failover with it: `allocator_with_placement`).
//!
//! Thread safety: none; the owner (a tier, a store segment) serializes calls.
//! No call blocks; costs are O(log n) in the number of free ranges for
//! `offset_allocator` and O(1) for `slab_allocator`.
//!
//! \code
//! kvx::memory::offset_allocator a(1 << 30);
//! if (auto x = a.allocate(64 * 1024, 4096)) { use(base + x->offset, x->size); a.deallocate(*x); }
//! static_assert(kvx::memory::allocator<kvx::memory::offset_allocator>);
//! \endcode

#include <concepts>
#include <cstdint>
#include <optional>

namespace kvx::memory {

//! The tag a type names as `allocator_concept` to opt in.
struct allocator_tag {};

//! A range handed out by an allocator: `[offset, offset + size)`.
struct allocation {
  std::uint64_t offset = 0;
  std::uint64_t size = 0;
  friend constexpr bool operator==(const allocation&, const allocation&) = default;
};

namespace detail {
template <class A>
concept has_allocator_tag = requires { typename A::allocator_concept; } &&
                            std::same_as<typename A::allocator_concept, allocator_tag>;
template <class A>
concept has_allocate = requires(A& a, std::uint64_t n) {
  { a.allocate(n, n) } -> std::same_as<std::optional<allocation>>;
};
template <class A>
concept has_deallocate = requires(A& a, const allocation& x) { a.deallocate(x); };
template <class A>
concept has_allocator_stats = requires(const A& a) {
  { a.capacity() } -> std::convertible_to<std::uint64_t>;
  { a.free_bytes() } -> std::convertible_to<std::uint64_t>;
  { a.largest_free_block() } -> std::convertible_to<std::uint64_t>;
};
template <class A>
concept has_allocate_at = requires(A& a, std::uint64_t n) {
  { a.allocate_at(n, n) } -> std::same_as<std::optional<allocation>>;
};
}  // namespace detail

//! `A` carves `[0, capacity)` into allocations; see the requirements table above.
template <class A>
concept allocator = detail::has_allocator_tag<A> && std::constructible_from<A, std::uint64_t> &&
                    detail::has_allocate<A> && detail::has_deallocate<A> && detail::has_allocator_stats<A>;

//! One `static_assert` per requirement, each a sentence naming what `A` lacks.
template <class A>
constexpr bool check_allocator() {
  static_assert(detail::has_allocator_tag<A>,
                "kvx: allocator A lacks `using allocator_concept = kvx::memory::allocator_tag;`");
  static_assert(std::constructible_from<A, std::uint64_t>, "kvx: allocator A lacks a constructor from std::uint64_t capacity");
  static_assert(detail::has_allocate<A>,
                "kvx: allocator A lacks allocate(std::uint64_t size, std::uint64_t align) -> std::optional<allocation>");
  static_assert(detail::has_deallocate<A>, "kvx: allocator A lacks deallocate(const allocation&)");
  static_assert(detail::has_allocator_stats<A>,
                "kvx: allocator A lacks capacity(), free_bytes() or largest_free_block() (const, -> std::uint64_t)");
  return allocator<A>;
}

//! An allocator that can also hand out a range named by its offset.
template <class A>
concept allocator_with_placement = allocator<A> && detail::has_allocate_at<A>;

namespace detail {
constexpr bool is_pow2(std::uint64_t v) noexcept { return v != 0 && (v & (v - 1)) == 0; }
constexpr std::uint64_t align_up(std::uint64_t v, std::uint64_t a) noexcept { return (v + a - 1) & ~(a - 1); }
}  // namespace detail

}  // namespace kvx::memory
