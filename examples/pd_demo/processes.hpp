#pragma once
// kvx_pd_demo (default): the router, every prefill and decode instance and
// the pool as separate processes on this host.
//
//   router process   the cache-aware router, the metadata service (embedded
//                    metadata served over HTTP), and for pull mode the pool:
//                    its master, a DRAM node and an SSD node on a file
//   worker processes one per instance (this executable, `--worker JSON`):
//                    a tiny engine, its connector, a transfer engine over the
//                    tcp transport, resolving segments through the HTTP metadata
//
// Control messages (requests, push targets, per-layer notices, results) go
// over one JSON-lines connection per worker (control.hpp); KV bytes go
// worker to worker (push) or worker to pool to worker (pull) through the
// transfer engines, never through the router.
#include "common.hpp"
#include "control.hpp"
#include "report.hpp"

#include <csignal>
#include <stdexcept>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <kvx/disagg/push_wire.hpp>
#include <kvx/memory/mapped_file.hpp>
#include <kvx/transfer/http_metadata.hpp>
#include <kvx/transfer/http_metadata_server.hpp>
#include <kvx/transport/tcp.hpp>

extern char** environ;

namespace pd_demo {

using worker_engine_t = kvx::transfer::transfer_engine<kvx::transfer::http_metadata, kvx::transport::tcp>;
using worker_client_t = kvx::store::store_client<worker_engine_t>;
using pool_engine_t = kvx::transfer::transfer_engine<kvx::transfer::embedded_metadata, kvx::transport::tcp>;
using pool_state_t = kvx::store::master_state<kvx::cache::eviction::lru>;

inline kvx::transport::tcp_config loopback_tcp() {
  kvx::transport::tcp_config c;
  c.address = "127.0.0.1";
  c.port = 0;
  c.connections = 2;
  return c;
}

// ---- worker process -----------------------------------------------------------------

//! What the router tells a worker on its command line.
struct worker_spec {
  std::string name;
  std::string role;  // "colocated", "prefill", "decode"
  std::string mode;  // "colocated", "push", "pull"
  std::uint16_t control_port = 0;
  std::string metadata_url;
  std::string master;  // pull: the pool master's endpoint
  std::uint32_t prefill_tp = 1;
  std::uint32_t max_prompt = 0, max_output = 0, concurrency = 1;

  nlohmann::json to_json() const {
    return {{"name", name}, {"role", role}, {"mode", mode}, {"control_port", control_port}, {"metadata_url", metadata_url},
            {"master", master}, {"prefill_tp", prefill_tp}, {"max_prompt", max_prompt}, {"max_output", max_output},
            {"concurrency", concurrency}};
  }
  static worker_spec from_json(const nlohmann::json& j) {
    worker_spec s;
    s.name = j.at("name").get<std::string>();
    s.role = j.at("role").get<std::string>();
    s.mode = j.at("mode").get<std::string>();
    s.control_port = j.at("control_port").get<std::uint16_t>();
    s.metadata_url = j.at("metadata_url").get<std::string>();
    s.master = j.at("master").get<std::string>();
    s.prefill_tp = j.at("prefill_tp").get<std::uint32_t>();
    s.max_prompt = j.at("max_prompt").get<std::uint32_t>();
    s.max_output = j.at("max_output").get<std::uint32_t>();
    s.concurrency = j.at("concurrency").get<std::uint32_t>();
    return s;
  }
};

//! How long a worker lives: until the router sends "exit" or the control connection closes.
class worker_life {
 public:
  void end() {
    std::call_once(once_, [this] { ended_.set_value(); });
  }
  void wait() { done_.wait(); }
  //! Starts `ch` with `on_message`; "exit" and a closed connection end the
  //! worker. "ping" is answered here, on the channel's strand, whatever the
  //! compute threads are doing: the router's silence check.
  void run(const std::shared_ptr<channel>& ch, channel::message_handler on_message) {
    ch->start(
        [ch, h = std::move(on_message)](const nlohmann::json& m) {
          if (m["op"] == "exit") return ch->close();
          if (m["op"] == "ping") return ch->send({{"op", "pong"}});
          h(m);
        },
        [this](std::error_code ec, const std::string& why) {
          if (ec) std::fprintf(stderr, "worker: the control channel closed: %s\n", why.c_str());
          end();
        });
  }

