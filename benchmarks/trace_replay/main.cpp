// trace_replay: replays a Mooncake-format JSONL trace through every eviction
// policy at a sweep of capacities; prints a table and writes JSON.
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <kvx/cache/eviction.hpp>

namespace ev = kvx::cache::eviction;

namespace {

constexpr const char* usage = R"(usage: trace_replay --trace FILE [options]

Replays a Mooncake-format JSONL trace (timestamp, input_length, output_length,
hash_ids; one 512-token block per hash id) through eviction policies.

  --trace FILE          the trace (required)
  --capacities LIST     cache sizes in blocks, comma-separated (default 1000,3000,10000,30000,100000)
  --capacity-gib LIST   cache sizes in GiB instead; needs --model
  --model NAME          model shape giving bytes per block: llama70b (80 layers, 8 KV heads,
                        head dim 128, bf16: 160 MiB per 512-token block)
  --block-tokens N      tokens per block (default 512)
  --policies LIST       lru,lfu,s3fifo,arc,sieve,prefix,auto,belady (default: all)
  --json FILE           write the results as JSON

The plot of hit rate against capacity is drawn from the JSON by
benchmarks/trace_replay/plot.py OUT.json OUT.png (matplotlib).
  --quiet               no progress on stderr
  --help                this text
)";

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}

[[noreturn]] void die(const std::string& msg) {
  std::cerr << "trace_replay: " << msg << "\n";
  std::exit(2);
}

double parse_number(const std::string& s, const char* what) {
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  if (end == s.c_str() || *end != '\0' || !std::isfinite(v) || v < 0) die(std::string("bad ") + what + " '" + s + "'");
  return v;
}

// A cache of at most 2^28 blocks; more would not fit in memory (the policies reserve their capacity).
constexpr double max_blocks = 268435456;

std::size_t block_count(double v, const std::string& text, const char* what) {
  if (v > max_blocks) die(std::string(what) + " '" + text + "' is more than " + std::to_string(std::size_t{1} << 28) + " blocks");
  return static_cast<std::size_t>(v);
}

}  // namespace

