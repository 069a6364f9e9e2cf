#pragma once
//! \file
//! Prefill and decode workers: a `tiny::engine` wired to a `kv_connector` the
//! way an engine's scheduler and model runner call it. They are the worked
//! example of docs/disagg-guide.md and what the P/D demo and the connector
//! tests run; a real engine puts the same calls in its own scheduler.
//!
//! - `block_allocator`: the engine's free list of KV blocks (thread-safe);
//!   also the free list of recurrent-state slots for hybrid models.
//! - `worker<Layout, Engine, Mode, Load>`: one instance (its TP shards,
//!   its block pool, its registered memory, its connector).
//!   - `run_prefill(req)` (producer): asks the connector how much is cached,
//!     allocates, loads the cached prefix layer by layer while computing the
//!     rest, saves each layer as soon as it is computed (layer-wise
//!     streaming), waits for the saves, frees. A failed load under a
//!     `recompute` policy re-runs from the valid prefix. Hybrid models: the
//!     request gets a state slot and a snapshot slot, where the engine leaves
//!     the state at `state_snapshot_position` for the connector to send.
//!   - `admit(req, max_new)` then `run_decode(req, ticket, n)` (consumer):
//!     admitting allocates the blocks (push: and publishes where the prefill
//!     instance must write); running waits per layer, computes the last prompt
//!     token, then decodes. `abort(ticket)` gives up on a request (the router
//!     retries it elsewhere).
//!
//! Thread safety: `run_prefill` / `run_decode` may run on several threads at
//! once for different requests (the engine is immutable; blocks are disjoint).
//! They block the calling thread; the transfer engine's executor must run on
//! another thread.
//!
//! \code
//! auto p = tiny::worker<layouts::layer_first, engine_type, transfer_mode::push>::make(
//!              engine, {.name = "prefill-0", .role = connector_role::producer, .model = cfg, .num_blocks = 256}, {link}).value();
//! auto ticket = d->admit(req, 8).value();       // decode side first (push)
//! auto pre = p->run_prefill(req).value();       // computes and pushes, layer by layer
//! auto out = d->run_decode(req, ticket, 8).value();
//! \endcode

#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include <kvx/core/result.hpp>
#include <kvx/disagg/connector.hpp>

#include <tiny/engine.hpp>

namespace tiny {

using kvx::errc;
using kvx::error;
using kvx::result;
using namespace kvx::disagg;  // kv_connector, connector_role, kv_request, transfer_mode, load, layouts


//! A thread-safe free list of block ids `[0, n)`.
class block_allocator {
 public:
  explicit block_allocator(std::uint32_t n) {
    free_.reserve(n);
    for (std::uint32_t b = n; b-- > 0;) free_.push_back(b);
  }
  //! `n` blocks, or `errc::capacity_exceeded`.
  result<std::vector<std::uint32_t>> allocate(std::uint32_t n) {
    std::lock_guard lock(mutex_);
    if (free_.size() < n)
      return error{errc::capacity_exceeded, "block_allocator: " + std::to_string(n) + " blocks wanted, " +
                                                std::to_string(free_.size()) + " free"};
    std::vector<std::uint32_t> out(free_.end() - n, free_.end());
    free_.resize(free_.size() - n);
    return out;
  }
  void free(std::span<const std::uint32_t> blocks) {
    std::lock_guard lock(mutex_);
    free_.insert(free_.end(), blocks.begin(), blocks.end());
  }
  [[nodiscard]] std::size_t available() const {
    std::lock_guard lock(mutex_);
    return free_.size();
  }

