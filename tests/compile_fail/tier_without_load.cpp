// expect: kvx: tier T lacks load
#include <kvx/cache/tier.hpp>

struct write_only_tier {
  using tier_concept = kvx::cache::tier_tag;
  static constexpr bool host_accessible = true;
  std::string_view name() const;
  std::uint64_t capacity() const;
  std::uint64_t used_bytes() const;
  kvx::cache::watermarks marks() const;
  kvx::result<void> store(const kvx::cache::block_key&, std::span<const std::byte>);
  bool erase(const kvx::cache::block_key&);
  bool contains(const kvx::cache::block_key&) const;
  std::optional<std::uint64_t> size_of(const kvx::cache::block_key&) const;
};
static_assert(kvx::cache::check_tier<write_only_tier>());
