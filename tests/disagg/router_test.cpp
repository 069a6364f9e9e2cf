#include <kvx/disagg/router.hpp>

#include <kvx/disagg/router_policy.hpp>

#include <gtest/gtest.h>

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <utility>
#include <vector>

namespace kd = kvx::disagg;
using kvx::cache::block_key;
using kd::instance_role;
using outcome = kd::route_decision::outcome;

namespace {

std::vector<block_key> keys(std::uint64_t conversation, std::size_t n) {
  std::vector<block_key> k(n);
  for (std::size_t i = 0; i < n; ++i) k[i] = {conversation, i};
  return k;
}

kd::routing_request request(const std::vector<block_key>& k, std::uint32_t prompt) {
  return {.keys = k, .prompt_tokens = prompt, .block_tokens = 16, .kv_bytes_per_token = 1000};
}

kd::instance_spec prefill(std::string name, double speed = 1000) {
  // A slow fetch link by default, so that scenarios compare hits against
  // recomputation; the pool test sets a fast one.
  return {.name = std::move(name), .role = instance_role::prefill, .prefill_tokens_per_s = speed, .fetch_bytes_per_s = 1e5};
}
kd::instance_spec decode(std::string name, double step = 0.01, double per_token = 1e-5) {
  return {.name = std::move(name), .role = instance_role::decode, .decode_step_s = step, .decode_s_per_token = per_token};
}

struct not_a_policy {
  using router_policy_concept = kd::router_policy_tag;
  std::optional<std::size_t> pick_prefill(const kd::cluster_view&);
};

}  // namespace

static_assert(kd::router_policy<kd::routing::round_robin>);
static_assert(kd::router_policy<kd::routing::cache_aware>);
static_assert(!kd::router_policy<not_a_policy>);
static_assert(!kd::router_policy<int>);

TEST(PrefixIndex, CountsOnlyLeadingKeysPerLocation) {
  kd::prefix_index idx;
  const auto k = keys(1, 5);
  idx.on_stored(0, std::span(k).first(3));
  idx.on_stored(1, std::span(k).subspan(1));  // holds keys 1..4 but not key 0: useless
  idx.on_stored(kd::pool_location, k);
  auto hits = idx.longest_prefixes(k);
  EXPECT_EQ(hits.at(0), 3U);
  EXPECT_FALSE(hits.contains(1));
  EXPECT_EQ(hits.at(kd::pool_location), 5U);

  idx.on_evicted(kd::pool_location, std::span(k).subspan(2, 1));  // a hole at key 2
  EXPECT_EQ(idx.longest_prefixes(k).at(kd::pool_location), 2U);
  idx.on_dropped(0);
  EXPECT_FALSE(idx.longest_prefixes(k).contains(0));
  EXPECT_TRUE(idx.longest_prefixes(keys(2, 3)).empty());
}

TEST(PrefixIndex, StoringTwiceAndEvictingUnknownKeysAreHarmless) {
  kd::prefix_index idx;
  const auto k = keys(1, 2);
  idx.on_stored(0, k);
  idx.on_stored(0, k);
  idx.on_evicted(3, k);
  idx.on_evicted(0, keys(9, 2));
  EXPECT_EQ(idx.size(), 2U);
  idx.on_evicted(0, k);
  EXPECT_EQ(idx.size(), 0U);
}

TEST(Router, RoundRobinCyclesEachRoleAndSkipsDownInstances) {
  kd::router<kd::routing::round_robin> r;
  const auto p0 = r.add_instance(prefill("p0")).value();
  const auto p1 = r.add_instance(prefill("p1")).value();
  const auto d0 = r.add_instance(decode("d0")).value();
  const auto p2 = r.add_instance(prefill("p2")).value();
  const auto d1 = r.add_instance(decode("d1")).value();
  const auto k = keys(1, 1);
  std::vector<kd::instance_id> ps, ds;
  for (int i = 0; i < 4; ++i) {
    auto d = r.route(request(k, 20));
    ASSERT_TRUE(d.accepted()) << d.reason;
    ps.push_back(d.prefill);
    ds.push_back(d.decode);
  }
  EXPECT_EQ(ps, (std::vector<kd::instance_id>{p0, p1, p2, p0}));
  EXPECT_EQ(ds, (std::vector<kd::instance_id>{d0, d1, d0, d1}));
  ASSERT_TRUE(r.set_up(p1, false));
  EXPECT_EQ(r.route(request(k, 20)).prefill, p2);
  EXPECT_EQ(r.route(request(k, 20)).prefill, p0);
}

