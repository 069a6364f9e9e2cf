#include <kvx/disagg/planner/simulator.hpp>

#include <kvx/cache/trace.hpp>
#include <kvx/disagg/planner/block_cache.hpp>
#include <kvx/disagg/planner/calibrate.hpp>
#include <kvx/disagg/planner/deployment.hpp>
#include <kvx/disagg/planner/hardware.hpp>
#include <kvx/disagg/planner/links.hpp>
#include <kvx/disagg/planner/model_shape.hpp>
#include <kvx/disagg/planner/search.hpp>
#include <kvx/disagg/planner/workload.hpp>

#include <gtest/gtest.h>

#include "../../benchmarks/kvx_plan/wake_probe.hpp"  // kvx-plan's probe: only its option checks here

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace kp = kvx::disagg::planner;
using kvx::cache::trace_request;
using status = kp::request_result::status;

namespace {

// One layer, one KV head of 500 dims in bf16: 2,000 KV bytes per token.
kp::model_shape small_model() { return {"small", 1, 1, 1, 500, 2, 1e6}; }

// 1,000 prompt tokens per second, 10 ms decode steps, 20 MB/s network (a
// 1,000-token prompt's KV takes 0.1 s to ship), no per-token decode cost.
kp::hardware simple_hardware() {
  kp::hardware h;
  h.name = "simple";
  h.prefill = {.tokens_per_s = 1000, .overhead_s = 0, .attention_s_per_pair = 0};
  h.decode = {.step_s = 0.01, .s_per_seq = 0, .s_per_token = 0, .max_batch = 8};
  h.kv_capacity_bytes = 1e9;
  h.network_bytes_per_s = 2e7;
  h.ssd_bytes_per_s = 1e7;
  h.price_per_hour = 1;
  return h;
}

trace_request req(std::uint64_t ms, std::uint64_t in, std::uint64_t out, std::vector<std::uint64_t> ids = {}) {
  return {ms, in, out, std::move(ids)};
}

kp::workload make_workload(const std::vector<trace_request>& t, std::uint32_t block_tokens = 256) {
  auto w = kp::workload::from_trace(t, {.block_tokens = block_tokens});
  EXPECT_TRUE(w) << w.error().message();
  return std::move(*w);
}

kp::sim_report run(const kp::workload& w, const kp::deployment& d, const kp::slo_target& s = {},
                   const kp::hardware& hw = simple_hardware()) {
  auto r = kp::simulate(w, small_model(), hw, d, s);
  EXPECT_TRUE(r) << r.error().message();
  return std::move(*r);
}

kp::deployment disagg(std::uint32_t p, std::uint32_t d) {
  return {.mode = kp::serving_mode::disaggregated, .prefill_instances = p, .decode_instances = d};
}

std::vector<std::uint64_t> ids(std::uint64_t first, std::size_t n) {
  std::vector<std::uint64_t> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = first + i;
  return v;
}

// Conversations that share a system prompt and grow turn by turn, with
// Poisson arrivals: a small Mooncake-like trace.
std::vector<trace_request> conversations(std::size_t n, double rate_per_s, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  auto uniform = [&] { return (static_cast<double>(rng() >> 11) + 0.5) / 9007199254740992.0; };
  std::vector<trace_request> t;
  std::vector<std::vector<std::uint64_t>> convs(8);
  std::uint64_t next_id = 1000, clock_ms = 0;
  for (std::size_t i = 0; i < n; ++i) {
    clock_ms += static_cast<std::uint64_t>(-std::log(uniform()) / rate_per_s * 1000);
    auto& c = convs[rng() % convs.size()];
    if (c.empty() || rng() % 5 == 0) c = {0};  // a new conversation after the shared system block
    const std::size_t grow = 1 + rng() % 3;
    for (std::size_t k = 0; k < grow; ++k) c.push_back(next_id++);
    const std::uint64_t in = c.size() * 256 - rng() % 200;
    t.push_back(req(clock_ms, in, 1 + rng() % 40, c));
  }
  return t;
}

}  // namespace

TEST(Planner, OneRequestTtftIsPrefillAndTpotIncludesTheKvTransfer) {
  const auto w = make_workload({req(0, 1000, 11)});
  const auto r = run(w, disagg(1, 1));
  ASSERT_EQ(r.completed, 1U);
  const auto& q = r.requests[0];
  EXPECT_NEAR(q.ttft_s(), 1.0, 1e-9);
  // 0.1 s of KV transfer, then 10 decode steps of 10 ms.
  EXPECT_NEAR(q.finish_s, 1.2, 1e-9);
  EXPECT_NEAR(q.tpot_s(), 0.02, 1e-9);
  EXPECT_EQ(q.computed_tokens, 1000U);
  EXPECT_NEAR(r.kv_transfer_bytes, 2e6, 1e-3);
  EXPECT_TRUE(r.meets_slo);
  EXPECT_DOUBLE_EQ(r.slo_attainment, 1.0);
}

TEST(Planner, TwoRequestsQueueBehindOnePrefillInstanceAndNotBehindTwo) {
  const auto w = make_workload({req(0, 1000, 1), req(0, 1000, 1)});
  const auto one = run(w, disagg(1, 1));
  EXPECT_NEAR(one.requests[0].ttft_s(), 1.0, 1e-9);
  EXPECT_NEAR(one.requests[1].ttft_s(), 2.0, 1e-9);
  const auto two = run(w, disagg(2, 1));
  EXPECT_NEAR(two.requests[0].ttft_s(), 1.0, 1e-9);
  EXPECT_NEAR(two.requests[1].ttft_s(), 1.0, 1e-9);
  EXPECT_NE(two.requests[0].prefill, two.requests[1].prefill);
}

TEST(Planner, DecodeBatchesAndAJoinMidIterationWaitsForTheNextStep) {
  kp::hardware hw = simple_hardware();
  hw.decode.s_per_seq = 0.005;  // a step is 15 ms alone, 20 ms for two
  const auto w = make_workload({req(0, 1000, 101), req(0, 1000, 11)});
  const auto r = run(w, disagg(1, 1), {}, hw);
  // Request 0 decodes from 1.1 s; request 1's KV lands at 2.1 s, inside step
  // 67 (ends 2.105 s), and joins there; it finishes after 10 steps of 20 ms;
  // request 0 has 23 steps of 15 ms left.
  EXPECT_NEAR(r.requests[1].finish_s, 2.105 + 0.2, 1e-9);
  EXPECT_NEAR(r.requests[0].finish_s, 2.305 + 23 * 0.015, 1e-9);
  EXPECT_NEAR(r.requests[1].tpot_s(), 0.0305, 1e-9);
}

TEST(Planner, DecodeStepTimeGrowsWithTheKvItReads) {
  kp::hardware hw = simple_hardware();
  hw.decode.s_per_token = 1e-5;
  const auto w = make_workload({req(0, 1000, 101)});
  const auto r = run(w, disagg(1, 1), {}, hw);
  // 100 steps over 1000, 1001, ... 1099 tokens of KV.
  EXPECT_NEAR(r.requests[0].finish_s - 1.1, 100 * 0.02 + 1e-5 * 4950, 1e-9);
}

TEST(Planner, ALocalPrefixHitSavesItsPrefillTime) {
  // The second request repeats the first's 4 blocks (1,024 tokens) and adds 512.
  const auto w = make_workload({req(0, 1024, 1, ids(1, 4)), req(5000, 1536, 1, ids(1, 6))});
  auto d = disagg(1, 1);
  const auto cold = run(w, d);
  EXPECT_NEAR(cold.requests[1].ttft_s(), 1.536, 1e-9);
  d.hbm_cache_gb = 0.1;
  const auto warm = run(w, d);
  EXPECT_NEAR(warm.requests[1].ttft_s(), 0.512, 1e-9);
  EXPECT_EQ(warm.requests[1].local_tokens, 1024U);
  EXPECT_EQ(warm.requests[1].computed_tokens, 512U);
  EXPECT_EQ(warm.local_tokens, 1024U);
}

