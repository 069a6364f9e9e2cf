#pragma once
//! \file
//! `kvx::disagg::planner::fit_compute_speed`: the cost model's compute
//! coefficients (hardware.hpp) fitted to an engine's own timings of real
//! requests, by non-negative least squares.
//!
//! Why: a speed measured apart (benchmarks/kvx_plan/measure.hpp) is the speed
//! of that moment, in that process. On a shared machine the same code runs
//! 20 to 50% faster or slower a few seconds later (docs/benchmarks/planner.md
//! measured it), so a planner validated against a serving run takes the
//! engine's speed from timings made in the same run: each request's prefill
//! and decode compute, timed by the compute thread's CPU clock (not its
//! latency: queueing and waiting for a core stay the planner's to predict).
//!
//! Fitted (the model of hardware.hpp, one sequence at a time):
//!
//!     prefill_cpu_s = n / tokens_per_s + attention_s_per_pair * n * (c + n / 2)
//!     decode_cpu_s  = steps * s_per_seq + s_per_token * (sum of the steps' KV tokens)
//!
//! Values; nothing blocks.
//!
//! \code
//! std::vector<compute_sample> s = ...;   // one per request the engine served
//! auto fit = kvx::disagg::planner::fit_compute_speed(s).value();
//! hw.prefill = fit.prefill;  hw.decode.s_per_seq = fit.decode.s_per_seq;  ...
//! \endcode

#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include <kvx/core/result.hpp>
#include <kvx/disagg/planner/hardware.hpp>

