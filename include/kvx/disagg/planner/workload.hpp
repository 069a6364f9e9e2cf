#pragma once
//! \file
//! `kvx::disagg::planner::workload`: the requests a simulation replays, in
//! arrival order: arrival time, prompt and output lengths, and the prompt's
//! prefix-chained block keys (a Mooncake trace's `hash_ids`), flattened by
//! `kvx::cache::eviction::replay_plan` so that every block reference also
//! knows its next use (what Belady reads).
//!
//! Immutable after construction; thread-safe for concurrent readers (a
//! search simulates many deployments over one workload).
//!
//! \code
//! auto trace = kvx::cache::read_trace("conversation_trace.jsonl").value();
//! auto w = kvx::disagg::planner::workload::from_trace(trace, {.block_tokens = 512, .time_scale = 2}).value();
//! w.size();          // requests
//! w.full_keys(0);    // keys of request 0's full blocks
//! \endcode

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include <kvx/cache/block_key.hpp>
#include <kvx/cache/eviction/replay.hpp>
#include <kvx/cache/trace.hpp>
#include <kvx/core/result.hpp>

namespace kvx::disagg::planner {

struct workload_options {
  std::uint32_t block_tokens = 512;  //!< tokens per hash id
  double time_scale = 1;             //!< arrivals happen this many times faster (2: twice the load)
  std::size_t max_requests = 0;      //!< 0: all
  //! Closed loop: this many requests in flight, the next one arriving when
  //! one finishes or is rejected (a benchmark client, as kvx_pd_demo
  //! replays); the timestamps then only give the order. 0: open loop, each
  //! request arrives at its timestamp.
  std::uint32_t concurrency = 0;
};

class workload {
 public:
  //! One request as the simulator sees it.
  struct request {
    double arrival_s = 0;
    std::uint32_t input_tokens = 0;
    std::uint32_t output_tokens = 0;  //!< at least 1 (the first token comes from prefill)
  };

  //! Checks and converts a trace: timestamps must not go back, prompts must
  //! be non-empty and have no more hash ids than blocks.
  static result<workload> from_trace(const std::vector<cache::trace_request>& trace, const workload_options& opt = {}) {
    if (opt.block_tokens == 0) return error{errc::invalid_argument, "workload: block_tokens must be positive"};
    if (!(opt.time_scale > 0)) return error{errc::invalid_argument, "workload: time_scale must be positive"};
    const std::size_t n = opt.max_requests ? std::min(opt.max_requests, trace.size()) : trace.size();
    if (n == 0) return error{errc::invalid_argument, "workload: the trace has no requests"};
    const std::vector<cache::trace_request> used(trace.begin(), trace.begin() + static_cast<std::ptrdiff_t>(n));
    workload w(used, opt.block_tokens);
    w.concurrency_ = opt.concurrency;
    const double t0 = static_cast<double>(used.front().timestamp_ms);
    for (std::size_t i = 0; i < n; ++i) {
      const auto& r = used[i];
      const std::string where = "trace request " + std::to_string(i);
      if (i > 0 && r.timestamp_ms < used[i - 1].timestamp_ms)
        return error{errc::invalid_argument, where + ": timestamp " + std::to_string(r.timestamp_ms) +
                                                 " ms is before the previous request's"};
      if (r.input_length == 0 || r.input_length > UINT32_MAX / 2 || r.output_length > UINT32_MAX / 2)
        return error{errc::invalid_argument, where + ": input_length must be in [1, 2^31), output_length below 2^31"};
      const std::uint64_t blocks = (r.input_length + opt.block_tokens - 1) / opt.block_tokens;
      if (r.hash_ids.size() > blocks)
        return error{errc::invalid_argument, where + ": " + std::to_string(r.hash_ids.size()) + " hash_ids for " +
                                                 std::to_string(r.input_length) + " tokens of " +
                                                 std::to_string(opt.block_tokens) + "-token blocks"};
      w.requests_.push_back({(static_cast<double>(r.timestamp_ms) - t0) / 1000.0 / opt.time_scale,
                             static_cast<std::uint32_t>(r.input_length),
                             static_cast<std::uint32_t>(std::max<std::uint64_t>(1, r.output_length))});
    }
    return w;
  }

  [[nodiscard]] std::size_t size() const noexcept { return requests_.size(); }
  [[nodiscard]] const request& operator[](std::size_t i) const { return requests_[i]; }
  [[nodiscard]] std::uint32_t block_tokens() const noexcept { return block_tokens_; }
  //! Requests in flight of a closed-loop replay; 0 for an open loop.
  [[nodiscard]] std::uint32_t concurrency() const noexcept { return concurrency_; }
  //! Keys of request `i`'s full blocks: the ones a cache can hold and a router match.
  [[nodiscard]] std::span<const cache::block_key> full_keys(std::size_t i) const {
    const auto& off = plan_.offsets();
    const std::size_t all = off[i + 1] - off[i];
    const std::size_t full = std::min<std::size_t>(all, requests_[i].input_tokens / block_tokens_);
    return {plan_.keys().data() + off[i], full};
  }
  //! Position of request `i`'s block `j` in the flattened reference stream
  //! (the eviction policies' logical clock) and its next use.
  [[nodiscard]] std::uint64_t reference(std::size_t i, std::size_t j) const { return plan_.offsets()[i] + j; }
  [[nodiscard]] std::uint64_t next_use(std::size_t i, std::size_t j) const { return plan_.next_use()[reference(i, j)]; }
  [[nodiscard]] std::uint64_t input_tokens() const noexcept {
    std::uint64_t s = 0;
    for (const auto& r : requests_) s += r.input_tokens;
    return s;
  }
  [[nodiscard]] std::uint64_t output_tokens() const noexcept {
    std::uint64_t s = 0;
    for (const auto& r : requests_) s += r.output_tokens;
    return s;
  }
  //! Seconds from the first arrival to the last.
  [[nodiscard]] double span_s() const noexcept { return requests_.back().arrival_s - requests_.front().arrival_s; }

 private:
  workload(const std::vector<cache::trace_request>& trace, std::uint32_t block_tokens)
      : plan_(trace, block_tokens), block_tokens_(block_tokens) {
    requests_.reserve(trace.size());
  }

  cache::eviction::replay_plan plan_;
  std::uint32_t block_tokens_;
  std::uint32_t concurrency_ = 0;
  std::vector<request> requests_;
};

}  // namespace kvx::disagg::planner