TEST(Planner, APoolHitCostsItsTransferOverTheNetwork) {
  const auto w = make_workload({req(0, 1024, 1, ids(1, 4)), req(5000, 1536, 1, ids(1, 6))});
  auto d = disagg(1, 1);
  d.dram_gb = 0.1;
  const auto r = run(w, d);
  // 1,024 tokens * 2,000 bytes at 20 MB/s, then 512 tokens computed.
  EXPECT_NEAR(r.requests[1].ttft_s(), 0.1024 + 0.512, 1e-9);
  EXPECT_EQ(r.requests[1].dram_tokens, 1024U);
  EXPECT_NEAR(r.pool_read_bytes, 1024 * 2000.0, 1e-6);
}

TEST(Planner, BlocksDemotedToSsdAreFetchedAtSsdSpeed) {
  // DRAM holds 2 blocks: the first request's 4 blocks push 2 down to SSD.
  const auto w = make_workload({req(0, 1024, 1, ids(1, 4)), req(5000, 1536, 1, ids(1, 6))});
  auto d = disagg(1, 1);
  d.dram_gb = 2.5 * 256 * 2000 / 1e9;
  d.ssd_gb = 0.1;
  const auto r = run(w, d);
  const auto& q = r.requests[1];
  EXPECT_EQ(q.ssd_tokens, 512U);
  EXPECT_EQ(q.dram_tokens, 512U);
  // 512 tokens from SSD at 10 MB/s, 512 from DRAM at 20 MB/s, 512 computed.
  EXPECT_NEAR(q.ttft_s(), 0.1024 + 0.0512 + 0.512, 1e-9);
}

TEST(Planner, TheRouterRejectsEarlyWhenTheSloIsUnreachable) {
  const auto w = make_workload({req(0, 1000, 5)});
  const kp::slo_target tight{.ttft_s = 0.5, .tpot_s = 1};
  const auto r = run(w, disagg(1, 1), tight);
  EXPECT_EQ(r.rejected, 1U);
  EXPECT_EQ(r.requests[0].outcome, status::rejected_ttft);
  EXPECT_FALSE(r.meets_slo);
  EXPECT_TRUE(std::isinf(r.ttft_p90_s));
  auto no_reject = disagg(1, 1);
  no_reject.early_rejection = false;
  const auto late = run(w, no_reject, tight);
  EXPECT_EQ(late.completed, 1U);
  EXPECT_FALSE(late.meets_slo);
  EXPECT_DOUBLE_EQ(late.slo_attainment, 0.0);
}

TEST(Planner, ColocatedChunkedPrefillSlowsTheRunningDecode) {
  const auto w = make_workload({req(0, 1000, 101), req(1505, 4000, 1)});
  kp::deployment colo{.mode = kp::serving_mode::colocated, .prefill_instances = 1, .chunk_tokens = 500};
  const auto alone = run(make_workload({req(0, 1000, 101)}), colo);
  const auto shared = run(w, colo);
  EXPECT_NEAR(alone.requests[0].tpot_s(), 0.01, 1e-9);  // no transfer when colocated
  // 8 iterations carry a 0.5 s prefill chunk besides the decode step.
  EXPECT_NEAR(shared.requests[0].finish_s - alone.requests[0].finish_s, 8 * 0.5, 1e-9);
  EXPECT_EQ(shared.requests[1].decode, shared.requests[1].prefill);
}

TEST(Planner, PrefillQueueMatchesTheMD1Formula) {
  // Poisson arrivals at 0.7 per second, 1 s of prefill each: M/D/1 with
  // rho = 0.7, mean wait rho * D / (2 (1 - rho)) = 1.1667 s.
  std::mt19937_64 rng(7);
  std::vector<trace_request> t;
  double clock = 0;
  for (int i = 0; i < 20000; ++i) {
    clock += -std::log((static_cast<double>(rng() >> 11) + 0.5) / 9007199254740992.0) / 0.7;
    t.push_back(req(static_cast<std::uint64_t>(clock * 1000), 1000, 1));
  }
  const auto w = make_workload(t);
  auto d = disagg(1, 1);
  d.early_rejection = false;
  const auto r = run(w, d);
  double wait = 0;
  for (const auto& q : r.requests) wait += q.ttft_s() - 1.0;
  wait /= static_cast<double>(r.requests.size());
  EXPECT_NEAR(wait, 0.7 / (2 * 0.3), 0.1 * 0.7 / (2 * 0.3));
  EXPECT_NEAR(r.prefill_utilisation, 0.7, 0.03);
}

TEST(Planner, EveryRequestFinishesOrIsRejectedWithoutTimeTravelAndTokensAreConserved) {
  const auto w = make_workload(conversations(600, 3, 11));
  std::vector<kp::deployment> ds;
  for (const char* ev : {"lru", "s3fifo", "belady"}) {
    auto d = disagg(2, 2);
    d.hbm_cache_gb = 0.002;
    d.dram_gb = 0.004;
    d.ssd_gb = 0.02;
    d.eviction = ev;
    ds.push_back(d);
  }
  ds.push_back({.mode = kp::serving_mode::colocated, .prefill_instances = 3, .hbm_cache_gb = 0.003});
  auto rr = disagg(3, 1);
  rr.routing = "round_robin";
  rr.dram_gb = 0.01;
  ds.push_back(rr);
  for (const auto& d : ds) {
    SCOPED_TRACE(d.label());
    const auto r = run(w, d, {.ttft_s = 3, .tpot_s = 0.05});
    EXPECT_EQ(r.completed + r.rejected, w.size());
    std::uint64_t cached = 0;
    for (std::size_t i = 0; i < w.size(); ++i) {
      const auto& q = r.requests[i];
      if (!q.completed()) continue;
      EXPECT_GE(q.first_token_s, q.arrival_s);
      EXPECT_GE(q.finish_s, q.first_token_s);
      EXPECT_EQ(q.computed_tokens + q.local_tokens + q.peer_tokens + q.dram_tokens + q.ssd_tokens, q.input_tokens);
      EXPECT_GE(q.computed_tokens, 1U);
      cached += q.input_tokens - q.computed_tokens;
    }
    EXPECT_GT(cached, 0U) << "shared prefixes must hit";
    // The same inputs give the same answer.
    const auto again = run(w, d, {.ttft_s = 3, .tpot_s = 0.05});
    EXPECT_EQ(again.ttft_p90_s, r.ttft_p90_s);
    EXPECT_EQ(again.tpot_p99_s, r.tpot_p99_s);
    EXPECT_EQ(again.events, r.events);
  }
}

TEST(Planner, ACacheAwareRouterWithAPoolPrefillsLessThanARoundRobinWithout) {
  const auto w = make_workload(conversations(400, 2, 5));
  auto blind = disagg(3, 1);
  blind.routing = "round_robin";
  auto aware = disagg(3, 1);
  aware.hbm_cache_gb = 0.002;
  aware.dram_gb = 0.05;
  const auto a = run(w, aware), b = run(w, blind);
  EXPECT_LT(a.computed_tokens, b.computed_tokens / 2);
}

