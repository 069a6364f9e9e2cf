// kvx-plan: from a model, a workload trace and SLOs to the cheapest
// prefill/decode deployment that meets them, by simulating candidates with
// kvx's own router and eviction policies (kvx/disagg/planner/*.hpp).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <mutex>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <spawn.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <kvx/cache/trace.hpp>
#include <kvx/disagg/layouts/layer_first.hpp>
#include <kvx/disagg/planner/block_cache.hpp>
#include <kvx/disagg/planner/calibrate.hpp>
#include <kvx/disagg/planner/deployment.hpp>
#include <kvx/disagg/planner/hardware.hpp>
#include <kvx/disagg/planner/links.hpp>
#include <kvx/disagg/planner/model_shape.hpp>
#include <kvx/disagg/planner/search.hpp>
#include <kvx/disagg/planner/simulator.hpp>
#include <kvx/disagg/planner/workload.hpp>
#include <tiny/engine.hpp>

#include "measure.hpp"
#include "wake_probe.hpp"

extern char** environ;

namespace kp = kvx::disagg::planner;
namespace kd = kvx::disagg;
using json = nlohmann::json;

#ifndef KVX_PLAN_PRESETS_DIR
#define KVX_PLAN_PRESETS_DIR "benchmarks/kvx_plan/presets"
#endif

namespace {

constexpr const char* usage = R"(usage: kvx-plan --trace FILE --model M --hardware H [options]

Simulates candidate prefill/decode deployments serving a Mooncake-format trace
(timestamp ms, input_length, output_length, hash_ids) with kvx's own router
and eviction policies, and reports the cheapest one meeting the SLOs.

Inputs
  --trace FILE            the workload (JSONL)
  --block-tokens N        tokens per hash id (default 512)
  --time-scale X          replay arrivals X times faster (default 1)
  --max-requests N        use the first N requests only
  --token-scale X         multiply prompt and output lengths and --block-tokens by X (0.03125 turns
                          the trace's 512-token blocks into 16-token ones, as kvx_pd_demo's default
                          --tokens-per-hash 16 does, for kvx's tiny engine)
  --model M               a preset (llama-3-8b, llama-3-70b, llama-3-405b, qwen2.5-32b,
                          qwen2.5-72b, mistral-7b, tiny) or a JSON file
  --hardware H            a preset in the presets folder (h100x8, h200x8, a100x8) or a JSON
                          file: per-instance cost model, links and prices (docs/planner.md)
  --measure               take the cost model from kvx's tiny engine measured on this
                          machine instead (use with --model tiny)
  --links-from FILE       link speeds measured by kvx's benchmarks, replacing the hardware's:
                          transfer_bench --json output (ucx, tcp or shm: the network; local: the
                          pool's DRAM tier) and file_tier_bench --json output (the pool's SSD tier);
                          one object, an array, or one object per line; repeat for several files
  --network-transport T   which measured transport is the network (ucx, tcp, shm; default: the
                          first of those measured)
  --max-batch N           override the decode batch limit

SLOs (a rejected request counts as infinitely late)
  --ttft S                time to first token target, seconds (default 2)
  --ttft-percentile P     (default 90)
  --tpot S                time per output token target, seconds (default 0.1)
  --tpot-percentile P     (default 90)

Search space (lists: 1,2,4 or ranges 1-8)
  --modes LIST            disagg,colocated (default disagg,colocated)
  --prefill LIST          prefill instances (default 1-4)
  --decode LIST           decode instances (default 1-2)
  --colocated LIST        colocated instances (default: every prefill+decode sum)
  --hbm-cache-gb LIST     prefix cache per instance in HBM (default 0,100)
  --dram-gb LIST          shared pool DRAM (default 0,2000)
  --ssd-gb LIST           shared pool SSD (default 0)
  --evictions LIST        eviction policies (default lru; any of lru,lfu,s3fifo,arc,sieve,prefix,
                          reuse_class,auto,belady)
  --routings LIST         cache_aware,least_loaded,round_robin (default cache_aware)
  --chunk-tokens N        colocated chunked-prefill budget (default 2048)
  --no-early-rejection    the router admits everything

Search
  --runner-ups N          feasible deployments to report after the cheapest (default 4)
  --exhaustive            simulate every candidate, not only up to the runner-ups
  --jobs N                simulations in parallel (default 1)

Output
  --json FILE             everything as JSON (benchmarks/kvx_plan/plot.py draws it)
  --quiet                 no progress on stderr

Validation
  --validate-tiny         run kvx's tiny engine for real on a small workload (one prefill and one
                          decode instance, FIFO) and compare its TTFT and TPOT with the planner's
                          prediction from the measured cost model
  --validate-demo REPORT  compare with what kvx_pd_demo measured (its --json REPORT): the same trace
                          slice, token scaling, closed-loop concurrency and instance counts,
                          simulated with the tiny engine's speed (CPU time; see --engine-speed) on
                          instances that share the cores other processes left free, moment by
                          moment (see --sharing); exits 1 unless the mean and p90 TTFT and TPOT of
                          the push and pull modes are within 25% of the demo's
  --demo-skip N, --demo-requests N, --demo-tokens-per-hash K, --demo-max-prompt T,
  --demo-max-output T, --demo-concurrency C, --demo-prefill N, --demo-decode M
                          the demo options the report was made with (defaults: the demo's own:
                          0, 32, 16, 320, 8, 4, 2, 2); --trace is the demo's --trace (default
                          /work/shared/traces/conversation_trace.jsonl)
  --demo-binary PATH      run kvx_pd_demo (PATH) with those options first, writing REPORT, and measure
                          the CPU other processes use meanwhile
  --cores N               cores the demo's instances share (default: this machine's cores less what
                          other processes used during the demo, or over 2 s now without --demo-binary)
  --cores-window S        with --demo-binary, the cores free are taken over spans of S seconds of each
                          mode's replay (default 0.25; the CPU is sampled every 50 ms)
  --cores-from FILE       the cores free of each mode as an earlier run of --validate-demo --json FILE
                          recorded them during the demo that made REPORT: compares another model or
                          option on the same run without running the demo again
  --engine-speed FROM     where the tiny engine's speed comes from: 'mode' (fitted to the CPU time
                          the compared mode's own instances took to compute each request in the
                          demo run: their latencies are still the planner's to predict),
                          'colocated' (fitted to the demo's colocated run), or 'measured' (measured
                          here after the demo); default: the first of these the report has timings
                          for. The gated ratios with each available speed are printed after the
                          table (the engine is measured here only for 'measured', a mode without
                          timings, or with --demo-binary)
  --sharing MODEL         how the instances share the cores free: 'per-core' (default: one run queue
                          per core of this machine; an instance that starts computing joins the
                          shortest, an empty queue pulls from the longest, and a queue's instances
                          share its core; other processes' load runs on the cores no instance uses,
                          and what has no core of its own turns the sharing fluid in proportion) or
                          'fluid' (every computing instance at min(1, cores / k)); the other model's
                          gated ratios are printed after the table
  --wake-burst S          for the 'wake burst' column (not gated): how long an instance that starts
                          computing after being idle runs at a whole core before it shares
                          (seconds); default: measured just before and after the demo (a thread
                          that sleeps 10 ms, wakes and computes on a core another thread keeps
                          busy until it is first preempted; the median of 60 wakes, averaged)
  --help                  this text
)";

[[noreturn]] void die(const std::string& msg) {
  std::cerr << "kvx-plan: " << msg << "\n";
  std::exit(2);
}

double number(const std::string& s, const std::string& what) {
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  if (s.empty() || end == s.c_str() || *end != '\0' || !std::isfinite(v) || v < 0)
    die("bad value '" + s + "' for " + what);
  return v;
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}

std::vector<double> numbers(const std::string& s, const std::string& what) {
  std::vector<double> out;
  for (const auto& item : split(s)) {
    const auto dash = item.find('-', 1);
    if (dash != std::string::npos) {
      const double a = number(item.substr(0, dash), what), b = number(item.substr(dash + 1), what);
      if (b < a || b - a > 1000) die("bad range '" + item + "' for " + what);
      // Above 2^53 a double no longer steps by 1, so a range there would be one value repeated.
      if (b > 9007199254740992.0) die("bad range '" + item + "' for " + what + ": ends must be at most 2^53");
      const auto steps = static_cast<int>(b - a);
      for (int k = 0; k <= steps; ++k) out.push_back(a + k);
    } else {
      out.push_back(number(item, what));
    }
  }
  if (out.empty()) die(what + " needs at least one value");
  return out;
}

std::vector<std::uint32_t> counts(const std::string& s, const std::string& what) {
  std::vector<std::uint32_t> out;
  for (double v : numbers(s, what)) {
    if (v != std::floor(v) || v < 1 || v > 4096) die(what + ": '" + s + "' must list whole numbers from 1");
    out.push_back(static_cast<std::uint32_t>(v));
  }
  return out;
}

json read_json_file(const std::string& path) {
  std::ifstream f(path);
  if (!f) die("cannot open '" + path + "'");
  std::stringstream ss;
  ss << f.rdbuf();
  auto doc = kvx::config::parse(ss.str());
  if (!doc) die(path + ": " + doc.error().message());
  return *doc;
}

bool is_file(const std::string& s) { return std::ifstream(s).good(); }

