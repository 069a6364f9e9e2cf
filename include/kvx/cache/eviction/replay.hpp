#pragma once
//! \file
//! Trace replay: runs an eviction policy over a request trace against a
//! cache of a fixed number of blocks and counts what it saves.
//!
//! Semantics, per request in arrival order, per block in prefix order: a
//! block found in the cache is a hit (`on_hit`); a missed block is admitted
//! (`on_insert`, with its prefix parent), evicting the policy's victim first
//! when the cache is full. The request's own blocks are pinned while it is
//! processed (a block being read is never evicted); a block that cannot be
//! admitted because every resident block is pinned is counted as rejected.
//!
//! - block hit rate: hits / block references;
//! - prefix hit rate: blocks in the longest cached leading run of each
//!   request / block references (only a cached prefix saves prefill);
//! - token hit rate: tokens of hit blocks / prompt tokens;
//! - prefill tokens saved: tokens of the prefix-hit blocks.
//!
//! Single-threaded, deterministic.
//!
//! \code
//! auto trace = kvx::cache::read_trace("t.jsonl");
//! kvx::cache::eviction::replay_plan plan(*trace);
//! kvx::cache::eviction::lru p(3000);
//! auto r = kvx::cache::eviction::replay(plan, p, {.capacity_blocks = 3000});
//! r.block_hit_rate();
//! \endcode

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <unordered_map>
#include <vector>

#include <kvx/cache/eviction/detail/keyed_list.hpp>
#include <kvx/cache/eviction_policy.hpp>
#include <kvx/cache/trace.hpp>

namespace kvx::cache::eviction {

//! A trace flattened for replay, with every block reference's next use.
class replay_plan {
 public:
  explicit replay_plan(const std::vector<trace_request>& trace, std::uint64_t block_tokens = 512) {
    offsets_.reserve(trace.size() + 1);
    offsets_.push_back(0);
    for (const auto& r : trace) {
      for (std::size_t j = 0; j < r.hash_ids.size(); ++j) {
        keys_.push_back(block_key{0, r.hash_ids[j]});
        const std::uint64_t start = j * block_tokens;
        tokens_.push_back(r.input_length > start ? std::min(block_tokens, r.input_length - start) : 0);
      }
      offsets_.push_back(keys_.size());
    }
    next_use_.assign(keys_.size(), never);
    std::unordered_map<block_key, std::uint64_t, detail::key_hash> last;
    last.reserve(keys_.size());
    for (std::size_t i = keys_.size(); i-- > 0;) {
      auto [it, fresh] = last.try_emplace(keys_[i], i);
      if (!fresh) {
        next_use_[i] = it->second;
        it->second = i;
      }
    }
  }

  [[nodiscard]] std::size_t requests() const noexcept { return offsets_.size() - 1; }
  [[nodiscard]] std::size_t references() const noexcept { return keys_.size(); }
  [[nodiscard]] const std::vector<block_key>& keys() const noexcept { return keys_; }
  [[nodiscard]] const std::vector<std::size_t>& offsets() const noexcept { return offsets_; }
  [[nodiscard]] const std::vector<std::uint64_t>& next_use() const noexcept { return next_use_; }
  [[nodiscard]] const std::vector<std::uint64_t>& tokens() const noexcept { return tokens_; }

 private:
  std::vector<block_key> keys_;
  std::vector<std::size_t> offsets_;
  std::vector<std::uint64_t> next_use_;
  std::vector<std::uint64_t> tokens_;
};

struct replay_options {
  std::size_t capacity_blocks = 0;
  std::uint64_t block_bytes = 0;  //!< passed to the policy as access_context::bytes
  //! Called every `progress_every` requests with (done, total); may be empty.
  std::function<void(std::size_t, std::size_t)> progress{};
  std::size_t progress_every = 1000;
};

struct replay_result {
  std::uint64_t requests = 0;
  std::uint64_t block_refs = 0;
  std::uint64_t block_hits = 0;
  std::uint64_t prefix_hit_blocks = 0;
  std::uint64_t input_tokens = 0;
  std::uint64_t hit_tokens = 0;
  std::uint64_t prefill_tokens_saved = 0;
  std::uint64_t evictions = 0;
  std::uint64_t rejected = 0;

  [[nodiscard]] static double ratio(std::uint64_t a, std::uint64_t b) noexcept {
    return b == 0 ? 0.0 : static_cast<double>(a) / static_cast<double>(b);
  }
  [[nodiscard]] double block_hit_rate() const noexcept { return ratio(block_hits, block_refs); }
  [[nodiscard]] double prefix_hit_rate() const noexcept { return ratio(prefix_hit_blocks, block_refs); }
  [[nodiscard]] double token_hit_rate() const noexcept { return ratio(hit_tokens, input_tokens); }
  [[nodiscard]] double prefill_saved_rate() const noexcept { return ratio(prefill_tokens_saved, input_tokens); }
};

//! Replays `plan` through `policy` (constructed for `opt.capacity_blocks`).
//! Throws std::logic_error if the policy breaks its contract (names a victim
//! that is not resident or is pinned).
template <eviction_policy P>
replay_result replay(const replay_plan& plan, P& policy, const replay_options& opt) {
  replay_result out;
  // Resident blocks, each with the last request that read it: a block of the
  // current request is pinned.
  std::unordered_map<block_key, std::size_t, detail::key_hash> resident;
  resident.reserve(opt.capacity_blocks + 1);
  const auto& keys = plan.keys();
  const auto& offsets = plan.offsets();
  for (std::size_t r = 0; r < plan.requests(); ++r) {
    const std::size_t req = r + 1;
    auto evictable = [&](const block_key& k) {
      auto it = resident.find(k);
      return it != resident.end() && it->second != req;
    };
    bool prefix = true;
    for (std::size_t i = offsets[r]; i < offsets[r + 1]; ++i) {
      const block_key& k = keys[i];
      const std::uint64_t tokens = plan.tokens()[i];
      access_context ctx{i, plan.next_use()[i], opt.block_bytes, i > offsets[r] ? &keys[i - 1] : nullptr};
      ++out.block_refs;
      out.input_tokens += tokens;
      if (auto it = resident.find(k); it != resident.end()) {
        it->second = req;
        ++out.block_hits;
        out.hit_tokens += tokens;
        if (prefix) {
          ++out.prefix_hit_blocks;
          out.prefill_tokens_saved += tokens;
        }
        policy.on_hit(k, ctx);
        continue;
      }
      prefix = false;
      if (opt.capacity_blocks == 0) {
        ++out.rejected;
        continue;
      }
      if (resident.size() >= opt.capacity_blocks) {
        auto v = policy.victim(evictable);
        if (!v) {
          ++out.rejected;
          continue;
        }
        auto vit = resident.find(*v);
        if (vit == resident.end() || vit->second == req)
          throw std::logic_error("kvx: eviction policy returned a victim that is not resident or is pinned");
        resident.erase(vit);
        ++out.evictions;
      }
      resident.emplace(k, req);
      policy.on_insert(k, ctx);
    }
    ++out.requests;
    if (opt.progress && opt.progress_every != 0 && (r + 1) % opt.progress_every == 0) opt.progress(r + 1, plan.requests());
  }
  return out;
}

}  // namespace kvx::cache::eviction