TEST(Planner, BadInputIsAnErrorThatSaysWhy) {
  const auto w = make_workload({req(0, 100, 1)});
  auto d = disagg(1, 1);
  d.hbm_cache_gb = 0.1;
  d.eviction = "fifo-ish";
  auto r = kp::simulate(w, small_model(), simple_hardware(), d, {});
  ASSERT_FALSE(r);
  EXPECT_NE(r.error().message().find("unknown eviction policy 'fifo-ish'"), std::string::npos);
  EXPECT_FALSE(kp::simulate(w, small_model(), simple_hardware(), disagg(1, 0), {}));
  auto bad_slo = kp::simulate(w, small_model(), simple_hardware(), disagg(1, 1), {.ttft_s = -1});
  EXPECT_FALSE(bad_slo);
  auto back = kp::workload::from_trace({req(10, 100, 1), req(5, 100, 1)});
  ASSERT_FALSE(back);
  EXPECT_NE(back.error().message().find("trace request 1"), std::string::npos);
  EXPECT_FALSE(kp::workload::from_trace({req(0, 100, 1, ids(0, 3))}, {.block_tokens = 64}));
  EXPECT_FALSE(kp::model_preset("llama-9"));
  const auto doc = kvx::config::parse(R"({"name": "x", "prefill": {"tokens_per_s": 1}})");
  auto hw = kp::hardware_from_config(kvx::config::view(*doc), *kp::model_preset("llama-3-8b"));
  ASSERT_FALSE(hw);
  EXPECT_NE(hw.error().message().find("kv_capacity_gb"), std::string::npos);
  const auto typo = kvx::config::parse(R"({"gpus": 8, "tflop_per_gpu": 1})");
  auto hw2 = kp::hardware_from_config(kvx::config::view(*typo), *kp::model_preset("llama-3-8b"));
  ASSERT_FALSE(hw2);
  EXPECT_NE(hw2.error().message().find("tflop_per_gpu"), std::string::npos);
}

TEST(Planner, RooflineOfA70bModelOnEightH100s) {
  const auto m = *kp::model_preset("llama-3-70b");
  EXPECT_EQ(m.kv_bytes_per_token(), 327680U);
  const auto doc = kvx::config::parse(
      R"({"name": "h100", "gpus": 8, "tflops_per_gpu": 989, "hbm_gb_per_gpu": 80, "hbm_tb_s_per_gpu": 3.35,
          "mfu": 0.5, "mbu": 0.5, "decode": {"max_batch": 64}})");
  auto hw = kp::hardware_from_config(kvx::config::view(*doc), m);
  ASSERT_TRUE(hw) << hw.error().message();
  EXPECT_NEAR(hw->prefill.tokens_per_s, 8 * 989e12 * 0.5 / (2 * 70.6e9), 1);
  EXPECT_NEAR(hw->decode.step_s, 70.6e9 * 2 / (8 * 3.35e12 * 0.5), 1e-12);
  EXPECT_EQ(hw->decode.max_batch, 64U);
  EXPECT_NEAR(hw->kv_capacity_bytes, 8 * 80e9 * 0.9 - 141.2e9, 1);
}

TEST(Planner, EachRequestDrawsItsOwnSpeedWithTheHardwaresSpreadAndRunsRepeat) {
  // 400 requests one at a time (no queueing, no sharing): 0.1 s prefill,
  // then 10 decode steps of 10 ms. With decode.cv 0.2 each request's steps
  // take 10 ms times its own factor: mean 1, spread 0.2; prefill.cv 0.1
  // likewise for TTFT. cv 0 is exactly the model.
  std::vector<trace_request> t;
  for (std::uint64_t i = 0; i < 400; ++i) t.push_back(req(i * 2000, 100, 11));
  const auto w = make_workload(t);
  auto hw = simple_hardware();
  const auto exact = run(w, disagg(1, 1), {}, hw);
  hw.prefill.cv = 0.1;
  hw.decode.cv = 0.2;
  const auto spread = run(w, disagg(1, 1), {}, hw);
  auto moments = [&](auto value) {
    double sum = 0, sq = 0;
    for (const auto& q : spread.requests) sum += value(q);
    const double mean = sum / 400;
    for (const auto& q : spread.requests) sq += (value(q) - mean) * (value(q) - mean);
    return std::pair{mean, std::sqrt(sq / 399) / mean};
  };
  const auto [step, step_cv] = moments([](const kp::request_result& q) { return (q.finish_s - q.first_step_s) / 9; });
  EXPECT_NEAR(step, 0.01, 0.0004);
  EXPECT_NEAR(step_cv, 0.2, 0.03);
  const auto [prefill, prefill_cv] = moments([](const kp::request_result& q) { return q.first_token_s - q.arrival_s; });
  EXPECT_NEAR(prefill, 0.1, 0.003);
  EXPECT_NEAR(prefill_cv, 0.1, 0.015);
  for (const auto& q : exact.requests) EXPECT_NEAR(q.first_token_s - q.arrival_s, 0.1, 1e-9);
  const auto again = run(w, disagg(1, 1), {}, hw);
  for (std::size_t i = 0; i < w.size(); ++i) EXPECT_EQ(again.requests[i].finish_s, spread.requests[i].finish_s) << i;
  // The spread is a hardware figure: read from a file, checked.
  const auto doc = kvx::config::parse(R"({"prefill": {"tokens_per_s": 1000, "cv": 0.1}, "decode": {"step_s": 0.01, "cv": 0.25},
                                          "kv_capacity_gb": 1})");
  auto parsed = kp::hardware_from_config(kvx::config::view(*doc), small_model());
  ASSERT_TRUE(parsed) << parsed.error().message();
  EXPECT_DOUBLE_EQ(parsed->prefill.cv, 0.1);
  EXPECT_DOUBLE_EQ(parsed->decode.cv, 0.25);
  hw.decode.cv = -0.1;
  EXPECT_NE(hw.validate().error().message().find("prefill.cv and decode.cv must be in [0, 2]"), std::string::npos);
}

TEST(PlannerBlockCache, EvictsWithTheRealPolicyAndNeverAPinnedBlock) {
  auto c = *kp::block_cache::make("lru", 2);
  const kvx::cache::block_key a{0, 1}, b{0, 2}, x{0, 3};
  EXPECT_TRUE(c.insert(a, {.now = 1}).inserted);
  EXPECT_TRUE(c.insert(b, {.now = 2}).inserted);
  c.pin(a);
  auto r = c.insert(x, {.now = 3});
  ASSERT_TRUE(r.evicted);
  EXPECT_EQ(*r.evicted, b);  // a is older but pinned
  c.pin(x);
  EXPECT_FALSE(c.insert(b, {.now = 4}).inserted);
  EXPECT_THROW(c.unpin(b), std::logic_error);
}

TEST(PlannerSearch, EnumerateCountsACachelessDeploymentOnce) {
  kp::search_space s{.modes = {kp::serving_mode::disaggregated, kp::serving_mode::colocated},
                     .prefill_instances = {1, 2},
                     .decode_instances = {1},
                     .dram_gb = {0, 10},
                     .evictions = {"lru", "s3fifo"}};
  // disagg: 2 counts * (1 cacheless + 2 policies); colocated sums {2, 3}: 2 * 3.
  EXPECT_EQ(kp::enumerate(s).size(), 12U);
}

TEST(PlannerSearch, FindsTheCheapestFeasibleInCostOrderAndStopsAfterTheRunnerUps) {
  std::vector<kp::deployment> grid;
  for (std::uint32_t p = 1; p <= 4; ++p)
    for (std::uint32_t d = 1; d <= 3; ++d) grid.push_back(disagg(p, d));
  // Feasible iff p >= 2 and d >= 2: the cheapest is 2P+2D (4 instances).
  std::vector<std::string> called;
  auto eval = [&](const kp::deployment& d) -> kvx::result<kp::sim_report> {
    called.push_back(d.label());
    kp::sim_report r;
    r.meets_slo = d.prefill_instances >= 2 && d.decode_instances >= 2;
    return r;
  };
  auto found = kp::search(grid, simple_hardware(), eval, {.runner_ups = 2});
  ASSERT_TRUE(found);
  ASSERT_TRUE(found->best);
  const auto& best = found->evaluated[*found->best].config;
  EXPECT_EQ(best.prefill_instances, 2U);
  EXPECT_EQ(best.decode_instances, 2U);
  ASSERT_EQ(found->runner_ups.size(), 2U);
  for (auto i : found->runner_ups) EXPECT_EQ(found->evaluated[i].config.instances(), 5U);
  EXPECT_LT(called.size(), grid.size());
  auto pure = [](const kp::deployment& d) -> kvx::result<kp::sim_report> {
    kp::sim_report r;
    r.meets_slo = d.prefill_instances >= 2 && d.decode_instances >= 2;
    return r;
  };
  auto all = kp::search(grid, simple_hardware(), pure, {.exhaustive = true, .jobs = 2});
  EXPECT_EQ(all->evaluated.size(), grid.size());
  EXPECT_EQ(all->evaluated[*all->best].config.label(), best.label());
}

