#pragma once
//! \file
//! `tiering::second_access_admission<Base>`: admission control in front of
//! any tiering policy. While a tier is under pressure (admitting the block
//! would take it above its high watermark), a block is admitted only if its
//! key was offered before: one-hit wonders (a prompt seen once) do not push
//! out blocks that are reused. Without pressure every block is admitted.
//!
//! Keys are remembered in a doorkeeper: a bitset of `bits` bits indexed by
//! two hashes of the key (a two-probe Bloom filter), cleared after every
//! `bits / 8` insertions so that old history fades (the TinyLFU doorkeeper's
//! aging). False positives admit a one-hit wonder now and then; they never
//! reject a reused block that has been offered since the last reset.
//! `bits` below 64 is taken as 64; above `max_bits` (2^32) the constructor
//! throws `std::invalid_argument`.
//!
//! Thread safety: none (called under the cache's lock).
//!
//! \code
//! using policy = kvx::cache::tiering::second_access_admission<kvx::cache::tiering::write_back>;
//! \endcode

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <kvx/cache/tiering_policy.hpp>
#include <kvx/cache/tiering/write_back.hpp>

namespace kvx::cache::tiering {

template <class Base = write_back>
class second_access_admission {
  static_assert(check_tiering_policy<Base>());

 public:
  using tiering_policy_concept = tiering_policy_tag;

  //! The largest doorkeeper: 2^32 bits (512 MiB), 16 bits for each of the
  //! 2^28 blocks the largest tier holds (`any_tiered_cache::max_tier_blocks`).
  //! More would only cost memory, and a size near SIZE_MAX wrapped the word
  //! count to 0 (every probe out of bounds).
  static constexpr std::size_t max_bits = std::size_t{1} << 32;

  explicit second_access_admission(std::size_t bits = 1U << 20, Base base = {})
      : base_(std::move(base)), bits_(checked_bits(bits)), words_((bits_ + 63) / 64, 0) {}

  [[nodiscard]] bool writes_through() const { return base_.writes_through(); }
  [[nodiscard]] bool promote_on_hit(std::size_t t) { return base_.promote_on_hit(t); }
  [[nodiscard]] bool demote_on_evict(std::size_t t) { return base_.demote_on_evict(t); }

  [[nodiscard]] bool admit(const admission_context& a) {
    const bool seen = test_and_set(a.key);
    if (a.under_pressure && !seen) return false;
    return base_.admit(a);
  }

  //! Whether `k` was offered since the last reset (for tests and tools).
  [[nodiscard]] bool remembers(const block_key& k) const { return test(index(k.lo)) && test(index(k.hi)); }
  [[nodiscard]] const Base& base() const noexcept { return base_; }

 private:
  static std::size_t checked_bits(std::size_t bits) {
    if (bits > max_bits)
      throw std::invalid_argument("kvx: second_access_admission: a doorkeeper of " + std::to_string(bits) +
                                  " bits; at most " + std::to_string(max_bits) + " (2^32)");
    return bits < 64 ? 64 : bits;
  }

  std::size_t index(std::uint64_t h) const noexcept { return static_cast<std::size_t>(h % bits_); }
  bool test(std::size_t i) const noexcept { return (words_[i / 64] >> (i % 64)) & 1U; }
  void set(std::size_t i) noexcept { words_[i / 64] |= std::uint64_t{1} << (i % 64); }

  bool test_and_set(const block_key& k) {
    const std::size_t a = index(k.lo), b = index(k.hi);
    const bool seen = test(a) && test(b);
    if (!seen) {
      if (++inserted_ > bits_ / 8) {
        std::fill(words_.begin(), words_.end(), 0);
        inserted_ = 1;
      }
      set(a);
      set(b);
    }
    return seen;
  }

  Base base_;
  std::size_t bits_;
  std::vector<std::uint64_t> words_;
  std::size_t inserted_ = 0;
};

}  // namespace kvx::cache::tiering
