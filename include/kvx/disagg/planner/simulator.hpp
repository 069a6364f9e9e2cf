#pragma once
//! \file
//! `kvx::disagg::planner::simulate`: a discrete-event simulation of one
//! deployment serving a workload, built from kvx's own parts: every request
//! is routed by `kvx::disagg::router` (the Conductor-style cache-aware router,
//! with its SLO-based early rejection) fed with the simulated instances' load
//! and cache contents, and every cache tier evicts with a real kvx eviction
//! policy (`planner::block_cache` over `any_eviction_policy`).
//!
//! What it models (docs/planner.md has the details and the limits):
//! - arrivals: at the workload's timestamps, or closed-loop with
//!   `workload::concurrency()` requests in flight;
//! - prefill: a FIFO queue per instance; a request's prefill loads the cached
//!   prefix the router chose to fetch (peer HBM over the network, pool DRAM
//!   and SSD at the slower of that tier and the network), then computes the rest
//!   (`hardware::prefill`); the first token comes out at its end;
//! - disaggregated: the whole prompt's KV then crosses the prefill
//!   instance's NIC (FIFO) to the decode instance;
//! - decode: continuous batching up to `decode.max_batch` requests and the
//!   instance's KV capacity (a request reserves prompt + output tokens), step
//!   time `hardware::decode.step(batch, KV tokens)`;
//! - colocated: a request decodes on the instance that prefilled it; each
//!   iteration runs one decode step of the batch plus up to `chunk_tokens` of
//!   the head prefill (chunked prefill), so prefill and decode slow each
//!   other down;
//! - caches: each prefill-capable instance's HBM prefix cache, and the shared
//!   pool's DRAM tier (write-through from every prefill) demoting to its SSD
//!   tier (exclusive; a hit in SSD promotes). A request's prefix blocks are
//!   pinned from routing until its prefill ends;
//! - optionally, instances sharing CPU cores (`simulate_processor_sharing`:
//!   kvx's tiny engine on one host): every computing instance runs at
//!   min(1, cores / k) while k compute, the cores changing over time; an
//!   instance that starts computing after being idle may first run a
//!   wake-up burst at a whole core (`core_timeline::wake_burst_s`).
//!
//! Deterministic: the same inputs give the same report, bit for bit (events
//! at equal times are ordered by insertion). Single-threaded; call it from
//! several threads on different deployments to search in parallel.
//!
//! \code
//! namespace kp = kvx::disagg::planner;
//! auto report = kp::simulate(workload, model, hardware,
//!                            {.prefill_instances = 2, .decode_instances = 1, .dram_gb = 1000},
//!                            {.ttft_s = 2, .tpot_s = 0.1}).value();
//! report.slo_attainment;  // fraction of requests that met both targets
//! \endcode

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <limits>
#include <optional>
#include <queue>
#include <stdexcept>
#include <string>
#include <vector>

#include <kvx/cache/block_key.hpp>
#include <kvx/cache/eviction_policy.hpp>
#include <kvx/core/result.hpp>
#include <kvx/core/splitmix64.hpp>
#include <kvx/disagg/planner/block_cache.hpp>
#include <kvx/disagg/planner/deployment.hpp>
#include <kvx/disagg/planner/hardware.hpp>
#include <kvx/disagg/planner/model_shape.hpp>
#include <kvx/disagg/planner/workload.hpp>
#include <kvx/disagg/router.hpp>
#include <kvx/disagg/router_policy.hpp>

namespace kvx::disagg::planner {

//! What happened to one request.
struct request_result {
  enum class status : std::uint8_t { completed, rejected_ttft, rejected_tpot, no_instance };
  status outcome = status::no_instance;
  double arrival_s = 0;
  double first_token_s = 0;  //!< end of prefill
  double decode_start_s = 0; //!< joined a decode batch (its KV had arrived); = first_token_s for one-token answers
  double first_step_s = 0;   //!< its first decode step ended; = first_token_s for one-token answers
  double finish_s = 0;       //!< last output token
  std::uint32_t input_tokens = 0;
  std::uint32_t output_tokens = 0;
  std::uint32_t computed_tokens = 0;  //!< prompt tokens prefilled (the rest came from caches)
  std::uint32_t local_tokens = 0;     //!< prefix found in the prefill instance's HBM
  std::uint32_t peer_tokens = 0;      //!< fetched from another instance's HBM
  std::uint32_t dram_tokens = 0;      //!< fetched from the pool's DRAM tier
  std::uint32_t ssd_tokens = 0;       //!< fetched from the pool's SSD tier
  instance_id prefill = 0;
  instance_id decode = 0;

  [[nodiscard]] bool completed() const noexcept { return outcome == status::completed; }
  //! Infinite for a rejected request.
  [[nodiscard]] double ttft_s() const noexcept {
    return completed() ? first_token_s - arrival_s : std::numeric_limits<double>::infinity();
  }
  //! Mean time per output token after the first; 0 for a one-token answer.
  [[nodiscard]] double tpot_s() const noexcept {
    if (!completed()) return std::numeric_limits<double>::infinity();
    return output_tokens > 1 ? (finish_s - first_token_s) / (output_tokens - 1) : 0.0;
  }
};

//! Nearest-rank percentile (`p` in (0, 100]) of `v`; sorts `v`.
[[nodiscard]] inline double percentile(std::vector<double>& v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const auto rank = static_cast<std::size_t>(std::ceil(p / 100.0 * static_cast<double>(v.size())));
  return v[std::min(v.size(), std::max<std::size_t>(rank, 1)) - 1];
}

//! Everything one simulation measured.
struct sim_report {
  std::string label;
  std::vector<request_result> requests;  //!< in arrival order
  std::uint64_t completed = 0, rejected = 0;
  double makespan_s = 0;  //!< first arrival to last finish

  // Latency (rejected requests count as infinitely late).
  double ttft_p50_s = 0, ttft_p90_s = 0, ttft_p99_s = 0, ttft_target_pct_s = 0;
  double tpot_p50_s = 0, tpot_p90_s = 0, tpot_p99_s = 0, tpot_target_pct_s = 0;
  double slo_attainment = 0;     //!< fraction of all requests meeting both targets
  bool meets_slo = false;        //!< both percentiles within target
  double goodput_rps = 0;        //!< requests meeting both targets per second of makespan
  double goodput_tokens_per_s = 0;
  std::uint64_t good_input_tokens = 0, good_output_tokens = 0;

  // Where prompt tokens of completed requests came from.
  std::uint64_t input_tokens = 0, computed_tokens = 0, local_tokens = 0, peer_tokens = 0, dram_tokens = 0,
                ssd_tokens = 0;
  [[nodiscard]] double share(std::uint64_t part) const noexcept {
    return input_tokens ? static_cast<double>(part) / static_cast<double>(input_tokens) : 0.0;
  }