 private:
  std::promise<void> ended_;
  std::shared_future<void> done_ = ended_.get_future().share();
  std::once_flag once_;
};

inline std::vector<std::uint32_t> tokens_of(const nlohmann::json& j) { return j.at("prompt").get<std::vector<std::uint32_t>>(); }

//! A colocated instance: prefill and decode its own requests, nothing moves.
inline int serve_colocated(const worker_spec& spec, const std::shared_ptr<channel>& ch, worker_life& life) {
  const auto cfg = model_config();
  const std::uint32_t blocks_per_req = (spec.max_prompt + spec.max_output + cfg.block_tokens - 1) / cfg.block_tokens;
  const std::uint32_t nblocks = blocks_per_req * (spec.concurrency + 1);
  auto l = kd::layouts::layer_first::make(cfg.shard_shape(), nblocks).value();
  std::vector<std::byte> memory(l.bytes_required(), std::byte{0});
  auto engine = tiny::engine<kd::layouts::layer_first>::make(cfg, l, memory).value();
  tiny::block_allocator alloc(nblocks);
  worker_thread compute;
  life.run(ch, [&](const nlohmann::json& m) {
        if (m["op"] != "serve") return;
        // Read here, on the channel's strand: a malformed field closes the channel (a throw on the compute thread ended the process).
        const auto id = m.at("id").get<std::uint64_t>();
        const auto prompt = tokens_of(m);
        const auto n = m.at("output").get<std::uint32_t>();
        compute.post(
            [&, id, prompt, n] {
              auto blocks = alloc.allocate(static_cast<std::uint32_t>((prompt.size() + n + cfg.block_tokens - 1) / cfg.block_tokens));
              if (!blocks) return ch->send({{"op", "failed"}, {"id", id}, {"stage", "serve"}, {"error", blocks.error().message()}});
              const kd::kv_sequence seq{*blocks};
              // The compute thread's CPU time (not its latency): kvx-plan fits the engine's speed to it.
              const double c0 = tiny::thread_cpu_seconds{}();
              auto first = engine.prefill(prompt, seq);
              const auto t1 = now_ns();
              const double c1 = tiny::thread_cpu_seconds{}();
              if (!first) {
                alloc.free(*blocks);
                return ch->send({{"op", "failed"}, {"id", id}, {"stage", "serve"}, {"error", first.error().message()}});
              }
              std::vector<std::uint32_t> out{*first};
              for (std::uint32_t k = 1; k < n; ++k)
                out.push_back(engine.decode(out.back(), static_cast<std::uint32_t>(prompt.size() + k - 1), seq).value());
              const double tpot = n > 1 ? static_cast<double>(now_ns() - t1) / 1e9 / (n - 1) : 0.0;
              const double c2 = tiny::thread_cpu_seconds{}();
              alloc.free(*blocks);
              ch->send({{"op", "done"}, {"id", id}, {"tokens", out}, {"first_token_ns", t1}, {"tpot_s", tpot},
                        {"prefill_cpu_s", c1 - c0}, {"decode_cpu_s", n > 1 ? c2 - c1 : 0.0}});
            },
            0);
      });
  ch->send({{"op", "hello"}, {"name", spec.name}, {"pid", ::getpid()}});
  life.wait();
  return 0;
}

//! A prefill or decode instance with its connector in `Mode`.
template <class Layout, class Mode, class Load>
int serve_disaggregated(const worker_spec& spec, worker_engine_t& engine, Mode mode, Load load,
                        const std::shared_ptr<kd::push_link>& link, const std::shared_ptr<channel>& ch, worker_life& life) {
  using worker_t = tiny::worker<Layout, worker_engine_t, Mode, Load>;
  constexpr bool pooled = Mode::pooled;
  const auto cfg = model_config();
  const std::uint32_t per_req = (spec.max_prompt + spec.max_output + 15) / 16 + 1;
  const std::uint32_t nblocks = per_req * (spec.concurrency + 2);
  const bool prefill = spec.role == "prefill";
  tiny::worker_config wc;
  wc.name = spec.name;
  wc.role = prefill ? (pooled ? kd::connector_role::both : kd::connector_role::producer) : kd::connector_role::consumer;
  wc.model = cfg;
  wc.num_blocks = nblocks;
  if (prefill) wc.model.tp = spec.prefill_tp;
  if (!prefill && spec.prefill_tp > 1) {
    wc.model.block_tokens = 32;  // other TP, other block size: loads are staged and converted
    wc.num_blocks = nblocks / 2 + 2;
    wc.source_tp = spec.prefill_tp;
    wc.source_block_tokens = 16;
    wc.staging_blocks = nblocks * spec.prefill_tp;
  }
  auto made = worker_t::make(engine, wc, std::move(mode), load);
  if (!made) {
    std::fprintf(stderr, "%s: cannot start: %s\n", spec.name.c_str(), made.error().message().c_str());
    return 1;
  }
  auto& w = **made;
  worker_thread sched, compute;  // after what their jobs use: joined first
  auto fail = [&](std::uint64_t id, const char* stage, const kvx::error& e) {
    ch->send({{"op", "failed"}, {"id", id}, {"stage", stage}, {"error", e.message()}});
  };
  auto on_message = [&](const nlohmann::json& m) {
    const auto op = m["op"].get<std::string>();
    if (op == "stats") {
      auto s = w.connector().stats();
      return ch->send({{"op", "stats"}, {"bytes_saved", s.bytes_saved}, {"bytes_loaded", s.bytes_loaded}});
    }
    if (op == "notice") {  // decode, push: a layer arrived (or failed) in our blocks
      auto n = kd::push_notice_from_json(m.at("notice"));
      if (!n) return std::fprintf(stderr, "%s: dropped a notice: %s\n", spec.name.c_str(), n.error().message().c_str()), void();
      // Every notice goes to the connector, also those of requests already
      // finished or aborted: their blocks wait for them (late writes).
      if constexpr (!pooled) w.connector().hear_notice(*n);
      return;
    }
    const auto id = m.at("id").get<std::uint64_t>();
    if (op == "prefill") {
      // Fields are read here, on the channel's strand (see serve_colocated).
      auto prompt = tokens_of(m);
      nlohmann::json target_json;
      if constexpr (!pooled) target_json = m.at("target");
      const bool crash_before_report = m.value("crash_before_report", false);  // the router's test hooks
      const bool wedge = m.value("wedge", false);
      compute.post(
          [&, id, prompt = std::move(prompt), target_json = std::move(target_json), crash_before_report, wedge] {
            // Wedged: nothing more is computed, the io thread still answers pings (the router kills us).
            if (wedge) std::this_thread::sleep_for(std::chrono::hours(1));
            if constexpr (!pooled) {
              auto t = kd::push_target_from_json(target_json);
              if (!t) return fail(id, "prefill", t.error());
              auto target = std::make_shared<kd::push_target>(std::move(*t));
              target->notify = [ch, to = target->node](const kd::push_notice& n) {
                ch->send({{"op", "notice"}, {"to", to}, {"notice", kd::to_json(n)}});
              };
              if (auto ok = link->publish(target); !ok) return fail(id, "prefill", ok.error());
            }
            auto pre = w.run_prefill({id, prompt});
            if (!pre) {
              if constexpr (!pooled) (void)link->take(id);  // not taken when the run failed before allocating
              return fail(id, "prefill", pre.error());
            }
            // Every layer's notice is queued on the channel by now: die once they are written.
            if (crash_before_report) return ch->drain([] { ::kill(::getpid(), SIGKILL); });
            ch->send({{"op", "prefilled"}, {"id", id}, {"cached", pre->cached_tokens}, {"save_busy_s", pre->saved.busy_s},
                      {"save_tail_s", pre->save_tail_s}, {"bytes", pre->saved.bytes}, {"prefill_cpu_s", pre->compute_cpu_s}});
          },
          0);
    } else if (op == "admit") {
      auto prompt = std::make_shared<std::vector<std::uint32_t>>(tokens_of(m));
      const auto n = m.at("output").get<std::uint32_t>();
      sched.post(
          [&, id, prompt, n] {
            auto ticket = w.admit({id, *prompt}, n);
            if (!ticket) return fail(id, "admit", ticket.error());
            nlohmann::json reply = {{"op", "admitted"}, {"id", id}};
            if constexpr (!pooled) {
              // Our connector published the target on our own link: ship it to the prefill instance.
              auto t = link->take(id);
              if (!t) {
                (void)w.abort(*ticket, false);
                return fail(id, "admit", t.error());
              }
              reply["target"] = kd::to_json(**t);
            }
            ch->send(reply);
            compute.post(
                [&, id, n, prompt, t = std::move(*ticket)] {
                  const auto start = now_ns();
                  auto out = w.run_decode({id, *prompt}, t, n);
                  if (!out) {
                    (void)w.abort(t, !pooled);  // push: a producer that stopped answering may still write these blocks
                    return fail(id, "decode", out.error());
                  }
                  ch->send({{"op", "done"}, {"id", id}, {"tokens", out->tokens},
                            {"first_token_ns", start + static_cast<std::int64_t>(out->first_token_s * 1e9)},
                            {"tpot_s", out->tpot_s}, {"recomputed", out->recomputed_tokens}, {"bytes", out->load.bytes},
                            {"decode_cpu_s", out->steps_cpu_s}});
                },
                n);
          },
          0);
    }
  };
  life.run(ch, on_message);
  ch->send({{"op", "hello"}, {"name", spec.name}, {"pid", ::getpid()}});
  life.wait();
  return 0;
}

//! Entry point of a worker process.
inline int run_worker(const std::string& spec_text) {
  worker_spec spec;
  try {
    spec = worker_spec::from_json(nlohmann::json::parse(spec_text));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "kvx_pd_demo --worker: bad spec: %s\n", e.what());
    return 2;
  }
  asio::io_context io;
  auto guard = asio::make_work_guard(io);
  std::thread runner([&] { io.run(); });
  int rc = 1;
  {
    tcp_socket s(io);
    boost::system::error_code ec;
    s.connect({asio::ip::make_address("127.0.0.1"), spec.control_port}, ec);
    if (ec) {
      std::fprintf(stderr, "%s: cannot reach the router on port %u: %s\n", spec.name.c_str(), spec.control_port, ec.message().c_str());
    } else {
      auto ch = std::make_shared<channel>(std::move(s));
      worker_life life;
      if (spec.mode == "colocated") {
        rc = serve_colocated(spec, ch, life);
      } else {
        auto meta = kvx::transfer::http_metadata::from_url(io.get_executor(), spec.metadata_url);
        if (!meta) {
          std::fprintf(stderr, "%s: metadata: %s\n", spec.name.c_str(), meta.error().message().c_str());
        } else {
          auto transport = kvx::transport::tcp::create(io.get_executor(), loopback_tcp());
          if (!transport) {
            std::fprintf(stderr, "%s: tcp transport: %s\n", spec.name.c_str(), transport.error().message().c_str());
          } else {
            kvx::transfer::engine_options eo;
            eo.node = spec.name;
            worker_engine_t engine(*meta, eo, *transport);
            if (spec.mode == "push") {
              auto link = std::make_shared<kd::push_link>();
              kd::transfer_mode::push mode{link};
              rc = spec.role == "prefill"
                       ? serve_disaggregated<kd::layouts::layer_first>(spec, engine, mode, kd::load::wait_until{20s}, link, ch, life)
                       : serve_disaggregated<kd::layouts::page_first>(spec, engine, mode, kd::load::wait_until{20s}, link, ch, life);
            } else {
              kvx::store::client_options co;
              co.node = spec.name;
              co.replicas = 1;
              co.lease = 5000ms;
              worker_client_t client(engine, kvx::store::master_client::create(io.get_executor(), spec.master), co);
              kd::transfer_mode::pull<worker_client_t> mode{&client, "demo", "tiny-4l-256"};
              rc = spec.role == "prefill"
                       ? serve_disaggregated<kd::layouts::layer_first>(spec, engine, mode, kd::load::best_effort{20s}, nullptr, ch, life)
                       : serve_disaggregated<kd::layouts::page_first>(spec, engine, mode, kd::load::best_effort{20s}, nullptr, ch, life);
            }
          }
        }
      }
      ch->close();
    }
  }
  guard.reset();
  io.stop();
  runner.join();
  return rc;
}

