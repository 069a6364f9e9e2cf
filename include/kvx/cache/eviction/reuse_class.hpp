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
#include <iterator>
#include <list>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

#include <kvx/cache/detail/flat_key_map.hpp>
#include <kvx/cache/detail/node_pool.hpp>
#include <kvx/cache/eviction/detail/keyed_list.hpp>
#include <kvx/cache/eviction_policy.hpp>

namespace kvx::cache::eviction {

namespace detail {

inline constexpr std::size_t reuse_classes = 5;
using protection = std::array<double, reuse_classes>;

// The tracked blocks, in five LRU lists, and a ghost of recently evicted
// keys with their read counts. One flat map holds both (a key is tracked or
// a ghost, never both), so an eviction turns the victim's entry into its
// ghost in place and an insert finds a ghost's count where it inserts: one
// probe each instead of one per map. Ghosts sit in a ring; an entry carries
// its ring slot's sequence number so a key evicted twice is dropped only
// when its latest slot is overwritten.
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
      : lists_(make_lists()),
        capacity_(std::max<std::size_t>(capacity, 1)),
        unit_(std::max<std::size_t>(unit, 1)),
        ring_(std::max<std::size_t>(
            static_cast<std::size_t>(ghost_factor * static_cast<double>(std::max<std::size_t>(capacity, 1))), 1)) {}

  [[nodiscard]] std::size_t size() const noexcept { return tracked_; }
  [[nodiscard]] const meta* find(const block_key& k) const {
    auto it = keys_.find(k);
    return it == keys_.end() || !it->second.tracked ? nullptr : &it->second.at->m;
  }

  // A miss: `continuation` and `leaf` given (shadows) or derived from the parent (real cache).
  void insert(const block_key& k, std::uint64_t tick, const block_key* parent, std::optional<meta> given = {}) {
    meta m;
    if (given) {
      m = *given;
    } else if (parent != nullptr) {
      if (const meta* p = find(*parent)) m.continuation = p->count >= 2 || p->continuation;
    }
    m.tick = tick;
    auto [it, fresh] = keys_.try_emplace(k);
    m.count = 1 + (fresh ? 0 : it->second.ghost_count);  // a ghost's count is taken, the ghost forgotten
    if (given && given->count > m.count) m.count = given->count;
    if (parent != nullptr) mark_inner(*parent);  // before k goes to the front (finds do not move `it`)
    const auto c = static_cast<std::uint8_t>(class_of(m));
    auto& l = lists_[c];
    l.push_front(node{k, m, c});
    it->second = key_entry{l.begin(), 0, 0, true};
    ++tracked_;
  }

  void hit(const block_key& k, std::uint64_t tick, const block_key* parent) {
    if (parent != nullptr) mark_inner(*parent);
    auto it = keys_.find(k);
    if (it == keys_.end() || !it->second.tracked) return;
    auto n = it->second.at;
    n->m.tick = tick;
    if (n->m.count < UINT32_MAX) ++n->m.count;
    relist(n);
  }

  void mark_inner(const block_key& k) {
    auto it = keys_.find(k);
    if (it == keys_.end() || !it->second.tracked || !it->second.at->m.leaf) return;
    it->second.at->m.leaf = false;
    relist(it->second.at);
  }

  bool erase(const block_key& k) {
    auto it = keys_.find(k);
    if (it == keys_.end() || !it->second.tracked) return false;
    lists_[it->second.at->klass].erase(it->second.at);
    keys_.erase(it);
    --tracked_;
    return true;
  }

