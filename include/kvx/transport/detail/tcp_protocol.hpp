#pragma once
// The tcp transport's wire format and its parser: pure functions over bytes,
// so the server, the client and the libFuzzer target (tests/fuzz) share one
// implementation and the fuzzer exercises exactly what the server runs.
//
// Request  (48-byte header, then the segment name, then `length` payload bytes for writes):
//   0 magic u32 "KVXT" | 4 version u8 | 5 op u8 | 6 name_length u16 | 8 request_id u64
//   16 key u64 | 24 generation u64 | 32 offset u64 | 40 length u64
// Response (24-byte header, then `pad` zero bytes, then `length` payload bytes:
//           read data when status is 0, else the error text):
//   0 magic u32 "KVXR" | 4 version u8 | 5 status u8 (0 or a kvx::errc) | 6 pad u16 (0..63)
//   8 request_id u64 | 16 length u64
// All integers little-endian.
//
// Why the pad: on loopback the sender's and the receiver's kernel copies both
// go through the same page fragment, and `rep movsb` (what the kernel copies
// user memory with on CPUs with FSRM) runs about 10x slower on some AMD EPYC
// parts when (destination - source) mod 64 is 1..15. Linux fills one fragment
// per sending thread in the order the thread sends, and restarts it at offset
// 0 (at a segment boundary) whenever the receiver has freed everything in it.
// So the server pads a read's response to start the payload at a multiple of
// 64 in what its thread has sent (read_padding): with 64-byte-multiple
// payloads every frame and segment then starts there too, and a restart
// changes nothing. The payload lands at offset 0 mod 64, and neither copy
// takes the slow path for buffers aligned to 16 bytes or more (what malloc,
// page-aligned pools and KV blocks give). Only read data is padded; error
// frames and write acknowledgements carry pad 0.

#include <array>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string_view>

#include <kvx/core/error.hpp>

