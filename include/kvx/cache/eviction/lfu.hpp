#pragma once
//! \file
//! `kvx::cache::eviction::lfu`: least frequently used with dynamic aging
//! (LFU-DA, Arlitt et al.).
//!
//! A block's priority is `age + hits`, where `age` is the priority of the
//! last evicted block; a block inserted now starts at `age + 1`. Plain LFU
//! keeps a block that was hot long ago forever (stale frequency); aging lets
//! newly popular blocks overtake it once enough evictions have raised `age`.
//! Ties go to the least recently used. O(log p) per call, p the number of
//! distinct priorities held (far fewer than blocks); not thread-safe.
//!
//! \code
//! kvx::cache::eviction::lfu p(1024);
//! p.on_insert(a, {}); p.on_hit(a, {}); p.on_insert(b, {});
//! p.victim([](const auto&) { return true; });  // b (fewer hits)
//! \endcode

#include <cstddef>
#include <cstdint>
#include <iterator>
#include <list>
#include <map>
#include <optional>

#include <kvx/cache/detail/flat_key_map.hpp>
#include <kvx/cache/eviction/detail/keyed_list.hpp>
#include <kvx/cache/eviction_policy.hpp>

namespace kvx::cache::eviction {

class lfu {
 public:
  using eviction_policy_concept = eviction_policy_tag;
  explicit lfu(std::size_t /*capacity_in_blocks*/ = 0) {}

  void on_insert(const block_key& k, const access_context&) {
    if (auto it = index_.find(k); it != index_.end()) unlink(it->second);
    place(k, age_ + 1, 1);
  }
  void on_hit(const block_key& k, const access_context&) {
    auto it = index_.find(k);
    if (it == index_.end()) return;
    const std::uint64_t hits = it->second.at->hits + 1;
    move_to(it->second, age_ + hits);
    it->second.at->hits = hits;
  }
  void on_erase(const block_key& k) {
    auto it = index_.find(k);
    if (it == index_.end()) return;
    unlink(it->second);
    index_.erase(it);
  }

  template <class Evictable>
  std::optional<block_key> victim(Evictable&& evictable) {
    for (auto b = buckets_.begin(); b != buckets_.end(); ++b)
      for (auto e = b->second.begin(); e != b->second.end(); ++e) {
        if (!evictable(e->key)) continue;
        const block_key k = e->key;
        age_ = b->first;
        b->second.erase(e);
        if (b->second.empty()) buckets_.erase(b);
        index_.erase(k);
        return k;
      }
    return std::nullopt;
  }

  [[nodiscard]] std::size_t size() const noexcept { return index_.size(); }
  //! The aging floor: the priority of the last evicted block.
  [[nodiscard]] std::uint64_t age() const noexcept { return age_; }

 private:
  struct entry {
    block_key key;
    std::uint64_t hits = 0;
  };
  using bucket = std::list<entry>;
  struct where {
    std::uint64_t priority = 0;
    bucket::iterator at;
  };

  // Blocks by priority; within one, in the order their priority was last set
  // (oldest first), which is least recently used first: the tie rule. The
  // distinct priorities are few next to the blocks (ages plus hit counts),
  // so the ordered map stays small and the per-block work is a splice.
  void place(const block_key& k, std::uint64_t priority, std::uint64_t hits) {
    auto& b = buckets_[priority];
    b.push_back(entry{k, hits});
    index_[k] = where{priority, std::prev(b.end())};
  }
  void move_to(where& w, std::uint64_t priority) {
    auto from = buckets_.find(w.priority);
    auto& to = buckets_[priority];
    to.splice(to.end(), from->second, w.at);
    if (from->second.empty()) buckets_.erase(from);
    w.priority = priority;
  }
  void unlink(const where& w) {
    auto b = buckets_.find(w.priority);
    b->second.erase(w.at);
    if (b->second.empty()) buckets_.erase(b);
  }

  std::map<std::uint64_t, bucket> buckets_;
  cache::detail::flat_key_map<where, detail::key_hash> index_;
  std::uint64_t age_ = 0;
};

}  // namespace kvx::cache::eviction
