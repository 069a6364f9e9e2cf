#include <kvx/cache/eviction/belady.hpp>

#include <algorithm>
#include <cstdint>
#include <map>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include <kvx/cache/eviction/lru.hpp>
#include <kvx/cache/eviction/replay.hpp>
#include <kvx/cache/eviction/reuse_class.hpp>
#include <kvx/cache/eviction/s3fifo.hpp>

namespace ev = kvx::cache::eviction;

namespace {

// The most block hits any sequence of eviction choices achieves under the
// replay's semantics (admit every miss if a block is evictable, the current
// request's blocks pinned), by exhaustive search memoised on (position,
// resident set). Ids are < 16, so a set is a bitmask.
class brute_force {
 public:
  brute_force(const std::vector<kvx::cache::trace_request>& t, std::size_t capacity) : capacity_(capacity) {
    for (std::size_t r = 0; r < t.size(); ++r)
      for (std::size_t j = 0; j < t[r].hash_ids.size(); ++j) refs_.push_back({t[r].hash_ids[j], r, j});
  }
  int best() { return go(0, 0); }

 private:
  struct ref {
    std::uint64_t id;
    std::size_t req;
    std::size_t pos;
  };
  int go(std::size_t i, std::uint32_t resident) {
    if (i == refs_.size()) return 0;
    const auto memo_key = (static_cast<std::uint64_t>(i) << 32) | resident;
    if (auto it = memo_.find(memo_key); it != memo_.end()) return it->second;
    const auto bit = 1u << refs_[i].id;
    int result;
    if (resident & bit) {
      result = 1 + go(i + 1, resident);
    } else if (static_cast<std::size_t>(__builtin_popcount(resident)) < capacity_) {
      result = go(i + 1, resident | bit);
    } else {
      std::uint32_t pinned = 0;
      for (std::size_t k = i - refs_[i].pos; k < i; ++k) pinned |= 1u << refs_[k].id;
      result = -1;
      for (std::uint32_t v = 0; v < 16; ++v) {
        const auto vb = 1u << v;
        if ((resident & vb) && !(pinned & vb)) result = std::max(result, go(i + 1, (resident & ~vb) | bit));
      }
      if (result < 0) result = go(i + 1, resident);  // every resident block pinned: not admitted
    }
    memo_[memo_key] = result;
    return result;
  }
  std::size_t capacity_;
  std::vector<ref> refs_;
  std::map<std::uint64_t, int> memo_;
};

std::vector<kvx::cache::trace_request> random_trace(std::mt19937& rng, std::size_t requests, std::uint64_t ids) {
  std::vector<kvx::cache::trace_request> t;
  for (std::size_t r = 0; r < requests; ++r) {
    kvx::cache::trace_request q;
    const std::size_t n = 1 + rng() % 3;
    while (q.hash_ids.size() < n) {
      const std::uint64_t id = rng() % ids;
      if (std::find(q.hash_ids.begin(), q.hash_ids.end(), id) == q.hash_ids.end()) q.hash_ids.push_back(id);
    }
    q.input_length = 512 * n;
    t.push_back(q);
  }
  return t;
}

}  // namespace

TEST(EvictionBelady, MatchesBruteForceOnSmallTraces) {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 200; ++trial) {
    const auto trace = random_trace(rng, 4 + rng() % 8, 4 + rng() % 5);
    const std::size_t capacity = 1 + rng() % 4;
    const ev::replay_plan plan(trace);
    ev::belady p(capacity);
    const auto r = ev::replay(plan, p, {.capacity_blocks = capacity});
    brute_force bf(trace, capacity);
    ASSERT_EQ(static_cast<int>(r.block_hits), bf.best()) << "trial " << trial << " capacity " << capacity;
  }
}

TEST(EvictionBelady, NoOnlinePolicyBeatsIt) {
  std::mt19937 rng(11);
  for (int trial = 0; trial < 50; ++trial) {
    const auto trace = random_trace(rng, 40, 12);
    const std::size_t capacity = 2 + rng() % 5;
    const ev::replay_plan plan(trace);
    ev::belady b(capacity);
    ev::lru l(capacity);
    ev::s3fifo s(capacity);
    ev::reuse_class c(capacity);
    const auto best = ev::replay(plan, b, {.capacity_blocks = capacity}).block_hits;
    EXPECT_LE(ev::replay(plan, l, {.capacity_blocks = capacity}).block_hits, best);
    EXPECT_LE(ev::replay(plan, s, {.capacity_blocks = capacity}).block_hits, best);
    EXPECT_LE(ev::replay(plan, c, {.capacity_blocks = capacity}).block_hits, best);
  }
}
