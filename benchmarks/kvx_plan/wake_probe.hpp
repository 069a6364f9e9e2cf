#pragma once
//! \file
//! `kvx::disagg::planner::probe_wake_burst`: how long a thread that wakes
//! after sleeping on a core another thread keeps busy runs at a whole core
//! before the kernel's scheduler preempts it, on this machine (the
//! planner's `core_timeline::wake_burst_s`).
//!
//! A busy machine does not slow a process that wakes evenly: the scheduler
//! (EEVDF, and CFS's sleeper credit before it) lets it preempt and run for
//! a slice, then shares the core. A tiny-engine instance that was waiting
//! for a request runs its first milliseconds at full speed, which is what
//! makes kvx_pd_demo's short decodes fast on a loaded machine.
//!
//! The probe: a thread pinned to one core with a second thread that spins
//! there all the time (so that the core is contended whatever else runs: a
//! free core would let the waker run on, which is the core timeline's
//! business, not the wake-up's); `trials` times it sleeps `sleep_s`, then
//! spins reading the wall clock and its CPU clock; the burst ends at the
//! first gap in which wall time ran more than `gap_s` ahead of CPU time
//! (preempted), or at `cap_s`. The result is the median burst, and the
//! thread's CPU time over wall time during the bursts. Blocks the calling
//! thread (its affinity untouched) for about trials * (sleep_s + burst);
//! uses a core meanwhile.
//!
//! \code
//! auto b = kvx::disagg::planner::probe_wake_burst({});
//! b.burst_s;  // e.g. 0.0014 on a loaded 2-core VM
//! \endcode

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <ctime>
#include <string>
#include <thread>
#include <vector>

#include <pthread.h>
#include <sched.h>

#include <kvx/core/result.hpp>

namespace kvx::disagg::planner {

struct wake_probe_options {
  std::uint32_t trials = 60;
  double sleep_s = 0.01;  //!< idle time before each wake (a demo instance waits a request)
  double cap_s = 0.02;    //!< a burst is not followed further than this
  double gap_s = 100e-6;  //!< wall time ahead of CPU time that counts as preempted
};

struct wake_burst {
  double burst_s = 0;       //!< median over the trials
  double p10_s = 0, p90_s = 0;
  double speed = 1;         //!< CPU time / wall time during the bursts
  std::uint32_t trials = 0;
  std::uint32_t capped = 0; //!< trials never preempted within cap_s
};

//! Errors: options out of range (`errc::invalid_argument`); the threads
//! cannot be pinned to one core (`errc::io_error`).
inline result<wake_burst> probe_wake_burst(const wake_probe_options& o) {
  if (o.trials == 0 || !(o.sleep_s >= 0 && o.sleep_s <= 1) || !(o.cap_s > o.gap_s && o.cap_s <= 1) || !(o.gap_s > 0))
    return error{errc::invalid_argument,
                 "probe_wake_burst: needs trials >= 1, sleep_s in [0, 1], 0 < gap_s < cap_s <= 1"};
  auto clock = [](clockid_t c) {
    timespec t{};
    ::clock_gettime(c, &t);
    return static_cast<double>(t.tv_sec) + static_cast<double>(t.tv_nsec) * 1e-9;
  };
  std::vector<double> bursts;
  double cpu = 0, wall = 0;
  wake_burst out;
  const int core = ::sched_getcpu();
  cpu_set_t one;
  CPU_ZERO(&one);
  CPU_SET(core < 0 ? 0 : core, &one);
  std::atomic<bool> stop{false};
  std::atomic<int> pin_error{0};
  auto pin = [&] {
    const int rc = ::pthread_setaffinity_np(::pthread_self(), sizeof one, &one);
    if (rc != 0) pin_error = rc;
  };
  std::thread competitor([&] {
    pin();
    while (!stop.load(std::memory_order_relaxed)) {
    }
  });
  std::thread prober([&] {
    pin();
    std::this_thread::sleep_for(std::chrono::milliseconds(20));  // the competitor is running
    for (std::uint32_t i = 0; i < o.trials && pin_error == 0; ++i) {
      std::this_thread::sleep_for(std::chrono::duration<double>(o.sleep_s));
      const double w0 = clock(CLOCK_MONOTONIC), c0 = clock(CLOCK_THREAD_CPUTIME_ID);
      double pw = w0, pc = c0;
      for (;;) {
        const double w = clock(CLOCK_MONOTONIC), c = clock(CLOCK_THREAD_CPUTIME_ID);
        if ((w - pw) - (c - pc) > o.gap_s) break;  // preempted between the two readings
        pw = w;
        pc = c;
        if (w - w0 >= o.cap_s) {
          ++out.capped;
          break;
        }
      }
      bursts.push_back(pw - w0);
      cpu += pc - c0;
      wall += pw - w0;
    }
  });
  prober.join();
  stop = true;
  competitor.join();
  if (pin_error != 0)
    return error{errc::io_error, std::string("probe_wake_burst: cannot pin the probe to one core: ") +
                                     std::strerror(pin_error)};
  std::sort(bursts.begin(), bursts.end());
  auto at = [&](double p) { return bursts[static_cast<std::size_t>(p * static_cast<double>(bursts.size() - 1) + 0.5)]; };
  out.burst_s = at(0.5);
  out.p10_s = at(0.1);
  out.p90_s = at(0.9);
  out.speed = wall > 0 ? std::clamp(cpu / wall, 1e-3, 1.0) : 1.0;
  out.trials = o.trials;
  return out;
}

}  // namespace kvx::disagg::planner