// ---- router process -----------------------------------------------------------------

//! A worker process as the router sees it.
struct remote_worker {
  std::string name;
  std::string role;
  pid_t pid = -1;
  std::shared_ptr<channel> ch;
  kd::instance_id id = 0;
  bool alive = false;
  std::chrono::steady_clock::time_point last_heard;  // its last message of any kind (pongs included)
  std::chrono::steady_clock::time_point last_progress;  // the last stage of a request it finished (or failed)
  std::uint32_t queued = 0;        // requests sent and not answered
  std::uint64_t queued_tokens = 0;
  std::uint64_t bytes_saved = 0, bytes_loaded = 0;
  bool stats_pending = false;
};

//! The pool of pull mode, in the router process: a master, a DRAM node and
//! an SSD node whose segment is a file (`mapped_file`; placement fills DRAM
//! first, then the file).
struct pool_service {
  static constexpr std::size_t dram_bytes = 8u << 20, ssd_bytes = 64u << 20;  // small DRAM: the trace spills to the file

  kvx::metrics::registry registry;
  pool_state_t state{kvx::store::master_config{}, {}, registry};
  kvx::store::master_server<pool_state_t> server;
  std::filesystem::path dir;
  std::vector<std::unique_ptr<kvx::transport::tcp>> transports;
  std::vector<std::unique_ptr<pool_engine_t>> engines;
  std::optional<kvx::memory::mapped_arena> dram;
  std::optional<kvx::memory::mapped_file> ssd;
  std::vector<std::unique_ptr<kvx::store::store_node<pool_engine_t>>> nodes;

