#pragma once
//! \file
//! `tiered_cache<Tiers, Eviction, Tiering>`: a KV block cache over a stack of
//! tiers (fastest first), composed from an eviction policy (which block
//! leaves a tier) and a tiering policy (where blocks are written, promoted
//! and demoted). Defaults: `eviction::eviction_auto`, `tiering::tiering_auto`
//! (write-back), so `tiered_cache<tier_stack<dram_tier<>>>` is a complete cache.
//!
//! \code
//! namespace kc = kvx::cache;
//! using cache_t = kc::tiered_cache<kc::tier_stack<kc::dram_tier<>, kc::file_tier<>>,
//!                                  kc::eviction::lru, kc::tiering::write_back>;
//! cache_t cache({.block_bytes = 256 << 10},
//!               kc::dram_tier_config{.capacity = 1ULL << 30},
//!               kc::file_tier_config{.path = "/mnt/nvme", .capacity = 64ULL << 30});
//! auto keys = hasher.keys(prompt);
//! auto hit = cache.lookup(keys);                   // hit.blocks leading blocks cached; hit.tiers[i] where
//! auto pins = cache.pin_prefix(keys);              // none of them is evicted while pinned
//! cache.read(keys[0], buffer);                     // copies the block out (and promotes it)
//! cache.insert(keys[hit.blocks], new_kv, keys[hit.blocks - 1]);
//! \endcode
//!
//! ## Semantics
//! - `lookup(keys)` counts the leading keys resident in some tier; it is the
//!   access: eviction policies see it (`on_hit`), metrics count hits and
//!   misses. `read` copies bytes and does not count as another access.
//! - `insert` stores a block into tier 0 (and every lower tier if the tiering
//!   policy writes through), after admission control. When a tier would go
//!   above its high watermark it evicts down to its low watermark; a victim
//!   moves one tier down if the tiering policy demotes, otherwise it is
//!   dropped. If nothing can be evicted (all pinned or being written) and the
//!   block does not fit, `insert` fails with `errc::capacity_exceeded`;
//!   pinned blocks are never evicted or erased.
//! - A demotion whose copy fails (the tier below refuses or fails the write,
//!   a full or failing disk) is undone: the block may be its only copy, so it
//!   stays in its tier, resident and evictable as before, the tier below
//!   counts `kvx_cache_demotion_failures_total` and a warning is logged. The
//!   insert or promotion that needed its room then fails with
//!   `errc::capacity_exceeded` (naming the failed demotion) unless the room
//!   is there anyway; it does not evict further blocks towards a tier that
//!   just failed.
//! - With write-through, a lower tier whose copy of an inserted block fails
//!   does not keep it (the insert stands on tier 0's copy); that tier counts
//!   `kvx_cache_write_through_failures_total` and a warning is logged.
//! - `read` serves from the fastest tier holding the block and, if the
//!   tiering policy promotes on hit, copies it into tier 0.
//!
//! ## Thread safety and locking
//! Every member may be called from any number of threads. One mutex guards
//! the index (key to entry: resident tiers, pins, size, parent, and the
//! block's range in each tier that takes placements), the policies and the
//! per-tier byte accounting; it is held for hash-map work and policy updates
//! (well under a microsecond per block, see benchmarks/tiered_cache_micro.cpp),
//! never across a copy of block bytes:
//! - an insert reserves room (evicting) and marks the entry `writing`, copies
//!   outside the lock, then publishes;
//! - a read pins, copies outside the lock, then unpins;
//! - an eviction that demotes marks the victim as leaving its tier (it stays
//!   readable there, counts against the tier below, and is neither evicted,
//!   erased nor re-inserted meanwhile); the thread that caused the eviction
//!   copies it down after releasing the lock, then, under the lock, makes the
//!   lower copy resident and frees the old one (or, if a reader pinned it
//!   meanwhile, the last unpin frees it); if the copy failed, it clears the
//!   mark instead and the block is back in its tier. A reader or a lookup
//!   during the move finds the block in its old tier and is never blocked by
//!   the copy.
//! Pins, `writing` and `leaving` marks and the tier's own per-key contract
//! (tier.hpp) make sure no byte range is freed or reused while a copy uses it.
//!
//! The index is one flat hash map with one entry per block. A tier that takes
//! placements (`has_placement_v`, the DRAM tier) keeps no index of its own
//! under the cache: the entry holds the block's range in it.

#include <algorithm>
#include <array>
#include <bit>
#include <cassert>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <kvx/cache/block_key.hpp>
#include <kvx/cache/detail/flat_key_map.hpp>
#include <kvx/cache/eviction/eviction_auto.hpp>
#include <kvx/cache/eviction_policy.hpp>
#include <kvx/cache/tier.hpp>
#include <kvx/cache/tiering/write_back.hpp>
#include <kvx/cache/tiering_policy.hpp>
#include <kvx/cache/tiers/tier_stack.hpp>
#include <kvx/core/log.hpp>
#include <kvx/core/metrics.hpp>
#include <kvx/core/result.hpp>
#include <kvx/memory/allocator.hpp>

