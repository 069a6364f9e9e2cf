#include <kvx/testing/eviction_conformance.hpp>

// The custom policy of examples/10_custom_eviction_policy.cpp, without its main.
#define KVX_EXAMPLE_NO_MAIN 1
#include "../../examples/10_custom_eviction_policy.cpp"

KVX_INSTANTIATE_EVICTION_CONFORMANCE(CustomExample, demo::oldest_leaf_first);
