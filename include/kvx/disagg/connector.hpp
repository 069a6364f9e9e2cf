#pragma once
//! \file
//! `kv_connector<Layout, Engine, Mode, LoadPolicy>`: the interface an inference
//! engine calls to move KV between prefill and decode instances and the pool,
//! with the semantics of vLLM's KV connector (v1).
//!
//! | side | call | where the engine makes it | blocks? |
//! | --- | --- | --- | --- |
//! | scheduler | `get_num_new_matched_tokens(req)` | before allocating blocks for a new request: how many prompt tokens will be loaded (pull: the pool's longest cached prefix; push, decode side: every prompt token but the last, which the prefill instance sends) | pull: one pool round trip (up to `control_timeout`) |
//! | scheduler | `update_state_after_alloc(req, blocks, n)` | after allocating: the request's block table and how many tokens it loads | no |
//! | scheduler | `request_finished(id)` | when the request leaves the engine | no (`errc::busy` while transfers touch its blocks) |
//! | worker | `start_load_kv(id)` | before the forward pass | no: loads run on the transfer engine's executor |
//! | worker | `wait_for_layer_load(id, layer)` | before layer `layer` reads KV (`layer_hooks::before_layer`) | until that layer arrived, failed, or the load policy's deadline |
//! | worker | `save_kv_layer(id, layer)` | right after layer `layer` wrote its KV (`layer_hooks::after_layer`): layer-wise streaming | no: the save runs while the next layer computes |
//! | worker | `wait_for_save(id)` | after the forward pass, before the blocks are freed or reused | until every save finished (up to `save_timeout`) |
//! | worker | `finish_load(id)` | after the forward pass of a loading request | until every layer resolved; its `load_report` names the blocks whose load failed (`failed_blocks`) and the prefix that is valid |
//!
//! **Modes** (`transfer_mode::push`, `transfer_mode::pull<Store>`,
//! kvx/disagg/kv_transfer_mode.hpp) choose the data path; **load policies**
//! (`load::wait_full`, `load::wait_until`, `load::best_effort`,
//! kvx/disagg/load_policy.hpp) what a late or failed load means: an error
//! (the step aborts, the router retries elsewhere) or blocks to recompute.
//! A failed load marks exactly the source blocks whose bytes did not arrive;
//! `load_report::valid_tokens` is the prefix before the first of them, from
//! which the engine recomputes (keys chain, so later blocks depend on it).
//! With `recompute`, saves of a layer computed over a failed load are skipped
//! (nothing wrong ever reaches the pool) and are allowed again in the re-run.
//!
//! **Layouts, TP, block sizes.** Shards whose shape equals the producer's
//! (`connector_config::source_tp`, `source_block_tokens`) are loaded in place
//! (push: one-sided writes into the decode blocks; pull: zero-copy gets into
//! them). Otherwise the bytes land in a `page_first` staging region shaped
//! like the producer's shards and `wait_for_layer_load` converts that layer
//! into the engine's layout (`convert`), so a TP=2 prefill feeds a TP=1
//! decode with other block sizes and another layout. Layouts must lay a
//! block's layer out as `[K|V][token][head][dim]` (every built-in one does).
//!
//! **Recurrent state** (hybrid attention / Mamba-style models, `kv_shape::kinds`)
//! travels beside the paged KV, one object per (recurrent layer, shard). State
//! cannot be rewound, so it is only valid at exactly the position it was
//! computed at: the producer's engine leaves a copy of each recurrent layer's
//! state at `state_snapshot_position` in a second state slot (`kv_sequence::
//! snapshot_slot`), and that copy is what is sent. Push: the position is the
//! last prompt token's (the consumer loads all tokens but the last, then
//! computes it from the pushed state). Pull: the last full pool block before
//! the last prompt token, saved as its own object keyed by that block's key;
//! a pool hit of k blocks is only usable when the state after block k is in
//! the pool (`get_num_new_matched_tokens` shrinks the hit to the longest such
//! prefix). A state that fails to load, like any failed block of a hybrid
//! model, leaves no usable prefix: `valid_tokens` is 0 (recompute) or the
//! request fails (`fail` policies). Pass the slots with the `kv_sequence`
//! overload of `update_state_after_alloc`. Staged loads (other TP or block
//! size) convert state too (`convert` splits it like the heads).
//!
//! **Threads.** Scheduler and worker calls may come from any threads but
//! never from a thread running the transfer engine's executor (they wait for
//! it). The executor must be single-threaded (an `io_context` run by one
//! thread, or a strand), as the store client requires. Misuse (a load for an
//! unknown request, two saves of one layer, a wait without a start) returns
//! an error naming the request and the call.
//!
//! \code
//! auto conn = kv_connector<layouts::layer_first, engine_type, transfer_mode::push, load::wait_until>::make(
//!                 engine, {.name = "decode-0", .role = connector_role::consumer}, shards, {link}, {300ms}).value();
//! conn->start().value();
//! const std::uint32_t n = conn->get_num_new_matched_tokens(req).value();
//! conn->update_state_after_alloc(req, blocks, n).value();
//! conn->start_load_kv(req.id).value();
//! auto first = model.prefill(req.tokens, {blocks}, n, conn->hooks(req.id));   // waits per layer
//! auto report = conn->finish_load(req.id).value();
//! \endcode

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <cstddef>
#include <cstdint>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/post.hpp>

#include <kvx/cache/block_hasher.hpp>
#include <kvx/core/async.hpp>
#include <kvx/core/log.hpp>
#include <kvx/core/result.hpp>
#include <kvx/disagg/detail/kv_stream.hpp>
#include <kvx/disagg/kv_layout.hpp>
#include <kvx/disagg/kv_transfer_mode.hpp>
#include <kvx/disagg/layout_convert.hpp>
#include <kvx/disagg/layouts/page_first.hpp>
#include <kvx/disagg/load_policy.hpp>
#include <kvx/disagg/engine_hooks.hpp>
#include <kvx/memory/memory_region.hpp>
#include <kvx/store/types.hpp>
#include <kvx/transfer/batch.hpp>
#include <kvx/transfer/batch_deadline.hpp>

namespace kvx::disagg {

//! What a connector does: produce KV (a prefill instance), consume it (a
//! decode instance), or both (an instance that loads cached prefixes from the
//! pool and saves what it computes; pull mode only).
enum class connector_role : std::uint8_t { producer, consumer, both };

//! A request as the connector sees it: an id and its prompt.
struct kv_request {
  request_id id = 0;
  std::span<const std::uint32_t> tokens{};
};

struct connector_config {
  std::string name = "instance";  //!< segments are registered as "<name>/kv<rank>" and "<name>/stage"
  connector_role role = connector_role::both;
  std::uint32_t source_tp = 0;            //!< the producers' tensor-parallel size (0: same as this instance)
  std::uint32_t source_block_tokens = 0;  //!< the producers' block size (0: same); pull: the pool's block size
  std::uint32_t staging_blocks = 0;       //!< producer-shaped staging blocks (needed when shapes differ)
  std::chrono::steady_clock::duration save_timeout = std::chrono::seconds(30);
  std::chrono::steady_clock::duration control_timeout = std::chrono::seconds(5);  //!< registration, pool lookups
  //! Push consumer: how long after a failure notice that layer's writes may
  //! still land. A prefill's transport can report a write cancelled or timed
  //! out whose bytes already left (tcp: they sit in the sockets and the
  //! decode host applies them later), so the notice that the layer ended
  //! does not end its writes. Staging blocks, and the engine's blocks handed
  //! to `request_finished(id, on_quiet)`, are given back only after it.
  std::chrono::steady_clock::duration drain_margin = std::chrono::seconds(1);  // at most 1 h
  //! Push consumer: how long a prefill may write a target after it was
  //! published (the target's `write_by`). A finished request whose prefill
  //! never reported every layer (it died, or was cut off) gets its blocks
  //! back `drain_margin` after that, instead of holding them for good. A
  //! prefill that takes the target later is refused and reports every layer
  //! failed. 0: no deadline; at most 24 h.
  std::chrono::steady_clock::duration push_lease = std::chrono::minutes(5);
  //! Push producer: how far this host's system clock may be from a decode
  //! host's. Writes for a target end this long before its `write_by` (the
  //! decode side counts it on its own clock). At most 1 h.
  std::chrono::steady_clock::duration max_clock_skew = std::chrono::milliseconds(500);
};

//! What a load delivered (`finish_load`).
struct load_report {
  std::uint32_t external_tokens = 0;         //!< tokens the load promised
  std::uint32_t valid_tokens = 0;            //!< leading tokens whose KV is in memory; recompute from here
  std::vector<std::uint32_t> failed_blocks;  //!< engine block ids whose load failed
  std::uint64_t bytes = 0;                   //!< bytes that arrived
  bool state_failed = false;                 //!< a recurrent state did not arrive (hybrid models: then `valid_tokens` is 0)
  [[nodiscard]] bool complete() const noexcept { return valid_tokens == external_tokens; }
};

//! What the saves of one request did (`wait_for_save`).
struct save_report {
  std::uint64_t bytes = 0;
  std::uint32_t layers = 0;                        //!< layers saved
  double busy_s = 0;                               //!< sum of per-layer transfer times
  std::chrono::steady_clock::time_point first_start{}, last_end{};
};

//! Counters over a connector's life.
struct connector_stats {
  std::uint64_t bytes_saved = 0;
  std::uint64_t bytes_loaded = 0;
  std::uint64_t layers_saved = 0;
  std::uint64_t objects_put = 0;      //!< pull: objects written to the pool
  std::uint64_t objects_got = 0;      //!< pull: objects read from the pool
  std::uint64_t failed_blocks = 0;    //!< source blocks whose load failed
  std::uint64_t stale_notices = 0;    //!< push notices for requests that moved on
  std::uint64_t layers_converted = 0; //!< staged layers converted into the engine's layout
  std::uint64_t staging_quarantined = 0;  //!< push: staging blocks of finished requests a prefill may still write (now)
  std::uint64_t requests_draining = 0;    //!< push: finished requests whose blocks a prefill may still write (now)
  std::uint64_t targets_expired = 0;      //!< push: finished requests given back at their target's deadline, some layer never reported
};

template <kv_layout Layout, class Engine, kv_transfer_mode Mode, load_policy Load = load::wait_full>
class kv_connector {
  static_assert(check_kv_layout<Layout>());
  static_assert(check_kv_transfer_mode<Mode>());
  static_assert(check_load_policy<Load>());