int main(int argc, char** argv) {
  std::string trace_path, json_path, model;
  std::string caps_arg = "1000,3000,10000,30000,100000", gib_arg;
  std::string policies_arg = "lru,lfu,s3fifo,arc,sieve,prefix,auto,belady";
  std::uint64_t block_tokens = 512;
  bool quiet = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) die(a + " needs a value");
      return argv[++i];
    };
    if (a == "--help" || a == "-h") {
      std::cout << usage;
      return 0;
    } else if (a == "--trace") trace_path = next();
    else if (a == "--capacities") caps_arg = next();
    else if (a == "--capacity-gib") gib_arg = next();
    else if (a == "--model") model = next();
    else if (a == "--block-tokens") {
      const auto text = next();
      const double v = parse_number(text, "--block-tokens");
      if (v != std::floor(v) || v > 1048576) die("--block-tokens must be a whole number from 1 to 1048576, not '" + text + "'");
      block_tokens = static_cast<std::uint64_t>(v);
    }
    else if (a == "--policies") policies_arg = next();
    else if (a == "--json") json_path = next();
    else if (a == "--quiet") quiet = true;
    else die("unknown option '" + a + "' (see --help)");
  }
  if (trace_path.empty()) die("--trace is required (see --help)");
  if (block_tokens == 0) die("--block-tokens must be positive");

  // 70B-class GQA: K and V, 80 layers, 8 KV heads of dim 128, 2 bytes each.
  std::uint64_t block_bytes = 0;
  if (!model.empty()) {
    if (model != "llama70b") die("unknown --model '" + model + "' (known: llama70b)");
    block_bytes = 2ull * 80 * 8 * 128 * 2 * block_tokens;
  }
  std::vector<std::size_t> caps;
  std::vector<double> gibs;
  if (!gib_arg.empty()) {
    if (block_bytes == 0) die("--capacity-gib needs --model");
    for (const auto& s : split(gib_arg)) {
      const double g = parse_number(s, "--capacity-gib");
      gibs.push_back(g);
      caps.push_back(block_count(g * 1024.0 * 1024.0 * 1024.0 / static_cast<double>(block_bytes), s, "--capacity-gib"));
    }
  } else {
    for (const auto& s : split(caps_arg)) caps.push_back(block_count(parse_number(s, "--capacities"), s, "--capacities"));
  }
  if (caps.empty()) die("no capacities given");
  const auto policies = split(policies_arg);

  const auto t0 = std::chrono::steady_clock::now();
  auto trace = kvx::cache::read_trace(trace_path);
  if (!trace) die(trace.error().message());
  const ev::replay_plan plan(*trace, block_tokens);
  if (!quiet)
    std::cerr << "trace_replay: " << plan.requests() << " requests, " << plan.references() << " block references\n";

  nlohmann::json out;
  out["trace"] = trace_path;
  out["requests"] = plan.requests();
  out["block_references"] = plan.references();
  out["block_tokens"] = block_tokens;
  out["block_bytes"] = block_bytes;
  out["results"] = nlohmann::json::array();

  std::printf("%-10s %10s %9s %9s %9s %14s %10s %8s\n", "policy", "capacity", "block%", "prefix%", "token%",
              "prefill_saved", "evictions", "seconds");
  for (std::size_t ci = 0; ci < caps.size(); ++ci) {
    const std::size_t cap = caps[ci];
    for (const auto& name : policies) {
      nlohmann::json cfg = {{"policy", name}};
      auto policy = ev::any_eviction_policy::from_config(kvx::config::view(cfg), cap);
      if (!policy) die(policy.error().message());
      ev::replay_options opt;
      opt.capacity_blocks = cap;
      opt.block_bytes = block_bytes;
      if (!quiet)
        opt.progress = [&](std::size_t done, std::size_t total) {
          std::fprintf(stderr, "\r  %s @ %zu: %zu/%zu requests", name.c_str(), cap, done, total);
        };
      const auto s = std::chrono::steady_clock::now();
      const auto r = ev::replay(plan, *policy, opt);
      const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - s).count();
      if (!quiet) std::fprintf(stderr, "\r%60s\r", "");
      std::printf("%-10s %10zu %8.2f%% %8.2f%% %8.2f%% %14llu %10llu %8.2f\n", name.c_str(), cap,
                  100 * r.block_hit_rate(), 100 * r.prefix_hit_rate(), 100 * r.token_hit_rate(),
                  static_cast<unsigned long long>(r.prefill_tokens_saved), static_cast<unsigned long long>(r.evictions),
                  secs);
      std::fflush(stdout);
      nlohmann::json row = {{"policy", name},
                            {"capacity_blocks", cap},
                            {"capacity_bytes", static_cast<std::uint64_t>(cap) * block_bytes},
                            {"block_hit_rate", r.block_hit_rate()},
                            {"prefix_hit_rate", r.prefix_hit_rate()},
                            {"token_hit_rate", r.token_hit_rate()},
                            {"prefill_tokens_saved", r.prefill_tokens_saved},
                            {"prefill_saved_rate", r.prefill_saved_rate()},
                            {"input_tokens", r.input_tokens},
                            {"block_hits", r.block_hits},
                            {"evictions", r.evictions},
                            {"rejected", r.rejected},
                            {"bytes_read", r.block_hits * block_bytes},
                            {"seconds", secs}};
      if (!gibs.empty()) row["capacity_gib"] = gibs[ci];
      out["results"].push_back(row);
    }
  }
  const double total = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  out["seconds"] = total;
  if (!quiet) std::cerr << "trace_replay: done in " << total << " s\n";
  if (!json_path.empty()) {
    std::ofstream f(json_path);
    if (!f) die("cannot write '" + json_path + "'");
    f << out.dump(2) << "\n";
  }
  return 0;
}