  static kvx::store::master_server_config server_config() {
    kvx::store::master_server_config c;
    c.address = "127.0.0.1";
    c.port = 0;
    c.tick_interval = 100ms;
    return c;
  }
  pool_service(asio::io_context& io, kvx::transfer::embedded_metadata& meta, const std::filesystem::path& ssd_dir)
      : server(io.get_executor(), state, server_config()) {
    if (auto ok = server.start(); !ok) throw std::runtime_error("pool master: " + ok.error().message());
    std::string tmpl = (ssd_dir / "kvx-pd-demo-XXXXXX").string();
    if (!::mkdtemp(tmpl.data())) throw std::runtime_error("cannot create a directory under " + ssd_dir.string() + " for the SSD tier");
    dir = tmpl;
    auto arena = kvx::memory::mapped_arena::create(dram_bytes);
    if (!arena) throw std::runtime_error("pool DRAM: " + arena.error().message());
    dram.emplace(std::move(*arena));
    auto file = kvx::memory::mapped_file::create(dir / "pool-ssd.segment", ssd_bytes);
    if (!file) throw std::runtime_error("pool SSD: " + file.error().message());
    ssd.emplace(std::move(*file));
    add_node(io, meta, "pool-dram", dram->region(), "dram");
    add_node(io, meta, "pool-ssd", ssd->region(), "ssd");
  }
  ~pool_service() {
    nodes.clear();
    engines.clear();
    ssd.reset();
    std::error_code ignored;
    std::filesystem::remove_all(dir, ignored);
  }
  void add_node(asio::io_context& io, kvx::transfer::embedded_metadata& meta, const std::string& name, kvx::memory::memory_region region,
                const std::string& tier) {
    auto t = kvx::transport::tcp::create(io.get_executor(), loopback_tcp());
    if (!t) throw std::runtime_error(name + ": " + t.error().message());
    transports.push_back(std::make_unique<kvx::transport::tcp>(std::move(*t)));
    kvx::transfer::engine_options eo;
    eo.node = name;
    engines.push_back(std::make_unique<pool_engine_t>(meta, eo, *transports.back()));
    kvx::store::node_options no;
    no.name = name;
    no.tier = tier;
    no.heartbeat = 200ms;
    auto& node = *nodes.emplace_back(std::make_unique<kvx::store::store_node<pool_engine_t>>(
        *engines.back(), kvx::store::master_client::create(io.get_executor(), server.endpoint()), no));
    auto pr = std::make_shared<std::promise<std::error_code>>();
    auto f = pr->get_future();
    asio::post(io, [&node, region, pr] { node.async_start(region, [pr](std::error_code ec) { pr->set_value(ec); }); });
    if (f.wait_for(10s) != std::future_status::ready) throw std::runtime_error(name + " did not start");
    if (auto ec = f.get()) throw std::runtime_error(name + ": " + ec.message());
  }
  //! Bytes in each tier, read on the io thread that owns the master's state.
  std::pair<std::uint64_t, std::uint64_t> used(asio::io_context& io) {
    std::promise<std::pair<std::uint64_t, std::uint64_t>> p;
    asio::post(io, [&] { p.set_value({state.tier_used("dram"), state.tier_used("ssd")}); });
    return p.get_future().get();
  }
  void stop(asio::io_context& io) {
    for (auto& n : nodes) n->stop();
    std::promise<void> done;
    asio::post(io, [&] {
      server.stop();
      done.set_value();
    });
    done.get_future().wait();
  }
};

//! Starts this executable as a worker.
inline pid_t spawn_worker(const worker_spec& spec) {
  const std::string self = std::filesystem::read_symlink("/proc/self/exe").string();
  const std::string text = spec.to_json().dump();
  std::vector<std::string> args{"kvx_pd_demo", "--worker", text};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = -1;
  if (int rc = ::posix_spawn(&pid, self.c_str(), nullptr, nullptr, argv.data(), environ); rc != 0)
    throw std::runtime_error("cannot start worker " + spec.name + ": " + std::strerror(rc));
  return pid;
}

//! One deployment (`colocated`, `push` or `pull`) over worker processes: the
//! router process's side. Message handlers run on the io thread, the replay
//! loop on the caller's; both under `mu_`.
class coordinator {
 public:
  coordinator(const options& o, const std::vector<request_spec>& reqs, std::string mode)
      : o_(o), reqs_(reqs), mode_(std::move(mode)), colocated_(mode_ == "colocated"), pooled_(mode_ == "pull"),
        res_(empty_result(mode_, reqs.size())), arrivals_(reqs.size(), 0) {}

  ~coordinator() {
    halt();  // first: no handler runs while the members go
    for (auto& w : workers_)
      if (w.pid > 0) ::kill(w.pid, SIGKILL);
    for (auto& w : workers_)
      if (w.pid > 0) ::waitpid(w.pid, nullptr, 0);
  }

  mode_result run() {
    runner_ = std::thread([this] { io_.run(); });
    if (auto ok = meta_server_.start(); !ok) throw std::runtime_error("metadata server: " + ok.error().message());
    if (pooled_) pool_ = std::make_unique<pool_service>(io_, meta_, o_.ssd_dir);
    start_workers();
    asio::post(io_, [this] { watch(); });
    set_up_router();
    replay();
    shut_down();
    return std::move(res_);
  }

 private:
  struct flight {
    std::size_t i = 0;
    std::int64_t arrive_ns = 0;
    std::size_t p = 0, q = 0;  // workers: prefill (or colocated) and decode
    std::uint32_t attempt = 0;
    record rec;
    std::vector<kvx::cache::block_key> keys;
    bool admitted = false, prefilled = false, decoded = false;
    bool targeted = false;  // push: the decode side answered where to write
    clock_type::time_point progress_at{};  // dispatch, or the last stage an instance finished
    std::uint64_t epoch = 0;  // push: the decode side's target epoch
    std::uint32_t layers = 0;
  };
  static constexpr std::uint32_t max_attempts = 3;

