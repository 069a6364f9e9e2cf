#pragma once
//! \file
//! `any_tiered_cache`: a `tiered_cache` whose tiers, capacities and policies
//! come from JSON at run time, for tools, benchmarks and engines that pick
//! their stack in a config file. Errors name the config field.
//!
//! ```json
//! {
//!   "name": "kvx",                       // metrics label (default "kvx")
//!   "block_bytes": "256KiB",             // required: nominal bytes per block
//!   "eviction": "lru",                   // or {"policy": "s3fifo", "small_ratio": 0.1}: see
//!                                        // eviction/any_eviction_policy.hpp (default: eviction_auto)
//!   "tiering": {"mode": "write_back", "admission": "second_access"},   // see tiering/any_tiering.hpp
//!   "tiers": [                           // required, fastest first, 1 to 8
//!     {"kind": "dram", "name": "dram", "capacity": "8GiB", "high": 0.95, "low": 0.85,
//!      "allocator": "offset" | "slab", "alignment": 4096, "populate": true},
//!     {"kind": "file", "name": "ssd", "path": "/mnt/nvme", "capacity": "64GiB",
//!      "allocator": "offset" | "slab", "direct": true, "io": "pread" | "uring", "queue_depth": 32,
//!      "readers": 4},
//!     {"kind": "cuda", "name": "gpu", "capacity": "16GiB", "device": 0, "lanes": 4,
//!      "staging_chunk": "1MiB", "stage_loads": false}    // GPU memory: see tiers/cuda_tier.hpp
//!   ]
//! }
//! ```
//! A tier holds at most `max_tier_blocks` blocks of `block_bytes` (a smaller
//! `block_bytes` is almost surely a typo, and each block costs index and
//! policy memory up front). Two file tiers, in this process or another, may
//! not share one file: the second is refused ("in use by another tier or
//! process"). No config makes `make` throw: exceptions from building the
//! tiers or the policies come back as errors naming the field.
//! `"io": "uring"` needs the `kvx::uring` target (`KVX_WITH_URING`) and
//! `"kind": "cuda"` the `kvx::cuda` target (`KVX_WITH_CUDA`) and a device;
//! without them the config is refused (`not_supported`) with a message saying so.
//!
//! Thread safety: that of `tiered_cache` (every member, concurrently).
//!
//! \code
//! auto cache = kvx::cache::any_tiered_cache::make(R"({"block_bytes": 65536,
//!     "tiers": [{"kind": "dram", "capacity": "1GiB"}]})");
//! if (!cache) die(cache.error().message());   // "config field 'tiers[0].capacity' ..."
//! (*cache)->insert(key, bytes);
//! \endcode

#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>

#include <kvx/cache/eviction/any_eviction_policy.hpp>
#include <kvx/cache/tiered_cache.hpp>
#include <kvx/cache/tiering/any_tiering.hpp>
#include <kvx/cache/tiers/any_tier.hpp>
#include <kvx/cache/tiers/dram_tier.hpp>
#include <kvx/cache/tiers/file_tier.hpp>
#include <kvx/core/config.hpp>
#include <kvx/core/result.hpp>
#include <kvx/features.hpp>
#include <kvx/memory/offset_allocator.hpp>
#include <kvx/memory/slab_allocator.hpp>
#if KVX_WITH_URING
#include <kvx/cache/tiers/uring_file_tier.hpp>
#endif
#if KVX_WITH_CUDA
#include <kvx/cache/tiers/cuda_tier.hpp>
#include <kvx/cuda/device.hpp>
#endif

namespace kvx::cache {

class any_tiered_cache {
 public:
  using cache_type = tiered_cache<tier_vector, eviction::any_eviction_policy, tiering::any_tiering>;
  using pin_handle = cache_type::pin_handle;
  //! The most blocks of `block_bytes` one tier may hold (2^28: a 64 TiB tier
  //! of 256 KiB blocks; their index alone takes over 8 GiB).
  static constexpr std::uint64_t max_tier_blocks = std::uint64_t{1} << 28;

  //! Builds a cache from JSON text; `registry` receives its metrics (null: the default registry).
  static result<std::unique_ptr<any_tiered_cache>> make(std::string_view json_text,
                                                        metrics::registry* registry = nullptr) {
    auto doc = config::parse(json_text);
    if (!doc) return doc.error();
    return make(config::view(*doc), registry);
  }

