// expect: kvx: allocator A lacks deallocate
#include <kvx/memory/allocator.hpp>

struct bump {
  using allocator_concept = kvx::memory::allocator_tag;
  explicit bump(std::uint64_t) {}
  std::optional<kvx::memory::allocation> allocate(std::uint64_t, std::uint64_t);
  std::uint64_t capacity() const;
  std::uint64_t free_bytes() const;
  std::uint64_t largest_free_block() const;
};
static_assert(kvx::memory::check_allocator<bump>());