TEST(PlannerSearch, MatchesBruteForceOverRealSimulations) {
  const auto w = make_workload(conversations(300, 1.2, 3));
  kp::search_space s{.modes = {kp::serving_mode::disaggregated, kp::serving_mode::colocated},
                     .prefill_instances = {1, 2, 3},
                     .decode_instances = {1, 2},
                     .dram_gb = {0, 0.2},
                     .evictions = {"lru"}};
  const kp::slo_target slo{.ttft_s = 4, .tpot_s = 0.05};
  auto hw = simple_hardware();
  hw.network_bytes_per_s = 2e8;
  auto eval = [&](const kp::deployment& d) { return kp::simulate(w, small_model(), hw, d, slo); };
  auto fast = kp::search(kp::enumerate(s), hw, eval, {.runner_ups = 1});
  auto brute = kp::search(kp::enumerate(s), hw, eval, {.exhaustive = true, .jobs = 2});
  ASSERT_TRUE(fast && brute);
  ASSERT_TRUE(brute->best);
  double cheapest = 1e300;
  std::string label;
  for (const auto& c : brute->evaluated)
    if (c.report.meets_slo && c.report.cost_per_hour < cheapest) {
      cheapest = c.report.cost_per_hour;
      label = c.config.label();
    }
  ASSERT_TRUE(fast->best);
  EXPECT_EQ(fast->evaluated[*fast->best].config.label(), label);
  EXPECT_DOUBLE_EQ(fast->evaluated[*fast->best].report.cost_per_hour, cheapest);
  EXPECT_LT(fast->evaluated.size(), brute->evaluated.size());
  // Not everything is feasible: the SLO binds.
  EXPECT_FALSE(brute->evaluated.front().report.meets_slo);
}

// ---- closed-loop replay, decode start, shared cores -------------------------------

namespace {
kp::workload closed_workload(const std::vector<trace_request>& t, std::uint32_t concurrency) {
  kp::workload_options o;
  o.block_tokens = 256;
  o.concurrency = concurrency;
  auto w = kp::workload::from_trace(t, o);
  EXPECT_TRUE(w) << w.error().message();
  return std::move(*w);
}
}  // namespace

TEST(Planner, AClosedLoopSendsTheNextRequestWhenOneFinishes) {
  // Timestamps 10 s apart are ignored: one request in flight at a time.
  const std::vector<trace_request> t{req(0, 1000, 1), req(10000, 1000, 1), req(20000, 1000, 1)};
  const auto one = run(closed_workload(t, 1), disagg(2, 1));
  for (std::size_t i = 0; i < 3; ++i) {
    EXPECT_NEAR(one.requests[i].arrival_s, static_cast<double>(i), 1e-9) << i;
    EXPECT_NEAR(one.requests[i].ttft_s(), 1.0, 1e-9) << i;
  }
  // Two in flight on one prefill instance: the third arrives when the first
  // finishes (1 s) and waits for the second (until 2 s).
  const auto two = run(closed_workload(t, 2), disagg(1, 1));
  EXPECT_NEAR(two.requests[1].arrival_s, 0.0, 1e-9);
  EXPECT_NEAR(two.requests[1].ttft_s(), 2.0, 1e-9);
  EXPECT_NEAR(two.requests[2].arrival_s, 1.0, 1e-9);
  EXPECT_NEAR(two.requests[2].first_token_s, 3.0, 1e-9);
  EXPECT_EQ(two.completed, 3U);
}

TEST(Planner, ARejectedRequestFreesItsClosedLoopSlot) {
  const std::vector<trace_request> t{req(0, 100000, 2), req(0, 1000, 2)};
  auto d = disagg(1, 1);
  const auto r = run(closed_workload(t, 1), d, {.ttft_s = 5, .ttft_percentile = 90, .tpot_s = 1, .tpot_percentile = 90});
  EXPECT_EQ(r.requests[0].outcome, status::rejected_ttft);
  ASSERT_TRUE(r.requests[1].completed());
  EXPECT_NEAR(r.requests[1].arrival_s, 0.0, 1e-9);
}

TEST(Planner, DecodeStartIsWhenTheKvHasArrivedAndAStepBegins) {
  const auto r = run(make_workload({req(0, 1000, 11)}), disagg(1, 1));
  EXPECT_NEAR(r.requests[0].decode_start_s, 1.1, 1e-9);  // prefill 1 s, KV 0.1 s
  EXPECT_NEAR(r.requests[0].finish_s - r.requests[0].decode_start_s, 10 * 0.01, 1e-9);
  const auto one_token = run(make_workload({req(0, 1000, 1)}), disagg(1, 1));
  EXPECT_NEAR(one_token.requests[0].decode_start_s, 1.0, 1e-9);
}

TEST(Planner, WorkIsCountedByHowManyInstancesComputeAtOnce) {
  // Two prefill instances busy together for 1 s, then one alone for 1 s.
  const auto r = run(make_workload({req(0, 1000, 1), req(0, 2000, 1)}), disagg(2, 1));
  ASSERT_GE(r.prefill_work_s.size(), 3U);
  EXPECT_NEAR(r.prefill_work_s[2], 2.0, 1e-9);
  EXPECT_NEAR(r.prefill_work_s[1], 1.0, 1e-9);
  EXPECT_NEAR(kp::work_weighted_slowdown(r.prefill_work_s, 1), (2.0 * 2 + 1.0 * 1) / 3, 1e-9);
  EXPECT_NEAR(kp::work_weighted_slowdown(r.prefill_work_s, 2), 1.0, 1e-12);
  EXPECT_NEAR(kp::work_weighted_slowdown({}, 1), 1.0, 1e-12);
}

TEST(Planner, InstancesSharingOneCoreRunAtItsShareAndWithEnoughCoresAtFullSpeed) {
  std::vector<trace_request> t;
  for (int i = 0; i < 40; ++i) t.push_back(req(0, 1000, 1));
  const auto w = closed_workload(t, 2);
  const auto alone = run(w, disagg(2, 1));
  auto enough = kp::simulate_shared_cores(w, small_model(), simple_hardware(), disagg(2, 1), {}, 2);
  ASSERT_TRUE(enough) << enough.error().message();
  EXPECT_DOUBLE_EQ(enough->prefill_slowdown, 1.0);
  EXPECT_NEAR(enough->report.makespan_s, alone.makespan_s, 1e-9);
  // Two prefill instances always busy on one core: each at half speed.
  auto shared = kp::simulate_shared_cores(w, small_model(), simple_hardware(), disagg(2, 1), {}, 1);
  ASSERT_TRUE(shared) << shared.error().message();
  EXPECT_NEAR(shared->prefill_slowdown, 2.0, 0.02);
  EXPECT_NEAR(shared->report.makespan_s, 2 * alone.makespan_s, 0.02 * alone.makespan_s);
  EXPECT_NEAR(shared->report.requests[0].ttft_s(), 2.0, 0.02);
  EXPECT_FALSE(kp::simulate_shared_cores(w, small_model(), simple_hardware(), disagg(2, 1), {}, 0));
}