  template <class Evictable>
  std::optional<block_key> victim(Evictable& evictable, const protection& p) {
    const double unit = static_cast<double>(std::max(unit_, size()));
    std::size_t best_class = reuse_classes;
    node_list::iterator best;
    double best_score = 0;
    for (std::size_t c = 0; c < reuse_classes; ++c) {
      auto& l = lists_[c];
      for (auto it = l.rbegin(); it != l.rend(); ++it) {
        if (!evictable(it->key)) continue;
        const double score = static_cast<double>(it->m.tick) + p[c] * unit;
        if (best_class == reuse_classes || score < best_score) {
          best_class = c;
          best = std::prev(it.base());
          best_score = score;
        }
        break;
      }
    }
    if (best_class == reuse_classes) return std::nullopt;
    const block_key k = best->key;
    // The ring slot this ghost takes: the ghost there before is forgotten,
    // unless its key was re-inserted or evicted again since.
    auto& slot = ring_[seq_ % ring_.size()];
    if (seq_ >= ring_.size()) {
      auto old = keys_.find(slot.first);
      if (old != keys_.end() && !old->second.tracked && old->second.ghost_seq == slot.second) keys_.erase(old);
    }
    slot = {k, seq_};
    keys_.find(k)->second = key_entry{{}, best->m.count, seq_, false};
    ++seq_;
    --tracked_;
    lists_[best_class].erase(best);
    return k;
  }

  static std::size_t class_of(const meta& m) noexcept {
    if (m.count >= 3) return 4;
    if (m.count == 2) return 3;
    if (m.leaf) return 0;
    return m.continuation ? 1 : 2;
  }

 private:
  struct node {
    block_key key;
    meta m;
    std::uint8_t klass;
  };
  // The five lists share one pool of nodes (so nodes splice between them).
  using node_list = std::list<node, cache::detail::pool_allocator<node>>;
  static std::array<node_list, reuse_classes> make_lists() {
    const cache::detail::pool_allocator<node> a(
        std::make_shared<cache::detail::node_pool>(sizeof(node) + 2 * sizeof(void*)));  // a node and its links
    return {node_list(a), node_list(a), node_list(a), node_list(a), node_list(a)};
  }
  struct key_entry {
    node_list::iterator at{};  // tracked: its place in its class's list
    std::uint32_t ghost_count = 0;     // a ghost: the reads it had when evicted
    std::uint64_t ghost_seq = 0;       // a ghost: its ring slot's sequence number
    bool tracked = false;
  };
  void relist(node_list::iterator n) {
    const auto to = static_cast<std::uint8_t>(class_of(n->m));
    lists_[to].splice(lists_[to].begin(), lists_[n->klass], n);
    n->klass = to;
  }

  std::array<node_list, reuse_classes> lists_;
  std::size_t capacity_;
  std::size_t unit_;
  cache::detail::flat_key_map<key_entry, key_hash> keys_;
  std::size_t tracked_ = 0;
  std::vector<std::pair<block_key, std::uint64_t>, cache::detail::huge_page_allocator<std::pair<block_key, std::uint64_t>>> ring_;
  std::uint64_t seq_ = 0;
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

  explicit reuse_class(std::size_t capacity_in_blocks = 0) : reuse_class(capacity_in_blocks, options{}) {}
  reuse_class(std::size_t capacity_in_blocks, options o)
      : opt_(o),
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

  template <class Evictable>
  std::optional<block_key> victim(Evictable&& evictable) {
    return real_.victim(evictable, opt_.vectors[mode_]);
  }

  [[nodiscard]] std::size_t size() const noexcept { return real_.size(); }
  //! The index in `options::vectors` of the protection now in use.
  [[nodiscard]] std::size_t mode() const noexcept { return mode_; }

 private:
  [[nodiscard]] bool sampled(const block_key& k) const { return detail::key_hash{}(k) % sample_ == 0; }

  void shadow_access(const block_key& k, const block_key* parent) {
    if (shadows_.empty()) return;
    if (parent != nullptr && sampled(*parent))
      for (auto& s : shadows_) s->mark_inner(*parent);
    if (!sampled(k)) return;
    const auto* m = real_.find(k);
    auto always = [](const block_key&) { return true; };
    for (std::size_t i = 0; i < shadows_.size(); ++i) {
      auto& s = *shadows_[i];
      if (s.find(k) != nullptr) {
        s.hit(k, tick_, nullptr);
        hits_[i] += 1;
        continue;
      }
      detail::reuse_core::meta given;
      if (m != nullptr) {
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
