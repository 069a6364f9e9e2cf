// A custom eviction policy in one short file: "oldest leaf first". It opts in
// with the tag, is checked against the concept (a missing member would fail
// with a sentence naming it), and runs through a small trace replay.
// tests/cache/eviction_custom_policy_test.cpp runs the conformance suite on it.
#include <cstdio>
#include <deque>
#include <optional>
#include <unordered_set>
#include <vector>

#include <kvx/cache/eviction.hpp>

namespace demo {

using kvx::cache::access_context;
using kvx::cache::block_key;

// FIFO, but a block that became some other block's parent is skipped while a
// leaf is available: a cached prefix stays whole.
class oldest_leaf_first {
 public:
  using eviction_policy_concept = kvx::cache::eviction_policy_tag;
  explicit oldest_leaf_first(std::size_t /*capacity_in_blocks*/) {}

  void on_insert(const block_key& k, const access_context& ctx) {
    queue_.push_back(k);
    if (ctx.parent != nullptr) parents_.insert(*ctx.parent);
  }
  void on_hit(const block_key&, const access_context& ctx) {
    if (ctx.parent != nullptr) parents_.insert(*ctx.parent);
  }
  void on_erase(const block_key& k) { drop(k); }

  template <class Evictable>
  std::optional<block_key> victim(Evictable&& evictable) {
    for (bool leaves_only : {true, false})
      for (const auto& k : queue_)
        if (evictable(k) && (!leaves_only || parents_.count(k) == 0)) {
          const block_key v = k;
          drop(v);
          return v;
        }
    return std::nullopt;
  }
  [[nodiscard]] std::size_t size() const { return queue_.size(); }

 private:
  void drop(const block_key& k) {
    std::erase(queue_, k);
    parents_.erase(k);
  }
  std::deque<block_key> queue_;
  std::unordered_set<block_key, kvx::cache::block_key_hash> parents_;
};

static_assert(kvx::cache::check_eviction_policy<oldest_leaf_first>());

}  // namespace demo

#ifndef KVX_EXAMPLE_NO_MAIN
int main() {
  // Two conversations of two turns each: turn 2 repeats turn 1's blocks.
  std::vector<kvx::cache::trace_request> trace{
      {0, 1536, 10, {1, 2, 3}},    {10, 1024, 10, {7, 8}},         {20, 2560, 10, {1, 2, 3, 4, 5}},
      {30, 2048, 10, {7, 8, 9, 10}}, {40, 1536, 10, {11, 12, 13}}, {50, 3072, 10, {1, 2, 3, 4, 5, 6}},
  };
  const kvx::cache::eviction::replay_plan plan(trace);
  for (std::size_t capacity : {4, 8}) {
    demo::oldest_leaf_first mine(capacity);
    kvx::cache::eviction::lru lru(capacity);
    kvx::cache::eviction::belady best(capacity);
    const auto a = kvx::cache::eviction::replay(plan, mine, {.capacity_blocks = capacity});
    const auto b = kvx::cache::eviction::replay(plan, lru, {.capacity_blocks = capacity});
    const auto c = kvx::cache::eviction::replay(plan, best, {.capacity_blocks = capacity});
    std::printf("capacity %zu blocks: oldest_leaf_first %.1f%%, lru %.1f%%, belady %.1f%% block hit rate\n", capacity,
                100 * a.block_hit_rate(), 100 * b.block_hit_rate(), 100 * c.block_hit_rate());
    if (a.block_hits > c.block_hits) return 1;  // nothing beats the optimum
  }
  return 0;
}
#endif
