#pragma once
//! \file
//! `kvx::cache::eviction::reuse_class`: LRU within reuse classes, classes
//! ranked by a protection vector that set dueling picks online. The default
//! policy (`eviction_auto`).
//!
//! What a KV-cache trace looks like from the cache: most blocks are read once
//! (a chat's one-off prompt); a block read twice is likely read again (a
//! shared system prompt or document, or a conversation that goes on); the
//! last block of a request is usually partial and never matches again; new
//! blocks added by a follow-up turn are reused less than those of a first
//! turn. So each tracked block sits in one of five LRU lists:
//!
//! | class | block | default rank |
//! | --- | --- | --- |
//! | `leaf_new` | read once, no cached child (a request's tail) | evicted first |
//! | `continuation_new` | read once, its parent was itself reused | |
//! | `fresh_new` | read once, first turn | |
//! | `twice` | read twice (counting reads before an eviction, remembered by a ghost) | |
//! | `frequent` | read three times or more | evicted last |
//!
//! The victim is the list tail with the smallest `last_access + protection[class]
//! * capacity`, so a protected block outlives an unprotected one by a
//! multiple of the cache's turnover rather than forever (no stale frequency).
//! How strong protection should be depends on size: a small cache must guard
//! its few reused blocks hard, a large one does best close to LRU. The policy
//! runs two shadow caches on a hash-sampled 1/S of the keys (set dueling, as in
//! Qureshi et al.'s DIP), one per protection vector, and the real cache uses
//! the vector whose shadow hit most recently; the first vector is plain LRU,
//! so the policy tracks LRU where LRU is best. Keys evicted are remembered (count and nothing else)
//! in a ghost of `ghost_factor` x capacity keys.
//!
//! O(1) amortized per call (five list tails compared per eviction); not
//! thread-safe.
//!
//! \code
//! kvx::cache::eviction::reuse_class p(10'000);
//! p.on_insert(k, {.parent = &parent_key});
//! \endcode

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <kvx/cache/detail/flat_key_map.hpp>
#include <kvx/cache/detail/huge_page_allocator.hpp>
#include <kvx/cache/eviction/detail/keyed_list.hpp>
#include <kvx/cache/eviction_policy.hpp>

namespace kvx::cache::eviction {

namespace detail {

inline constexpr std::size_t reuse_classes = 5;
using protection = std::array<double, reuse_classes>;

// The tracked blocks, in five LRU lists, and a ghost of recently evicted
// keys with their read counts. A key, tracked or a ghost (never both), has
// one node in a flat array, and the one flat map holds key -> node. Lists
// link nodes by index, and a victim's node becomes its ghost in place, so an
// eviction makes no map probe of its own; an insert finds a ghost's count
// where it inserts. Ghosts sit in a ring of node indexes; a ghost node keeps
// the sequence number of its ring slot, so a key evicted twice is dropped
// only when its latest slot is overwritten. Freed nodes are recycled (the
// next insert takes the node an expired ghost left), so the array stays at
// the tracked blocks plus the ring.
class reuse_core {
 public:
  struct meta {
    std::uint64_t tick = 0;
    std::uint32_t count = 1;
    bool continuation = false;
    bool leaf = true;
  };

  // `unit`: the clock span one unit of protection is worth (the capacity of
  // the cache whose clock ticks; shadows tick with the real cache's clock).
  reuse_core(std::size_t capacity, double ghost_factor, std::size_t unit)
      : capacity_(std::max<std::size_t>(capacity, 1)),
        unit_(std::max<std::size_t>(unit, 1)),
        ring_(std::max<std::size_t>(
                  static_cast<std::size_t>(ghost_factor * static_cast<double>(std::max<std::size_t>(capacity, 1))), 1),
              nil) {}

  [[nodiscard]] std::size_t size() const noexcept { return tracked_; }
  // A hint that k is about to be inserted: looks it up now, so that the miss
  // overlaps the eviction before the insert. The result is kept only so that
  // the lookup is not optimized away.
  void prefetch(const block_key& k) { prefetched_ = keys_.find(k) != keys_.end(); }
  [[nodiscard]] std::optional<meta> find(const block_key& k) const {
    const node* n = tracked(k);
    if (n == nullptr) return std::nullopt;
    return meta{n->tick, n->count, n->continuation, n->leaf};
  }