  //! Builds a cache from a config view (a sub-object of a larger config keeps its path in errors).
  static result<std::unique_ptr<any_tiered_cache>> make(const config::view& v, metrics::registry* registry = nullptr) {
    KVX_TRY(v.allow_only({"name", "block_bytes", "eviction", "tiering", "tiers"}));
    tiered_cache_config cc;
    auto name = v.optional<std::string>("name", "kvx");
    if (!name) return name.error();
    cc.name = *name;
    cc.registry = registry;
    auto block = v.required<config::bytes>("block_bytes");
    if (!block) return block.error();
    if (block->value == 0) return error{errc::invalid_argument, "config field '" + v.path_of("block_bytes") + "' must be positive"};
    cc.block_bytes = block->value;

    // "eviction": "name" is short for {"policy": "name"}.
    config::json policy = config::json::object({{"policy", "auto"}});
    if (v.contains("eviction")) {
      const config::json& e = v.raw().at("eviction");
      if (e.is_string())
        policy = config::json::object({{"policy", e}});
      else if (e.is_object())
        policy = e;
      else
        return error{errc::invalid_argument, "config field '" + v.path_of("eviction") +
                                                 "': expected a policy name or an object {\"policy\": ...}"};
    }
    const std::string policy_path = v.path_of("eviction");
    if (policy.contains("policy") && policy["policy"] == "belady")
      return error{errc::invalid_argument, "config field '" + policy_path +
                                               "': belady needs the future and is for trace replay only"};
    // Build one now so that a bad name or option is reported against its field.
    try {
      if (auto probe = eviction::any_eviction_policy::from_config(config::view(policy, policy_path), 1); !probe)
        return probe.error();
    } catch (const std::exception& e) {
      return error{errc::invalid_argument, "config field '" + policy_path + "': " + e.what()};
    }

    tiering::any_tiering tiering;
    if (v.contains("tiering")) {
      auto tv = v.child("tiering");
      if (!tv) return tv.error();
      // As the eviction probe above: what the builder throws comes back as a config error.
      try {
        auto t = tiering::any_tiering::from_config(*tv);
        if (!t) return t.error();
        tiering = std::move(*t);
      } catch (const std::exception& e) {
        return error{errc::invalid_argument, "config field '" + tv->path() + "': " + e.what()};
      }
    }

    if (!v.contains("tiers")) return error{errc::invalid_argument, "config field '" + v.path_of("tiers") + "' is required"};
    const config::json& arr = v.raw().at("tiers");
    if (!arr.is_array() || arr.empty() || arr.size() > max_tiers)
      return error{errc::invalid_argument, "config field '" + v.path_of("tiers") + "': expected an array of 1 to 8 tiers"};
    tier_vector tiers;
    for (std::size_t i = 0; i < arr.size(); ++i) {
      auto t = make_tier(config::view(arr[i], v.path_of("tiers") + "[" + std::to_string(i) + "]"), cc.block_bytes);
      if (!t) return t.error();
      tiers.push_back(std::move(*t));
    }

    cache_type::options opts;
    opts.config = std::move(cc);
    opts.tiering = std::move(tiering);
    const std::string tiers_path = v.path_of("tiers");
    opts.make_eviction = [policy, policy_path, tiers_path](std::size_t t, std::size_t blocks) {
      // A policy may refuse its real size (the probe above had 1 block).
      auto refused = [&](const std::string& why) {
        return policy_failure("config field '" + policy_path + "': for the " + std::to_string(blocks) + " blocks of '" +
                              tiers_path + "[" + std::to_string(t) + "]': " + why);
      };
      try {
        auto p = eviction::any_eviction_policy::from_config(config::view(policy, policy_path), blocks);
        if (!p) throw refused(p.error().message());
        return std::move(*p);
      } catch (const policy_failure&) {
        throw;
      } catch (const std::exception& e) {
        throw refused(e.what());
      }
    };
    try {
      return std::unique_ptr<any_tiered_cache>(new any_tiered_cache(std::move(opts), std::move(tiers)));
    } catch (const policy_failure& e) {
      return error{errc::invalid_argument, e.what()};
    } catch (const std::exception& e) {
      const std::string where = v.path().empty() ? "config" : "config field '" + v.path() + "'";
      return error{errc::invalid_argument, where + ": building the cache: " + e.what()};
    }
  }

