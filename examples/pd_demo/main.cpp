// kvx_pd_demo: prefill/decode disaggregation on one host, end to end.
//
// In one process: a cache-aware router, N prefill and M decode tiny-engine
// instances (each with its own transfer engine and registered KV memory), and
// for pull mode the KV pool (a master and store nodes over the embedded
// metadata backend). It replays a slice of a Mooncake-format conversation
// trace, scaled to the tiny model (each 512-token hash block becomes
// --tokens-per-hash tokens), through three deployments side by side:
//
//   colocated  every instance prefills and decodes its own requests
//   push       prefill writes each layer straight into the decode instance's blocks
//   pull       prefill puts blocks into the pool, decode (and later prefills) get them
//
// and prints TTFT / TPOT percentiles, the prefix hit rate, bytes moved, how
// much of the transfer layer-wise streaming hid behind compute, and checks
// every disaggregated output against the colocated one (exit 1 on a mismatch).
#include <kvx/disagg/connector.hpp>
#include <kvx/disagg/layouts/layer_first.hpp>
#include <kvx/disagg/layouts/page_first.hpp>
#include <kvx/disagg/pd_stack.hpp>
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

namespace {

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
      "  --json PATH            write the report as JSON\n"
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
    if (a == "--help" || a == "-h") {
      usage();
      return std::nullopt;
    }
    if (a == "--trace") o.trace = value();
    else if (a == "--synthetic") synthetic = true;
    else if (a == "--skip") o.skip = number();
    else if (a == "--requests") o.requests = number();
    else if (a == "--prefill") o.prefill = static_cast<std::uint32_t>(number());
    else if (a == "--decode") o.decode = static_cast<std::uint32_t>(number());
    else if (a == "--prefill-tp") o.prefill_tp = static_cast<std::uint32_t>(number());
    else if (a == "--tokens-per-hash") o.tokens_per_hash = static_cast<std::uint32_t>(number());
    else if (a == "--max-prompt") o.max_prompt = static_cast<std::uint32_t>(number());
    else if (a == "--max-output") o.max_output = static_cast<std::uint32_t>(number());
    else if (a == "--concurrency") o.concurrency = static_cast<std::uint32_t>(number());
    else if (a == "--modes") o.modes = split(value());
    else if (a == "--json") o.json = value();
    else if (a == "--quiet") o.quiet = true;
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
  if (o.max_prompt < 2) {
    std::fprintf(stderr, "kvx_pd_demo: --max-prompt must be at least 2\n");
    std::exit(2);
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

kd::tiny_config model_config() {
  // Llama-shaped and small: 4 layers, width 256 (8 query heads of 32 over 4 KV heads).
  return {.layers = 4, .kv_heads = 4, .q_per_kv = 2, .head_dim = 32, .block_tokens = 16, .vocab = 512};
}

// Tokens of one trace block: a function of its hash id alone, so equal ids give equal prefixes.
void append_block(std::vector<std::uint32_t>& out, std::uint64_t hash_id, std::uint32_t n, std::uint32_t vocab) {
  std::uint64_t x = hash_id * 0x9E3779B97F4A7C15ULL + 17;
  for (std::uint32_t i = 0; i < n; ++i) out.push_back(static_cast<std::uint32_t>(kd::detail::splitmix64(x) % vocab));
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

using engine_t = kvx::transfer::transfer_engine<kvx::transfer::embedded_metadata, kvx::transport::local>;
using client_t = kvx::store::store_client<engine_t>;
using state_t = kvx::store::master_state<kvx::cache::eviction::lru>;
using pull_t = kd::transfer_mode::pull<client_t>;

struct party {
  kvx::transport::local transport;
  engine_t engine;
  party(asio::io_context& io, kvx::transfer::embedded_metadata& meta, const std::string& name)
      : transport(io.get_executor()), engine(meta, {.node = name}, transport) {}
};

// Everything the transfer engines and the pool need, with one thread running the executor.
struct cluster {
  asio::io_context io;
  kvx::transfer::embedded_metadata meta{io.get_executor()};
  kvx::metrics::registry registry;
  state_t state{kvx::store::master_config{}, {}, registry};
  kvx::store::master_server<state_t> server{io.get_executor(), state, {.address = "127.0.0.1", .port = 0, .tick_interval = 100ms}};
  std::vector<std::unique_ptr<party>> parties;
  std::vector<kvx::memory::mapped_arena> arenas;
  std::vector<std::unique_ptr<kvx::store::store_node<engine_t>>> nodes;
  std::vector<std::unique_ptr<client_t>> clients;
  std::optional<asio::executor_work_guard<asio::io_context::executor_type>> work;
  std::thread runner;

  cluster() {
    if (auto ok = server.start(); !ok) throw std::runtime_error(ok.error().message());
    work.emplace(io.get_executor());
    runner = std::thread([this] { io.run(); });
  }
  ~cluster() {
    for (auto& n : nodes) n->stop();
    asio::post(io, [this] { server.stop(); });
    work.reset();
    std::this_thread::sleep_for(20ms);
    io.stop();
    runner.join();
  }
  engine_t& add_party(const std::string& name) { return parties.emplace_back(std::make_unique<party>(io, meta, name))->engine; }
  void add_pool_node(const std::string& name, std::size_t bytes) {
    auto& e = add_party(name);
    arenas.push_back(std::move(*kvx::memory::mapped_arena::create(bytes)));
    auto& node = *nodes.emplace_back(std::make_unique<kvx::store::store_node<engine_t>>(
        e, kvx::store::master_client::create(io.get_executor(), server.endpoint()),
        kvx::store::node_options{.name = name, .segment = "", .tier = "dram", .heartbeat = 200ms}));
    auto p = std::make_shared<std::promise<std::error_code>>();
    auto f = p->get_future();
    asio::post(io, start_node{&node, arenas.back().region(), p});
    if (f.wait_for(10s) != std::future_status::ready || f.get()) throw std::runtime_error("pool node " + name + " did not start");
  }
  client_t* add_client(engine_t& e, const std::string& name) {
    return clients
        .emplace_back(std::make_unique<client_t>(e, kvx::store::master_client::create(io.get_executor(), server.endpoint()),
                                                 kvx::store::client_options{.node = name, .replicas = 1, .lease = 5000ms}))
        .get();
  }
  // Named function objects: GCC 12 rejects the store's init-captures from nested lambdas.
  struct set_code {
    std::shared_ptr<std::promise<std::error_code>> p;
    void operator()(std::error_code ec) const { p->set_value(ec); }
  };
  struct start_node {
    kvx::store::store_node<engine_t>* node;
    kvx::memory::memory_region region;
    std::shared_ptr<std::promise<std::error_code>> p;
    void operator()() const { node->async_start(region, set_code{p}); }
  };
};

// ---- results --------------------------------------------------------------------

struct record {
  bool done = false;
  std::string error;
  std::vector<std::uint32_t> tokens;
  double ttft_s = 0, tpot_s = 0;
  std::uint32_t prompt = 0, cached = 0, recomputed = 0;
  double save_busy_s = 0, save_tail_s = 0;
  std::uint64_t bytes = 0;
};

struct mode_result {
  std::string name;
  double wall_s = 0;
  std::vector<record> records;
  std::uint64_t bytes_moved = 0;     // every byte the transfer engines moved for KV
  std::uint64_t prompt_tokens = 0, cached_tokens = 0;
  double save_busy_s = 0, save_tail_s = 0;
  std::size_t mismatches = 0, errors = 0;
};

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const double pos = p * static_cast<double>(v.size() - 1);
  const auto i = static_cast<std::size_t>(pos);
  const double f = pos - static_cast<double>(i);
  return i + 1 < v.size() ? v[i] * (1 - f) + v[i + 1] * f : v[i];
}

// ---- the three deployments --------------------------------------------------------

mode_result run_colocated(const options& o, const std::vector<request_spec>& reqs) {
  mode_result res{"colocated", 0, std::vector<record>(reqs.size()), 0, 0, 0, 0, 0, 0, 0};
  const auto cfg = model_config();
  const std::uint32_t instances = o.prefill + o.decode;
  const std::uint32_t blocks_per_req = (o.max_prompt + o.max_output + cfg.block_tokens - 1) / cfg.block_tokens;
  const std::uint32_t nblocks = blocks_per_req * (o.concurrency + 1);
  struct instance {
    std::vector<std::byte> memory;
    std::optional<kd::tiny_engine<kd::layouts::layer_first>> engine;
    std::unique_ptr<kd::block_allocator> alloc;
    std::unique_ptr<worker_thread> thread;
  };
  std::vector<instance> inst(instances);
  for (auto& in : inst) {
    auto l = kd::layouts::layer_first::make(cfg.shard_shape(), nblocks).value();
    in.memory.assign(l.bytes_required(), std::byte{0});
    in.engine.emplace(kd::tiny_engine<kd::layouts::layer_first>::make(cfg, l, in.memory).value());
    in.alloc = std::make_unique<kd::block_allocator>(nblocks);
    in.thread = std::make_unique<worker_thread>();
  }
  slots window(o.concurrency);
  std::mutex mu;
  const auto t0 = clock_type::now();
  for (std::size_t i = 0; i < reqs.size(); ++i) {
    window.acquire();
    const auto arrive = clock_type::now();
    // Least queued tokens first.
    std::size_t pick = 0;
    for (std::size_t k = 1; k < inst.size(); ++k)
      if (inst[k].thread->queued_tokens() < inst[pick].thread->queued_tokens()) pick = k;
    auto& in = inst[pick];
    in.thread->post(
        [&, i, arrive, pin = &in] {
          const auto& r = reqs[i];
          record rec;
          rec.prompt = static_cast<std::uint32_t>(r.prompt.size());
          auto blocks = pin->alloc->allocate(static_cast<std::uint32_t>((r.prompt.size() + r.output + cfg.block_tokens - 1) / cfg.block_tokens));
          if (!blocks) {
            rec.error = blocks.error().message();
          } else {
            const kd::kv_sequence seq{*blocks};
            auto first = pin->engine->prefill(r.prompt, seq);
            const auto t1 = clock_type::now();
            if (!first) {
              rec.error = first.error().message();
            } else {
              rec.tokens.push_back(*first);
              rec.ttft_s = std::chrono::duration<double>(t1 - arrive).count();
              for (std::uint32_t k = 1; k < r.output; ++k)
                rec.tokens.push_back(pin->engine->decode(rec.tokens.back(), static_cast<std::uint32_t>(r.prompt.size() + k - 1), seq).value());
              if (r.output > 1) rec.tpot_s = std::chrono::duration<double>(clock_type::now() - t1).count() / (r.output - 1);
            }
            pin->alloc->free(*blocks);
          }
          rec.done = true;
          {
            std::lock_guard l(mu);
            res.records[i] = std::move(rec);
          }
          window.release();
        },
        reqs[i].prompt.size());
  }
  window.drain(o.concurrency);
  res.wall_s = std::chrono::duration<double>(clock_type::now() - t0).count();
  return res;
}

template <class Mode, class Load>
mode_result run_disaggregated(const options& o, const std::vector<request_spec>& reqs, const std::string& name, Load load) {
  constexpr bool pooled = Mode::pooled;
  using pworker = kd::tiny_worker<kd::layouts::layer_first, engine_t, Mode, Load>;
  using dworker = kd::tiny_worker<kd::layouts::page_first, engine_t, Mode, Load>;
  mode_result res{name, 0, std::vector<record>(reqs.size()), 0, 0, 0, 0, 0, 0, 0};
  cluster c;
  auto link = std::make_shared<kd::push_link>();
  if constexpr (pooled) {
    c.add_pool_node("pool-0", 48u << 20);
    c.add_pool_node("pool-1", 48u << 20);
  }
  auto cfg = model_config();
  const std::uint32_t per_req = (o.max_prompt + o.max_output + 15) / 16 + 1;
  const std::uint32_t nblocks = per_req * (o.concurrency + 2);
  auto make_mode = [&](engine_t& e, const std::string& n) {
    if constexpr (pooled)
      return Mode{c.add_client(e, n), "demo", "tiny-4l-256"};
    else
      return Mode{link};
  };
  std::vector<std::unique_ptr<pworker>> prefill;
  std::vector<std::unique_ptr<dworker>> decode;
  kd::router<kd::routing::cache_aware> router;
  std::vector<kd::instance_id> pid, did;
  const auto speed = kd::measure_tiny_engine<kd::layouts::layer_first>(cfg, 64, 4).value();
  for (std::uint32_t i = 0; i < o.prefill; ++i) {
    const std::string n = "prefill-" + std::to_string(i);
    auto& e = c.add_party(n);
    auto pcfg = cfg;
    pcfg.tp = o.prefill_tp;
    prefill.push_back(pworker::make(e, {.name = n, .role = pooled ? kd::connector_role::both : kd::connector_role::producer, .model = pcfg, .num_blocks = nblocks},
                                    make_mode(e, n), load)
                          .value());
    pid.push_back(router.add_instance({.name = n, .role = kd::instance_role::prefill, .prefill_tokens_per_s = speed.prefill_tokens_per_s,
                                       .decode_step_s = speed.decode_step_s, .decode_s_per_token = 0, .fetch_bytes_per_s = 2e9})
                      .value());
  }
  for (std::uint32_t i = 0; i < o.decode; ++i) {
    const std::string n = "decode-" + std::to_string(i);
    auto& e = c.add_party(n);
    auto dcfg = cfg;
    kd::worker_config wc{.name = n, .role = kd::connector_role::consumer, .model = dcfg, .num_blocks = nblocks};
    if (o.prefill_tp > 1) {
      wc.model.block_tokens = 32;  // other TP, other block size: loads are staged and converted
      wc.num_blocks = nblocks / 2 + 2;
      wc.source_tp = o.prefill_tp;
      wc.source_block_tokens = 16;
      wc.staging_blocks = nblocks * o.prefill_tp;
    }
    decode.push_back(dworker::make(e, wc, make_mode(e, n), load).value());
    did.push_back(router.add_instance({.name = n, .role = kd::instance_role::decode, .prefill_tokens_per_s = speed.prefill_tokens_per_s,
                                       .decode_step_s = speed.decode_step_s, .decode_s_per_token = speed.decode_step_s / 1000, .fetch_bytes_per_s = 2e9})
                      .value());
  }
  std::vector<std::unique_ptr<worker_thread>> pthreads(o.prefill), dthreads(o.decode);
  for (auto& t : pthreads) t = std::make_unique<worker_thread>();
  for (auto& t : dthreads) t = std::make_unique<worker_thread>();

  auto hasher = kvx::cache::block_hasher::make({.block_tokens = 16, .ns = {.model = "tiny-4l-256", .tenant = "demo", .adapter = {}, .salt = {}}}).value();
  const std::uint64_t kv_per_token = 2ULL * cfg.kv_heads * cfg.head_dim * cfg.dtype_bytes() * cfg.layers;
  slots window(o.concurrency);
  std::mutex mu;
  const auto t0 = clock_type::now();
  for (std::size_t i = 0; i < reqs.size(); ++i) {
    window.acquire();
    const auto& r = reqs[i];
    const auto keys = hasher.keys(r.prompt);
    kd::route_decision d;
    {
      std::lock_guard l(mu);
      for (std::size_t k = 0; k < pid.size(); ++k)
        (void)router.update_load(pid[k], {.queued_requests = pthreads[k]->queued(), .queued_tokens = pthreads[k]->queued_tokens(), .running_requests = 0, .running_tokens = 0});
      for (std::size_t k = 0; k < did.size(); ++k)
        (void)router.update_load(did[k], {.queued_requests = 0, .queued_tokens = 0, .running_requests = dthreads[k]->queued(), .running_tokens = dthreads[k]->queued_tokens()});
      d = router.route({.keys = keys, .prompt_tokens = static_cast<std::uint32_t>(r.prompt.size()), .block_tokens = 16, .kv_bytes_per_token = kv_per_token});
    }
    if (!d.accepted()) {
      std::lock_guard l(mu);
      res.records[i].done = true;
      res.records[i].error = "router: " + d.reason;
      window.release();
      continue;
    }
    std::size_t p = 0, q = 0;
    while (pid[p] != d.prefill) ++p;
    while (did[q] != d.decode) ++q;
    const auto arrive = clock_type::now();
    const kd::kv_request req{r.id, r.prompt};
    auto finish = [&, i](record rec) {
      rec.done = true;
      std::lock_guard l(mu);
      res.records[i] = std::move(rec);
      window.release();
    };
    auto decode_job = [&, i, q, arrive, req, finish](std::shared_ptr<record> rec, std::optional<kd::decode_ticket> ticket) {
      const auto& rs = reqs[i];
      if (!ticket) {
        auto t = decode[q]->admit(req, rs.output);
        if (!t) {
          rec->error = "admit: " + t.error().message();
          return finish(*rec);
        }
        ticket = std::move(*t);
      }
      const auto start = clock_type::now();
      auto out = decode[q]->run_decode(req, *ticket, rs.output);
      if (!out) {
        rec->error = "decode: " + out.error().message();
        (void)decode[q]->abort(*ticket, !pooled);
        return finish(*rec);
      }
      rec->tokens = out->tokens;
      rec->ttft_s = std::chrono::duration<double>(start - arrive).count() + out->first_token_s;
      rec->tpot_s = out->tpot_s;
      rec->recomputed += out->recomputed_tokens;
      rec->bytes += out->load.bytes;
      finish(*rec);
    };
    auto rec = std::make_shared<record>();
    rec->prompt = static_cast<std::uint32_t>(r.prompt.size());
    std::optional<kd::decode_ticket> ticket;
    if constexpr (!pooled) {
      // Push: the decode side allocates first and publishes where the prefill writes.
      auto t = decode[q]->admit(req, r.output);
      if (!t) {
        rec->error = "admit: " + t.error().message();
        finish(*rec);
        continue;
      }
      ticket = std::move(*t);
      dthreads[q]->post([decode_job, rec, ticket] { decode_job(rec, ticket); }, r.output);
    }
    pthreads[p]->post(
        [&, i, p, q, req, rec, keys, decode_job, finish] {
          auto pre = prefill[p]->run_prefill(req);
          if (!pre) {
            rec->error = "prefill: " + pre.error().message();
            if constexpr (pooled) finish(*rec);
            return;  // push: the decode side times out and reports it
          }
          rec->cached = pre->cached_tokens;
          rec->save_busy_s = pre->saved.busy_s;
          rec->save_tail_s = pre->save_tail_s;
          rec->bytes += pre->saved.bytes;
          if constexpr (pooled) {
            {
              std::lock_guard l(mu);
              router.on_stored(kd::pool_location, keys);
            }
            dthreads[q]->post([decode_job, rec] { decode_job(rec, std::nullopt); }, reqs[i].output);
          }
        },
        r.prompt.size());
    if (!o.quiet && (i + 1) % 10 == 0) std::printf("  %s: %zu/%zu requests dispatched\n", name.c_str(), i + 1, reqs.size());
  }
  window.drain(o.concurrency);
  res.wall_s = std::chrono::duration<double>(clock_type::now() - t0).count();
  pthreads.clear();
  dthreads.clear();
  for (auto& w : prefill) {
    auto s = w->connector().stats();
    res.bytes_moved += s.bytes_saved + s.bytes_loaded;
  }
  for (auto& w : decode) res.bytes_moved += pooled ? w->connector().stats().bytes_loaded : 0;
  prefill.clear();
  decode.clear();
  return res;
}

void summarize(mode_result& m, const std::vector<record>& reference) {
  for (std::size_t i = 0; i < m.records.size(); ++i) {
    const auto& r = m.records[i];
    m.prompt_tokens += r.prompt;
    m.cached_tokens += r.cached;
    m.save_busy_s += r.save_busy_s;
    m.save_tail_s += r.save_tail_s;
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
  for (const auto& r : m.records)
    if (r.error.empty()) {
      ttft.push_back(r.ttft_s);
      if (r.tpot_s > 0) tpot.push_back(r.tpot_s);
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
          {"errors", m.errors},
          {"mismatches", m.mismatches}};
}

}  // namespace

int main(int argc, char** argv) {
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
    results.push_back(run_colocated(o, *reqs));
    for (const auto& m : o.modes) {
      if (m == "push") results.push_back(run_disaggregated<kd::transfer_mode::push>(o, *reqs, "push", kd::load::wait_until{20s}));
      if (m == "pull") results.push_back(run_disaggregated<pull_t>(o, *reqs, "pull", kd::load::best_effort{20s}));
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "kvx_pd_demo: set-up failed: %s\n", e.what());
    return 1;
  }

  const auto reference = results.front().records;
  bool ok = true;
  nlohmann::json report = {{"source", source}, {"modes", nlohmann::json::array()}};
  std::printf("\n%-10s %8s %9s %9s %9s %9s %9s %8s %11s %8s %s\n", "mode", "wall s", "TTFT p50", "TTFT p90", "TTFT p99",
              "TPOT p50", "TPOT p90", "hit %", "KV MiB", "hidden %", "outputs");
  for (auto& m : results) {
    summarize(m, reference);
    auto j = report_json(m);
    report["modes"].push_back(j);
    const bool same = m.mismatches == 0 && m.errors == 0;
    ok = ok && same;
    std::printf("%-10s %8.2f %8.1fms %8.1fms %8.1fms %8.2fms %8.2fms %7.1f%% %11.2f %7.0f%% %s\n", m.name.c_str(), m.wall_s,
                1e3 * j["ttft_s"]["p50"].get<double>(), 1e3 * j["ttft_s"]["p90"].get<double>(), 1e3 * j["ttft_s"]["p99"].get<double>(),
                1e3 * j["tpot_s"]["p50"].get<double>(), 1e3 * j["tpot_s"]["p90"].get<double>(), 100 * j["prefix_hit_rate"].get<double>(),
                static_cast<double>(m.bytes_moved) / (1 << 20), 100 * j["hidden_fraction"].get<double>(),
                &m == &results.front() ? "reference" : same ? "identical" : "MISMATCH");
  }
  std::printf("\nTTFT counts from dispatch to the first token (queueing included); hit %% = prompt tokens the prefill\n"
              "loaded from the pool; hidden %% = share of the per-layer KV transfer time that overlapped compute.\n");
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
