#pragma once
//! \file
//! `kvx::disagg::planner::measure_tiny_hardware`: the planner's cost model
//! fitted to kvx's tiny engine measured on this machine
//! (`tiny::measure_engine`, examples/tiny_engine), so that a plan for this machine is made from
//! measurements, not guesses.
//!
//! Prefill is timed at two prompt lengths and fitted to
//! `n / tokens_per_s + attention_s_per_pair * n * n / 2`; a decode step at the
//! two resulting contexts is fitted to `s_per_seq + s_per_token * context`
//! (the tiny engine decodes a batch one sequence after another, so
//! `step_s = 0`). Each point is the fastest of `repeats` runs, timed by the
//! measuring thread's CPU time: on a busy machine, the speed with a core to
//! itself (wall-clock time counts the waits for a core too).
//!
//! Blocks the calling thread for the measurements (a second or so at the
//! defaults). Thread-safe.
//!
//! \code
//! auto hw = kvx::disagg::planner::measure_tiny_hardware(tiny::model_config{}).value();
//! hw.prefill.tokens_per_s;
//! \endcode

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include <kvx/core/result.hpp>
#include <kvx/disagg/layouts/layer_first.hpp>
#include <kvx/disagg/planner/hardware.hpp>
#include <tiny/engine.hpp>

namespace kvx::disagg::planner {

struct measure_options {
  std::uint32_t short_prompt = 128;
  std::uint32_t long_prompt = 1024;
  std::uint32_t decode_steps = 32;
  unsigned repeats = 3;
  double kv_capacity_gb = 1;          //!< host memory the tiny engine may use for KV
  double network_gb_s = 5;            //!< what moves KV between tiny instances (set from transfer_bench)
  double ssd_gb_s = 1;
  bool per_core = true;               //!< time by the thread's CPU time (false: wall clock)
};

//! Fits a line y = a + b x through two points, with b >= 0 and a > 0.
inline void fit_nonnegative(double x1, double y1, double x2, double y2, double& a, double& b) {
  b = x2 != x1 ? (y2 - y1) / (x2 - x1) : 0.0;
  if (b < 0) b = 0;
  a = std::min(y1 - b * x1, y2 - b * x2);
  if (a <= 0) {  // noise: fall back to a flat fit through the faster point
    b = 0;
    a = std::min(y1, y2);
  }
}

//! The tiny engine's figures that are not timed (KV capacity, links, price),
//! as `measure_tiny_hardware` sets them around its timings; the speeds are
//! left for the caller (a fit to timings taken elsewhere, or a measurement).
inline hardware tiny_hardware_base(const measure_options& opt = {}) {
  hardware hw;
  hw.name = "tiny engine";
  hw.decode.max_batch = 64;
  hw.kv_capacity_bytes = opt.kv_capacity_gb * 1e9;
  hw.network_bytes_per_s = opt.network_gb_s * 1e9;
  hw.ssd_bytes_per_s = opt.ssd_gb_s * 1e9;
  hw.price_per_hour = 1;
  return hw;
}

inline result<hardware> measure_tiny_hardware(const tiny::model_config& cfg, const measure_options& opt = {}) {
  if (opt.short_prompt == 0 || opt.long_prompt <= opt.short_prompt || opt.repeats == 0)
    return error{errc::invalid_argument, "measure_tiny_hardware: needs 0 < short_prompt < long_prompt and repeats > 0"};
  auto best = [&](std::uint32_t prompt) -> result<tiny::engine_speed> {
    tiny::engine_speed b{};
    for (unsigned i = 0; i < opt.repeats; ++i) {
      auto s = opt.per_core ? tiny::measure_engine<layouts::layer_first>(cfg, prompt, opt.decode_steps, tiny::thread_cpu_seconds{})
                            : tiny::measure_engine<layouts::layer_first>(cfg, prompt, opt.decode_steps);
      if (!s) return s.error();
      if (i == 0 || s->prefill_tokens_per_s > b.prefill_tokens_per_s) b.prefill_tokens_per_s = s->prefill_tokens_per_s;
      if (i == 0 || s->decode_step_s < b.decode_step_s) b.decode_step_s = s->decode_step_s;
      b.context_tokens = s->context_tokens;
    }
    return b;
  };
  auto s1 = best(opt.short_prompt);
  if (!s1) return s1.error();
  auto s2 = best(opt.long_prompt);
  if (!s2) return s2.error();
  hardware hw = tiny_hardware_base(opt);
  hw.name = "tiny engine, measured";
  // Seconds per token grow linearly with the prompt under causal attention.
  const double n1 = opt.short_prompt, n2 = opt.long_prompt;
  double a = 0, b = 0;
  fit_nonnegative(n1, 1 / s1->prefill_tokens_per_s, n2, 1 / s2->prefill_tokens_per_s, a, b);
  hw.prefill.tokens_per_s = 1 / a;
  hw.prefill.attention_s_per_pair = 2 * b;
  hw.prefill.overhead_s = 0;
  fit_nonnegative(s1->context_tokens, s1->decode_step_s, s2->context_tokens, s2->decode_step_s, a, b);
  hw.decode.step_s = 0;
  hw.decode.s_per_seq = a;
  hw.decode.s_per_token = b;
  KVX_TRY(hw.validate());
  return hw;
}

}  // namespace kvx::disagg::planner