json report_json(const kp::deployment& d, const kp::sim_report& r) {
  auto fin = [](double v) { return std::isfinite(v) ? json(v) : json(nullptr); };
  return {{"label", d.label()},
          {"mode", kp::to_string(d.mode)},
          {"prefill_instances", d.prefill_instances},
          {"decode_instances", d.mode == kp::serving_mode::colocated ? 0U : d.decode_instances},
          {"instances", d.instances()},
          {"hbm_cache_gb", d.hbm_cache_gb},
          {"dram_gb", d.dram_gb},
          {"ssd_gb", d.ssd_gb},
          {"eviction", d.has_cache() ? d.eviction : "none"},
          {"routing", d.routing},
          {"meets_slo", r.meets_slo},
          {"slo_attainment", r.slo_attainment},
          {"completed", r.completed},
          {"rejected", r.rejected},
          {"ttft_s", {{"p50", fin(r.ttft_p50_s)}, {"p90", fin(r.ttft_p90_s)}, {"p99", fin(r.ttft_p99_s)}, {"target_percentile", fin(r.ttft_target_pct_s)}}},
          {"tpot_s", {{"p50", fin(r.tpot_p50_s)}, {"p90", fin(r.tpot_p90_s)}, {"p99", fin(r.tpot_p99_s)}, {"target_percentile", fin(r.tpot_target_pct_s)}}},
          {"goodput_rps", r.goodput_rps},
          {"goodput_tokens_per_s", r.goodput_tokens_per_s},
          {"hit_rate", {{"hbm_local", r.share(r.local_tokens)},
                        {"hbm_peer", r.share(r.peer_tokens)},
                        {"dram", r.share(r.dram_tokens)},
                        {"ssd", r.share(r.ssd_tokens)},
                        {"computed", r.share(r.computed_tokens)}}},
          {"link", {{"network_utilisation", r.network_utilisation},
                    {"ssd_utilisation", r.ssd_utilisation},
                    {"kv_transfer_gb", r.kv_transfer_bytes / 1e9},
                    {"pool_read_gb", r.pool_read_bytes / 1e9},
                    {"pool_write_gb", r.pool_write_bytes / 1e9},
                    {"peer_read_gb", r.peer_read_bytes / 1e9}}},
          {"utilisation", {{"prefill", r.prefill_utilisation}, {"decode", r.decode_utilisation}}},
          {"makespan_s", r.makespan_s},
          {"cost_per_hour", r.cost_per_hour},
          {"cost_usd", r.cost_usd},
          {"usd_per_m_input_tokens", fin(r.usd_per_m_input_tokens)},
          {"usd_per_m_output_tokens", fin(r.usd_per_m_output_tokens)}};
}

// 101 quantiles of a distribution (rejected requests are infinite: null).
json quantiles(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  json out = json::array();
  for (int q = 0; q <= 100; ++q) {
    const double x = v.empty() ? 0.0 : v[std::min(v.size() - 1, static_cast<std::size_t>(q / 100.0 * static_cast<double>(v.size() - 1) + 0.5))];
    out.push_back(std::isfinite(x) ? json(x) : json(nullptr));
  }
  return out;
}

json cdf_json(const std::string& role, const kp::deployment& d, const kp::sim_report& r) {
  std::vector<double> ttft, tpot;
  for (const auto& q : r.requests) {
    ttft.push_back(q.ttft_s());
    tpot.push_back(q.tpot_s());
  }
  return {{"role", role}, {"label", d.label()}, {"ttft_quantiles_s", quantiles(ttft)}, {"tpot_quantiles_s", quantiles(tpot)}};
}

void print_row(const kp::deployment& d, const kp::sim_report& r, const char* tag) {
  std::printf("%-4s %-52s %8.2f %6.1f%% %8.3f %8.4f %7.2f %7.2f %6.1f%% %6.1f%% %6.1f%%\n", tag, d.label().c_str(),
              r.cost_per_hour, 100 * r.slo_attainment, r.ttft_target_pct_s, r.tpot_target_pct_s,
              r.usd_per_m_input_tokens, r.usd_per_m_output_tokens, 100 * r.share(r.local_tokens + r.peer_tokens),
              100 * r.share(r.dram_tokens + r.ssd_tokens), 100 * r.network_utilisation);
}
void print_header() {
  std::printf("%-4s %-52s %8s %7s %8s %8s %7s %7s %7s %7s %7s\n", "", "deployment", "$/hour", "SLO%", "TTFT_p", "TPOT_p",
              "$/Min", "$/Mout", "hbm%", "pool%", "net%");
}

// --validate-tiny: the tiny engine measured, then run for real.
int validate_tiny(bool quiet, const std::string& json_path) {
  tiny::model_config cfg{};
  // Wall-clock speed: the steps below are timed by the wall clock too.
  auto hw = kp::measure_tiny_hardware(cfg, {.network_gb_s = 1000, .per_core = false});
  if (!hw) die(hw.error().message());
  hw->decode.max_batch = 1;
  const kp::model_shape model = *kp::model_preset("tiny");
  // A workload that keeps the prefill instance about 60% busy.
  std::mt19937_64 rng(2024);
  std::vector<kvx::cache::trace_request> trace;
  double mean_prefill = 0;
  std::vector<std::uint32_t> lens, outs;
  for (int i = 0; i < 60; ++i) {
    lens.push_back(64 + static_cast<std::uint32_t>(rng() % 449));
    outs.push_back(8 + static_cast<std::uint32_t>(rng() % 25));
    mean_prefill += hw->prefill.seconds(lens.back(), 0) / 60;
  }
  double clock = 0;
  for (int i = 0; i < 60; ++i) {
    const double u = (static_cast<double>(rng() >> 11) + 0.5) / 9007199254740992.0;
    clock += -std::log(u) * mean_prefill / 0.6;
    trace.push_back({static_cast<std::uint64_t>(clock * 1e6), lens[static_cast<std::size_t>(i)],
                     outs[static_cast<std::size_t>(i)], {}});
  }
  // Timestamps are written in microseconds so that millisecond-scale service
  // times queue; the workload reads them as ms, so scale time by 1000.
  auto w = kp::workload::from_trace(trace, {.block_tokens = 16, .time_scale = 1000});
  if (!w) die(w.error().message());
  const kp::deployment d{.prefill_instances = 1, .decode_instances = 1, .early_rejection = false};
  auto sim = kp::simulate(*w, model, *hw, d, {});
  if (!sim) die(sim.error().message());

  // The real engine: one prefill and one decode instance in virtual time,
  // each step's duration measured.
  const std::uint32_t max_tokens = 512 + 32;
  const std::uint32_t blocks = (max_tokens + cfg.block_tokens - 1) / cfg.block_tokens;
  auto layout = kd::layouts::layer_first::make(cfg.shard_shape(), blocks).value();
  std::vector<std::byte> pool(layout.bytes_required(), std::byte{1});
  auto eng = tiny::engine<kd::layouts::layer_first>::make(cfg, layout, pool).value();
  std::vector<std::uint32_t> table(blocks);
  for (std::uint32_t i = 0; i < blocks; ++i) table[i] = i;
  using clk = std::chrono::steady_clock;
  double prefill_free = 0, decode_free = 0;
  std::vector<double> real_ttft, real_tpot, sim_ttft, sim_tpot;
  for (std::size_t i = 0; i < w->size(); ++i) {
    const auto& q = (*w)[i];
    std::vector<std::uint32_t> prompt(q.input_tokens);
    for (std::uint32_t k = 0; k < q.input_tokens; ++k) prompt[k] = (k * 131U + static_cast<std::uint32_t>(i)) % cfg.vocab;
    const auto t0 = clk::now();
    std::uint32_t tok = eng.prefill(prompt, {table}).value();
    const double pf = std::chrono::duration<double>(clk::now() - t0).count();
    const double start = std::max(q.arrival_s, prefill_free);
    const double first = start + pf;
    prefill_free = first;
    const auto t1 = clk::now();
    for (std::uint32_t k = 1; k < q.output_tokens; ++k) tok = eng.decode(tok, q.input_tokens + k - 1, {table}).value();
    const double dc = std::chrono::duration<double>(clk::now() - t1).count();
    const double finish = std::max(first, decode_free) + dc;
    decode_free = finish;
    real_ttft.push_back(first - q.arrival_s);
    real_tpot.push_back((finish - first) / (q.output_tokens - 1));
    sim_ttft.push_back(sim->requests[i].ttft_s());
    sim_tpot.push_back(sim->requests[i].tpot_s());
  }
  auto mean = [](const std::vector<double>& v) {
    double s = 0;
    for (double x : v) s += x;
    return s / static_cast<double>(v.size());
  };
  auto p90 = [](std::vector<double> v) { return kp::percentile(v, 90); };
  const double rt = mean(real_ttft), st = mean(sim_ttft), rp = mean(real_tpot), sp = mean(sim_tpot);
  const double rt9 = p90(real_ttft), st9 = p90(sim_ttft), rp9 = p90(real_tpot), sp9 = p90(sim_tpot);
  std::printf("tiny engine measured: prefill %.0f tokens/s + %.3g s per token pair, decode %.3g s + %.3g s per KV token\n",
              hw->prefill.tokens_per_s, hw->prefill.attention_s_per_pair, hw->decode.s_per_seq, hw->decode.s_per_token);
  std::printf("%-10s %12s %12s %9s\n", "metric", "engine (s)", "planner (s)", "planner/engine");
  std::printf("%-10s %12.6f %12.6f %9.3f\n", "TTFT mean", rt, st, st / rt);
  std::printf("%-10s %12.6f %12.6f %9.3f\n", "TTFT p90", rt9, st9, st9 / rt9);
  std::printf("%-10s %12.6f %12.6f %9.3f\n", "TPOT mean", rp, sp, sp / rp);
  std::printf("%-10s %12.6f %12.6f %9.3f\n", "TPOT p90", rp9, sp9, sp9 / rp9);
  const bool ok = std::abs(st / rt - 1) <= 0.25 && std::abs(sp / rp - 1) <= 0.25;
  std::printf("within 25%%: %s\n", ok ? "yes" : "no");
  if (!quiet) std::fflush(stdout);
  if (!json_path.empty()) {
    std::ofstream f(json_path);
    f << json{{"validation", "tiny_engine"},
              {"requests", w->size()},
              {"engine", {{"ttft_mean_s", rt}, {"ttft_p90_s", rt9}, {"tpot_mean_s", rp}, {"tpot_p90_s", rp9}}},
              {"planner", {{"ttft_mean_s", st}, {"ttft_p90_s", st9}, {"tpot_mean_s", sp}, {"tpot_p90_s", sp9}}},
              {"within_25_percent", ok}}
             .dump(2)
      << "\n";
  }
  return ok ? 0 : 1;
}