namespace kvx::cache {

//! Settings of a `tiered_cache` that do not depend on its policy types.
struct tiered_cache_config {
  //! Nominal bytes per block: sizes each tier's eviction policy
  //! (`capacity / block_bytes` blocks). Blocks may differ in size.
  std::uint64_t block_bytes = 0;
  //! `cache` label of the metrics.
  std::string name = "kvx";
  //! Where metrics are registered; null means `kvx::metrics::default_registry()`.
  metrics::registry* registry = nullptr;
};

//! What `lookup` found: the number of leading blocks cached, and for each of
//! them the index of the fastest tier holding it.
struct prefix_match {
  std::size_t blocks = 0;
  std::vector<std::uint8_t> tiers;
};

enum class insert_status : std::uint8_t {
  inserted,        //!< stored into tier 0 (and lower tiers if writing through)
  already_cached,  //!< the key is resident or being written by another caller
  rejected,        //!< admission control declined it; nothing was stored
};

//! What `read` copied: bytes and the tier that served them.
struct read_result {
  std::size_t bytes = 0;
  std::size_t tier = 0;
  bool promoted = false;
};

//! Counters of one tier, read from the cache's metrics.
struct tier_stats {
  std::uint64_t hits = 0, evictions = 0, promotions = 0, demotions = 0, used_bytes = 0, blocks = 0;
  std::uint64_t demotion_failures = 0;  //!< blocks that could not be moved into this tier (kept above)
  std::uint64_t write_through_failures = 0;  //!< blocks inserted whose copy into this lower tier failed
};

namespace detail {
template <class S>
concept tier_stack_like = requires(S& s, const S& cs) {
  { cs.count() } -> std::convertible_to<std::size_t>;
};

// Which tiers of a stack take placements, and each one's slot in an entry's
// array of ranges (-1: none). A run-time tier list has none.
template <class Tiers>
struct placement_layout {
  static constexpr std::size_t count = 0;
  static constexpr std::array<std::int8_t, max_tiers> slot = [] {
    std::array<std::int8_t, max_tiers> a{};
    a.fill(-1);
    return a;
  }();
};
template <class... Ts>
struct placement_layout<tier_stack<Ts...>> {
  static constexpr std::size_t count = (std::size_t{has_placement_v<Ts>} + ... + 0);
  static constexpr std::array<std::int8_t, max_tiers> slot = [] {
    std::array<std::int8_t, max_tiers> a{};
    a.fill(-1);
    std::int8_t next = 0;
    std::size_t i = 0;
    ((a[i++] = has_placement_v<Ts> ? next++ : std::int8_t{-1}), ...);
    return a;
  }();
};

// Aligned scratch for demotions: page-aligned so an O_DIRECT file tier
// writes it without a bounce copy.
class scratch_buffer {
 public:
  std::span<std::byte> get(std::size_t n) {
    if (n > size_) {
      data_.reset(static_cast<std::byte*>(::operator new(n, std::align_val_t{4096})));
      size_ = n;
    }
    return {data_.get(), n};
  }

 private:
  struct deleter {
    void operator()(std::byte* p) const noexcept { ::operator delete(p, std::align_val_t{4096}); }
  };
  std::unique_ptr<std::byte, deleter> data_;
  std::size_t size_ = 0;
};
}  // namespace detail

template <class Tiers, class Eviction = eviction::eviction_auto, class Tiering = tiering::tiering_auto>
class tiered_cache {
  static_assert(detail::tier_stack_like<Tiers>,
                "kvx: tiered_cache's Tiers must be a tier_stack<...> or tier_vector (count() and visit(i, f))");
  static_assert(check_eviction_policy<Eviction>());
  static_assert(check_tiering_policy<Tiering>());

 public:
  using tiers_type = Tiers;
  using eviction_type = Eviction;
  using tiering_type = Tiering;
  //! Makes tier `tier`'s eviction policy for `capacity_blocks` blocks.
  using eviction_factory = std::function<Eviction(std::size_t tier, std::size_t capacity_blocks)>;

  //! Everything but the tiers.
  struct options {
    tiered_cache_config config{};
    Tiering tiering{};
    eviction_factory make_eviction{};  //!< empty: `Eviction(capacity_blocks)`
  };

  //! RAII pin: while it lives, its block is neither evicted nor erased.
  class pin_handle {
   public:
    pin_handle() = default;
    pin_handle(pin_handle&& o) noexcept : cache_(std::exchange(o.cache_, nullptr)), key_(o.key_) {}
    pin_handle& operator=(pin_handle&& o) noexcept {
      if (this != &o) {
        reset();
        cache_ = std::exchange(o.cache_, nullptr);
        key_ = o.key_;
      }
      return *this;
    }
    pin_handle(const pin_handle&) = delete;
    pin_handle& operator=(const pin_handle&) = delete;
    ~pin_handle() { reset(); }

    //! Unpins now.
    void reset() noexcept {
      if (cache_) std::exchange(cache_, nullptr)->unpin(key_);
    }
    [[nodiscard]] const block_key& key() const noexcept { return key_; }
    explicit operator bool() const noexcept { return cache_ != nullptr; }

   private:
    friend class tiered_cache;
    pin_handle(tiered_cache* c, const block_key& k) : cache_(c), key_(k) {}
    tiered_cache* cache_ = nullptr;
    block_key key_{};
  };

  //! Builds the tiers in place from `tier_args` (one config per tier for a
  //! `tier_stack`). Throws `std::invalid_argument` if `block_bytes` is 0.
  template <class... TierArgs>
  explicit tiered_cache(tiered_cache_config cfg, TierArgs&&... tier_args)
      : tiered_cache(options{std::move(cfg), Tiering{}, {}}, std::forward<TierArgs>(tier_args)...) {}

  template <class... TierArgs>
  explicit tiered_cache(options opts, TierArgs&&... tier_args)
      : cfg_(std::move(opts.config)), tiering_(std::move(opts.tiering)), tiers_(std::forward<TierArgs>(tier_args)...) {
    if (cfg_.block_bytes == 0) throw std::invalid_argument("kvx: tiered_cache '" + cfg_.name + "': block_bytes is 0");
    const std::size_t n = tiers_.count();
    if (n == 0 || n > max_tiers)
      throw std::invalid_argument("kvx: tiered_cache '" + cfg_.name + "': needs 1 to 8 tiers, got " + std::to_string(n));
    auto& reg = cfg_.registry ? *cfg_.registry : metrics::default_registry();
    misses_ = &reg.counter("kvx_cache_misses_total", "Blocks looked up and not cached", {{"cache", cfg_.name}});
    rejections_ = &reg.counter("kvx_cache_rejections_total", "Blocks refused by admission control", {{"cache", cfg_.name}});
    state_.reserve(n);
    policies_.reserve(n);
    for (std::size_t t = 0; t < n; ++t) {
      tier_state s;
      s.capacity = tiers_.visit(t, [](auto& tier) -> std::uint64_t { return tier.capacity(); });
      const watermarks m = tiers_.visit(t, [](auto& tier) { return tier.marks(); });
      s.high = static_cast<std::uint64_t>(static_cast<double>(s.capacity) * m.high);
      s.low = static_cast<std::uint64_t>(static_cast<double>(s.capacity) * m.low);
      std::string tier_name(tiers_.visit(t, [](auto& tier) { return std::string(tier.name()); }));
      // Metrics are keyed by labels: two tiers of one name would share every
      // counter (and stats()). A repeated name is labelled with its index.
      for (std::size_t u = 0; u < t; ++u)
        if (tiers_.visit(u, [](auto& tier) { return std::string(tier.name()); }) == tier_name) {
          kvx::log(log_level::warn, "tiered_cache '", cfg_.name, "': tiers ", u, " and ", t, " are both named '", tier_name,
                   "'; tier ", t, "'s metrics are labelled '", tier_name, "#", t, "'");
          tier_name += "#" + std::to_string(t);
          break;
        }
      const metrics::labels l{{"cache", cfg_.name}, {"tier", tier_name}};
      s.hits = &reg.counter("kvx_cache_hits_total", "Blocks found by lookup, by the fastest tier holding them", l);
      s.evictions = &reg.counter("kvx_cache_evictions_total", "Blocks evicted from a tier", l);
      s.promotions = &reg.counter("kvx_cache_promotions_total", "Blocks copied into tier 0 on a hit in this tier", l);
      s.demotions = &reg.counter("kvx_cache_demotions_total", "Blocks moved into this tier on eviction above", l);
      s.demotion_failures = &reg.counter("kvx_cache_demotion_failures_total",
                                         "Blocks whose move into this tier failed; they stay in the tier above", l);
      s.write_through_failures = &reg.counter("kvx_cache_write_through_failures_total",
                                              "Blocks inserted whose write-through copy into this tier failed", l);
      s.bytes = &reg.gauge("kvx_cache_bytes", "Bytes held or being written in a tier", l);
      s.bytes->set(0);
      state_.push_back(s);
      if (auto why = never_holds(t, cfg_.block_bytes))
        throw std::invalid_argument("kvx: tiered_cache '" + cfg_.name + "': block_bytes: " + *why);
      const std::size_t blocks = std::max<std::uint64_t>(1, s.capacity / cfg_.block_bytes);
      policies_.push_back(opts.make_eviction ? opts.make_eviction(t, blocks) : make_default_policy(blocks));
    }
  }