  // A miss: `continuation` and `leaf` given (shadows) or derived from the parent (real cache).
  void insert(const block_key& k, std::uint64_t tick, const block_key* parent, std::optional<meta> given = {}) {
    meta m;
    if (given) {
      m = *given;
    } else if (parent != nullptr) {
      if (const node* p = tracked(*parent)) m.continuation = p->count >= 2 || p->continuation;
    }
    m.tick = tick;
    spare_node();  // first: a failed allocation leaves the map as it was
    auto [it, fresh] = keys_.try_emplace(k, free_);
    if (fresh) free_ = nodes_[free_].newer;  // k takes the spare node
    const std::uint32_t i = it->second;
    node& n = nodes_[i];  // stays valid: nothing below allocates a node
    std::uint32_t ghost_count = 0;
    if (n.state == node_state::ghost) {
      ghost_count = n.count;  // a ghost's count is taken, the ghost forgotten
    } else if (n.state == node_state::tracked) {  // a broken precondition: start it over
      unlink(i);
      --tracked_;
    }
    n.state = node_state::free;  // untracked while the parent is marked: parent == k is a no-op, as before
    m.count = 1 + ghost_count;
    if (given && given->count > m.count) m.count = given->count;
    if (parent != nullptr) mark_inner(*parent);  // before k goes to the front
    n.key = k;
    n.tick = m.tick;
    n.count = m.count;
    n.continuation = m.continuation;
    n.leaf = m.leaf;
    n.state = node_state::tracked;
    push_front(i, static_cast<std::uint8_t>(class_of(m)));
    ++tracked_;
  }

  void hit(const block_key& k, std::uint64_t tick, const block_key* parent) {
    if (parent != nullptr) mark_inner(*parent);
    node* n = tracked(k);
    if (n == nullptr) return;
    n->tick = tick;
    if (n->count < UINT32_MAX) ++n->count;
    relist(index_of(*n));
  }

  void mark_inner(const block_key& k) {
    node* n = tracked(k);
    if (n == nullptr || !n->leaf) return;
    n->leaf = false;
    relist(index_of(*n));
  }

  bool erase(const block_key& k) {
    auto it = keys_.find(k);
    if (it == keys_.end() || nodes_[it->second].state != node_state::tracked) return false;
    unlink(it->second);
    release(it->second);
    keys_.erase(it);
    --tracked_;
    return true;
  }

  template <class Evictable>
  std::optional<block_key> victim(Evictable& evictable, const protection& p) {
    // The ring slot this eviction's ghost takes: the ghost there before is
    // forgotten, unless its key was re-inserted or evicted again since (its
    // node then is tracked, or a ghost of a later slot, or recycled). Its map
    // entry is found before the lists are walked, so that the two chains of
    // cache misses (this one, and the tails' and the caller's `evictable`)
    // overlap; the node of a slot a few evictions ahead is prefetched.
    const std::size_t ring = ring_.size();
    std::uint32_t& slot = ring_[seq_ % ring];
    auto expired = keys_.end();
    if (seq_ >= ring) {
      const node& old = nodes_[slot];
      if (old.state == node_state::ghost && old.tick == seq_ - ring) expired = keys_.find(old.key);
    }
    if (const std::uint32_t ahead = ring_[(seq_ + prefetch_distance) % ring]; ahead != nil)
      __builtin_prefetch(&nodes_[ahead]);

    const double unit = static_cast<double>(std::max(unit_, size()));
    std::size_t best_class = reuse_classes;
    std::uint32_t best = nil;
    double best_score = 0;
    for (std::size_t c = 0; c < reuse_classes; ++c) {
      for (std::uint32_t i = lists_[c].oldest; i != nil; i = nodes_[i].newer) {
        const node& n = nodes_[i];
        if (!evictable(n.key)) continue;
        const double score = static_cast<double>(n.tick) + p[c] * unit;
        if (best_class == reuse_classes || score < best_score) {
          best_class = c;
          best = i;
          best_score = score;
        }
        break;
      }
    }
    if (best_class == reuse_classes) return std::nullopt;
    if (expired != keys_.end()) {  // still valid: `evictable` does not reach this map
      release(expired->second);
      keys_.erase(expired);
    }
    node& v = nodes_[best];
    unlink(best);
    v.state = node_state::ghost;
    v.tick = seq_;  // a ghost's tick is its ring slot's sequence number
    slot = best;
    ++seq_;
    --tracked_;
    return v.key;
  }

  static std::size_t class_of(const meta& m) noexcept {
    if (m.count >= 3) return 4;
    if (m.count == 2) return 3;
    if (m.leaf) return 0;
    return m.continuation ? 1 : 2;
  }