kp::sim_report run_sharing(const kp::workload& w, const kp::deployment& d, const kp::core_timeline& cpu) {
  auto r = kp::simulate_processor_sharing(w, small_model(), simple_hardware(), d, {}, cpu);
  EXPECT_TRUE(r) << r.error().message();
  return std::move(*r);
}

TEST(PlannerSharing, InstancesComputingTogetherShareTheCoresEventByEvent) {
  // Prefills of 1 s and 2 s on two instances sharing one core: both at half
  // speed until the first ends at 2 s, then the second alone: 1 s more.
  const auto w = make_workload({req(0, 1000, 1), req(0, 2000, 1)});
  const auto one = run_sharing(w, disagg(2, 1), kp::core_timeline::constant(1));
  EXPECT_NEAR(one.requests[0].ttft_s(), 2.0, 1e-9);
  EXPECT_NEAR(one.requests[1].ttft_s(), 3.0, 1e-9);
  // Two cores: as with a core each.
  const auto two = run_sharing(w, disagg(2, 1), kp::core_timeline::constant(2));
  const auto alone = run(w, disagg(2, 1));
  for (std::size_t i = 0; i < 2; ++i) EXPECT_NEAR(two.requests[i].ttft_s(), alone.requests[i].ttft_s(), 1e-9) << i;
  // Half a core until 1 s, then a whole one: 0.5 s of the work done by 1 s,
  // the other 0.5 s by 1.5 s.
  const auto slow_start = run_sharing(make_workload({req(0, 1000, 1)}), disagg(1, 1), {{0.0, 1.0}, {0.5, 1.0}});
  EXPECT_NEAR(slow_start.requests[0].ttft_s(), 1.5, 1e-9);
}

TEST(PlannerSharing, ADecodeOverlappingAPrefillIsSlowerThanOneAlone) {
  // Request 0's prefill ends at 1 s and its KV lands at 1.1 s; request 1's
  // 2 s prefill starts at 1 s. On one core, request 0's 10 decode steps of
  // 10 ms share it with that prefill: 0.2 s instead of 0.1 s, its first step
  // ending at 1.12 s. The prefill ran alone for 0.1 s, at half speed for
  // 0.2 s, and has 1.8 s left: it ends at 3.1 s. Request 2 decodes alone after.
  const auto w = make_workload({req(0, 1000, 11), req(1000, 2000, 1), req(3100, 1000, 11)});
  const auto r = run_sharing(w, disagg(1, 1), kp::core_timeline::constant(1));
  EXPECT_NEAR(r.requests[0].first_step_s, 1.12, 1e-9);
  EXPECT_NEAR(r.requests[0].finish_s, 1.3, 1e-9);
  EXPECT_NEAR(r.requests[1].first_token_s, 3.1, 1e-9);
  EXPECT_NEAR(r.requests[2].finish_s - r.requests[2].first_step_s, 9 * 0.01, 1e-9);
  EXPECT_NEAR(r.requests[0].finish_s - r.requests[0].first_step_s, 9 * 0.02, 1e-9);
  // With a core each, the first step ends one step after the KV landed.
  const auto alone = run(w, disagg(1, 1));
  EXPECT_NEAR(alone.requests[0].first_step_s, 1.11, 1e-9);
  EXPECT_NEAR(alone.requests[1].first_step_s, alone.requests[1].first_token_s, 1e-12);  // one token: no decode
}

TEST(PlannerSharing, AnInstanceWokenFromIdleRunsItsWakeBurstAtAWholeCoreThenShares) {
  // One prefill of 1 s of work on half a core, with a 0.1 s wake-up burst:
  // 0.1 s of work by 0.1 s, the other 0.9 s at half speed, ending at 1.9 s
  // (2 s without the burst).
  const auto w = make_workload({req(0, 1000, 1)});
  auto cpu = kp::core_timeline::constant(0.5);
  EXPECT_NEAR(run_sharing(w, disagg(1, 1), cpu).requests[0].ttft_s(), 2.0, 1e-9);
  cpu.wake_burst_s = 0.1;
  EXPECT_NEAR(run_sharing(w, disagg(1, 1), cpu).requests[0].ttft_s(), 1.9, 1e-9);
  // At 0.8 of a core in the burst: 0.08 s of work by 0.1 s, the other 0.92 s
  // at half speed, ending at 1.94 s.
  cpu.wake_burst_speed = 0.8;
  EXPECT_NEAR(run_sharing(w, disagg(1, 1), cpu).requests[0].ttft_s(), 1.94, 1e-9);
}

TEST(PlannerSharing, ADecodeStepAfterIdleShorterThanTheBurstRunsAtFullSpeed) {
  // A 0.1 s prefill on half a core with a 0.05 s burst ends at 0.15 s; its
  // KV lands at 0.16 s on the idle decode instance, whose 10 ms step, inside
  // its burst, ends at 0.17 s: a whole core's speed (0.23 s without bursts).
  const auto w = make_workload({req(0, 100, 2)});
  auto cpu = kp::core_timeline::constant(0.5);
  cpu.wake_burst_s = 0.05;
  const auto r = run_sharing(w, disagg(1, 1), cpu);
  EXPECT_NEAR(r.requests[0].first_token_s, 0.15, 1e-9);
  EXPECT_NEAR(r.requests[0].first_step_s, 0.17, 1e-9);
  cpu.wake_burst_s = 0;
  EXPECT_NEAR(run_sharing(w, disagg(1, 1), cpu).requests[0].first_step_s, 0.21 + 0.02, 1e-9);
}

TEST(PlannerSharing, ABurstTakesTheCoreFromTheOthersAndConservesTheirWork) {
  // As in ADecodeOverlappingAPrefillIsSlowerThanOneAlone, with 0.05 s
  // bursts on one core: request 0's decode wakes at 1.1 s and runs 5 steps
  // alone by 1.15 s while the 2 s prefill (its own burst over at 1.05 s)
  // waits, then they share: 5 more steps at half speed end at 1.25 s (1.3 s
  // without bursts). The prefill got the same CPU: it still ends at 3.1 s.
  const auto w = make_workload({req(0, 1000, 11), req(1000, 2000, 1)});
  auto cpu = kp::core_timeline::constant(1);
  cpu.wake_burst_s = 0.05;
  const auto r = run_sharing(w, disagg(1, 1), cpu);
  EXPECT_NEAR(r.requests[0].first_step_s, 1.11, 1e-9);
  EXPECT_NEAR(r.requests[0].finish_s, 1.25, 1e-9);
  EXPECT_NEAR(r.requests[1].first_token_s, 3.1, 1e-9);
}

TEST(PlannerSharing, PerCoreRunQueuesGiveAWokenDecodeHalfACoreBesideOnePrefill) {
  // Two prefill instances and a decode on two cores. Request 0's 1 s prefill
  // ends at 1 s, its KV lands at 1.1 s; request 1's 4 s prefill runs from
  // 0 s on the other instance, request 2's 2 s one from 1 s on the first.
  // At 1.1 s the decode wakes beside two computing prefills, one per core:
  // it joins one of them at half a core, so its 10 steps of 10 ms take
  // 0.2 s (fluid sharing: two thirds of a core each, 0.15 s).
  const auto w = make_workload({req(0, 1000, 11), req(0, 4000, 1), req(1000, 2000, 1)});
  auto cpu = kp::core_timeline::constant(2);
  const auto fluid = run_sharing(w, disagg(2, 1), cpu);
  EXPECT_NEAR(fluid.requests[0].finish_s, 1.1 + 0.15, 1e-9);
  cpu.run_queues = 2;
  const auto queues = run_sharing(w, disagg(2, 1), cpu);
  EXPECT_NEAR(queues.requests[0].first_step_s, 1.12, 1e-9);
  EXPECT_NEAR(queues.requests[0].finish_s, 1.3, 1e-9);
  // It joined the first queue, request 2's prefill: that one lost 0.1 s of
  // work and ends at 3.1 s; request 1's kept its core and ends on time, at 4 s.
  EXPECT_NEAR(queues.requests[2].first_token_s, 3.1, 1e-9);
  EXPECT_NEAR(queues.requests[1].first_token_s, 4.0, 1e-9);
  // Work is conserved, and one queue per instance is a core each.
  EXPECT_NEAR(queues.prefill_busy_s, fluid.prefill_busy_s, 1e-9);
  cpu.run_queues = 3;
  const auto alone = run(w, disagg(2, 1));
  const auto three = run_sharing(w, disagg(2, 1), kp::core_timeline{{0.0}, {3.0}, 0, 1, 3});
  for (std::size_t i = 0; i < 3; ++i) EXPECT_NEAR(three.requests[i].finish_s, alone.requests[i].finish_s, 1e-9) << i;
}