  tiered_cache(const tiered_cache&) = delete;
  tiered_cache& operator=(const tiered_cache&) = delete;
  ~tiered_cache() = default;

  // --- lookup ----------------------------------------------------------------

  //! Writes, for each leading key that is cached, the fastest tier holding it
  //! into `tiers_out` (sized at least like `keys`, or empty to skip) and
  //! returns how many leading keys are cached. Records the access.
  std::size_t lookup(std::span<const block_key> keys, std::span<std::uint8_t> tiers_out) {
    std::lock_guard lock(mu_);
    std::size_t i = 0;
    for (; i < keys.size(); ++i) {
      auto it = index_.find(keys[i]);
      if (it == index_.end() || it->second.resident == 0) break;
      entry& e = it->second;
      const std::size_t t = fastest(e.resident);
      if (i < tiers_out.size()) tiers_out[i] = static_cast<std::uint8_t>(t);
      const access_context ctx = context(e);
      const std::uint8_t tracked = e.resident & static_cast<std::uint8_t>(~e.leaving);
      for (std::size_t u = 0; u < state_.size(); ++u)
        if (tracked & bit(u)) policies_[u].on_hit(keys[i], ctx);
      state_[t].hits->add();
    }
    if (i < keys.size()) misses_->add(keys.size() - i);
    return i;
  }

  //! The longest cached prefix of `keys` and where each of its blocks is.
  prefix_match lookup(std::span<const block_key> keys) {
    prefix_match m;
    m.tiers.resize(keys.size());
    m.blocks = lookup(keys, m.tiers);
    m.tiers.resize(m.blocks);
    return m;
  }

  //! Whether `k` is resident (no access recorded).
  [[nodiscard]] bool contains(const block_key& k) const {
    std::lock_guard lock(mu_);
    auto it = index_.find(k);
    return it != index_.end() && it->second.resident != 0;
  }
  //! The fastest tier holding `k` (no access recorded).
  [[nodiscard]] std::optional<std::size_t> tier_of(const block_key& k) const {
    std::lock_guard lock(mu_);
    auto it = index_.find(k);
    if (it == index_.end() || it->second.resident == 0) return std::nullopt;
    return fastest(it->second.resident);
  }
  //! Bitmask of the tiers holding `k` (bit i = tier i).
  [[nodiscard]] std::uint8_t residency(const block_key& k) const {
    std::lock_guard lock(mu_);
    auto it = index_.find(k);
    return it == index_.end() ? 0 : it->second.resident;
  }
  //! Where `k` lies in tier `t` (offset and block size), for zero-copy access:
  //! the cache's own record for a tier that takes placements, else the tier's
  //! `locate(k)` if it has one. Valid while the block stays in `t`: hold a pin.
  [[nodiscard]] std::optional<memory::allocation> locate(const block_key& k, std::size_t t) const {
    {
      std::lock_guard lock(mu_);
      auto it = index_.find(k);
      if (t >= state_.size() || it == index_.end() || !(it->second.resident & bit(t))) return std::nullopt;
      if (const int s = layout::slot[t]; s >= 0)
        return memory::allocation{it->second.where[static_cast<std::size_t>(s)].offset, it->second.bytes};
    }
    return tiers_.visit(t, [&](const auto& tier) -> std::optional<memory::allocation> {
      if constexpr (requires { { tier.locate(k) } -> std::same_as<std::optional<memory::allocation>>; })
        return tier.locate(k);
      else
        return std::nullopt;
    });
  }

  // --- insert ----------------------------------------------------------------

