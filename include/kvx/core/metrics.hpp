#pragma once
//! \file
//! Metrics: counters, gauges and latency histograms in a registry that renders
//! Prometheus text exposition format. Every layer registers its own metrics
//! (`kvx_transfer_bytes_total{transport="tcp"}`); the engine serves
//! `registry.prometheus_text()` on its `/metrics` endpoint.
//!
//! Updates are lock-free (relaxed atomics): metrics sit on hot paths.
//! Registration locks and returns a reference that stays valid for the
//! registry's lifetime; registering the same name and labels twice returns the
//! same metric.
//!
//! \code
//! auto& reg = kvx::metrics::default_registry();
//! auto& bytes = reg.counter("kvx_example_bytes_total", "Bytes moved", {{"op", "read"}});
//! bytes.add(4096);
//! auto& lat = reg.histogram("kvx_example_latency_seconds", "Op latency");
//! lat.observe(12e-6);
//! std::cout << reg.prometheus_text();
//! \endcode

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <kvx/core/log.hpp>

namespace kvx::metrics {

using labels = std::vector<std::pair<std::string, std::string>>;

//! Monotonic count.
class counter {
 public:
  void add(std::uint64_t n = 1) noexcept { value_.fetch_add(n, std::memory_order_relaxed); }
  [[nodiscard]] std::uint64_t value() const noexcept { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<std::uint64_t> value_{0};
};

//! A value that goes up and down.
class gauge {
 public:
  void set(double v) noexcept { value_.store(v, std::memory_order_relaxed); }
  void add(double d) noexcept {
    double cur = value_.load(std::memory_order_relaxed);
    while (!value_.compare_exchange_weak(cur, cur + d, std::memory_order_relaxed)) {
    }
  }
  [[nodiscard]] double value() const noexcept { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0.0};
};

//! Latency histogram in seconds over fixed log-spaced buckets: 1 us to about
//! 67 s, doubling. Quantiles are interpolated within a bucket (good to a
//! factor of two, which is what dashboards and SLO checks need).
class histogram {
 public:
  static constexpr std::size_t bucket_count = 27;
  //! Upper bound of bucket `i` in seconds: 1e-6 * 2^i.
  static constexpr double upper_bound(std::size_t i) noexcept { return 1e-6 * static_cast<double>(1ULL << i); }

  void observe(double seconds) noexcept {
    std::size_t i = 0;
    while (i < bucket_count && seconds > upper_bound(i)) ++i;
    buckets_[i].fetch_add(1, std::memory_order_relaxed);  // i == bucket_count is +Inf
    count_.fetch_add(1, std::memory_order_relaxed);
    double cur = sum_.load(std::memory_order_relaxed);
    while (!sum_.compare_exchange_weak(cur, cur + seconds, std::memory_order_relaxed)) {
    }
  }
  [[nodiscard]] std::uint64_t count() const noexcept { return count_.load(std::memory_order_relaxed); }
  [[nodiscard]] double sum() const noexcept { return sum_.load(std::memory_order_relaxed); }
  [[nodiscard]] std::uint64_t bucket(std::size_t i) const noexcept { return buckets_[i].load(std::memory_order_relaxed); }

  //! Approximate q-quantile (0..1) in seconds; 0 when empty.
  [[nodiscard]] double quantile(double q) const noexcept {
    const std::uint64_t total = count();
    if (total == 0) return 0.0;
    const double rank = std::clamp(q, 0.0, 1.0) * static_cast<double>(total);
    double seen = 0;
    for (std::size_t i = 0; i <= bucket_count; ++i) {
      const double in_bucket = static_cast<double>(bucket(i));
      if (in_bucket > 0 && seen + in_bucket >= rank) {
        const double lo = i == 0 ? 0.0 : upper_bound(i - 1);
        const double hi = i == bucket_count ? upper_bound(bucket_count - 1) * 2 : upper_bound(i);
        return lo + (hi - lo) * ((rank - seen) / in_bucket);
      }
      seen += in_bucket;
    }
    return upper_bound(bucket_count - 1);
  }

