// libFuzzer target: the store's control-plane path from raw bytes to a
// response — frame splitting, request parsing and the master handler acting
// on a real master state. Any input must yield well-formed responses (none
// for a notification) and leave the state consistent; crashes, leaks and UB
// are findings.
#include <kvx/store/master_handler.hpp>
#include <kvx/cache/eviction/lru.hpp>

#include <cstddef>
#include <cstdint>
#include <string_view>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  kvx::metrics::registry registry;
  kvx::store::master_config config;
  config.recover_objects = true;  // ledgers on heartbeats, checksums on commits, `recover` reports
  kvx::store::master_state<kvx::cache::eviction::lru> state(config, {}, registry);
  kvx::store::master_handler<kvx::store::master_state<kvx::cache::eviction::lru>> handler(state);
  auto now = kvx::store::clock::time_point{};
  (void)state.add_segment({"s0", "n0", 1 << 20, "dram"}, now);
  (void)state.add_segment({"s1", "n1", 1 << 20, "dram"}, now);
  // The input is a byte stream as a session would read it.
  kvx::store::protocol::frame_decoder decoder(1 << 16);
  decoder.feed(std::string_view(reinterpret_cast<const char*>(data), size));
  for (int frames = 0; frames < 64; ++frames) {
    auto frame = decoder.next();
    if (!frame || !*frame) break;
    auto response = handler.handle(**frame, now);
    // Null exactly for a well-formed notification ("reply": false); an object with "ok" otherwise.
    const auto request = kvx::store::protocol::parse_request(**frame);
    if (response.is_null() != (request && !request->reply)) __builtin_trap();
    if (!response.is_null() && (!response.is_object() || !response.contains("ok"))) __builtin_trap();
    now += std::chrono::milliseconds(700);
    handler.tick(now);
  }
  if (state.used_bytes() > state.capacity_bytes()) __builtin_trap();
  return 0;
}
