#pragma once
//! \file
//! `kvx::cache::eviction::sieve`: SIEVE (Zhang et al., NSDI'24): a FIFO with
//! one visited bit per block and a hand that sweeps from the oldest block
//! towards the newest.
//!
//! A hit only sets the bit (no list move, so hits are cheap). The hand clears
//! set bits as it passes and evicts the first block whose bit is clear;
//! survivors keep their place, so new blocks are weeded out quickly while
//! popular ones stay. O(1) amortized; not thread-safe.
//!
//! \code
//! kvx::cache::eviction::sieve p(1000);
//! \endcode

#include <cstddef>
#include <iterator>
#include <optional>
#include <utility>

#include <kvx/cache/eviction/detail/keyed_list.hpp>
#include <kvx/cache/eviction_policy.hpp>

namespace kvx::cache::eviction {

class sieve {
 public:
  using eviction_policy_concept = eviction_policy_tag;
  explicit sieve(std::size_t /*capacity_in_blocks*/ = 0) : hand_(list_.end()) {}
  sieve(const sieve&) = delete;  // hand_ points into list_
  sieve& operator=(const sieve&) = delete;
  // std::list keeps element iterators valid across a move, not end().
  sieve(sieve&& o) noexcept : hand_(list_.end()) {
    const bool at_end = o.hand_ == o.list_.end();
    list_ = std::move(o.list_);
    if (!at_end) hand_ = o.hand_;
    o.hand_ = o.list_.end();
  }
  sieve& operator=(sieve&&) = delete;

  void on_insert(const block_key& k, const access_context&) { list_.push_front(k, false); }
  void on_hit(const block_key& k, const access_context&) {
    if (bool* v = list_.find(k)) *v = true;
  }
  void on_erase(const block_key& k) {
    auto it = list_.locate(k);
    if (it == list_.end()) return;
    if (it == hand_) hand_ = step(it);
    if (it == hand_) hand_ = list_.end();  // it was the only block
    list_.erase(it);
  }

  template <class Evictable>
  std::optional<block_key> victim(Evictable&& evictable) {
    if (list_.empty()) return std::nullopt;
    if (hand_ == list_.end()) hand_ = std::prev(list_.end());
    // Two sweeps: the first may only clear bits.
    for (std::size_t n = 2 * list_.size() + 1; n > 0; --n) {
      auto it = hand_;
      if (!evictable(it->key)) {
        hand_ = step(it);
      } else if (it->value) {
        it->value = false;
        hand_ = step(it);
      } else {
        const block_key k = it->key;
        hand_ = step(it);
        if (hand_ == it) hand_ = list_.end();
        list_.erase(it);
        return k;
      }
    }
    return std::nullopt;
  }

  [[nodiscard]] std::size_t size() const noexcept { return list_.size(); }

 private:
  // Towards the newest (front); wraps from the front to the oldest.
  using iterator = detail::keyed_list<bool>::iterator;
  iterator step(iterator it) { return it == list_.begin() ? std::prev(list_.end()) : std::prev(it); }

  detail::keyed_list<bool> list_;
  iterator hand_;
};

}  // namespace kvx::cache::eviction
