#pragma once
//! \file
//! `kvx::cache::eviction::s3fifo`: S3-FIFO (Yang et al., SOSP'23): a small
//! FIFO for new blocks, a main FIFO with reinsertion, and a ghost FIFO of
//! recently evicted keys.
//!
//! New blocks enter the small queue (10% of capacity by default); a block hit
//! while there moves to main when it leaves, others leave the cache and are
//! remembered in the ghost. A block inserted again while its key is in the
//! ghost goes straight to main. Main is a CLOCK with a 2-bit counter. One-hit
//! wonders (most of an LLM trace's blocks) thus leave quickly without pushing
//! out reused prefixes, and a scan never reaches main.
//!
//! The ghost holds `ghost_factor` x capacity keys (default 4, not the paper's
//! 1): KV-cache reuse distances are long (a chat's next turn arrives minutes
//! later), and a longer memory recognises more of them. O(1) amortized per
//! call; not thread-safe.
//!
//! \code
//! kvx::cache::eviction::s3fifo p(1000);              // or s3fifo(1000, {.small_ratio = 0.2})
//! \endcode

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>

#include <kvx/cache/eviction/detail/keyed_list.hpp>
#include <kvx/cache/eviction_policy.hpp>

namespace kvx::cache::eviction {

class s3fifo {
 public:
  using eviction_policy_concept = eviction_policy_tag;
  struct options {
    double small_ratio = 0.1;   //!< share of capacity the small FIFO may hold before it is evicted from
    double ghost_factor = 4.0;  //!< ghost keys kept, as a multiple of capacity
  };

  //! The largest `ghost_factor`: far more memory than the reuse distances
  //! measured need, and it keeps the ghost's length a number of keys.
  static constexpr double max_ghost_factor = 64.0;

  explicit s3fifo(std::size_t capacity_in_blocks = 0) : s3fifo(capacity_in_blocks, options{}) {}
  //! Throws `std::invalid_argument` for a `ghost_factor` outside [0, `max_ghost_factor`].
  s3fifo(std::size_t capacity_in_blocks, options o)
      : capacity_(std::max<std::size_t>(capacity_in_blocks, 1)),
        opt_(validated(o)),
        ghost_limit_(ghost_limit(opt_.ghost_factor, capacity_)) {}

  void on_insert(const block_key& k, const access_context&) {
    if (ghost_.erase(k))
      main_.push_front(k, 0);
    else
      small_.push_front(k, 0);
  }
  void on_hit(const block_key& k, const access_context&) {
    std::uint8_t* f = small_.find(k);
    if (f == nullptr) f = main_.find(k);
    if (f != nullptr && *f < 3) ++*f;
  }
  void on_erase(const block_key& k) {
    if (!small_.erase(k)) main_.erase(k);
  }

  template <class Evictable>
  std::optional<block_key> victim(Evictable&& evictable) {
    const bool small_first =
        main_.empty() || static_cast<double>(small_.size()) >= opt_.small_ratio * static_cast<double>(target());
    if (small_first) {
      if (auto k = evict_small(evictable)) return k;
      return evict_main(evictable);
    }
    if (auto k = evict_main(evictable)) return k;
    return evict_small(evictable);
  }

  [[nodiscard]] std::size_t size() const noexcept { return small_.size() + main_.size(); }
  [[nodiscard]] std::size_t small_size() const noexcept { return small_.size(); }
  [[nodiscard]] std::size_t main_size() const noexcept { return main_.size(); }
  [[nodiscard]] bool in_ghost(const block_key& k) const { return ghost_.contains(k); }

 private:
  [[nodiscard]] std::size_t target() const noexcept { return std::max(capacity_, size()); }

  static options validated(options o) {
    if (!(o.ghost_factor >= 0.0 && o.ghost_factor <= max_ghost_factor))
      throw std::invalid_argument("kvx: s3fifo: ghost_factor " + std::to_string(o.ghost_factor) +
                                  " is outside [0, 64]");
    return o;
  }
  static std::size_t ghost_limit(double factor, std::size_t capacity) noexcept {
    const double n = factor * static_cast<double>(capacity);
    // Capped at 2^63, where the conversion is still defined; a ghost that long never fills.
    return n < 9223372036854775808.0 ? static_cast<std::size_t>(n) : std::size_t{1} << 63;
  }

  template <class Evictable>
  std::optional<block_key> evict_small(Evictable& evictable) {
    for (std::size_t n = small_.size(); n > 0 && !small_.empty(); --n) {
      const block_key k = small_.back().key;
      if (!evictable(k)) {
        small_.move_to_front(k);
      } else if (small_.back().value >= 1) {
        small_.transfer_front(k, main_);
        *main_.find(k) = 0;
      } else {
        small_.pop_back();
        ghost_.push_front(k);
        while (ghost_.size() > ghost_limit_) ghost_.pop_back();
        return k;
      }
    }
    return std::nullopt;
  }

  template <class Evictable>
  std::optional<block_key> evict_main(Evictable& evictable) {
    // Each pass lowers every evictable counter by one; four passes reach 0.
    for (std::size_t n = 4 * main_.size() + 1; n > 0 && !main_.empty(); --n) {
      auto& e = main_.back();
      const block_key k = e.key;
      if (!evictable(k)) {
        main_.move_to_front(k);
      } else if (e.value > 0) {
        --e.value;
        main_.move_to_front(k);
      } else {
        main_.pop_back();
        return k;
      }
    }
    return std::nullopt;
  }

  std::size_t capacity_;
  options opt_;
  std::size_t ghost_limit_;  // ghost keys kept
  detail::keyed_list<std::uint8_t> small_;
  detail::keyed_list<std::uint8_t> main_;
  detail::keyed_list<> ghost_;
};

}  // namespace kvx::cache::eviction