  // Links and busy time.
  double kv_transfer_bytes = 0;   //!< prefill to decode
  double pool_read_bytes = 0;     //!< pool DRAM and SSD to prefill instances
  double peer_read_bytes = 0;
  double pool_write_bytes = 0;    //!< prefill instances to the pool
  double ssd_read_bytes = 0;
  double network_utilisation = 0; //!< all network bytes / (instances * NIC speed * makespan)
  double ssd_utilisation = 0;     //!< SSD reads / (SSD speed * makespan)
  double prefill_busy_s = 0;      //!< summed over instances
  double decode_busy_s = 0;
  double prefill_utilisation = 0; //!< prefill busy time / (prefill-capable instances * makespan)
  double decode_utilisation = 0;
  //! prefill_work_s[k] (decode_work_s[k]): instance-seconds of prefill
  //! (decode-only) iterations run while exactly k instances were computing;
  //! what `simulate_shared_cores` weighs.
  std::vector<double> prefill_work_s, decode_work_s;

  // Cost.
  double cost_per_hour = 0;
  double cost_usd = 0;                     //!< over the makespan
  double usd_per_m_input_tokens = 0;       //!< per million good input tokens
  double usd_per_m_output_tokens = 0;      //!< per million good output tokens
  std::uint64_t events = 0;
};

//! CPU cores free for a deployment's instances over time, piecewise
//! constant: `cores[i]` from `from_s[i]` (simulated seconds) until the next
//! change; `cores[0]` before `from_s[0]` too. What the instances of kvx's tiny
//! engine on one host share with each other (kvx_pd_demo), sampled while it ran.
//!
//! The kernel's scheduler does not share a core evenly from the first
//! microsecond: a process that wakes after sleeping preempts and runs
//! alone for a while (EEVDF's lag credit and time slice), then gets its
//! share. `wake_burst_s` is that while, in wall seconds, at
//! `wake_burst_speed` of a core (what `kvx-plan` measures with a thread that
//! sleeps, wakes and computes on a core another thread keeps busy); 0
//! models no burst.
//!
//! `run_queues` models the scheduler's per-core run queues instead of fluid
//! sharing (0: fluid, every computing instance at min(1, cores / k)). With N
//! queues (the host's cores), an instance that starts computing joins the
//! queue with the fewest instances (its previous one on a tie), a queue more
//! than one instance lighter than another pulls the last instance placed
//! there (idle balancing), and the instances on one queue share its core.
//! Why: with two prefills computing on two cores, a decode that wakes shares
//! one core with one of them (half a core, what kvx_pd_demo's decodes
//! measured) instead of two thirds of each; fluid sharing under-predicts its
//! TPOT. The other processes' load (N less the cores free) runs first on the
//! cores no instance computes on, a core's worth each; what is left of it
//! ("homeless", h cores) is spread evenly over the instances' cores, and the
//! instances' rates are (1 - min(1, h)) times that per-core share plus
//! min(1, h) times fluid sharing: a busy process with no core of its own is
//! moved between the instances' cores by the balancer, and the instances
//! with it, so their sharing turns fluid (kvx_pd_demo beside a busy loop:
//! docs/benchmarks/planner.md). Either way the instances together get the
//! cores free, never more. Bursts are not applied then.
struct core_timeline {
  std::vector<double> from_s;
  std::vector<double> cores;
  double wake_burst_s = 0;
  double wake_burst_speed = 1;
  std::uint32_t run_queues = 0;

  [[nodiscard]] static core_timeline constant(double c) { return {{0.0}, {c}}; }
  [[nodiscard]] result<void> validate() const {
    if (from_s.empty() || from_s.size() != cores.size())
      return error{errc::invalid_argument, "core_timeline: needs as many change times as core counts, at least one"};
    if (!(wake_burst_s >= 0) || !std::isfinite(wake_burst_s))
      return error{errc::invalid_argument, "core_timeline: wake_burst_s must be finite and >= 0"};
    if (!(wake_burst_speed > 0 && wake_burst_speed <= 1))
      return error{errc::invalid_argument, "core_timeline: wake_burst_speed must be in (0, 1]"};
    if (run_queues > 0 && wake_burst_s > 0)
      return error{errc::invalid_argument, "core_timeline: wake_burst_s models fluid sharing; set run_queues to 0 with it"};
    for (std::size_t i = 0; i < cores.size(); ++i) {
      if (!(cores[i] > 0) || !std::isfinite(cores[i]) || !std::isfinite(from_s[i]))
        return error{errc::invalid_argument, "core_timeline: core count " + std::to_string(i) + " is not positive and finite"};
      if (i > 0 && !(from_s[i] > from_s[i - 1]))
        return error{errc::invalid_argument, "core_timeline: change times must increase (at " + std::to_string(i) + ")"};
    }
    return {};
  }
  //! The cores free at time `t`.
  [[nodiscard]] double at(double t) const noexcept {
    const auto it = std::upper_bound(from_s.begin(), from_s.end(), t);
    return cores[it == from_s.begin() ? 0 : static_cast<std::size_t>(it - from_s.begin()) - 1];
  }
};

namespace detail {

inline constexpr std::uint32_t none = UINT32_MAX;
inline constexpr double max_cache_blocks = 268435456;  // 2^28

template <class Policy>
class simulation {
 public:
  simulation(const workload& w, const model_shape& m, const hardware& hw, const deployment& d, const slo_target& s,
             const core_timeline* cpu = nullptr)
      : w_(w), m_(m), hw_(hw), d_(d), slo_(s), kvb_(static_cast<double>(m.kv_bytes_per_token())),
        block_bytes_(kvb_ * w.block_tokens()), cpu_(cpu) {}

  result<sim_report> run() {
    KVX_TRY(setup());
    std::size_t next = 0;
    const std::uint32_t closed = w_.concurrency();
    // Closed loop: the next request arrives as soon as fewer than `closed`
    // are in flight (at the first timestamp for the first ones).
    auto next_arrival = [&] {
      if (closed == 0) return w_[next].arrival_s;
      return in_flight_ < closed ? std::max(now_, w_[0].arrival_s) : std::numeric_limits<double>::infinity();
    };
    while (next < w_.size() || !events_.empty()) {
      const double t_arrive = next < w_.size() ? next_arrival() : std::numeric_limits<double>::infinity();
      if (!events_.empty() && events_.top().t <= t_arrive) {
        const event e = events_.top();
        events_.pop();
        advance(e.t);
        if (e.kind == event_kind::iteration_end)
          iteration_end(e.a, e.b);
        else if (e.kind == event_kind::kv_arrive)
          kv_arrive(e.a, e.b);
      } else if (std::isfinite(t_arrive)) {
        advance(t_arrive);
        ++in_flight_;
        arrival(static_cast<std::uint32_t>(next++));
      } else {
        throw std::logic_error("kvx::planner::simulate: nothing in flight and no arrival");
      }
      reshare();
      ++report_.events;
    }
    finish_report();
    return std::move(report_);
  }

