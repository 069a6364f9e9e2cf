#pragma once
//! \file
//! `any_tier`: any tier behind one run-time type, and `tier_vector`, a
//! run-time list of them with the `tier_stack` interface, so that a
//! `tiered_cache` can be configured from JSON (`any_tiered_cache`).
//!
//! Costs one virtual call per operation, nothing next to the copy it makes.
//! Thread safety: that of the wrapped tier.
//!
//! \code
//! kvx::cache::tier_vector tiers;
//! tiers.push_back(kvx::cache::any_tier::make<kvx::cache::dram_tier<>>(kvx::cache::dram_tier_config{.capacity = 1 << 30}));
//! \endcode

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include <kvx/cache/tier.hpp>

namespace kvx::cache {

class any_tier {
 public:
  using tier_concept = tier_tag;
  //! Unknown at compile time; `is_host_accessible()` answers at run time.
  static constexpr bool host_accessible = false;

  template <tier T, class... Args>
  static any_tier make(Args&&... args) {
    any_tier t;
    t.impl_ = std::make_unique<model<T>>(std::forward<Args>(args)...);
    return t;
  }

  [[nodiscard]] std::string_view name() const { return impl_->name(); }
  [[nodiscard]] std::uint64_t capacity() const { return impl_->capacity(); }
  [[nodiscard]] std::uint64_t used_bytes() const { return impl_->used_bytes(); }
  [[nodiscard]] watermarks marks() const { return impl_->marks(); }
  [[nodiscard]] bool is_host_accessible() const { return impl_->is_host_accessible(); }
  [[nodiscard]] std::uint64_t footprint(std::uint64_t n) const { return impl_->footprint(n); }
  result<void> store(const block_key& k, std::span<const std::byte> in) { return impl_->store(k, in); }
  result<std::size_t> load(const block_key& k, std::span<std::byte> out) { return impl_->load(k, out); }
  bool erase(const block_key& k) { return impl_->erase(k); }
  [[nodiscard]] bool contains(const block_key& k) const { return impl_->contains(k); }
  [[nodiscard]] std::optional<std::uint64_t> size_of(const block_key& k) const { return impl_->size_of(k); }
  //! The wrapped tier's `load_many` (pipelined where it has one, e.g. io_uring).
  template <class OnBlock>
  void load_many(std::span<const block_key> keys, std::span<const std::span<std::byte>> outs, OnBlock&& on_block) {
    impl_->load_many(keys, outs, std::function<void(std::size_t, std::error_code)>(std::ref(on_block)));
  }
  //! The wrapped tier if it is a `T`, else null.
  template <class T>
  [[nodiscard]] T* target() noexcept {
    auto* m = dynamic_cast<model<T>*>(impl_.get());
    return m ? &m->t : nullptr;
  }

 private:
  struct concept_base {
    virtual ~concept_base() = default;
    virtual std::string_view name() const = 0;
    virtual std::uint64_t capacity() const = 0;
    virtual std::uint64_t used_bytes() const = 0;
    virtual watermarks marks() const = 0;
    virtual bool is_host_accessible() const = 0;
    virtual std::uint64_t footprint(std::uint64_t n) const = 0;
    virtual result<void> store(const block_key&, std::span<const std::byte>) = 0;
    virtual result<std::size_t> load(const block_key&, std::span<std::byte>) = 0;
    virtual bool erase(const block_key&) = 0;
    virtual bool contains(const block_key&) const = 0;
    virtual std::optional<std::uint64_t> size_of(const block_key&) const = 0;
    virtual void load_many(std::span<const block_key>, std::span<const std::span<std::byte>>,
                           const std::function<void(std::size_t, std::error_code)>&) = 0;
  };
  template <class T>
  struct model final : concept_base {
    template <class... Args>
    explicit model(Args&&... args) : t(std::forward<Args>(args)...) {}
    std::string_view name() const override { return t.name(); }
    std::uint64_t capacity() const override { return t.capacity(); }
    std::uint64_t used_bytes() const override { return t.used_bytes(); }
    watermarks marks() const override { return t.marks(); }
    bool is_host_accessible() const override { return T::host_accessible; }
    std::uint64_t footprint(std::uint64_t n) const override { return cache::footprint(t, n); }
    result<void> store(const block_key& k, std::span<const std::byte> in) override { return t.store(k, in); }
    result<std::size_t> load(const block_key& k, std::span<std::byte> out) override { return t.load(k, out); }
    bool erase(const block_key& k) override { return t.erase(k); }
    bool contains(const block_key& k) const override { return t.contains(k); }
    std::optional<std::uint64_t> size_of(const block_key& k) const override { return t.size_of(k); }
    void load_many(std::span<const block_key> keys, std::span<const std::span<std::byte>> outs,
                   const std::function<void(std::size_t, std::error_code)>& on_block) override {
      cache::load_many(t, keys, outs, on_block);
    }
    T t;
  };
  std::unique_ptr<concept_base> impl_;
};

static_assert(tier<any_tier>);

//! A run-time list of tiers, fastest first, with `tier_stack`'s interface.
class tier_vector {
 public:
  tier_vector() = default;
  void push_back(any_tier t) { tiers_.push_back(std::move(t)); }
  [[nodiscard]] std::size_t count() const noexcept { return tiers_.size(); }
  any_tier& operator[](std::size_t i) noexcept { return tiers_[i]; }
  const any_tier& operator[](std::size_t i) const noexcept { return tiers_[i]; }
  template <class F>
  decltype(auto) visit(std::size_t i, F&& f) {
    return f(tiers_[i]);
  }
  template <class F>
  decltype(auto) visit(std::size_t i, F&& f) const {
    return f(tiers_[i]);
  }

 private:
  std::vector<any_tier> tiers_;
};

}  // namespace kvx::cache
