#pragma once
//! \file
//! `kvx::cache::eviction::lfu`: least frequently used with dynamic aging
//! (LFU-DA, Arlitt et al.).
//!
//! A block's priority is `age + hits`, where `age` is the priority of the
//! last evicted block; a block inserted now starts at `age + 1`. Plain LFU
//! keeps a block that was hot long ago forever (stale frequency); aging lets
//! newly popular blocks overtake it once enough evictions have raised `age`.
//! Ties go to the least recently used. O(log n) per call; not thread-safe.
//!
//! \code
//! kvx::cache::eviction::lfu p(1024);
//! p.on_insert(a, {}); p.on_hit(a, {}); p.on_insert(b, {});
//! p.victim([](const auto&) { return true; });  // b (fewer hits)
//! \endcode

#include <cstddef>
#include <cstdint>
#include <optional>
#include <set>
#include <tuple>
#include <unordered_map>

#include <kvx/cache/eviction/detail/keyed_list.hpp>
#include <kvx/cache/eviction_policy.hpp>

namespace kvx::cache::eviction {

class lfu {
 public:
  using eviction_policy_concept = eviction_policy_tag;
  explicit lfu(std::size_t /*capacity_in_blocks*/ = 0) {}

  void on_insert(const block_key& k, const access_context&) {
    auto [it, fresh] = meta_.try_emplace(k);
    if (!fresh) order_.erase(it->second.order_key(k));
    it->second = entry{age_ + 1, 1, ++tick_};
    order_.insert(it->second.order_key(k));
  }
  void on_hit(const block_key& k, const access_context&) {
    auto it = meta_.find(k);
    if (it == meta_.end()) return;
    order_.erase(it->second.order_key(k));
    ++it->second.hits;
    it->second.priority = age_ + it->second.hits;
    it->second.tick = ++tick_;
    order_.insert(it->second.order_key(k));
  }
  void on_erase(const block_key& k) {
    auto it = meta_.find(k);
    if (it == meta_.end()) return;
    order_.erase(it->second.order_key(k));
    meta_.erase(it);
  }

  template <class Evictable>
  std::optional<block_key> victim(Evictable&& evictable) {
    for (auto it = order_.begin(); it != order_.end(); ++it) {
      const block_key k = std::get<2>(*it);
      if (!evictable(k)) continue;
      age_ = std::get<0>(*it);
      order_.erase(it);
      meta_.erase(k);
      return k;
    }
    return std::nullopt;
  }

  [[nodiscard]] std::size_t size() const noexcept { return meta_.size(); }
  //! The aging floor: the priority of the last evicted block.
  [[nodiscard]] std::uint64_t age() const noexcept { return age_; }

 private:
  struct entry {
    std::uint64_t priority = 0;
    std::uint64_t hits = 0;
    std::uint64_t tick = 0;
    [[nodiscard]] std::tuple<std::uint64_t, std::uint64_t, block_key> order_key(const block_key& k) const {
      return {priority, tick, k};
    }
  };
  std::unordered_map<block_key, entry, detail::key_hash> meta_;
  std::set<std::tuple<std::uint64_t, std::uint64_t, block_key>> order_;
  std::uint64_t age_ = 0;
  std::uint64_t tick_ = 0;
};

}  // namespace kvx::cache::eviction
