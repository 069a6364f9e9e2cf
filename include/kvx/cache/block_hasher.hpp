#pragma once
//! \file
//! `kvx::cache::block_hasher`: cuts token ids into fixed-size blocks and names
//! each block by a chained XXH3-128 hash, so that one key names a whole prefix.
//!
//! The algorithm (docs/cache.md has it with test vectors; version 1):
//!
//! 1. Root. The namespace is serialized as the 8 ASCII bytes `kvxblk01`, the
//!    block size as a little-endian u32, then the four fields `model`,
//!    `tenant`, `adapter`, `salt`, each as a little-endian u32 byte length
//!    followed by its bytes. `root = XXH3_128bits_withSeed(bytes, seed = 0)`.
//! 2. Block i. `key_i = XXH3_128bits_withSeed(P || T, seed = 0)` where `P` is
//!    the parent key (`root` for block 0, `key_{i-1}` after) as 16 bytes,
//!    `hi` then `lo`, each little-endian u64, and `T` is the block's token ids,
//!    each a little-endian u32.
//! 3. Only full blocks are keyed: the trailing `n % block_tokens` tokens of a
//!    sequence have no key (their KV is recomputed, never shared).
//!
//! Consequences: keys depend only on the namespace, the block size and the
//! tokens (not on the process, host, tensor-parallel size or rank); two
//! tenants (or one with a fresh per-request salt) never share a key; a key
//! collision needs a 128-bit hash collision.
//!
//! Thread safety: a `block_hasher` is immutable after construction; calls are
//! safe from any number of threads. Nothing blocks or allocates except
//! `keys()`, which returns a vector.
//!
//! \code
//! auto h = kvx::cache::block_hasher::make({.block_tokens = 16, .ns = {.model = "llama-3-70b", .tenant = "acme"}});
//! std::vector<std::uint32_t> prompt = tokenize(...);
//! std::vector<kvx::cache::block_key> keys = h->keys(prompt);  // prompt.size() / 16 keys
//! \endcode

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#ifndef XXH_INLINE_ALL
#define XXH_INLINE_ALL
#endif
#include <xxhash.h>

#include <kvx/cache/block_key.hpp>
#include <kvx/core/result.hpp>

namespace kvx::cache {

//! What a key is scoped to. Blocks hashed under different namespaces never
//! share keys, even for identical tokens.
struct key_namespace {
  std::string model;    //!< model id (weights); KV of different models is not interchangeable
  std::string tenant;   //!< isolation boundary: tenants never read each other's blocks
  std::string adapter;  //!< LoRA / adapter id, empty for the base model
  std::string salt;     //!< per-request salt: a non-empty salt makes the request's blocks private
};

//! How a `block_hasher` cuts and names blocks.
struct hasher_config {
  std::uint32_t block_tokens = 16;  //!< tokens per block, 16..512
  key_namespace ns{};
};

inline constexpr std::uint32_t min_block_tokens = 16;
inline constexpr std::uint32_t max_block_tokens = 512;

class block_hasher {
 public:
  //! A hasher for `cfg`; `errc::invalid_argument` when the block size is out of 16..512.
  static result<block_hasher> make(const hasher_config& cfg) {
    if (cfg.block_tokens < min_block_tokens || cfg.block_tokens > max_block_tokens)
      return error{errc::invalid_argument, "block_hasher: block_tokens = " + std::to_string(cfg.block_tokens) +
                                               " is outside 16..512"};
    for (const std::string* f : {&cfg.ns.model, &cfg.ns.tenant, &cfg.ns.adapter, &cfg.ns.salt})
      if (f->size() > UINT32_MAX) return error{errc::invalid_argument, "block_hasher: namespace field longer than 4 GiB"};
    return block_hasher(cfg);
  }

  [[nodiscard]] std::uint32_t block_tokens() const noexcept { return block_tokens_; }
  //! The key that stands for "no tokens yet" in this namespace: the parent of block 0.
  [[nodiscard]] const block_key& root() const noexcept { return root_; }

