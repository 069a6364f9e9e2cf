// libFuzzer target: the store's control-plane path from raw bytes to a
// response — frame splitting, request parsing and the master handler acting
// on a real master state. Any input must yield well-formed responses and
// leave the state consistent; crashes, leaks and UB are findings.
#include <kvx/store/master_handler.hpp>

#include <cstddef>
#include <cstdint>
#include <list>
#include <string_view>

namespace {

class fifo_policy {
 public:
  using eviction_policy_concept = kvx::cache::eviction_policy_tag;
  explicit fifo_policy(std::size_t) {}
  void on_insert(const kvx::cache::block_key& k, const kvx::cache::access_context&) { keys_.push_back(k); }
  void on_hit(const kvx::cache::block_key&, const kvx::cache::access_context&) {}
  void on_erase(const kvx::cache::block_key& k) { keys_.remove(k); }
  template <class F>
  std::optional<kvx::cache::block_key> victim(F&& evictable) {
    for (auto it = keys_.begin(); it != keys_.end(); ++it)
      if (evictable(*it)) {
        auto k = *it;
        keys_.erase(it);
        return k;
      }
    return std::nullopt;
  }
  std::size_t size() const { return keys_.size(); }

 private:
  std::list<kvx::cache::block_key> keys_;
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  kvx::metrics::registry registry;
  kvx::store::master_state<fifo_policy> state({}, {}, registry);
  kvx::store::master_handler<kvx::store::master_state<fifo_policy>> handler(state);
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
    if (!response.is_object() || !response.contains("ok")) __builtin_trap();
    now += std::chrono::milliseconds(700);
    handler.tick(now);
  }
  if (state.used_bytes() > state.capacity_bytes()) __builtin_trap();
  return 0;
}