 private:
  enum class event_kind : std::uint8_t { iteration_end, kv_arrive, cores_change };
  struct event {
    double t;
    std::uint64_t seq;
    event_kind kind;
    std::uint32_t a, b;
    bool operator>(const event& o) const noexcept { return t != o.t ? t > o.t : seq > o.seq; }
  };
  struct member {
    std::uint32_t req;
    std::uint32_t remaining;
    bool first_step = true;  // its first decode step is this iteration's first
  };
  struct pin {
    std::uint32_t cache;  // instance id, or dram_id_ / ssd_id_
    std::uint32_t block;
  };
  struct req_state {
    std::uint32_t compute = 0;     // tokens to prefill
    std::uint32_t cached = 0;      // tokens already there or fetched before computing
    double fetch_s = 0;
    std::vector<pin> pins;
  };
  struct instance {
    bool prefills = false, decodes = false;
    block_cache hbm;
    std::deque<std::uint32_t> prefill_q;
    std::uint64_t queued_tokens = 0;  // prefill tokens not yet computed, queue and current
    std::uint32_t pf_req = none;
    std::uint32_t pf_done = 0;
    std::deque<std::uint32_t> decode_wait;
    std::vector<member> batch;
    double batch_ctx = 0;             // KV tokens of the batch
    double reserved = 0;              // prompt + output tokens reserved by the batch
    std::uint64_t assigned = 0;       // requests routed here for decode, not finished
    std::uint64_t assigned_tokens = 0;
    // The iteration in flight. Its work is in seconds on a core of its own;
    // it progresses at `rate` (1 unless cores are shared).
    bool busy = false;
    double rate = 1;
    double burst_end = 0;             // until then a wake-up burst (sharing cores)
    std::int32_t queue = -1;          // per-core run queues: the one it computes on (-1: none)
    std::int32_t last_queue = -1;     // the one it last computed on
    std::uint64_t placed = 0;         // when it joined `queue` (a sequence number)
    std::uint32_t version = 0;
    double it_end = 0;
    double it_work = 0;               // work to its end
    double it_done = 0, it_upd = 0;   // work done by time it_upd
    std::uint32_t it_steps = 0;       // decode steps in it
    double it_a = 0, it_c = 0;        // first step's work, growth per step
    std::uint32_t it_chunk = 0;       // prefill tokens in it
    double it_prefill_s = 0;
    double nic_free = 0;
  };

  result<void> setup() {
    KVX_TRY(d_.validate(hw_));
    KVX_TRY(slo_.validate());
    const bool colo = d_.mode == serving_mode::colocated;
    const std::uint32_t n = d_.instances();
    // A cache holds at most 2^28 blocks: more would not fit a host's memory, and the count must fit a size_t.
    auto blocks = [&](double gb, const char* field) -> result<std::size_t> {
      const double n = gb * 1e9 / block_bytes_;
      if (!(n >= 0 && n <= max_cache_blocks))
        return error{errc::invalid_argument, "deployment '" + d_.label() + "': " + field + " holds more than " +
                                                 std::to_string(static_cast<std::uint64_t>(max_cache_blocks)) + " blocks"};
      return static_cast<std::size_t>(n);
    };
    auto hbm_blocks = blocks(d_.hbm_cache_gb, "hbm_cache_gb");
    KVX_TRY(hbm_blocks);
    auto dram_blocks = blocks(d_.dram_gb, "dram_gb");
    KVX_TRY(dram_blocks);
    auto ssd_blocks = blocks(d_.ssd_gb, "ssd_gb");
    KVX_TRY(ssd_blocks);
    kv_capacity_tokens_ = (hw_.kv_capacity_bytes - d_.hbm_cache_gb * 1e9 * (colo ? 1 : 0)) / kvb_;
    for (std::uint32_t i = 0; i < n; ++i) {
      instance in;
      in.prefills = colo || i < d_.prefill_instances;
      in.decodes = colo || i >= d_.prefill_instances;
      if (in.prefills) {
        auto c = block_cache::make(d_.eviction, *hbm_blocks);
        if (!c) return c.error();
        in.hbm = std::move(*c);
      }
      instance_spec spec{.name = (colo ? "colocated-" : in.prefills ? "prefill-" : "decode-") + std::to_string(i),
                         .role = colo ? instance_role::both : in.prefills ? instance_role::prefill : instance_role::decode,
                         .prefill_tokens_per_s = hw_.prefill.tokens_per_s,
                         .decode_step_s = hw_.decode.step_s,
                         .decode_s_per_token = hw_.decode.s_per_token,
                         .fetch_bytes_per_s = hw_.network_bytes_per_s};
      auto id = router_.add_instance(std::move(spec));
      if (!id) return id.error();
      instances_.push_back(std::move(in));
    }
    dram_id_ = n;
    ssd_id_ = n + 1;
    auto dram = block_cache::make(d_.eviction, *dram_blocks);
    if (!dram) return dram.error();
    dram_ = std::move(*dram);
    auto ssd = block_cache::make(d_.eviction, *ssd_blocks);
    if (!ssd) return ssd.error();
    ssd_ = std::move(*ssd);
    states_.resize(w_.size());
    prefill_factor_ = spread_factors(hw_.prefill.cv, 0);
    decode_factor_ = spread_factors(hw_.decode.cv, 1);
    report_.requests.resize(w_.size());
    report_.label = d_.label();
    if (cpu_) {
      KVX_TRY(cpu_->validate());
      for (double t : cpu_->from_s)
        if (t > 0) push(t, event_kind::cores_change, 0, 0);
    }
    return {};
  }

