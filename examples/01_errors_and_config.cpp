// 01: kvx's error vocabulary and JSON config with validation.
//
// Every kvx call that can fail for reasons outside your control returns a
// kvx::result<T> (or completes with a std::error_code); config errors name
// the field that is wrong.
#include <kvx/kvx.hpp>

#include <cstdio>

struct pool_config {
  std::uint64_t capacity = 0;
  unsigned replicas = 1;
};

kvx::result<pool_config> read_pool_config(const kvx::config::view& v) {
  KVX_TRY(v.allow_only({"capacity", "replicas"}));
  auto capacity = v.required<kvx::config::bytes>("capacity");
  KVX_TRY(capacity);
  auto replicas = v.optional<unsigned>("replicas", 1);
  KVX_TRY(replicas);
  return pool_config{capacity->value, *replicas};
}

int main() {
  for (const char* text : {R"({"pool": {"capacity": "64GiB", "replicas": 2}})",
                           R"({"pool": {"capacity": "lots"}})", R"({"pool": {"capacity": 1, "replica": 2}})"}) {
    auto doc = kvx::config::parse(text);
    if (!doc) return 1;
    auto pool = kvx::config::view(*doc).child("pool");
    auto cfg = pool ? read_pool_config(*pool) : kvx::result<pool_config>(pool.error());
    if (cfg)
      std::printf("pool: %s, %u replicas\n", kvx::format_size(cfg->capacity).c_str(), cfg->replicas);
    else
      std::printf("rejected: %s\n", cfg.error().message().c_str());
  }
  return 0;
}
