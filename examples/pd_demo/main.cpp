// kvx_pd_demo: prefill/decode disaggregation on one host, end to end.
//
// This process is the router: it runs the cache-aware router, the metadata
// service (embedded metadata served over HTTP) and, for pull mode, the KV
// pool (a master, a DRAM node and an SSD node on a file), and starts N
// prefill and M decode tiny-engine instances as worker processes (this
// executable, `--worker`), each with its own transfer engine over tcp and
// registered KV memory (processes.hpp; `--in-process` runs them all here
// instead). It replays a slice of a Mooncake-format conversation trace,
// scaled to the tiny model (each 512-token hash block becomes
// --tokens-per-hash tokens), through three deployments side by side:
//
//   colocated  every instance prefills and decodes its own requests
//   push       prefill writes each layer straight into the decode instance's blocks
//   pull       prefill puts blocks into the pool, decode (and later prefills) get them
//
// and prints TTFT / TPOT percentiles, the prefix hit rate, bytes moved, how
// much of the transfer layer-wise streaming hid behind compute, and checks
// every disaggregated output against the colocated one (exit 1 on a mismatch).
#include "common.hpp"
#include "in_process.hpp"
#include "processes.hpp"
#include "report.hpp"

using namespace pd_demo;

int main(int argc, char** argv) {
  if (argc == 3 && std::string(argv[1]) == "--worker") return run_worker(argv[2]);  // started by the router process
  bool synthetic = false;
  auto parsed = parse(argc, argv, synthetic);
  if (!parsed) return 0;
  const options& o = *parsed;
  std::optional<std::vector<request_spec>> reqs;
  std::string source = "built-in synthetic multi-turn workload";
  if (!synthetic) {
    reqs = trace_workload(o);
    if (reqs) source = o.trace + " (lines " + std::to_string(o.skip + 1) + "..)";
  }
  if (!reqs) reqs = synthetic_workload(o);
  if (reqs->empty()) {
    std::fprintf(stderr, "kvx_pd_demo: the workload is empty\n");
    return 1;
  }
  std::uint64_t prompt_tokens = 0;
  for (const auto& r : *reqs) prompt_tokens += r.prompt.size();
  const auto cfg = model_config();
  std::printf("kvx_pd_demo: %zu requests from %s\n", reqs->size(), source.c_str());
  std::printf("  model: tiny engine, %u layers, width %u, %u KV heads x %u, %u-token blocks; mean prompt %.0f tokens\n",
              cfg.layers, cfg.model_dim(), cfg.kv_heads, cfg.head_dim, cfg.block_tokens,
              static_cast<double>(prompt_tokens) / static_cast<double>(reqs->size()));
  std::printf("  instances: %u prefill (TP=%u, layer_first) + %u decode (TP=1, page_first%s), %u requests in flight\n",
              o.prefill, o.prefill_tp, o.decode, o.prefill_tp > 1 ? ", 32-token blocks" : "", o.concurrency);

  std::vector<mode_result> results;
  try {
    if (o.in_process) {
      results.push_back(run_colocated(o, *reqs));
      for (const auto& m : o.modes) {
        if (m == "push") results.push_back(run_disaggregated<kd::transfer_mode::push>(o, *reqs, "push", kd::load::wait_until{20s}));
        if (m == "pull") results.push_back(run_disaggregated<pull_t>(o, *reqs, "pull", kd::load::best_effort{20s}));
      }
    } else {
      results.push_back(run_processes(o, *reqs, "colocated"));
      for (const auto& m : o.modes)
        if (m != "colocated") results.push_back(run_processes(o, *reqs, m));
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "kvx_pd_demo: set-up failed: %s\n", e.what());
    return 1;
  }

  const auto reference = results.front().records;
  bool ok = true;
  nlohmann::json report = {{"source", source}, {"modes", nlohmann::json::array()}};
  std::printf("\n%-10s %7s %9s %9s %9s %9s %9s %7s %8s %8s %8s %7s %s\n", "mode", "wall s", "TTFT p50", "TTFT p90", "TTFT p99",
              "TPOT p50", "TPOT p90", "hit %", "KV MiB", "link MiB/s", "hidden %", "retries", "outputs");
  for (auto& m : results) {
    summarize(m, reference);
    auto j = report_json(m);
    report["modes"].push_back(j);
    const bool same = m.mismatches == 0 && m.errors == 0;
    ok = ok && same;
    std::printf("%-10s %7.2f %7.1fms %7.1fms %7.1fms %7.2fms %7.2fms %6.1f%% %8.2f %10.0f %7.0f%% %7zu %s\n", m.name.c_str(), m.wall_s,
                1e3 * j["ttft_s"]["p50"].get<double>(), 1e3 * j["ttft_s"]["p90"].get<double>(), 1e3 * j["ttft_s"]["p99"].get<double>(),
                1e3 * j["tpot_s"]["p50"].get<double>(), 1e3 * j["tpot_s"]["p90"].get<double>(), 100 * j["prefix_hit_rate"].get<double>(),
                static_cast<double>(m.bytes_moved) / (1 << 20), 1024 * j["save_link_gib_s"].get<double>(),
                100 * j["hidden_fraction"].get<double>(), m.retries, &m == &results.front() ? "reference" : same ? "identical" : "MISMATCH");
  }
  for (const auto& m : results)
    if (m.pool_dram_bytes + m.pool_ssd_bytes > 0)
      std::printf("\n%s: the pool holds %.1f MiB in DRAM and %.1f MiB in its SSD tier (a file)\n", m.name.c_str(),
                  static_cast<double>(m.pool_dram_bytes) / (1 << 20), static_cast<double>(m.pool_ssd_bytes) / (1 << 20));
  std::printf("\nTTFT counts from dispatch to the first token (queueing included); hit %% = prompt tokens the prefill\n"
              "loaded from the pool; link = bytes the prefill side saved / time its per-layer transfers were busy;\n"
              "hidden %% = share of that transfer time that overlapped compute; retries = attempts re-routed after a failure.\n");
  std::printf("%s\n", ok ? "every disaggregated request produced exactly the colocated tokens"
                         : "FAILED: some requests differ from the colocated run or failed");
  if (!o.json.empty()) {
    std::ofstream out(o.json);
    out << report.dump(2) << "\n";
    if (!out) {
      std::fprintf(stderr, "kvx_pd_demo: cannot write %s\n", o.json.c_str());
      return 1;
    }
  }
  return ok ? 0 : 1;
}