TEST(PlannerSharing, AnIdleRunQueuePullsTheLastInstancePlacedOnTheLongest) {
  // Three prefills from 0 s on two cores: 3 s, 0.5 s and 3 s of work. The
  // first two take a queue each, the third joins the first (a tie goes to
  // the first queue): half a core each. At 0.5 s the short one ends and its
  // empty queue pulls the third: from then on both run at a whole core, with
  // 2.75 s of work left each, and end at 3.25 s (without pulling, at 6 s).
  const auto w = make_workload({req(0, 3000, 1), req(0, 500, 1), req(0, 3000, 1)});
  const auto r = run_sharing(w, disagg(3, 1), kp::core_timeline{{0.0}, {2.0}, 0, 1, 2});
  EXPECT_NEAR(r.requests[1].first_token_s, 0.5, 1e-9);
  EXPECT_NEAR(r.requests[0].first_token_s, 3.25, 1e-9);
  EXPECT_NEAR(r.requests[2].first_token_s, 3.25, 1e-9);
}

TEST(PlannerSharing, OtherProcessesRunOnTheCoreNoInstanceComputesOn) {
  // One core's worth of other processes on two cores: one instance alone
  // has the other core, as fast as alone; two instances leave the load no
  // core of its own (a core's worth: fluid), so both run at half a core, as
  // with fluid sharing, and not one whole and one half (1.5 cores for the
  // instances where 1 is free).
  const kp::core_timeline cpu{{0.0}, {1.0}, 0, 1, 2};
  const auto one = run_sharing(make_workload({req(0, 1000, 1)}), disagg(1, 1), cpu);
  EXPECT_NEAR(one.requests[0].first_token_s, 1.0, 1e-9);
  const auto w = make_workload({req(0, 1000, 1), req(0, 1000, 1)});
  const auto queues = run_sharing(w, disagg(2, 1), cpu);
  auto fluid_cpu = cpu;
  fluid_cpu.run_queues = 0;
  const auto fluid = run_sharing(w, disagg(2, 1), fluid_cpu);
  for (std::size_t i = 0; i < 2; ++i) {
    EXPECT_NEAR(queues.requests[i].first_token_s, 2.0, 1e-9) << i;
    EXPECT_NEAR(fluid.requests[i].first_token_s, 2.0, 1e-9) << i;
  }
}

TEST(PlannerSharing, HomelessLoadMixesPerCoreAndFluidSharingInProportion) {
  // Three prefills from 0 s on two cores (3 s, 0.5 s and 3 s of work), half
  // a core taken by other processes. The instances occupy both queues (two
  // on the first, one on the second), so the half core has none of its own:
  // per core, each queue keeps 0.75 of its core (0.375, 0.75, 0.375 per
  // instance); fluid, 1.5 / 3 = 0.5 each; mixed half and half: 0.4375,
  // 0.625, 0.4375 (1.5 cores in all). The short one ends at 0.5 / 0.625 =
  // 0.8 s; its queue pulls the third, and both remaining run at 0.75 (per
  // core and fluid agree) with 3 - 0.35 = 2.65 s of work left: 0.8 + 2.65 /
  // 0.75 = 4.3333 s. 6.5 s of work over 1.5 cores: the cores free are used
  // exactly.
  const auto w = make_workload({req(0, 3000, 1), req(0, 500, 1), req(0, 3000, 1)});
  const auto r = run_sharing(w, disagg(3, 1), kp::core_timeline{{0.0}, {1.5}, 0, 1, 2});
  EXPECT_NEAR(r.requests[1].first_token_s, 0.8, 1e-9);
  EXPECT_NEAR(r.requests[0].first_token_s, 0.8 + 2.65 / 0.75, 1e-9);
  EXPECT_NEAR(r.requests[2].first_token_s, 0.8 + 2.65 / 0.75, 1e-9);
  EXPECT_NEAR(6.5 / 1.5, r.requests[0].first_token_s, 1e-9);
}

TEST(PlannerSharing, EveryRequestFinishesInOrderAndWorkIsConservedWhileTheCoresChange) {
  // Cores changing every 0.25 s between 0.3 and 2.5, batched decode and
  // colocated chunked prefill: every request's events stay in order, the work
  // done is the same as with a core each, and the run takes longer.
  const auto w = make_workload(conversations(300, 3, 7));
  kp::core_timeline cpu;
  for (int i = 0; i < 400; ++i) {
    cpu.from_s.push_back(0.25 * i);
    cpu.cores.push_back(0.3 + 2.2 * ((i * 37) % 11) / 10.0);
  }
  // Fluid sharing without and with a wake-up burst, and per-core run queues.
  for (const auto& [burst, queues] : {std::pair{0.0, 0U}, std::pair{0.003, 0U}, std::pair{0.0, 2U}})
  for (const auto& d : {disagg(2, 2), kp::deployment{.mode = kp::serving_mode::colocated, .prefill_instances = 3}}) {
    SCOPED_TRACE(d.label() + ", wake burst " + std::to_string(burst) + ", run queues " + std::to_string(queues));
    cpu.wake_burst_s = burst;
    cpu.run_queues = queues;
    const auto r = run_sharing(w, d, cpu);
    const auto alone = run(w, d);
    ASSERT_EQ(r.completed, w.size());
    for (std::size_t i = 0; i < w.size(); ++i) {
      const auto& q = r.requests[i];
      EXPECT_GE(q.first_token_s, q.arrival_s) << i;
      if (q.output_tokens > 1) {
        EXPECT_GE(q.first_step_s, q.decode_start_s) << i;
        EXPECT_GE(q.decode_start_s, q.first_token_s) << i;
      }
      EXPECT_GE(q.finish_s, q.first_step_s) << i;
    }
    // Work done is the same: busy time counts work, not wall time.
    EXPECT_NEAR(r.prefill_busy_s, alone.prefill_busy_s, 1e-6 * alone.prefill_busy_s);
    EXPECT_GT(r.makespan_s, alone.makespan_s);
    const auto again = run_sharing(w, d, cpu);
    EXPECT_EQ(again.events, r.events);
    EXPECT_EQ(again.tpot_p90_s, r.tpot_p90_s);
  }
}

