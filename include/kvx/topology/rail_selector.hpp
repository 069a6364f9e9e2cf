#pragma once
//! \file
//! The `rail_selector` concept: which rail (NIC, or any parallel link) carries
//! each slice of a transfer, and what happens when a rail fails.
//!
//! ## Requirements
//! For a selector `R`, `r` an `R&`, `s` a `const slice_hint&`:
//!
//! | expression | type | semantics |
//! | --- | --- | --- |
//! | `typename R::rail_selector_concept` | `rail_selector_tag` | opts in |
//! | `r.select(s)` | `std::optional<std::size_t>` | the rail for this slice among the healthy ones; nothing when every rail has failed |
//! | `r.mark_failed(i)` | `void` | rail `i` failed: later selections avoid it (failover) |
//! | `r.mark_healthy(i)` | `void` | rail `i` is back |
//! | `r.rail_count()` | `std::size_t` | rails known |
//!
//! Not thread-safe; the engine serializes calls per batch.
//!
//! Policies: `nearest` (the rails closest to the slice's memory, round-robin
//! among equally near ones, so a GPU's buffers use the NICs on its PCIe
//! switch; falls back to farther rails on failure) and `round_robin`
//! (stripes every slice across all healthy rails: one big transfer uses the
//! aggregate bandwidth).

#include <concepts>
#include <cstddef>
#include <optional>
#include <vector>

#include <kvx/topology/topology.hpp>

namespace kvx::topology {

struct rail_selector_tag {};

//! What the engine knows about a slice when it picks its rail.
struct slice_hint {
  int gpu = -1;                 //!< CUDA ordinal of the local memory, -1 for host memory
  int numa = -1;                //!< NUMA node of host memory, -1 if unknown
  std::size_t slice_index = 0;  //!< position of the slice in its op (for striping)
};

template <class R>
concept rail_selector = std::same_as<typename R::rail_selector_concept, rail_selector_tag> &&
                        requires(R& r, const slice_hint& s, std::size_t i) {
                          { r.select(s) } -> std::same_as<std::optional<std::size_t>>;
                          r.mark_failed(i);
                          r.mark_healthy(i);
                          { r.rail_count() } -> std::convertible_to<std::size_t>;
                        };

template <class R>
constexpr bool check_rail_selector() {
  static_assert(requires { typename R::rail_selector_concept; },
                "kvx: rail selector R lacks `using rail_selector_concept = kvx::topology::rail_selector_tag;`");
  static_assert(requires(R& r, const slice_hint& s) { { r.select(s) } -> std::same_as<std::optional<std::size_t>>; },
                "kvx: rail selector R lacks select(const slice_hint&) -> std::optional<std::size_t>");
  static_assert(requires(R& r, std::size_t i) { r.mark_failed(i); r.mark_healthy(i); },
                "kvx: rail selector R lacks mark_failed(std::size_t) or mark_healthy(std::size_t)");
  static_assert(requires(R& r) { { r.rail_count() } -> std::convertible_to<std::size_t>; },
                "kvx: rail selector R lacks rail_count() -> std::size_t");
  return true;
}

namespace rail {

//! Stripes slices over every healthy rail in turn.
class round_robin {
 public:
  using rail_selector_concept = rail_selector_tag;
  explicit round_robin(std::size_t rails) : healthy_(rails, true) {}

  std::optional<std::size_t> select(const slice_hint&) {
    for (std::size_t tried = 0; tried < healthy_.size(); ++tried) {
      const auto i = next_++ % healthy_.size();
      if (healthy_[i]) return i;
    }
    return std::nullopt;
  }
  void mark_failed(std::size_t i) { healthy_.at(i) = false; }
  void mark_healthy(std::size_t i) { healthy_.at(i) = true; }
  [[nodiscard]] std::size_t rail_count() const noexcept { return healthy_.size(); }

 private:
  std::vector<bool> healthy_;
  std::size_t next_ = 0;
};

//! The nearest healthy rails to the slice's memory, round-robin among ties.
//! Rails are the topology's RDMA NICs, in `system::nics` order.
class nearest {
 public:
  using rail_selector_concept = rail_selector_tag;
  explicit nearest(system topo, bool rdma_only = true) : topo_(std::move(topo)), rdma_only_(rdma_only) {
    for (std::size_t i = 0; i < topo_.nics.size(); ++i)
      if (!rdma_only_ || topo_.nics[i].rdma) rails_.push_back(i);
    healthy_.assign(rails_.size(), true);
  }

  std::optional<std::size_t> select(const slice_hint& s) {
    int best = 1 << 30;
    std::vector<std::size_t> ties;
    for (std::size_t r = 0; r < rails_.size(); ++r) {
      if (!healthy_[r]) continue;
      const auto& n = topo_.nics[rails_[r]];
      const int d = static_cast<int>(s.gpu >= 0 ? gpu_distance(s.gpu, n) : topo_.from_numa(s.numa, n.bdf));
      if (d < best) {
        best = d;
        ties.clear();
      }
      if (d == best) ties.push_back(r);
    }
    if (ties.empty()) return std::nullopt;
    return ties[s.slice_index % ties.size()];
  }
  void mark_failed(std::size_t i) { healthy_.at(i) = false; }
  void mark_healthy(std::size_t i) { healthy_.at(i) = true; }
  [[nodiscard]] std::size_t rail_count() const noexcept { return rails_.size(); }
  //! The topology NIC behind rail `i`.
  [[nodiscard]] const nic& rail(std::size_t i) const { return topo_.nics[rails_.at(i)]; }

 private:
  distance gpu_distance(int gpu_index, const nic& n) const {
    for (const auto& g : topo_.gpus)
      if (g.index == gpu_index) return topo_.between(g.bdf, n.bdf);
    return distance::cross_numa;
  }

  system topo_;
  bool rdma_only_;
  std::vector<std::size_t> rails_;
  std::vector<bool> healthy_;
};

}  // namespace rail

static_assert(check_rail_selector<rail::round_robin>());
static_assert(check_rail_selector<rail::nearest>());

}  // namespace kvx::topology