 private:
  static constexpr std::uint32_t nil = UINT32_MAX;
  static constexpr std::size_t prefetch_distance = 4;  // evictions
  enum class node_state : std::uint8_t { free, tracked, ghost };
  // 40 bytes. Tracked: in list `klass`; a ghost: in no list, `tick` its
  // ring slot's sequence number; free: `newer` links the free list.
  struct node {
    block_key key;
    std::uint64_t tick = 0;
    std::uint32_t count = 0;
    std::uint32_t newer = nil;  // towards the list's newest (front)
    std::uint32_t older = nil;  // towards its oldest (back)
    std::uint8_t klass = 0;
    bool continuation = false;
    bool leaf = true;
    node_state state = node_state::free;
  };
  struct list_ends {
    std::uint32_t newest = nil, oldest = nil;
  };

  [[nodiscard]] const node* tracked(const block_key& k) const {
    auto it = keys_.find(k);
    return it == keys_.end() || nodes_[it->second].state != node_state::tracked ? nullptr : &nodes_[it->second];
  }
  [[nodiscard]] node* tracked(const block_key& k) {
    return const_cast<node*>(std::as_const(*this).tracked(k));
  }
  [[nodiscard]] std::uint32_t index_of(const node& n) const noexcept {
    return static_cast<std::uint32_t>(&n - nodes_.data());
  }
  static meta meta_of(const node& n) noexcept { return {n.tick, n.count, n.continuation, n.leaf}; }

  // Makes sure the free list has a node.
  void spare_node() {
    if (free_ != nil) return;
    if (nodes_.size() >= nil) throw std::length_error("kvx: reuse_class: more than 2^32 - 1 tracked and ghost blocks");
    nodes_.emplace_back();  // its `newer` is nil: the free list's end
    free_ = static_cast<std::uint32_t>(nodes_.size() - 1);
  }
  void release(std::uint32_t i) noexcept {
    nodes_[i].state = node_state::free;
    nodes_[i].newer = std::exchange(free_, i);
  }
  void push_front(std::uint32_t i, std::uint8_t c) noexcept {
    node& n = nodes_[i];
    list_ends& l = lists_[c];
    n.klass = c;
    n.newer = nil;
    n.older = l.newest;
    if (l.newest != nil)
      nodes_[l.newest].newer = i;
    else
      l.oldest = i;
    l.newest = i;
  }
  void unlink(std::uint32_t i) noexcept {
    node& n = nodes_[i];
    list_ends& l = lists_[n.klass];
    (n.newer != nil ? nodes_[n.newer].older : l.newest) = n.older;
    (n.older != nil ? nodes_[n.older].newer : l.oldest) = n.newer;
  }
  void relist(std::uint32_t i) noexcept {
    unlink(i);
    push_front(i, static_cast<std::uint8_t>(class_of(meta_of(nodes_[i]))));
  }

  std::array<list_ends, reuse_classes> lists_{};
  std::size_t capacity_;
  std::size_t unit_;
  std::vector<node, cache::detail::huge_page_allocator<node>> nodes_;
  std::uint32_t free_ = nil;  // recycled nodes, linked through `newer`
  cache::detail::flat_key_map<std::uint32_t, key_hash> keys_;  // tracked and ghost keys -> their node
  std::size_t tracked_ = 0;
  std::vector<std::uint32_t, cache::detail::huge_page_allocator<std::uint32_t>> ring_;  // ghost nodes by slot
  std::uint64_t seq_ = 0;
  bool prefetched_ = false;
};

}  // namespace detail

class reuse_class {
 public:
  using eviction_policy_concept = eviction_policy_tag;
  struct options {
    //! The protection vectors that duel, per class in units of capacity
    //! (classes in the table's order). The first is plain LRU, the floor; the
    //! second suits a cache large against its reuse distances; the last, a
    //! small one: new blocks leave fast, reused ones stay long.
    std::vector<detail::protection> vectors{{0.0, 0.0, 0.0, 0.0, 0.0},
                                            {-2.0, -1.5, -1.0, 0.0, 1.0},
                                            {-16.0, -16.0, -12.0, 0.0, 8.0}};
    double ghost_factor = 4.0;       //!< evicted keys remembered, as a multiple of capacity
    std::size_t shadow_blocks = 1024;  //!< capacity of each dueling shadow cache
  };

  //! The largest `ghost_factor`: far more memory than the reuse distances
  //! measured need, and it keeps the ghost's length a number of keys.
  static constexpr double max_ghost_factor = 64.0;

