#pragma once
//! \file
//! `tier_stack<Tiers...>`: the tiers of a `tiered_cache`, fastest first, held
//! by value and built in place from one config each. A stack has at most 8
//! tiers.
//!
//! The cache reaches a tier by run-time index through `visit(i, f)`, which
//! calls `f(tier_i)`; every `f` the cache passes returns the same type for
//! every tier. `kvx/cache/tiers/any_tier.hpp` has `tier_vector`, the same
//! interface over a run-time list of type-erased tiers.
//!
//! \code
//! kvx::cache::tier_stack<kvx::cache::dram_tier<>, kvx::cache::file_tier<>> s(
//!     kvx::cache::dram_tier_config{.capacity = 1 << 30}, kvx::cache::file_tier_config{.path = "/tmp", .capacity = 8ULL << 30});
//! s.get<0>().store(key, bytes);
//! \endcode

#include <cstddef>
#include <tuple>
#include <utility>

#include <kvx/cache/tier.hpp>

namespace kvx::cache {

inline constexpr std::size_t max_tiers = 8;

template <class... Tiers>
class tier_stack {
  static_assert(sizeof...(Tiers) >= 1, "kvx: tier_stack needs at least one tier");
  static_assert(sizeof...(Tiers) <= max_tiers, "kvx: tier_stack holds at most 8 tiers");
  static_assert((check_tier<Tiers>() && ...));

 public:
  template <class... Configs>
    requires(sizeof...(Configs) == sizeof...(Tiers))
  explicit tier_stack(Configs&&... cfgs) : tiers_(std::forward<Configs>(cfgs)...) {}

  [[nodiscard]] static constexpr std::size_t count() noexcept { return sizeof...(Tiers); }

  template <std::size_t I>
  auto& get() noexcept {
    return std::get<I>(tiers_);
  }
  template <std::size_t I>
  const auto& get() const noexcept {
    return std::get<I>(tiers_);
  }

  //! `f(tier i)`; `i < count()` is a precondition.
  template <class F>
  decltype(auto) visit(std::size_t i, F&& f) {
    return visit_at<0>(i, f);
  }
  template <class F>
  decltype(auto) visit(std::size_t i, F&& f) const {
    return visit_at<0>(i, f);
  }

 private:
  template <std::size_t I, class Self, class F>
  static decltype(auto) visit_impl(Self& self, std::size_t i, F& f) {
    if constexpr (I + 1 == sizeof...(Tiers)) {
      return f(std::get<I>(self.tiers_));
    } else {
      if (i == I) return f(std::get<I>(self.tiers_));
      return visit_impl<I + 1>(self, i, f);
    }
  }
  template <std::size_t I, class F>
  decltype(auto) visit_at(std::size_t i, F& f) {
    return visit_impl<I>(*this, i, f);
  }
  template <std::size_t I, class F>
  decltype(auto) visit_at(std::size_t i, F& f) const {
    return visit_impl<I>(*this, i, f);
  }

  std::tuple<Tiers...> tiers_;
};

}  // namespace kvx::cache