  void halt() {
    guard_.reset();
    io_.stop();
    if (runner_.joinable()) runner_.join();
  }

  // ---- start-up ----------------------------------------------------------------

  void start_workers() {
    auto add = [&](const std::string& name, const std::string& role) {
      worker_spec s;
      s.name = name;
      s.role = role;
      s.mode = mode_;
      s.control_port = acceptor_.local_endpoint().port();
      s.metadata_url = "http://127.0.0.1:" + std::to_string(meta_server_.endpoint().port());
      s.master = pool_ ? pool_->server.endpoint() : "";
      s.prefill_tp = o_.prefill_tp;
      s.max_prompt = o_.max_prompt;
      s.max_output = o_.max_output;
      s.concurrency = o_.concurrency;
      auto& w = workers_.emplace_back();
      w.name = name;
      w.role = role;
      w.pid = spawn_worker(s);
    };
    {
      std::lock_guard l(mu_);
      for (std::uint32_t i = 0; i < o_.prefill; ++i)
        add((colocated_ ? "colocated-" : "prefill-") + std::to_string(i), colocated_ ? "colocated" : "prefill");
      for (std::uint32_t i = 0; i < o_.decode; ++i)
        add((colocated_ ? "colocated-" : "decode-") + std::to_string(colocated_ ? o_.prefill + i : i), colocated_ ? "colocated" : "decode");
    }
    asio::post(io_, [this] { accept(); });
    // Each worker connects back and says hello once its memory is registered.
    std::unique_lock l(mu_);
    const auto deadline = clock_type::now() + 60s;
    while (hellos_ < workers_.size()) {
      if (clock_type::now() > deadline) throw std::runtime_error("the workers did not start within 60 s");
      for (auto& w : workers_) {
        int status = 0;
        if (!w.alive && w.pid > 0 && ::waitpid(w.pid, &status, WNOHANG) == w.pid) {
          w.pid = -1;
          throw std::runtime_error("worker " + w.name + " exited before it was ready (see its message above)");
        }
      }
      cv_.wait_for(l, 100ms);
    }
    if (!o_.quiet) std::printf("  %s: %zu worker processes ready\n", mode_.c_str(), workers_.size());
  }

  void accept() {
    acceptor_.async_accept([this](std::error_code ec, tcp_socket s) {
      if (ec) return;
      auto ch = std::make_shared<channel>(std::move(s));
      auto who = std::make_shared<std::optional<std::size_t>>();  // set by the worker's hello
      ch->start(
          [this, ch, who](const nlohmann::json& m) {
            std::lock_guard l(mu_);
            if (*who) {
              workers_[**who].last_heard = clock_type::now();
              return on_message(m, **who);
            }
            if (m["op"] != "hello") return;
            for (std::size_t k = 0; k < workers_.size(); ++k)
              if (workers_[k].name == m.value("name", std::string{}) && !workers_[k].ch) {
                *who = k;
                workers_[k].ch = ch;
                workers_[k].alive = true;
                workers_[k].last_heard = clock_type::now();
                ++hellos_;
              }
            cv_.notify_all();
          },
          [this, who](std::error_code, const std::string& why) {
            std::lock_guard l(mu_);
            if (*who) on_lost(**who, why);
          });
      accept();
    });
  }

  void set_up_router() {
    const auto cfg = model_config();
    const auto speed = tiny::measure_engine<kd::layouts::layer_first>(cfg, 64, 4).value();
    kv_per_token_ = 2ULL * cfg.kv_heads * cfg.head_dim * cfg.dtype_bytes() * cfg.layers;
    std::lock_guard l(mu_);
    for (std::size_t k = 0; k < workers_.size(); ++k) {
      auto& w = workers_[k];
      if (w.role == "colocated") continue;
      kd::instance_spec is;
      is.name = w.name;
      is.role = w.role == "decode" ? kd::instance_role::decode : kd::instance_role::prefill;
      is.prefill_tokens_per_s = speed.prefill_tokens_per_s;
      is.decode_step_s = speed.decode_step_s;
      is.decode_s_per_token = w.role == "decode" ? speed.decode_step_s / 1000 : 0;
      is.fetch_bytes_per_s = 2e9;
      w.id = router_.add_instance(is).value();
      of_instance_.resize(w.id + 1);
      of_instance_[w.id] = k;
    }
  }

  // ---- the replay ----------------------------------------------------------------

  void replay() {
    const auto t0 = clock_type::now();
    for (std::size_t i = 0; i < reqs_.size(); ++i) {
      std::unique_lock l(mu_);
      if (!cv_.wait_for(l, 120s, [&] { return flights_.size() < o_.concurrency; })) abandon("no answer within 120 s");
      arrivals_[i] = now_ns();
      dispatch(i, 0, record{});
      if (o_.kill_prefill_after && i + 1 == o_.kill_prefill_after && !colocated_) signal_prefill_of(i, SIGKILL);
      if (o_.stop_prefill_after && i + 1 == o_.stop_prefill_after && !colocated_) signal_prefill_of(i, SIGSTOP);
      if (!o_.quiet && (i + 1) % 10 == 0) std::printf("  %s: %zu/%zu requests dispatched\n", mode_.c_str(), i + 1, reqs_.size());
    }
    std::unique_lock l(mu_);
    if (!cv_.wait_for(l, 120s, [&] { return flights_.empty(); })) abandon("no answer within 120 s");
    res_.wall_s = std::chrono::duration<double>(clock_type::now() - t0).count();
    res_.retries = retries_;
  }

  // A prefill instance dies (SIGKILL, no goodbye) or hangs (SIGSTOP: still
  // connected, silent) mid-run: the one request `i` was just routed to, so
  // at least that request is in flight on it and must be retried elsewhere. mu_ held.
  void signal_prefill_of(std::size_t i, int signal) {
    auto it = flights_.find(i * 16);
    if (it == flights_.end()) return;  // refused by the router: nothing in flight to lose
    auto& victim = workers_[it->second.p];
    if (victim.pid <= 0) return;
    if (!o_.quiet)
      std::printf("  %s: %s %s (pid %d) with request %zu in flight\n", mode_.c_str(), signal == SIGKILL ? "killing" : "stopping",
                  victim.name.c_str(), victim.pid, i);
    ::kill(victim.pid, signal);
  }