 private:
  mutable std::mutex mutex_;
  std::vector<std::uint32_t> free_;
};

//! One instance's set-up.
struct worker_config {
  std::string name = "instance";
  connector_role role = connector_role::producer;
  model_config model{};        //!< with `tp` and `block_tokens` of this instance
  std::uint32_t num_blocks = 256;   //!< KV blocks per shard
  std::uint32_t source_tp = 0;      //!< consumers: the producers' TP (0: same)
  std::uint32_t source_block_tokens = 0;
  std::uint32_t staging_blocks = 0;
  std::chrono::steady_clock::duration save_timeout = std::chrono::seconds(30);
  //! Push consumers: how long a failed layer's writes may still land (`connector_config::drain_margin`).
  std::chrono::steady_clock::duration drain_margin = std::chrono::seconds(1);
  //! Push consumers: how long a prefill may write a target (`connector_config::push_lease`; 0: no deadline).
  std::chrono::steady_clock::duration push_lease = std::chrono::minutes(5);
  //! Push producers: how far the decode hosts' clocks may be off (`connector_config::max_clock_skew`).
  std::chrono::steady_clock::duration max_clock_skew = std::chrono::milliseconds(500);
  //! Recurrent-state slots per shard (models with recurrent layers; 0: 16).
  //! A prefill request holds two (its state and the snapshot it sends), a decode request one.
  std::uint32_t state_slots = 0;
};

//! What a prefill run did.
struct prefill_outcome {
  std::uint32_t first_token = 0;
  std::uint32_t cached_tokens = 0;     //!< loaded instead of computed (pool hit)
  std::uint32_t recomputed_tokens = 0; //!< cached tokens whose load failed and were recomputed
  double compute_s = 0;                //!< the forward pass (with per-layer waits)
  double compute_cpu_s = 0;            //!< the same, in the calling thread's CPU time (waits not counted)
  double save_tail_s = 0;              //!< time from the end of compute until every save finished (the exposed transfer)
  save_report saved;
};

//! A consumer's admitted request: its blocks and how many tokens it loads.
struct decode_ticket {
  request_id id = 0;
  std::vector<std::uint32_t> blocks;
  std::uint32_t external_tokens = 0;
  std::uint32_t state_slot = no_state_slot;  //!< hybrid models: where the request's recurrent state lives
};

//! What a decode run did.
struct decode_outcome {
  std::vector<std::uint32_t> tokens;   //!< the generated tokens (the first one included)
  std::uint32_t loaded_tokens = 0;
  std::uint32_t recomputed_tokens = 0;
  double first_token_s = 0;            //!< waits for the load + computes the uncached tail
  double tpot_s = 0;                   //!< mean time per output token after the first
  double steps_cpu_s = 0;              //!< the steps after the first token, in the calling thread's CPU time
  load_report load;
};

template <kv_layout Layout, class Engine, kv_transfer_mode Mode, load_policy Load = load::wait_full>
class worker {
 public:
  using connector_type = kv_connector<Layout, Engine, Mode, Load>;
  using clock = std::chrono::steady_clock;

  //! Builds the instance (layouts, memory, engine, connector) and registers
  //! its memory. Blocks up to the connector's control timeout.
  static result<std::unique_ptr<worker>> make(Engine& engine, worker_config cfg, Mode mode, Load load = {}) {
    KVX_TRY(cfg.model.validate());
    if (cfg.model.shard_shape().recurrent_layers() == 0)
      cfg.state_slots = 0;
    else if (cfg.state_slots == 0)
      cfg.state_slots = 16;
    std::unique_ptr<worker> w(new worker(cfg));
    std::vector<kv_shard<Layout>> shards;
    w->memory_.reserve(cfg.model.tp);
    for (std::uint32_t r = 0; r < cfg.model.tp; ++r) {
      auto l = Layout::make(cfg.model.shard_shape(), cfg.num_blocks, cfg.state_slots);
      if (!l) return l.error();
      w->memory_.emplace_back(l->bytes_required(), std::byte{0});
      shards.push_back({*l, w->memory_.back()});
    }
    auto eng = tiny::engine<Layout>::make(cfg.model, shards);
    if (!eng) return eng.error();
    w->engine_.emplace(std::move(*eng));
    connector_config cc{.name = cfg.name,
                        .role = cfg.role,
                        .source_tp = cfg.source_tp,
                        .source_block_tokens = cfg.source_block_tokens,
                        .staging_blocks = cfg.staging_blocks,
                        .save_timeout = cfg.save_timeout,
                        .drain_margin = cfg.drain_margin,
                        .push_lease = cfg.push_lease,
                        .max_clock_skew = cfg.max_clock_skew};
    auto conn = connector_type::make(engine, std::move(cc), std::move(shards), std::move(mode), std::move(load));
    if (!conn) return conn.error();
    w->conn_ = std::move(*conn);
    KVX_TRY(w->conn_->start());
    return w;
  }

