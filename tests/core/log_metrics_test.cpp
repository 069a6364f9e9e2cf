#include <kvx/core/log.hpp>
#include <kvx/core/metrics.hpp>

#include <gtest/gtest.h>

#include <thread>
#include <vector>

namespace {

TEST(Log, SinkReceivesMessagesAtOrAboveTheLevel) {
  std::vector<std::pair<kvx::log_level, std::string>> seen;
  kvx::set_log_sink([&](kvx::log_level l, std::string_view m) { seen.emplace_back(l, std::string(m)); });
  kvx::set_log_level(kvx::log_level::info);
  kvx::log(kvx::log_level::debug, "hidden");
  kvx::log(kvx::log_level::warn, "segment ", 3, " is ", 4.5, " full");
  kvx::set_log_sink({});
  kvx::set_log_level(kvx::log_level::warn);
  ASSERT_EQ(seen.size(), 1u);
  EXPECT_EQ(seen[0].first, kvx::log_level::warn);
  EXPECT_EQ(seen[0].second, "segment 3 is 4.5 full");
}

TEST(Metrics, SameNameAndLabelsIsTheSameMetric) {
  kvx::metrics::registry reg;
  auto& a = reg.counter("kvx_test_total", "help", {{"op", "read"}});
  auto& b = reg.counter("kvx_test_total", "help", {{"op", "read"}});
  auto& c = reg.counter("kvx_test_total", "help", {{"op", "write"}});
  EXPECT_EQ(&a, &b);
  EXPECT_NE(&a, &c);
}

TEST(Metrics, PrometheusTextHasHelpTypeAndValues) {
  kvx::metrics::registry reg;
  reg.counter("kvx_bytes_total", "Bytes moved", {{"transport", "tcp"}}).add(4096);
  reg.gauge("kvx_pool_used_bytes", "Pool bytes in use").set(12);
  auto& h = reg.histogram("kvx_latency_seconds", "Latency");
  h.observe(3e-6);
  h.observe(0.5);
  const auto text = reg.prometheus_text();
  EXPECT_NE(text.find("# HELP kvx_bytes_total Bytes moved\n# TYPE kvx_bytes_total counter\n"), std::string::npos);
  EXPECT_NE(text.find("kvx_bytes_total{transport=\"tcp\"} 4096\n"), std::string::npos) << text;
  EXPECT_NE(text.find("kvx_pool_used_bytes 12\n"), std::string::npos);
  EXPECT_NE(text.find("kvx_latency_seconds_bucket{le=\"+Inf\"} 2\n"), std::string::npos) << text;
  EXPECT_NE(text.find("kvx_latency_seconds_count 2\n"), std::string::npos);
}

TEST(Metrics, LabelValuesAreEscaped) {
  kvx::metrics::registry reg;
  reg.counter("kvx_t", "h", {{"peer", "a\"b\\c"}}).add();
  EXPECT_NE(reg.prometheus_text().find(R"(kvx_t{peer="a\"b\\c"} 1)"), std::string::npos);
}

TEST(Metrics, HistogramQuantilesLandInTheRightBucket) {
  kvx::metrics::histogram h;
  for (int i = 0; i < 99; ++i) h.observe(10e-6);
  h.observe(0.1);
  EXPECT_GT(h.quantile(0.5), 8e-6);
  EXPECT_LE(h.quantile(0.5), 16e-6);
  EXPECT_GT(h.quantile(1.0), 0.06);
  EXPECT_EQ(kvx::metrics::histogram{}.quantile(0.5), 0.0);
}

TEST(Metrics, ConcurrentUpdatesAreNotLost) {
  kvx::metrics::registry reg;
  auto& c = reg.counter("kvx_c", "h");
  auto& g = reg.gauge("kvx_g", "h");
  auto& h = reg.histogram("kvx_h", "h");
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&] {
      for (int i = 0; i < 10000; ++i) {
        c.add();
        g.add(1.0);
        h.observe(1e-5);
        if (i % 1000 == 0) (void)reg.prometheus_text();
      }
    });
  for (auto& t : threads) t.join();
  EXPECT_EQ(c.value(), 40000u);
  EXPECT_EQ(g.value(), 40000.0);
  EXPECT_EQ(h.count(), 40000u);
}

}  // namespace

namespace {
TEST(Metrics, ASecondKindForOneNameIsReportedAndNotExported) {
  std::vector<std::string> errors;
  kvx::set_log_sink([&](kvx::log_level l, std::string_view m) {
    if (l == kvx::log_level::error) errors.emplace_back(m);
  });
  kvx::metrics::registry reg;
  reg.counter("kvx_clash", "h").add(3);
  reg.gauge("kvx_clash", "h").set(99);
  kvx::set_log_sink({});
  ASSERT_EQ(errors.size(), 1u);
  EXPECT_NE(errors[0].find("'kvx_clash' is already a counter"), std::string::npos) << errors[0];
  EXPECT_NE(reg.prometheus_text().find("kvx_clash 3\n"), std::string::npos);
  EXPECT_EQ(reg.prometheus_text().find("99"), std::string::npos);
}
}  // namespace