TEST(PlannerSharing, ABadCoreTimelineIsAnErrorThatSaysWhy) {
  const auto w = make_workload({req(0, 1000, 1)});
  auto bad = [&](const kp::core_timeline& c) {
    auto r = kp::simulate_processor_sharing(w, small_model(), simple_hardware(), disagg(1, 1), {}, c);
    EXPECT_FALSE(r);
    return r ? std::string{} : r.error().message();
  };
  EXPECT_NE(bad({}).find("at least one"), std::string::npos);
  EXPECT_NE(bad({{0.0, 1.0}, {1.0}}).find("as many"), std::string::npos);
  EXPECT_NE(bad(kp::core_timeline::constant(0)).find("not positive"), std::string::npos);
  EXPECT_NE(bad({{0.0, 1.0, 1.0}, {1.0, 2.0, 1.0}}).find("must increase"), std::string::npos);
  auto burst = kp::core_timeline::constant(1);
  burst.wake_burst_s = -0.001;
  EXPECT_NE(bad(burst).find("wake_burst_s"), std::string::npos);
  burst.wake_burst_s = std::numeric_limits<double>::infinity();
  EXPECT_NE(bad(burst).find("wake_burst_s"), std::string::npos);
  burst.wake_burst_s = 0.001;
  burst.wake_burst_speed = 0;
  EXPECT_NE(bad(burst).find("wake_burst_speed"), std::string::npos);
  burst.wake_burst_speed = 1.5;
  EXPECT_NE(bad(burst).find("wake_burst_speed"), std::string::npos);
  burst.wake_burst_speed = 1;
  burst.run_queues = 2;
  EXPECT_NE(bad(burst).find("wake_burst_s models fluid sharing; set run_queues to 0 with it"), std::string::npos);
  const kp::core_timeline c{{0.0, 1.0}, {0.5, 2.0}};
  EXPECT_DOUBLE_EQ(c.at(-1), 0.5);
  EXPECT_DOUBLE_EQ(c.at(0.99), 0.5);
  EXPECT_DOUBLE_EQ(c.at(1.0), 2.0);
}

TEST(PlannerSharing, TheWakeProbeRejectsOptionsOutOfRange) {
  // (It is not run here: it times the machine's scheduler.)
  auto bad = [](kp::wake_probe_options o) {
    auto r = kp::probe_wake_burst(o);
    EXPECT_FALSE(r);
    return r ? std::string{} : r.error().message();
  };
  EXPECT_NE(bad({.trials = 0}).find("trials >= 1"), std::string::npos);
  EXPECT_NE(bad({.sleep_s = -1}).find("sleep_s in [0, 1]"), std::string::npos);
  EXPECT_NE(bad({.cap_s = 50e-6}).find("gap_s < cap_s"), std::string::npos);
  EXPECT_NE(bad({.gap_s = 0}).find("0 < gap_s"), std::string::npos);
}

TEST(Planner, APoolDramTierSlowerThanTheNetworkSetsTheFetchTime) {
  const auto w = make_workload({req(0, 1024, 1, ids(1, 4)), req(5000, 1536, 1, ids(1, 6))});
  auto d = disagg(1, 1);
  d.dram_gb = 0.1;
  auto hw = simple_hardware();
  hw.dram_bytes_per_s = 1e7;  // half the network
  const auto r = run(w, d, {}, hw);
  EXPECT_NEAR(r.requests[1].ttft_s(), 0.2048 + 0.512, 1e-9);
  const auto doc = kvx::config::parse(R"({"prefill": {"tokens_per_s": 1000}, "decode": {"step_s": 0.01},
                                          "kv_capacity_gb": 1, "dram_gb_s": 7})");
  auto parsed = kp::hardware_from_config(kvx::config::view(*doc), small_model());
  ASSERT_TRUE(parsed) << parsed.error().message();
  EXPECT_DOUBLE_EQ(parsed->dram_bytes_per_s, 7e9);
}

// ---- link figures from kvx's benchmarks -------------------------------------------

namespace {
std::string bench_line(const std::string& transport, const std::string& op, std::uint64_t block, double gbps,
                       int errors = 0) {
  return R"({"transport":")" + transport + R"(","op":")" + op + R"(","block_size":)" + std::to_string(block) +
         R"(,"batch_size":16,"threads":1,"duration_s":1,"gbps":)" + std::to_string(gbps) + R"(,"errors":)" +
         std::to_string(errors) + "}";
}
}  // namespace

TEST(PlannerLinks, TransferBenchResultsSetTheNetworkAndDramAndFileTierBenchTheSsd) {
  const std::string text = bench_line("tcp", "read", 65536, 2.6) + "\n" + bench_line("tcp", "write", 65536, 1.7) + "\n" +
                           bench_line("tcp", "read", 1 << 20, 2.9) + "\n\n" + bench_line("shm", "read", 65536, 30) +
                           "\n" + bench_line("local", "read", 65536, 32) + "\n" + bench_line("local", "read", 1 << 20, 13) +
                           "\n";
  auto m = kp::read_link_measurements(text, "links.jsonl");
  ASSERT_TRUE(m) << m.error().message();
  ASSERT_EQ(m->size(), 6U);
  // A 64 KiB KV block: the 64 KiB results, the slower of tcp read and write.
  auto f = kp::choose_links(*m, 65536);
  ASSERT_TRUE(f) << f.error().message();
  ASSERT_TRUE(f->network && f->dram);
  EXPECT_FALSE(f->ssd);
  EXPECT_EQ(f->network->transport, "tcp");
  EXPECT_DOUBLE_EQ(f->network->bytes_per_s, 1.7e9);
  EXPECT_DOUBLE_EQ(f->dram->bytes_per_s, 32e9);
  EXPECT_NE(f->network->describe().find("links.jsonl line 2"), std::string::npos);
  // A 2 MiB block: the 1 MiB results.
  auto big = kp::choose_links(*m, 2 << 20);
  ASSERT_TRUE(big);
  EXPECT_DOUBLE_EQ(big->network->bytes_per_s, 2.9e9);
  EXPECT_DOUBLE_EQ(big->dram->bytes_per_s, 13e9);
  auto shm = kp::choose_links(*m, 65536, "shm");
  ASSERT_TRUE(shm);
  EXPECT_DOUBLE_EQ(shm->network->bytes_per_s, 30e9);
  auto ucx = kp::choose_links(*m, 65536, "ucx");
  ASSERT_FALSE(ucx);
  EXPECT_NE(ucx.error().message().find("'ucx' was not measured (network transports measured: tcp, shm)"), std::string::npos);

  auto tier = kp::read_link_measurements(
      R"({"block_bytes":65536,"blocks":512,"depth":32,"reference_bytes_per_s":6e8,"pread":{"bytes_per_s":6.8e8},"uring":{"bytes_per_s":1.4e9}})",
      "file_tier.json");
  ASSERT_TRUE(tier) << tier.error().message();
  auto with_ssd = kp::choose_links(*tier, 65536);
  ASSERT_TRUE(with_ssd && with_ssd->ssd);
  EXPECT_EQ(with_ssd->ssd->transport, "uring");
  EXPECT_FALSE(with_ssd->network);

  kp::hardware hw = simple_hardware();
  kp::apply_links(hw, *f);
  EXPECT_DOUBLE_EQ(hw.network_bytes_per_s, 1.7e9);
  EXPECT_DOUBLE_EQ(hw.dram_bytes_per_s, 32e9);
  EXPECT_DOUBLE_EQ(hw.ssd_bytes_per_s, simple_hardware().ssd_bytes_per_s);  // not measured: kept

  // One object (transfer_bench --json) and an array read too.
  auto one = kp::read_link_measurements(bench_line("ucx", "write", 1 << 20, 20), "ucx.json");
  ASSERT_TRUE(one);
  auto arr = kp::read_link_measurements("[" + bench_line("ucx", "write", 1 << 20, 20) + "," + bench_line("tcp", "read", 4096, 1) + "]", "a.json");
  ASSERT_TRUE(arr);
  ASSERT_EQ(arr->size(), 2U);
  auto pref = kp::choose_links(*arr, 65536);
  ASSERT_TRUE(pref);
  EXPECT_EQ(pref->network->transport, "ucx");  // ucx before tcp
}

