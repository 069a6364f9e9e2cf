#pragma once
//! \file
//! `kvx::disagg::planner::hardware`: the planner's cost model of one serving
//! instance (its prefill and decode speed as functions of batch and context),
//! the links KV moves over, and prices.
//!
//! The model (docs/planner.md derives it):
//!
//!     prefill(n new tokens after c cached ones) = overhead_s + n / tokens_per_s
//!                                                 + attention_s_per_pair * n * (c + n / 2)
//!     decode step(batch B, KV tokens S)         = step_s + s_per_seq * B + s_per_token * S
//!
//! Real engines do not take the same time for the same work every time
//! (caches, other tenants, the host): `prefill.cv` and `decode.cv` spread
//! each request's time around the model, as a coefficient of variation: the
//! simulator multiplies a request's prefill, and its decode steps, by a
//! factor drawn for that request (log-normal, mean 1, seeded by the
//! request's index, so runs repeat). 0 (the default) is no spread. The TPOT
//! percentiles depend on it; the means hardly do.
//!
//! Coefficients come from a JSON file the user writes, from a roofline over
//! the accelerator's datasheet figures (`gpus`, `tflops_per_gpu`,
//! `hbm_tb_s_per_gpu`, `mfu`, `mbu`; explicit coefficients override it), or
//! from kvx's own measurements (benchmarks/kvx_plan/measure.hpp; link speeds
//! from transfer_bench and file_tier_bench results: links.hpp).
//!
//! Values; thread-safe as any value. Nothing blocks.
//!
//! \code
//! auto doc = kvx::config::parse(R"({"gpus": 8, "tflops_per_gpu": 989, "hbm_gb_per_gpu": 80,
//!                                   "hbm_tb_s_per_gpu": 3.35, "price_per_hour": 24})");
//! auto hw = kvx::disagg::planner::hardware_from_config(kvx::config::view(*doc), model).value();
//! hw.prefill.seconds(8000, 0);   // one 8k-token prompt, nothing cached
//! \endcode

#include <algorithm>
#include <cstdint>
#include <string>

#include <kvx/core/config.hpp>
#include <kvx/core/result.hpp>
#include <kvx/disagg/planner/model_shape.hpp>

namespace kvx::disagg::planner {

//! Prefill time of one instance.
struct prefill_cost {
  double tokens_per_s = 10000;       //!< dense compute speed
  double overhead_s = 0;             //!< per prefill iteration (launch, scheduling)
  double attention_s_per_pair = 0;   //!< per (new token, context token) pair of causal attention
  double cv = 0;                     //!< spread of one request's prefill time around the model (see `hardware`)

  //! `n` new tokens after `c` tokens already in the KV cache.
  [[nodiscard]] double seconds(double n, double c) const noexcept {
    return n <= 0 ? 0.0 : overhead_s + n / tokens_per_s + attention_s_per_pair * n * (c + n / 2);
  }
};

//! Decode step time of one instance (continuous batching).
struct decode_cost {
  double step_s = 0.02;        //!< reading the weights once per step
  double s_per_seq = 0;        //!< dense compute per sequence in the batch
  double s_per_token = 0;      //!< reading one token of KV
  std::uint32_t max_batch = 128;
  double cv = 0;               //!< spread of one request's decode steps around the model (see `hardware`)

  [[nodiscard]] double step(double batch, double kv_tokens) const noexcept {
    return step_s + s_per_seq * batch + s_per_token * kv_tokens;
  }
};

struct hardware {
  std::string name;
  prefill_cost prefill{};
  decode_cost decode{};
  double kv_capacity_bytes = 0;        //!< HBM of one instance left for KV (decode batch and prefix cache)
  double network_bytes_per_s = 25e9;   //!< per instance NIC: pool reads, peer reads, prefill-to-decode KV
  double ssd_bytes_per_s = 5e9;        //!< aggregate SSD read speed of the pool's SSD tier
  double dram_bytes_per_s = 1e12;      //!< the pool's DRAM tier copy speed (a pool DRAM hit moves at the slower of it and the network)
  double price_per_hour = 10;          //!< one instance
  double dram_price_per_gb_hour = 0.004;
  double ssd_price_per_gb_hour = 0.0001;