// --links-from: every file's measurements, the figures chosen for `model`.
struct links_used {
  kp::link_figures figures;
  json as_json = json::object();
};

links_used load_links(const std::vector<std::string>& files, const std::string& network_transport,
                      const kp::model_shape& model, std::uint32_t block_tokens) {
  links_used out;
  if (files.empty()) {
    if (!network_transport.empty()) die("--network-transport needs --links-from");
    return out;
  }
  std::vector<kp::link_measurement> all;
  for (const auto& f : files) {
    std::ifstream in(f);
    if (!in) die("--links-from: cannot open '" + f + "'");
    std::stringstream ss;
    ss << in.rdbuf();
    auto m = kp::read_link_measurements(ss.str(), f);
    if (!m) die("--links-from: " + m.error().message());
    all.insert(all.end(), m->begin(), m->end());
  }
  auto chosen = kp::choose_links(all, static_cast<double>(model.kv_bytes_per_token()) * block_tokens, network_transport);
  if (!chosen) die("--links-from: " + chosen.error().message());
  out.figures = *chosen;
  auto one = [&](const char* what, const std::optional<kp::link_measurement>& m) {
    if (!m) return;
    out.as_json[what] = {{"gb_s", m->bytes_per_s / 1e9}, {"from", m->describe()}};
    std::cerr << "kvx-plan: " << what << " link from " << m->describe() << "\n";
  };
  one("network", chosen->network);
  one("dram", chosen->dram);
  one("ssd", chosen->ssd);
  return out;
}

// --validate-demo: the options kvx_pd_demo ran with (its defaults).
struct demo_options {
  std::string trace = "/work/shared/traces/conversation_trace.jsonl";
  double skip = 0, requests = 32, tokens_per_hash = 16, max_prompt = 320, max_output = 8, concurrency = 4,
         prefill = 2, decode = 2, cores = 0, cores_window_s = 0.25;
  double wake_burst_s = -1;  // < 0: measured (probe_wake_burst) around the demo
  std::string binary;  // run kvx_pd_demo first, measuring the CPU others used meanwhile
  std::string cores_from;  // an earlier --validate-demo --json: its modes' free_cores timelines
  std::string engine_speed;  // "mode", "colocated", "measured", or empty: the first the report has timings for
  bool fluid_sharing = false;  // --sharing fluid: every computing instance at min(1, cores / k), no run queues
};

// CPU seconds every core of this machine has spent busy since boot (/proc/stat).
double machine_busy_s() {
  std::ifstream in("/proc/stat");
  std::string cpu;
  double user = 0, nice = 0, sys = 0, idle = 0, iowait = 0, irq = 0, softirq = 0, steal = 0;
  if (!(in >> cpu >> user >> nice >> sys >> idle >> iowait >> irq >> softirq >> steal) || cpu != "cpu")
    die("cannot read /proc/stat to measure the CPU load");
  return (user + nice + sys + irq + softirq + steal) / static_cast<double>(::sysconf(_SC_CLK_TCK));
}

// CPU seconds of process `root` and of its children (each with its own
// reaped children), from /proc/PID/stat.
double tree_cpu_s(pid_t root) {
  double ticks = 0;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator("/proc", ec)) {
    const std::string name = e.path().filename().string();
    if (name.empty() || name.find_first_not_of("0123456789") != std::string::npos) continue;
    std::string text;
    try {
      std::ifstream in(e.path() / "stat");
      text.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    } catch (const std::ios_base::failure&) {
      continue;  // the process exited while being read (libstdc++ throws on ESRCH)
    }
    const auto close = text.rfind(')');
    if (close == std::string::npos) continue;
    std::istringstream fields(text.substr(close + 2));
    std::string f;
    long long ppid = -1;
    double t = 0;
    for (int i = 3; i <= 17 && fields >> f; ++i) {
      if (i == 4) ppid = std::atoll(f.c_str());
      if (i >= 14) t += std::atof(f.c_str());
    }
    if (std::atoll(name.c_str()) == root || ppid == root) ticks += t;
  }
  return ticks / static_cast<double>(::sysconf(_SC_CLK_TCK));
}

// kvx_pd_demo run by --demo-binary, with the CPU the machine and the demo's
// processes used sampled every 50 ms, and when each mode's replay began.
struct demo_run {
  struct sample {
    double t, machine_busy, demo;
  };
  std::vector<sample> samples;
  std::map<std::string, double> replay_start;  // mode -> seconds since the start
  double wall_s = 0;

  // Interpolated sample at time t.
  [[nodiscard]] sample at(double t) const {
    if (samples.empty()) return {t, 0, 0};
    if (t <= samples.front().t) return samples.front();
    for (std::size_t i = 1; i < samples.size(); ++i)
      if (samples[i].t >= t) {
        const auto& a = samples[i - 1];
        const auto& b = samples[i];
        const double f = b.t > a.t ? (t - a.t) / (b.t - a.t) : 0.0;
        return {t, a.machine_busy + f * (b.machine_busy - a.machine_busy), a.demo + f * (b.demo - a.demo)};
      }
    return samples.back();
  }
  // Cores other processes used over [t0, t1].
  [[nodiscard]] double others(double t0, double t1) const {
    const auto a = at(t0), b = at(t1);
    return t1 > t0 ? std::max(0.0, (b.machine_busy - a.machine_busy) - (b.demo - a.demo)) / (t1 - t0) : 0.0;
  }
  [[nodiscard]] double demo_cores(double t0, double t1) const {
    const auto a = at(t0), b = at(t1);
    return t1 > t0 ? (b.demo - a.demo) / (t1 - t0) : 0.0;
  }
  // The cores other processes left free over [t0, t1], in spans of
  // `window_s` (times from t0): what the demo's instances shared then.
  [[nodiscard]] kp::core_timeline free_cores(double t0, double t1, double machine_cores, double window_s) const {
    kp::core_timeline out;
    for (double a = t0; a < t1 || out.from_s.empty(); a += window_s) {
      const double b = std::min(t1, a + window_s);
      out.from_s.push_back(a - t0);
      out.cores.push_back(std::max(0.25, machine_cores - others(a, std::max(b, a + 1e-3))));
    }
    return out;
  }
};

demo_run run_demo(const std::vector<std::string>& args) {
  int fds[2];
  if (::pipe(fds) != 0) die("pipe failed");
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, fds[1], STDOUT_FILENO);
  posix_spawn_file_actions_addclose(&actions, fds[0]);
  std::vector<std::string> a = args;
  std::vector<char*> argv;
  for (auto& x : a) argv.push_back(x.data());
  argv.push_back(nullptr);
  pid_t pid = -1;
  const int rc = ::posix_spawnp(&pid, a[0].c_str(), &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  ::close(fds[1]);
  if (rc != 0) die("cannot start '" + a[0] + "': " + std::strerror(rc));
  demo_run run;
  std::mutex mu;
  bool done = false;
  const auto t0 = std::chrono::steady_clock::now();
  auto since = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); };
  std::thread sampler([&] {
    for (;;) {
      const demo_run::sample s{since(), machine_busy_s(), tree_cpu_s(pid)};
      {
        std::lock_guard l(mu);
        run.samples.push_back(s);
        if (done) return;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  });
  FILE* out = ::fdopen(fds[0], "r");
  char* line = nullptr;
  std::size_t cap = 0;
  while (out && ::getline(&line, &cap, out) > 0) {
    const std::string l = line;
    const auto ready = l.find(" worker processes ready");
    if (l.rfind("  ", 0) == 0 && ready != std::string::npos) {
      const auto colon = l.find(':');
      std::lock_guard lk(mu);
      run.replay_start[l.substr(2, colon - 2)] = since();
    }
    if (l.rfind("  ", 0) != 0) std::fputs(line, stdout);
  }
  std::free(line);
  if (out) std::fclose(out);
  // Exited but not reaped: its /proc entry still counts its CPU (and its
  // reaped workers') for the last sample.
  siginfo_t info{};
  ::waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED | WNOWAIT);
  {
    std::lock_guard l(mu);
    done = true;
  }
  sampler.join();
  run.wall_s = since();
  int status = 0;
  ::waitpid(pid, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
    die("kvx_pd_demo exited with status " + std::to_string(WIFEXITED(status) ? WEXITSTATUS(status) : -1));
  return run;
}

// The demo's percentile: linear interpolation between order statistics.
double interp_percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const double pos = p * static_cast<double>(v.size() - 1);
  const auto i = static_cast<std::size_t>(pos);
  const double f = pos - static_cast<double>(i);
  return i + 1 < v.size() ? v[i] * (1 - f) + v[i + 1] * f : v[i];
}

double mean_of(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x;
  return v.empty() ? 0.0 : s / static_cast<double>(v.size());
}

// A count option: a whole number in [lo, hi] (hi at most 2^32 - 1), checked before any cast.
std::uint32_t whole(double v, const char* what, double lo, double hi = 1e9) {
  if (!(v == std::floor(v) && v >= lo && v <= hi))
    die(std::string(what) + " must be a whole number from " + std::to_string(static_cast<std::uint64_t>(lo)) + " to " +
        std::to_string(static_cast<std::uint64_t>(hi)));
  return static_cast<std::uint32_t>(v);
}

