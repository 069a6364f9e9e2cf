// expect: kvx: placement policy P lacks choose
#include <kvx/store/placement_policy.hpp>

struct everywhere {
  using placement_policy_concept = kvx::store::placement_policy_tag;
};
static_assert(kvx::store::check_placement_policy<everywhere>());