TEST(Router, LeastLoadedPicksTheShortestQueueAndTheFastestDecodeStep) {
  kd::router<kd::routing::least_loaded> r;
  const auto p0 = r.add_instance(prefill("p0")).value();
  const auto p1 = r.add_instance(prefill("p1")).value();
  const auto d0 = r.add_instance(decode("d0")).value();
  const auto d1 = r.add_instance(decode("d1")).value();
  ASSERT_TRUE(r.update_load(p0, {.queued_requests = 3, .queued_tokens = 3000}));
  ASSERT_TRUE(r.update_load(p1, {.queued_requests = 1, .queued_tokens = 500}));
  ASSERT_TRUE(r.update_load(d0, {.running_requests = 9, .running_tokens = 9000}));
  const auto k = keys(1, 2);
  auto d = r.route(request(k, 100));
  ASSERT_TRUE(d.accepted());
  EXPECT_EQ(d.prefill, p1);
  EXPECT_EQ(d.decode, d1);
  EXPECT_DOUBLE_EQ(d.ttft_s, (500 + 100) / 1000.0);
  // The router counted the request against p1 and d1 until they report.
  EXPECT_EQ(r.load(p1).queued_tokens, 600U);
  EXPECT_EQ(r.load(d1).running_tokens, 100U);
}

TEST(Router, CacheAwarePrefersTheInstanceHoldingThePrefixUntilItsQueueOutweighsIt) {
  kd::router<kd::routing::cache_aware> r;
  const auto p0 = r.add_instance(prefill("p0")).value();
  const auto p1 = r.add_instance(prefill("p1")).value();
  r.add_instance(decode("d0")).value();
  const auto k = keys(7, 60);  // 960 tokens of shared prefix
  ASSERT_TRUE(r.on_stored(p1, k));
  ASSERT_TRUE(r.update_load(p1, {.queued_requests = 1, .queued_tokens = 200}));
  // p0: 0.000 queue + 1000 tokens / 1000 = 1.0 s; p1: 0.2 s queue + 40 tokens = 0.24 s.
  auto d = r.route(request(k, 1000));
  ASSERT_TRUE(d.accepted());
  EXPECT_EQ(d.prefill, p1);
  EXPECT_EQ(d.cached_tokens, 960U);
  EXPECT_NEAR(d.ttft_s, 0.24, 1e-9);
  // Least-loaded would have picked p0 and recomputed everything.
  kd::router<kd::routing::least_loaded> blind;
  blind.add_instance(prefill("p0")).value();
  blind.add_instance(prefill("p1")).value();
  blind.add_instance(decode("d0")).value();
  ASSERT_TRUE(blind.on_stored(1, k));
  ASSERT_TRUE(blind.update_load(1, {.queued_requests = 1, .queued_tokens = 200}));
  EXPECT_EQ(blind.route(request(k, 1000)).prefill, 0U);

  // A long queue on p1 outweighs the hit: 1.5 s + 0.04 s > 1.0 s.
  ASSERT_TRUE(r.update_load(p1, {.queued_requests = 5, .queued_tokens = 1500}));
  d = r.route(request(k, 1000));
  EXPECT_EQ(d.prefill, p0);
  EXPECT_EQ(d.cached_tokens, 0U);
}

TEST(Router, FetchesAPrefixFromThePoolOnlyWhenThatBeatsRecomputing) {
  kd::router<kd::routing::cache_aware> r;
  auto fast = prefill("fast-link");
  fast.fetch_bytes_per_s = 1e9;  // 960 tokens * 1000 B: ~1 ms
  const auto p0 = r.add_instance(fast).value();
  r.add_instance(decode("d0")).value();
  const auto k = keys(3, 60);
  ASSERT_TRUE(r.on_stored(kd::pool_location, k));
  auto d = r.route(request(k, 1000));
  ASSERT_TRUE(d.accepted());
  EXPECT_EQ(d.prefill, p0);
  EXPECT_EQ(d.fetch_from, kd::pool_location);
  EXPECT_EQ(d.fetch_tokens, 960U);
  EXPECT_NEAR(d.ttft_s, 0.00096 + 0.04, 1e-9);

  kd::router<kd::routing::cache_aware> slow_r;
  auto slow = prefill("slow-link");
  slow.fetch_bytes_per_s = 1e5;  // 9.6 s to fetch: recompute (1 s) instead
  slow_r.add_instance(slow).value();
  slow_r.add_instance(decode("d0")).value();
  ASSERT_TRUE(slow_r.on_stored(kd::pool_location, k));
  d = slow_r.route(request(k, 1000));
  EXPECT_EQ(d.fetch_tokens, 0U);
  EXPECT_NEAR(d.ttft_s, 1.0, 1e-9);
}

