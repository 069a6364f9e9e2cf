#pragma once
//! \file
//! `kvx::disagg::planner::search`: the cheapest deployment that meets the
//! SLOs, over a grid of candidates (instance counts, cache per tier, eviction
//! and routing policy, colocated or disaggregated).
//!
//! Candidates are evaluated in order of cost per hour (ties broken by label,
//! so the order is deterministic), so the first feasible one is the cheapest
//! and the search may stop once `runner_ups` more feasible ones are found;
//! `exhaustive` evaluates every candidate (for plots). No monotonicity is
//! assumed, so the answer equals a brute-force scan's.
//!
//! `evaluate` is any callable `result<sim_report>(const deployment&)`
//! (usually a lambda around `simulate`). With `jobs > 1` it is called from
//! that many threads at once on different deployments (the search makes its
//! own threads only then); results never depend on `jobs`.
//!
//! \code
//! namespace kp = kvx::disagg::planner;
//! kp::search_space space{.prefill_instances = {1, 2, 4}, .decode_instances = {1, 2}, .dram_gb = {0, 1000}};
//! auto found = kp::search(kp::enumerate(space), hw,
//!                         [&](const kp::deployment& d) { return kp::simulate(w, model, hw, d, slo); });
//! if (found->best) use(found->evaluated[*found->best]);
//! \endcode

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <kvx/core/result.hpp>
#include <kvx/disagg/planner/deployment.hpp>
#include <kvx/disagg/planner/hardware.hpp>
#include <kvx/disagg/planner/simulator.hpp>

namespace kvx::disagg::planner {

//! The grid. Empty lists of modes or policies mean the defaults.
struct search_space {
  std::vector<serving_mode> modes{serving_mode::disaggregated};
  std::vector<std::uint32_t> prefill_instances{1};   //!< disaggregated prefill counts
  std::vector<std::uint32_t> decode_instances{1};    //!< disaggregated decode counts
  std::vector<std::uint32_t> colocated_instances{};  //!< colocated instance counts (empty: prefill + decode sums)
  std::vector<double> hbm_cache_gb{0};
  std::vector<double> dram_gb{0};
  std::vector<double> ssd_gb{0};
  std::vector<std::string> evictions{"lru"};
  std::vector<std::string> routings{"cache_aware"};
  deployment base{};                                 //!< chunk_tokens, early_rejection
};

//! Every distinct deployment of the grid (a cacheless deployment once, not
//! once per eviction policy).
inline std::vector<deployment> enumerate(const search_space& s) {
  std::vector<deployment> out;
  std::set<std::string> seen;
  auto add = [&](deployment d) {
    if (!d.has_cache()) d.eviction = s.evictions.empty() ? "lru" : s.evictions.front();
    if (seen.insert(d.label()).second) out.push_back(std::move(d));
  };
  std::vector<std::uint32_t> colo = s.colocated_instances;
  if (colo.empty()) {
    std::set<std::uint32_t> sums;
    for (auto p : s.prefill_instances)
      for (auto q : s.decode_instances) sums.insert(p + q);
    colo.assign(sums.begin(), sums.end());
  }
  for (auto mode : s.modes)
    for (double hbm : s.hbm_cache_gb)
      for (double dram : s.dram_gb)
        for (double ssd : s.ssd_gb)
          for (const auto& ev : s.evictions)
            for (const auto& rt : s.routings) {
              deployment d = s.base;
              d.mode = mode;
              d.hbm_cache_gb = hbm;
              d.dram_gb = dram;
              d.ssd_gb = ssd;
              d.eviction = ev;
              d.routing = rt;
              if (mode == serving_mode::colocated) {
                for (auto n : colo) {
                  d.prefill_instances = n;
                  d.decode_instances = 0;
                  add(d);
                }
              } else {
                for (auto p : s.prefill_instances)
                  for (auto q : s.decode_instances) {
                    d.prefill_instances = p;
                    d.decode_instances = q;
                    add(d);
                  }
              }
            }
  return out;
}

struct search_options {
  std::size_t runner_ups = 4;  //!< feasible deployments to find after the cheapest
  bool exhaustive = false;     //!< evaluate every candidate
  unsigned jobs = 1;
  //! Called after each evaluation with (evaluated, candidates, the report); may be empty.
  std::function<void(std::size_t, std::size_t, const sim_report&)> progress{};
};

//! One evaluated candidate. `report.requests` is emptied to save memory
//! (simulate the deployment again for per-request results).
struct candidate_result {
  deployment config;
  sim_report report;
};

struct search_result {
  std::vector<candidate_result> evaluated;  //!< in evaluation order (cost, then label)
  std::optional<std::size_t> best;          //!< index into `evaluated` of the cheapest feasible
  std::vector<std::size_t> runner_ups;      //!< the next cheapest feasible ones, cheapest first
  std::size_t candidates = 0;               //!< deployments in the grid
};

//! Searches `candidates` (invalid ones for `hw` are skipped). An error from
//! `evaluate` ends the search with that error.
template <class Evaluate>
result<search_result> search(std::vector<deployment> candidates, const hardware& hw, Evaluate&& evaluate,
                             const search_options& opt = {}) {
  std::erase_if(candidates, [&](const deployment& d) { return !d.validate(hw); });
  std::stable_sort(candidates.begin(), candidates.end(), [&](const deployment& a, const deployment& b) {
    const double ca = cost_per_hour(a, hw), cb = cost_per_hour(b, hw);
    return ca != cb ? ca < cb : a.label() < b.label();
  });
  search_result out;
  out.candidates = candidates.size();
  const std::size_t jobs = std::max<std::size_t>(1, opt.jobs);
  std::size_t feasible = 0;
  for (std::size_t next = 0; next < candidates.size();) {
    if (!opt.exhaustive && out.best && feasible > opt.runner_ups) break;
    // A wave of up to `jobs` candidates, evaluated in parallel, consumed in order.
    const std::size_t wave = std::min(jobs, candidates.size() - next);
    std::vector<std::optional<result<sim_report>>> got(wave);
    if (wave == 1) {
      got[0].emplace(evaluate(candidates[next]));
    } else {
      std::vector<std::thread> threads;
      threads.reserve(wave);
      for (std::size_t k = 0; k < wave; ++k)
        threads.emplace_back([&, k] { got[k].emplace(evaluate(candidates[next + k])); });
      for (auto& t : threads) t.join();
    }
    for (std::size_t k = 0; k < wave; ++k) {
      auto& r = *got[k];
      if (!r) return r.error();
      if (!opt.exhaustive && out.best && feasible > opt.runner_ups) break;
      const deployment& d = candidates[next + k];
      r->requests.clear();
      r->requests.shrink_to_fit();
      out.evaluated.push_back({d, std::move(*r)});
      const auto idx = out.evaluated.size() - 1;
      if (opt.progress) opt.progress(idx + 1, candidates.size(), out.evaluated.back().report);
      if (!out.evaluated.back().report.meets_slo) continue;
      ++feasible;
      if (!out.best)
        out.best = idx;
      else if (out.runner_ups.size() < opt.runner_ups)
        out.runner_ups.push_back(idx);
    }
    next += wave;
  }
  return out;
}

}  // namespace kvx::disagg::planner
