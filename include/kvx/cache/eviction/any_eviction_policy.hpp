#pragma once
//! \file
//! `kvx::cache::eviction::any_eviction_policy`: any eviction policy behind one
//! type, picked at run time from JSON config, for tools and benchmarks.
//!
//! Config: `{"policy": NAME, ...options}` with NAME one of `lru`, `lfu`,
//! `s3fifo` (options `small_ratio`, `ghost_factor`), `arc`, `sieve`,
//! `prefix` (`prefix_aware`), `reuse_class` (`ghost_factor`,
//! `shadow_blocks`), `auto` (the default) and `belady` (trace replay only).
//! Unknown names and fields are errors naming the field. One virtual call per
//! operation; not thread-safe, like the policy it holds.
//!
//! \code
//! auto doc = kvx::config::parse(R"({"policy": "s3fifo", "small_ratio": 0.2})");
//! auto p = kvx::cache::eviction::any_eviction_policy::from_config(kvx::config::view(*doc), 3000);
//! if (!p) report(p.error());
//! p->on_insert(k, {});
//! \endcode

#include <cstddef>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>

#include <kvx/cache/eviction/arc.hpp>
#include <kvx/cache/eviction/belady.hpp>
#include <kvx/cache/eviction/eviction_auto.hpp>
#include <kvx/cache/eviction/lfu.hpp>
#include <kvx/cache/eviction/lru.hpp>
#include <kvx/cache/eviction/prefix_aware.hpp>
#include <kvx/cache/eviction/reuse_class.hpp>
#include <kvx/cache/eviction/s3fifo.hpp>
#include <kvx/cache/eviction/sieve.hpp>
#include <kvx/cache/eviction_policy.hpp>
#include <kvx/core/config.hpp>
#include <kvx/core/result.hpp>

namespace kvx::cache::eviction {

class any_eviction_policy {
 public:
  using eviction_policy_concept = eviction_policy_tag;

  //! The default policy (`eviction_auto`).
  explicit any_eviction_policy(std::size_t capacity_in_blocks = 0)
      : any_eviction_policy(std::in_place_type<eviction_auto>, "auto", capacity_in_blocks) {}

  //! Holds a `P` constructed from `args`; `name` is what `name()` returns.
  template <class P, class... Args>
  any_eviction_policy(std::in_place_type_t<P>, std::string name, Args&&... args)
      : self_(std::make_unique<model<P>>(std::forward<Args>(args)...)), name_(std::move(name)) {
    static_assert(check_eviction_policy<P>());
  }

  //! Builds the policy named by `cfg["policy"]` for `capacity_in_blocks`.
  static result<any_eviction_policy> from_config(const config::view& cfg, std::size_t capacity_in_blocks) {
    auto name = cfg.required<std::string>("policy");
    if (!name) return name.error();
    const std::string& n = *name;
    const std::size_t c = capacity_in_blocks;
    auto plain = [&]<class P>(std::in_place_type_t<P> t) -> result<any_eviction_policy> {
      KVX_TRY(cfg.allow_only({"policy"}));
      return any_eviction_policy(t, n, c);
    };
    if (n == "lru") return plain(std::in_place_type<lru>);
    if (n == "lfu") return plain(std::in_place_type<lfu>);
    if (n == "arc") return plain(std::in_place_type<arc>);
    if (n == "sieve") return plain(std::in_place_type<sieve>);
    if (n == "prefix" || n == "prefix_aware") return plain(std::in_place_type<prefix_aware>);
    if (n == "belady") return plain(std::in_place_type<belady>);
    if (n == "s3fifo") {
      KVX_TRY(cfg.allow_only({"policy", "small_ratio", "ghost_factor"}));
      s3fifo::options o;
      auto r = cfg.optional<double>("small_ratio", o.small_ratio);
      if (!r) return r.error();
      auto g = cfg.optional<double>("ghost_factor", o.ghost_factor);
      if (!g) return g.error();
      if (*r <= 0 || *r >= 1)
        return error{errc::invalid_argument, "config field '" + cfg.path_of("small_ratio") + "': must be in (0, 1)"};
      if (!(*g >= 0 && *g <= s3fifo::max_ghost_factor)) return ghost_factor_error(cfg);
      o.small_ratio = *r;
      o.ghost_factor = *g;
      return any_eviction_policy(std::in_place_type<s3fifo>, n, c, o);
    }
    if (n == "reuse_class" || n == "auto") {
      KVX_TRY(cfg.allow_only({"policy", "ghost_factor", "shadow_blocks"}));
      reuse_class::options o;
      auto g = cfg.optional<double>("ghost_factor", o.ghost_factor);
      if (!g) return g.error();
      auto s = cfg.optional<std::size_t>("shadow_blocks", o.shadow_blocks);
      if (!s) return s.error();
      if (!(*g >= 0 && *g <= reuse_class::max_ghost_factor)) return ghost_factor_error(cfg);
      if (*s == 0) return error{errc::invalid_argument, "config field '" + cfg.path_of("shadow_blocks") + "': must be > 0"};
      o.ghost_factor = *g;
      o.shadow_blocks = *s;
      return any_eviction_policy(std::in_place_type<reuse_class>, n, c, o);
    }
    return error{errc::invalid_argument, "config field '" + cfg.path_of("policy") + "': unknown eviction policy '" + n +
                                             "' (known: lru, lfu, s3fifo, arc, sieve, prefix, reuse_class, auto, belady)"};
  }

