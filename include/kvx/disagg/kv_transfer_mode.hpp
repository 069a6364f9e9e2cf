#pragma once
//! \file
//! The `kv_transfer_mode` concept: how a KV connector moves one request's KV
//! from the prefill instance that computes it to the decode instance that
//! uses it. Two modes, chosen at compile time; each mode type also carries
//! that mode's configuration.
//!
//! | mode | as in | data path | control path |
//! | --- | --- | --- | --- |
//! | `transfer_mode::push` | SGLang P/D, Mooncake TE | the prefill instance writes each layer straight into the blocks the decode instance pre-allocated (one-sided writes into its registered KV region, or into its staging region when layouts, TP or block sizes differ) | the decode side publishes a `push_target` (where every block of every layer goes) on a `push_link`; the prefill side takes it and sends a `push_notice` after each layer |
//! | `transfer_mode::pull<Store>` | vLLM + Mooncake Store, LMCache | the prefill instance puts each (block, layer, head group) as an object named by its prefix-chained block key into the pool; any instance later gets it (zero-copy reads into its blocks) | the pool itself: `async_longest_prefix` says how much is cached |
//!
//! Push moves each byte once and needs the two sides paired per request; pull
//! moves it twice but decouples them, survives the prefill instance, and turns
//! every later request with the same prefix into a pool hit.
//!
//! ## Requirements
//!
//! The connector implements both data paths; a mode type selects one and
//! carries its configuration, so the modes are a closed set:
//!
//! | expression | type | semantics |
//! | --- | --- | --- |
//! | `typename M::kv_transfer_mode_concept` | `transfer_mode_tag` | opts `M` in |
//! | `M::pooled` | `static constexpr bool` | true: through the pool (pull), false: point to point (push) |
//! | `M::name()` | `std::string_view` | "push" or "pull" |
//!
//! Thread safety: `push_link` is thread-safe (a mutex); mode values are
//! copied into the connector.
//!
//! \code
//! auto link = std::make_shared<kvx::disagg::push_link>();   // one per process (the bootstrap service)
//! kvx::disagg::transfer_mode::push push{link};
//! kvx::disagg::transfer_mode::pull<kvx::store::store_client<engine_type>> pull{&client, "tenant-a", "tiny-4l"};
//! \endcode

#include <concepts>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include <kvx/core/result.hpp>
#include <kvx/disagg/kv_layout.hpp>

namespace kvx::disagg {

//! The tag a type names as `kv_transfer_mode_concept` to opt in.
struct transfer_mode_tag {};

//! A request's id, unique among the requests a connector knows.
using request_id = std::uint64_t;

//! One destination of a push: `ranges` of segment `segments[segment]`.
struct push_destination {
  std::uint32_t segment = 0;
  std::vector<strided_range> ranges;
};

//! What the prefill side sends to the decode side after each layer.
struct push_notice {
  request_id request = 0;
  std::uint64_t epoch = 0;              //!< the target's epoch (a retried request gets a new one)
  std::uint32_t layer = 0;
  std::error_code code;                 //!< empty: every block of the layer arrived
  std::string context;                  //!< where it failed
  std::vector<std::uint32_t> failed_blocks;  //!< source block indexes whose bytes did not arrive (all when empty and `code` is set)
  std::uint64_t bytes = 0;
};

//! Where every byte of one request goes, published by the decode side. The
//! prefill instance's shards and blocks index it: `at(shard, layer, block)`.
struct push_target {
  request_id request = 0;
  std::uint64_t epoch = 0;
  std::string node;                          //!< the decode instance
  std::vector<std::string> segments;         //!< registered segments the ranges refer to
  //! Their registrations' keys (one per segment; empty: not pinned): writes
  //! to a segment registered again since (the decode instance restarted
  //! under the same name) fail instead of landing in the new instance.
  std::vector<std::uint64_t> segment_keys;
  //! The decode side's deadline for writes to this target, in milliseconds
  //! since the Unix epoch on its system clock (0: none, an older decode
  //! side). Past it, plus its drain margin, it gives the blocks of a request
  //! whose prefill never reported back to other requests; a producer ends
  //! its writes `connector_config::max_clock_skew` before it.
  std::uint64_t write_by_ms = 0;
  std::uint32_t source_tp = 1;               //!< the prefill's TP the target was built for
  std::uint32_t source_block_tokens = 16;    //!< ... and its block size
  std::uint32_t source_blocks = 0;           //!< prefill blocks to send (ceil(prompt / block_tokens))
  std::uint32_t layers = 0;
  std::vector<push_destination> destinations;  //!< [(shard * layers + layer) * source_blocks + block]
  std::function<void(const push_notice&)> notify;  //!< the control channel back to the decode side