TEST(PlannerLinks, MalformedResultsAreErrorsThatSayWhereAndWhy) {
  auto msg = [](const std::string& text) {
    auto r = kp::read_link_measurements(text, "f.json");
    EXPECT_FALSE(r);
    return r ? std::string() : r.error().message();
  };
  EXPECT_NE(msg(bench_line("tcp", "read", 65536, 2) + "\n{oops").find("f.json line 2: not JSON"), std::string::npos);
  EXPECT_NE(msg(bench_line("tcp", "read", 65536, 2, 3)).find("had 3 failed transfers"), std::string::npos);
  for (const char* errors : {"1e30", "1.5", "-1", "\"3\""})
    EXPECT_NE(msg(std::string(R"({"transport":"tcp","op":"read","block_size":65536,"gbps":2,"errors":)") + errors + "}")
                  .find("f.json (transfer_bench): 'errors' is not a whole number >= 0"),
              std::string::npos)
        << errors;
  EXPECT_NE(msg(R"({"transport":"tcp","op":"read","block_size":65536})").find("'gbps' is missing or not a positive number"),
            std::string::npos);
  EXPECT_NE(msg(R"({"transport":"rdma","op":"read","block_size":1,"gbps":1})").find("unknown transport 'rdma'"),
            std::string::npos);
  EXPECT_NE(msg(R"({"model":"llama"})").find("f.json: neither a transfer_bench result"), std::string::npos);
  EXPECT_NE(msg(R"([{"block_bytes":4096,"pread":{}}])").find("f.json entry 1 (file_tier_bench) pread: 'bytes_per_s'"),
            std::string::npos);
  EXPECT_NE(msg("[]").find("f.json: no measurements"), std::string::npos);
  EXPECT_NE(msg("\n\n").find("no measurements"), std::string::npos);
}

// ---- fit_compute_speed (calibrate.hpp) -------------------------------------------

namespace {
// Timings an engine of exactly these coefficients would report.
std::vector<kp::compute_sample> timed_by(double tokens_per_s, double per_pair, double per_seq, double per_token,
                                         std::initializer_list<std::pair<std::uint32_t, std::uint32_t>> prompts_outputs) {
  std::vector<kp::compute_sample> s;
  for (auto [prompt, out] : prompts_outputs) {
    const double n = prompt, steps = out - 1, kv = steps * prompt + steps * (steps + 1) / 2;
    s.push_back({.prompt_tokens = prompt, .cached_tokens = 0,
                 .prefill_cpu_s = n / tokens_per_s + per_pair * n * (n / 2),
                 .decode_steps = out - 1, .decode_kv_tokens = kv, .decode_cpu_s = steps * per_seq + per_token * kv});
  }
  return s;
}
}  // namespace

TEST(PlannerCalibration, ExactTimingsGiveBackTheirCoefficients) {
  const auto s = timed_by(1800, 1.5e-6, 6e-4, 2e-6, {{64, 8}, {128, 8}, {320, 8}, {200, 4}, {28, 2}});
  const auto f = kp::fit_compute_speed(s);
  ASSERT_TRUE(f.has_value()) << f.error().message();
  EXPECT_NEAR(f->prefill.tokens_per_s, 1800, 1e-6);
  EXPECT_NEAR(f->prefill.attention_s_per_pair, 1.5e-6, 1e-15);
  EXPECT_NEAR(f->decode.s_per_seq, 6e-4, 1e-12);
  EXPECT_NEAR(f->decode.s_per_token, 2e-6, 1e-15);
  EXPECT_EQ(f->prefill_samples, 5U);
  EXPECT_EQ(f->decode_samples, 5U);
  EXPECT_LT(f->prefill_rms_relative, 1e-9);
  // The fitted model predicts what hardware.hpp computes from the same figures.
  kp::prefill_cost truth;
  truth.tokens_per_s = 1800;
  truth.attention_s_per_pair = 1.5e-6;
  truth.overhead_s = 0;
  EXPECT_NEAR(f->prefill.seconds(500, 0), truth.seconds(500, 0), 1e-9);
}

TEST(PlannerCalibration, CachedTokensCountAsContextNotAsWork) {
  auto s = timed_by(2000, 1e-6, 5e-4, 1e-6, {{100, 2}, {300, 2}});
  // A third prefill computed 100 tokens after 200 cached ones.
  s.push_back({.prompt_tokens = 300, .cached_tokens = 200, .prefill_cpu_s = 100 / 2000.0 + 1e-6 * 100 * (200 + 50)});
  const auto f = kp::fit_compute_speed(s);
  ASSERT_TRUE(f.has_value()) << f.error().message();
  EXPECT_NEAR(f->prefill.tokens_per_s, 2000, 1e-6);
  EXPECT_NEAR(f->prefill.attention_s_per_pair, 1e-6, 1e-15);
}

TEST(PlannerCalibration, ANegativeBestFitIsClampedToZero) {
  // Per-token time that falls with the prompt (a warm cache): unconstrained,
  // the pair term would be negative; the fit keeps it at zero.
  std::vector<kp::compute_sample> s = timed_by(1000, 0, 1e-3, 0, {{100, 3}, {400, 5}});
  s[1].prefill_cpu_s *= 0.8;
  s[1].decode_cpu_s *= 0.9;
  const auto f = kp::fit_compute_speed(s);
  ASSERT_TRUE(f.has_value()) << f.error().message();
  EXPECT_EQ(f->prefill.attention_s_per_pair, 0.0);
  EXPECT_GT(f->prefill.tokens_per_s, 1000);
  EXPECT_LT(f->prefill.tokens_per_s, 1250);
  EXPECT_EQ(f->decode.s_per_token, 0.0);
  EXPECT_GT(f->decode.s_per_seq, 0.0);
}

TEST(PlannerCalibration, TooFewOrInconsistentTimingsAreErrorsNamingWhy) {
  auto message = [](const std::vector<kp::compute_sample>& s) {
    auto f = kp::fit_compute_speed(s);
    return f ? std::string("fitted") : f.error().message();
  };
  EXPECT_NE(message({}).find("needs timed prefills of at least two prompt sizes (got 0 prefills)"), std::string::npos);
  EXPECT_NE(message(timed_by(1000, 1e-6, 1e-3, 1e-6, {{64, 4}, {64, 4}})).find("at least two prompt sizes (got 2"),
            std::string::npos);
  auto prefill_only = timed_by(1000, 1e-6, 1e-3, 1e-6, {{64, 1}, {128, 1}});
  EXPECT_NE(message(prefill_only).find("needs timed decodes at at least two context sizes (got 0 decodes)"),
            std::string::npos);
  auto s = timed_by(1000, 1e-6, 1e-3, 1e-6, {{64, 4}, {128, 4}});
  auto bad = s;
  bad[1].cached_tokens = 129;
  EXPECT_NE(message(bad).find("sample 1: 129 cached tokens of a 128-token prompt"), std::string::npos);
  bad = s;
  bad[0].prefill_cpu_s = -1;
  EXPECT_NE(message(bad).find("sample 0: times and token counts must be finite and >= 0"), std::string::npos);
  bad = s;
  bad[0].decode_cpu_s = std::nan("");
  EXPECT_NE(message(bad).find("sample 0: times and token counts must be finite"), std::string::npos);
  bad = s;
  bad[1].decode_steps = 0;
  EXPECT_NE(message(bad).find("sample 1: a decode time without steps"), std::string::npos);
  bad = s;
  bad[0].cached_tokens = 64;
  EXPECT_NE(message(bad).find("sample 0: a prefill time without tokens to compute"), std::string::npos);
  // Timings that grow with attention pairs alone leave no speed to fit.
  auto quadratic = timed_by(1e12, 1e-6, 1e-3, 1e-6, {{64, 4}, {128, 4}});
  for (auto& q : quadratic) q.prefill_cpu_s = 1e-6 * q.prompt_tokens * (q.prompt_tokens / 2.0);
  EXPECT_NE(message(quadratic).find("fit no per-token term"), std::string::npos);
  EXPECT_EQ(message(s), "fitted");
}
