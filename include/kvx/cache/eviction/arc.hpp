#pragma once
//! \file
//! `kvx::cache::eviction::arc`: Adaptive Replacement Cache (Megiddo and
//! Modha, FAST'03).
//!
//! Two LRU lists, T1 (seen once recently) and T2 (seen at least twice), and
//! their ghosts B1 and B2. A miss found in B1 means recency deserved more
//! room and raises the target size `p` of T1; one found in B2 lowers it. The
//! victim comes from T1 while T1 exceeds `p`, otherwise from T2. O(1) per
//! call; not thread-safe.
//!
//! \code
//! kvx::cache::eviction::arc p(1000);
//! \endcode

#include <algorithm>
#include <cstddef>
#include <optional>

#include <kvx/cache/eviction/detail/keyed_list.hpp>
#include <kvx/cache/eviction_policy.hpp>

namespace kvx::cache::eviction {

class arc {
 public:
  using eviction_policy_concept = eviction_policy_tag;
  explicit arc(std::size_t capacity_in_blocks = 0) : c_(static_cast<double>(std::max<std::size_t>(capacity_in_blocks, 1))) {}

  void on_insert(const block_key& k, const access_context&) {
    if (b1_.erase(k)) {
      p_ = std::min(c_, p_ + std::max(ratio(b2_, b1_.size() + 1), 1.0));
      t2_.push_front(k);
    } else if (b2_.erase(k)) {
      p_ = std::max(0.0, p_ - std::max(ratio(b1_, b2_.size() + 1), 1.0));
      t2_.push_front(k);
    } else {
      t1_.push_front(k);
    }
    trim_ghosts();
  }
  void on_hit(const block_key& k, const access_context&) {
    if (t1_.contains(k))
      t1_.transfer_front(k, t2_);
    else
      t2_.move_to_front(k);
  }
  void on_erase(const block_key& k) {
    if (!t1_.erase(k)) t2_.erase(k);
  }

  template <class Evictable>
  std::optional<block_key> victim(Evictable&& evictable) {
    const bool from_t1 = !t1_.empty() && (static_cast<double>(t1_.size()) > p_ || t2_.empty());
    if (auto k = evict(from_t1 ? t1_ : t2_, from_t1 ? b1_ : b2_, evictable)) return k;
    return evict(from_t1 ? t2_ : t1_, from_t1 ? b2_ : b1_, evictable);
  }

  [[nodiscard]] std::size_t size() const noexcept { return t1_.size() + t2_.size(); }
  //! The adaptive target size of T1, in blocks.
  [[nodiscard]] double target_recency() const noexcept { return p_; }

 private:
  static double ratio(const detail::keyed_list<>& a, std::size_t b) {
    return static_cast<double>(a.size()) / static_cast<double>(b);
  }

  template <class Evictable>
  std::optional<block_key> evict(detail::keyed_list<>& from, detail::keyed_list<>& ghost, Evictable& evictable) {
    auto it = from.find_oldest(evictable);
    if (it == from.end()) return std::nullopt;
    const block_key k = it->key;
    from.erase(it);
    ghost.push_front(k);
    trim_ghosts();
    return k;
  }

  void trim_ghosts() {
    const auto c = static_cast<std::size_t>(c_);
    while (!b1_.empty() && t1_.size() + b1_.size() > c) b1_.pop_back();
    while (!b2_.empty() && size() + b1_.size() + b2_.size() > 2 * c) b2_.pop_back();
  }

  double c_;
  double p_ = 0;
  detail::keyed_list<> t1_, t2_, b1_, b2_;
};

}  // namespace kvx::cache::eviction