 public:
  using clock = std::chrono::steady_clock;
  using layout_type = Layout;
  using engine_type = Engine;
  using mode_type = Mode;
  using load_policy_type = Load;

  //! Checks the shards (one per TP rank, equal shapes, enough memory), the
  //! layout, the mode's configuration and the producer geometry; registers
  //! nothing yet (`start`). `errc::invalid_argument` / `not_supported` with
  //! the reason.
  static result<std::unique_ptr<kv_connector>> make(Engine& engine, connector_config cfg,
                                                    std::vector<kv_shard<Layout>> shards, Mode mode, Load load = {}) {
    auto bad = [&](errc c, std::string why) { return error{c, "kv_connector '" + cfg.name + "': " + std::move(why)}; };
    if (shards.empty()) return bad(errc::invalid_argument, "no shards");
    auto ms = [](clock::duration d) { return std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(d).count()) + " ms"; };
    if (cfg.drain_margin < clock::duration::zero()) return bad(errc::invalid_argument, "drain_margin is negative (" + ms(cfg.drain_margin) + ")");
    if (cfg.push_lease < clock::duration::zero()) return bad(errc::invalid_argument, "push_lease is negative (" + ms(cfg.push_lease) + ")");
    if (cfg.max_clock_skew < clock::duration::zero())
      return bad(errc::invalid_argument, "max_clock_skew is negative (" + ms(cfg.max_clock_skew) + ")");
    // Far longer ones overflow the clock arithmetic (now + duration::max()).
    if (cfg.drain_margin > std::chrono::hours(1)) return bad(errc::invalid_argument, "drain_margin (" + ms(cfg.drain_margin) + ") is over 1 h");
    if (cfg.max_clock_skew > std::chrono::hours(1))
      return bad(errc::invalid_argument, "max_clock_skew (" + ms(cfg.max_clock_skew) + ") is over 1 h");
    if (cfg.push_lease > std::chrono::hours(24)) return bad(errc::invalid_argument, "push_lease (" + ms(cfg.push_lease) + ") is over 24 h");
    if (cfg.push_lease > clock::duration::zero() && cfg.push_lease <= cfg.max_clock_skew)
      return bad(errc::invalid_argument, "push_lease (" + ms(cfg.push_lease) + ") leaves a prefill no time to write: it must exceed max_clock_skew (" +
                                             ms(cfg.max_clock_skew) + ")");
    if (load.max_wait() < clock::duration::zero())
      return bad(errc::invalid_argument, "the load policy's max_wait is negative (" + ms(load.max_wait()) + ")");
    const kv_shape shape = shards[0].layout.shape();
    for (std::size_t i = 0; i < shards.size(); ++i) {
      if (!(shards[i].layout.shape() == shape)) return bad(errc::invalid_argument, "shard " + std::to_string(i) + " has another shape");
      if (shards[i].memory.size() < shards[i].layout.bytes_required())
        return bad(errc::out_of_range, "shard " + std::to_string(i) + " memory is smaller than its layout");
      if (shards[i].layout.num_blocks() != shards[0].layout.num_blocks())
        return bad(errc::invalid_argument, "shards differ in num_blocks");
    }
    const bool hybrid = shape.recurrent_layers() > 0;
    if (hybrid && shape.attention_layers() == 0)
      return bad(errc::not_supported, "a model without attention layers (state only) is not transferred by the connector");
    if (hybrid && shards[0].layout.state_slots() == 0)
      return bad(errc::invalid_argument, "the model has recurrent layers but the layout has no state slots");
    KVX_TRY(detail::check_canonical_stream(shards[0].layout));
    const auto tp = static_cast<std::uint32_t>(shards.size());
    const std::uint32_t heads = shape.kv_heads * tp;
    const std::uint32_t src_tp = cfg.source_tp ? cfg.source_tp : tp;
    const std::uint32_t src_bt = cfg.source_block_tokens ? cfg.source_block_tokens : shape.block_tokens;
    if (heads % src_tp != 0)
      return bad(errc::invalid_argument, std::to_string(heads) + " KV heads do not split over source_tp = " + std::to_string(src_tp));
    kv_shape src_shape = shape;
    src_shape.kv_heads = heads / src_tp;
    src_shape.block_tokens = src_bt;
    if (hybrid) {
      // State is split over the shards like the heads (head-major).
      const std::uint64_t total_state = shape.state_bytes * tp;
      if (total_state % src_tp != 0 || shape.state_bytes % shape.kv_heads != 0)
        return bad(errc::not_supported, "recurrent state of " + std::to_string(total_state) + " bytes per layer does not split over source_tp = " +
                                            std::to_string(src_tp) + " head-major");
      src_shape.state_bytes = total_state / src_tp;
    }
    const bool produces = cfg.role != connector_role::consumer;
    const bool consumes = cfg.role != connector_role::producer;
    std::optional<cache::block_hasher> hasher;
    if constexpr (Mode::pooled) {
      if (mode.store == nullptr) return bad(errc::invalid_argument, "pull mode needs a store client");
      auto h = cache::block_hasher::make({.block_tokens = src_bt, .ns = {.model = mode.model, .tenant = mode.tenant, .adapter = {}, .salt = {}}});
      if (!h) return bad(errc::invalid_argument, "pool block size: " + h.error().message());
      hasher = std::move(*h);
      if (produces && !(src_shape == shape))
        return bad(errc::invalid_argument, "a pull producer writes the pool's format: its TP and block size must be "
                                           "source_tp and source_block_tokens");
      if (produces && !detail::contiguous(shards[0].layout.block_layer_ranges(0, first_attention(shape))))
        return bad(errc::not_supported, "pull mode puts each block's layer from one contiguous range; layout '" +
                                            std::string(shards[0].layout.name()) + "' splits it");
    } else {
      if (!mode.link) return bad(errc::invalid_argument, "push mode needs a push_link");
      if (cfg.role == connector_role::both)
        return bad(errc::invalid_argument, "in push mode an instance is a producer or a consumer, not both");
    }
    bool direct = src_shape == shape;
    if constexpr (Mode::pooled)
      direct = direct && detail::contiguous(shards[0].layout.block_layer_ranges(0, first_attention(shape)));
    std::optional<layouts::page_first> stage;
    if (consumes && !direct) {
      if (cfg.staging_blocks == 0)
        return bad(errc::invalid_argument, "the producers' shards (tp " + std::to_string(src_tp) + ", " + std::to_string(src_bt) +
                                               "-token blocks) differ from this instance's; set staging_blocks");
      // Staged state: one slot per source shard per request, at most one request per staging block.
      auto s = layouts::page_first::make(src_shape, cfg.staging_blocks, hybrid ? cfg.staging_blocks : 0U);
      if (!s) return s.error();
      stage = std::move(*s);
    }
    return std::unique_ptr<kv_connector>(new kv_connector(engine, std::move(cfg), std::move(shards), std::move(mode),
                                                          std::move(load), src_tp, src_shape, direct, std::move(stage),
                                                          std::move(hasher)));
  }

  kv_connector(const kv_connector&) = delete;
  kv_connector& operator=(const kv_connector&) = delete;

  //! Waits (up to 10 s) for transfers still touching this instance's memory,
  //! then withdraws its segments.
  ~kv_connector() {
    {
      std::unique_lock lock(st_->mu);
      st_->cv.wait_for(lock, std::chrono::seconds(10), [&] { return st_->inflight == 0; });
      if constexpr (!Mode::pooled)
        for (auto& [id, r] : st_->requests)
          if (r->published) mode_.link->withdraw(id, r->epoch);
    }
    for (const auto& name : registered_) {
      auto done = std::make_shared<std::promise<void>>();
      auto f = done->get_future();
      asio::post(engine_.get_executor(), [this, name, done] {
        engine_.async_deregister_memory(name, [done](std::error_code) { done->set_value(); });
      });
      f.wait_for(std::chrono::seconds(2));
    }
  }

  //! Registers the shards ("<name>/kv<rank>") and the staging region
  //! ("<name>/stage") with the transfer engine. Blocks up to `control_timeout`.
  result<void> start() {
    std::vector<std::pair<std::string, memory::memory_region>> regions;
    for (std::size_t r = 0; r < shards_.size(); ++r)
      regions.emplace_back(segment_name(r), memory::memory_region{shards_[r].memory.data(), shards_[r].memory.size()});
    if (stage_) regions.emplace_back(cfg_.name + "/stage", memory::memory_region{stage_mem_.data(), stage_mem_.size()});
    for (auto& [name, region] : regions) {
      auto p = std::make_shared<std::promise<std::pair<std::error_code, std::uint64_t>>>();
      auto f = p->get_future();
      asio::post(engine_.get_executor(), [this, p, name = name, region = region] {
        engine_.async_register_memory(region, name, [p](std::error_code ec, const memory::segment_descriptor& d) {
          p->set_value({ec, d.key});
        });
      });
      if (f.wait_for(cfg_.control_timeout) != std::future_status::ready)
        return error{errc::timed_out, "kv_connector '" + cfg_.name + "': registering '" + name + "' (is the engine's executor running?)"};
      auto [ec, key] = f.get();
      if (ec) return error{ec, "kv_connector '" + cfg_.name + "': registering '" + name + "'"};
      registered_.push_back(name);
      registration_keys_[name] = key;
    }
    return {};
  }

  // ---- scheduler side ---------------------------------------------------------

