#pragma once
// kvx_pd_demo: options, the workload, and the small thread helpers every deployment uses.
#include <kvx/disagg/connector.hpp>
#include <kvx/disagg/layouts/layer_first.hpp>
#include <kvx/disagg/layouts/page_first.hpp>
#include <kvx/disagg/router.hpp>
#include <kvx/cache/block_hasher.hpp>
#include <kvx/cache/eviction/lru.hpp>
#include <kvx/memory/mapped_arena.hpp>
#include <kvx/store/store_client.hpp>
#include <kvx/store/store_node.hpp>
#include <kvx/store/master_server.hpp>
#include <kvx/transfer/embedded_metadata.hpp>
#include <kvx/transfer/transfer_engine.hpp>
#include <kvx/transport/local.hpp>

#include <tiny/worker.hpp>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

namespace asio = boost::asio;
namespace kd = kvx::disagg;
using clock_type = std::chrono::steady_clock;
using namespace std::chrono_literals;

namespace pd_demo {

// ---- options ---------------------------------------------------------------------

struct options {
  std::string trace = "/work/shared/traces/conversation_trace.jsonl";
  std::size_t skip = 0;
  std::size_t requests = 32;
  std::uint32_t prefill = 2;
  std::uint32_t decode = 2;
  std::uint32_t prefill_tp = 1;
  std::uint32_t tokens_per_hash = 16;
  std::uint32_t max_prompt = 320;
  std::uint32_t max_output = 8;
  std::uint32_t concurrency = 4;
  std::vector<std::string> modes{"colocated", "push", "pull"};
  std::string json;
  bool quiet = false;
  bool in_process = false;           // every instance in this process (the reference for the process boundary's cost)
  std::size_t kill_prefill_after = 0;  // SIGKILL the prefill instance of this request (1-based; 0: never)
  std::size_t crash_prefill_before_report = 0;  // that request's prefill instance dies after its last layer, before reporting
  std::size_t stop_prefill_after = 0;  // SIGSTOP it instead: alive, silent (1-based; 0: never)
  std::uint32_t silence_timeout_s = 10;  // an instance that sends nothing this long is stopped and marked down
  std::size_t wedge_prefill_after = 0;   // that request's prefill instance computes nothing more, still answering pings
  std::uint32_t attempt_timeout_s = 30;  // an instance a stage waited on this long, finishing nothing meanwhile, is wedged
  std::string ssd_dir = "/tmp";        // where the pool's SSD tier (a file) lives
};

void usage() {
  std::puts(
      "kvx_pd_demo: prefill/decode disaggregation with the tiny engine, verified token for token.\n"
      "\n"
      "usage: kvx_pd_demo [options]\n"
      "  --trace PATH           Mooncake-format trace (JSON lines: timestamp, input_length, output_length,\n"
      "                         hash_ids); default /work/shared/traces/conversation_trace.jsonl, and a\n"
      "                         built-in synthetic multi-turn workload when that file is absent\n"
      "  --synthetic            use the built-in workload even if the trace exists\n"
      "  --skip N               skip the first N trace lines (default 0)\n"
      "  --requests N           requests to replay (default 32)\n"
      "  --prefill N            prefill instances (default 2)\n"
      "  --decode M             decode instances (default 2)\n"
      "  --prefill-tp N         tensor-parallel size of prefill instances (default 1; decode is TP=1,\n"
      "                         page_first with 32-token blocks when N > 1, so KV is converted on arrival)\n"
      "  --tokens-per-hash K    tokens per 512-token trace block (default 16: lengths scale by K/512)\n"
      "  --max-prompt T         cap on prompt tokens (default 320)\n"
      "  --max-output T         cap on generated tokens (default 8)\n"
      "  --concurrency C        requests in flight (default 4)\n"
      "  --modes LIST           comma-separated subset of colocated,push,pull (default all; colocated\n"
      "                         always runs: it is the reference)\n"
      "  --json PATH            write the report as JSON (per-request TTFT and TPOT included, for plot.py)\n"
      "  --ssd-dir DIR          directory for the pool's SSD tier, a 64 MiB file (default /tmp)\n"
      "  --in-process           run every instance, the pool and the router in this process over the local\n"
      "                         transport (default: each instance is its own process, talking tcp)\n"
      "  --kill-prefill-after N in each disaggregated run, SIGKILL the prefill instance the Nth request was\n"
      "                         just routed to: its requests fail on the decode side and the router\n"
      "                         retries them elsewhere\n"
      "  --crash-prefill-before-report N\n"
      "                         push and pull: the prefill instance serving the Nth request dies after\n"
      "                         its last layer was written and announced, before it reports (a test\n"
      "                         hook: push must still finish that request from the bytes that landed)\n"
      "  --stop-prefill-after N the same with SIGSTOP: the instance stays connected and says nothing, until\n"
      "                         the router finds it silent (see --silence-timeout), kills it and retries\n"
      "  --silence-timeout S    the router pings every instance twice a second; one that sends nothing\n"
      "                         for S seconds is killed, marked down and its requests retried (default\n"
      "                         10, 1 to 3600)\n"
      "  --wedge-prefill-after N\n"
      "                         the prefill instance serving the Nth request stops computing (its compute\n"
      "                         thread blocks) but keeps answering pings: a test hook for --attempt-timeout\n"
      "  --attempt-timeout S    an instance that a request's stage (admit, prefill, decode) waited on for S\n"
      "                         seconds, and that finished no stage of any request meanwhile, is wedged:\n"
      "                         killed, marked down, its requests retried (default 30, 1 to 3600; it must\n"
      "                         exceed the longest single stage an instance runs)\n"
      "  --quiet                no progress lines\n"
      "  --help                 this text\n"
      "\n"
      "Exit status: 0 when every disaggregated output equals the colocated one, 1 on a mismatch or error.");
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::size_t b = 0;
  while (b <= s.size()) {
    auto e = s.find(',', b);
    if (e == std::string::npos) e = s.size();
    if (e > b) out.push_back(s.substr(b, e - b));
    b = e + 1;
  }
  return out;
}

std::optional<options> parse(int argc, char** argv, bool& synthetic) {
  options o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "kvx_pd_demo: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    auto number = [&]() -> std::uint64_t {
      auto v = value();
      char* end = nullptr;
      auto n = std::strtoull(v.c_str(), &end, 10);
      if (v.empty() || *end != '\0') {
        std::fprintf(stderr, "kvx_pd_demo: %s wants a number, not '%s'\n", a.c_str(), v.c_str());
        std::exit(2);
      }
      return n;
    };
    // A count that must fit its field: a larger value was cut to its low bits before.
    auto count32 = [&](std::uint64_t most) -> std::uint32_t {
      const auto n = number();
      if (n > most) {
        std::fprintf(stderr, "kvx_pd_demo: %s must be at most %llu\n", a.c_str(), static_cast<unsigned long long>(most));
        std::exit(2);
      }
      return static_cast<std::uint32_t>(n);
    };
    if (a == "--help" || a == "-h") {
      usage();
      return std::nullopt;
    }
    if (a == "--trace") o.trace = value();
    else if (a == "--synthetic") synthetic = true;
    else if (a == "--skip") o.skip = number();
    else if (a == "--requests") o.requests = number();
    else if (a == "--prefill") o.prefill = count32(64);
    else if (a == "--decode") o.decode = count32(64);
    else if (a == "--prefill-tp") o.prefill_tp = count32(4);
    else if (a == "--tokens-per-hash") o.tokens_per_hash = count32(512);
    else if (a == "--max-prompt") o.max_prompt = count32(1u << 20);
    else if (a == "--max-output") o.max_output = count32(1u << 20);
    else if (a == "--concurrency") o.concurrency = count32(1024);
    else if (a == "--modes") o.modes = split(value());
    else if (a == "--json") o.json = value();
    else if (a == "--quiet") o.quiet = true;
    else if (a == "--in-process") o.in_process = true;
    else if (a == "--ssd-dir") o.ssd_dir = value();
    else if (a == "--kill-prefill-after") o.kill_prefill_after = number();
    else if (a == "--stop-prefill-after") o.stop_prefill_after = number();
    else if (a == "--crash-prefill-before-report") o.crash_prefill_before_report = number();
    else if (a == "--silence-timeout") o.silence_timeout_s = count32(3600);
    else if (a == "--wedge-prefill-after") o.wedge_prefill_after = number();
    else if (a == "--attempt-timeout") o.attempt_timeout_s = count32(3600);
    else {
      std::fprintf(stderr, "kvx_pd_demo: unknown option '%s' (see --help)\n", a.c_str());
      std::exit(2);
    }
  }
  auto positive = [](std::uint64_t v, const char* what) {
    if (v == 0) {
      std::fprintf(stderr, "kvx_pd_demo: %s must be positive\n", what);
      std::exit(2);
    }
  };
  positive(o.requests, "--requests");
  positive(o.prefill, "--prefill");
  positive(o.decode, "--decode");
  positive(o.tokens_per_hash, "--tokens-per-hash");
  positive(o.max_output, "--max-output");
  positive(o.concurrency, "--concurrency");
  positive(o.silence_timeout_s, "--silence-timeout");
  positive(o.attempt_timeout_s, "--attempt-timeout");
  if (o.max_prompt < 2) {
    std::fprintf(stderr, "kvx_pd_demo: --max-prompt must be at least 2\n");
    std::exit(2);
  }
  for (auto [n, what] : {std::pair{o.kill_prefill_after, "--kill-prefill-after"}, std::pair{o.stop_prefill_after, "--stop-prefill-after"},
                          std::pair{o.crash_prefill_before_report, "--crash-prefill-before-report"},
                          std::pair{o.wedge_prefill_after, "--wedge-prefill-after"}}) {
    if (n && o.prefill < 2) {
      std::fprintf(stderr, "kvx_pd_demo: %s needs --prefill 2 or more (someone must take over)\n", what);
      std::exit(2);
    }
    if (n && o.in_process) {
      std::fprintf(stderr, "kvx_pd_demo: %s needs worker processes (not --in-process)\n", what);
      std::exit(2);
    }
  }
  if (o.prefill_tp != 1 && o.prefill_tp != 2 && o.prefill_tp != 4) {
    std::fprintf(stderr, "kvx_pd_demo: --prefill-tp must be 1, 2 or 4 (the model has 4 KV heads)\n");
    std::exit(2);
  }
  for (const auto& m : o.modes)
    if (m != "colocated" && m != "push" && m != "pull") {
      std::fprintf(stderr, "kvx_pd_demo: unknown mode '%s' (colocated, push, pull)\n", m.c_str());
      std::exit(2);
    }
  return o;
}