  // The operations of `tiered_cache` (see tiered_cache.hpp).
  std::size_t lookup(std::span<const block_key> keys, std::span<std::uint8_t> tiers_out) { return c_.lookup(keys, tiers_out); }
  prefix_match lookup(std::span<const block_key> keys) { return c_.lookup(keys); }
  result<insert_status> insert(const block_key& k, std::span<const std::byte> bytes, std::optional<block_key> parent = std::nullopt) {
    return c_.insert(k, bytes, parent);
  }
  result<read_result> read(const block_key& k, std::span<std::byte> out) { return c_.read(k, out); }
  result<pin_handle> pin(const block_key& k) { return c_.pin(k); }
  std::vector<pin_handle> pin_prefix(std::span<const block_key> keys) { return c_.pin_prefix(keys); }
  result<void> erase(const block_key& k) { return c_.erase(k); }
  [[nodiscard]] bool contains(const block_key& k) const { return c_.contains(k); }
  [[nodiscard]] std::optional<std::size_t> tier_of(const block_key& k) const { return c_.tier_of(k); }
  [[nodiscard]] std::size_t size() const { return c_.size(); }
  [[nodiscard]] std::size_t tier_count() const noexcept { return c_.tier_count(); }
  [[nodiscard]] tier_stats stats(std::size_t t) const { return c_.stats(t); }
  [[nodiscard]] std::uint64_t misses() const { return c_.misses(); }
  [[nodiscard]] std::string_view tier_name(std::size_t t) const { return c_.tiers()[t].name(); }
  //! The underlying typed cache.
  cache_type& get() noexcept { return c_; }

 private:
  any_tiered_cache(cache_type::options opts, tier_vector tiers) : c_(std::move(opts), std::move(tiers)) {}

  // An eviction policy that could not be built for a tier, its message naming the fields.
  struct policy_failure : std::runtime_error {
    using std::runtime_error::runtime_error;
  };

  static result<watermarks> read_marks(const config::view& t) {
    auto high = t.optional<double>("high", 0.95);
    if (!high) return high.error();
    auto low = t.optional<double>("low", 0.85);
    if (!low) return low.error();
    watermarks m{*high, *low};
    KVX_TRY(validate(m, "config field '" + t.path() + "' (high, low)"));
    return m;
  }

  template <class F>
  static result<any_tier> guarded(const config::view& t, F&& build) {
    // Tier constructors throw for set-up failures (mmap, open); a config
    // error must come back as a result naming the tier.
    try {
      return build();
    } catch (const std::exception& e) {
      return error{errc::invalid_argument, "config field '" + t.path() + "': " + e.what()};
    }
  }