  [[nodiscard]] result<void> validate() const {
    auto bad = [&](const std::string& what) { return error{errc::invalid_argument, "hardware '" + name + "': " + what}; };
    if (!(prefill.tokens_per_s > 0)) return bad("prefill.tokens_per_s must be positive");
    if (prefill.overhead_s < 0 || prefill.attention_s_per_pair < 0) return bad("prefill coefficients must be >= 0");
    if (decode.step_s < 0 || decode.s_per_seq < 0 || decode.s_per_token < 0)
      return bad("decode coefficients must be >= 0");
    if (!(decode.step_s + decode.s_per_seq > 0)) return bad("a decode step must take time (step_s or s_per_seq > 0)");
    if (decode.max_batch == 0) return bad("decode.max_batch must be positive");
    if (!(prefill.cv >= 0 && prefill.cv <= 2) || !(decode.cv >= 0 && decode.cv <= 2))
      return bad("prefill.cv and decode.cv must be in [0, 2]");
    if (!(kv_capacity_bytes > 0)) return bad("no HBM is left for KV (kv_capacity_gb <= 0: does the model fit?)");
    if (!(network_bytes_per_s > 0) || !(ssd_bytes_per_s > 0) || !(dram_bytes_per_s > 0))
      return bad("link bandwidths must be positive");
    if (price_per_hour < 0 || dram_price_per_gb_hour < 0 || ssd_price_per_gb_hour < 0)
      return bad("prices must be >= 0");
    return {};
  }
};

//! Datasheet figures of one instance, for the roofline.
struct accelerator {
  std::uint32_t gpus = 8;
  double tflops_per_gpu = 989;     //!< dense bf16
  double hbm_gb_per_gpu = 80;
  double hbm_tb_s_per_gpu = 3.35;
  double mfu = 0.45;               //!< achieved fraction of peak FLOPs in prefill
  double mbu = 0.6;                //!< achieved fraction of peak HBM bandwidth in decode
  double activation_reserve = 0.1; //!< fraction of HBM kept for activations and the runtime
};

//! The roofline: prefill is compute-bound, decode memory-bound (weights once
//! per step, KV once per token per step) plus each sequence's dense compute.
inline hardware derive_hardware(const accelerator& a, const model_shape& m, std::string name = {}) {
  const double flops = a.gpus * a.tflops_per_gpu * 1e12 * a.mfu;
  const double hbm_bw = a.gpus * a.hbm_tb_s_per_gpu * 1e12 * a.mbu;
  hardware h;
  h.name = std::move(name);
  h.prefill.tokens_per_s = flops / m.flops_per_token();
  h.prefill.attention_s_per_pair = m.attention_flops_per_pair() / flops;
  h.decode.step_s = m.weight_bytes() / hbm_bw;
  h.decode.s_per_seq = m.flops_per_token() / flops;
  h.decode.s_per_token = static_cast<double>(m.kv_bytes_per_token()) / hbm_bw;
  h.kv_capacity_bytes = a.gpus * a.hbm_gb_per_gpu * 1e9 * (1 - a.activation_reserve) - m.weight_bytes();
  return h;
}

namespace detail {
inline result<void> read_number(const config::view& v, const char* key, double& out, double scale = 1) {
  auto r = v.optional<double>(key, out / scale);
  if (!r) return r.error();
  out = *r * scale;
  return {};
}
}  // namespace detail

//! Reads a hardware file (docs/planner.md lists the fields). Roofline fields,
//! when `gpus` is given, set every coefficient; `prefill`, `decode` and
//! `kv_capacity_gb` then override any of them. Unknown fields are errors.
inline result<hardware> hardware_from_config(const config::view& cfg, const model_shape& model) {
  KVX_TRY(cfg.allow_only({"name", "description", "gpus", "tflops_per_gpu", "hbm_gb_per_gpu", "hbm_tb_s_per_gpu", "mfu",
                          "mbu", "activation_reserve", "prefill", "decode", "kv_capacity_gb", "network_gb_s", "ssd_gb_s", "dram_gb_s",
                          "price_per_hour", "dram_price_per_gb_hour", "ssd_price_per_gb_hour"}));
  auto name = cfg.optional<std::string>("name", "custom");
  if (!name) return name.error();
  hardware h;
  if (cfg.contains("gpus")) {
    accelerator a;
    auto g = cfg.required<std::uint32_t>("gpus");
    if (!g) return g.error();
    a.gpus = *g;
    KVX_TRY(detail::read_number(cfg, "tflops_per_gpu", a.tflops_per_gpu));
    KVX_TRY(detail::read_number(cfg, "hbm_gb_per_gpu", a.hbm_gb_per_gpu));
    KVX_TRY(detail::read_number(cfg, "hbm_tb_s_per_gpu", a.hbm_tb_s_per_gpu));
    KVX_TRY(detail::read_number(cfg, "mfu", a.mfu));
    KVX_TRY(detail::read_number(cfg, "mbu", a.mbu));
    KVX_TRY(detail::read_number(cfg, "activation_reserve", a.activation_reserve));
    if (a.gpus == 0 || !(a.tflops_per_gpu > 0) || !(a.hbm_gb_per_gpu > 0) || !(a.hbm_tb_s_per_gpu > 0) || !(a.mfu > 0) ||
        a.mfu > 1 || !(a.mbu > 0) || a.mbu > 1 || a.activation_reserve < 0 || a.activation_reserve >= 1)
      return error{errc::invalid_argument, "hardware '" + *name +
                                               "': gpus, tflops_per_gpu, hbm_gb_per_gpu, hbm_tb_s_per_gpu must be "
                                               "positive, mfu and mbu in (0, 1], activation_reserve in [0, 1)"};
    h = derive_hardware(a, model);
  } else if (!cfg.contains("prefill") || !cfg.contains("decode") || !cfg.contains("kv_capacity_gb")) {
    return error{errc::invalid_argument,
                 "hardware '" + *name + "': give either the roofline figures (gpus, tflops_per_gpu, ...) or all of "
                                        "prefill, decode and kv_capacity_gb"};
  }
  h.name = *name;
  if (cfg.contains("prefill")) {
    auto p = cfg.child("prefill");
    if (!p) return p.error();
    KVX_TRY(p->allow_only({"tokens_per_s", "overhead_s", "attention_s_per_pair", "cv"}));
    KVX_TRY(detail::read_number(*p, "cv", h.prefill.cv));
    KVX_TRY(detail::read_number(*p, "tokens_per_s", h.prefill.tokens_per_s));
    KVX_TRY(detail::read_number(*p, "overhead_s", h.prefill.overhead_s));
    KVX_TRY(detail::read_number(*p, "attention_s_per_pair", h.prefill.attention_s_per_pair));
  }
  if (cfg.contains("decode")) {
    auto d = cfg.child("decode");
    if (!d) return d.error();
    KVX_TRY(d->allow_only({"step_s", "s_per_seq", "s_per_token", "max_batch", "cv"}));
    KVX_TRY(detail::read_number(*d, "cv", h.decode.cv));
    KVX_TRY(detail::read_number(*d, "step_s", h.decode.step_s));
    KVX_TRY(detail::read_number(*d, "s_per_seq", h.decode.s_per_seq));
    KVX_TRY(detail::read_number(*d, "s_per_token", h.decode.s_per_token));
    auto mb = d->optional<std::uint32_t>("max_batch", h.decode.max_batch);
    if (!mb) return mb.error();
    h.decode.max_batch = *mb;
  }
  KVX_TRY(detail::read_number(cfg, "kv_capacity_gb", h.kv_capacity_bytes, 1e9));
  KVX_TRY(detail::read_number(cfg, "network_gb_s", h.network_bytes_per_s, 1e9));
  KVX_TRY(detail::read_number(cfg, "ssd_gb_s", h.ssd_bytes_per_s, 1e9));
  KVX_TRY(detail::read_number(cfg, "dram_gb_s", h.dram_bytes_per_s, 1e9));
  KVX_TRY(detail::read_number(cfg, "price_per_hour", h.price_per_hour));
  KVX_TRY(detail::read_number(cfg, "dram_price_per_gb_hour", h.dram_price_per_gb_hour));
  KVX_TRY(detail::read_number(cfg, "ssd_price_per_gb_hour", h.ssd_price_per_gb_hour));
  KVX_TRY(h.validate());
  return h;
}

}  // namespace kvx::disagg::planner
