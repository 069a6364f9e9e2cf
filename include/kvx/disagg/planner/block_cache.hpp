#pragma once
//! \file
//! `kvx::disagg::planner::block_cache`: one simulated cache tier (an
//! instance's HBM prefix cache, the pool's DRAM or SSD) that holds block keys,
//! not bytes, and asks a real kvx eviction policy
//! (`kvx::cache::eviction::any_eviction_policy`, the same code a
//! `tiered_cache` runs) which block leaves when it is full.
//!
//! Blocks can be pinned (a request is reading them or has them in flight);
//! a pinned block is never a victim, as in `tiered_cache`. Not thread-safe
//! (the simulator owns it). Nothing blocks.
//!
//! \code
//! auto c = kvx::disagg::planner::block_cache::make("s3fifo", 1000).value();
//! auto r = c.insert(key, {.now = 7});
//! if (r.evicted) forget(*r.evicted);
//! \endcode

#include <cstddef>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <unordered_map>

#include <nlohmann/json.hpp>

#include <kvx/cache/block_key.hpp>
#include <kvx/cache/eviction/any_eviction_policy.hpp>
#include <kvx/core/config.hpp>
#include <kvx/core/result.hpp>

namespace kvx::disagg::planner {

class block_cache {
 public:
  //! What `insert` did.
  struct insert_result {
    bool inserted = false;                     //!< false: full and every resident block pinned
    std::optional<cache::block_key> evicted;   //!< the victim that made room
    std::uint64_t evicted_next_use = cache::never;
  };

  //! A tier that holds nothing (capacity 0).
  block_cache() = default;

  //! A tier of `capacity_blocks` blocks evicting with `policy` (a name
  //! `any_eviction_policy::from_config` knows).
  static result<block_cache> make(const std::string& policy, std::size_t capacity_blocks) {
    block_cache c;
    if (capacity_blocks == 0) return c;
    const nlohmann::json cfg = {{"policy", policy}};
    auto p = cache::eviction::any_eviction_policy::from_config(config::view(cfg), capacity_blocks);
    if (!p) return p.error();
    c.policy_.emplace(std::move(*p));
    c.capacity_ = capacity_blocks;
    c.resident_.reserve(capacity_blocks + 1);
    return c;
  }

  [[nodiscard]] std::size_t capacity() const noexcept { return capacity_; }
  [[nodiscard]] std::size_t size() const noexcept { return resident_.size(); }
  [[nodiscard]] bool contains(const cache::block_key& k) const { return resident_.find(k) != resident_.end(); }
  [[nodiscard]] bool pinned(const cache::block_key& k) const {
    auto it = resident_.find(k);
    return it != resident_.end() && it->second.pins > 0;
  }
  [[nodiscard]] std::uint64_t next_use(const cache::block_key& k) const {
    auto it = resident_.find(k);
    return it == resident_.end() ? cache::never : it->second.next_use;
  }

  //! Pins a resident block (counted: pins nest). Contract: `k` is resident.
  void pin(const cache::block_key& k) { entry(k, "pin").pins++; }
  //! Contract: `k` is resident and pinned.
  void unpin(const cache::block_key& k) {
    auto& e = entry(k, "unpin");
    if (e.pins == 0) throw std::logic_error("kvx::planner::block_cache: unpin of a block that is not pinned");
    e.pins--;
  }

  //! A read of a resident block. Contract: `k` is resident.
  void touch(const cache::block_key& k, const cache::access_context& ctx) {
    entry(k, "touch").next_use = ctx.next_use;
    policy_->on_hit(k, ctx);
  }

  //! Admits `k` (not resident), evicting the policy's victim first if full.
  insert_result insert(const cache::block_key& k, const cache::access_context& ctx) {
    insert_result r;
    if (capacity_ == 0) return r;
    if (resident_.size() >= capacity_) {
      auto v = policy_->victim([this](const cache::block_key& c) {
        auto it = resident_.find(c);
        return it != resident_.end() && it->second.pins == 0;
      });
      if (!v) return r;
      auto it = resident_.find(*v);
      if (it == resident_.end() || it->second.pins > 0)
        throw std::logic_error("kvx::planner::block_cache: eviction policy '" + policy_->name() +
                               "' named a victim that is not resident or is pinned");
      r.evicted = *v;
      r.evicted_next_use = it->second.next_use;
      resident_.erase(it);
    }
    resident_.emplace(k, slot{0, ctx.next_use});
    policy_->on_insert(k, ctx);
    r.inserted = true;
    return r;
  }

  //! Removes a resident, unpinned block (it moves to another tier).
  void erase(const cache::block_key& k) {
    auto it = resident_.find(k);
    if (it == resident_.end() || it->second.pins > 0)
      throw std::logic_error("kvx::planner::block_cache: erase of a block that is not resident or is pinned");
    resident_.erase(it);
    policy_->on_erase(k);
  }

 private:
  struct slot {
    std::uint32_t pins = 0;
    std::uint64_t next_use = cache::never;
  };
  slot& entry(const cache::block_key& k, const char* op) {
    auto it = resident_.find(k);
    if (it == resident_.end())
      throw std::logic_error(std::string("kvx::planner::block_cache: ") + op + " of a block that is not resident");
    return it->second;
  }

  std::optional<cache::eviction::any_eviction_policy> policy_;
  std::size_t capacity_ = 0;
  std::unordered_map<cache::block_key, slot, cache::block_key_hash> resident_;
};

}  // namespace kvx::disagg::planner