  // Sharing cores, every computing instance runs at min(1, cores / k) of a
  // core's speed, k of them computing (processor sharing), except those in
  // a wake-up burst: they run at the burst's speed and the others share
  // what is left of the cores (nothing, while the bursts take more). After
  // anything that changed k, the cores or a burst, iterations in flight are
  // rescheduled.
  void reshare() {
    if (!cpu_) return;
    if (cpu_->run_queues > 0) return reshare_run_queues();
    std::uint32_t bursting = 0;
    for (const auto& in : instances_) bursting += in.busy && now_ < in.burst_end;
    const double burst_rate = cpu_->wake_burst_speed;
    const double left = std::max(0.0, cpu_->at(now_) - bursting * burst_rate);
    const double shared = std::min(1.0, left / std::max(1U, busy_ - bursting));
    for (std::uint32_t i = 0; i < instances_.size(); ++i) {
      auto& in = instances_[i];
      if (!in.busy) continue;
      const double rate = now_ < in.burst_end ? burst_rate : shared;
      if (rate == in.rate) continue;
      progress(in);
      in.rate = rate;
      schedule(i);
    }
  }
  // Per-core run queues (core_timeline::run_queues): places the instances
  // that started computing, balances, and sets each one's rate.
  void reshare_run_queues() {
    const std::uint32_t n = cpu_->run_queues;
    queue_load_.assign(n, 0.0);  // instances per queue
    for (auto& in : instances_) {
      if (!in.busy) in.queue = -1;
      if (in.queue >= 0) queue_load_[static_cast<std::uint32_t>(in.queue)] += 1;
    }
    auto least = [&] {
      return static_cast<std::uint32_t>(std::min_element(queue_load_.begin(), queue_load_.end()) - queue_load_.begin());
    };
    for (auto& in : instances_) {
      if (!in.busy || in.queue >= 0) continue;
      std::uint32_t q = least();
      if (in.last_queue >= 0 && queue_load_[static_cast<std::uint32_t>(in.last_queue)] <= queue_load_[q])
        q = static_cast<std::uint32_t>(in.last_queue);
      in.queue = in.last_queue = static_cast<std::int32_t>(q);
      in.placed = ++placements_;
      queue_load_[q] += 1;
    }
    for (;;) {  // idle balancing: a queue more than one task lighter pulls the last one placed on the heaviest
      const auto most = static_cast<std::uint32_t>(std::max_element(queue_load_.begin(), queue_load_.end()) - queue_load_.begin());
      const std::uint32_t to = least();
      instance* last = nullptr;
      for (auto& in : instances_)
        if (in.queue == static_cast<std::int32_t>(most) && (!last || in.placed > last->placed)) last = &in;
      if (!last || queue_load_[most] - queue_load_[to] <= 1) break;
      last->queue = last->last_queue = static_cast<std::int32_t>(to);
      last->placed = ++placements_;
      queue_load_[most] -= 1;
      queue_load_[to] += 1;
    }
    // The other processes' load (cores less the cores free) runs first on
    // the cores no instance computes on, a core's worth each. What is left
    // of it has no core of its own: the balancer keeps moving it between
    // the instances' cores, and the instances with it, so the sharing turns
    // fluid: the instances' rates mix their per-core share of the cores the
    // load leaves (spread evenly over their cores) with fluid sharing, in
    // proportion to that homeless load (a core's worth or more: fluid).
    // Both conserve the cores free, so the instances never get more.
    const auto idle = static_cast<std::uint32_t>(std::count(queue_load_.begin(), queue_load_.end(), 0.0));
    const double cores_free = cpu_->at(now_);
    const double homeless = std::max(0.0, n - cores_free - idle);
    const double core = idle < n ? std::max(0.0, 1.0 - homeless / (n - idle)) : 1.0;
    const double mix = std::min(1.0, homeless);
    const double fluid = std::min(1.0, cores_free / std::max(1U, busy_));
    for (std::uint32_t i = 0; i < instances_.size(); ++i) {
      auto& in = instances_[i];
      if (!in.busy) continue;
      // A queue's instances share what the homeless load leaves of its core.
      const double per_core = core / queue_load_[static_cast<std::uint32_t>(in.queue)];
      const double rate = (1 - mix) * per_core + mix * fluid;
      if (rate == in.rate) continue;
      progress(in);
      in.rate = rate;
      schedule(i);
    }
  }
  // (Re)schedules the end of `i`'s iteration at its rate; none while it
  // gets no CPU (a later reshare schedules it).
  void schedule(std::uint32_t i) {
    auto& in = instances_[i];
    ++in.version;
    if (in.rate <= 0) return;
    in.it_end = now_ + std::max(0.0, in.it_work - in.it_done) / in.rate;
    push(in.it_end, event_kind::iteration_end, i, in.version);
  }
  // Brings `in`'s work done up to now at its rate, noting the end of any
  // member's first decode step on the way.
  void progress(instance& in) {
    const double done = in.it_done + (now_ - in.it_upd) * in.rate;
    const double first = in.it_chunk > 0 ? in.it_prefill_s + in.it_a : in.it_a;
    if (in.it_steps > 0 && in.it_done < first && done >= first)
      for (auto& mb : in.batch)
        if (mb.first_step) {
          report_.requests[mb.req].first_step_s = in.it_upd + (first - in.it_done) / in.rate;
          mb.first_step = false;
        }
    in.it_done = done;
    in.it_upd = now_;
  }

  void advance(double t) {
    if (t < now_) throw std::logic_error("kvx::planner::simulate: an event is older than the clock");
    if (t > now_ && busy_ > 0) {
      const std::size_t k = busy_prefill_ + busy_decode_;
      if (report_.prefill_work_s.size() <= k) {
        report_.prefill_work_s.resize(k + 1, 0.0);
        report_.decode_work_s.resize(k + 1, 0.0);
      }
      report_.prefill_work_s[k] += (t - now_) * busy_prefill_;
      report_.decode_work_s[k] += (t - now_) * busy_decode_;
    }
    now_ = t;
  }
  // A request left the system (finished or rejected): a closed loop sends the next.
  void left() { --in_flight_; }
  void push(double t, event_kind k, std::uint32_t a, std::uint32_t b) { events_.push({t, seq_++, k, a, b}); }

  block_cache& cache_of(std::uint32_t id) {
    return id == dram_id_ ? dram_ : id == ssd_id_ ? ssd_ : instances_[id].hbm;
  }

  // ---- arrival and routing ----------------------------------------------

