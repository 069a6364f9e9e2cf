#pragma once
//! \file
//! `kvx::is_utf8`: whether bytes are well-formed UTF-8. Names that kvx
//! publishes or sends inside JSON (segment and node names, store keys) must
//! be, since nlohmann/json throws when it dumps anything else; callers check
//! first and return an error instead.

#include <cstddef>
#include <string_view>

namespace kvx {

//! True when `s` is well-formed UTF-8: no stray continuation bytes, no
//! truncated sequences, no overlong forms, no surrogates, nothing above U+10FFFF.
constexpr bool is_utf8(std::string_view s) noexcept {
  std::size_t i = 0;
  while (i < s.size()) {
    const auto lead = static_cast<unsigned char>(s[i]);
    if (lead < 0x80) {
      ++i;
      continue;
    }
    // Continuation bytes, and the range of the first (no overlongs, no surrogates, nothing above U+10FFFF).
    std::size_t n = 0;
    unsigned char lo = 0x80, hi = 0xBF;
    if (lead >= 0xC2 && lead <= 0xDF) {
      n = 1;
    } else if (lead >= 0xE0 && lead <= 0xEF) {
      n = 2;
      if (lead == 0xE0) lo = 0xA0;
      if (lead == 0xED) hi = 0x9F;
    } else if (lead >= 0xF0 && lead <= 0xF4) {
      n = 3;
      if (lead == 0xF0) lo = 0x90;
      if (lead == 0xF4) hi = 0x8F;
    } else {
      return false;
    }
    if (s.size() - i <= n) return false;
    for (std::size_t k = 1; k <= n; ++k) {
      const auto c = static_cast<unsigned char>(s[i + k]);
      if (c < (k == 1 ? lo : 0x80) || c > (k == 1 ? hi : 0xBF)) return false;
    }
    i += n + 1;
  }
  return true;
}
static_assert(is_utf8("kv/layer-0") && is_utf8("\xC3\xA9\xE2\x82\xAC\xF0\x9F\x98\x80"));
static_assert(!is_utf8("bad\xFF") && !is_utf8("\xC3") && !is_utf8("\xC0\xAF") && !is_utf8("\xED\xA0\x80") &&
              !is_utf8("\xF4\x90\x80\x80"));

}  // namespace kvx