namespace kvx::disagg::planner {

//! One request's compute, as the engine timed it.
struct compute_sample {
  std::uint32_t prompt_tokens = 0;   //!< n + c: the whole prompt
  std::uint32_t cached_tokens = 0;   //!< c: loaded, not computed
  double prefill_cpu_s = 0;          //!< the prefill's forward pass
  std::uint32_t decode_steps = 0;    //!< decode steps timed (0: none)
  double decode_kv_tokens = 0;       //!< the KV tokens those steps read, summed over them
  double decode_cpu_s = 0;           //!< those steps together
};

//! The fitted coefficients, and how well they fit.
struct compute_fit {
  prefill_cost prefill{};            //!< tokens_per_s and attention_s_per_pair (overhead_s 0)
  decode_cost decode{};              //!< s_per_seq and s_per_token (step_s 0)
  std::size_t prefill_samples = 0, decode_samples = 0;
  double prefill_rms_relative = 0;   //!< RMS of (fit - timed) / timed over the prefills
  double decode_rms_relative = 0;    //!< the same over the decodes
};

namespace detail {
//! min |A x - y|^2 over x >= 0 for two columns, each row weighted by 1 / y
//! (so that a long prompt does not outweigh many short ones): the
//! unconstrained solution when it is non-negative, else the better of the
//! two one-column fits.
struct nnls2_result {
  double x1 = 0, x2 = 0;
};
//! Sum over rows of ((a1 x1 + a2 x2 - y) / y)^2: what nnls2 minimises.
template <class Rows>
double weighted_residual(const Rows& rows, nnls2_result x) {
  double r = 0;
  for (const auto& [a1, a2, y] : rows) {
    const double e = (a1 * x.x1 + a2 * x.x2 - y) / y;
    r += e * e;
  }
  return r;
}
template <class Rows>
nnls2_result nnls2(const Rows& rows) {
  double s11 = 0, s12 = 0, s22 = 0, b1 = 0, b2 = 0;
  for (const auto& [a1, a2, y] : rows) {
    const double w = 1 / (y * y);
    s11 += w * a1 * a1, s12 += w * a1 * a2, s22 += w * a2 * a2, b1 += w * a1 * y, b2 += w * a2 * y;
  }
  const double det = s11 * s22 - s12 * s12;
  if (det > 1e-12 * s11 * s22) {
    const nnls2_result both{(b1 * s22 - b2 * s12) / det, (b2 * s11 - b1 * s12) / det};
    if (both.x1 >= 0 && both.x2 >= 0) return both;
  }
  const nnls2_result only1{s11 > 0 ? b1 / s11 : 0, 0}, only2{0, s22 > 0 ? b2 / s22 : 0};
  return weighted_residual(rows, only1) <= weighted_residual(rows, only2) ? only1 : only2;
}
template <class Rows>
double rms_relative(const Rows& rows, nnls2_result x) {
  return rows.empty() ? 0 : std::sqrt(weighted_residual(rows, x) / static_cast<double>(rows.size()));
}
struct fit_row {
  double a1, a2, y;
};
}  // namespace detail

//! Fits the compute coefficients to `samples`. `errc::invalid_argument` when a
//! sample is inconsistent (negative or non-finite time, more cached than prompt
//! tokens, a time without work), when fewer than two prefills or two decodes
//! of different sizes were timed, or when the best fit has no per-token
//! (prefill) or per-step (decode) term: a speed the cost model cannot hold.
inline result<compute_fit> fit_compute_speed(std::span<const compute_sample> samples) {
  std::vector<detail::fit_row> pre, dec;
  for (std::size_t i = 0; i < samples.size(); ++i) {
    const auto& s = samples[i];
    auto bad = [&](const std::string& why) {
      return error{errc::invalid_argument, "fit_compute_speed: sample " + std::to_string(i) + ": " + why};
    };
    if (!std::isfinite(s.prefill_cpu_s) || !std::isfinite(s.decode_cpu_s) || !std::isfinite(s.decode_kv_tokens) ||
        s.prefill_cpu_s < 0 || s.decode_cpu_s < 0 || s.decode_kv_tokens < 0)
      return bad("times and token counts must be finite and >= 0");
    if (s.cached_tokens > s.prompt_tokens)
      return bad(std::to_string(s.cached_tokens) + " cached tokens of a " + std::to_string(s.prompt_tokens) + "-token prompt");
    const double n = s.prompt_tokens - s.cached_tokens, c = s.cached_tokens;
    if (s.prefill_cpu_s > 0) {
      if (n == 0) return bad("a prefill time without tokens to compute");
      pre.push_back({n, n * (c + n / 2), s.prefill_cpu_s});
    }
    if (s.decode_cpu_s > 0) {
      if (s.decode_steps == 0) return bad("a decode time without steps");
      dec.push_back({static_cast<double>(s.decode_steps), s.decode_kv_tokens, s.decode_cpu_s});
    }
  }
  auto spread = [](const std::vector<detail::fit_row>& rows) {
    for (const auto& r : rows)
      if (r.a2 / r.a1 != rows.front().a2 / rows.front().a1) return true;
    return false;
  };
  if (pre.size() < 2 || !spread(pre))
    return error{errc::invalid_argument, "fit_compute_speed: needs timed prefills of at least two prompt sizes (got " +
                                             std::to_string(pre.size()) + " prefills)"};
  if (dec.size() < 2 || !spread(dec))
    return error{errc::invalid_argument, "fit_compute_speed: needs timed decodes at at least two context sizes (got " +
                                             std::to_string(dec.size()) + " decodes)"};
  const auto p = detail::nnls2(pre), d = detail::nnls2(dec);
  if (!(p.x1 > 0))
    return error{errc::invalid_argument,
                 "fit_compute_speed: the prefill timings fit no per-token term (they grow with attention pairs only)"};
  if (!(d.x1 > 0))
    return error{errc::invalid_argument,
                 "fit_compute_speed: the decode timings fit no per-step term (they grow with KV tokens only)"};
  compute_fit f;
  f.prefill.tokens_per_s = 1 / p.x1;
  f.prefill.attention_s_per_pair = p.x2;
  f.prefill.overhead_s = 0;
  f.decode.step_s = 0;
  f.decode.s_per_seq = d.x1;
  f.decode.s_per_token = d.x2;
  f.prefill_samples = pre.size();
  f.decode_samples = dec.size();
  f.prefill_rms_relative = detail::rms_relative(pre, p);
  f.decode_rms_relative = detail::rms_relative(dec, d);
  return f;
}

}  // namespace kvx::disagg::planner
