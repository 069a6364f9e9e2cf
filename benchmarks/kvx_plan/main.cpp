// kvx-plan: from a model, a workload trace and SLOs to the cheapest
// prefill/decode deployment that meets them, by simulating candidates with
// kvx's own router and eviction policies (kvx/disagg/planner/*.hpp).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <kvx/cache/trace.hpp>
#include <kvx/disagg/layouts/layer_first.hpp>
#include <kvx/disagg/planner/block_cache.hpp>
#include <kvx/disagg/planner/deployment.hpp>
#include <kvx/disagg/planner/hardware.hpp>
#include <kvx/disagg/planner/measure.hpp>
#include <kvx/disagg/planner/model_shape.hpp>
#include <kvx/disagg/planner/search.hpp>
#include <kvx/disagg/planner/simulator.hpp>
#include <kvx/disagg/planner/workload.hpp>
#include <kvx/disagg/tiny_engine.hpp>

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
  --model M               a preset (llama-3-8b, llama-3-70b, llama-3-405b, qwen2.5-32b,
                          qwen2.5-72b, mistral-7b, tiny) or a JSON file
  --hardware H            a preset in the presets folder (h100x8, h200x8, a100x8) or a JSON
                          file: per-instance cost model, links and prices (docs/planner.md)
  --measure               take the cost model from kvx's tiny engine measured on this
                          machine instead (use with --model tiny)
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
      for (double v = a; v <= b; v += 1) out.push_back(v);
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
  kd::tiny_config cfg{};
  auto hw = kp::measure_tiny_hardware(cfg, {.network_gb_s = 1000});
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
  auto eng = kd::tiny_engine<kd::layouts::layer_first>::make(cfg, layout, pool).value();
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

}  // namespace

int main(int argc, char** argv) {
  std::string trace_path, model_arg, hw_arg, json_path;
  std::string modes_arg = "disagg,colocated", prefill_arg = "1-4", decode_arg = "1-2", colo_arg;
  std::string hbm_arg = "0,100", dram_arg = "0,2000", ssd_arg = "0", ev_arg = "lru", rt_arg = "cache_aware";
  double time_scale = 1, max_batch = 0, chunk = 2048, runner_ups = 4, jobs = 1, max_requests = 0, block_tokens = 512;
  kp::slo_target slo{.ttft_s = 2, .ttft_percentile = 90, .tpot_s = 0.1, .tpot_percentile = 90};
  bool measure = false, exhaustive = false, quiet = false, early = true, validate = false;
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
    if (a == "--trace") trace_path = next();
    else if (a == "--block-tokens") block_tokens = number(next(), a);
    else if (a == "--time-scale") time_scale = number(next(), a);
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
    auto h = kp::measure_tiny_hardware(kd::tiny_config{});
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
  if (max_batch > 0) hw.decode.max_batch = static_cast<std::uint32_t>(max_batch);

  // Workload.
  auto trace = kvx::cache::read_trace(trace_path);
  if (!trace) die(trace.error().message());
  if (block_tokens < 1 || block_tokens != std::floor(block_tokens)) die("--block-tokens must be a whole number >= 1");
  if (!(time_scale > 0)) die("--time-scale must be positive");
  auto w = kp::workload::from_trace(*trace, {.block_tokens = static_cast<std::uint32_t>(block_tokens),
                                             .time_scale = time_scale,
                                             .max_requests = static_cast<std::size_t>(max_requests)});
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
  if (chunk < 1) die("--chunk-tokens must be >= 1");
  space.base.chunk_tokens = static_cast<std::uint32_t>(chunk);
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
  kp::search_options opt{.runner_ups = static_cast<std::size_t>(runner_ups),
                         .exhaustive = exhaustive,
                         .jobs = std::max(1U, static_cast<unsigned>(jobs))};
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
                     {"price_per_hour", hw.price_per_hour},
                     {"dram_price_per_gb_hour", hw.dram_price_per_gb_hour},
                     {"ssd_price_per_gb_hour", hw.ssd_price_per_gb_hour}};
  out["trace"] = {{"path", trace_path},         {"requests", w->size()},
                  {"span_s", w->span_s()},      {"time_scale", time_scale},
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
