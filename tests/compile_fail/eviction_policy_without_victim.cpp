// expect: kvx: eviction policy P lacks victim
#include <kvx/cache/eviction_policy.hpp>

struct fifo {
  using eviction_policy_concept = kvx::cache::eviction_policy_tag;
  explicit fifo(std::size_t) {}
  void on_insert(const kvx::cache::block_key&, const kvx::cache::access_context&);
  void on_hit(const kvx::cache::block_key&, const kvx::cache::access_context&);
  void on_erase(const kvx::cache::block_key&);
  std::size_t size() const;
};
static_assert(kvx::cache::check_eviction_policy<fifo>());