  //! Where a producer's engine must leave a copy of each recurrent layer's
  //! state (`kv_sequence::snapshot_at`, in `snapshot_slot`) for a prompt of
  //! `prompt_tokens` of which `external_tokens` are loaded; 0 when no copy is
  //! needed (no recurrent layers, a consumer-only connector, a prompt under two
  //! tokens, or, pull, when the pool already holds the state at that position).
  //! Push: `prompt_tokens - 1` (the consumer computes the last token itself);
  //! pull: the end of the last pool block before the last prompt token.
  [[nodiscard]] std::uint32_t state_snapshot_position(std::uint32_t prompt_tokens, std::uint32_t external_tokens) const noexcept {
    if (shape_.recurrent_layers() == 0 || cfg_.role == connector_role::consumer || prompt_tokens < 2) return 0;
    if constexpr (!Mode::pooled) {
      return prompt_tokens - 1;
    } else {
      const std::uint32_t sbt = src_shape_.block_tokens;
      const std::uint32_t at = (prompt_tokens - 1) / sbt * sbt;
      return at > external_tokens ? at : 0U;
    }
  }

  //! Prompt tokens that will be loaded rather than computed: pull, the pool's
  //! longest cached prefix (whole blocks, at most all tokens but the last);
  //! push, on a consumer, all tokens but the last (the prefill instance sends
  //! them), on a producer 0. A pool failure is an error: serve the request
  //! without the pool (treat it as 0). Hybrid models, pull: whole pool blocks
  //! only, and only as many as end where the pool holds a recurrent state.
  result<std::uint32_t> get_num_new_matched_tokens(const kv_request& req) {
    const auto n = static_cast<std::uint32_t>(req.tokens.size());
    if (n < 2) return 0U;
    if constexpr (!Mode::pooled) {
      return cfg_.role == connector_role::consumer ? n - 1 : 0U;
    } else {
      const auto keys = hasher_->keys(req.tokens);
      if (keys.empty()) return 0U;
      std::vector<std::string> names;
      names.reserve(keys.size());
      const std::uint32_t last = last_attention(shape_);
      for (const auto& k : keys) names.push_back(object_name(k, last, src_tp_ - 1));
      auto p = std::make_shared<std::promise<std::pair<std::error_code, std::size_t>>>();
      auto f = p->get_future();
      asio::post(engine_.get_executor(), prefix_lookup{this, p, std::move(names)});
      if (f.wait_for(cfg_.control_timeout) != std::future_status::ready)
        return error{errc::timed_out, "kv_connector '" + cfg_.name + "': pool lookup for request " + std::to_string(req.id)};
      auto [ec, count] = f.get();
      if (ec) return error{ec, "kv_connector '" + cfg_.name + "': pool lookup for request " + std::to_string(req.id)};
      if (shape_.recurrent_layers() == 0)
        return static_cast<std::uint32_t>(std::min<std::uint64_t>(std::uint64_t{count} * src_shape_.block_tokens, n - 1));
      // Hybrid: k blocks are usable only with the state after block k.
      const auto kmax = static_cast<std::uint32_t>(std::min<std::uint64_t>(count, (n - 1) / src_shape_.block_tokens));
      if (kmax == 0) return 0U;
      auto k = state_prefix(req.id, keys, kmax);
      if (!k) return k.error();
      return *k * src_shape_.block_tokens;
    }
  }

  //! The engine allocated `blocks` (its block table, covering the prompt) and
  //! will load `external_tokens` of them (from `get_num_new_matched_tokens`).
  //! Push consumer: publishes the request's `push_target`; push producer:
  //! takes it (the decode side allocates first).
  result<void> update_state_after_alloc(const kv_request& req, std::span<const std::uint32_t> blocks,
                                        std::uint32_t external_tokens) {
    kv_sequence seq;
    seq.block_table = blocks;
    return update_state_after_alloc(req, seq, external_tokens);
  }