// ---- the workload ----------------------------------------------------------------

struct request_spec {
  std::uint64_t id = 0;
  std::vector<std::uint32_t> prompt;
  std::uint32_t output = 1;
};

tiny::model_config model_config() {
  // Llama-shaped and small: 4 layers, width 256 (8 query heads of 32 over 4 KV heads).
  return {.layers = 4, .kv_heads = 4, .q_per_kv = 2, .head_dim = 32, .block_tokens = 16, .vocab = 512};
}

// Tokens of one trace block: a function of its hash id alone, so equal ids give equal prefixes.
void append_block(std::vector<std::uint32_t>& out, std::uint64_t hash_id, std::uint32_t n, std::uint32_t vocab) {
  std::uint64_t x = hash_id * 0x9E3779B97F4A7C15ULL + 17;
  for (std::uint32_t i = 0; i < n; ++i) out.push_back(static_cast<std::uint32_t>(tiny::detail::splitmix64(x) % vocab));
}

std::vector<request_spec> synthetic_workload(const options& o) {
  // Multi-turn chat: sessions share a system prompt; each turn extends its session's history.
  std::vector<request_spec> out;
  const std::uint32_t sessions = 6;
  std::vector<std::vector<std::uint64_t>> history(sessions);
  std::uint64_t next_block = 1000;
  for (std::size_t i = 0; out.size() < o.requests; ++i) {
    const auto s = static_cast<std::uint32_t>(i % sessions);
    auto& h = history[s];
    if (h.empty()) h.push_back(0);  // the shared system prompt
    const std::uint32_t user_blocks = 1 + static_cast<std::uint32_t>((i * 7) % 3);
    for (std::uint32_t b = 0; b < user_blocks; ++b) h.push_back(next_block++);
    request_spec r;
    r.id = out.size();
    for (auto id : h) append_block(r.prompt, id, o.tokens_per_hash, model_config().vocab);
    r.prompt.resize(std::min<std::size_t>(r.prompt.size() - o.tokens_per_hash / 2, o.max_prompt));
    r.output = std::min<std::uint32_t>(o.max_output, 4 + static_cast<std::uint32_t>(i % 5));
    out.push_back(std::move(r));
    if (h.size() * o.tokens_per_hash > o.max_prompt) h.resize(1);  // the conversation starts over
  }
  return out;
}