  static result<any_tier> make_tier(const config::view& t, std::uint64_t block_bytes) {
    auto kind = t.required<std::string>("kind");
    if (!kind) return kind.error();
    auto capacity = t.required<config::bytes>("capacity");
    if (!capacity) return capacity.error();
    if (const std::uint64_t blocks = capacity->value / block_bytes; blocks > max_tier_blocks)
      return error{errc::invalid_argument, "config field '" + t.path_of("capacity") + "': " +
                                               std::to_string(capacity->value) + " bytes are " + std::to_string(blocks) +
                                               " blocks of block_bytes " + std::to_string(block_bytes) +
                                               ", more than the " + std::to_string(max_tier_blocks) +
                                               " a tier may hold (is block_bytes too small?)"};
    auto marks = read_marks(t);
    if (!marks) return marks.error();
    auto allocator = t.optional<std::string>("allocator", "offset");
    if (!allocator) return allocator.error();
    if (*allocator != "offset" && *allocator != "slab")
      return error{errc::invalid_argument,
                   "config field '" + t.path_of("allocator") + "': \"" + *allocator + "\" is not an allocator (offset, slab)"};
    const bool slab = *allocator == "slab";

    if (*kind == "dram") {
      KVX_TRY(t.allow_only({"kind", "name", "capacity", "high", "low", "allocator", "alignment", "populate"}));
      dram_tier_config c;
      auto n = t.optional<std::string>("name", "dram");
      if (!n) return n.error();
      auto align = t.optional<std::uint64_t>("alignment", 64);
      if (!align) return align.error();
      auto populate = t.optional<bool>("populate", true);
      if (!populate) return populate.error();
      c.name = *n;
      c.capacity = capacity->value;
      c.marks = *marks;
      c.alignment = *align;
      c.populate = *populate;
      return guarded(t, [&] {
        return slab ? any_tier::make<dram_tier<memory::slab_allocator>>(c) : any_tier::make<dram_tier<>>(c);
      });
    }
    if (*kind == "file") {
      KVX_TRY(t.allow_only({"kind", "name", "capacity", "high", "low", "allocator", "path", "direct", "io", "queue_depth", "readers"}));
      file_tier_config c;
      auto n = t.optional<std::string>("name", "file");
      if (!n) return n.error();
      auto path = t.required<std::string>("path");
      if (!path) return path.error();
      auto direct = t.optional<bool>("direct", true);
      if (!direct) return direct.error();
      auto io = t.optional<std::string>("io", "pread");
      if (!io) return io.error();
      auto depth = t.optional<unsigned>("queue_depth", 32);
      if (!depth) return depth.error();
      auto readers = t.optional<unsigned>("readers", 4);
      if (!readers) return readers.error();
      c.name = *n;
      c.path = *path;
      c.capacity = capacity->value;
      c.marks = *marks;
      c.direct = *direct;
      c.readers = *readers;
      if (*io == "pread")
        return guarded(t, [&] {
          return slab ? any_tier::make<file_tier<memory::slab_allocator>>(c) : any_tier::make<file_tier<>>(c);
        });
      if (*io == "uring") {
#if KVX_WITH_URING
        return guarded(t, [&] {
          return slab ? any_tier::make<uring_file_tier<memory::slab_allocator>>(c, *depth)
                      : any_tier::make<uring_file_tier<>>(c, *depth);
        });
#else
        return error{errc::not_supported, "config field '" + t.path_of("io") +
                                              "': \"uring\" needs kvx built with liburing (link kvx::uring)"};
#endif
      }
      return error{errc::invalid_argument, "config field '" + t.path_of("io") + "': \"" + *io + "\" is not an I/O backend (pread, uring)"};
    }
    if (*kind == "cuda") {
#if KVX_WITH_CUDA
      KVX_TRY(t.allow_only({"kind", "name", "capacity", "high", "low", "allocator", "device", "lanes", "staging_chunk",
                            "stage_loads"}));
      cuda_tier_config c;
      auto n = t.optional<std::string>("name", "cuda");
      if (!n) return n.error();
      auto device = t.optional<int>("device", 0);
      if (!device) return device.error();
      auto lanes = t.optional<std::uint64_t>("lanes", 4);
      if (!lanes) return lanes.error();
      auto chunk = t.optional<config::bytes>("staging_chunk", config::bytes{1ULL << 20});
      if (!chunk) return chunk.error();
      auto stage_loads = t.optional<bool>("stage_loads", false);
      if (!stage_loads) return stage_loads.error();
      if (cuda::device_count() <= *device)
        return error{errc::not_supported, "config field '" + t.path_of("device") + "': no CUDA device " +
                                              std::to_string(*device) + " (" + cuda::skip_reason() + ")"};
      c.name = *n;
      c.capacity = capacity->value;
      c.marks = *marks;
      c.device = *device;
      c.lanes = static_cast<std::size_t>(*lanes);
      c.staging_chunk = chunk->value;
      c.stage_loads = *stage_loads;
      return guarded(t, [&] {
        return slab ? any_tier::make<cuda_tier<memory::slab_allocator>>(c) : any_tier::make<cuda_tier<>>(c);
      });
#else
      return error{errc::not_supported,
                   "config field '" + t.path_of("kind") + "': \"cuda\" needs kvx built with CUDA (link kvx::cuda)"};
#endif
    }
    return error{errc::invalid_argument,
                 "config field '" + t.path_of("kind") + "': \"" + *kind + "\" is not a tier kind (dram, file, cuda)"};
  }

  cache_type c_;
};

}  // namespace kvx::cache