namespace kvx::transport::detail::tcp_wire {

inline constexpr std::uint32_t request_magic = 0x5458564bu;   // "KVXT" in memory order
inline constexpr std::uint32_t response_magic = 0x5258564bu;  // "KVXR"
inline constexpr std::uint8_t protocol_version = 2;  // 2: responses carry `pad`
inline constexpr std::size_t request_header_size = 48;
inline constexpr std::size_t response_header_size = 24;
inline constexpr std::size_t max_name_length = 255;
inline constexpr std::size_t max_error_text = 1024;
inline constexpr std::size_t payload_alignment = 64;  // a response's pad is below this

enum class opcode : std::uint8_t { read = 1, write = 2 };

struct request_header {
  opcode op = opcode::read;
  std::uint16_t name_length = 0;
  std::uint64_t request_id = 0;
  std::uint64_t key = 0;
  std::uint64_t generation = 0;
  std::uint64_t offset = 0;
  std::uint64_t length = 0;
};

struct response_header {
  std::uint8_t status = 0;
  std::uint16_t pad = 0;  // zero bytes between the header and the payload
  std::uint64_t request_id = 0;
  std::uint64_t length = 0;
};

enum class parse_state : std::uint8_t { complete, need_more, invalid };

struct limits {
  std::uint64_t max_request = 64ull << 20;  // payload bytes one request may move
};
// The smallest max_request (and slice) kvx accepts: below it an op becomes
// one request per few bytes, all allocated at once.
inline constexpr std::uint64_t min_request = 4096;

template <class T>
constexpr T byte_swap(T v) noexcept {  // std::byteswap is C++23
  T r = 0;
  for (std::size_t i = 0; i < sizeof(T); ++i) r = static_cast<T>((r << 8) | ((v >> (8 * i)) & 0xff));
  return r;
}

template <class T>
T load_le(const std::byte* p) noexcept {
  T v;
  std::memcpy(&v, p, sizeof v);
  if constexpr (std::endian::native == std::endian::big) v = byte_swap(v);
  return v;
}

template <class T>
void store_le(std::byte* p, T v) noexcept {
  if constexpr (std::endian::native == std::endian::big) v = byte_swap(v);
  std::memcpy(p, &v, sizeof v);
}

using request_bytes = std::array<std::byte, request_header_size>;
using response_bytes = std::array<std::byte, response_header_size>;

inline request_bytes encode_request(const request_header& h) noexcept {
  request_bytes b{};
  store_le<std::uint32_t>(b.data() + 0, request_magic);
  store_le<std::uint8_t>(b.data() + 4, protocol_version);
  store_le<std::uint8_t>(b.data() + 5, static_cast<std::uint8_t>(h.op));
  store_le<std::uint16_t>(b.data() + 6, h.name_length);
  store_le<std::uint64_t>(b.data() + 8, h.request_id);
  store_le<std::uint64_t>(b.data() + 16, h.key);
  store_le<std::uint64_t>(b.data() + 24, h.generation);
  store_le<std::uint64_t>(b.data() + 32, h.offset);
  store_le<std::uint64_t>(b.data() + 40, h.length);
  return b;
}

inline response_bytes encode_response(std::uint8_t status, std::uint64_t request_id, std::uint64_t length,
                                      std::uint16_t pad = 0) noexcept {
  response_bytes b{};
  store_le<std::uint32_t>(b.data() + 0, response_magic);
  store_le<std::uint8_t>(b.data() + 4, protocol_version);
  store_le<std::uint8_t>(b.data() + 5, status);
  store_le<std::uint16_t>(b.data() + 6, pad);
  store_le<std::uint64_t>(b.data() + 8, request_id);
  store_le<std::uint64_t>(b.data() + 16, length);
  return b;
}

//! The pad that starts a read payload at a multiple of payload_alignment,
//! for a response whose header starts at `stream_offset` (bytes the sending
//! thread has sent so far).
inline std::uint16_t read_padding(std::uint64_t stream_offset) noexcept {
  const std::uint64_t mask = payload_alignment - 1;
  return static_cast<std::uint16_t>((0 - (stream_offset + response_header_size)) & mask);
}

inline std::uint8_t status_of(std::error_code ec) noexcept {
  if (!ec) return 0;
  if (ec.category() == error_category() && ec.value() > 0 && ec.value() <= static_cast<int>(errc::internal))
    return static_cast<std::uint8_t>(ec.value());
  return static_cast<std::uint8_t>(errc::internal);
}

inline bool valid_status(std::uint8_t s) noexcept { return s <= static_cast<std::uint8_t>(errc::internal); }

struct header_parse {
  parse_state state = parse_state::need_more;
  request_header header{};
  errc code{};                 // when invalid
  std::string_view reason{};   // when invalid; static text
};

//! Parses and validates a request header from the first bytes of `in`.
//! The request id is filled in as soon as it is readable, even for an invalid
//! header, so the error frame can name the request.
inline header_parse parse_request_header(std::span<const std::byte> in, const limits& lim) noexcept {
  header_parse r;
  if (in.size() < request_header_size) return r;
  const std::byte* p = in.data();
  r.header.request_id = load_le<std::uint64_t>(p + 8);
  auto invalid = [&](errc c, std::string_view why) {
    r.state = parse_state::invalid;
    r.code = c;
    r.reason = why;
    return r;
  };
  if (load_le<std::uint32_t>(p) != request_magic) {
    r.header.request_id = 0;
    return invalid(errc::malformed_message, "bad magic (not a kvx tcp request)");
  }
  if (load_le<std::uint8_t>(p + 4) != protocol_version) return invalid(errc::not_supported, "unsupported protocol version");
  const auto op = load_le<std::uint8_t>(p + 5);
  if (op != static_cast<std::uint8_t>(opcode::read) && op != static_cast<std::uint8_t>(opcode::write))
    return invalid(errc::malformed_message, "unknown op");
  r.header.op = static_cast<opcode>(op);
  r.header.name_length = load_le<std::uint16_t>(p + 6);
  if (r.header.name_length == 0 || r.header.name_length > max_name_length)
    return invalid(errc::malformed_message, "segment name length must be 1..255");
  r.header.key = load_le<std::uint64_t>(p + 16);
  r.header.generation = load_le<std::uint64_t>(p + 24);
  r.header.offset = load_le<std::uint64_t>(p + 32);
  r.header.length = load_le<std::uint64_t>(p + 40);
  if (r.header.length > lim.max_request) return invalid(errc::capacity_exceeded, "request length exceeds the server's max_request");
  r.state = parse_state::complete;
  return r;
}

struct frame_parse {
  parse_state state = parse_state::need_more;
  request_header header{};
  std::string_view name{};
  std::span<const std::byte> payload{};  // writes only
  std::size_t consumed = 0;              // bytes of `in` the frame occupies
  errc code{};
  std::string_view reason{};
};

//! Parses one whole request frame (header, name, write payload) from `in`.
inline frame_parse parse_request(std::span<const std::byte> in, const limits& lim) noexcept {
  frame_parse f;
  const auto h = parse_request_header(in, lim);
  f.header = h.header;
  if (h.state != parse_state::complete) {
    f.state = h.state;
    f.code = h.code;
    f.reason = h.reason;
    return f;
  }
  const std::size_t name_end = request_header_size + h.header.name_length;
  if (in.size() < name_end) return f;
  f.name = std::string_view(reinterpret_cast<const char*>(in.data() + request_header_size), h.header.name_length);
  std::size_t end = name_end;
  if (h.header.op == opcode::write) {
    // length <= max_request was checked; compare against what is left without overflow.
    if (h.header.length > in.size() - name_end) return f;
    end = name_end + static_cast<std::size_t>(h.header.length);
    f.payload = in.subspan(name_end, static_cast<std::size_t>(h.header.length));
  }
  f.consumed = end;
  f.state = parse_state::complete;
  return f;
}

struct response_parse {
  parse_state state = parse_state::need_more;
  response_header header{};
  errc code{};
  std::string_view reason{};
};

//! Parses and validates a response header (the client side).
inline response_parse parse_response_header(std::span<const std::byte> in) noexcept {
  response_parse r;
  if (in.size() < response_header_size) return r;
  const std::byte* p = in.data();
  auto invalid = [&](std::string_view why) {
    r.state = parse_state::invalid;
    r.code = errc::protocol_error;
    r.reason = why;
    return r;
  };
  if (load_le<std::uint32_t>(p) != response_magic) return invalid("bad response magic");
  if (load_le<std::uint8_t>(p + 4) != protocol_version) return invalid("unsupported response version");
  r.header.status = load_le<std::uint8_t>(p + 5);
  if (!valid_status(r.header.status)) return invalid("unknown status");
  r.header.pad = load_le<std::uint16_t>(p + 6);
  if (r.header.pad >= payload_alignment) return invalid("response padding of 64 bytes or more");
  r.header.request_id = load_le<std::uint64_t>(p + 8);
  r.header.length = load_le<std::uint64_t>(p + 16);
  if (r.header.status != 0 && r.header.length > max_error_text) return invalid("error text too long");
  if (r.header.status != 0 && r.header.pad != 0) return invalid("error response carries padding");
  r.state = parse_state::complete;
  return r;
}

}  // namespace kvx::transport::detail::tcp_wire