TEST(Router, AFullyCachedPromptStillComputesItsLastToken) {
  kd::router<kd::routing::cache_aware> r;
  const auto p0 = r.add_instance(prefill("p0")).value();
  r.add_instance(decode("d0")).value();
  const auto k = keys(4, 4);
  ASSERT_TRUE(r.on_stored(p0, k));
  auto d = r.route(request(k, 64));
  EXPECT_EQ(d.cached_tokens, 63U);
  EXPECT_NEAR(d.ttft_s, 1.0 / 1000, 1e-12);
}

TEST(Router, RejectsEarlyWhenTheTtftOrTpotSloCannotBeMet) {
  kd::router<kd::routing::cache_aware> r;
  const auto p0 = r.add_instance(prefill("p0")).value();
  const auto d0 = r.add_instance(decode("d0", 0.01, 1e-5)).value();
  const auto k = keys(5, 10);
  auto d = r.route(request(k, 2000), {.ttft_s = 1.0});
  EXPECT_EQ(d.status, outcome::rejected_ttft);
  EXPECT_NE(d.reason.find("estimated TTFT 2.0"), std::string::npos) << d.reason;
  EXPECT_EQ(r.load(p0).queued_tokens, 0U);  // a rejected request costs nothing

  // Once p0 holds the prefix, the same request fits.
  ASSERT_TRUE(r.on_stored(p0, k));
  d = r.route(request(k, 2000), {.ttft_s = 2.0});
  EXPECT_TRUE(d.accepted());
  EXPECT_NEAR(d.ttft_s, 1.84, 1e-9);

  // 0.01 + 1e-5 * (10000 running + 2000 of this prompt) = 0.13 s > 0.1 s.
  ASSERT_TRUE(r.update_load(d0, {.running_requests = 8, .running_tokens = 10000}));
  d = r.route(request(k, 2000), {.ttft_s = 10, .tpot_s = 0.1});
  EXPECT_EQ(d.status, outcome::rejected_tpot);
  EXPECT_NE(d.reason.find("'d0'"), std::string::npos);
}

TEST(Router, SaysWhenNoInstanceCanServe) {
  kd::router<kd::routing::least_loaded> r;
  const auto k = keys(1, 1);
  EXPECT_EQ(r.route(request(k, 20)).status, outcome::no_instance);
  const auto p0 = r.add_instance(prefill("p0")).value();
  auto d = r.route(request(k, 20));
  EXPECT_EQ(d.status, outcome::no_instance);
  EXPECT_EQ(d.reason, "no decode instance is up");
  const auto both = r.add_instance({.name = "colocated", .role = instance_role::both}).value();
  d = r.route(request(k, 20));
  ASSERT_TRUE(d.accepted());
  EXPECT_EQ(d.decode, both);
  ASSERT_TRUE(r.set_up(p0, false));
  ASSERT_TRUE(r.set_up(both, false));
  EXPECT_EQ(r.route(request(k, 20)).reason, "no prefill instance is up");
}

TEST(Router, ADownInstanceLosesItsCachedPrefixes) {
  kd::router<kd::routing::cache_aware> r;
  const auto p0 = r.add_instance(prefill("p0")).value();
  const auto p1 = r.add_instance(prefill("p1")).value();
  r.add_instance(decode("d0")).value();
  const auto k = keys(6, 8);
  ASSERT_TRUE(r.on_stored(p1, k));
  EXPECT_EQ(r.route(request(k, 200)).prefill, p1);
  ASSERT_TRUE(r.set_up(p1, false));
  ASSERT_TRUE(r.set_up(p1, true));  // restarted, cold
  ASSERT_TRUE(r.update_load(p0, {}));
  ASSERT_TRUE(r.update_load(p1, {}));
  auto d = r.route(request(k, 200));
  EXPECT_EQ(d.prefill, p0);
  EXPECT_EQ(d.cached_tokens, 0U);
}

TEST(Router, BadCallsReturnErrors) {
  kd::router<kd::routing::round_robin> r;
  auto bad = prefill("zero", 0);
  auto a = r.add_instance(bad);
  ASSERT_FALSE(a);
  EXPECT_NE(a.error().message().find("'zero': prefill_tokens_per_s is 0.000000; it must be positive and finite"), std::string::npos)
      << a.error().message();
  EXPECT_EQ(r.update_load(4, {}).code(), kvx::errc::not_found);
  EXPECT_EQ(r.set_up(0, true).code(), kvx::errc::not_found);
  const auto k = keys(1, 2);
  EXPECT_EQ(r.on_stored(7, k).code(), kvx::errc::not_found);
}