  //! Number of full (keyed) blocks in `n_tokens` tokens.
  [[nodiscard]] std::size_t full_blocks(std::size_t n_tokens) const noexcept { return n_tokens / block_tokens_; }

  //! The key of the block holding `tokens` (exactly `block_tokens()` of them,
  //! a precondition) whose prefix is named by `parent`.
  [[nodiscard]] static block_key chain(const block_key& parent, std::span<const std::uint32_t> tokens) noexcept {
    XXH3_state_t state;
    XXH3_128bits_reset_withSeed(&state, 0);
    unsigned char p[16];
    store_le64(p, parent.hi);
    store_le64(p + 8, parent.lo);
    XXH3_128bits_update(&state, p, sizeof p);
    if constexpr (std::endian::native == std::endian::little) {
      XXH3_128bits_update(&state, tokens.data(), tokens.size_bytes());
    } else {
      unsigned char buf[4 * 64];
      std::size_t i = 0;
      while (i < tokens.size()) {
        std::size_t n = 0;
        for (; n < 64 && i < tokens.size(); ++n, ++i) store_le32(buf + 4 * n, tokens[i]);
        XXH3_128bits_update(&state, buf, 4 * n);
      }
    }
    return from_digest(XXH3_128bits_digest(&state));
  }

  //! Writes the key of each full block of `tokens` into `out` (which must hold
  //! `full_blocks(tokens.size())` keys), starting from `parent` (default: the
  //! root). Returns the number written.
  std::size_t keys_into(std::span<const std::uint32_t> tokens, std::span<block_key> out) const noexcept {
    return keys_into(tokens, out, root_);
  }
  std::size_t keys_into(std::span<const std::uint32_t> tokens, std::span<block_key> out,
                        const block_key& parent) const noexcept {
    const std::size_t n = std::min(full_blocks(tokens.size()), out.size());
    block_key prev = parent;
    for (std::size_t i = 0; i < n; ++i) {
      prev = chain(prev, tokens.subspan(i * block_tokens_, block_tokens_));
      out[i] = prev;
    }
    return n;
  }

  //! The keys of every full block of `tokens`, in order.
  [[nodiscard]] std::vector<block_key> keys(std::span<const std::uint32_t> tokens) const {
    std::vector<block_key> out(full_blocks(tokens.size()));
    keys_into(tokens, out);
    return out;
  }

  //! The root key of `ns` at `block_tokens` (exposed for other-language ports and tests).
  [[nodiscard]] static block_key root_of(std::uint32_t block_tokens, const key_namespace& ns) {
    std::string bytes = "kvxblk01";
    append_le32(bytes, block_tokens);
    for (const std::string* f : {&ns.model, &ns.tenant, &ns.adapter, &ns.salt}) {
      append_le32(bytes, static_cast<std::uint32_t>(f->size()));
      bytes += *f;
    }
    return from_digest(XXH3_128bits_withSeed(bytes.data(), bytes.size(), 0));
  }

 private:
  explicit block_hasher(const hasher_config& cfg)
      : block_tokens_(cfg.block_tokens), root_(root_of(cfg.block_tokens, cfg.ns)) {}

  static block_key from_digest(XXH128_hash_t h) noexcept { return block_key{h.high64, h.low64}; }
  static void store_le64(unsigned char* p, std::uint64_t v) noexcept {
    for (int i = 0; i < 8; ++i) p[i] = static_cast<unsigned char>(v >> (8 * i));
  }
  static void store_le32(unsigned char* p, std::uint32_t v) noexcept {
    for (int i = 0; i < 4; ++i) p[i] = static_cast<unsigned char>(v >> (8 * i));
  }
  static void append_le32(std::string& s, std::uint32_t v) {
    for (int i = 0; i < 4; ++i) s.push_back(static_cast<char>(static_cast<unsigned char>(v >> (8 * i))));
  }

  std::uint32_t block_tokens_;
  block_key root_;
};

}  // namespace kvx::cache
