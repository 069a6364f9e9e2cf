#pragma once
//! \file
//! `kvx::cache::eviction::belady`: Belady's MIN, the offline optimum: evict
//! the block whose next use is farthest in the future (or never).
//!
//! It reads `access_context::next_use`, which only trace replay knows, so it
//! is the bound online policies are measured against, never a policy to
//! deploy. Optimal for the block hit count of a demand cache (every miss is
//! admitted); tests check it against brute force. O(log n); not thread-safe.
//!
//! \code
//! kvx::cache::eviction::belady p(2);
//! p.on_insert(a, {.next_use = 10}); p.on_insert(b, {.next_use = 5});
//! p.victim([](const auto&) { return true; });  // a
//! \endcode

#include <cstddef>
#include <cstdint>
#include <iterator>
#include <optional>
#include <set>
#include <unordered_map>
#include <utility>

#include <kvx/cache/eviction/detail/keyed_list.hpp>
#include <kvx/cache/eviction_policy.hpp>

namespace kvx::cache::eviction {

class belady {
 public:
  using eviction_policy_concept = eviction_policy_tag;
  explicit belady(std::size_t /*capacity_in_blocks*/ = 0) {}

  void on_insert(const block_key& k, const access_context& ctx) { set(k, ctx.next_use); }
  void on_hit(const block_key& k, const access_context& ctx) { set(k, ctx.next_use); }
  void on_erase(const block_key& k) {
    auto it = next_.find(k);
    if (it == next_.end()) return;
    order_.erase({it->second, k});
    next_.erase(it);
  }

  template <class Evictable>
  std::optional<block_key> victim(Evictable&& evictable) {
    for (auto it = order_.rbegin(); it != order_.rend(); ++it) {
      if (!evictable(it->second)) continue;
      const block_key k = it->second;
      order_.erase(std::next(it).base());
      next_.erase(k);
      return k;
    }
    return std::nullopt;
  }

  [[nodiscard]] std::size_t size() const noexcept { return next_.size(); }

 private:
  void set(const block_key& k, std::uint64_t next_use) {
    auto [it, fresh] = next_.try_emplace(k, next_use);
    if (!fresh) {
      order_.erase({it->second, k});
      it->second = next_use;
    }
    order_.insert({next_use, k});
  }

  std::unordered_map<block_key, std::uint64_t, detail::key_hash> next_;
  std::set<std::pair<std::uint64_t, block_key>> order_;
};

}  // namespace kvx::cache::eviction
