// libFuzzer target for the tcp transport's wire parser: the exact functions
// the server and client run on untrusted bytes. Each input is a byte stream
// from a peer; frames are parsed one after another as the server would, and
// every frame that parses is served against a real 4 KiB segment through
// segment_table::check_access, so ASan catches any access outside it.
//
//   cmake -S . -B build/fuzz -DCMAKE_CXX_COMPILER=clang++-14 -DKVX_BUILD_FUZZERS=ON
//   cmake --build build/fuzz --target tcp_frame_fuzz
//   build/fuzz/tests/fuzz/tcp_frame_fuzz -max_total_time=60 tests/fuzz/corpus/tcp_frame

#include <kvx/transport/detail/tcp_protocol.hpp>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <vector>

#include <kvx/memory/segment_table.hpp>

namespace {

namespace wire = kvx::transport::detail::tcp_wire;

struct served_segment {
  std::vector<std::byte> bytes = std::vector<std::byte>(4096);
  kvx::memory::segment_table table{"fuzz", 7};
  kvx::memory::local_segment seg;
  served_segment() {
    // A fixed key so the corpus can reach the data path.
    seg = kvx::memory::local_segment{"kv", {bytes.data(), bytes.size()}, 0x1122334455667788ull, 7};
    (void)table.adopt(seg);
  }
};

served_segment& segment() {
  static served_segment s;
  return s;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::span<const std::byte> in(reinterpret_cast<const std::byte*>(data), size);
  auto& s = segment();
  const wire::limits lim{1 << 16};
  std::vector<std::byte> sink;

  // The client's parser sees the same bytes as a response stream.
  const auto resp = wire::parse_response_header(in);
  if (resp.state == wire::parse_state::complete && resp.header.status != 0 && resp.header.length > wire::max_error_text)
    __builtin_trap();

  while (!in.empty()) {
    const auto f = wire::parse_request(in, lim);
    if (f.state != wire::parse_state::complete) {
      if (f.state == wire::parse_state::invalid && f.reason.empty()) __builtin_trap();  // every refusal says why
      break;
    }
    if (f.consumed == 0 || f.consumed > in.size() || f.header.length > lim.max_request) __builtin_trap();
    auto access = s.table.check_access(std::string(f.name), f.header.key, f.header.offset, f.header.length);
    if (access && access->segment().generation == f.header.generation) {
      if (f.header.op == wire::opcode::write) {
        if (f.payload.size() != f.header.length) __builtin_trap();
        if (!f.payload.empty()) std::memcpy(access->data(), f.payload.data(), f.payload.size());
      } else {
        sink.assign(access->data(), access->data() + access->size());
      }
    }
    // A response the server would send must parse back, its read padding included.
    const bool padded = access && f.header.op == wire::opcode::read;
    const std::uint16_t pad = padded ? wire::read_padding(in.size()) : std::uint16_t{0};
    const auto out = wire::encode_response(wire::status_of(access ? std::error_code{} : access.code()),
                                           f.header.request_id, access ? f.header.length : 0, pad);
    const auto back = wire::parse_response_header(out);
    if (back.state != wire::parse_state::complete || back.header.pad != pad) __builtin_trap();
    in = in.subspan(f.consumed);
  }
  return 0;
}
