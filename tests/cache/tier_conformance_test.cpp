// The tier conformance suite on every host tier kvx ships (the io_uring and
// GPU tiers run it in their own executables).
#include <kvx/testing/tier_conformance.hpp>

#include <kvx/cache/tiers/dram_tier.hpp>
#include <kvx/cache/tiers/file_tier.hpp>
#include <kvx/memory/slab_allocator.hpp>

namespace {

namespace kc = kvx::cache;

template <class Allocator>
struct dram_factory {
  using tier_type = kc::dram_tier<Allocator>;
  static std::unique_ptr<tier_type> make(std::uint64_t capacity) {
    kc::dram_tier_config c;
    // Slabs are 1 MiB, one size class each: give every class used here a slab.
    c.capacity = std::is_same_v<Allocator, kvx::memory::slab_allocator> ? 16 * capacity : capacity;
    return std::make_unique<tier_type>(c);
  }
};

template <class Allocator>
struct file_factory {
  using tier_type = kc::file_tier<Allocator>;
  static std::unique_ptr<tier_type> make(std::uint64_t capacity) {
    kc::file_tier_config c;
    c.path = KVX_BINARY_DIR;  // an anonymous file in the build tree
    c.capacity = capacity;
    return std::make_unique<tier_type>(c);
  }
};

}  // namespace

KVX_INSTANTIATE_TIER_CONFORMANCE(DramTier, dram_factory<kvx::memory::offset_allocator>);
KVX_INSTANTIATE_TIER_CONFORMANCE(DramSlabTier, dram_factory<kvx::memory::slab_allocator>);
KVX_INSTANTIATE_TIER_CONFORMANCE(FileTier, file_factory<kvx::memory::offset_allocator>);
