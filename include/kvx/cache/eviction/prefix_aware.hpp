#pragma once
//! \file
//! `kvx::cache::eviction::prefix_aware`: least recently used among leaves.
//!
//! A block whose children are cached is worth more than a leaf: evicting a
//! parent breaks every cached prefix through it, so its children, although
//! resident, can no longer save prefill. The policy keeps, for every key, how
//! many tracked blocks name it as `access_context::parent`, and evicts the
//! least recently used block with none; only when every leaf is pinned does
//! it fall back to the least recently used inner block. In a chat trace the
//! leaf of a request is also its last, usually partial, block, which is
//! almost never read again.
//!
//! Leaves and inner blocks are two recency lists, so a hit or an insert is a
//! hash lookup and a splice (O(1)). A block that changes class (its first
//! child arrives, its last child leaves) is placed in the other list by its
//! last access: the walk goes from both ends at once, which is short in the
//! common cases (a parent gaining a child was just read, so it belongs near
//! the newest end; a parent losing its last child is usually old). A walk
//! stops after `max_placement_steps` steps from each end and then places the
//! block just after the older blocks it passed (counted by
//! `approximate_placements()`), so no call costs more than O(1).
//! Not thread-safe.
//!
//! \code
//! kvx::cache::eviction::prefix_aware p(1000);
//! block_key root{0, 1}, child{0, 2};
//! p.on_insert(root, {}); p.on_insert(child, {.parent = &root});
//! p.victim([](const auto&) { return true; });  // child: root has a cached child
//! \endcode

#include <cstddef>
#include <cstdint>
#include <list>
#include <optional>

#include <kvx/cache/detail/flat_key_map.hpp>
#include <kvx/cache/eviction/detail/keyed_list.hpp>
#include <kvx/cache/eviction_policy.hpp>

namespace kvx::cache::eviction {

class prefix_aware {
 public:
  using eviction_policy_concept = eviction_policy_tag;
  //! Steps a class change may walk from each end of the other list.
  static constexpr std::size_t max_placement_steps = 64;

  explicit prefix_aware(std::size_t /*capacity_in_blocks*/ = 0) {}

  void on_insert(const block_key& k, const access_context& ctx) {
    // A key inserted again (the caller re-admits it) first leaves, so that
    // its parent does not count it twice.
    if (auto found = index_.find(k); found != index_.end()) remove(found);
    entry e{k, ++tick_, false, {}, true};
    if (ctx.parent != nullptr && *ctx.parent != k) {
      e.has_parent = true;
      e.parent = *ctx.parent;
      if (++children_[e.parent] == 1) reclassify(e.parent);
    }
    e.in_leaves = is_leaf(k);
    auto& l = e.in_leaves ? leaves_ : inner_;
    l.push_front(e);
    index_.emplace(k, l.begin());
  }
  void on_hit(const block_key& k, const access_context&) {
    auto it = index_.find(k);
    if (it == index_.end()) return;
    auto pos = it->second;
    pos->tick = ++tick_;
    auto& l = pos->in_leaves ? leaves_ : inner_;
    l.splice(l.begin(), l, pos);
  }
  void on_erase(const block_key& k) {
    if (auto found = index_.find(k); found != index_.end()) remove(found);
  }

  template <class Evictable>
  std::optional<block_key> victim(Evictable&& evictable) {
    for (auto* l : {&leaves_, &inner_}) {
      for (auto it = l->rbegin(); it != l->rend(); ++it) {
        if (!evictable(it->key)) continue;
        const block_key key = it->key;
        remove(index_.find(key));
        return key;
      }
    }
    return std::nullopt;
  }

  [[nodiscard]] std::size_t size() const noexcept { return index_.size(); }
  //! True if no tracked block names `k` as its parent.
  [[nodiscard]] bool is_leaf(const block_key& k) const { return children_.count(k) == 0; }
  //! Class changes whose walk ran out of steps and placed the block near,
  //! not exactly at, its recency place.
  [[nodiscard]] std::uint64_t approximate_placements() const noexcept { return approximate_; }

 private:
  struct entry {
    block_key key{};
    std::uint64_t tick = 0;  // last access; each list is ordered by it, newest first
    bool has_parent = false;
    block_key parent{};
    bool in_leaves = true;
  };
  using list = std::list<entry>;
  using index_map = cache::detail::flat_key_map<list::iterator, detail::key_hash>;

  // k's leaf status just flipped; if tracked, move it to the other list at
  // its recency place.
  void reclassify(const block_key& k) {
    auto found = index_.find(k);
    if (found == index_.end()) return;
    auto pos = found->second;
    list& from = pos->in_leaves ? leaves_ : inner_;
    list& to = pos->in_leaves ? inner_ : leaves_;
    to.splice(place_in(to, pos->tick), from, pos);
    pos->in_leaves = !pos->in_leaves;
  }

  // Where an entry last accessed at `tick` goes in `l`: before the first
  // older entry. Walks from both ends, at most max_placement_steps each.
  list::iterator place_in(list& l, std::uint64_t tick) {
    auto newer = l.begin();
    auto older = l.rbegin();
    for (std::size_t step = 0; step < max_placement_steps; ++step) {
      if (newer == l.end() || newer->tick < tick) return newer;
      ++newer;
      if (older == l.rend() || older->tick > tick) return older.base();
      ++older;
    }
    ++approximate_;
    return older.base();
  }

  // `found`: the key's entry in index_ (it must have one).
  void remove(index_map::iterator found) {
    const auto pos = found->second;
    const bool has_parent = pos->has_parent;
    const block_key parent = pos->parent;
    (pos->in_leaves ? leaves_ : inner_).erase(pos);
    index_.erase(found);
    if (has_parent) {
      auto c = children_.find(parent);
      if (c != children_.end() && --c->second == 0) {
        children_.erase(c);
        reclassify(parent);
      }
    }
  }

  index_map index_;
  // Tracked children per parent key, whether or not the parent is tracked, so
  // a parent re-inserted under cached children is known as inner at once.
  cache::detail::flat_key_map<std::uint32_t, detail::key_hash> children_;
  list leaves_, inner_;
  std::uint64_t tick_ = 0;
  std::uint64_t approximate_ = 0;
};

}  // namespace kvx::cache::eviction