  void arrival(std::uint32_t r) {
    const auto& q = w_[r];
    auto& res = report_.requests[r];
    res.arrival_s = w_.concurrency() ? now_ : q.arrival_s;
    res.input_tokens = q.input_tokens;
    res.output_tokens = q.output_tokens;
    for (instance_id i = 0; i < instances_.size(); ++i) {
      const auto& in = instances_[i];
      (void)router_.update_load(
          i, instance_load{.queued_requests = static_cast<std::uint32_t>(in.prefill_q.size() + (in.pf_req != none)),
                           .queued_tokens = in.queued_tokens,
                           .running_requests = static_cast<std::uint32_t>(in.assigned),
                           .running_tokens = in.assigned_tokens});
    }
    const auto keys = w_.full_keys(r);
    const routing_request rq{.keys = keys,
                             .prompt_tokens = q.input_tokens,
                             .block_tokens = w_.block_tokens(),
                             .kv_bytes_per_token = m_.kv_bytes_per_token()};
    const auto dec = router_.route(rq, d_.early_rejection ? slo{slo_.ttft_s, slo_.tpot_s} : slo{});
    using oc = route_decision::outcome;
    if (dec.status != oc::accepted) {
      res.outcome = dec.status == oc::rejected_ttft   ? request_result::status::rejected_ttft
                    : dec.status == oc::rejected_tpot ? request_result::status::rejected_tpot
                                                      : request_result::status::no_instance;
      left();
      return;
    }
    // Colocated, a request decodes where it was prefilled; the router's TPOT
    // check looked at its own (least loaded) decode pick, an optimistic bound.
    res.prefill = dec.prefill;
    res.decode = d_.mode == serving_mode::colocated ? dec.prefill : dec.decode;
    auto& st = states_[r];
    const std::uint32_t bt = w_.block_tokens();
    // The local prefix (the router's index mirrors the caches exactly).
    std::uint32_t local_blocks = 0;
    auto& hbm = instances_[dec.prefill].hbm;
    while (local_blocks < keys.size() && hbm.contains(keys[local_blocks])) ++local_blocks;
    for (std::uint32_t j = 0; j < local_blocks; ++j) {
      hbm.pin(keys[j]);
      st.pins.push_back({dec.prefill, j});
    }
    res.local_tokens = dec.cached_tokens;
    const std::uint32_t have = dec.cached_tokens + dec.fetch_tokens;
    double fetch_s = 0;
    for (std::uint32_t j = local_blocks; j < keys.size() && j * bt < have; ++j) {
      const std::uint32_t tokens = std::min((j + 1) * bt, have) - std::max(j * bt, dec.cached_tokens);
      const double bytes = tokens * kvb_;
      std::uint32_t where;
      if (dec.fetch_from != pool_location) {
        where = dec.fetch_from;
        res.peer_tokens += tokens;
        report_.peer_read_bytes += bytes;
        fetch_s += bytes / hw_.network_bytes_per_s;
      } else if (dram_.contains(keys[j])) {
        where = dram_id_;
        res.dram_tokens += tokens;
        report_.pool_read_bytes += bytes;
        fetch_s += bytes / std::min(hw_.dram_bytes_per_s, hw_.network_bytes_per_s);
      } else {
        where = ssd_id_;
        res.ssd_tokens += tokens;
        report_.pool_read_bytes += bytes;
        report_.ssd_read_bytes += bytes;
        fetch_s += bytes / std::min(hw_.ssd_bytes_per_s, hw_.network_bytes_per_s);
      }
      auto& c = cache_of(where);
      if (!c.contains(keys[j]))
        throw std::logic_error("kvx::planner::simulate: the router's index names a block no tier holds");
      c.pin(keys[j]);
      st.pins.push_back({where, j});
    }
    st.cached = have;
    st.compute = q.input_tokens - have;
    st.fetch_s = fetch_s;
    res.computed_tokens = st.compute;
    auto& d = instances_[res.decode];
    ++d.assigned;
    d.assigned_tokens += q.input_tokens;
    auto& p = instances_[dec.prefill];
    p.prefill_q.push_back(r);
    p.queued_tokens += st.compute;
    work_arrived(dec.prefill);
  }

  // ---- instance iterations ------------------------------------------------

  void work_arrived(std::uint32_t i) {
    auto& in = instances_[i];
    if (!in.busy) {
      // It was idle: woken, it gets the scheduler's wake-up burst.
      if (cpu_ && cpu_->wake_burst_s > 0) {
        in.burst_end = now_ + cpu_->wake_burst_s;
        push(in.burst_end, event_kind::cores_change, 0, 0);
      }
      start_iteration(i);
      return;
    }
    // A multi-step decode iteration ends early at the step boundary that
    // follows now, so that the new work joins there.
    if (in.it_chunk != 0 || in.it_steps <= 1) return;
    progress(in);
    const std::uint32_t m = step_containing(in, in.it_done);
    if (m >= in.it_steps) return;
    in.it_steps = m;
    in.it_work = step_work(in, m);
    schedule(i);
  }

  // Work from the iteration's start to the end of its step m.
  static double step_work(const instance& in, std::uint32_t m) {
    const double md = m;
    return md * in.it_a + in.it_c * md * (md - 1) / 2;
  }
  // The smallest m >= 1 whose step ends at or after `dt` of work.
  static std::uint32_t step_containing(const instance& in, double dt) {
    double guess;
    if (in.it_c <= 0) {
      guess = std::ceil(dt / in.it_a);
    } else {
      const double b = in.it_a - in.it_c / 2;
      guess = std::ceil((-b + std::sqrt(b * b + 2 * in.it_c * dt)) / in.it_c);
    }
    auto m = static_cast<std::uint32_t>(std::clamp(guess, 1.0, static_cast<double>(in.it_steps)));
    while (m > 1 && step_work(in, m - 1) >= dt) --m;
    while (m < in.it_steps && step_work(in, m) < dt) ++m;
    return m;
  }

  // hardware::prefill.cv / decode.cv: one factor per request, log-normal
  // with mean 1 and that coefficient of variation, drawn from the request's
  // index (and the kind of work) so that every run draws the same.
  std::vector<double> spread_factors(double cv, std::uint64_t kind) const {
    std::vector<double> f(w_.size(), 1.0);
    if (!(cv > 0)) return f;
    const double var = std::log1p(cv * cv), sigma = std::sqrt(var);
    for (std::size_t r = 0; r < f.size(); ++r) {
      std::uint64_t state = (static_cast<std::uint64_t>(r) << 1 | kind) * 0xD1B54A32D192ED03ULL;
      auto uniform = [&] { return (static_cast<double>(splitmix64_next(state) >> 11) + 0.5) * 0x1p-53; };
      const double u1 = uniform(), u2 = uniform();
      const double z = std::sqrt(-2 * std::log(u1)) * std::cos(6.283185307179586 * u2);
      f[r] = std::exp(sigma * z - var / 2);
    }
    return f;
  }
  // The decode factor of a batch: its members' mean.
  double batch_factor(const instance& in) const {
    if (in.batch.empty()) return 1.0;
    double sum = 0;
    for (const auto& mb : in.batch) sum += decode_factor_[mb.req];
    return sum / static_cast<double>(in.batch.size());
  }