  // Every 500 ms: pings each instance, and takes one that sent nothing for
  // the silence timeout for dead. A hung instance keeps its connection open,
  // so without this it was never marked down and the router kept sending it
  // requests, each lost until the 120 s replay window gave up on all of them.
  // It is killed first: woken later, it must not write into blocks that were
  // handed to another attempt. Runs on the io thread.
  void watch() {
    {
      std::lock_guard l(mu_);
      if (closing_) return;
      const auto now = clock_type::now();
      const auto limit = std::chrono::seconds(o_.silence_timeout_s);
      for (std::size_t k = 0; k < workers_.size(); ++k) {
        auto& w = workers_[k];
        if (!w.alive || !w.ch) continue;
        if (now - w.last_heard > limit) {
          if (w.pid > 0) ::kill(w.pid, SIGKILL);
          on_lost(k, "silent for " + std::to_string(o_.silence_timeout_s) + " s; killed");
          continue;
        }
        w.ch->send({{"op", "ping"}});
      }
      // An instance that answers pings but finishes nothing is as good as
      // hung: its compute is wedged. Only the 120 s window ended its requests.
      // Wedged, not busy: a request waited on it for the attempt timeout and
      // it finished no stage of any request meanwhile (a busy instance's
      // queue moves; judging each attempt alone killed loaded instances).
      // One per pass, the one waited on longest: instances held up by it (a
      // decode side whose blocks wait for a wedged prefill's layers) move
      // again once it is gone, and must not be taken for wedged too.
      const auto stalled = std::chrono::seconds(o_.attempt_timeout_s);
      const flight* longest = nullptr;
      for (const auto& [wid, f] : flights_) {
        const auto& w = workers_[awaited_instance(f)];
        if (w.alive && now - f.progress_at > stalled && now - w.last_progress > stalled &&
            (!longest || f.progress_at < longest->progress_at))
          longest = &f;
      }
      if (longest) {
        const auto k = awaited_instance(*longest);
        const auto i = longest->i;
        if (workers_[k].pid > 0) ::kill(workers_[k].pid, SIGKILL);
        on_lost(k, "no progress on request " + std::to_string(i) + " for " + std::to_string(o_.attempt_timeout_s) + " s; killed");
      }
    }
    watch_timer_.expires_after(500ms);
    watch_timer_.async_wait([this](boost::system::error_code ec) {
      if (!ec) watch();
    });
  }

  // Gives up on every attempt in flight (an instance stopped answering);
  // their instances' load goes down as for any ended attempt. mu_ held.
  void abandon(const std::string& why) {
    while (!flights_.empty()) {
      auto f = take(flights_.begin());
      res_.records[f.i] = std::move(f.rec);
      res_.records[f.i].done = true;
      res_.records[f.i].error = why;
    }
  }

  nlohmann::json request_json(const char* op, const flight& f, std::uint64_t wid) const {
    nlohmann::json j{{"op", op}, {"id", wid}, {"prompt", reqs_[f.i].prompt}, {"output", reqs_[f.i].output}};
    if (std::string_view(op) == "prefill" && f.attempt == 0 && f.i + 1 == o_.crash_prefill_before_report) j["crash_before_report"] = true;
    if (std::string_view(op) == "prefill" && f.attempt == 0 && f.i + 1 == o_.wedge_prefill_after) j["wedge"] = true;
    return j;
  }

  static void load(remote_worker& w, std::int64_t tokens) {
    w.queued = static_cast<std::uint32_t>(std::max<std::int64_t>(0, std::int64_t{w.queued} + (tokens >= 0 ? 1 : -1)));
    w.queued_tokens = static_cast<std::uint64_t>(std::max<std::int64_t>(0, static_cast<std::int64_t>(w.queued_tokens) + tokens));
  }

  // Sends attempt `attempt` of request `i` to the instances the router picks. mu_ held.
  void dispatch(std::size_t i, std::uint32_t attempt, record rec) {
    const auto& r = reqs_[i];
    const std::uint64_t wid = i * 16 + attempt;  // a retry is a new request to the connectors
    flight f;
    f.i = i;
    f.attempt = attempt;
    f.arrive_ns = arrivals_[i];  // a retry keeps the arrival: TTFT includes the failed attempt
    f.rec = std::move(rec);
    f.rec.prompt = static_cast<std::uint32_t>(r.prompt.size());
    const auto prompt = static_cast<std::int64_t>(r.prompt.size());
    auto give_up = [&](std::string why) {
      res_.records[i] = std::move(f.rec);
      res_.records[i].done = true;
      res_.records[i].error = std::move(why);
      cv_.notify_all();
    };
    if (colocated_) {
      std::optional<std::size_t> pick;  // least queued tokens first
      for (std::size_t k = 0; k < workers_.size(); ++k)
        if (workers_[k].alive && (!pick || workers_[k].queued_tokens < workers_[*pick].queued_tokens)) pick = k;
      if (!pick) return give_up("no instance is up");
      f.p = *pick;
      load(workers_[f.p], prompt);
      workers_[f.p].ch->send(request_json("serve", f, wid));
    } else {
      f.keys = hasher_.keys(r.prompt);
      for (auto& w : workers_)
        if (w.alive) {
          kd::instance_load il;
          (w.role == "prefill" ? il.queued_requests : il.running_requests) = w.queued;
          (w.role == "prefill" ? il.queued_tokens : il.running_tokens) = w.queued_tokens;
          (void)router_.update_load(w.id, il);
        }
      auto d = router_.route({.keys = f.keys, .prompt_tokens = f.rec.prompt, .block_tokens = 16, .kv_bytes_per_token = kv_per_token_});
      if (!d.accepted()) return give_up("router: " + d.reason);
      f.p = of_instance_[d.prefill];
      f.q = of_instance_[d.decode];
      load(workers_[f.p], prompt);
      if (pooled_) {
        workers_[f.p].ch->send(request_json("prefill", f, wid));
      } else {
        f.admitted = true;  // push: the decode side allocates first and says where to write
        load(workers_[f.q], r.output);
        workers_[f.q].ch->send(request_json("admit", f, wid));
      }
    }
    f.progress_at = clock_type::now();
    flights_.emplace(wid, std::move(f));
  }