  //! Caches `bytes` as block `k` (whose prefix parent is `parent`, if any).
  result<insert_status> insert(const block_key& k, std::span<const std::byte> bytes,
                               std::optional<block_key> parent = std::nullopt) {
    if (bytes.empty()) return error{errc::invalid_argument, ctx_msg("insert of an empty block", k)};
    std::uint8_t targets = 0;
    placements where{};
    std::vector<move> moves;  // demotions this insert's evictions started
    {
      std::unique_lock lock(mu_);
      // k's entry is made now, not once there is room, so that writing it
      // overlaps the eviction's cache misses instead of following them. The
      // evictions below erase only other entries, which leaves `e` valid.
      auto [it, fresh] = index_.try_emplace(k);
      if (!fresh && (it->second.resident | it->second.writing) != 0) return insert_status::already_cached;
      entry& e = it->second;
      // The policy's own lookup of k starts now and overlaps the eviction's.
      if constexpr (requires(Eviction& p) { p.prefetch(k); }) policies_[0].prefetch(k);
      tier_state& s0 = state_[0];
      const std::uint64_t fp0 = footprint_in(0, bytes.size());
      const bool pressure = fp0 > s0.high || s0.reserved > s0.high - fp0;  // reserved + fp0 > high, without overflow
      admission_context a{k, 0, bytes.size(), s0.reserved, s0.capacity, pressure};
      if (!tiering_.admit(a)) {
        if (fresh) index_.erase(it);
        rejections_->add();
        return insert_status::rejected;
      }
      if (auto room = make_room(0, bytes.size(), moves); !room) {
        if (fresh) index_.erase(it);
        flush_spares();
        lock.unlock();
        (void)run_moves(moves);  // a failure is logged and counted there
        return room.error();
      }
      targets = bit(0);
      if (tiering_.writes_through())
        for (std::size_t t = 1; t < state_.size(); ++t)
          if (make_room(t, bytes.size(), moves)) targets |= bit(t);
      // A flat map moves its entries only when it grows; make_room erases.
      assert(index_.find(k) != index_.end() && &index_.find(k)->second == &e);
      e.bytes = bytes.size();
      e.has_parent = parent.has_value() ? 1 : 0;
      if (parent) e.parent = *parent;
      reserve(e, targets);
      for (std::size_t t = 0; t < state_.size(); ++t)
        if ((targets & bit(t)) && layout::slot[t] >= 0 && try_place(t, e)) where[slot(t)] = e.where[slot(t)];
      flush_spares();
    }
    // Outside the lock, before the copies that need their room.
    const result<void> demoted = run_moves(moves);
    // Copies outside the lock; the `writing` mark keeps the entry alive.
    std::uint8_t stored = 0;
    result<void> top;  // tier 0's outcome decides the insert's
    for (std::size_t t = 0; t < state_.size(); ++t) {
      if (!(targets & bit(t))) continue;
      auto r = store_into(t, k, bytes, layout::slot[t] >= 0 ? memory::allocation(where[slot(t)]) : memory::allocation{},
                          demoted);
      if (r) {
        stored |= bit(t);
      } else if (t != 0) {
        // Tier 0 holds the block, so the insert stands; but a lower tier
        // that fails its writes (a full or failing disk) must not go unseen.
        state_[t].write_through_failures->add();
        kvx::log(log_level::warn, "tiered_cache '", cfg_.name, "': writing block ", k.to_string(),
                 " through to tier ", t, " failed (", r.error().message(), "); it is not kept there");
      }
      if (t == 0) top = std::move(r);
    }
    std::lock_guard lock(mu_);
    auto it = index_.find(k);
    entry& e = it->second;
    for (std::size_t t = 0; t < state_.size(); ++t) {
      if (!(targets & bit(t))) continue;
      e.writing &= static_cast<std::uint8_t>(~bit(t));
      if (stored & bit(t)) {
        e.resident |= bit(t);
        policies_[t].on_insert(k, context(e));
      } else {
        unplace(t, e);
        release(t, e.bytes);
      }
    }
    if (!(stored & bit(0))) {
      if (e.resident == 0 && e.pins == 0 && e.writing == 0) index_.erase(it);
      return error{top.code(), ctx_msg("store into tier 0: " + top.error().context(), k)};
    }
    return insert_status::inserted;
  }

  // --- read ------------------------------------------------------------------

  //! Copies block `k` into `out` from the fastest tier holding it, then
  //! promotes it to tier 0 if the tiering policy says so.
  result<read_result> read(const block_key& k, std::span<std::byte> out) {
    std::size_t t = 0;
    std::uint64_t size = 0;
    memory::allocation at{};
    {
      std::lock_guard lock(mu_);
      auto it = index_.find(k);
      if (it == index_.end() || it->second.resident == 0) return error{errc::not_found, ctx_msg("read", k)};
      entry& e = it->second;
      if (out.size() < e.bytes)
        return error{errc::out_of_range, ctx_msg("read into a buffer of " + std::to_string(out.size()) +
                                                     " bytes, block has " + std::to_string(e.bytes), k)};
      t = fastest(e.resident);
      size = e.bytes;
      if (layout::slot[t] >= 0) at = e.where[slot(t)];
      ++e.pins;
    }
    auto r = load_from(t, k, at, out.first(static_cast<std::size_t>(size)));
    read_result res{static_cast<std::size_t>(size), t, false};
    bool promote = false;
    memory::allocation placed{};
    std::vector<move> moves;
    {
      std::lock_guard lock(mu_);
      entry* e = &index_.find(k)->second;
      if (r && t > 0 && !(e->resident & bit(0)) && !(e->writing & bit(0)) && tiering_.promote_on_hit(t) &&
          make_room(0, e->bytes, moves)) {
        e = &index_.find(k)->second;
        reserve(*e, bit(0));
        if (layout::slot[0] >= 0 && try_place(0, *e)) placed = e->where[slot(0)];
        promote = true;
      }
      flush_spares();
      if (!promote) unpin_locked(k);
    }
    const result<void> demoted = run_moves(moves);
    if (!r) {
      if (promote) finish_promotion(k, false);
      return error{r.code(), ctx_msg("read from tier " + std::to_string(t) + ": " + r.error().context(), k)};
    }
    if (promote) {
      const bool ok = static_cast<bool>(store_into(0, k, out.first(static_cast<std::size_t>(size)), placed, demoted));
      finish_promotion(k, ok);
      if (ok) state_[t].promotions->add();
      res.promoted = ok;
    }
    return res;
  }

