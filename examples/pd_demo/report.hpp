#pragma once
// kvx_pd_demo: per-request records, per-deployment results, the JSON report.
#include "common.hpp"

namespace pd_demo {

// ---- results --------------------------------------------------------------------

struct record {
  bool done = false;
  std::string error;
  std::vector<std::uint32_t> tokens;
  double ttft_s = 0, tpot_s = 0;
  std::uint32_t prompt = 0, cached = 0, recomputed = 0;
  double save_busy_s = 0, save_tail_s = 0;
  std::uint64_t bytes = 0;
  std::uint64_t save_bytes = 0;   // what the prefill side's saves moved (push: into decode; pull: into the pool)
  double prefill_cpu_s = 0, decode_cpu_s = 0;  // the instances' compute threads' CPU time (0: not timed)
};

struct mode_result {
  std::string name;
  double wall_s = 0;
  std::vector<record> records;
  std::uint64_t bytes_moved = 0;     // every byte the transfer engines moved for KV
  std::uint64_t prompt_tokens = 0, cached_tokens = 0;
  double save_busy_s = 0, save_tail_s = 0;
  std::uint64_t save_bytes = 0;
  std::size_t mismatches = 0, errors = 0;
  std::size_t retries = 0;           // attempts the router made again elsewhere (a worker failed or died)
  std::uint64_t pool_dram_bytes = 0, pool_ssd_bytes = 0;  // pull: what the pool holds per tier at the end
};

inline mode_result empty_result(std::string name, std::size_t requests) {
  mode_result m;
  m.name = std::move(name);
  m.records.resize(requests);
  return m;
}

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const double pos = p * static_cast<double>(v.size() - 1);
  const auto i = static_cast<std::size_t>(pos);
  const double f = pos - static_cast<double>(i);
  return i + 1 < v.size() ? v[i] * (1 - f) + v[i + 1] * f : v[i];
}

void summarize(mode_result& m, const std::vector<record>& reference) {
  for (std::size_t i = 0; i < m.records.size(); ++i) {
    const auto& r = m.records[i];
    m.prompt_tokens += r.prompt;
    m.cached_tokens += r.cached;
    m.save_busy_s += r.save_busy_s;
    m.save_tail_s += r.save_tail_s;
    m.save_bytes += r.save_bytes;
    if (!r.error.empty() || !r.done) {
      ++m.errors;
      std::fprintf(stderr, "  %s: request %zu failed: %s\n", m.name.c_str(), i, r.error.c_str());
      continue;
    }
    if (&m.records != &reference && r.tokens != reference[i].tokens) {
      ++m.mismatches;
      std::fprintf(stderr, "  %s: request %zu: output differs from the colocated run\n", m.name.c_str(), i);
    }
  }
}

nlohmann::json report_json(const mode_result& m) {
  std::vector<double> ttft, tpot;
  // The engine's compute, request by request, as the instances timed it
  // (prefill: the forward pass; decode: the steps after the first token):
  // what kvx-plan --validate-demo fits the engine's speed to.
  auto compute = nlohmann::json::array();
  for (const auto& r : m.records)
    if (r.error.empty()) {
      ttft.push_back(r.ttft_s);
      if (r.tpot_s > 0) tpot.push_back(r.tpot_s);
      if (r.prefill_cpu_s > 0)
        compute.push_back({{"prompt", r.prompt}, {"cached", r.cached}, {"output", r.tokens.size()}, {"prefill_cpu_s", r.prefill_cpu_s},
                           {"decode_cpu_s", r.decode_cpu_s}});
    }
  auto pct = [](const std::vector<double>& v) {
    return nlohmann::json{{"p50", percentile(v, 0.5)}, {"p90", percentile(v, 0.9)}, {"p99", percentile(v, 0.99)}};
  };
  return {{"mode", m.name},
          {"requests", m.records.size()},
          {"wall_s", m.wall_s},
          {"ttft_s", pct(ttft)},
          {"tpot_s", pct(tpot)},
          {"prefix_hit_rate", m.prompt_tokens ? static_cast<double>(m.cached_tokens) / static_cast<double>(m.prompt_tokens) : 0.0},
          {"bytes_moved", m.bytes_moved},
          {"save_busy_s", m.save_busy_s},
          {"save_exposed_s", m.save_tail_s},
          {"hidden_fraction", m.save_busy_s > 0 ? std::max(0.0, 1.0 - m.save_tail_s / m.save_busy_s) : 0.0},
          {"save_link_gib_s", m.save_busy_s > 0 ? static_cast<double>(m.save_bytes) / m.save_busy_s / (1 << 30) : 0.0},
          {"errors", m.errors},
          {"retries", m.retries},
          {"pool_dram_bytes", m.pool_dram_bytes},
          {"pool_ssd_bytes", m.pool_ssd_bytes},
          {"ttft_samples_s", ttft},
          {"tpot_samples_s", tpot},
          {"compute_samples", compute},
          {"mismatches", m.mismatches}};
}


}  // namespace pd_demo
