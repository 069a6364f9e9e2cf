#pragma once
//! \file
//! `kvx::disagg::planner::deployment`: one candidate serving stack (how many
//! instances of which role, how much KV cache in which tier, which eviction
//! and routing policy), the SLOs it is judged against, and what it costs.
//!
//! Values; thread-safe as any value. Nothing blocks.
//!
//! \code
//! kvx::disagg::planner::deployment d{.mode = kvx::disagg::planner::serving_mode::disaggregated,
//!                                    .prefill_instances = 3, .decode_instances = 2,
//!                                    .hbm_cache_gb = 100, .dram_gb = 2000, .eviction = "s3fifo"};
//! d.label();                   // "disagg 3P+2D hbm100 dram2000 ssd0 s3fifo cache_aware"
//! cost_per_hour(d, hardware);  // 5 instances + 2000 GB of DRAM
//! \endcode

#include <cstdint>
#include <limits>
#include <sstream>
#include <string>

#include <kvx/core/result.hpp>
#include <kvx/disagg/planner/hardware.hpp>

namespace kvx::disagg::planner {

//! Disaggregated: prefill instances ship KV to decode instances. Colocated:
//! every instance prefills and decodes its own requests (chunked prefill
//! shares each iteration with the decode batch, as vLLM and SGLang do).
enum class serving_mode : std::uint8_t { disaggregated, colocated };

[[nodiscard]] inline const char* to_string(serving_mode m) noexcept {
  return m == serving_mode::disaggregated ? "disagg" : "colocated";
}

struct deployment {
  serving_mode mode = serving_mode::disaggregated;
  std::uint32_t prefill_instances = 1;  //!< colocated: the number of instances
  std::uint32_t decode_instances = 1;   //!< ignored when colocated
  double hbm_cache_gb = 0;              //!< prefix cache in each prefill-capable instance's HBM
  double dram_gb = 0;                   //!< shared pool, DRAM tier (total)
  double ssd_gb = 0;                    //!< shared pool, SSD tier (total)
  std::string eviction = "lru";         //!< any name `any_eviction_policy` knows
  std::string routing = "cache_aware";  //!< cache_aware, least_loaded, round_robin
  std::uint32_t chunk_tokens = 2048;    //!< colocated chunked-prefill budget per iteration
  bool early_rejection = true;          //!< the router rejects requests it predicts will miss the SLO

  [[nodiscard]] std::uint32_t instances() const noexcept {
    return mode == serving_mode::colocated ? prefill_instances : prefill_instances + decode_instances;
  }
  [[nodiscard]] bool has_cache() const noexcept { return hbm_cache_gb > 0 || dram_gb > 0 || ssd_gb > 0; }

  [[nodiscard]] std::string label() const {
    std::ostringstream s;
    s << to_string(mode) << ' ';
    if (mode == serving_mode::colocated)
      s << prefill_instances << 'C';
    else
      s << prefill_instances << "P+" << decode_instances << 'D';
    s << " hbm" << hbm_cache_gb << " dram" << dram_gb << " ssd" << ssd_gb << ' ' << (has_cache() ? eviction : "-")
      << ' ' << routing;
    return s.str();
  }

  [[nodiscard]] result<void> validate(const hardware& hw) const {
    auto bad = [&](const std::string& what) { return error{errc::invalid_argument, "deployment '" + label() + "': " + what}; };
    if (prefill_instances == 0) return bad("needs at least one prefill (or colocated) instance");
    if (mode == serving_mode::disaggregated && decode_instances == 0) return bad("needs at least one decode instance");
    if (hbm_cache_gb < 0 || dram_gb < 0 || ssd_gb < 0) return bad("cache sizes must be >= 0");
    if (hbm_cache_gb * 1e9 >= hw.kv_capacity_bytes)
      return bad("hbm_cache_gb leaves no HBM for the running batch (instance KV capacity " +
                 std::to_string(hw.kv_capacity_bytes / 1e9) + " GB)");
    if (routing != "cache_aware" && routing != "least_loaded" && routing != "round_robin")
      return bad("unknown routing '" + routing + "' (known: cache_aware, least_loaded, round_robin)");
    if (mode == serving_mode::colocated && chunk_tokens == 0) return bad("chunk_tokens must be positive");
    return {};
  }
};

//! What the deployment costs per hour: instances plus the pool's DRAM and SSD
//! (an instance's HBM is part of its price).
[[nodiscard]] inline double cost_per_hour(const deployment& d, const hardware& hw) noexcept {
  return d.instances() * hw.price_per_hour + d.dram_gb * hw.dram_price_per_gb_hour + d.ssd_gb * hw.ssd_price_per_gb_hour;
}

//! Latency targets: the `ttft_percentile`-th percentile of time to first
//! token over all requests (a rejected request counts as infinitely late)
//! must be at most `ttft_s`, and likewise for the time per output token.
struct slo_target {
  double ttft_s = std::numeric_limits<double>::infinity();
  double ttft_percentile = 90;
  double tpot_s = std::numeric_limits<double>::infinity();
  double tpot_percentile = 90;

  [[nodiscard]] result<void> validate() const {
    if (!(ttft_s > 0) || !(tpot_s > 0))
      return error{errc::invalid_argument, "SLO: ttft_s and tpot_s must be positive"};
    if (!(ttft_percentile > 0 && ttft_percentile <= 100) || !(tpot_percentile > 0 && tpot_percentile <= 100))
      return error{errc::invalid_argument, "SLO: percentiles must be in (0, 100]"};
    return {};
  }
};

}  // namespace kvx::disagg::planner