std::optional<std::vector<request_spec>> trace_workload(const options& o) {
  std::ifstream in(o.trace);
  if (!in) return std::nullopt;
  std::vector<request_spec> out;
  std::string line;
  std::size_t n = 0;
  while (out.size() < o.requests && std::getline(in, line)) {
    ++n;
    if (n <= o.skip || line.empty()) continue;
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.contains("input_length") || !j.contains("hash_ids") || !j["hash_ids"].is_array()) {
      std::fprintf(stderr, "kvx_pd_demo: %s line %zu: not a trace record (needs input_length, output_length, hash_ids)\n",
                   o.trace.c_str(), n);
      std::exit(1);
    }
    request_spec r;
    r.id = out.size();
    for (const auto& h : j["hash_ids"]) append_block(r.prompt, h.get<std::uint64_t>(), o.tokens_per_hash, model_config().vocab);
    const auto scaled = static_cast<std::size_t>(j["input_length"].get<double>() * o.tokens_per_hash / 512.0);
    r.prompt.resize(std::clamp<std::size_t>(std::min(scaled, r.prompt.size()), 2, o.max_prompt));
    const auto out_len = static_cast<std::uint32_t>(j.value("output_length", 1.0) * o.tokens_per_hash / 512.0);
    r.output = std::clamp<std::uint32_t>(out_len, 1, o.max_output);
    if (r.prompt.size() < 2) continue;
    out.push_back(std::move(r));
  }
  return out;
}

