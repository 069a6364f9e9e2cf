#pragma once
//! \file
//! `eviction_conformance<P>`: the typed GoogleTest suite every eviction policy
//! must pass; run it on your own policy:
//!
//! \code
//! #include <kvx/testing/eviction_conformance.hpp>
//! KVX_INSTANTIATE_EVICTION_CONFORMANCE(MyPolicy, my::fifo_policy);
//! \endcode
//!
//! It checks the concept (with the sentences of `check_eviction_policy`),
//! that victims are tracked keys that stop being tracked, that pinned keys are
//! skipped but kept, that `on_erase` stops tracking (and ignores unknown
//! keys), and, under a random mix of operations, that the policy agrees with a
//! model set. Needs GoogleTest (link GTest::gtest_main).

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <random>
#include <set>
#include <vector>

#include <gtest/gtest.h>

#include <kvx/cache/eviction_policy.hpp>

namespace kvx::testing {

template <class P>
class eviction_conformance : public ::testing::Test {
 protected:
  static cache::block_key key(std::uint64_t i) { return cache::block_key{0x6b7678ULL, i}; }
  static constexpr auto all = [](const cache::block_key&) { return true; };
};

TYPED_TEST_SUITE_P(eviction_conformance);

TYPED_TEST_P(eviction_conformance, SatisfiesTheConcept) {
  static_assert(cache::check_eviction_policy<TypeParam>());
  SUCCEED();
}

TYPED_TEST_P(eviction_conformance, EmptyPolicyHasNoVictim) {
  TypeParam p(16);
  EXPECT_EQ(p.size(), 0u);
  EXPECT_EQ(p.victim(this->all), std::nullopt);
}

TYPED_TEST_P(eviction_conformance, VictimsAreEachInsertedKeyOnceThenNone) {
  TypeParam p(8);
  std::set<cache::block_key> inserted;
  for (std::uint64_t i = 0; i < 8; ++i) {
    p.on_insert(this->key(i), cache::access_context{i, i + 100, 4096, nullptr});
    inserted.insert(this->key(i));
  }
  EXPECT_EQ(p.size(), 8u);
  std::set<cache::block_key> evicted;
  for (std::size_t n = 8; n > 0; --n) {
    auto v = p.victim(this->all);
    ASSERT_TRUE(v.has_value()) << "policy ran out of victims with " << n << " keys tracked";
    EXPECT_TRUE(inserted.count(*v)) << "victim was never inserted";
    EXPECT_TRUE(evicted.insert(*v).second) << "victim returned twice";
    EXPECT_EQ(p.size(), n - 1);
  }
  EXPECT_EQ(p.victim(this->all), std::nullopt);
}

TYPED_TEST_P(eviction_conformance, PinnedKeysAreSkippedButKept) {
  TypeParam p(10);
  for (std::uint64_t i = 0; i < 10; ++i) p.on_insert(this->key(i), cache::access_context{i, 1000 - i});
  auto even_pinned = [](const cache::block_key& k) { return k.lo % 2 == 1; };
  for (int n = 0; n < 5; ++n) {
    auto v = p.victim(even_pinned);
    ASSERT_TRUE(v.has_value());
    EXPECT_EQ(v->lo % 2, 1u) << "a pinned key was evicted";
  }
  EXPECT_EQ(p.victim(even_pinned), std::nullopt) << "only pinned keys are left";
  EXPECT_EQ(p.size(), 5u) << "pinned keys must stay tracked";
  for (int n = 0; n < 5; ++n) {
    auto v = p.victim(this->all);
    ASSERT_TRUE(v.has_value()) << "pinned keys were dropped";
    EXPECT_EQ(v->lo % 2, 0u);
  }
  EXPECT_EQ(p.size(), 0u);
}

TYPED_TEST_P(eviction_conformance, EraseStopsTrackingAndIgnoresUnknownKeys) {
  TypeParam p(4);
  for (std::uint64_t i = 0; i < 4; ++i) p.on_insert(this->key(i), cache::access_context{i});
  p.on_erase(this->key(2));
  p.on_erase(this->key(99));
  EXPECT_EQ(p.size(), 3u);
  for (int n = 0; n < 3; ++n) {
    auto v = p.victim(this->all);
    ASSERT_TRUE(v.has_value());
    EXPECT_NE(*v, this->key(2)) << "an erased key came back as a victim";
  }
  EXPECT_EQ(p.victim(this->all), std::nullopt);
}

TYPED_TEST_P(eviction_conformance, RandomOperationsAgreeWithAModelSet) {
  constexpr std::size_t capacity = 32;
  TypeParam p(capacity);
  std::set<cache::block_key> model;
  std::mt19937_64 rng(42);
  std::uint64_t now = 0;
  for (int step = 0; step < 4000; ++step) {
    const auto k = this->key(rng() % 96);
    const auto parent = this->key(rng() % 96);
    const cache::access_context ctx{++now, now + rng() % 500, 4096, (rng() % 2) ? &parent : nullptr};
    const auto op = rng() % 10;
    if (op < 7) {
      if (model.count(k)) {
        p.on_hit(k, ctx);
        continue;
      }
      if (model.size() >= capacity) {
        const std::uint64_t pin = rng() % 4;
        auto evictable = [&](const cache::block_key& c) { return c.lo % 4 != pin; };
        auto v = p.victim(evictable);
        if (!v) {
          EXPECT_TRUE(std::none_of(model.begin(), model.end(), evictable)) << "no victim although one was evictable";
          continue;
        }
        ASSERT_TRUE(model.count(*v)) << "victim is not tracked";
        ASSERT_TRUE(evictable(*v)) << "victim is pinned";
        model.erase(*v);
      }
      p.on_insert(k, ctx);
      model.insert(k);
    } else if (op < 9) {
      p.on_erase(k);
      model.erase(k);
    } else if (auto v = p.victim(this->all)) {
      ASSERT_TRUE(model.count(*v)) << "victim is not tracked";
      model.erase(*v);
    } else {
      EXPECT_TRUE(model.empty());
    }
    ASSERT_EQ(p.size(), model.size());
  }
}

REGISTER_TYPED_TEST_SUITE_P(eviction_conformance, SatisfiesTheConcept, EmptyPolicyHasNoVictim,
                            VictimsAreEachInsertedKeyOnceThenNone, PinnedKeysAreSkippedButKept,
                            EraseStopsTrackingAndIgnoresUnknownKeys, RandomOperationsAgreeWithAModelSet);

}  // namespace kvx::testing

//! Runs the conformance suite on each policy type given, under test-name prefix `Name`.
#define KVX_INSTANTIATE_EVICTION_CONFORMANCE(Name, ...)                                 \
  namespace kvx::testing {                                                             \
  using eviction_conformance_types_##Name = ::testing::Types<__VA_ARGS__>;             \
  INSTANTIATE_TYPED_TEST_SUITE_P(Name, eviction_conformance, eviction_conformance_types_##Name); \
  }                                                                                    \
  static_assert(true, "")