  [[nodiscard]] const push_destination& at(std::uint32_t shard, std::uint32_t layer, std::uint32_t block) const {
    return destinations[(std::size_t{shard} * layers + layer) * source_blocks + block];
  }
};

//! The rendezvous of push mode (SGLang's bootstrap server, in process): decode
//! sides publish targets under the request id, prefill sides take them.
class push_link {
 public:
  //! `errc::already_exists` when a target for the request is already waiting.
  result<void> publish(std::shared_ptr<const push_target> t) {
    std::lock_guard lock(mutex_);
    auto [it, fresh] = targets_.try_emplace(t->request, t);
    if (!fresh)
      return error{errc::already_exists, "push_link: request " + std::to_string(t->request) +
                                             " already has a target waiting for a prefill instance"};
    return {};
  }
  //! The target of `request`, removed from the link (one prefill instance serves it).
  //! `errc::not_found` when no decode instance published one.
  result<std::shared_ptr<const push_target>> take(request_id request) {
    std::lock_guard lock(mutex_);
    auto it = targets_.find(request);
    if (it == targets_.end())
      return error{errc::not_found, "push_link: no decode instance published a target for request " +
                                        std::to_string(request) + " (the decode side allocates first)"};
    auto t = std::move(it->second);
    targets_.erase(it);
    return t;
  }
  //! Removes a target nobody took (the request finished or moved); true if one was removed.
  bool withdraw(request_id request, std::uint64_t epoch) {
    std::lock_guard lock(mutex_);
    auto it = targets_.find(request);
    if (it == targets_.end() || it->second->epoch != epoch) return false;
    targets_.erase(it);
    return true;
  }
  [[nodiscard]] std::size_t waiting() const {
    std::lock_guard lock(mutex_);
    return targets_.size();
  }

 private:
  mutable std::mutex mutex_;
  std::map<request_id, std::shared_ptr<const push_target>> targets_;
};

namespace transfer_mode {

//! Point to point: prefill writes into the decode instance's blocks.
struct push {
  using kv_transfer_mode_concept = transfer_mode_tag;
  static constexpr bool pooled = false;
  [[nodiscard]] static constexpr std::string_view name() noexcept { return "push"; }
  std::shared_ptr<push_link> link;
};

//! Through the pool: prefill puts blocks keyed by prefix-chained block keys,
//! decode (and any later request with the same prefix) gets them.
//! `Store` is a `kvx::store::store_client<Engine>` (or a type with the same
//! `async_put`, `async_get` and `async_longest_prefix`).
template <class Store>
struct pull {
  using kv_transfer_mode_concept = transfer_mode_tag;
  static constexpr bool pooled = true;
  [[nodiscard]] static constexpr std::string_view name() noexcept { return "pull"; }
  Store* store = nullptr;
  std::string tenant = "default";  //!< pool namespace and key namespace
  std::string model = "model";     //!< blocks of different models never share keys
};

}  // namespace transfer_mode

namespace detail {
template <class M>
concept has_mode_tag = requires { typename M::kv_transfer_mode_concept; } &&
                       std::same_as<typename M::kv_transfer_mode_concept, transfer_mode_tag>;
template <class M>
concept has_mode_pooled = requires {
  { M::pooled } -> std::convertible_to<bool>;
};
template <class M>
concept has_mode_name = requires {
  { M::name() } -> std::convertible_to<std::string_view>;
};
}  // namespace detail

//! `M` selects how KV moves; see the requirements table above.
template <class M>
concept kv_transfer_mode = detail::has_mode_tag<M> && detail::has_mode_pooled<M> && detail::has_mode_name<M>;

//! One sentence per requirement `M` misses. Returns true so it can sit in a `static_assert`.
template <class M>
constexpr bool check_kv_transfer_mode() {
  static_assert(detail::has_mode_tag<M>,
                "kvx: transfer mode M lacks `using kv_transfer_mode_concept = kvx::disagg::transfer_mode_tag;`");
  static_assert(detail::has_mode_pooled<M>, "kvx: transfer mode M lacks `static constexpr bool pooled`");
  static_assert(detail::has_mode_name<M>, "kvx: transfer mode M lacks static name() -> std::string_view");
  return kv_transfer_mode<M>;
}

static_assert(check_kv_transfer_mode<transfer_mode::push>());

}  // namespace kvx::disagg