  void start_iteration(std::uint32_t i) {
    auto& in = instances_[i];
    if (in.busy) return;
    while (!in.decode_wait.empty()) {
      const std::uint32_t r = in.decode_wait.front();
      const double need = static_cast<double>(w_[r].input_tokens) + w_[r].output_tokens;
      const bool fits = in.batch.size() < hw_.decode.max_batch && in.reserved + need <= kv_capacity_tokens_;
      if (!fits && !in.batch.empty()) break;  // an oversized request still runs alone
      in.decode_wait.pop_front();
      report_.requests[r].decode_start_s = now_;
      in.batch.push_back({r, w_[r].output_tokens - 1});
      in.batch_ctx += w_[r].input_tokens;
      in.reserved += need;
    }
    const double batch = static_cast<double>(in.batch.size());
    in.it_done = 0;
    in.it_upd = now_;
    in.it_chunk = 0;
    in.it_prefill_s = 0;
    in.it_steps = 0;
    if (in.prefills && (in.pf_req != none || !in.prefill_q.empty())) {
      if (in.pf_req == none) {
        in.pf_req = in.prefill_q.front();
        in.prefill_q.pop_front();
        in.pf_done = 0;
      }
      const auto& st = states_[in.pf_req];
      const std::uint32_t left = st.compute - in.pf_done;
      in.it_chunk = in.decodes ? std::min(left, d_.chunk_tokens) : left;
      in.it_prefill_s = (in.pf_done == 0 ? st.fetch_s : 0.0) +
                        hw_.prefill.seconds(in.it_chunk, static_cast<double>(st.cached) + in.pf_done) *
                            prefill_factor_[in.pf_req];
      in.it_steps = in.batch.empty() ? 0 : 1;
      in.it_a = in.batch.empty() ? 0 : hw_.decode.step(batch, in.batch_ctx) * batch_factor(in);
      in.it_c = 0;
      in.it_work = in.it_prefill_s + in.it_a;
    } else if (!in.batch.empty()) {
      std::uint32_t steps = UINT32_MAX;
      for (const auto& mb : in.batch) steps = std::min(steps, mb.remaining);
      in.it_steps = steps;
      in.it_a = hw_.decode.step(batch, in.batch_ctx) * batch_factor(in);
      in.it_c = hw_.decode.s_per_token * batch * batch_factor(in);
      in.it_work = step_work(in, steps);
    } else {
      return;
    }
    if (!in.busy) {
      ++busy_;
      ++(in.it_chunk > 0 ? busy_prefill_ : busy_decode_);
    }
    in.busy = true;
    schedule(i);  // at its last rate; reshare() corrects it after this event
  }

  void iteration_end(std::uint32_t i, std::uint32_t version) {
    auto& in = instances_[i];
    if (!in.busy || version != in.version) return;  // superseded by a shorter or rescheduled one
    progress(in);
    in.busy = false;
    --busy_;
    --(in.it_chunk > 0 ? busy_prefill_ : busy_decode_);
    if (in.it_steps > 0) {
      const double n = in.it_steps;
      report_.decode_busy_s += in.it_chunk ? in.it_a : n * in.it_a + in.it_c * n * (n - 1) / 2;
      in.batch_ctx += n * static_cast<double>(in.batch.size());
      for (auto& mb : in.batch) {
        if (mb.first_step) report_.requests[mb.req].first_step_s = now_;  // a one-step iteration
        mb.first_step = false;
        mb.remaining -= in.it_steps;
        if (mb.remaining == 0) finish(i, mb.req, now_);
      }
      std::erase_if(in.batch, [](const member& mb) { return mb.remaining == 0; });
    }
    if (in.it_chunk > 0) {
      report_.prefill_busy_s += in.it_prefill_s;
      in.pf_done += in.it_chunk;
      in.queued_tokens -= in.it_chunk;
      if (in.pf_done == states_[in.pf_req].compute) {
        const std::uint32_t r = in.pf_req;
        in.pf_req = none;
        prefill_done(i, r);
      }
    }
    start_iteration(i);
  }

  void finish(std::uint32_t i, std::uint32_t r, double t) {
    auto& in = instances_[i];
    auto& res = report_.requests[r];
    res.finish_s = t;
    res.outcome = request_result::status::completed;
    left();
    const auto& q = w_[r];
    in.batch_ctx -= static_cast<double>(q.input_tokens) + (q.output_tokens - 1);
    in.reserved -= static_cast<double>(q.input_tokens) + q.output_tokens;
    --in.assigned;
    in.assigned_tokens -= q.input_tokens;
  }

  void prefill_done(std::uint32_t i, std::uint32_t r) {
    auto& res = report_.requests[r];
    res.first_token_s = now_;
    store_blocks(i, r);
    const auto& q = w_[r];
    if (q.output_tokens <= 1) {
      res.decode_start_s = now_;
      res.first_step_s = now_;
      res.finish_s = now_;
      res.outcome = request_result::status::completed;
      left();
      auto& d = instances_[res.decode];
      --d.assigned;
      d.assigned_tokens -= q.input_tokens;
      return;
    }
    if (res.decode == i) {
      instances_[i].decode_wait.push_back(r);
      return;  // the caller starts the next iteration
    }
    auto& p = instances_[i];
    const double bytes = q.input_tokens * kvb_;
    const double start = std::max(now_, p.nic_free);
    p.nic_free = start + bytes / hw_.network_bytes_per_s;
    report_.kv_transfer_bytes += bytes;
    push(p.nic_free, event_kind::kv_arrive, res.decode, r);
  }

  void kv_arrive(std::uint32_t d, std::uint32_t r) {
    instances_[d].decode_wait.push_back(r);
    work_arrived(d);
  }

  // ---- caches ------------------------------------------------------------

  cache::access_context ctx(std::uint32_t r, std::uint32_t j, std::span<const cache::block_key> keys) const {
    return {.now = w_.reference(r, j), .next_use = w_.next_use(r, j), .bytes = static_cast<std::uint64_t>(block_bytes_),
            .parent = j > 0 ? &keys[j - 1] : nullptr};
  }