  void on_insert(const block_key& k, const access_context& ctx) { self_->on_insert(k, ctx); }
  void on_hit(const block_key& k, const access_context& ctx) { self_->on_hit(k, ctx); }
  void on_erase(const block_key& k) { self_->on_erase(k); }
  //! Forwards the hint to a policy that takes it (`eviction_policy.hpp`).
  void prefetch(const block_key& k) { self_->prefetch(k); }
  template <class Evictable>
  std::optional<block_key> victim(Evictable&& evictable) {
    auto call = [](void* f, const block_key& k) -> bool { return (*static_cast<std::remove_reference_t<Evictable>*>(f))(k); };
    return self_->victim(call, const_cast<void*>(static_cast<const void*>(std::addressof(evictable))));
  }
  [[nodiscard]] std::size_t size() const { return self_->size(); }
  //! The configured name ("s3fifo", "auto", ...).
  [[nodiscard]] const std::string& name() const noexcept { return name_; }

 private:
  static error ghost_factor_error(const config::view& cfg) {
    static_assert(s3fifo::max_ghost_factor == 64.0 && reuse_class::max_ghost_factor == 64.0);
    return error{errc::invalid_argument, "config field '" + cfg.path_of("ghost_factor") + "': must be in [0, 64]"};
  }

  using evictable_fn = bool (*)(void*, const block_key&);
  struct concept_base {
    virtual ~concept_base() = default;
    virtual void on_insert(const block_key&, const access_context&) = 0;
    virtual void on_hit(const block_key&, const access_context&) = 0;
    virtual void on_erase(const block_key&) = 0;
    virtual void prefetch(const block_key&) = 0;
    virtual std::optional<block_key> victim(evictable_fn, void*) = 0;
    virtual std::size_t size() const = 0;
  };
  template <class P>
  struct model final : concept_base {
    template <class... Args>
    explicit model(Args&&... args) : p(std::forward<Args>(args)...) {}
    void on_insert(const block_key& k, const access_context& c) override { p.on_insert(k, c); }
    void on_hit(const block_key& k, const access_context& c) override { p.on_hit(k, c); }
    void on_erase(const block_key& k) override { p.on_erase(k); }
    void prefetch(const block_key& k) override {
      if constexpr (requires { p.prefetch(k); }) p.prefetch(k);
    }
    std::optional<block_key> victim(evictable_fn f, void* ctx) override {
      return p.victim([f, ctx](const block_key& k) { return f(ctx, k); });
    }
    std::size_t size() const override { return p.size(); }
    P p;
  };

  std::unique_ptr<concept_base> self_;
  std::string name_;
};

}  // namespace kvx::cache::eviction