int validate_demo(const std::string& report_path, const demo_options& o, const std::vector<std::string>& link_files,
                  const std::string& network_transport, const std::string& json_path) {
  const std::uint32_t K = whole(o.tokens_per_hash, "--demo-tokens-per-hash", 1);
  const std::uint32_t max_prompt = whole(o.max_prompt, "--demo-max-prompt", 2);
  const std::uint32_t max_output = whole(o.max_output, "--demo-max-output", 1);
  const std::uint32_t C = whole(o.concurrency, "--demo-concurrency", 1);
  const std::uint32_t P = whole(o.prefill, "--demo-prefill", 1), D = whole(o.decode, "--demo-decode", 1);
  const std::size_t skip = whole(o.skip, "--demo-skip", 0), nreq = whole(o.requests, "--demo-requests", 1);
  if (o.cores_window_s < 0.05) die("--cores-window must be at least 0.05 s (the CPU is sampled every 50 ms)");
  const double machine_cores = std::max(1U, std::thread::hardware_concurrency());
  // Cores the instances of each mode shared: --cores, or the machine's less
  // what other processes used while that mode's requests were replayed.
  std::optional<demo_run> ran;
  double cores_now = 0;
  std::string cores_from = "--cores";
  json cpu_json = json::object();
  // --cores-from: each mode's cores free as an earlier --validate-demo
  // --json recorded them (read now: a bad file fails before any measuring).
  struct recorded_cores {
    kp::core_timeline free;
    double mean = 0;  // over the replay (the mean-field column's cores)
    json cpu;
  };
  std::map<std::string, recorded_cores> recorded;  // by mode
  if (!o.cores_from.empty()) {
    if (!o.binary.empty()) die("--cores-from takes the cores free from an earlier run; with --demo-binary they are measured: give one");
    if (o.cores > 0) die("--cores-from and --cores both say which cores were free: give one");
    const json rec = read_json_file(o.cores_from);
    if (!rec.is_object() || rec.value("validation", std::string{}) != "kvx_pd_demo" || !rec.contains("modes") ||
        !rec["modes"].is_array())
      die(o.cores_from + ": not the --json output of kvx-plan --validate-demo");
    for (const auto& rm : rec["modes"]) {
      if (!rm.is_object()) die(o.cores_from + ": 'modes' holds something other than a mode's object");
      const std::string name = rm.value("mode", std::string{});
      try {
        kp::core_timeline t{rm.at("free_cores").at("from_s").get<std::vector<double>>(),
                            rm.at("free_cores").at("cores").get<std::vector<double>>()};
        if (auto v = t.validate(); !v) die(o.cores_from + ": mode '" + name + "': " + v.error().message());
        const double mean = std::accumulate(t.cores.begin(), t.cores.end(), 0.0) / static_cast<double>(t.cores.size());
        recorded[name] = {std::move(t), rm.value("cores", mean), rm.value("cpu", json::object())};
      } catch (const json::exception& e) {
        die(o.cores_from + ": mode '" + name + "': " + e.what());
      }
    }
  }
  // The scheduler's wake-up burst, measured under the load of the moment:
  // before and after the demo (not during: the probe would take its CPU).
  std::vector<kp::wake_burst> probes;
  auto probe = [&] {
    if (o.wake_burst_s >= 0) return;
    auto b = kp::probe_wake_burst({});
    if (!b) die(b.error().message());
    probes.push_back(*b);
  };
  probe();
  if (!o.binary.empty()) {
    auto fmt = [](double v) { return std::to_string(static_cast<std::uint64_t>(v)); };
    // stdbuf: the demo's progress lines (when each mode's replay starts) arrive as they are printed.
    const std::vector<std::string> args{"stdbuf", "-oL", o.binary, "--json", report_path, "--trace", o.trace, "--skip", fmt(o.skip),
                                        "--requests", fmt(o.requests), "--prefill", fmt(o.prefill), "--decode",
                                        fmt(o.decode), "--tokens-per-hash", fmt(o.tokens_per_hash), "--max-prompt",
                                        fmt(o.max_prompt), "--max-output", fmt(o.max_output), "--concurrency",
                                        fmt(o.concurrency), "--modes", "colocated,push,pull"};
    std::string shown;
    for (const auto& a : args) shown += (shown.empty() ? "" : " ") + a;
    std::printf("running: %s\n", shown.c_str());
    std::fflush(stdout);
    ran = run_demo(args);
    probe();
    cpu_json["wall_s"] = ran->wall_s;
    std::printf("during the demo (%.1f s): the demo's processes used %.2f cores, other processes %.2f of %g\n", ran->wall_s,
                ran->demo_cores(0, ran->wall_s), ran->others(0, ran->wall_s), machine_cores);
    if (o.cores <= 0) cores_from = "the cores other processes left free while the mode ran";
  } else if (!o.cores_from.empty()) {
    cores_from = "the cores other processes left free while the mode ran, as " + o.cores_from + " recorded them";
  } else if (o.cores <= 0) {
    const double busy0 = machine_busy_s();
    const auto t0 = std::chrono::steady_clock::now();
    std::this_thread::sleep_for(std::chrono::seconds(2));
    const double others = (machine_busy_s() - busy0) / std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    cores_now = std::max(0.25, machine_cores - others);
    cores_from = "the cores other processes leave free now (not during the demo: --demo-binary measures that)";
    cpu_json = {{"other_processes_cores_now", others}};
  }

  kp::core_timeline burst;  // only its wake_burst_s and wake_burst_speed
  json burst_json = json::array();
  if (o.wake_burst_s >= 0) {
    burst.wake_burst_s = o.wake_burst_s;
  } else {
    double s = 0, sp = 0;
    for (const auto& b : probes) {
      s += b.burst_s / static_cast<double>(probes.size());
      sp += b.speed / static_cast<double>(probes.size());
      burst_json.push_back({{"burst_s", b.burst_s}, {"p10_s", b.p10_s}, {"p90_s", b.p90_s}, {"speed", b.speed},
                            {"trials", b.trials}, {"capped", b.capped}});
      std::printf("wake-up burst probe: median %.2f ms (p10 %.2f, p90 %.2f) at %.3f of a core, %u of %u wakes never "
                  "preempted within %.0f ms\n",
                  b.burst_s * 1e3, b.p10_s * 1e3, b.p90_s * 1e3, b.speed, b.capped, b.trials,
                  kp::wake_probe_options{}.cap_s * 1e3);
    }
    burst.wake_burst_s = s;
    burst.wake_burst_speed = sp;
  }
  cpu_json["wake_burst"] = {{"burst_s", burst.wake_burst_s}, {"speed", burst.wake_burst_speed},
                            {"measured", o.wake_burst_s < 0}, {"probes", burst_json}};

  // The report, and that it was made from this trace slice.
  const json report = read_json_file(report_path);
  if (!report.is_object() || !report.contains("source") || !report["source"].is_string() || !report.contains("modes") ||
      !report["modes"].is_array())
    die(report_path + ": not a kvx_pd_demo --json report (needs 'source' and 'modes')");
  if (!o.cores_from.empty())
    for (const auto& m : report["modes"])
      if (const std::string name = m.value("mode", std::string{}); (name == "push" || name == "pull") && !recorded.contains(name))
        die(o.cores_from + ": no cores free recorded for mode '" + name + "' (not the validation of " + report_path + "?)");
  const std::string source = report["source"].get<std::string>();
  const std::string lines = " (lines " + std::to_string(skip + 1) + "..)";
  const std::string expected = o.trace + lines;
  bool same = source == expected;
  if (!same && source.size() > lines.size() && source.ends_with(lines)) {
    // The same file named another way (relative, or another checkout's copy).
    namespace fs = std::filesystem;
    const fs::path a = source.substr(0, source.size() - lines.size()), b = o.trace;
    std::error_code ec;
    same = fs::equivalent(a, b, ec) || (!fs::exists(a, ec) && a.filename() == b.filename());
  }
  if (!same)
    die(report_path + ": the demo replayed '" + source + "', not '" + expected +
        "' (give the demo's --trace and --demo-skip; the built-in synthetic workload cannot be compared)");

  // The demo's workload (examples/pd_demo/common.hpp, trace_workload): each
  // 512-token hash block becomes K tokens, prompts clamped to [2, max_prompt],
  // outputs to [1, max_output]; 16-token KV blocks.
  auto trace = kvx::cache::read_trace(o.trace);
  if (!trace) die(trace.error().message());
  if (trace->size() <= skip) die(o.trace + ": no requests after --demo-skip " + std::to_string(skip));
  constexpr std::uint32_t block = 16;
  std::vector<kvx::cache::trace_request> slice;
  std::vector<std::uint32_t> outputs;
  for (std::size_t i = skip; i < trace->size() && slice.size() < nreq; ++i) {
    const auto& t = (*trace)[i];
    const std::uint64_t from_ids = t.hash_ids.size() * std::uint64_t{K};
    const auto scaled = static_cast<std::uint64_t>(static_cast<double>(t.input_length) * K / 512.0);
    const auto prompt = static_cast<std::uint32_t>(std::clamp<std::uint64_t>(std::min(scaled, from_ids), 2, max_prompt));
    const auto out = static_cast<std::uint32_t>(
        std::clamp<std::uint64_t>(static_cast<std::uint64_t>(static_cast<double>(t.output_length) * K / 512.0), 1, max_output));
    // One id per 16-token KV block, from the hash ids whose tokens it holds
    // (equal hash-id prefixes give equal token prefixes, as in the demo).
    std::vector<std::uint64_t> ids;
    const std::uint32_t real = static_cast<std::uint32_t>(std::min<std::uint64_t>(prompt, from_ids));
    for (std::uint32_t b = 0; (b + 1) * block <= real; ++b) {
      std::uint64_t h = 0x9E3779B97F4A7C15ULL ^ (b * block % K);
      for (std::uint32_t tok = b * block; tok < (b + 1) * block; tok += std::min(block, K))
        h = (h ^ t.hash_ids[tok / K]) * 0xBF58476D1CE4E5B9ULL + 0x94D049BB133111EBULL;
      h ^= t.hash_ids[((b + 1) * block - 1) / K] * 0x9E3779B97F4A7C15ULL;
      ids.push_back(h >> 1);
    }
    // One output token more: the decode instance's first step stands for the
    // prompt tail it computes before its first token (push: the last prompt
    // token; pull: the tail past the pool's full blocks).
    slice.push_back({t.timestamp_ms, prompt, out + 1, std::move(ids)});
    outputs.push_back(out);
  }
  if (slice.size() != nreq)
    die(o.trace + ": only " + std::to_string(slice.size()) + " requests after --demo-skip, the demo replayed " +
        std::to_string(nreq));
  auto w = kp::workload::from_trace(slice, {.block_tokens = block, .time_scale = 1, .max_requests = 0, .concurrency = C});
  if (!w) die(w.error().message());

  // Every compared mode served the whole slice (checked before measuring).
  for (const auto& m : report["modes"]) {
    if (!m.is_object()) die(report_path + ": 'modes' holds something other than objects");
    const std::string name = m.value("mode", std::string{});
    if (name != "push" && name != "pull") continue;
    if (!m.contains("ttft_samples_s") || !m["ttft_samples_s"].is_array() || !m.contains("tpot_samples_s"))
      die(report_path + ": mode '" + name + "' has no ttft_samples_s / tpot_samples_s");
    if (m.value("errors", 0.0) != 0 || m.value("requests", 0.0) != static_cast<double>(nreq))
      die(report_path + ": mode '" + name + "' served " + std::to_string(static_cast<long long>(m.value("requests", 0.0))) +
          " requests with " + std::to_string(static_cast<long long>(m.value("errors", 0.0))) + " errors; expected " +
          std::to_string(nreq) + " without errors");
  }
  // The demo's model (examples/pd_demo/common.hpp, model_config), measured here.
  tiny::model_config cfg{};
  cfg.layers = 4;
  cfg.kv_heads = 4;
  cfg.q_per_kv = 2;
  cfg.head_dim = 32;
  cfg.block_tokens = 16;
  cfg.vocab = 512;
  kp::model_shape model = *kp::model_preset("tiny");
  model.name = "tiny (kvx_pd_demo: 8 query heads)";
  model.q_heads = 8;
  model.params = 512.0 * 256 + 4 * 6 * 256.0 * 256;
  kp::measure_options mo;
  mo.short_prompt = 64;
  mo.long_prompt = std::max(128U, max_prompt);
  mo.decode_steps = 16;
  mo.repeats = 5;
  // What is not timed (capacity, links); each speed below fills in the rest.
  kp::hardware base = kp::tiny_hardware_base(mo);
  base.decode.max_batch = 1;  // a demo decode instance runs one request at a time
  const auto links = load_links(link_files, network_transport, model, block);
  kp::apply_links(base, links.figures);
  std::printf("kvx_pd_demo report %s: %zu requests, %u in flight, %uP+%uD, %u tokens per hash block; network %.2f GB/s; "
              "cores shared by the instances: %s\n",
              report_path.c_str(), nreq, C, P, D, K, base.network_bytes_per_s / 1e9, cores_from.c_str());
  // The engine's speed, from where it was timed: measured here after the
  // demo, and fitted to what the demo's instances timed while they served
  // (each mode's own compute: CPU time, not latency; waits for a core,
  // queueing and transfers stay the planner's to predict). A speed measured
  // apart is another moment's: on a shared machine that differs by 20-50%
  // (docs/benchmarks/planner.md).
  struct engine_speed {
    kp::hardware hw;
    std::string from;
  };
  std::map<std::string, engine_speed> speeds;
  json speeds_json = json::object();
  auto coefficients = [](const kp::hardware& h) {
    return json{{"prefill_tokens_per_s", h.prefill.tokens_per_s}, {"attention_s_per_pair", h.prefill.attention_s_per_pair},
                {"decode_s_per_seq", h.decode.s_per_seq}, {"decode_s_per_token", h.decode.s_per_token},
                {"prefill_cv", h.prefill.cv}, {"decode_cv", h.decode.cv}};
  };
  for (const auto& m : report["modes"]) {
    const std::string name = m.value("mode", std::string{});
    if (!m.contains("compute_samples")) continue;
    if (!m["compute_samples"].is_array()) die(report_path + ": mode '" + name + "': 'compute_samples' is not an array");
    std::vector<kp::compute_sample> timed;
    for (const auto& c : m["compute_samples"]) {
      auto field = [&](const char* k) {
        if (!c.is_object() || !c.contains(k) || !c[k].is_number() || c[k].get<double>() < 0)
          die(report_path + ": mode '" + name + "': a compute sample without a non-negative number '" + k + "'");
        return c[k].get<double>();
      };
      auto tokens = [&](const char* k) {
        const double v = field(k);
        if (v > 1e9) die(report_path + ": mode '" + name + "': a compute sample's '" + k + "' is above 1000000000 tokens");
        return static_cast<std::uint32_t>(v);
      };
      const auto prompt = tokens("prompt"), out = tokens("output");
      // Decode steps 1..out-1 each read the prompt and the tokens before them.
      const double steps = out > 0 ? out - 1 : 0;
      timed.push_back({.prompt_tokens = prompt,
                       .cached_tokens = c.contains("cached") ? tokens("cached") : 0U,
                       .prefill_cpu_s = field("prefill_cpu_s"),
                       .decode_steps = static_cast<std::uint32_t>(steps),
                       .decode_kv_tokens = steps * prompt + steps * (steps + 1) / 2,
                       .decode_cpu_s = steps > 0 ? field("decode_cpu_s") : 0});  // one token: no decode step
    }
    if (timed.empty()) continue;
    auto fit = kp::fit_compute_speed(timed);
    if (!fit) die(report_path + ": mode '" + name + "': its compute timings: " + fit.error().message());
    auto h = base;
    h.prefill = fit->prefill;
    h.decode.step_s = fit->decode.step_s;
    h.decode.s_per_seq = fit->decode.s_per_seq;
    h.decode.s_per_token = fit->decode.s_per_token;
    // How far the requests' timings spread around the fitted model: each
    // simulated request draws its own factor with that spread (hardware.hpp).
    h.prefill.cv = fit->prefill_rms_relative;
    h.decode.cv = fit->decode_rms_relative;
    const auto pct = [](double r) { return std::to_string(static_cast<int>(r * 100 + 0.5)) + "%"; };
    speeds[name] = {h, "fitted to the demo's " + name + " run (" + std::to_string(fit->prefill_samples) + " prefills, rms " +
                           pct(fit->prefill_rms_relative) + "; " + std::to_string(fit->decode_samples) +
                           " decodes, rms " + pct(fit->decode_rms_relative) + ")"};
  }
  // The speed measured here (seconds of CPU): when asked for, when a mode
  // has no timings of its own nor the colocated run's, and after a demo run
  // (the comparison is part of its record).
  bool measure = !o.binary.empty() || o.engine_speed == "measured";
  for (const auto& m : report["modes"])
    if (const std::string name = m.value("mode", std::string{}); name == "push" || name == "pull")
      measure = measure || (o.engine_speed.empty() && !speeds.contains(name) && !speeds.contains("colocated"));
  std::optional<kp::hardware> measured;
  if (measure) {
    auto hw = kp::measure_tiny_hardware(cfg, mo);
    if (!hw) die(hw.error().message());
    hw->decode.max_batch = base.decode.max_batch;
    kp::apply_links(*hw, links.figures);
    measured = *hw;
    speeds["measured"] = {*hw, "measured here after the demo (fastest of 5)"};
  }
  if (!o.engine_speed.empty() && o.engine_speed != "mode" && !speeds.contains(o.engine_speed))
    die(report_path + ": --engine-speed " + o.engine_speed + " needs the " + o.engine_speed +
        " mode's compute_samples (run kvx_pd_demo with --modes colocated,push,pull; an older report: --engine-speed "
        "measured)");
  for (const auto& [name, sp] : speeds) {
    std::printf("tiny engine (demo model), %s: prefill %.0f tokens/s + %.3g s per token pair, decode %.3g s + %.3g s per "
                "KV token; spread per request %.0f%% / %.0f%%\n",
                sp.from.c_str(), sp.hw.prefill.tokens_per_s, sp.hw.prefill.attention_s_per_pair, sp.hw.decode.s_per_seq,
                sp.hw.decode.s_per_token, sp.hw.prefill.cv * 100, sp.hw.decode.cv * 100);
    speeds_json[name] = coefficients(sp.hw);
    speeds_json[name]["from"] = sp.from;
  }
  // Which speed a mode is predicted with: --engine-speed, or by default the
  // mode's own timings, else the colocated run's, else the one measured here.
  auto speed_for = [&](const std::string& mode) -> std::string {
    if (o.engine_speed == "mode") {
      if (!speeds.contains(mode))
        die(report_path + ": --engine-speed mode needs the " + mode + " mode's compute_samples (a report of an older "
                          "kvx_pd_demo: --engine-speed measured)");
      return mode;
    }
    if (!o.engine_speed.empty()) return o.engine_speed;
    for (const std::string& s : {mode, std::string("colocated")})
      if (speeds.contains(s)) return s;
    return "measured";
  };

  json out{{"validation", "kvx_pd_demo"}, {"report", report_path}, {"requests", nreq}, {"concurrency", C},
           {"prefill_instances", P}, {"decode_instances", D}, {"cores_from", cores_from},
           {"cpu", cpu_json},
           {"engine_speeds", speeds_json},
           {"links", links.as_json}, {"modes", json::array()}};
  if (measured)
    out["measured_hardware"] = {{"prefill_tokens_per_s", measured->prefill.tokens_per_s},
                                {"attention_s_per_pair", measured->prefill.attention_s_per_pair},
                                {"decode_s_per_seq", measured->decode.s_per_seq},
                                {"decode_s_per_token", measured->decode.s_per_token},
                                {"network_gb_s", measured->network_bytes_per_s / 1e9}};
  bool ok = true, any = false;
  std::printf("wake-up burst (the wake burst column, not gated): %.2f ms at %.3f of a core (%s)\n",
              burst.wake_burst_s * 1e3, burst.wake_burst_speed, o.wake_burst_s < 0 ? "measured" : "--wake-burst");
  std::printf("%-6s %-10s %11s %11s %9s %11s %9s %11s %9s %11s\n", "mode", "metric", "demo (s)", "planner (s)", "ratio",
              "wake burst", "ratio", "mean-field", "ratio", "dedicated");
  for (const auto& m : report["modes"]) {
    const std::string name = m.value("mode", std::string{});
    if (name != "push" && name != "pull") continue;  // colocated: see docs/planner.md
    any = true;
    double cores = o.cores > 0 ? o.cores : cores_now;
    json mode_cpu = json::object();
    std::optional<kp::core_timeline> timeline;
    if (ran && o.cores <= 0) {
      if (!ran->replay_start.contains(name)) die("kvx_pd_demo did not say when mode '" + name + "' started");
      const double t0 = ran->replay_start[name], t1 = t0 + m.value("wall_s", 0.0);
      timeline = ran->free_cores(t0, t1, machine_cores, o.cores_window_s);
      const double others = ran->others(t0, t1);
      cores = std::max(0.25, machine_cores - others);
      mode_cpu = {{"from_s", t0}, {"to_s", t1}, {"other_processes_cores", others}, {"demo_cores", ran->demo_cores(t0, t1)}};
      std::printf("%-6s replay %.1f-%.1f s: the demo's processes used %.2f cores, other processes %.2f\n", name.c_str(), t0, t1,
                  ran->demo_cores(t0, t1), others);
    } else if (!o.cores_from.empty()) {
      const auto& r = recorded.at(name);  // checked with the report
      timeline = r.free;
      cores = std::max(0.25, r.mean);
      mode_cpu = r.cpu;
    }
    const std::string speed = speed_for(name);
    const kp::hardware& mhw = speeds.at(speed).hw;
    std::printf("%-6s engine speed: %s\n", name.c_str(), speeds.at(speed).from.c_str());
    const auto demo_ttft = m["ttft_samples_s"].get<std::vector<double>>();
    const auto demo_tpot = m["tpot_samples_s"].get<std::vector<double>>();
    kp::deployment d;
    d.mode = kp::serving_mode::disaggregated;
    d.prefill_instances = P;
    d.decode_instances = D;
    d.dram_gb = name == "pull" ? 0.1 : 0;  // two 48 MiB store nodes
    d.eviction = "lru";
    d.early_rejection = false;
    // The demo's TTFT ends with the decode instance's first step (it computes
    // the prompt's tail), its TPOT averages the steps after it.
    auto metrics = [&](const kp::sim_report& rep) {
      std::vector<double> ttft, tpot;
      for (std::size_t i = 0; i < w->size(); ++i) {
        const auto& q = rep.requests[i];
        if (!q.completed()) die("the simulation did not complete request " + std::to_string(i));
        ttft.push_back(q.first_step_s - q.arrival_s);
        if (outputs[i] > 1) tpot.push_back((q.finish_s - q.first_step_s) / (outputs[i] - 1));
      }
      return std::pair{ttft, tpot};
    };
    // Processor sharing over the cores free at each moment of the replay.
    if (!timeline) timeline = kp::core_timeline::constant(cores);
    // Per-core run queues (the machine's cores) unless --sharing fluid.
    timeline->run_queues = o.fluid_sharing ? 0U : static_cast<std::uint32_t>(machine_cores);
    auto shared = kp::simulate_processor_sharing(*w, model, mhw, d, {}, *timeline);
    if (!shared) die(shared.error().message());
    const auto sim = metrics(*shared);
    // With the scheduler's wake-up burst, for comparison: it gets the short
    // decodes right but not the gated figures (docs/benchmarks/planner.md).
    auto with_burst = *timeline;
    with_burst.run_queues = 0;  // the burst models fluid sharing
    with_burst.wake_burst_s = burst.wake_burst_s;
    with_burst.wake_burst_speed = burst.wake_burst_speed;
    auto bursting = kp::simulate_processor_sharing(*w, model, mhw, d, {}, with_burst);
    if (!bursting) die(bursting.error().message());
    const auto wb = metrics(*bursting);
    // The mean-field model (one slowdown per kind of work), for comparison.
    auto mean_field = kp::simulate_shared_cores(*w, model, mhw, d, {}, cores);
    if (!mean_field) die(mean_field.error().message());
    const auto mf = metrics(mean_field->report);
    const std::pair slowdown{mean_field->prefill_slowdown, mean_field->decode_slowdown};
    auto dedicated = kp::simulate(*w, model, mhw, d, {});
    if (!dedicated) die(dedicated.error().message());
    const auto ded = metrics(*dedicated);
    json mj{{"mode", name}, {"engine_speed", speed}, {"cores", cores}, {"cpu", mode_cpu}, {"prefill_slowdown", slowdown.first},
            {"decode_slowdown", slowdown.second}, {"metrics", json::array()},
            {"free_cores", {{"from_s", timeline->from_s}, {"cores", timeline->cores}}}};
    // Request by request (the demo's samples are in request order; its TPOT
    // samples skip one-token answers), to see which requests differ.
    json per = json::array();
    for (std::size_t i = 0, k = 0; i < w->size(); ++i) {
      const auto& q = shared->requests[i];
      json one{{"prompt_tokens", (*w)[i].input_tokens}, {"output_tokens", outputs[i]},
               {"planner_arrival_s", q.arrival_s}, {"planner_ttft_s", sim.first[i]},
               {"demo_ttft_s", i < demo_ttft.size() ? json(demo_ttft[i]) : json(nullptr)}};
      if (outputs[i] > 1) {
        one["planner_tpot_s"] = sim.second[k];
        one["planner_wake_burst_tpot_s"] = wb.second[k];
        one["demo_tpot_s"] = k < demo_tpot.size() ? json(demo_tpot[k]) : json(nullptr);
        ++k;
      }
      per.push_back(std::move(one));
    }
    mj["requests"] = std::move(per);
    auto row = [&](const char* metric, auto stat, bool of_tpot, bool gated) {
      auto pick = [of_tpot](const auto& p) -> const std::vector<double>& { return of_tpot ? p.second : p.first; };
      const double demo = stat(of_tpot ? demo_tpot : demo_ttft), plan = stat(pick(sim)), mean_field_s = stat(pick(mf)),
                   dedicated_s = stat(pick(ded)), burst_s = stat(pick(wb));
      const double ratio = demo > 0 ? plan / demo : 0.0;
      const bool within = std::abs(ratio - 1) <= 0.25;
      if (gated) ok = ok && within;
      const double mf_ratio = demo > 0 ? mean_field_s / demo : 0.0, wb_ratio = demo > 0 ? burst_s / demo : 0.0;
      std::printf("%-6s %-10s %11.4f %11.4f %9.3f %11.4f %9.3f %11.4f %9.3f %11.4f%s\n", name.c_str(), metric, demo, plan,
                  ratio, burst_s, wb_ratio, mean_field_s, mf_ratio, dedicated_s,
                  gated ? (within ? "" : "  (beyond 25%)") : "  (not gated)");
      mj["metrics"].push_back({{"metric", metric}, {"demo_s", demo}, {"planner_s", plan}, {"ratio", ratio},
                               {"planner_wake_burst_s", burst_s}, {"wake_burst_ratio", wb_ratio},
                               {"planner_mean_field_s", mean_field_s}, {"mean_field_ratio", mf_ratio},
                               {"planner_dedicated_cores_s", dedicated_s}, {"gated", gated}, {"within_25_percent", within}});
    };
    auto p50 = [](const std::vector<double>& v) { return interp_percentile(v, 0.5); };
    auto p90 = [](const std::vector<double>& v) { return interp_percentile(v, 0.9); };
    row("TTFT mean", mean_of, false, true);
    row("TTFT p50", p50, false, false);
    row("TTFT p90", p90, false, true);
    row("TPOT mean", mean_of, true, true);
    row("TPOT p50", p50, true, false);
    row("TPOT p90", p90, true, true);
    auto gated_ratios = [&](const std::string& label, const kp::hardware& h, const kp::core_timeline& c) {
      auto r = kp::simulate_processor_sharing(*w, model, h, d, {}, c);
      if (!r) die(r.error().message());
      const auto mt = metrics(*r);
      auto ratio = [](double plan, double demo) { return demo > 0 ? plan / demo : 0.0; };
      const double rs[4] = {ratio(mean_of(mt.first), mean_of(demo_ttft)), ratio(p90(mt.first), p90(demo_ttft)),
                            ratio(mean_of(mt.second), mean_of(demo_tpot)), ratio(p90(mt.second), p90(demo_tpot))};
      const bool all = std::all_of(std::begin(rs), std::end(rs), [](double x) { return std::abs(x - 1) <= 0.25; });
      std::printf("%-6s %-34s TTFT mean %.3f, p90 %.3f; TPOT mean %.3f, p90 %.3f%s\n", name.c_str(), label.c_str(), rs[0],
                  rs[1], rs[2], rs[3], all ? "" : "  (some beyond 25%)");
      return json{{"ttft_mean_ratio", rs[0]}, {"ttft_p90_ratio", rs[1]}, {"tpot_mean_ratio", rs[2]},
                  {"tpot_p90_ratio", rs[3]}, {"within_25_percent", all}};
    };
    // The same prediction with each speed the engine was timed at (how much
    // of the difference is the speed's moment), and with the other sharing model.
    json by_speed = json::object();
    for (const std::string& other : {name, std::string("colocated"), std::string("measured")})
      if (speeds.contains(other) && !by_speed.contains(other))
        by_speed[other] = gated_ratios("with the speed of " + other + ":", speeds.at(other).hw, *timeline);
    mj["gated_ratios_by_engine_speed"] = std::move(by_speed);
    auto other_sharing = *timeline;
    other_sharing.run_queues = o.fluid_sharing ? static_cast<std::uint32_t>(machine_cores) : 0U;
    mj["gated_ratios_other_sharing"] =
        gated_ratios(o.fluid_sharing ? "with per-core run queues:" : "with fluid sharing (no run queues):", mhw,
                     other_sharing);
    auto no_spread = mhw;
    no_spread.prefill.cv = no_spread.decode.cv = 0;
    mj["gated_ratios_without_spread"] = gated_ratios("without the per-request spread:", no_spread, *timeline);
    std::printf("%-6s planner: %s over %zu spans of the cores free (mean %.2f); wake burst: fluid sharing with the burst; "
                "mean-field: prefill x%.2f, decode x%.2f from %.2f cores; dedicated: a core per instance\n",
                name.c_str(), o.fluid_sharing ? "fluid processor sharing" : "per-core run queues", timeline->cores.size(),
                cores, slowdown.first, slowdown.second, cores);
    out["modes"].push_back(mj);
  }
  if (!any) die(report_path + ": no push or pull mode in the report (run the demo with --modes push,pull or the default)");
  std::printf("gated (TTFT and TPOT mean and p90 of each mode) within 25%%: %s\n", ok ? "yes" : "no");
  out["within_25_percent"] = ok;
  if (!json_path.empty()) {
    std::ofstream f(json_path);
    if (!f) die("cannot write '" + json_path + "'");
    f << out.dump(2) << "\n";
  }
  return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  std::string trace_path, model_arg, hw_arg, json_path;
  std::string modes_arg = "disagg,colocated", prefill_arg = "1-4", decode_arg = "1-2", colo_arg;
  std::string hbm_arg = "0,100", dram_arg = "0,2000", ssd_arg = "0", ev_arg = "lru", rt_arg = "cache_aware";
  double time_scale = 1, token_scale = 1, max_batch = 0, chunk = 2048, runner_ups = 4, jobs = 1, max_requests = 0, block_tokens = 512;
  kp::slo_target slo{.ttft_s = 2, .ttft_percentile = 90, .tpot_s = 0.1, .tpot_percentile = 90};
  bool measure = false, exhaustive = false, quiet = false, early = true, validate = false;
  std::vector<std::string> link_files;
  std::string network_transport, demo_report;
  demo_options demo;
  bool trace_given = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) die(a + " needs a value");
      return argv[++i];
    };
    if (a == "--help" || a == "-h") {
      std::cout << usage;
      return 0;
    }
    if (a == "--trace") trace_path = next(), trace_given = true;
    else if (a == "--links-from") link_files.push_back(next());
    else if (a == "--network-transport") network_transport = next();
    else if (a == "--validate-demo") demo_report = next();
    else if (a == "--demo-skip") demo.skip = number(next(), a);
    else if (a == "--demo-requests") demo.requests = number(next(), a);
    else if (a == "--demo-tokens-per-hash") demo.tokens_per_hash = number(next(), a);
    else if (a == "--demo-max-prompt") demo.max_prompt = number(next(), a);
    else if (a == "--demo-max-output") demo.max_output = number(next(), a);
    else if (a == "--demo-concurrency") demo.concurrency = number(next(), a);
    else if (a == "--demo-prefill") demo.prefill = number(next(), a);
    else if (a == "--demo-decode") demo.decode = number(next(), a);
    else if (a == "--cores") demo.cores = number(next(), a);
    else if (a == "--cores-window") demo.cores_window_s = number(next(), a);
    else if (a == "--cores-from") demo.cores_from = next();
    else if (a == "--wake-burst") {
      demo.wake_burst_s = number(next(), a);
      if (!(demo.wake_burst_s >= 0 && demo.wake_burst_s <= 1)) die("--wake-burst must be between 0 and 1 s");
    }
    else if (a == "--demo-binary") demo.binary = next();
    else if (a == "--sharing") {
      const std::string v = next();
      if (v != "per-core" && v != "fluid") die("--sharing must be 'per-core' or 'fluid', not '" + v + "'");
      demo.fluid_sharing = v == "fluid";
    }
    else if (a == "--engine-speed") {
      demo.engine_speed = next();
      if (demo.engine_speed != "mode" && demo.engine_speed != "colocated" && demo.engine_speed != "measured")
        die("--engine-speed must be 'mode', 'colocated' or 'measured', not '" + demo.engine_speed + "'");
    }
    else if (a == "--block-tokens") block_tokens = number(next(), a);
    else if (a == "--time-scale") time_scale = number(next(), a);
    else if (a == "--token-scale") token_scale = number(next(), a);
    else if (a == "--max-requests") max_requests = number(next(), a);
    else if (a == "--model") model_arg = next();
    else if (a == "--hardware") hw_arg = next();
    else if (a == "--measure") measure = true;
    else if (a == "--max-batch") max_batch = number(next(), a);
    else if (a == "--ttft") slo.ttft_s = number(next(), a);
    else if (a == "--ttft-percentile") slo.ttft_percentile = number(next(), a);
    else if (a == "--tpot") slo.tpot_s = number(next(), a);
    else if (a == "--tpot-percentile") slo.tpot_percentile = number(next(), a);
    else if (a == "--modes") modes_arg = next();
    else if (a == "--prefill") prefill_arg = next();
    else if (a == "--decode") decode_arg = next();
    else if (a == "--colocated") colo_arg = next();
    else if (a == "--hbm-cache-gb") hbm_arg = next();
    else if (a == "--dram-gb") dram_arg = next();
    else if (a == "--ssd-gb") ssd_arg = next();
    else if (a == "--evictions") ev_arg = next();
    else if (a == "--routings") rt_arg = next();
    else if (a == "--chunk-tokens") chunk = number(next(), a);
    else if (a == "--no-early-rejection") early = false;
    else if (a == "--runner-ups") runner_ups = number(next(), a);
    else if (a == "--exhaustive") exhaustive = true;
    else if (a == "--jobs") jobs = number(next(), a);
    else if (a == "--json") json_path = next();
    else if (a == "--quiet") quiet = true;
    else if (a == "--validate-tiny") validate = true;
    else die("unknown option '" + a + "' (see --help)");
  }
  if (validate) return validate_tiny(quiet, json_path);
  if (!demo_report.empty()) {
    if (trace_given) demo.trace = trace_path;
    try {
      return validate_demo(demo_report, demo, link_files, network_transport, json_path);
    } catch (const json::exception& e) {  // a field of the wrong type, in the report or the --cores-from file
      die(demo_report + (demo.cores_from.empty() ? "" : " or " + demo.cores_from) + ": a field has the wrong type (" +
          e.what() + ")");
    }
  }
  if (trace_path.empty()) die("--trace is required (see --help)");
  if (model_arg.empty()) die("--model is required (see --help)");
  if (hw_arg.empty() && !measure) die("--hardware or --measure is required (see --help)");
  if (auto ok = slo.validate(); !ok) die(ok.error().message());
  const auto wall0 = std::chrono::steady_clock::now();

  // Model.
  kp::model_shape model;
  if (is_file(model_arg)) {
    const json doc = read_json_file(model_arg);
    auto m = kp::model_from_config(kvx::config::view(doc));
    if (!m) die(model_arg + ": " + m.error().message());
    model = *m;
  } else {
    auto m = kp::model_preset(model_arg);
    if (!m) die(m.error().message());
    model = *m;
  }
  // Hardware.
  kp::hardware hw;
  if (measure) {
    auto h = kp::measure_tiny_hardware(tiny::model_config{});
    if (!h) die(h.error().message());
    hw = *h;
  } else {
    std::string path = hw_arg;
    if (!is_file(path)) path = std::string(KVX_PLAN_PRESETS_DIR) + "/" + hw_arg + ".json";
    if (!is_file(path)) die("--hardware '" + hw_arg + "' is neither a file nor a preset in " KVX_PLAN_PRESETS_DIR);
    const json doc = read_json_file(path);
    auto h = kp::hardware_from_config(kvx::config::view(doc), model);
    if (!h) die(path + ": " + h.error().message());
    hw = *h;
  }
  if (max_batch > 0) hw.decode.max_batch = whole(max_batch, "--max-batch", 1, 1e6);
  whole(block_tokens, "--block-tokens", 1, 1 << 20);
  if (!(token_scale > 0)) die("--token-scale must be positive");
  if (block_tokens * token_scale > 1 << 20) die("--block-tokens times --token-scale must be at most 1048576");
  const auto links = load_links(link_files, network_transport, model, static_cast<std::uint32_t>(std::max(1.0, block_tokens * token_scale)));
  kp::apply_links(hw, links.figures);
  if (auto ok = hw.validate(); !ok) die(ok.error().message());

  // Workload.
  auto trace = kvx::cache::read_trace(trace_path);
  if (!trace) die(trace.error().message());
  if (token_scale != 1) {
    const double scaled_block = block_tokens * token_scale;
    if (scaled_block < 1 || scaled_block != std::floor(scaled_block))
      die("--token-scale " + std::to_string(token_scale) + " makes " + std::to_string(scaled_block) +
          "-token blocks: --block-tokens times --token-scale must be a whole number >= 1");
    block_tokens = scaled_block;
    for (auto& r : *trace) {
      r.input_length = std::max<std::uint64_t>(1, static_cast<std::uint64_t>(std::llround(static_cast<double>(r.input_length) * token_scale)));
      r.output_length = std::max<std::uint64_t>(1, static_cast<std::uint64_t>(std::llround(static_cast<double>(r.output_length) * token_scale)));
      const std::uint64_t blocks = (r.input_length + static_cast<std::uint64_t>(block_tokens) - 1) / static_cast<std::uint64_t>(block_tokens);
      if (r.hash_ids.size() > blocks) r.hash_ids.resize(blocks);  // rounding
    }
  }
  if (!(time_scale > 0)) die("--time-scale must be positive");
  auto w = kp::workload::from_trace(*trace, {.block_tokens = static_cast<std::uint32_t>(block_tokens),
                                             .time_scale = time_scale,
                                             .max_requests = whole(max_requests, "--max-requests", 0)});
  if (!w) die(trace_path + ": " + w.error().message());

  // Space.
  kp::search_space space;
  space.modes.clear();
  for (const auto& m : split(modes_arg)) {
    if (m == "disagg" || m == "disaggregated") space.modes.push_back(kp::serving_mode::disaggregated);
    else if (m == "colocated") space.modes.push_back(kp::serving_mode::colocated);
    else die("unknown mode '" + m + "' (known: disagg, colocated)");
  }
  space.prefill_instances = counts(prefill_arg, "--prefill");
  space.decode_instances = counts(decode_arg, "--decode");
  if (!colo_arg.empty()) space.colocated_instances = counts(colo_arg, "--colocated");
  space.hbm_cache_gb = numbers(hbm_arg, "--hbm-cache-gb");
  space.dram_gb = numbers(dram_arg, "--dram-gb");
  space.ssd_gb = numbers(ssd_arg, "--ssd-gb");
  space.evictions = split(ev_arg);
  space.routings = split(rt_arg);
  if (space.evictions.empty() || space.routings.empty()) die("--evictions and --routings need a value");
  space.base.chunk_tokens = whole(chunk, "--chunk-tokens", 1, 1 << 24);
  space.base.early_rejection = early;
  auto candidates = kp::enumerate(space);
  for (const auto& d : candidates)
    if (auto ok = d.validate(hw); !ok) die(ok.error().message());
  // A bad policy name is reported before a long search.
  for (const auto& ev : space.evictions)
    if (auto c = kp::block_cache::make(ev, 1); !c) die("--evictions: " + c.error().message());

  if (!quiet)
    std::cerr << "kvx-plan: " << w->size() << " requests over " << w->span_s() << " s, " << candidates.size()
              << " candidate deployments, model " << model.name << " (" << model.kv_bytes_per_token()
              << " KV bytes/token), hardware " << hw.name << "\n";
  auto evaluate = [&](const kp::deployment& d) { return kp::simulate(*w, model, hw, d, slo); };
  kp::search_options opt{.runner_ups = whole(runner_ups, "--runner-ups", 0, 1e6),
                         .exhaustive = exhaustive,
                         .jobs = std::max(1U, whole(jobs, "--jobs", 0, 1024))};
  const auto search0 = std::chrono::steady_clock::now();
  if (!quiet)
    opt.progress = [&](std::size_t done, std::size_t total, const kp::sim_report& r) {
      const double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - search0).count();
      std::fprintf(stderr, "\r[%zu/%zu %.1fs] %-52s SLO %5.1f%% %s   ", done, total, el, r.label.c_str(),
                   100 * r.slo_attainment, r.meets_slo ? "ok" : "--");
    };
  auto found = kp::search(candidates, hw, evaluate, opt);
  if (!found) die(found.error().message());
  const double search_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - search0).count();
  if (!quiet) std::fprintf(stderr, "\n");

  // Table.
  print_header();
  for (std::size_t i = 0; i < found->evaluated.size(); ++i) {
    const auto& c = found->evaluated[i];
    const char* tag = found->best && *found->best == i ? "BEST"
                      : std::find(found->runner_ups.begin(), found->runner_ups.end(), i) != found->runner_ups.end()
                          ? "ok"
                          : (c.report.meets_slo ? "ok" : "");
    print_row(c.config, c.report, tag);
  }
  std::printf("simulated %zu of %zu deployments in %.2f s (%.3f s each)\n", found->evaluated.size(), found->candidates,
              search_s, search_s / static_cast<double>(std::max<std::size_t>(1, found->evaluated.size())));

  json out;
  out["tool"] = "kvx-plan";
  out["model"] = {{"name", model.name},     {"layers", model.layers},     {"q_heads", model.q_heads},
                  {"kv_heads", model.kv_heads}, {"head_dim", model.head_dim}, {"dtype_bytes", model.dtype_bytes},
                  {"params", model.params}, {"kv_bytes_per_token", model.kv_bytes_per_token()}};
  out["hardware"] = {{"name", hw.name},
                     {"prefill", {{"tokens_per_s", hw.prefill.tokens_per_s}, {"overhead_s", hw.prefill.overhead_s},
                                  {"attention_s_per_pair", hw.prefill.attention_s_per_pair}}},
                     {"decode", {{"step_s", hw.decode.step_s}, {"s_per_seq", hw.decode.s_per_seq},
                                 {"s_per_token", hw.decode.s_per_token}, {"max_batch", hw.decode.max_batch}}},
                     {"kv_capacity_gb", hw.kv_capacity_bytes / 1e9},
                     {"network_gb_s", hw.network_bytes_per_s / 1e9},
                     {"ssd_gb_s", hw.ssd_bytes_per_s / 1e9},
                     {"dram_gb_s", hw.dram_bytes_per_s / 1e9},
                     {"links_measured", links.as_json},
                     {"price_per_hour", hw.price_per_hour},
                     {"dram_price_per_gb_hour", hw.dram_price_per_gb_hour},
                     {"ssd_price_per_gb_hour", hw.ssd_price_per_gb_hour}};
  out["trace"] = {{"path", trace_path},         {"requests", w->size()},
                  {"span_s", w->span_s()},      {"time_scale", time_scale}, {"token_scale", token_scale},
                  {"input_tokens", w->input_tokens()}, {"output_tokens", w->output_tokens()},
                  {"block_tokens", w->block_tokens()}};
  out["slo"] = {{"ttft_s", slo.ttft_s}, {"ttft_percentile", slo.ttft_percentile}, {"tpot_s", slo.tpot_s},
                {"tpot_percentile", slo.tpot_percentile}, {"early_rejection", early}};
  out["candidates"] = found->candidates;
  out["search_seconds"] = search_s;
  out["evaluated"] = json::array();
  for (const auto& c : found->evaluated) out["evaluated"].push_back(report_json(c.config, c.report));
  out["best"] = found->best ? report_json(found->evaluated[*found->best].config, found->evaluated[*found->best].report)
                            : json(nullptr);
  out["runner_ups"] = json::array();
  for (auto i : found->runner_ups) out["runner_ups"].push_back(report_json(found->evaluated[i].config, found->evaluated[i].report));

  // Distributions, and Mooncake's comparison: the cheapest feasible
  // disaggregated deployment with a shared pool against colocated serving
  // without any cache on as many instances.
  out["cdf"] = json::array();
  auto rerun = [&](const std::string& role, const kp::deployment& d) {
    auto r = kp::simulate(*w, model, hw, d, slo);
    if (!r) die(r.error().message());
    out["cdf"].push_back(cdf_json(role, d, *r));
    return std::move(*r);
  };
  if (found->best) {
    rerun("best", found->evaluated[*found->best].config);
    for (std::size_t k = 0; k < std::min<std::size_t>(2, found->runner_ups.size()); ++k)
      rerun("runner_up", found->evaluated[found->runner_ups[k]].config);
    const auto& b = found->evaluated[*found->best];
    std::printf("cheapest deployment meeting the SLOs: %s, $%.2f/hour, $%.3f per M input tokens, $%.3f per M output "
                "tokens\n",
                b.config.label().c_str(), b.report.cost_per_hour, b.report.usd_per_m_input_tokens,
                b.report.usd_per_m_output_tokens);
  } else {
    std::printf("no deployment in the search space meets the SLOs\n");
  }
  const kp::candidate_result* pooled = nullptr;
  for (const auto& c : found->evaluated)
    if (c.config.mode == kp::serving_mode::disaggregated && (c.config.dram_gb > 0 || c.config.ssd_gb > 0) &&
        c.report.meets_slo) {
      pooled = &c;
      break;
    }
  if (pooled) {
    kp::deployment base = space.base;
    base.mode = kp::serving_mode::colocated;
    base.prefill_instances = pooled->config.instances();
    base.decode_instances = 0;
    base.routing = pooled->config.routing;
    rerun("disagg_pool", pooled->config);
    const auto r = rerun("baseline", base);
    const auto& p = pooled->report;
    out["comparison"] = {{"disagg_pool", report_json(pooled->config, p)},
                         {"colocated_no_cache", report_json(base, r)},
                         {"goodput_ratio", r.goodput_rps > 0 ? json(p.goodput_rps / r.goodput_rps) : json(nullptr)},
                         {"attainment_ratio", r.slo_attainment > 0 ? json(p.slo_attainment / r.slo_attainment) : json(nullptr)}};
    std::printf("Mooncake's comparison, same instance count:\n");
    print_row(pooled->config, p, "P/D");
    print_row(base, r, "colo");
    std::printf("requests served within the SLOs: %.1f%% vs %.1f%% (x%.2f), goodput %.3f vs %.3f req/s\n",
                100 * p.slo_attainment, 100 * r.slo_attainment,
                r.slo_attainment > 0 ? p.slo_attainment / r.slo_attainment : 0.0, p.goodput_rps, r.goodput_rps);
  }
  out["seconds"] = std::chrono::duration<double>(std::chrono::steady_clock::now() - wall0).count();
  if (!json_path.empty()) {
    std::ofstream f(json_path);
    if (!f) die("cannot write '" + json_path + "'");
    f << out.dump(2) << "\n";
  }
  return 0;
}