  // The prefill on `i` has made every block of `r`: unpin what it read, keep
  // the blocks in `i`'s HBM and write them through to the pool.
  void store_blocks(std::uint32_t i, std::uint32_t r) {
    const auto keys = w_.full_keys(r);
    for (const auto& p : states_[r].pins) cache_of(p.cache).unpin(keys[p.block]);
    states_[r].pins.clear();
    states_[r].pins.shrink_to_fit();
    auto& hbm = instances_[i].hbm;
    if (hbm.capacity() > 0) {
      std::uint32_t held = 0;
      for (std::uint32_t j = 0; j < keys.size(); ++j) {
        const auto c = ctx(r, j, keys);
        if (hbm.contains(keys[j])) {
          hbm.touch(keys[j], c);
        } else {
          auto ins = hbm.insert(keys[j], c);
          if (ins.evicted) router_.on_evicted(i, std::span(&*ins.evicted, 1));
          if (!ins.inserted) break;  // a later block without its prefix is useless
          if (auto ok = router_.on_stored(i, keys.subspan(j, 1)); !ok) throw std::logic_error("kvx::planner::simulate: " + ok.error().message());
        }
        hbm.pin(keys[j]);  // a request never evicts its own earlier blocks
        ++held;
      }
      for (std::uint32_t j = 0; j < held; ++j) hbm.unpin(keys[j]);
    }
    if (dram_.capacity() == 0 && ssd_.capacity() == 0) return;
    // Unlike HBM, the pool may demote this request's own earlier blocks to
    // SSD to make room for its later ones, so they are not pinned here.
    block_cache& top = dram_.capacity() > 0 ? dram_ : ssd_;
    for (std::uint32_t j = 0; j < keys.size(); ++j) {
      const auto c = ctx(r, j, keys);
      const auto& k = keys[j];
      if (top.contains(k)) {
        top.touch(k, c);
      } else if (&top != &ssd_ && ssd_.contains(k)) {
        if (ssd_.pinned(k)) {
          ssd_.touch(k, c);
          continue;
        }
        ssd_.erase(k);  // promote: the pool keeps it, in DRAM now
        if (!pool_insert(k, c, /*was_pooled=*/true)) break;
      } else {
        report_.pool_write_bytes += block_bytes_;
        if (!pool_insert(k, c, /*was_pooled=*/false)) break;
      }
    }
  }

  // Puts `k` in the pool's top tier; a DRAM victim moves down to SSD.
  bool pool_insert(const cache::block_key& k, const cache::access_context& c, bool was_pooled) {
    block_cache& top = dram_.capacity() > 0 ? dram_ : ssd_;
    auto ins = top.insert(k, c);
    if (ins.evicted) {
      const cache::block_key v = *ins.evicted;
      bool kept = false;
      if (&top == &dram_ && ssd_.capacity() > 0) {
        auto down = ssd_.insert(v, {.now = c.now, .next_use = ins.evicted_next_use, .bytes = c.bytes, .parent = nullptr});
        if (down.evicted) router_.on_evicted(pool_location, std::span(&*down.evicted, 1));
        kept = down.inserted;
      }
      if (!kept) router_.on_evicted(pool_location, std::span(&v, 1));
    }
    if (!ins.inserted) {
      if (was_pooled) router_.on_evicted(pool_location, std::span(&k, 1));
      return false;
    }
    if (!was_pooled) (void)router_.on_stored(pool_location, std::span(&k, 1));  // the pool is always known
    return true;
  }

  // ---- summary -------------------------------------------------------------

  void finish_report() {
    auto& rep = report_;
    std::vector<double> ttft, tpot;
    ttft.reserve(w_.size());
    tpot.reserve(w_.size());
    double first = w_[0].arrival_s, last = first;
    double prefill_share_s = 0, decode_share_s = 0;
    for (const auto& r : rep.requests) {
      ttft.push_back(r.ttft_s());
      tpot.push_back(r.tpot_s());
      if (!r.completed()) {
        ++rep.rejected;
        continue;
      }
      ++rep.completed;
      last = std::max(last, r.finish_s);
      rep.input_tokens += r.input_tokens;
      rep.computed_tokens += r.computed_tokens;
      rep.local_tokens += r.local_tokens;
      rep.peer_tokens += r.peer_tokens;
      rep.dram_tokens += r.dram_tokens;
      rep.ssd_tokens += r.ssd_tokens;
      if (r.ttft_s() <= slo_.ttft_s && r.tpot_s() <= slo_.tpot_s) {
        rep.good_input_tokens += r.input_tokens;
        rep.good_output_tokens += r.output_tokens;
        rep.goodput_rps += 1;
      }
    }
    rep.makespan_s = std::max(last - first, 1e-9);
    rep.slo_attainment = rep.goodput_rps / static_cast<double>(w_.size());
    rep.goodput_rps /= rep.makespan_s;
    rep.goodput_tokens_per_s = static_cast<double>(rep.good_input_tokens + rep.good_output_tokens) / rep.makespan_s;
    rep.ttft_target_pct_s = percentile(ttft, slo_.ttft_percentile);
    rep.ttft_p50_s = percentile(ttft, 50);
    rep.ttft_p90_s = percentile(ttft, 90);
    rep.ttft_p99_s = percentile(ttft, 99);
    rep.tpot_target_pct_s = percentile(tpot, slo_.tpot_percentile);
    rep.tpot_p50_s = percentile(tpot, 50);
    rep.tpot_p90_s = percentile(tpot, 90);
    rep.tpot_p99_s = percentile(tpot, 99);
    rep.meets_slo = rep.ttft_target_pct_s <= slo_.ttft_s && rep.tpot_target_pct_s <= slo_.tpot_s;

    const double n = d_.instances();
    const double prefill_capable = d_.mode == serving_mode::colocated ? n : d_.prefill_instances;
    const double decode_capable = d_.mode == serving_mode::colocated ? n : d_.decode_instances;
    rep.prefill_utilisation = rep.prefill_busy_s / (prefill_capable * rep.makespan_s);
    rep.decode_utilisation = rep.decode_busy_s / (decode_capable * rep.makespan_s);
    rep.network_utilisation = (rep.kv_transfer_bytes + rep.pool_read_bytes - rep.ssd_read_bytes + rep.peer_read_bytes +
                               rep.pool_write_bytes) /
                              (n * hw_.network_bytes_per_s * rep.makespan_s);
    rep.ssd_utilisation = rep.ssd_read_bytes / (hw_.ssd_bytes_per_s * rep.makespan_s);

    // Cost: prefill instances and the pool serve input tokens, decode
    // instances output tokens; colocated instances split by busy time.
    rep.cost_per_hour = cost_per_hour(d_, hw_);
    const double hours = rep.makespan_s / 3600;
    rep.cost_usd = rep.cost_per_hour * hours;
    const double pool = (d_.dram_gb * hw_.dram_price_per_gb_hour + d_.ssd_gb * hw_.ssd_price_per_gb_hour) * hours;
    if (d_.mode == serving_mode::colocated) {
      const double inst = n * hw_.price_per_hour * hours;
      const double busy = rep.prefill_busy_s + rep.decode_busy_s;
      const double pf = busy > 0 ? rep.prefill_busy_s / busy : 0.5;
      prefill_share_s = inst * pf + pool;
      decode_share_s = inst * (1 - pf);
    } else {
      prefill_share_s = d_.prefill_instances * hw_.price_per_hour * hours + pool;
      decode_share_s = d_.decode_instances * hw_.price_per_hour * hours;
    }
    const double inf = std::numeric_limits<double>::infinity();
    rep.usd_per_m_input_tokens = rep.good_input_tokens ? prefill_share_s / (rep.good_input_tokens / 1e6) : inf;
    rep.usd_per_m_output_tokens = rep.good_output_tokens ? decode_share_s / (rep.good_output_tokens / 1e6) : inf;
  }