  [[nodiscard]] connector_type& connector() noexcept { return *conn_; }
  [[nodiscard]] const tiny::engine<Layout>& model() const noexcept { return *engine_; }
  [[nodiscard]] block_allocator& blocks() noexcept { return alloc_; }
  [[nodiscard]] block_allocator& state_slots() noexcept { return state_alloc_; }
  [[nodiscard]] const worker_config& config() const noexcept { return cfg_; }

  //! Producer: compute the prompt (loading what the pool holds), save it layer by layer.
  result<prefill_outcome> run_prefill(const kv_request& req) {
    prefill_outcome out;
    auto matched = conn_->get_num_new_matched_tokens(req);
    if (!matched) return matched.error();
    const auto n = static_cast<std::uint32_t>(req.tokens.size());
    // Hybrid models: the request's state slot, and the slot the engine leaves the state to send in.
    const std::uint32_t snapshot_at = conn_->state_snapshot_position(n, *matched);
    auto a = allocate(n, snapshot_at > 0 ? 2U : 1U);
    if (!a) return a.error();
    kv_sequence seq = a->sequence();
    if (snapshot_at > 0) {
      seq.snapshot_slot = a->slots[1];
      seq.snapshot_at = snapshot_at;
    }
    auto release = [&] { free(*a); };
    auto fail = [&](const kvx::error& e) -> result<prefill_outcome> {
      (void)conn_->wait_for_save(req.id);  // nothing may still read the blocks we free
      if (conn_->request_finished(req.id)) release();
      return e;
    };
    if (auto ok = conn_->update_state_after_alloc(req, seq, *matched); !ok) {
      release();
      return ok.error();
    }
    out.cached_tokens = *matched;
    if (auto ok = conn_->start_load_kv(req.id); !ok) return fail(ok.error());
    const auto t0 = clock::now();
    const double c0 = thread_cpu_seconds{}();
    auto first = engine_->prefill(req.tokens, seq, *matched, conn_->hooks(req.id));
    if (!first)
      if (auto e = conn_->load_error(req.id)) return fail(e);
    if (*matched > 0) {
      auto rep = conn_->finish_load(req.id);
      if (!rep) return fail(rep.error());
      if (!rep->complete()) {
        out.recomputed_tokens = *matched - rep->valid_tokens;
        out.cached_tokens = rep->valid_tokens;
        first = engine_->prefill(req.tokens, seq, rep->valid_tokens, conn_->hooks(req.id));
      }
    }
    const auto t1 = clock::now();
    out.compute_s = std::chrono::duration<double>(t1 - t0).count();
    out.compute_cpu_s = thread_cpu_seconds{}() - c0;
    if (!first) return fail(first.error());
    out.first_token = *first;
    auto saved = conn_->wait_for_save(req.id);
    if (!saved) return fail(saved.error());
    out.saved = *saved;
    out.save_tail_s = std::max(0.0, std::chrono::duration<double>(saved->last_end - t1).count());
    KVX_TRY(conn_->request_finished(req.id));
    release();
    return out;
  }

  //! Consumer: allocate blocks for the prompt and `max_new` tokens and tell
  //! the connector (push: publishes the target the prefill instance writes to).
  result<decode_ticket> admit(const kv_request& req, std::uint32_t max_new) {
    auto matched = conn_->get_num_new_matched_tokens(req);
    if (!matched) return matched.error();
    const auto n = static_cast<std::uint32_t>(req.tokens.size());
    auto a = allocate(n + max_new, 1);
    if (!a) return a.error();
    const kv_sequence seq = a->sequence();
    if (auto ok = conn_->update_state_after_alloc(req, seq, *matched); !ok) {
      free(*a);
      return ok.error();
    }
    return decode_ticket{req.id, std::move(a->blocks), *matched, seq.state_slot};
  }

