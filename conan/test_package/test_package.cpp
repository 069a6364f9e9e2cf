// Builds and runs against the packaged headers: an error, a config read and a metric.
#include <kvx/kvx.hpp>

#include <cstdio>

int main() {
  auto doc = kvx::config::parse(R"({"slice": "1MiB"})");
  if (!doc) return 1;
  auto slice = kvx::config::view(*doc).required<kvx::config::bytes>("slice");
  if (!slice || slice->value != kvx::MiB) return 1;
  kvx::metrics::registry registry;
  registry.counter("kvx_test_package_total", "test_package ran").add();
  std::printf("kvx %d.%d.%d from the Conan package: %s\n", kvx::version_major, kvx::version_minor,
              kvx::version_patch, registry.prometheus_text().c_str());
  return 0;
}
