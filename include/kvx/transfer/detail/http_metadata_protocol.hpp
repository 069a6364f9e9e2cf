#pragma once
// The wire format shared by http_metadata_server and http_metadata: the
// routes, percent-encoding of keys, the JSON body of a list reply and the
// header that carries a kvx error code. No Beast here, so it stays testable
// on its own.

#include <chrono>
#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

#include <nlohmann/json.hpp>

#include <kvx/core/error.hpp>
#include <kvx/transfer/metadata_backend.hpp>

namespace kvx::transfer::detail {

inline constexpr std::string_view http_metadata_keys_path = "/kvx/v1/keys/";
inline constexpr std::string_view http_metadata_list_path = "/kvx/v1/list";
//! Response header naming the `kvx::errc` of a refusal ("not_found"): a
//! client tells "no such key" from "no such route" or a foreign server's 404.
inline constexpr std::string_view http_metadata_error_field = "kvx-error";
//! The longest client `timeout` and server `idle_timeout` accepted: far
//! longer ones overflow the clock's arithmetic (milliseconds::max() became
//! a deadline in the past).
inline constexpr std::chrono::milliseconds http_metadata_max_timeout = std::chrono::hours(24);

//! RFC 3986 percent-encoding of every byte but the unreserved ones, so a key
//! with '/', '?', '%', spaces or any byte is one path segment.
inline std::string percent_encode(std::string_view bytes) {
  static constexpr char hex[] = "0123456789ABCDEF";
  std::string out;
  out.reserve(bytes.size());
  for (const char c : bytes) {
    const auto b = static_cast<unsigned char>(c);
    const bool unreserved = (b >= 'A' && b <= 'Z') || (b >= 'a' && b <= 'z') || (b >= '0' && b <= '9') || b == '-' ||
                            b == '.' || b == '_' || b == '~';
    if (unreserved) {
      out.push_back(c);
    } else {
      out.push_back('%');
      out.push_back(hex[b >> 4]);
      out.push_back(hex[b & 15]);
    }
  }
  return out;
}

//! Decodes "%XX" escapes; other bytes stand for themselves ('+' is a plus).
//! Nothing when a '%' is not followed by two hex digits.
inline std::optional<std::string> percent_decode(std::string_view text) {
  auto digit = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  std::string out;
  out.reserve(text.size());
  for (std::size_t i = 0; i < text.size(); ++i) {
    if (text[i] != '%') {
      out.push_back(text[i]);
      continue;
    }
    if (i + 2 >= text.size()) return std::nullopt;
    const int hi = digit(text[i + 1]);
    const int lo = digit(text[i + 2]);
    if (hi < 0 || lo < 0) return std::nullopt;
    out.push_back(static_cast<char>(hi * 16 + lo));
    i += 2;
  }
  return out;
}

// Keys and values are bytes but JSON strings are Unicode: each byte is
// written as the code point of the same number (U+0000-U+00FF), so ASCII
// (segment descriptors) reads as itself and any byte survives. A reader in
// another language decodes a string and encodes it as Latin-1.
inline void append_json_bytes(std::string& out, std::string_view bytes) {
  static constexpr char hex[] = "0123456789abcdef";
  out.push_back('"');
  for (const char c : bytes) {
    const auto b = static_cast<unsigned char>(c);
    if (b == '"' || b == '\\') {
      out.push_back('\\');
      out.push_back(c);
    } else if (b < 0x20) {
      out += "\\u00";
      out.push_back(hex[b >> 4]);
      out.push_back(hex[b & 15]);
    } else if (b < 0x80) {
      out.push_back(c);
    } else {
      out.push_back(static_cast<char>(0xC0 | (b >> 6)));
      out.push_back(static_cast<char>(0x80 | (b & 0x3F)));
    }
  }
  out.push_back('"');
}

//! `[["key","value"],...]`, bytes as code points (see above).
inline std::string encode_entries_json(const metadata_entries& entries) {
  std::string out = "[";
  for (std::size_t i = 0; i < entries.size(); ++i) {
    if (i) out.push_back(',');
    out.push_back('[');
    append_json_bytes(out, entries[i].first);
    out.push_back(',');
    append_json_bytes(out, entries[i].second);
    out.push_back(']');
  }
  out.push_back(']');
  return out;
}

//! The bytes of a JSON string written by `append_json_bytes` (already valid
//! UTF-8, checked by the JSON parser); nothing for a code point above U+00FF.
inline std::optional<std::string> bytes_of_json_string(const std::string& utf8) {
  std::string out;
  out.reserve(utf8.size());
  for (std::size_t i = 0; i < utf8.size(); ++i) {
    const auto b = static_cast<unsigned char>(utf8[i]);
    if (b < 0x80) {
      out.push_back(utf8[i]);
    } else if ((b == 0xC2 || b == 0xC3) && i + 1 < utf8.size()) {
      out.push_back(static_cast<char>(((b & 0x03) << 6) | (static_cast<unsigned char>(utf8[i + 1]) & 0x3F)));
      ++i;
    } else {
      return std::nullopt;
    }
  }
  return out;
}

//! Parses a list reply; nothing when it is not `[["key","value"],...]`.
inline std::optional<metadata_entries> decode_entries_json(std::string_view text) {
  const auto doc = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded() || !doc.is_array()) return std::nullopt;
  metadata_entries out;
  out.reserve(doc.size());
  for (const auto& pair : doc) {
    if (!pair.is_array() || pair.size() != 2 || !pair[0].is_string() || !pair[1].is_string()) return std::nullopt;
    auto key = bytes_of_json_string(pair[0].get_ref<const std::string&>());
    auto value = bytes_of_json_string(pair[1].get_ref<const std::string&>());
    if (!key || !value) return std::nullopt;
    out.emplace_back(std::move(*key), std::move(*value));
  }
  return out;
}

//! `bytes` for a log line: printable ASCII as is, other bytes as \xNN, cut at `limit`.
inline std::string printable(std::string_view bytes, std::size_t limit = 120) {
  static constexpr char hex[] = "0123456789abcdef";
  std::string out;
  for (std::size_t i = 0; i < bytes.size() && i < limit; ++i) {
    const auto b = static_cast<unsigned char>(bytes[i]);
    if (b >= 0x20 && b < 0x7f && b != '\\') {
      out.push_back(bytes[i]);
    } else {
      out += "\\x";
      out.push_back(hex[b >> 4]);
      out.push_back(hex[b & 15]);
    }
  }
  if (bytes.size() > limit) out += "...";
  return out;
}

//! The errc a refusal header names; nothing for a name this build does not know.
inline std::optional<errc> errc_of_header(std::string_view name) {
  const errc e = errc_from_string(name);
  if (name != to_string(e)) return std::nullopt;
  return e;
}

}  // namespace kvx::transfer::detail