  //! Copies the blocks `keys[i]` into `outs[i]`, calling `on_block(i, ec)`
  //! once per key as its bytes land (`ec` empty on success): `errc::not_found`
  //! for a key not cached, `errc::out_of_range` for a missing or short buffer,
  //! the tier's error for a failed read; one block's error does not stop the
  //! others. Errors found up front are reported first, then tier 0's blocks,
  //! then tier 1's, and so on. A tier with a pipelined `load_many` (the
  //! io_uring file tier) gets all its blocks at once and keeps reads in
  //! flight together, reporting each as it lands, so the first block is
  //! usable long before the last; other tiers are read block after block.
  //! Every block is pinned from the call until its own `on_block` returns.
  //! Records no access and promotes nothing (`lookup` records, `read`
  //! promotes). Returns once every key has been reported. `on_block` should
  //! not throw: if it does, the blocks not yet reported are unpinned and the
  //! exception propagates once no read of the call is left in flight (the
  //! io_uring tier cancels and waits for those it had started).
  template <class OnBlock>
  void read_many(std::span<const block_key> keys, std::span<const std::span<std::byte>> outs, OnBlock&& on_block) {
    read_many(keys, outs, on_block, [] { return false; });
  }
  //! As above, asking `stopped()` before each block read in a tier read block
  //! by block and before each tier's batch: once it returns true, the blocks
  //! not yet started are reported with `errc::cancelled` and not read (a
  //! batch already handed to a tier's `load_many` runs to its end).
  template <class OnBlock, class Stopped>
  void read_many(std::span<const block_key> keys, std::span<const std::span<std::byte>> outs, OnBlock&& on_block,
                 Stopped&& stopped) {
    struct planned {
      std::size_t index;
      std::size_t tier;
      memory::allocation at;
      std::size_t bytes;
    };
    std::vector<planned> plan;
    std::vector<std::pair<std::size_t, std::error_code>> refused;
    plan.reserve(keys.size());
    {
      std::lock_guard lock(mu_);
      for (std::size_t i = 0; i < keys.size(); ++i) {
        auto it = index_.find(keys[i]);
        if (it == index_.end() || it->second.resident == 0) {
          refused.emplace_back(i, make_error_code(errc::not_found));
          continue;
        }
        entry& e = it->second;
        if (i >= outs.size() || outs[i].size() < e.bytes) {
          refused.emplace_back(i, make_error_code(errc::out_of_range));
          continue;
        }
        const std::size_t t = fastest(e.resident);
        ++e.pins;
        plan.push_back({i, t, where_in(e, t),
                        static_cast<std::size_t>(e.bytes)});
      }
    }
    // Unpins whatever was not reported if a callback throws.
    std::vector<bool> reported(plan.size(), false);
    struct unpin_rest {
      tiered_cache& c;
      std::span<const block_key> keys;
      const std::vector<planned>& plan;
      const std::vector<bool>& reported;
      ~unpin_rest() {
        for (std::size_t j = 0; j < plan.size(); ++j)
          if (!reported[j]) c.unpin(keys[plan[j].index]);
      }
    } guard{*this, keys, plan, reported};
    auto report = [&](std::size_t j, std::error_code ec) {
      on_block(plan[j].index, ec);
      reported[j] = true;
      unpin(keys[plan[j].index]);
    };
    for (const auto& [i, ec] : refused) on_block(i, ec);
    std::vector<std::size_t> picked;  // indexes into plan, one tier at a time
    std::vector<block_key> tier_keys;
    std::vector<std::span<std::byte>> tier_outs;
    for (std::size_t t = 0; t < state_.size(); ++t) {
      picked.clear();
      for (std::size_t j = 0; j < plan.size(); ++j)
        if (plan[j].tier == t) picked.push_back(j);
      if (picked.empty()) continue;
      if (stopped()) {
        for (std::size_t j : picked) report(j, make_error_code(errc::cancelled));
        continue;
      }
      tiers_.visit(t, [&](auto& tier) {
        if constexpr (has_placement_v<std::remove_cvref_t<decltype(tier)>>) {
          for (std::size_t j : picked) {
            if (stopped()) {
              report(j, make_error_code(errc::cancelled));
              continue;
            }
            auto r = tier.read_at(plan[j].at, outs[plan[j].index].first(plan[j].bytes));
            report(j, r ? std::error_code{} : r.code());
          }
        } else {
          tier_keys.clear();
          tier_outs.clear();
          for (std::size_t j : picked) {
            tier_keys.push_back(keys[plan[j].index]);
            tier_outs.push_back(outs[plan[j].index]);
          }
          cache::load_many(tier, std::span<const block_key>(tier_keys),
                           std::span<const std::span<std::byte>>(tier_outs),
                           [&](std::size_t n, std::error_code ec) { report(picked[n], ec); });
        }
      });
    }
  }

  // --- pins ------------------------------------------------------------------

  //! Pins `k`: it is neither evicted nor erased until the handle dies.
  result<pin_handle> pin(const block_key& k) {
    std::lock_guard lock(mu_);
    auto it = index_.find(k);
    if (it == index_.end() || it->second.resident == 0) return error{errc::not_found, ctx_msg("pin", k)};
    ++it->second.pins;
    return pin_handle(this, k);
  }

  //! Pins the longest cached prefix of `keys` atomically (one handle per block).
  std::vector<pin_handle> pin_prefix(std::span<const block_key> keys) {
    std::vector<pin_handle> out;
    std::lock_guard lock(mu_);
    for (const auto& k : keys) {
      auto it = index_.find(k);
      if (it == index_.end() || it->second.resident == 0) break;
      ++it->second.pins;
      out.push_back(pin_handle(this, k));
    }
    return out;
  }

  // --- erase -----------------------------------------------------------------

  //! Removes `k` from every tier: `errc::busy` if pinned, being written or
  //! being moved to a lower tier, `errc::not_found` if not cached.
  result<void> erase(const block_key& k) {
    std::lock_guard lock(mu_);
    auto it = index_.find(k);
    if (it == index_.end() || (it->second.resident | it->second.writing) == 0) return error{errc::not_found, ctx_msg("erase", k)};
    entry& e = it->second;
    if (e.pins > 0 || e.writing != 0 || e.leaving != 0) return error{errc::busy, ctx_msg("erase of a pinned block", k)};
    for (std::size_t t = 0; t < state_.size(); ++t) {
      if (!(e.resident & bit(t))) continue;
      free_in(t, k, e);
      policies_[t].on_erase(k);
      release(t, e.bytes);
    }
    index_.erase(it);
    return {};
  }

  // --- introspection ---------------------------------------------------------

  [[nodiscard]] std::size_t tier_count() const noexcept { return state_.size(); }
  //! Resident blocks (each counted once).
  [[nodiscard]] std::size_t size() const {
    std::lock_guard lock(mu_);
    std::size_t n = 0;
    for (const auto& [k, e] : index_) n += e.resident != 0;
    return n;
  }
  [[nodiscard]] tier_stats stats(std::size_t t) const {
    std::lock_guard lock(mu_);
    const tier_state& s = state_.at(t);
    return {s.hits->value(), s.evictions->value(), s.promotions->value(), s.demotions->value(), s.reserved,
            policies_[t].size(), s.demotion_failures->value(), s.write_through_failures->value()};
  }
  [[nodiscard]] std::uint64_t misses() const { return misses_->value(); }
  [[nodiscard]] std::uint64_t rejections() const { return rejections_->value(); }
  [[nodiscard]] const tiered_cache_config& config() const noexcept { return cfg_; }
  Tiers& tiers() noexcept { return tiers_; }
  const Tiers& tiers() const noexcept { return tiers_; }

 private:
  using layout = detail::placement_layout<Tiers>;
  // A block's range in a placement tier, in 12 bytes so that an index entry
  // with one such tier is one cache line (placed blocks are under 4 GiB).
  struct [[gnu::packed]] placed_range {
    std::uint64_t offset = 0;
    std::uint32_t size = 0;
    placed_range() = default;
    placed_range(const memory::allocation& a) noexcept : offset(a.offset), size(static_cast<std::uint32_t>(a.size)) {}
    operator memory::allocation() const noexcept { return {offset, size}; }
  };
  static constexpr std::uint64_t max_placed_bytes = UINT32_MAX;
  using placements = std::array<placed_range, std::max<std::size_t>(layout::count, 1)>;