  // The instance an attempt waits on: the one whose stage is not done.
  std::size_t awaited_instance(const flight& f) const {
    if (colocated_) return f.p;
    if (pooled_) return f.prefilled ? f.q : f.p;
    return !f.targeted ? f.q : !f.prefilled ? f.p : f.q;  // push: admit, then the layers, then decoding
  }

  // Ends an attempt: its instances' load goes down. mu_ held.
  flight take(std::map<std::uint64_t, flight>::iterator it) {
    auto f = std::move(it->second);
    flights_.erase(it);
    const auto& r = reqs_[f.i];
    if (!f.prefilled) load(workers_[f.p], -static_cast<std::int64_t>(r.prompt.size()));
    if (!colocated_ && f.admitted) load(workers_[f.q], -static_cast<std::int64_t>(r.output));
    cv_.notify_all();
    return f;
  }

  // A finished request. mu_ held.
  void complete(std::map<std::uint64_t, flight>::iterator it) {
    auto f = take(it);
    f.rec.done = true;
    res_.records[f.i] = std::move(f.rec);
  }

  // A failed attempt: again on the instances the router still has up, or give up. mu_ held.
  void retry(std::uint64_t wid, const std::string& why) {
    auto it = flights_.find(wid);
    if (it == flights_.end()) return;
    auto f = take(it);
    if (f.attempt + 1 >= max_attempts) {
      res_.records[f.i] = std::move(f.rec);
      res_.records[f.i].done = true;
      res_.records[f.i].error = why + " (gave up after " + std::to_string(max_attempts) + " attempts)";
      return;
    }
    ++retries_;
    if (!o_.quiet) std::printf("  %s: request %zu: %s; retrying\n", mode_.c_str(), f.i, why.c_str());
    dispatch(f.i, f.attempt + 1, record{});
  }

  // Push: tells the decode instance that nothing more will arrive for this
  // attempt (its prefill instance failed or is gone): it fails the load now
  // instead of at its deadline, answers "failed", and the attempt is retried. mu_ held.
  void fail_push(const flight& f, std::uint64_t wid, const std::string& why) {
    auto& d = workers_[f.q];
    if (!d.alive) return;
    for (std::uint32_t l = 0; l < f.layers; ++l) {
      kd::push_notice n;
      n.request = wid;
      n.epoch = f.epoch;
      n.layer = l;
      n.code = make_error_code(kvx::errc::connection_lost);
      n.context = why;
      d.ch->send({{"op", "notice"}, {"notice", kd::to_json(n)}});
    }
  }

  // ---- messages from workers (io thread, mu_ held) -------------------------------------

  void on_message(const nlohmann::json& m, std::size_t from) {
    const auto op = m["op"].get<std::string>();
    if (op == "pong") return;  // its time was taken as it came in
    if (op == "stats") {
      workers_[from].bytes_saved = m.value("bytes_saved", std::uint64_t{0});
      workers_[from].bytes_loaded = m.value("bytes_loaded", std::uint64_t{0});
      workers_[from].stats_pending = false;
      cv_.notify_all();
      return;
    }
    if (op == "notice") {  // push: a prefill instance's per-layer notice, relayed to its decode instance
      const auto to = m.value("to", std::string{});
      for (auto& w : workers_)
        if (w.name == to && w.alive) w.ch->send({{"op", "notice"}, {"notice", m.at("notice")}});
      return;
    }
    const auto wid = m.at("id").get<std::uint64_t>();
    auto it = flights_.find(wid);
    if (it == flights_.end()) return;  // an answer for an attempt already given up
    auto& f = it->second;
    // Each attempt has its own id: only its own instances answer for it.
    const bool from_decode = from == f.q && (op == "admitted" || op == "done");
    const bool from_prefill = from == f.p && (op == "prefilled" || (colocated_ && op == "done"));
    if (!from_decode && !from_prefill && !(op == "failed" && (from == f.p || from == f.q)))
      throw std::invalid_argument("'" + op + "' for request attempt " + std::to_string(wid) + " from " + workers_[from].name +
                                  ", which does not serve it");
    f.progress_at = workers_[from].last_progress = clock_type::now();
    if (op == "admitted" && !pooled_) {
      auto t = kd::push_target_from_json(m.at("target"));
      if (!t) return retry(wid, workers_[from].name + " sent a bad target: " + t.error().message());
      f.epoch = t->epoch;
      f.layers = t->layers;
      f.targeted = true;
      if (!workers_[f.p].alive) return fail_push(f, wid, workers_[f.p].name + " is gone");
      auto msg = request_json("prefill", f, wid);
      msg["target"] = m.at("target");
      workers_[f.p].ch->send(msg);
    } else if (op == "prefilled") {
      f.prefilled = true;
      f.rec.cached = m.value("cached", 0u);
      f.rec.save_busy_s = m.value("save_busy_s", 0.0);
      f.rec.save_tail_s = m.value("save_tail_s", 0.0);
      f.rec.bytes += m.value("bytes", std::uint64_t{0});
      f.rec.save_bytes = m.value("bytes", std::uint64_t{0});
      f.rec.prefill_cpu_s = m.value("prefill_cpu_s", 0.0);
      load(workers_[f.p], -static_cast<std::int64_t>(reqs_[f.i].prompt.size()));
      if (pooled_) {
        (void)router_.on_stored(kd::pool_location, f.keys);  // the pool is always known
        if (!workers_[f.q].alive) return retry(wid, workers_[f.q].name + " is gone");
        f.admitted = true;
        load(workers_[f.q], reqs_[f.i].output);
        workers_[f.q].ch->send(request_json("admit", f, wid));
      } else if (f.decoded) {
        complete(it);  // push: the decode side finished first
      }
    } else if (op == "done") {
      f.decoded = true;
      f.rec.tokens = m.at("tokens").get<std::vector<std::uint32_t>>();
      f.rec.ttft_s = static_cast<double>(m.at("first_token_ns").get<std::int64_t>() - f.arrive_ns) / 1e9;
      f.rec.tpot_s = m.value("tpot_s", 0.0);
      if (colocated_) f.rec.prefill_cpu_s = m.value("prefill_cpu_s", 0.0);
      f.rec.decode_cpu_s = m.value("decode_cpu_s", 0.0);
      f.rec.recomputed += m.value("recomputed", 0u);
      f.rec.bytes += m.value("bytes", std::uint64_t{0});
      // Push: also wait for the prefill side's report, unless its instance is
      // gone (it died after its last layer landed, before reporting: the
      // failure notices sent then came too late to fail this decode).
      if (!colocated_ && !pooled_ && !f.prefilled && !workers_[f.p].alive && !o_.quiet)
        std::printf("  %s: request %zu: decoded; %s died before it reported\n", mode_.c_str(), f.i, workers_[f.p].name.c_str());
      if (colocated_ || pooled_ || f.prefilled || !workers_[f.p].alive) complete(it);
    } else if (op == "failed") {
      const auto stage = m.value("stage", std::string{});
      const auto why = workers_[from].name + " " + stage + ": " + m.value("error", std::string{});
      if (!pooled_ && !colocated_ && stage == "prefill") return fail_push(f, wid, why);  // decode fails next, then the retry
      retry(wid, why);
    }
  }