  explicit reuse_class(std::size_t capacity_in_blocks = 0) : reuse_class(capacity_in_blocks, options{}) {}
  //! Throws `std::invalid_argument` for a `ghost_factor` outside [0,
  //! `max_ghost_factor`], or when capacity x (1 + ghost_factor) keys, tracked
  //! and remembered, would not fit the 32-bit node numbers.
  reuse_class(std::size_t capacity_in_blocks, options o)
      : opt_(validated(o, capacity_in_blocks)),
        capacity_(std::max<std::size_t>(capacity_in_blocks, 1)),
        sample_(std::max<std::size_t>(1, capacity_ / std::max<std::size_t>(o.shadow_blocks, 1))),
        real_(capacity_, o.ghost_factor, capacity_) {
    if (opt_.vectors.empty()) opt_.vectors.push_back(detail::protection{});
    const std::size_t shadow_capacity = std::max<std::size_t>(1, capacity_ / sample_);
    if (opt_.vectors.size() > 1)
      for (std::size_t i = 0; i < opt_.vectors.size(); ++i)
        shadows_.push_back(std::make_unique<detail::reuse_core>(shadow_capacity, o.ghost_factor, capacity_));
    hits_.assign(shadows_.size(), 0.0);
  }

  void on_insert(const block_key& k, const access_context& ctx) {
    real_.insert(k, ++tick_, ctx.parent);
    shadow_access(k, ctx.parent);
  }
  void on_hit(const block_key& k, const access_context& ctx) {
    real_.hit(k, ++tick_, ctx.parent);
    shadow_access(k, ctx.parent);
  }
  void on_erase(const block_key& k) { real_.erase(k); }
  //! A hint that `k` is about to be inserted (no effect on decisions).
  void prefetch(const block_key& k) { real_.prefetch(k); }

  template <class Evictable>
  std::optional<block_key> victim(Evictable&& evictable) {
    return real_.victim(evictable, opt_.vectors[mode_]);
  }

  [[nodiscard]] std::size_t size() const noexcept { return real_.size(); }
  //! The index in `options::vectors` of the protection now in use.
  [[nodiscard]] std::size_t mode() const noexcept { return mode_; }

 private:
  [[nodiscard]] bool sampled(const block_key& k) const { return detail::key_hash{}(k) % sample_ == 0; }

  static options validated(const options& o, std::size_t capacity_in_blocks) {
    if (!(o.ghost_factor >= 0.0 && o.ghost_factor <= max_ghost_factor))
      throw std::invalid_argument("kvx: reuse_class: ghost_factor " + std::to_string(o.ghost_factor) +
                                  " is outside [0, 64]");
    // Checked here, before the ghost ring of ghost_factor x capacity is
    // allocated, rather than when the nodes run out mid-insert.
    const double keys = static_cast<double>(std::max<std::size_t>(capacity_in_blocks, 1)) * (1.0 + o.ghost_factor);
    if (keys >= static_cast<double>(UINT32_MAX))
      throw std::invalid_argument("kvx: reuse_class: " + std::to_string(capacity_in_blocks) +
                                  " blocks x (1 + ghost_factor " + std::to_string(o.ghost_factor) +
                                  ") is more than the 2^32 - 1 keys it can track and remember");
    return o;
  }

  void shadow_access(const block_key& k, const block_key* parent) {
    if (shadows_.empty()) return;
    if (parent != nullptr && sampled(*parent))
      for (auto& s : shadows_) s->mark_inner(*parent);
    if (!sampled(k)) return;
    const auto m = real_.find(k);
    auto always = [](const block_key&) { return true; };
    for (std::size_t i = 0; i < shadows_.size(); ++i) {
      auto& s = *shadows_[i];
      if (s.find(k)) {
        s.hit(k, tick_, nullptr);
        hits_[i] += 1;
        continue;
      }
      detail::reuse_core::meta given;
      if (m) {
        given.continuation = m->continuation;
        given.leaf = m->leaf;
      }
      s.insert(k, tick_, nullptr, given);
      while (s.size() > capacity_ / sample_ && s.size() > 1) (void)s.victim(always, opt_.vectors[i]);
    }
    // Forget slowly, so the choice follows a workload that changes.
    if (++sampled_accesses_ % (8 * (capacity_ / sample_) + 64) == 0)
      for (auto& h : hits_) h *= 0.5;
    // Ties keep the earlier (less protective) vector.
    std::size_t best = 0;
    for (std::size_t i = 1; i < hits_.size(); ++i)
      if (hits_[i] > hits_[best]) best = i;
    mode_ = best;
  }

  options opt_;
  std::size_t capacity_;
  std::size_t sample_;
  detail::reuse_core real_;
  std::vector<std::unique_ptr<detail::reuse_core>> shadows_;
  std::vector<double> hits_;
  std::uint64_t sampled_accesses_ = 0;
  std::uint64_t tick_ = 0;
  std::size_t mode_ = 0;
};

}  // namespace kvx::cache::eviction
