#pragma once
//! \file
//! `kvx::cache::eviction::lru`: evicts the least recently used block.
//!
//! The baseline every other policy is measured against. Fails on scans: one
//! pass over more blocks than fit flushes the whole working set.
//! O(1) per call; not thread-safe (the owning cache serializes calls).
//!
//! \code
//! kvx::cache::eviction::lru p(1024);
//! p.on_insert(a, {}); p.on_insert(b, {}); p.on_hit(a, {});
//! p.victim([](const auto&) { return true; });  // b
//! \endcode

#include <cstddef>
#include <optional>

#include <kvx/cache/eviction/detail/keyed_list.hpp>
#include <kvx/cache/eviction_policy.hpp>

namespace kvx::cache::eviction {

class lru {
 public:
  using eviction_policy_concept = eviction_policy_tag;
  explicit lru(std::size_t /*capacity_in_blocks*/ = 0) {}

  void on_insert(const block_key& k, const access_context&) { list_.push_front(k); }
  void on_hit(const block_key& k, const access_context&) { list_.move_to_front(k); }
  void on_erase(const block_key& k) { list_.erase(k); }

  template <class Evictable>
  std::optional<block_key> victim(Evictable&& evictable) {
    auto it = list_.find_oldest(evictable);
    if (it == list_.end()) return std::nullopt;
    block_key k = it->key;
    list_.erase(it);
    return k;
  }

  [[nodiscard]] std::size_t size() const noexcept { return list_.size(); }

 private:
  detail::keyed_list<> list_;
};

}  // namespace kvx::cache::eviction