  //! Consumer: wait for the KV layer by layer while computing the prompt's
  //! uncached tail, then decode `n` tokens in all. On error the request stays
  //! admitted: `abort` it.
  result<decode_outcome> run_decode(const kv_request& req, const decode_ticket& t, std::uint32_t n) {
    decode_outcome out;
    KVX_TRY(conn_->start_load_kv(req.id));
    kv_sequence seq;
    seq.block_table = t.blocks;
    seq.state_slot = t.state_slot;
    const auto t0 = clock::now();
    auto first = engine_->prefill(req.tokens, seq, t.external_tokens, conn_->hooks(req.id));
    if (!first) {
      if (auto e = conn_->load_error(req.id)) return e;
      return first.error();
    }
    out.loaded_tokens = t.external_tokens;
    if (t.external_tokens > 0) {
      auto rep = conn_->finish_load(req.id);
      if (!rep) return rep.error();
      out.load = *rep;
      if (!rep->complete()) {
        out.recomputed_tokens = t.external_tokens - rep->valid_tokens;
        out.loaded_tokens = rep->valid_tokens;
        first = engine_->prefill(req.tokens, seq, rep->valid_tokens);
        if (!first) return first.error();
      }
    }
    const auto t1 = clock::now();
    out.first_token_s = std::chrono::duration<double>(t1 - t0).count();
    out.tokens.push_back(*first);
    const auto len = static_cast<std::uint32_t>(req.tokens.size());
    const double c1 = thread_cpu_seconds{}();
    for (std::uint32_t i = 1; i < n; ++i) {
      auto next = engine_->decode(out.tokens.back(), len + i - 1, seq);
      if (!next) return next.error();
      out.tokens.push_back(*next);
    }
    if (n > 1) {
      out.tpot_s = std::chrono::duration<double>(clock::now() - t1).count() / (n - 1);
      out.steps_cpu_s = thread_cpu_seconds{}() - c1;
    }
    // A failed layer's writes may still be landing: the blocks go back when the connector says so.
    KVX_TRY(conn_->request_finished(req.id, [this, t] { release(t); }));
    return out;
  }

  //! Gives up on an admitted request. `quarantine` keeps its blocks (and
  //! state slot) out of the free lists until the connector knows no write
  //! for it can land any more (push: a producer that stopped answering may
  //! still write them; until its target's write_by and the drain margin
  //! have passed if it never reports again); otherwise they
  //! are free at once.
  result<void> abort(const decode_ticket& t, bool quarantine) {
    if (quarantine) return conn_->request_finished(t.id, [this, t] { release(t); });
    KVX_TRY(conn_->request_finished(t.id));
    release(t);
    return {};
  }

 private:
  explicit worker(const worker_config& cfg) : cfg_(cfg), alloc_(cfg.num_blocks), state_alloc_(cfg.state_slots) {}
  struct allocation {
    std::vector<std::uint32_t> blocks;
    std::vector<std::uint32_t> slots;  // state slots (none for attention-only models)
    [[nodiscard]] kv_sequence sequence() const {
      kv_sequence seq;
      seq.block_table = blocks;
      if (!slots.empty()) seq.state_slot = slots[0];
      return seq;
    }
  };
  // Blocks for `tokens` tokens and, for hybrid models, `slots` state slots.
  result<allocation> allocate(std::uint32_t tokens, std::uint32_t slots) {
    auto b = alloc_.allocate(blocks_for(tokens));
    // Blocks of finished requests may be waiting out a drain margin.
    if (!b && conn_->release_quiet() > 0) b = alloc_.allocate(blocks_for(tokens));
    if (!b) return b.error();
    auto s = state_alloc_.allocate(cfg_.state_slots == 0 ? 0U : slots);
    if (!s && conn_->release_quiet() > 0) s = state_alloc_.allocate(cfg_.state_slots == 0 ? 0U : slots);
    if (!s) {
      alloc_.free(*b);
      return s.error();
    }
    return allocation{std::move(*b), std::move(*s)};
  }
  void free(const allocation& a) {
    alloc_.free(a.blocks);
    state_alloc_.free(a.slots);
  }
  void release(const decode_ticket& t) {
    alloc_.free(t.blocks);
    if (t.state_slot != no_state_slot) {
      const std::uint32_t one[1] = {t.state_slot};
      state_alloc_.free(one);
    }
  }
  [[nodiscard]] std::uint32_t blocks_for(std::uint32_t tokens) const {
    return (tokens + cfg_.model.block_tokens - 1) / cfg_.model.block_tokens;
  }

  worker_config cfg_;
  block_allocator alloc_;
  block_allocator state_alloc_;
  std::vector<std::vector<std::byte>> memory_;
  std::optional<tiny::engine<Layout>> engine_;
  std::unique_ptr<connector_type> conn_;
};

}  // namespace tiny