  struct entry {
    block_key parent{};
    std::uint64_t bytes = 0;
    std::uint32_t pins = 0;
    std::uint8_t resident = 0;  // tiers holding a complete copy
    std::uint8_t writing = 0;   // tiers being written (room reserved)
    std::uint8_t leaving = 0;   // resident tiers it is being moved out of: readable, no longer tracked or counted there
    std::uint8_t moves : 7 = 0;       // moves of it in flight
    std::uint8_t has_parent : 1 = 0;
    placements where{};  // its range in each tier that takes placements (valid while resident or writing there)
  };
  // A demotion decided under the lock and copied outside it.
  struct move {
    block_key key;
    std::uint64_t bytes = 0;
    memory::allocation from_at{};  // its range in `from` (placement tiers)
    std::uint8_t from = 0, to = 0;
  };
  struct tier_state {
    std::uint64_t capacity = 0, high = 0, low = 0;
    std::uint64_t reserved = 0;  // bytes resident or being written
    std::uint32_t leaving = 0;   // blocks moving out: released from `reserved`, their ranges not yet freed
    metrics::counter* hits = nullptr;
    metrics::counter* evictions = nullptr;
    metrics::counter* promotions = nullptr;
    metrics::counter* demotions = nullptr;
    metrics::counter* demotion_failures = nullptr;
    metrics::counter* write_through_failures = nullptr;
    metrics::gauge* bytes = nullptr;
  };

  static constexpr std::uint8_t bit(std::size_t t) noexcept { return static_cast<std::uint8_t>(1U << t); }
  static constexpr std::size_t slot(std::size_t t) noexcept { return static_cast<std::size_t>(layout::slot[t]); }
  // e's range in tier t if t takes placements, else an empty one.
  static memory::allocation where_in(const entry& e, std::size_t t) noexcept {
    return layout::slot[t] >= 0 ? memory::allocation(e.where[slot(t)]) : memory::allocation{};
  }
  static std::size_t fastest(std::uint8_t mask) noexcept {
    return static_cast<std::size_t>(std::countr_zero(static_cast<unsigned>(mask)));
  }
  static Eviction make_default_policy(std::size_t blocks) {
    if constexpr (std::is_constructible_v<Eviction, std::size_t>)
      return Eviction(blocks);
    else
      throw std::invalid_argument("kvx: tiered_cache: this eviction policy needs an eviction_factory");
  }

  // Bytes a block of `n` bytes takes in tier t (allocation rounding), the
  // unit of the accounting that watermarks are compared against.
  std::uint64_t footprint_in(std::size_t t, std::uint64_t n) const {
    return tiers_.visit(t, [n](const auto& tier) -> std::uint64_t { return cache::footprint(tier, n); });
  }

  access_context context(const entry& e) noexcept {
    return access_context{++clock_, never, e.bytes, e.has_parent ? &e.parent : nullptr};
  }
  std::string ctx_msg(const std::string& what, const block_key& k) const {
    return "tiered_cache '" + cfg_.name + "': " + what + " (block " + k.to_string() + ")";
  }

  void reserve(entry& e, std::uint8_t targets) {
    e.writing |= targets;
    for (std::size_t t = 0; t < state_.size(); ++t)
      if (targets & bit(t)) add_bytes(t, e.bytes);
  }
  void add_bytes(std::size_t t, std::uint64_t bytes) {
    state_[t].reserved += footprint_in(t, bytes);
    state_[t].bytes->set(static_cast<double>(state_[t].reserved));
  }
  void release(std::size_t t, std::uint64_t bytes) {
    state_[t].reserved -= footprint_in(t, bytes);
    state_[t].bytes->set(static_cast<double>(state_[t].reserved));
  }

  // --- tier access: by placement where the tier takes it, else by key --------

  // Under mu_: a range for e in placement tier t (recorded in e), if one is free.
  bool try_place(std::size_t t, entry& e) {
    return tiers_.visit(t, [&](auto& tier) {
      if constexpr (has_placement_v<std::remove_cvref_t<decltype(tier)>>) {
        memory::allocation& spare = spare_[t];
        if (spare.size >= e.bytes && spare.size <= cache::footprint(tier, e.bytes)) {
          e.where[slot(t)] = std::exchange(spare, memory::allocation{});
          return true;
        }
        auto a = tier.place(e.bytes);
        if (a && a->size > max_placed_bytes) {
          tier.unplace(*a);
          return false;
        }
        if (a) e.where[slot(t)] = *a;
        return a.has_value();
      } else {
        return false;
      }
    });
  }
  // Under mu_: gives back e's range in placement tier t, if it has one
  // (no-op for other tiers).
  void unplace(std::size_t t, entry& e) {
    tiers_.visit(t, [&](auto& tier) {
      if constexpr (has_placement_v<std::remove_cvref_t<decltype(tier)>>) {
        placed_range& a = e.where[slot(t)];
        if (a.size != 0) tier.unplace(std::exchange(a, placed_range{}));
      }
    });
  }
  // Under mu_: gives back the ranges evictions set aside and no block took.
  void flush_spares() {
    for (std::size_t t = 0; t < state_.size(); ++t)
      if (spare_[t].size != 0)
        tiers_.visit(t, [&](auto& tier) {
          if constexpr (has_placement_v<std::remove_cvref_t<decltype(tier)>>)
            tier.unplace(std::exchange(spare_[t], memory::allocation{}));
        });
  }
  // Under mu_: frees resident block k in tier t.
  void free_in(std::size_t t, const block_key& k, entry& e) {
    if (layout::slot[t] >= 0)
      unplace(t, e);
    else
      tiers_.visit(t, [&](auto& tier) { (void)tier.erase(k); });
  }
  result<std::size_t> load_from(std::size_t t, const block_key& k, const memory::allocation& at, std::span<std::byte> out) {
    return tiers_.visit(t, [&](auto& tier) -> result<std::size_t> {
      if constexpr (has_placement_v<std::remove_cvref_t<decltype(tier)>>)
        return tier.read_at(at, out);
      else
        return tier.load(k, out);
    });
  }