// ---- plumbing: threads, queues, the in-process cluster ----------------------------

class worker_thread {
 public:
  worker_thread() : thread_([this] { loop(); }) {}
  ~worker_thread() {
    {
      std::lock_guard l(m_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
  void post(std::function<void()> f, std::uint64_t tokens) {
    {
      std::lock_guard l(m_);
      q_.push_back({std::move(f), tokens});
      queued_tokens_ += tokens;
    }
    cv_.notify_all();
  }
  std::uint64_t queued_tokens() {
    std::lock_guard l(m_);
    return queued_tokens_;
  }
  std::uint32_t queued() {
    std::lock_guard l(m_);
    return static_cast<std::uint32_t>(q_.size());
  }

 private:
  void loop() {
    for (;;) {
      std::pair<std::function<void()>, std::uint64_t> job;
      {
        std::unique_lock l(m_);
        cv_.wait(l, [&] { return stop_ || !q_.empty(); });
        if (q_.empty()) return;
        job = std::move(q_.front());
        q_.pop_front();
      }
      job.first();
      std::lock_guard l(m_);
      queued_tokens_ -= job.second;
    }
  }
  std::mutex m_;
  std::condition_variable cv_;
  std::deque<std::pair<std::function<void()>, std::uint64_t>> q_;
  std::uint64_t queued_tokens_ = 0;
  bool stop_ = false;
  std::thread thread_;
};

class slots {
 public:
  explicit slots(std::uint32_t n) : free_(n) {}
  void acquire() {
    std::unique_lock l(m_);
    cv_.wait(l, [&] { return free_ > 0; });
    --free_;
  }
  void release() {
    {
      std::lock_guard l(m_);
      ++free_;
    }
    cv_.notify_all();
  }
  void drain(std::uint32_t n) {
    std::unique_lock l(m_);
    cv_.wait(l, [&] { return free_ == n; });
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  std::uint32_t free_;
};

}  // namespace pd_demo
