// libFuzzer target: the JSON wire formats kvx parses from peers it does not
// control. The first byte picks the parser, the rest is the message:
//   0: a push target (kvx/disagg/push_wire.hpp), from a decode instance
//   1: a push notice, from a prefill instance
//   2: an HTTP metadata list body (kvx/transfer/detail/http_metadata_protocol.hpp), from a metadata server
//   3: a percent-encoded key, from an HTTP request path
//   4: a segment descriptor (kvx/memory/segment.hpp), from the metadata backend
// Whatever a parser accepts must survive its encoder unchanged; crashes,
// leaks, UB and broken round trips are findings.
#include <kvx/disagg/push_wire.hpp>
#include <kvx/memory/segment.hpp>
#include <kvx/transfer/detail/http_metadata_protocol.hpp>

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace {
void check(bool ok) {
  if (!ok) __builtin_trap();
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const std::string_view text(reinterpret_cast<const char*>(data) + 1, size - 1);
  namespace kd = kvx::disagg;
  namespace wire = kvx::transfer::detail;
  switch (data[0] % 5) {
    case 0: {
      auto j = nlohmann::json::parse(text, nullptr, false);
      if (j.is_discarded()) return 0;
      auto t = kd::push_target_from_json(j);
      if (!t) return 0;
      check(t->destinations.size() == std::size_t{t->source_tp} * t->layers * t->source_blocks);
      for (const auto& d : t->destinations) check(d.segment < t->segments.size());
      const auto again = kd::to_json(*t);
      auto back = kd::push_target_from_json(nlohmann::json::parse(again.dump()));
      check(back.has_value() && kd::to_json(*back) == again);
      break;
    }
    case 1: {
      auto j = nlohmann::json::parse(text, nullptr, false);
      if (j.is_discarded()) return 0;
      auto n = kd::push_notice_from_json(j);
      if (!n) return 0;
      const auto again = kd::to_json(*n);
      auto back = kd::push_notice_from_json(nlohmann::json::parse(again.dump()));
      check(back.has_value() && kd::to_json(*back) == again);
      break;
    }
    case 2: {
      auto entries = wire::decode_entries_json(text);
      if (!entries) return 0;
      auto back = wire::decode_entries_json(wire::encode_entries_json(*entries));
      check(back.has_value() && *back == *entries);
      break;
    }
    case 3: {
      check(wire::percent_decode(wire::percent_encode(text)) == std::string(text));
      (void)wire::percent_decode(text);
      break;
    }
    default: {
      // Parsed with a depth bound, as the transfer engine resolves one.
      auto d = kvx::memory::segment_descriptor::parse(text);
      if (!d) return 0;
      // The printed form is the fixed point (1e999 parses as inf and prints as null).
      const auto again = d->to_json().dump();
      auto back = kvx::memory::segment_descriptor::parse(again);
      check(back.has_value() && back->to_json().dump() == again);
      break;
    }
  }
  return 0;
}