  const workload& w_;
  const model_shape& m_;
  const hardware& hw_;
  const deployment& d_;
  const slo_target& slo_;
  const double kvb_;
  const double block_bytes_;
  double kv_capacity_tokens_ = 0;
  router<Policy> router_{};
  std::vector<instance> instances_;
  const core_timeline* cpu_ = nullptr;  // null: a core per instance
  block_cache dram_, ssd_;
  std::uint32_t dram_id_ = 0, ssd_id_ = 0;
  std::vector<req_state> states_;
  std::priority_queue<event, std::vector<event>, std::greater<>> events_;
  std::uint64_t seq_ = 0;
  double now_ = 0;
  std::uint32_t in_flight_ = 0;  // arrived, not finished or rejected
  std::uint32_t busy_ = 0;       // instances with an iteration in flight
  std::uint32_t busy_prefill_ = 0, busy_decode_ = 0;  // of those, with prefill work and decode-only
  std::vector<double> queue_load_;  // per-core run queues: computing instances on each, plus other processes
  std::vector<double> prefill_factor_, decode_factor_;  // per request (hardware's cv)
  std::uint64_t placements_ = 0;
  sim_report report_;
};


}  // namespace detail

//! Simulates `d` serving `w`. Errors: an invalid deployment, SLO or eviction
//! policy name (`errc::invalid_argument`). Throws `std::logic_error` only if
//! a policy breaks its contract.
inline result<sim_report> simulate(const workload& w, const model_shape& m, const hardware& hw, const deployment& d,
                                   const slo_target& s, const core_timeline* cpu = nullptr) {
  KVX_TRY(m.validate());
  KVX_TRY(hw.validate());
  if (d.routing == "least_loaded") return detail::simulation<routing::least_loaded>(w, m, hw, d, s, cpu).run();
  if (d.routing == "round_robin") return detail::simulation<routing::round_robin>(w, m, hw, d, s, cpu).run();
  return detail::simulation<routing::cache_aware>(w, m, hw, d, s, cpu).run();
}

//! Simulates `d` when all its instances share the CPU cores `cpu` gives over
//! time (kvx's tiny engine on one host, as kvx_pd_demo runs it), where `hw`
//! is one instance's speed with a core to itself: processor sharing, event
//! by event. While k instances compute and c cores are free, each runs at
//! min(1, c / k) of that speed, so a decode step that overlaps two prefills
//! is slower than one that runs alone, and one that runs while other
//! processes take the machine slower still. Unlike `simulate_shared_cores`
//! (one mean slowdown per kind of work) it predicts the spread of TPOT, not
//! only its mean. With `cpu.run_queues` set, per-core placement instead of
//! fluid sharing (see `core_timeline`). Not modelled: CPU used outside the
//! instances' compute, the OS scheduler's time slices. Errors: those of
//! `simulate`, and an invalid `cpu` (`errc::invalid_argument`).
inline result<sim_report> simulate_processor_sharing(const workload& w, const model_shape& m, const hardware& hw,
                                                     const deployment& d, const slo_target& s, const core_timeline& cpu) {
  return simulate(w, m, hw, d, s, &cpu);
}

//! `hw` with its prefill running `prefill_factor` and its decode
//! `decode_factor` times slower; the links untouched.
[[nodiscard]] inline hardware slowed(hardware hw, double prefill_factor, double decode_factor) {
  hw.prefill.tokens_per_s /= prefill_factor;
  hw.prefill.overhead_s *= prefill_factor;
  hw.prefill.attention_s_per_pair *= prefill_factor;
  hw.decode.step_s *= decode_factor;
  hw.decode.s_per_seq *= decode_factor;
  hw.decode.s_per_token *= decode_factor;
  return hw;
}

//! The slowdown of work when instances share `cores` cores: work done while
//! k instances were computing ran max(1, k / cores) times slower (processor
//! sharing); `work_s[k]` weighs each k (sim_report::prefill_work_s, decode_work_s).
[[nodiscard]] inline double work_weighted_slowdown(const std::vector<double>& work_s, double cores) noexcept {
  double work = 0, stretched = 0;
  for (std::size_t k = 1; k < work_s.size(); ++k) {
    work += work_s[k];
    stretched += work_s[k] * std::max(1.0, static_cast<double>(k) / cores);
  }
  return work > 0 ? stretched / work : 1.0;
}

//! What `simulate_shared_cores` found.
struct shared_cores_report {
  sim_report report;             //!< the simulation at the slowdowns below
  double prefill_slowdown = 1;   //!< prefill ran this many times slower than `hw`
  double decode_slowdown = 1;    //!< decode steps ran this many times slower than `hw`
  unsigned iterations = 0;
};

//! Simulates `d` when all its instances share `cores` CPU cores (kvx's tiny
//! engine on one host, as kvx_pd_demo runs it), where `hw` is one instance's
//! speed with a core to itself. A mean-field model of processor sharing:
//! the simulation is rerun with prefill and decode each slowed by the
//! work-weighted slowdown the previous run's counts of computing instances
//! imply for that kind of work, until both factors are self-consistent
//! (within 0.2%, damped; at most `max_iterations` runs). Not modelled: CPU
//! used outside the instances' compute (a router, transport threads), per-core
//! placement, cache effects.
inline result<shared_cores_report> simulate_shared_cores(const workload& w, const model_shape& m, const hardware& hw,
                                                         const deployment& d, const slo_target& s, double cores,
                                                         unsigned max_iterations = 40) {
  if (!(cores > 0)) return error{errc::invalid_argument, "simulate_shared_cores: cores must be positive"};
  double fp = 1, fd = 1;
  for (unsigned it = 1;; ++it) {
    auto r = simulate(w, m, slowed(hw, fp, fd), d, s);
    if (!r) return r.error();
    const double gp = work_weighted_slowdown(r->prefill_work_s, cores);
    const double gd = work_weighted_slowdown(r->decode_work_s, cores);
    if ((std::abs(gp - fp) <= 0.002 * fp && std::abs(gd - fd) <= 0.002 * fd) || it >= max_iterations)
      return shared_cores_report{std::move(*r), fp, fd, it};
    fp = (fp + gp) / 2;
    fd = (fd + gd) / 2;
  }
}

}  // namespace kvx::disagg::planner