  // Outside mu_: copies `bytes` as block k into tier t, whose room is
  // reserved. A placement tier writes at `at` when the caller got a range
  // under the lock (size > 0), else a range is had here, evicting if needed.
  // `demoted`: how the demotions that made the room went.
  result<void> store_into(std::size_t t, const block_key& k, std::span<const std::byte> bytes, memory::allocation at,
                          result<void> demoted = {}) {
    std::vector<move> moves;
    // The tier's allocator may be fragmented, or blocks leaving it not yet
    // gone, although the bytes fit the accounting: evict a few more blocks
    // and retry before giving up.
    for (int attempt = 0;; ++attempt) {
      auto r = tiers_.visit(t, [&](auto& tier) -> result<void> {
        if constexpr (has_placement_v<std::remove_cvref_t<decltype(tier)>>) {
          if (at.size == 0) return error{errc::capacity_exceeded, "no free range for the block"};
          return tier.write_at(at, bytes);
        } else {
          return tier.store(k, bytes);
        }
      });
      if (r || r.code() != make_error_code(errc::capacity_exceeded) || attempt == 8) return r;
      {
        std::lock_guard lock(mu_);
        if (layout::slot[t] >= 0) {
          entry& e = index_.find(k)->second;
          if (try_place(t, e)) {
            at = e.where[slot(t)];
            continue;
          }
        }
        // The room was to come from a demotion that failed: evicting more
        // would send more blocks to the tier that just refused one.
        if (!demoted)
          return error{errc::capacity_exceeded, "tier " + std::to_string(t) + " is full and " + demoted.error().context()};
        const bool evicted = evict_one(t, moves);
        flush_spares();
        if (!evicted) return r;
      }
      demoted = run_moves(moves);
    }
  }

  void finish_promotion(const block_key& k, bool stored) {
    std::lock_guard lock(mu_);
    entry& e = index_.find(k)->second;
    e.writing &= static_cast<std::uint8_t>(~bit(0));
    if (stored) {
      e.resident |= bit(0);
      policies_[0].on_insert(k, context(e));
    } else {
      unplace(0, e);
      release(0, e.bytes);
    }
    unpin_locked(k);
  }

  void unpin(const block_key& k) noexcept {
    std::lock_guard lock(mu_);
    unpin_locked(k);
  }
  void unpin_locked(const block_key& k) noexcept {
    auto it = index_.find(k);
    if (it == index_.end()) return;
    if (--it->second.pins == 0) drop_left(it);
  }

  // Under mu_, for an entry with no pins: frees its bytes in the tiers it has
  // been moved out of, and the entry itself if nothing is left.
  void drop_left(typename detail::flat_key_map<entry>::iterator it) {
    entry& e = it->second;
    if (e.pins != 0) return;
    if (e.leaving != 0 && e.moves == 0) {
      for (std::size_t t = 0; t < state_.size(); ++t)
        if (e.leaving & bit(t)) {
          free_in(t, it->first, e);
          left(t);
        }
      e.resident &= static_cast<std::uint8_t>(~e.leaving);
      e.leaving = 0;
    }
    if ((e.resident | e.writing) == 0 && e.moves == 0) index_.erase(it);
  }

  // Under mu_: frees room in tier t for `bytes` more, evicting down to the
  // low watermark once the high one would be crossed. Demotions it starts
  // are appended to `moves`, for the caller to run once it drops the lock.
  result<void> make_room(std::size_t t, std::uint64_t block_bytes, std::vector<move>& moves) {
    tier_state& s = state_[t];
    const std::uint64_t bytes = footprint_in(t, block_bytes);
    // Before evicting anything: no eviction makes room for what can never fit.
    if (auto why = never_holds(t, block_bytes)) return error{errc::capacity_exceeded, "tiered_cache '" + cfg_.name + "': " + *why};
    if (s.reserved + bytes <= s.high) return {};
    while (s.reserved + bytes > s.low && evict_one(t, moves)) {
    }
    if (s.reserved + bytes > s.capacity)
      return error{errc::capacity_exceeded, "tiered_cache '" + cfg_.name + "': tier " + std::to_string(t) + " is full (" +
                                                std::to_string(s.reserved) + " of " + std::to_string(s.capacity) +
                                                " bytes) and every block in it is pinned or being written"};
    return {};
  }

  // Why tier t can never hold a block of n bytes, if it cannot: over its
  // capacity, more than its allocator ever grants in one piece (footprint
  // UINT64_MAX), or a placement of 4 GiB or more.
  std::optional<std::string> never_holds(std::size_t t, std::uint64_t n) const {
    const std::uint64_t bytes = footprint_in(t, n);
    const std::string what = "a block of " + std::to_string(n) + " bytes ";
    if (bytes == UINT64_MAX)
      return what + "is larger than anything tier " + std::to_string(t) + "'s allocator grants (its largest size class)";
    if (bytes > state_[t].capacity)
      return what + "exceeds tier " + std::to_string(t) + "'s capacity " + std::to_string(state_[t].capacity);
    if (layout::slot[t] >= 0 && bytes > max_placed_bytes) return what + "is a placement of 4 GiB or more in tier " + std::to_string(t);
    return std::nullopt;
  }

  // Under mu_: evicts one block from tier t; false if no block is evictable.
  // A victim the tiering policy demotes, with room below, is marked leaving
  // and appended to `moves`; any other victim is freed at once.
  bool evict_one(std::size_t t, std::vector<move>& moves) {
    auto victim = policies_[t].victim([&](const block_key& k) {
      auto it = index_.find(k);
      return it != index_.end() && it->second.pins == 0 && it->second.writing == 0 && (it->second.resident & bit(t));
    });
    if (!victim) return false;
    auto it = index_.find(*victim);
    entry& e = it->second;
    release(t, e.bytes);
    const std::size_t down = t + 1;
    if (down < state_.size() && !(e.resident & bit(down)) && tiering_.demote_on_evict(t)) {
      e.leaving |= bit(t);  // still readable in t; no longer evictable or counted there
      // make_room may evict below, never this entry (not resident there), and
      // erases only other entries, which leaves `e` valid.
      if (make_room(down, e.bytes, moves)) {
        ++state_[t].leaving;
        reserve(e, bit(down));
        ++e.moves;
        moves.push_back(move{*victim, e.bytes, where_in(e, t),
                             static_cast<std::uint8_t>(t), static_cast<std::uint8_t>(down)});
        return true;  // counted as evicted once the move lands (run_moves)
      }
      e.leaving &= static_cast<std::uint8_t>(~bit(t));
    }
    state_[t].evictions->add();
    if (layout::slot[t] >= 0 && spare_[t].size == 0)
      spare_[t] = std::exchange(e.where[slot(t)], placed_range{});  // for the block this eviction makes room for
    else
      free_in(t, *victim, e);
    e.resident &= static_cast<std::uint8_t>(~bit(t));
    if (e.resident == 0 && e.writing == 0 && e.pins == 0) index_.erase(it);
    return true;
  }