  void on_lost(std::size_t k, const std::string& why) {
    auto& w = workers_[k];
    if (!w.alive) return;
    w.alive = false;
    w.stats_pending = false;
    if (w.role != "colocated") (void)router_.set_up(w.id, false);
    if (!o_.quiet && !closing_) std::printf("  %s: lost %s (%s)\n", mode_.c_str(), w.name.c_str(), why.c_str());
    std::vector<std::uint64_t> again, finished;
    for (auto& [wid, f] : flights_) {
      if (f.p == k && !f.prefilled) {
        if (f.decoded) finished.push_back(wid);  // push: decoded already; only the prefill's report is lost
        else if (!colocated_ && !pooled_) fail_push(f, wid, w.name + " died mid-stream");  // its decode fails, then the retry
        else again.push_back(wid);
      } else if (!colocated_ && f.q == k && f.admitted) {
        again.push_back(wid);
      }
    }
    for (auto wid : finished) complete(flights_.find(wid));
    for (auto wid : again) retry(wid, w.name + " died");
    cv_.notify_all();
  }

  // ---- shut-down ------------------------------------------------------------------

  void shut_down() {
    {
      std::unique_lock l(mu_);
      for (auto& w : workers_)
        if (w.alive && !colocated_) w.stats_pending = true, w.ch->send({{"op", "stats"}});
      cv_.wait_for(l, 10s, [&] { return std::none_of(workers_.begin(), workers_.end(), [](const remote_worker& w) { return w.stats_pending; }); });
      closing_ = true;
      for (auto& w : workers_) {
        if (w.role == "prefill") res_.bytes_moved += w.bytes_saved + w.bytes_loaded;
        if (w.role == "decode" && pooled_) res_.bytes_moved += w.bytes_loaded;
        if (w.alive) w.ch->send({{"op", "exit"}});
      }
    }
    for (auto& w : workers_)  // a moment to leave cleanly; the destructor kills what is left
      for (int k = 0; k < 250 && w.pid > 0; ++k) {
        if (::waitpid(w.pid, nullptr, WNOHANG) == w.pid) w.pid = -1;
        else std::this_thread::sleep_for(20ms);
      }
    std::promise<void> closed;
    asio::post(io_, [&] {
      boost::system::error_code ec;
      acceptor_.close(ec);
      watch_timer_.cancel();
      for (auto& w : workers_)
        if (w.ch) w.ch->close();
      meta_server_.stop();
      // After the channels' close handlers (queued first on this one io
      // thread): a channel that never shut, that of an instance still hung
      // here, kept itself alive through its message handler (a leak at exit).
      asio::post(io_, [&] { closed.set_value(); });
    });
    closed.get_future().wait();
    if (pool_) {
      const auto [dram, ssd] = pool_->used(io_);
      res_.pool_dram_bytes = dram;
      res_.pool_ssd_bytes = ssd;
      pool_->stop(io_);
    }
  }

  const options& o_;
  const std::vector<request_spec>& reqs_;
  std::string mode_;
  bool colocated_, pooled_;
  mode_result res_;
  std::vector<std::int64_t> arrivals_;
  std::uint64_t kv_per_token_ = 0;
  kvx::cache::block_hasher hasher_ =
      kvx::cache::block_hasher::make({.block_tokens = 16, .ns = {.model = "tiny-4l-256", .tenant = "demo", .adapter = {}, .salt = {}}}).value();

  asio::io_context io_;
  asio::executor_work_guard<asio::io_context::executor_type> guard_{io_.get_executor()};
  kvx::transfer::embedded_metadata meta_{io_.get_executor()};
  kvx::transfer::http_metadata_server<kvx::transfer::embedded_metadata> meta_server_{io_.get_executor(), meta_};
  std::unique_ptr<pool_service> pool_;
  asio::ip::tcp::acceptor acceptor_{io_, {asio::ip::make_address("127.0.0.1"), 0}};
  asio::steady_timer watch_timer_{io_};

  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<remote_worker> workers_;
  std::size_t hellos_ = 0;
  bool closing_ = false;
  kd::router<kd::routing::cache_aware> router_;
  std::vector<std::size_t> of_instance_;  // router instance -> worker
  std::map<std::uint64_t, flight> flights_;  // attempts in flight, by wire id
  std::size_t retries_ = 0;

  std::thread runner_;
};

inline mode_result run_processes(const options& o, const std::vector<request_spec>& reqs, const std::string& mode) {
  coordinator c(o, reqs, mode);
  return c.run();
}


}  // namespace pd_demo
