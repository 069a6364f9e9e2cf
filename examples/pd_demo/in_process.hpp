#pragma once
// kvx_pd_demo --in-process: every instance, the pool and the router in one
// process over the `local` transport (the reference for the multi-process run).
#include "common.hpp"
#include "report.hpp"

namespace pd_demo {

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

// ---- the three deployments --------------------------------------------------------

mode_result run_colocated(const options& o, const std::vector<request_spec>& reqs) {
  mode_result res = empty_result("colocated", reqs.size());
  const auto cfg = model_config();
  const std::uint32_t instances = o.prefill + o.decode;
  const std::uint32_t blocks_per_req = (o.max_prompt + o.max_output + cfg.block_tokens - 1) / cfg.block_tokens;
  const std::uint32_t nblocks = blocks_per_req * (o.concurrency + 1);
  struct instance {
    std::vector<std::byte> memory;
    std::optional<tiny::engine<kd::layouts::layer_first>> engine;
    std::unique_ptr<tiny::block_allocator> alloc;
    std::unique_ptr<worker_thread> thread;
  };
  std::vector<instance> inst(instances);
  for (auto& in : inst) {
    auto l = kd::layouts::layer_first::make(cfg.shard_shape(), nblocks).value();
    in.memory.assign(l.bytes_required(), std::byte{0});
    in.engine.emplace(tiny::engine<kd::layouts::layer_first>::make(cfg, l, in.memory).value());
    in.alloc = std::make_unique<tiny::block_allocator>(nblocks);
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
  using pworker = tiny::worker<kd::layouts::layer_first, engine_t, Mode, Load>;
  using dworker = tiny::worker<kd::layouts::page_first, engine_t, Mode, Load>;
  mode_result res = empty_result(name, reqs.size());
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
  const auto speed = tiny::measure_engine<kd::layouts::layer_first>(cfg, 64, 4).value();
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
    tiny::worker_config wc{.name = n, .role = kd::connector_role::consumer, .model = dcfg, .num_blocks = nblocks};
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
    auto decode_job = [&, i, q, arrive, req, finish](std::shared_ptr<record> rec, std::optional<tiny::decode_ticket> ticket) {
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
    std::optional<tiny::decode_ticket> ticket;
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
          (void)i, (void)q, (void)decode_job, (void)finish;  // push uses them on the decode side only
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
          rec->save_bytes = pre->saved.bytes;
          if constexpr (pooled) {
            {
              std::lock_guard l(mu);
              (void)router.on_stored(kd::pool_location, keys);  // the pool is always known
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


}  // namespace pd_demo