  // Outside mu_: copies each demoted block into the tier below, then under
  // the lock makes that copy resident and frees the old one. Runs the moves
  // in the order they were started: a move out of a lower tier, started by
  // making room for one from above, frees the room that one lands in.
  // A move whose copy fails is undone: the `leaving` mark kept the block
  // whole in its tier, so it becomes resident, counted and tracked there
  // again instead of being dropped (it may have been the only copy). Returns
  // the first failure, for the caller that needed the room.
  result<void> run_moves(std::vector<move>& moves) {
    result<void> outcome;
    for (std::size_t i = 0; i < moves.size(); ++i) {
      const move& m = moves[i];
      static thread_local detail::scratch_buffer scratch;
      std::span<std::byte> buf = scratch.get(static_cast<std::size_t>(m.bytes));
      memory::allocation to_at{};
      // This thread's own later moves out of the target tier free room only after this one.
      const auto own_later = static_cast<std::uint32_t>(
          std::count_if(moves.begin() + static_cast<std::ptrdiff_t>(i) + 1, moves.end(), [&](const move& o) { return o.from == m.to; }));
      const result<void> copied = copy_down(m, buf, to_at, own_later);
      {
        std::lock_guard lock(mu_);
        auto it = index_.find(m.key);
        entry& e = it->second;
        e.writing &= static_cast<std::uint8_t>(~bit(m.to));
        --e.moves;
        land_or_undo(m, e, copied, to_at);
        drop_left(it);  // or, if a reader pinned it meanwhile, its last unpin
      }
      if (!copied) {
        const std::string what = "demoting block " + m.key.to_string() + " from tier " + std::to_string(m.from) +
                                 " to tier " + std::to_string(m.to) + " failed (" + copied.error().message() + ")";
        kvx::log(log_level::warn, "tiered_cache '", cfg_.name, "': ", what, "; it stays in tier ", int{m.from});
        if (outcome) outcome = error{copied.code(), what};
      }
    }
    moves.clear();
    return outcome;
  }

  // Outside mu_: copies a demoted block from its tier into the one below
  // through `buf`; a placement tier's new range goes to `to_at`.
  // `own_later`: moves out of the target tier this thread runs after this one.
  result<void> copy_down(const move& m, std::span<std::byte> buf, memory::allocation& to_at, std::uint32_t own_later) {
    if (auto r = load_from(m.from, m.key, m.from_at, buf); !r) return r.error();
    return tiers_.visit(m.to, [&](auto& tier) -> result<void> {
      if constexpr (has_placement_v<std::remove_cvref_t<decltype(tier)>>) {
        auto a = place_when_freed(tier, m.to, m.bytes, own_later);
        if (!a) return error{errc::capacity_exceeded, "no free range of " + std::to_string(m.bytes) + " bytes"};
        if (a->size > max_placed_bytes) {
          tier.unplace(*a);
          return error{errc::capacity_exceeded, "a placed block must be under 4 GiB"};
        }
        if (auto w = tier.write_at(*a, std::span<const std::byte>(buf)); !w) {
          tier.unplace(*a);
          return w;
        }
        to_at = *a;
        return {};
      } else {
        return tier.store(m.key, std::span<const std::byte>(buf));
      }
    });
  }

  // Outside mu_: a range in placement tier t. The room was accounted for
  // when this move started, but part of it may be ranges that blocks moving
  // out of t (moves other threads run, readers' pins) have not freed yet:
  // wait for those, a bounded time, before calling the tier full.
  template <class Tier>
  std::optional<memory::allocation> place_when_freed(Tier& tier, std::size_t t, std::uint64_t bytes, std::uint32_t own_later) {
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(2);
    for (;;) {
      std::uint64_t seen = 0;
      {
        std::lock_guard lock(mu_);
        seen = ranges_left_;
      }
      if (auto a = tier.place(bytes)) return a;
      std::unique_lock lock(mu_);
      if (ranges_left_ != seen) continue;  // one was freed while we tried
      if (state_[t].leaving <= own_later) return std::nullopt;
      if (!left_cv_.wait_until(lock, until, [&] { return ranges_left_ != seen; })) return std::nullopt;
    }
  }
  // Under mu_: a block that was moving out of tier t is gone from it (or back).
  void left(std::size_t t) {
    --state_[t].leaving;
    ++ranges_left_;
    left_cv_.notify_all();
  }

  // Under mu_, for a move whose copy has ended: makes the lower copy
  // resident, or gives back its room below and undoes the eviction.
  void land_or_undo(const move& m, entry& e, const result<void>& copied, const memory::allocation& to_at) {
    if (copied) {
      e.resident |= bit(m.to);
      if (layout::slot[m.to] >= 0) e.where[slot(m.to)] = to_at;
      policies_[m.to].on_insert(m.key, context(e));
      state_[m.to].demotions->add();
      state_[m.from].evictions->add();
      return;
    }
    release(m.to, e.bytes);
    // Still resident in m.from (drop_left frees a leaving copy only once no
    // move is in flight, and this move is the only one: a block being
    // written is never a victim), untracked there since victim() returned it.
    e.leaving &= static_cast<std::uint8_t>(~bit(m.from));
    left(m.from);
    add_bytes(m.from, e.bytes);
    policies_[m.from].on_insert(m.key, context(e));
    state_[m.to].demotion_failures->add();
  }

  tiered_cache_config cfg_;
  Tiering tiering_;
  Tiers tiers_;
  mutable std::mutex mu_;
  std::condition_variable left_cv_;  // a block moving out of a tier left it (ranges_left_)
  std::uint64_t ranges_left_ = 0;    // under mu_
  detail::flat_key_map<entry> index_;
  std::vector<tier_state> state_;
  std::vector<Eviction> policies_;
  std::uint64_t clock_ = 0;
  // Under mu_, within one locked section: a range an eviction freed in each
  // placement tier, kept for the block the eviction made room for, so a full
  // tier recycles it without two trips through its allocator. Whatever no
  // block took goes back before the lock is released (flush_spares).
  std::array<memory::allocation, max_tiers> spare_{};
  metrics::counter* misses_ = nullptr;
  metrics::counter* rejections_ = nullptr;
};

}  // namespace kvx::cache
