#pragma once
//! \file
//! `kvx::cache::block_key`: the 128-bit name of one KV block, and through the
//! hash chain of the whole token prefix that ends with it (see
//! `kvx/cache/block_hasher.hpp` for how keys are computed, and docs/cache.md
//! for the exact algorithm and test vectors).
//!
//! A key is a plain value: trivially copyable, ordered, hashable. Thread-safe
//! as any value type.
//!
//! \code
//! kvx::cache::block_key k{0x0123456789abcdefULL, 0xfedcba9876543210ULL};
//! k.to_string();  // "0123456789abcdeffedcba9876543210"
//! std::unordered_map<kvx::cache::block_key, int, kvx::cache::block_key_hash> m;
//! \endcode

#include <compare>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>

namespace kvx::cache {

//! The XXH3-128 digest naming a block (and the prefix before it). `hi` and
//! `lo` are the high and low 64 bits of the digest.
struct block_key {
  std::uint64_t hi = 0;
  std::uint64_t lo = 0;

  friend constexpr bool operator==(const block_key&, const block_key&) noexcept = default;
  friend constexpr std::strong_ordering operator<=>(const block_key&, const block_key&) noexcept = default;

  //! 32 lowercase hex characters, `hi` first (big-endian reading of the digest).
  [[nodiscard]] std::string to_string() const {
    static constexpr char digits[] = "0123456789abcdef";
    std::string s(32, '0');
    for (int i = 0; i < 16; ++i) {
      s[static_cast<std::size_t>(15 - i)] = digits[(hi >> (4 * i)) & 0xF];
      s[static_cast<std::size_t>(31 - i)] = digits[(lo >> (4 * i)) & 0xF];
    }
    return s;
  }
};

//! Hash functor for unordered containers. The key is already a uniform hash,
//! so folding its halves is enough; the multiply spreads `hi` so that keys
//! differing in one half do not collide after truncation to `size_t`.
struct block_key_hash {
  [[nodiscard]] constexpr std::size_t operator()(const block_key& k) const noexcept {
    return static_cast<std::size_t>(k.lo ^ (k.hi * 0x9E3779B97F4A7C15ULL));
  }
};

}  // namespace kvx::cache

template <>
struct std::hash<kvx::cache::block_key> {
  [[nodiscard]] constexpr std::size_t operator()(const kvx::cache::block_key& k) const noexcept {
    return kvx::cache::block_key_hash{}(k);
  }
};
