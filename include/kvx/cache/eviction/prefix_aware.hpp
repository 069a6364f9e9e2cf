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
//! almost never read again. O(log n) per call; not thread-safe.
//!
//! \code
//! kvx::cache::eviction::prefix_aware p(1000);
//! block_key root{0, 1}, child{0, 2};
//! p.on_insert(root, {}); p.on_insert(child, {.parent = &root});
//! p.victim([](const auto&) { return true; });  // child: root has a cached child
//! \endcode

#include <cstddef>
#include <cstdint>
#include <optional>
#include <set>
#include <utility>

#include <kvx/cache/detail/flat_key_map.hpp>
#include <kvx/cache/eviction/detail/keyed_list.hpp>
#include <kvx/cache/eviction_policy.hpp>

namespace kvx::cache::eviction {

class prefix_aware {
 public:
  using eviction_policy_concept = eviction_policy_tag;
  explicit prefix_aware(std::size_t /*capacity_in_blocks*/ = 0) {}

  void on_insert(const block_key& k, const access_context& ctx) {
    entry e{++tick_, false, {}};
    if (ctx.parent != nullptr && *ctx.parent != k) {
      e.has_parent = true;
      e.parent = *ctx.parent;
      if (++children_[e.parent] == 1) reclassify(e.parent, /*was_leaf=*/true);
    }
    auto [it, fresh] = meta_.try_emplace(k, e);
    if (!fresh) {
      set_of(k).erase({it->second.tick, k});
      it->second = e;
    }
    set_of(k).insert({e.tick, k});
  }
  void on_hit(const block_key& k, const access_context&) {
    auto it = meta_.find(k);
    if (it == meta_.end()) return;
    auto& s = set_of(k);
    s.erase({it->second.tick, k});
    it->second.tick = ++tick_;
    s.insert({it->second.tick, k});
  }
  void on_erase(const block_key& k) {
    if (meta_.count(k) != 0) remove(k);
  }

  template <class Evictable>
  std::optional<block_key> victim(Evictable&& evictable) {
    for (auto* s : {&leaves_, &inner_}) {
      for (const auto& [tick, k] : *s) {
        if (!evictable(k)) continue;
        const block_key key = k;
        remove(key);
        return key;
      }
    }
    return std::nullopt;
  }

  [[nodiscard]] std::size_t size() const noexcept { return meta_.size(); }
  //! True if no tracked block names `k` as its parent.
  [[nodiscard]] bool is_leaf(const block_key& k) const { return children_.count(k) == 0; }

 private:
  struct entry {
    std::uint64_t tick = 0;
    bool has_parent = false;
    block_key parent{};
  };
  using ordered = std::set<std::pair<std::uint64_t, block_key>>;

  ordered& set_of(const block_key& k) { return is_leaf(k) ? leaves_ : inner_; }

  // k's leaf status just flipped; move it between the sets if tracked.
  void reclassify(const block_key& k, bool was_leaf) {
    auto it = meta_.find(k);
    if (it == meta_.end()) return;
    const std::pair<std::uint64_t, block_key> item{it->second.tick, k};
    (was_leaf ? leaves_ : inner_).erase(item);
    (was_leaf ? inner_ : leaves_).insert(item);
  }

  void remove(const block_key& k) {
    auto it = meta_.find(k);
    const entry e = it->second;
    set_of(k).erase({e.tick, k});
    meta_.erase(it);
    if (e.has_parent) {
      auto c = children_.find(e.parent);
      if (c != children_.end() && --c->second == 0) {
        children_.erase(c);
        reclassify(e.parent, /*was_leaf=*/false);
      }
    }
  }

  cache::detail::flat_key_map<entry, detail::key_hash> meta_;
  // Tracked children per parent key, whether or not the parent is tracked, so
  // a parent re-inserted under cached children is known as inner at once.
  cache::detail::flat_key_map<std::uint32_t, detail::key_hash> children_;
  ordered leaves_, inner_;
  std::uint64_t tick_ = 0;
};

}  // namespace kvx::cache::eviction
