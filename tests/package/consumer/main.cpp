// A user's first program against an installed kvx.
#include <kvx/kvx.hpp>

#include <cstdio>

int main() {
  kvx::result<std::uint64_t> size = kvx::parse_size("64MiB");
  if (!size || *size != 64 * kvx::MiB) return 1;
  kvx::metrics::registry registry;
  registry.counter("kvx_consumer_total", "consumer test").add();
  if (registry.prometheus_text().find("kvx_consumer_total 1") == std::string::npos) return 1;
  std::printf("kvx %d.%d.%d consumed (ucx=%d)\n", kvx::version_major, kvx::version_minor, kvx::version_patch,
              KVX_WITH_UCX);
  return 0;
}