TEST(Router, SpeedsAndTimesThatAreNotFiniteAreRefusedNamingTheField) {
  // A NaN decode time passed `< 0`: the first decode instance with it won
  // every pick (NaN never compares less) and passed every TPOT SLO.
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  kd::router<kd::routing::cache_aware> r;
  auto d = decode("nan-step");
  d.decode_step_s = nan;
  auto d2 = decode("nan-growth");
  d2.decode_s_per_token = -inf;
  auto p = prefill("inf-link");
  p.fetch_bytes_per_s = inf;  // every fetch free
  auto p2 = prefill("nan-speed", nan);
  const std::pair<kd::instance_spec, const char*> cases[] = {
      {d, "'nan-step': decode_step_s is nan"},
      {d2, "'nan-growth': decode_s_per_token is -inf"},
      {p, "'inf-link': fetch_bytes_per_s is inf"},
      {p2, "'nan-speed': prefill_tokens_per_s is nan"},
  };
  for (const auto& [spec, why] : cases) {
    auto a = r.add_instance(spec);
    ASSERT_FALSE(a) << why;
    EXPECT_EQ(a.code(), kvx::errc::invalid_argument);
    EXPECT_NE(a.error().message().find(why), std::string::npos) << a.error().message();
  }
  EXPECT_EQ(r.size(), 0U);
  EXPECT_THROW(kd::routing::cache_aware{nan}, std::invalid_argument);
  EXPECT_THROW(kd::routing::cache_aware{-1.0}, std::invalid_argument);
  EXPECT_NO_THROW(kd::routing::cache_aware{0.0});
}

TEST(Router, AStoreReportedForADownInstanceDoesNotMakeItAFetchSource) {
  // A late save callback from an instance already marked down.
  kd::router<kd::routing::cache_aware> r;
  auto fast = [](std::string n) {
    auto s = prefill(std::move(n));
    s.fetch_bytes_per_s = 1e9;
    return s;
  };
  r.add_instance(fast("p0")).value();
  const auto p1 = r.add_instance(fast("p1")).value();
  r.add_instance(decode("d0")).value();
  ASSERT_TRUE(r.set_up(p1, false));
  const auto k = keys(8, 60);
  ASSERT_TRUE(r.on_stored(p1, k));
  auto d = r.route(request(k, 1000));
  ASSERT_TRUE(d.accepted());
  EXPECT_EQ(d.fetch_tokens, 0U) << "fetch from the down instance " << d.fetch_from;
  EXPECT_NEAR(d.ttft_s, 1.0, 1e-9);
}

TEST(Router, AFreeFetchIsReportedAsTheFetchTheEstimateCounted) {
  // kv_bytes_per_token 0: a fetch costs nothing in the estimate. The
  // decision used to price the fetch (TTFT 0.04 s) and report none (0: "recompute instead"), so the
  // SLO was checked against work never ordered.
  kd::router<kd::routing::cache_aware> r;
  const auto p0 = r.add_instance(prefill("p0")).value();
  r.add_instance(decode("d0")).value();
  const auto k = keys(3, 60);
  ASSERT_TRUE(r.on_stored(kd::pool_location, k));
  auto req = request(k, 1000);
  req.kv_bytes_per_token = 0;
  auto d = r.route(req, {.ttft_s = 0.5});
  ASSERT_TRUE(d.accepted()) << d.reason;
  EXPECT_EQ(d.fetch_tokens, 960U);
  EXPECT_EQ(d.fetch_from, kd::pool_location);
  EXPECT_NEAR(d.ttft_s, 0.04, 1e-9);
  EXPECT_EQ(r.load(p0).queued_tokens, 40U) << "the queue holds what is left to compute after the fetch";
}

TEST(Router, RejectsARequestWhoseKeysDoNotFitItsPrompt) {
  kd::router<kd::routing::least_loaded> r;
  r.add_instance({.name = "colocated"}).value();
  const auto k = keys(1, 3);
  auto d = r.route(request(k, 40));  // 3 keys of 16 tokens need 48 tokens
  EXPECT_EQ(d.status, outcome::invalid_request);
  EXPECT_NE(d.reason.find("3 keys of 16 tokens for a prompt of 40"), std::string::npos) << d.reason;
  EXPECT_EQ(r.route(request({}, 0)).status, outcome::invalid_request);
  EXPECT_TRUE(r.route(request(k, 48)).accepted());
}