 private:
  std::array<std::atomic<std::uint64_t>, bucket_count + 1> buckets_{};
  std::atomic<std::uint64_t> count_{0};
  std::atomic<double> sum_{0.0};
};

//! Owns metrics by (name, labels) and renders them.
class registry {
 public:
  metrics::counter& counter(std::string_view name, std::string_view help, const labels& l = {}) {
    return get<metrics::counter>(name, help, l, kind::counter);
  }
  metrics::gauge& gauge(std::string_view name, std::string_view help, const labels& l = {}) {
    return get<metrics::gauge>(name, help, l, kind::gauge);
  }
  metrics::histogram& histogram(std::string_view name, std::string_view help, const labels& l = {}) {
    return get<metrics::histogram>(name, help, l, kind::histogram);
  }

  //! Prometheus text exposition format 0.0.4.
  [[nodiscard]] std::string prometheus_text() const {
    std::lock_guard lock(mutex_);
    std::ostringstream out;
    out.precision(17);
    for (const auto& [name, fam] : families_) {
      out << "# HELP " << name << ' ' << fam.help << '\n';
      out << "# TYPE " << name << ' ' << kind_name(fam.k) << '\n';
      for (const auto& [label_text, m] : fam.members) {
        switch (fam.k) {
          case kind::counter:
            out << name << braces(label_text) << ' ' << static_cast<const metrics::counter*>(m.get())->value() << '\n';
            break;
          case kind::gauge:
            out << name << braces(label_text) << ' ' << static_cast<const metrics::gauge*>(m.get())->value() << '\n';
            break;
          case kind::histogram: {
            const auto* h = static_cast<const metrics::histogram*>(m.get());
            std::uint64_t cumulative = 0;
            for (std::size_t i = 0; i <= metrics::histogram::bucket_count; ++i) {
              cumulative += h->bucket(i);
              std::ostringstream le;
              if (i == metrics::histogram::bucket_count)
                le << "+Inf";
              else
                le << metrics::histogram::upper_bound(i);
              out << name << "_bucket" << braces(join(label_text, "le=\"" + le.str() + "\"")) << ' ' << cumulative << '\n';
            }
            out << name << "_sum" << braces(label_text) << ' ' << h->sum() << '\n';
            out << name << "_count" << braces(label_text) << ' ' << h->count() << '\n';
            break;
          }
        }
      }
    }
    return out.str();
  }

 private:
  enum class kind { counter, gauge, histogram };
  struct erased_deleter {
    void (*destroy)(void*);
    void operator()(void* p) const { destroy(p); }
  };
  using erased = std::unique_ptr<void, erased_deleter>;
  struct family {
    kind k;
    std::string help;
    std::map<std::string, erased> members;
  };

  static const char* kind_name(kind k) {
    return k == kind::counter ? "counter" : k == kind::gauge ? "gauge" : "histogram";
  }
  static std::string escape(std::string_view v) {
    std::string out;
    for (char c : v) {
      if (c == '\\' || c == '"') out.push_back('\\');
      if (c == '\n') {
        out += "\\n";
        continue;
      }
      out.push_back(c);
    }
    return out;
  }
  static std::string render(const labels& l) {
    std::string out;
    for (const auto& [k, v] : l) out = join(out, k + "=\"" + escape(v) + "\"");
    return out;
  }
  static std::string join(const std::string& a, const std::string& b) { return a.empty() ? b : a + "," + b; }
  static std::string braces(const std::string& s) { return s.empty() ? s : "{" + s + "}"; }

  template <class M>
  M& get(std::string_view name, std::string_view help, const labels& l, kind k) {
    std::lock_guard lock(mutex_);
    auto [it, inserted] = families_.try_emplace(std::string(name), family{k, std::string(help), {}});
    if (!inserted && it->second.k != k) {
      // A name registered with two kinds is a programming error; keep the
      // first, say so, and hand back a detached metric so the caller still works.
      log(log_level::error, "kvx metrics: '", name, "' is already a ", kind_name(it->second.k), ", not a ",
          kind_name(k), "; updates to the second registration are not exported");
      orphans_.push_back(erased(new M(), erased_deleter{[](void* p) { delete static_cast<M*>(p); }}));
      return *static_cast<M*>(orphans_.back().get());
    }
    auto& slot = it->second.members[render(l)];
    if (!slot) slot = erased(new M(), erased_deleter{[](void* p) { delete static_cast<M*>(p); }});
    return *static_cast<M*>(slot.get());
  }

  mutable std::mutex mutex_;
  std::map<std::string, family, std::less<>> families_;
  std::vector<erased> orphans_;
};

//! The process-wide registry kvx components use unless given another.
inline registry& default_registry() {
  static registry r;
  return r;
}

}  // namespace kvx::metrics