  //! The same, with the request's state slots (models with recurrent layers):
  //! `seq.state_slot` is where a consumer's loaded state lands (the slot the
  //! engine resumes from); a producer's engine leaves the state to send in
  //! `seq.snapshot_slot` at `seq.snapshot_at`, which must equal
  //! `state_snapshot_position(prompt, external_tokens)` when that is not 0.
  result<void> update_state_after_alloc(const kv_request& req, const kv_sequence& seq, std::uint32_t external_tokens) {
    const std::span<const std::uint32_t> blocks = seq.block_table;
    const auto n = static_cast<std::uint32_t>(req.tokens.size());
    auto who = [&] { return "kv_connector '" + cfg_.name + "': update_state_after_alloc(request " + std::to_string(req.id) + ")"; };
    if (n == 0) return error{errc::invalid_argument, who() + ": empty prompt"};
    const std::uint32_t bt = shape_.block_tokens;
    if (blocks.size() < (std::uint64_t{n} + bt - 1) / bt)
      return error{errc::out_of_range, who() + ": " + std::to_string(blocks.size()) + " blocks cannot hold " + std::to_string(n) + " tokens"};
    for (auto b : blocks)
      if (b >= shards_[0].layout.num_blocks())
        return error{errc::out_of_range, who() + ": block " + std::to_string(b) + " is past the pool's " +
                                             std::to_string(shards_[0].layout.num_blocks())};
    if (external_tokens >= n && external_tokens > 0)
      return error{errc::invalid_argument, who() + ": " + std::to_string(external_tokens) + " external tokens leave nothing to compute of " +
                                               std::to_string(n)};
    if (external_tokens > 0 && cfg_.role == connector_role::producer)
      return error{errc::invalid_argument, who() + ": a producer-only connector loads nothing"};
    const std::uint32_t snapshot_at = state_snapshot_position(n, external_tokens);
    if (shape_.recurrent_layers() > 0) {
      const std::uint32_t slots = shards_[0].layout.state_slots();
      if (external_tokens > 0 && seq.state_slot >= slots)
        return error{errc::out_of_range, who() + ": the model has recurrent layers; the request's state slot " +
                                             (seq.state_slot == no_state_slot ? std::string("is not set") : std::to_string(seq.state_slot) +
                                                                                                               " is past the layout's " + std::to_string(slots))};
      if constexpr (!Mode::pooled) {
        if (external_tokens > 0 && external_tokens != n - 1)
          return error{errc::invalid_argument, who() + ": with recurrent layers a push consumer loads all prompt tokens but the last (" +
                                                   std::to_string(n - 1) + "), the position the producer's state is taken at, not " +
                                                   std::to_string(external_tokens)};
      } else {
        if (external_tokens % src_shape_.block_tokens != 0)
          return error{errc::invalid_argument, who() + ": with recurrent layers a pull load covers whole pool blocks (state is kept at block ends); " +
                                                   std::to_string(external_tokens) + " tokens is not a multiple of " +
                                                   std::to_string(src_shape_.block_tokens)};
      }
      if (snapshot_at > 0) {
        if (seq.snapshot_slot >= slots || seq.snapshot_slot == seq.state_slot)
          return error{errc::invalid_argument, who() + ": the model has recurrent layers; the producer needs a snapshot slot (kv_sequence::snapshot_slot, "
                                                       "not the request's own state slot) where the engine leaves the state to send"};
        if (seq.snapshot_at != snapshot_at)
          return error{errc::invalid_argument, who() + ": the state snapshot must be taken at position " + std::to_string(snapshot_at) +
                                                   " (state_snapshot_position), not " + std::to_string(seq.snapshot_at)};
      }
    }

    auto r = std::make_shared<request>();
    r->id = req.id;
    r->prompt = n;
    r->blocks.assign(blocks.begin(), blocks.end());
    r->external = external_tokens;
    r->state_slot = seq.state_slot;
    r->snapshot_slot = snapshot_at > 0 ? seq.snapshot_slot : no_state_slot;
    r->snapshot_at = snapshot_at;
    r->saved.assign(shape_.layers, 0);
    r->pending.assign(shape_.layers, 0);
    r->heard.assign(shape_.layers, 0);
    r->converted.assign(shape_.layers, 0);
    if constexpr (Mode::pooled) r->keys = hasher_->keys(req.tokens);

    std::unique_lock lock(st_->mu);
    if (st_->requests.count(req.id)) return error{errc::already_exists, who() + ": the request is already known"};
    r->epoch = ++st_->epochs;
    if (external_tokens > 0) {
      const std::uint32_t sbt = src_shape_.block_tokens;
      const std::uint32_t covered = Mode::pooled ? external_tokens : n;  // push sends every block of the prompt
      r->nsrc = (covered + sbt - 1) / sbt;
      if constexpr (Mode::pooled)
        if (r->nsrc > r->keys.size()) return error{errc::invalid_argument, who() + ": more external tokens than cached blocks"};
      r->src_failed.assign(r->nsrc, 0);
      if (!direct_) {
        reap(*st_, clock::now(), nullptr);  // staging whose drain margin has passed
        const std::size_t need = std::size_t{r->nsrc} * src_tp_;
        auto& free_blocks = st_->stage_free;
        auto& free_slots = st_->stage_state_free;
        if (free_blocks.size() < need)
          return error{errc::capacity_exceeded, who() + ": needs " + std::to_string(need) + " staging blocks, " +
                                                    std::to_string(free_blocks.size()) + " are free" +
                                                    (st_->stats.staging_quarantined > 0 ? " (" + std::to_string(st_->stats.staging_quarantined) +
                                                                                              " quarantined)"
                                                                                        : std::string())};
        const std::size_t need_state = shape_.recurrent_layers() > 0 ? src_tp_ : 0;
        if (free_slots.size() < need_state)
          return error{errc::capacity_exceeded, who() + ": needs " + std::to_string(need_state) + " staging state slots, " +
                                                    std::to_string(free_slots.size()) + " are free"};
        r->stage.assign(free_blocks.end() - static_cast<std::ptrdiff_t>(need), free_blocks.end());
        free_blocks.resize(free_blocks.size() - need);
        r->stage_state.assign(free_slots.end() - static_cast<std::ptrdiff_t>(need_state), free_slots.end());
        free_slots.resize(free_slots.size() - need_state);
      }
      for (std::uint32_t l = 0; l < shape_.layers; ++l)
        r->pending[l] = !Mode::pooled ? 1 : shape_.is_attention(l) ? r->nsrc * src_tp_ : src_tp_;
      if constexpr (!Mode::pooled) {
        if (cfg_.push_lease > clock::duration::zero()) r->write_until = clock::now() + cfg_.push_lease;
        auto t = make_target(*r);
        if (auto ok = mode_.link->publish(t); !ok) {
          release_stage(*st_, *r);
          return ok.error();
        }
        r->published = true;
      }
    } else if constexpr (!Mode::pooled) {
      if (cfg_.role == connector_role::producer) {
        auto t = mode_.link->take(req.id);
        if (!t) return t.error();
        const auto& tg = **t;
        if (tg.source_tp != tp_ || tg.source_block_tokens != bt || tg.layers != shape_.layers ||
            tg.source_blocks != (n + bt - 1) / bt ||
            tg.destinations.size() != std::uint64_t{tg.source_tp} * tg.layers * tg.source_blocks) {
          refuse_target(tg, req.id, errc::invalid_argument, "prefill '" + cfg_.name + "' has another geometry");
          return error{errc::invalid_argument, who() + ": decode '" + tg.node + "' expects tp " + std::to_string(tg.source_tp) + ", " +
                                                   std::to_string(tg.source_block_tokens) + "-token blocks, " +
                                                   std::to_string(tg.layers) + " layers, " + std::to_string(tg.source_blocks) +
                                                   " blocks; this instance has tp " + std::to_string(tp_) + ", " + std::to_string(bt) +
                                                   "-token blocks, " + std::to_string(shape_.layers) + " layers"};
        }
        // The geometry does not pin the bytes (head_dim, dtype, kv_heads and
        // layer kinds may still differ), and pair_streams copies only the
        // shorter stream: both sides would succeed over wrong KV.
        for (std::uint32_t s = 0; s < tp_; ++s)
          for (std::uint32_t l = 0; l < shape_.layers; ++l)
            for (std::uint32_t i = 0; i < tg.source_blocks; ++i) {
              const bool state = !shape_.is_attention(l);
              const std::uint64_t sends = !state ? shape_.block_layer_bytes() : i == 0 ? shape_.state_bytes : 0;
              const auto holds = detail::checked_total_bytes(tg.at(s, l, i).ranges);
              if (holds && *holds == sends) continue;
              const std::string where = "shard " + std::to_string(s) + ", layer " + std::to_string(l) + ", block " + std::to_string(i) +
                                        (state ? " (recurrent state)" : "");
              const std::string expects = holds ? std::to_string(*holds) + " bytes" : "more than 2^64 bytes";
              refuse_target(tg, req.id, errc::invalid_argument, "prefill '" + cfg_.name + "' sends " + std::to_string(sends) + " bytes for " + where +
                                            " where " + expects + " are expected");
              return error{errc::invalid_argument, who() + ": decode '" + tg.node + "' expects " + expects + " for " + where +
                                                       "; this instance sends " + std::to_string(sends) +
                                                       " (head_dim, dtype, kv_heads, state size or layer kinds differ)"};
            }
        if (tg.write_by_ms != 0) {
          // Past write_by (on the decode host's clock) the decode side may
          // give these blocks to another request.
          const auto now = clock::now();
          r->write_until = steady_at_wall_ms(tg.write_by_ms, now) - cfg_.max_clock_skew;
          if (r->write_until <= now) {
            const auto late = std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(now - r->write_until).count()) + " ms";
            refuse_target(tg, req.id, errc::timed_out, "prefill '" + cfg_.name + "' took the target " + late + " past its write_by");
            return error{errc::timed_out, who() + ": decode '" + tg.node + "' took writes until " + late + " ago (write_by " +
                                              std::to_string(tg.write_by_ms) + " ms, less max_clock_skew " +
                                              std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(cfg_.max_clock_skew).count()) +
                                              " ms): the request waited too long for this prefill"};
          }
        }
        r->target = std::move(*t);
      }
    }
    r->save_skip = external_tokens / src_shape_.block_tokens;
    st_->requests.emplace(req.id, std::move(r));
    return {};
  }

  //! The request left the engine: forgets it and frees its staging blocks.
  //! Loads still in flight (pull) are cancelled and waited for; `errc::busy`
  //! while saves still read its blocks (`wait_for_save` first). Push: staging
  //! blocks that a prefill may still write (a layer whose notice never came,
  //! or one that failed less than `drain_margin` ago) stay quarantined until
  //! those notices arrive and the margin has passed
  //! (`connector_stats::staging_quarantined`); the engine's own blocks are
  //! the engine's to hold back (the overload with `on_quiet` tells it when).
  result<void> request_finished(request_id id) { return request_finished(id, nullptr); }

  //! As above, and `on_quiet` is called once no write for the request can
  //! land in its blocks any more: before this call returns when that is
  //! already so (pull mode, a producer, a push load that ended cleanly), else
  //! from a later `request_finished` or `release_quiet` call, on its thread,
  //! with no connector lock held. Hand the request's blocks back to the
  //! engine's free list there. Not called when this returns an error.
  result<void> request_finished(request_id id, std::function<void()> on_quiet) {
    std::vector<std::function<void()>> ready;
    {
      std::unique_lock lock(st_->mu);
      auto r = find(id, "request_finished");
      if (!r) return r.error();
      if constexpr (Mode::pooled)
        if ((*r)->inflight > (*r)->saves_inflight) cancel_loads(lock, *r);  // gets still writing into its blocks
      if ((*r)->inflight > 0)
        return error{errc::busy, "kv_connector '" + cfg_.name + "': request_finished(request " + std::to_string(id) + "): " +
                                     std::to_string((*r)->inflight) + " transfers still touch its blocks"};
      if constexpr (!Mode::pooled) {
        auto& req = **r;
        // A target still on the link was never taken: nobody writes for it.
        const bool taken = req.published && !mode_.link->withdraw(id, req.epoch);
        const bool holds = !req.stage.empty() || !req.stage_state.empty() || on_quiet;
        if (taken && holds && !writes_ended(*st_, req, clock::now())) {
          auto& q = st_->draining[req.epoch];
          q.request = id;
          q.blocks = std::move(req.stage);
          q.state_slots = std::move(req.stage_state);
          for (auto h : req.heard) q.unheard.push_back(h ? 0 : 1);
          q.quiet_at = req.quiet_at;
          q.expires_at = writes_expire(*st_, req.write_until);
          q.on_quiet = std::move(on_quiet);
          on_quiet = nullptr;
          st_->stats.staging_quarantined += q.blocks.size();
          ++st_->stats.requests_draining;
          req.stage.clear();
          req.stage_state.clear();
        }
      }
      release_stage(*st_, **r);
      st_->requests.erase(id);
      reap(*st_, clock::now(), &ready);
    }
    if (on_quiet) ready.push_back(std::move(on_quiet));
    for (auto& f : ready) f();
    return {};
  }

  //! Gives back what finished push requests held once no write for them can
  //! land any more: frees their staging blocks and runs the `on_quiet`
  //! callbacks `request_finished` was given (on this thread). Returns how
  //! many requests it let go. Call it when the engine is short of blocks;
  //! `request_finished` does the same.
  std::size_t release_quiet() {
    std::vector<std::function<void()>> ready;
    std::size_t released = 0;
    {
      std::lock_guard lock(st_->mu);
      released = reap(*st_, clock::now(), &ready);
    }
    for (auto& f : ready) f();
    return released;
  }

  //! Push consumer: a producer's notice that reached this instance some way
  //! other than the target's `notify` (a control channel of the caller's
  //! own). Does what `notify` does, for any request of this connector: in
  //! flight, finished (its blocks may be waiting for it) or unknown (counted
  //! stale), so a caller can hand every notice here without tracking which
  //! requests are still alive.
  void hear_notice(const push_notice& n)
    requires(!Mode::pooled)
  {
    deliver(*st_, n);
  }

  // ---- worker side --------------------------------------------------------------

  //! Starts loading the request's external tokens (pull: gets from the pool,
  //! layer by layer; push: arms the wait for the prefill's notices). Returns at once.
  result<void> start_load_kv(request_id id) {
    std::unique_lock lock(st_->mu);
    auto found = find(id, "start_load_kv");
    if (!found) return found.error();
    auto r = *found;
    if (r->load_started)
      return error{errc::invalid_argument, "kv_connector '" + cfg_.name + "': start_load_kv called twice for request " + std::to_string(id)};
    r->load_started = true;
    // wait_full{duration::max()} means no deadline: saturate, not overflow.
    const auto now = clock::now();
    const auto wait = std::max(load_.max_wait(), clock::duration::zero());
    r->deadline = wait > clock::time_point::max() - now ? clock::time_point::max() : now + wait;
    if (r->external == 0) return {};
    if constexpr (Mode::pooled) {
      std::vector<get_op> ops;
      for (std::uint32_t l = 0; l < shape_.layers; ++l) {
        if (!shape_.is_attention(l)) {
          // The state after the last loaded block, one object per source shard.
          for (std::uint32_t s = 0; s < src_tp_; ++s) {
            std::byte* dst = direct_ ? shards_[s].memory.data() + shards_[s].layout.state_offset(r->state_slot, l)
                                     : stage_mem_.data() + stage_->state_offset(r->stage_state[s], l);
            ops.push_back({l, no_block, object_name(r->keys[r->nsrc - 1], l, s), std::span<std::byte>(dst, src_shape_.state_bytes),
                           std::make_shared<asio::cancellation_signal>()});
          }
          continue;
        }
        for (std::uint32_t i = 0; i < r->nsrc; ++i)
          for (std::uint32_t s = 0; s < src_tp_; ++s) {
            std::byte* dst = direct_ ? shards_[s].memory.data() + shards_[s].layout.block_layer_ranges(r->blocks[i], l)[0].offset
                                     : stage_mem_.data() + stage_->block_layer_ranges(r->stage[s * r->nsrc + i], l)[0].offset;
            ops.push_back({l, i, object_name(r->keys[i], l, s), std::span<std::byte>(dst, src_shape_.block_layer_bytes()),
                           std::make_shared<asio::cancellation_signal>()});
          }
      }
      r->inflight += static_cast<std::uint32_t>(ops.size());
      st_->inflight += ops.size();
      for (auto& o : ops) r->cancels.push_back(o.cancel);
      lock.unlock();
      asio::post(engine_.get_executor(), get_call{this, r, std::move(ops)});
    }
    return {};
  }

  //! Blocks until layer `layer` of the request's external tokens is in the
  //! engine's blocks (converted, when staged), a failure the load policy turns
  //! into an error, or the policy's deadline. `errc::timed_out` (or the
  //! transfer's error) under a `fail` policy; under `recompute` a missing
  //! block is recorded for `finish_load` and the wait succeeds (push: a layer
  //! still in flight at the deadline is an error even then, because a late
  //! remote writer cannot be fenced off from blocks the engine recomputes;
  //! the request is abandoned, and every later wait and `finish_load` of it
  //! fail the same way).
  result<void> wait_for_layer_load(request_id id, std::uint32_t layer) {
    std::unique_lock lock(st_->mu);
    auto found = find(id, "wait_for_layer_load");
    if (!found) return found.error();
    auto r = *found;
    auto who = [&] { return "kv_connector '" + cfg_.name + "': request " + std::to_string(id) + " layer " + std::to_string(layer); };
    if (!r->load_started)
      return error{errc::invalid_argument, "kv_connector '" + cfg_.name + "': wait_for_layer_load without start_load_kv for request " +
                                               std::to_string(id)};
    if (layer >= shape_.layers) return error{errc::out_of_range, who() + ": the model has " + std::to_string(shape_.layers) + " layers"};
    if (r->external == 0) return {};
    const bool fails = load_.on_missing() == missing_action::fail;
    const bool arrived = st_->cv.wait_until(lock, r->deadline, [&] { return r->pending[layer] == 0 || (fails && r->load_code); });
    if (!arrived) {
      if constexpr (Mode::pooled) {
        cancel_loads(lock, r);  // their failures are recorded as `cancelled`
      } else {
        for (std::uint32_t l = 0; l < shape_.layers; ++l)
          if (r->pending[l] != 0) {
            if (shape_.is_attention(l))
              for (std::uint32_t i = 0; i < r->nsrc; ++i) mark_failed(*st_, *r, l, i, errc::timed_out, "");
            else
              mark_failed(*st_, *r, l, no_block, errc::timed_out, "");
            r->pending[l] = 0;
          }
        r->load_code = make_error_code(errc::timed_out);
        r->load_context = "the prefill instance did not deliver layer " + std::to_string(layer) + " in time";
        r->abandoned = true;
        return error{errc::timed_out, who() + ": " + r->load_context};
      }
      if (!r->load_code) {
        r->load_code = make_error_code(errc::timed_out);
        r->load_context = "layer " + std::to_string(layer) + " did not arrive in time";
      }
    }
    // Abandoned (push, late): whatever the policy, no layer of it is usable.
    if ((fails || r->abandoned) && r->load_code) return error{r->load_code, who() + ": " + r->load_context};
    if (!direct_ && !r->converted[layer]) {
      r->converted[layer] = 1;
      lock.unlock();
      KVX_TRY(convert_layer(*r, layer));
      std::lock_guard g(st_->mu);
      ++st_->stats.layers_converted;
    }
    return {};
  }

  //! Waits for every layer (as `wait_for_layer_load` does) and reports what
  //! the load delivered: `valid_tokens` (recompute from there) and the engine
  //! blocks whose load failed. Under a `fail` policy a failure is an error.
  result<load_report> finish_load(request_id id) {
    for (std::uint32_t l = 0; l < shape_.layers; ++l) KVX_TRY(wait_for_layer_load(id, l));
    std::unique_lock lock(st_->mu);
    auto found = find(id, "finish_load");
    if (!found) return found.error();
    auto& r = **found;
    load_report rep;
    rep.external_tokens = r.external;
    rep.valid_tokens = r.external;
    rep.bytes = r.load_bytes;
    rep.state_failed = r.state_failed;
    const std::uint32_t sbt = src_shape_.block_tokens, bt = shape_.block_tokens;
    for (std::uint32_t i = 0; i < r.nsrc; ++i) {
      if (!r.src_failed[i]) continue;
      const std::uint32_t begin = i * sbt;
      if (begin >= r.external) continue;
      rep.valid_tokens = std::min(rep.valid_tokens, begin);
      const std::uint32_t end = std::min((i + 1) * sbt, r.external);
      for (std::uint32_t b = begin / bt; b < (end + bt - 1) / bt; ++b)
        if (rep.failed_blocks.empty() || rep.failed_blocks.back() != r.blocks[b]) rep.failed_blocks.push_back(r.blocks[b]);
    }
    // Hybrid models: the only state there is was taken at `external`; resuming
    // anywhere before it needs the state there, which nobody has: start over.
    if (shape_.recurrent_layers() > 0 && (r.state_failed || rep.valid_tokens < r.external)) rep.valid_tokens = 0;
    r.load_resolved = true;
    r.valid = rep.valid_tokens;
    // Converted: the staging is not read again, but a failed layer's writes
    // may still land in it (then request_finished quarantines it).
    if (writes_ended(*st_, r, clock::now())) release_stage(*st_, r);
    if (!rep.complete()) {
      // The engine re-runs the step from `valid_tokens`: every layer may be
      // saved again, from the first block that is not valid.
      auto keep = *found;
      st_->cv.wait_for(lock, cfg_.save_timeout, [&] { return keep->saves_inflight == 0; });
      r.save_skip = std::min(r.save_skip, rep.valid_tokens / sbt);
      std::fill(r.saved.begin(), r.saved.end(), std::uint8_t{0});
    }
    return rep;
  }

  //! Starts saving layer `layer` of the request (its new full blocks, pull;
  //! every block into the decode side's target, push) and returns at once:
  //! the transfer runs while the engine computes the next layer.
  result<void> save_kv_layer(request_id id, std::uint32_t layer) {
    std::unique_lock lock(st_->mu);
    auto found = find(id, "save_kv_layer");
    if (!found) return found.error();
    auto r = *found;
    auto who = [&] { return "kv_connector '" + cfg_.name + "': save_kv_layer(request " + std::to_string(id) + ", layer " + std::to_string(layer) + ")"; };
    if (cfg_.role == connector_role::consumer) return error{errc::not_supported, who() + ": this connector is a consumer; it saves nothing"};
    if (layer >= shape_.layers) return error{errc::out_of_range, who() + ": the model has " + std::to_string(shape_.layers) + " layers"};
    if (r->saved[layer] == 1 || r->saved[layer] == 2) return error{errc::already_exists, who() + ": the layer was already saved"};
    const bool state = !shape_.is_attention(layer);
    if (state && r->snapshot_at == 0) {  // no state to send (attention-only model, or the pool holds it)
      r->saved[layer] = 2;
      return {};
    }
    if (r->load_started && !r->load_resolved && r->external > 0 && r->first_failed_layer <= layer) {
      r->saved[layer] = 3;  // computed over a failed load: the step is re-run, nothing wrong reaches the pool
      return {};
    }
    r->saved[layer] = 1;
    if (r->save.layers == 0 && r->save.bytes == 0) r->save.first_start = clock::now();
    if constexpr (!Mode::pooled) {
      if (!r->target) {
        r->saved[layer] = 0;
        return error{errc::invalid_argument, who() + ": no push target (update_state_after_alloc took none)"};
      }
      const auto& t = *r->target;
      transfer::batch b;
      b.deadline = cfg_.save_timeout;
      std::vector<std::uint32_t> op_block;
      for (std::uint32_t s = 0; s < tp_ && state; ++s) {
        // The snapshot, into the destination of (shard, layer, block 0).
        // (update_state_after_alloc checked that the destination holds exactly these bytes.)
        const auto& d = t.at(s, layer, 0);
        const auto src = shards_[s].layout.state_layer_ranges(r->snapshot_slot, layer);
        detail::pair_streams(src, d.ranges, [&](std::uint64_t so, std::uint64_t dof, std::uint64_t n) {
          b.write(std::span<const std::byte>(shards_[s].memory.data() + so, n), t.segments[d.segment], dof);
          b.ops.back().remote.key = target_key(t, d.segment);
          op_block.push_back(0);
        });
      }
      for (std::uint32_t s = 0; s < tp_ && !state; ++s)
        for (std::uint32_t i = 0; i < t.source_blocks; ++i) {
          const auto& d = t.at(s, layer, i);
          detail::pair_streams(shards_[s].layout.block_layer_ranges(r->blocks[i], layer), d.ranges,
                               [&](std::uint64_t so, std::uint64_t dof, std::uint64_t n) {
                                 b.write(std::span<const std::byte>(shards_[s].memory.data() + so, n), t.segments[d.segment], dof);
                                 b.ops.back().remote.key = target_key(t, d.segment);
                                 op_block.push_back(i);
                               });
        }
      begin_save(*r);
      lock.unlock();
      const auto started = clock::now();
      asio::post(engine_.get_executor(), [this, r, b = std::move(b), op_block = std::move(op_block), layer, started]() mutable {
        // The writes end by the target's write_by (less max_clock_skew):
        // past it the decode side may give these blocks to another request.
        const auto asked = b.deadline;
        if (!transfer::end_before(b, r->write_until, clock::duration::zero(), std::nullopt)) {
          end_push_save(*st_, r, {}, layer, started, make_error_code(errc::timed_out), {},
                        "the target's write_by passed before the layer's writes started");
          return;
        }
        const bool bounded = b.deadline != asked;
        engine_.async_transfer(std::move(b), [st = st_, r, op_block = std::move(op_block), layer, started, bounded](
                                                 std::error_code ec, transfer::batch_result res) {
          std::string context = ec ? res.first_error().message() : std::string();
          if (ec == errc::timed_out && bounded) context += " (at the target's write_by, less max_clock_skew)";
          end_push_save(*st, r, op_block, layer, started, ec, res, std::move(context));
        });
      });
    } else {
      std::vector<put_op> ops;
      for (std::uint32_t s = 0; s < tp_ && state; ++s)  // the state after block snapshot_at / block_tokens, keyed by that block
        ops.push_back({object_name(r->keys[r->snapshot_at / src_shape_.block_tokens - 1], layer, s),
                       std::span<const std::byte>(shards_[s].memory.data() + shards_[s].layout.state_offset(r->snapshot_slot, layer),
                                                  shape_.state_bytes)});
      for (std::uint32_t i = r->save_skip; i < r->keys.size() && !state; ++i)
        for (std::uint32_t s = 0; s < tp_; ++s) {
          const auto rg = shards_[s].layout.block_layer_ranges(r->blocks[i], layer);
          ops.push_back({object_name(r->keys[i], layer, s),
                         std::span<const std::byte>(shards_[s].memory.data() + rg[0].offset, shape_.block_layer_bytes())});
        }
      if (ops.empty()) {
        r->saved[layer] = 2;
        ++r->save.layers;
        return {};
      }
      begin_save(*r);
      auto left = std::make_shared<std::size_t>(ops.size());
      auto first = std::make_shared<std::pair<std::error_code, std::string>>();
      auto bytes = std::make_shared<std::uint64_t>(0);
      lock.unlock();
      const auto started = clock::now();
      asio::post(engine_.get_executor(), put_call{this, r, std::move(ops), layer, left, first, bytes, started});
    }
    return {};
  }

  //! Blocks until every save of the request finished (up to `save_timeout`);
  //! the first failure is the error.
  result<save_report> wait_for_save(request_id id) {
    std::unique_lock lock(st_->mu);
    auto found = find(id, "wait_for_save");
    if (!found) return found.error();
    auto r = *found;
    auto who = [&] { return "kv_connector '" + cfg_.name + "': wait_for_save(request " + std::to_string(id) + ")"; };
    if (std::none_of(r->saved.begin(), r->saved.end(), [](std::uint8_t s) { return s != 0; }))
      return error{errc::invalid_argument, who() + ": no save_kv_layer was called"};
    if (!st_->cv.wait_for(lock, cfg_.save_timeout, [&] { return r->saves_inflight == 0; }))
      return error{errc::timed_out, who() + ": " + std::to_string(r->saves_inflight) + " layer saves still in flight"};
    if (r->save_code) return error{r->save_code, who() + ": " + r->save_context};
    return r->save;
  }

  //! The first load failure recorded for the request (empty if none): what
  //! an engine reports when `before_layer` aborted its step.
  [[nodiscard]] kvx::error load_error(request_id id) const {
    std::lock_guard lock(st_->mu);
    auto it = st_->requests.find(id);
    if (it == st_->requests.end() || !it->second->load_code) return {};
    return {it->second->load_code, "kv_connector '" + cfg_.name + "': request " + std::to_string(id) + ": " + it->second->load_context};
  }

  //! `layer_hooks` for the tiny engine (or any engine with per-layer hooks):
  //! `before_layer` waits for the layer's load, `after_layer` saves it
  //! (producers). A save that cannot start is reported by `wait_for_save`.
  layer_hooks hooks(request_id id) {
    layer_hooks h;
    bool loads = true;
    {
      std::lock_guard lock(st_->mu);
      if (auto it = st_->requests.find(id); it != st_->requests.end()) loads = it->second->external > 0;
    }
    if (loads) h.before_layer = [this, id](std::uint32_t l) { return wait_for_layer_load(id, l).code(); };
    if (cfg_.role != connector_role::consumer)
      h.after_layer = [this, id](std::uint32_t l) {
        if (auto ok = save_kv_layer(id, l); !ok) record_save_error(id, ok.error());
      };
    return h;
  }

  [[nodiscard]] connector_stats stats() const {
    std::lock_guard lock(st_->mu);
    return st_->stats;
  }
  [[nodiscard]] const connector_config& config() const noexcept { return cfg_; }
  [[nodiscard]] const kv_shape& shape() const noexcept { return shape_; }
  [[nodiscard]] const kv_shape& source_shape() const noexcept { return src_shape_; }
  //! True when loads land in the engine's blocks directly (no staging, no conversion).
  [[nodiscard]] bool loads_in_place() const noexcept { return direct_; }
  [[nodiscard]] std::size_t known_requests() const {
    std::lock_guard lock(st_->mu);
    return st_->requests.size();
  }
  [[nodiscard]] std::string segment_name(std::size_t rank) const { return cfg_.name + "/kv" + std::to_string(rank); }

 private:
  struct request {
    request_id id = 0;
    std::uint64_t epoch = 0;
    std::uint32_t prompt = 0;
    std::vector<std::uint32_t> blocks;
    std::uint32_t external = 0;
    std::vector<cache::block_key> keys;
    // load
    bool load_started = false, load_resolved = false, published = false;
    std::uint32_t nsrc = 0;
    std::vector<std::uint32_t> stage;  // [shard * nsrc + block]
    std::vector<std::uint32_t> stage_state;  // [shard]: staging state slots
    std::uint32_t state_slot = no_state_slot;     // consumer: where the loaded state lands
    std::uint32_t snapshot_slot = no_state_slot;  // producer: where the engine leaves the state to send
    std::uint32_t snapshot_at = 0;                // ... taken at this position (0: none to send)
    bool state_failed = false;
    std::vector<std::uint32_t> pending;
    std::vector<std::uint8_t> heard;  // push: the layer's notice came, even after a timeout
    clock::time_point quiet_at{};     // push: a failed layer's writes may land until then (drain_margin after its notice)
    clock::time_point write_until = clock::time_point::max();  // push: the target's write_by on this host's clock (producer: less max_clock_skew)
    bool abandoned = false;           // a layer was late (push) or a get did not stop (pull); every later wait fails
    std::vector<std::uint8_t> converted;
    std::vector<std::uint8_t> src_failed;
    std::uint32_t first_failed_layer = UINT32_MAX;
    std::error_code load_code;
    std::string load_context;
    clock::time_point deadline{};
    std::uint64_t load_bytes = 0;
    std::uint32_t valid = 0;
    std::vector<std::shared_ptr<asio::cancellation_signal>> cancels;
    std::uint32_t inflight = 0;
    // save
    std::shared_ptr<const push_target> target;
    std::vector<std::uint8_t> saved;  // 0 not yet, 1 in flight, 2 done, 3 skipped (computed over a failed load)
    std::uint32_t saves_inflight = 0;
    std::uint32_t save_skip = 0;      // leading full blocks already in the pool
    std::error_code save_code;
    std::string save_context;
    save_report save;
  };
  // A finished push request whose prefill may still write its blocks: its
  // staging, and the engine's callback that hands back the engine's blocks.
  struct draining_request {
    request_id request = 0;
    std::vector<std::uint32_t> blocks;
    std::vector<std::uint32_t> state_slots;
    std::vector<std::uint8_t> unheard;  // per layer: 1 until its notice comes
    clock::time_point quiet_at{};
    clock::time_point expires_at = clock::time_point::max();  // the target's write_by + drain_margin: quiet then, reported or not
    std::function<void()> on_quiet;
  };
  struct shared_state {
    std::mutex mu;
    std::condition_variable cv;
    std::map<request_id, std::shared_ptr<request>> requests;
    std::vector<std::uint32_t> stage_free;        // LIFO: a freed block is the next one handed out
    std::vector<std::uint32_t> stage_state_free;
    std::map<std::uint64_t, draining_request> draining;  // by the request's epoch
    clock::duration drain_margin{};
    std::vector<std::uint8_t> recurrent;  // [layer]: 1 for a recurrent (state) layer
    std::uint64_t epochs = 0;
    std::size_t inflight = 0;
    connector_stats stats;
  };
  struct get_op {
    std::uint32_t layer;
    std::uint32_t block;
    std::string name;
    std::span<std::byte> dst;
    std::shared_ptr<asio::cancellation_signal> cancel;
  };
  // Named function objects rather than lambdas: GCC 12 miscompiles the
  // store client's init-captures when it is instantiated from a nested lambda.
  struct prefix_done {
    std::shared_ptr<std::promise<std::pair<std::error_code, std::size_t>>> p;
    void operator()(std::error_code ec, std::size_t count) const { p->set_value({ec, count}); }
  };
  struct prefix_lookup {
    kv_connector* self;
    std::shared_ptr<std::promise<std::pair<std::error_code, std::size_t>>> p;
    std::vector<std::string> names;
    void operator()() { self->mode_.store->async_longest_prefix(self->mode_.tenant, std::move(names), prefix_done{p}); }
  };
  struct put_op {
    std::string name;
    std::span<const std::byte> src;
  };
  struct get_done {
    std::shared_ptr<shared_state> st;
    std::shared_ptr<request> r;
    get_op o;
    void operator()(std::error_code ec, std::uint64_t size) const {
      std::lock_guard g(st->mu);
      if (!ec && size != o.dst.size()) ec = make_error_code(errc::truncated_message);
      if (ec) {
        mark_failed(*st, *r, o.layer, o.block, ec, "get '" + o.name + "'");
      } else {
        r->load_bytes += size;
        st->stats.bytes_loaded += size;
        ++st->stats.objects_got;
      }
      if (r->pending[o.layer] > 0) --r->pending[o.layer];  // zeroed when its wait gave up (cancel_loads)
      --r->inflight;
      --st->inflight;
      st->cv.notify_all();
    }
  };
  struct get_call {
    kv_connector* self;
    std::shared_ptr<request> r;
    std::vector<get_op> ops;
    void operator()() const {
      for (const auto& o : ops)
        self->mode_.store->async_get(store::object_key{self->mode_.tenant, o.name}, o.dst,
                                     asio::bind_cancellation_slot(o.cancel->slot(), get_done{self->st_, r, o}));
    }
  };
  struct put_done {
    std::shared_ptr<shared_state> st;
    std::shared_ptr<request> r;
    put_op o;
    std::uint32_t layer;
    std::shared_ptr<std::size_t> left;
    std::shared_ptr<std::pair<std::error_code, std::string>> first;
    std::shared_ptr<std::uint64_t> bytes;
    clock::time_point started;
    void operator()(std::error_code ec) const {
      // Another producer stored the same prefix first: the bytes are the same.
      if (ec == errc::already_exists) ec = {};
      std::lock_guard g(st->mu);
      if (ec && !first->first) *first = {ec, "put '" + o.name + "'"};
      if (!ec) {
        *bytes += o.src.size();
        ++st->stats.objects_put;
      }
      if (--*left == 0) {
        end_save(*st, *r, layer, first->first, first->second, *bytes, started);
        st->cv.notify_all();
      }
    }
  };
  struct put_call {
    kv_connector* self;
    std::shared_ptr<request> r;
    std::vector<put_op> ops;
    std::uint32_t layer;
    std::shared_ptr<std::size_t> left;
    std::shared_ptr<std::pair<std::error_code, std::string>> first;
    std::shared_ptr<std::uint64_t> bytes;
    clock::time_point started;
    void operator()() const {
      for (const auto& o : ops)
        self->mode_.store->async_put(store::object_key{self->mode_.tenant, o.name}, o.src,
                                     put_done{self->st_, r, o, layer, left, first, bytes, started});
    }
  };

  kv_connector(Engine& engine, connector_config cfg, std::vector<kv_shard<Layout>> shards, Mode mode, Load load,
               std::uint32_t src_tp, kv_shape src_shape, bool direct, std::optional<layouts::page_first> stage,
               std::optional<cache::block_hasher> hasher)
      : engine_(engine), cfg_(std::move(cfg)), shards_(std::move(shards)), mode_(std::move(mode)), load_(std::move(load)),
        shape_(shards_[0].layout.shape()), tp_(static_cast<std::uint32_t>(shards_.size())), src_tp_(src_tp),
        src_shape_(std::move(src_shape)), direct_(direct), stage_(std::move(stage)), hasher_(std::move(hasher)),
        st_(std::make_shared<shared_state>()) {
    st_->drain_margin = cfg_.drain_margin;
    for (std::uint32_t l = 0; l < shape_.layers; ++l) st_->recurrent.push_back(shape_.is_attention(l) ? 0 : 1);
    if (stage_) {
      stage_mem_.assign(stage_->bytes_required(), std::byte{0});
      for (std::uint32_t b = stage_->num_blocks(); b-- > 0;) st_->stage_free.push_back(b);
      for (std::uint32_t b = stage_->state_slots(); b-- > 0;) st_->stage_state_free.push_back(b);
    }
  }

  static constexpr std::uint32_t no_block = UINT32_MAX;  // a failure of a layer's state, not of a block

  // A target this producer cannot serve: a failing notice for every layer,
  // so the decode side gives up now rather than wait out its deadline for
  // layers nobody will send.
  static void refuse_target(const push_target& t, request_id id, errc code, const std::string& why) {
    if (!t.notify) return;
    for (std::uint32_t l = 0; l < t.layers; ++l) t.notify({id, t.epoch, l, make_error_code(code), why, {}, 0});
  }

  static std::uint32_t first_attention(const kv_shape& s) {
    std::uint32_t l = 0;
    while (l + 1 < s.layers && !s.is_attention(l)) ++l;
    return l;
  }
  static std::uint32_t last_attention(const kv_shape& s) {
    std::uint32_t l = s.layers - 1;
    while (l > 0 && !s.is_attention(l)) --l;
    return l;
  }
  static std::uint32_t last_recurrent(const kv_shape& s) {
    std::uint32_t l = s.layers - 1;
    while (l > 0 && s.is_attention(l)) --l;
    return l;
  }

  struct exists_batch {
    std::vector<std::uint8_t> present;
    std::size_t left = 0;
    std::error_code first;
    std::promise<void> done;
  };
  struct exists_done {
    std::shared_ptr<exists_batch> b;
    std::size_t i;
    void operator()(std::error_code ec, bool present) const {  // runs on the (single-threaded) executor
      if (ec && !b->first) b->first = ec;
      b->present[i] = present && !ec ? 1 : 0;
      if (--b->left == 0) b->done.set_value();
    }
  };
  struct exists_call {
    kv_connector* self;
    std::shared_ptr<exists_batch> b;
    std::vector<std::string> names;
    void operator()() const {
      for (std::size_t i = 0; i < names.size(); ++i)
        self->mode_.store->async_exists(store::object_key{self->mode_.tenant, names[i]}, exists_done{b, i});
    }
  };
  // Pull, hybrid: the most leading pool blocks k <= kmax whose state (after
  // block k) is in the pool, all candidates asked at once (one round trip).
  result<std::uint32_t> state_prefix(request_id id, const std::vector<cache::block_key>& keys, std::uint32_t kmax) {
    auto b = std::make_shared<exists_batch>();
    b->present.assign(kmax, 0);
    b->left = kmax;
    std::vector<std::string> names;
    const std::uint32_t layer = last_recurrent(shape_);
    for (std::uint32_t k = 1; k <= kmax; ++k) names.push_back(object_name(keys[k - 1], layer, src_tp_ - 1));
    auto f = b->done.get_future();
    asio::post(engine_.get_executor(), exists_call{this, b, std::move(names)});
    if (f.wait_for(cfg_.control_timeout) != std::future_status::ready)
      return error{errc::timed_out, "kv_connector '" + cfg_.name + "': pool state lookup for request " + std::to_string(id)};
    if (b->first) return error{b->first, "kv_connector '" + cfg_.name + "': pool state lookup for request " + std::to_string(id)};
    for (std::uint32_t k = kmax; k > 0; --k)
      if (b->present[k - 1]) return k;
    return 0U;
  }
  std::string object_name(const cache::block_key& k, std::uint32_t layer, std::uint32_t shard) const {
    return k.to_string() + "/l" + std::to_string(layer) + "/h" + std::to_string(shard * src_shape_.kv_heads);
  }

  // Callers hold st_->mu.
  result<std::shared_ptr<request>> find(request_id id, const char* call) const {
    auto it = st_->requests.find(id);
    if (it == st_->requests.end())
      return error{errc::not_found, "kv_connector '" + cfg_.name + "': " + call + ": request " + std::to_string(id) +
                                        " is unknown (update_state_after_alloc first, and not after request_finished)"};
    return it->second;
  }
  static void release_stage(shared_state& st, request& r) {
    st.stage_free.insert(st.stage_free.end(), r.stage.begin(), r.stage.end());
    r.stage.clear();
    st.stage_state_free.insert(st.stage_state_free.end(), r.stage_state.begin(), r.stage_state.end());
    r.stage_state.clear();
  }
  // Push: whether no write for the request can land any more (every layer
  // reported and the last failure more than drain_margin ago, or its
  // target's write_by more than drain_margin ago).
  static bool writes_ended(const shared_state& st, const request& r, clock::time_point now) {
    if constexpr (Mode::pooled) {
      return true;
    } else {
      return now >= writes_expire(st, r.write_until) ||
             (now >= r.quiet_at && std::none_of(r.heard.begin(), r.heard.end(), [](std::uint8_t h) { return h == 0; }));
    }
  }
  // A failure notice: writes of that layer already sent may land for drain_margin yet.
  static void note_failure(shared_state& st, clock::time_point& quiet_at, const push_notice& n) {
    if (n.code) quiet_at = std::max(quiet_at, clock::now() + st.drain_margin);
  }
  // A notice for a finished request.
  static void hear_draining(shared_state& st, const push_notice& n) {
    auto it = st.draining.find(n.epoch);
    if (it == st.draining.end() || it->second.request != n.request || n.layer >= it->second.unheard.size()) return;
    it->second.unheard[n.layer] = 0;
    note_failure(st, it->second.quiet_at, n);
    reap(st, clock::now(), nullptr);
  }
  // Lets go of finished requests no write can reach any more: frees their
  // staging, and moves their on_quiet callbacks into `ready` (the caller runs
  // them unlocked; without `ready` a request with a callback stays, its
  // staging freed). Returns how many requests it let go.
  static std::size_t reap(shared_state& st, clock::time_point now, std::vector<std::function<void()>>* ready) {
    std::size_t released = 0;
    for (auto it = st.draining.begin(); it != st.draining.end();) {
      auto& q = it->second;
      const bool unheard = std::any_of(q.unheard.begin(), q.unheard.end(), [](std::uint8_t u) { return u != 0; });
      const bool expired = now >= q.expires_at;
      if (!expired && (now < q.quiet_at || unheard)) {
        ++it;
        continue;
      }
      if (unheard) {
        ++st.stats.targets_expired;
        std::fill(q.unheard.begin(), q.unheard.end(), std::uint8_t{0});  // counted once, even if its callback waits for a `ready`
      }
      st.stage_free.insert(st.stage_free.end(), q.blocks.begin(), q.blocks.end());
      st.stage_state_free.insert(st.stage_state_free.end(), q.state_slots.begin(), q.state_slots.end());
      st.stats.staging_quarantined -= q.blocks.size();
      q.blocks.clear();
      q.state_slots.clear();
      if (q.on_quiet) {
        if (!ready) {
          ++it;
          continue;
        }
        ready->push_back(std::move(q.on_quiet));
      }
      --st.stats.requests_draining;
      ++released;
      it = st.draining.erase(it);
    }
    return released;
  }
  // `block` is a source block index, or `no_block` for the layer's state.
  static void mark_failed(shared_state& st, request& r, std::uint32_t layer, std::uint32_t block, std::error_code ec,
                          const std::string& context) {
    if (block == no_block) r.state_failed = true;
    if (block < r.src_failed.size() && !r.src_failed[block]) {
      r.src_failed[block] = 1;
      ++st.stats.failed_blocks;
    }
    r.first_failed_layer = std::min(r.first_failed_layer, layer);
    if (!r.load_code) {
      r.load_code = ec;
      r.load_context = "layer " + std::to_string(layer) + (block == no_block ? std::string(" state") : " block " + std::to_string(block)) +
                       (context.empty() ? "" : ": " + context);
    }
  }
  void begin_save(request& r) {
    ++r.saves_inflight;
    ++r.inflight;
    ++st_->inflight;
  }
  static void end_save(shared_state& st, request& r, std::uint32_t layer, std::error_code ec, const std::string& context,
                       std::uint64_t bytes, clock::time_point started) {
    const auto now = clock::now();
    r.saved[layer] = 2;
    ++r.save.layers;
    r.save.bytes += bytes;
    r.save.busy_s += std::chrono::duration<double>(now - started).count();
    r.save.last_end = now;
    if (ec && !r.save_code) {
      r.save_code = ec;
      r.save_context = "layer " + std::to_string(layer) + ": " + context;
    }
    st.stats.bytes_saved += bytes;
    ++st.stats.layers_saved;
    --r.saves_inflight;
    --r.inflight;
    --st.inflight;
  }
  void record_save_error(request_id id, const kvx::error& e) {
    std::lock_guard lock(st_->mu);
    if (auto it = st_->requests.find(id); it != st_->requests.end() && !it->second->save_code) {
      it->second->save_code = e.code();
      it->second->save_context = e.context();
    }
  }

  // Cancels the request's gets still in flight and waits for them to complete.
  void cancel_loads(std::unique_lock<std::mutex>& lock, const std::shared_ptr<request>& r) {
    auto sigs = r->cancels;
    lock.unlock();
    asio::post(engine_.get_executor(), [sigs] {
      for (const auto& s : sigs) s->emit(asio::cancellation_type::terminal);
    });
    lock.lock();
    const bool stopped = st_->cv.wait_for(lock, cfg_.control_timeout, [&] { return r->inflight == r->saves_inflight; });
    if (!stopped) {
      // A get that did not stop may still write into the request's blocks:
      // none of them is usable now (request_finished stays busy until the
      // last one ends, so its staging is not reused under it either).
      r->abandoned = true;
      if (!r->load_code) {
        r->load_code = make_error_code(errc::timed_out);
        r->load_context = std::to_string(r->inflight - r->saves_inflight) + " get(s) did not stop within " +
                          std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(cfg_.control_timeout).count()) +
                          " ms of being cancelled";
      }
    }
    for (auto& p : r->pending) p = 0;
  }

  // A push notice, for a request in flight, finished (draining) or unknown (stale).
  static void deliver(shared_state& st, const push_notice& n) {
    std::lock_guard lock(st.mu);
    auto it = st.requests.find(n.request);
    const bool current = it != st.requests.end() && it->second->epoch == n.epoch && n.layer < it->second->pending.size();
    if (current) {
      it->second->heard[n.layer] = 1;
      note_failure(st, it->second->quiet_at, n);
    }
    if (!current || it->second->pending[n.layer] == 0) {
      if (it == st.requests.end() || it->second->epoch != n.epoch) hear_draining(st, n);
      ++st.stats.stale_notices;
      return;
    }
    auto& r = *it->second;
    if (n.code && st.recurrent[n.layer]) {
      mark_failed(st, r, n.layer, no_block, n.code, n.context);
    } else if (n.code) {
      // A block the request does not have (a corrupt notice, or no_block on
      // a KV layer) marks nothing by itself, yet the layer failed: all of it.
      const bool whole_layer = n.failed_blocks.empty() || std::any_of(n.failed_blocks.begin(), n.failed_blocks.end(),
                                                                       [&](std::uint32_t i) { return i >= r.nsrc; });
      if (whole_layer)
        for (std::uint32_t i = 0; i < r.nsrc; ++i) mark_failed(st, r, n.layer, i, n.code, n.context);
      else
        for (auto i : n.failed_blocks) mark_failed(st, r, n.layer, i, n.code, n.context);
    }
    r.load_bytes += n.bytes;
    st.stats.bytes_loaded += n.bytes;
    r.pending[n.layer] = 0;
    st.cv.notify_all();
  }

  // A layer's push ended: its notice to the decode side (the blocks of
  // failed ops; none listed with an error: all of them).
  static void end_push_save(shared_state& st, const std::shared_ptr<request>& r, const std::vector<std::uint32_t>& op_block,
                            std::uint32_t layer, clock::time_point started, std::error_code ec, const transfer::batch_result& res,
                            std::string context) {
    push_notice n{r->id, r->target->epoch, layer, ec, std::move(context), {}, res.bytes};
    for (std::size_t k = 0; k < res.ops.size() && k < op_block.size(); ++k)
      if (!res.ops[k].ok() && (n.failed_blocks.empty() || n.failed_blocks.back() != op_block[k])) n.failed_blocks.push_back(op_block[k]);
    {
      std::lock_guard g(st.mu);
      end_save(st, *r, layer, ec, n.context, res.bytes, started);
    }
    r->target->notify(n);
    st.cv.notify_all();
  }

  // A steady-clock instant as milliseconds since the Unix epoch on the
  // system clock (rounded down: never later than the instant), and back
  // (never later either; at most a year ahead, whatever the sender wrote).
  static std::uint64_t wall_ms_at(clock::time_point t, clock::time_point now = clock::now()) {
    using namespace std::chrono;
    const auto at = system_clock::now() + duration_cast<system_clock::duration>(t - now);
    return static_cast<std::uint64_t>(std::max<std::int64_t>(0, duration_cast<milliseconds>(at.time_since_epoch()).count()));
  }
  static clock::time_point steady_at_wall_ms(std::uint64_t ms, clock::time_point now = clock::now()) {
    using namespace std::chrono;
    constexpr std::int64_t year_ms = std::int64_t{365} * 24 * 3600 * 1000;
    const auto now_ms = ceil<milliseconds>(system_clock::now().time_since_epoch()).count();
    const std::int64_t left = ms >= static_cast<std::uint64_t>(now_ms) + year_ms ? year_ms : static_cast<std::int64_t>(ms) - now_ms;
    return now + milliseconds(left);
  }
  // Past this no write for a target whose writes end by `write_until` can land.
  static clock::time_point writes_expire(const shared_state& st, clock::time_point write_until) {
    return write_until == clock::time_point::max() ? write_until : write_until + st.drain_margin;
  }

  // The registration key a push target pins segment `i` to (0: none).
  static std::uint64_t target_key(const push_target& t, std::uint32_t i) {
    return i < t.segment_keys.size() ? t.segment_keys[i] : 0;
  }

  std::shared_ptr<const push_target> make_target(const request& r) {
    auto t = std::make_shared<push_target>();
    t->request = r.id;
    t->epoch = r.epoch;
    t->node = cfg_.name;
    t->source_tp = src_tp_;
    t->source_block_tokens = src_shape_.block_tokens;
    t->source_blocks = r.nsrc;
    t->layers = shape_.layers;
    t->write_by_ms = r.write_until == clock::time_point::max() ? 0 : wall_ms_at(r.write_until);
    if (direct_) {
      for (std::uint32_t s = 0; s < tp_; ++s) t->segments.push_back(segment_name(s));
    } else {
      t->segments.push_back(cfg_.name + "/stage");
    }
    // Pinned to these registrations: if this instance restarts under the
    // same name, a producer still holding the target must not write into
    // the new one's blocks.
    for (const auto& name : t->segments) {
      auto k = registration_keys_.find(name);
      t->segment_keys.push_back(k == registration_keys_.end() ? 0 : k->second);
    }
    t->destinations.reserve(std::size_t{src_tp_} * shape_.layers * r.nsrc);
    for (std::uint32_t s = 0; s < src_tp_; ++s)
      for (std::uint32_t l = 0; l < shape_.layers; ++l)
        for (std::uint32_t i = 0; i < r.nsrc; ++i) {
          auto& d = t->destinations.emplace_back();
          d.segment = direct_ ? s : 0;
          // A recurrent layer's state goes into the destination of its block 0 (the other blocks have none).
          const bool state = !shape_.is_attention(l);
          if (state && i > 0) continue;
          // Element by element: moving a small_vector trips GCC 12's -Wstringop-overread at -O2.
          for (const auto& x : state ? (direct_ ? shards_[s].layout.state_layer_ranges(r.state_slot, l)
                                                : stage_->state_layer_ranges(r.stage_state[s], l))
                                     : direct_ ? shards_[s].layout.block_layer_ranges(r.blocks[i], l)
                                               : stage_->block_layer_ranges(r.stage[s * r.nsrc + i], l))
            d.ranges.push_back(x);
        }
    t->notify = [weak = std::weak_ptr<shared_state>(st_)](const push_notice& n) {
      if (auto st = weak.lock()) deliver(*st, n);
    };
    return t;
  }

  // Staged loads: one layer from the producer-shaped staging blocks into the engine's layout.
  result<void> convert_layer(const request& r, std::uint32_t layer) {
    const bool state = !shape_.is_attention(layer);
    std::vector<std::vector<std::uint32_t>> tables(src_tp_);
    std::vector<kv_source<layouts::page_first>> src;
    for (std::uint32_t s = 0; s < src_tp_; ++s) {
      tables[s].assign(r.stage.begin() + std::ptrdiff_t{s} * r.nsrc, r.stage.begin() + std::ptrdiff_t{s + 1} * r.nsrc);
      src.push_back({&*stage_, stage_mem_, tables[s], s * src_shape_.kv_heads, state ? r.stage_state[s] : no_state_slot});
    }
    std::vector<kv_target<Layout>> dst;
    for (std::uint32_t s = 0; s < tp_; ++s)
      dst.push_back({&shards_[s].layout, shards_[s].memory, r.blocks, s * shape_.kv_heads, state ? r.state_slot : no_state_slot});
    convert_options opt;
    opt.layer_begin = layer;
    opt.layer_end = layer + 1;
    opt.copy_kv = !state;
    opt.copy_state = state;
    auto done = convert<layouts::page_first, Layout>(std::span<const kv_source<layouts::page_first>>(src),
                                                     std::span<const kv_target<Layout>>(dst), token_range{0, r.external}, opt);
    if (!done) return error{done.code(), "kv_connector '" + cfg_.name + "': converting layer " + std::to_string(layer) + ": " + done.error().message()};
    return {};
  }

  Engine& engine_;
  connector_config cfg_;
  std::vector<kv_shard<Layout>> shards_;
  Mode mode_;
  Load load_;
  kv_shape shape_;
  std::uint32_t tp_;
  std::uint32_t src_tp_;
  kv_shape src_shape_;
  bool direct_;
  std::optional<layouts::page_first> stage_;
  std::vector<std::byte> stage_mem_;
  std::optional<cache::block_hasher> hasher_;
  std::shared_ptr<shared_state> st_;
  std::vector<std::string> registered_;
  std::map<std::string, std::uint64_t> registration_keys_;  // name -> its registration's key (push targets pin it)
};

}  // namespace kvx::disagg
