#pragma once
//! \file
//! Byte sizes: literals (`64_KiB`) and parsing of human sizes ("1MiB", "4k",
//! "2GB") as configs and command lines write them.

#include <cctype>
#include <cstdint>
#include <string>
#include <string_view>

#include <kvx/core/result.hpp>

namespace kvx {

inline constexpr std::uint64_t KiB = 1024;
inline constexpr std::uint64_t MiB = 1024 * KiB;
inline constexpr std::uint64_t GiB = 1024 * MiB;

namespace literals {
constexpr std::uint64_t operator""_KiB(unsigned long long v) { return v * KiB; }
constexpr std::uint64_t operator""_MiB(unsigned long long v) { return v * MiB; }
constexpr std::uint64_t operator""_GiB(unsigned long long v) { return v * GiB; }
}  // namespace literals

//! Parses "4096", "4k", "4KiB", "64MiB", "1G", "2GB" (binary multiples: kvx
//! sizes are memory sizes). Errors name the text.
inline result<std::uint64_t> parse_size(std::string_view text) {
  std::size_t i = 0;
  std::uint64_t value = 0;
  while (i < text.size() && std::isdigit(static_cast<unsigned char>(text[i]))) {
    const std::uint64_t digit = static_cast<std::uint64_t>(text[i] - '0');
    if (value > (UINT64_MAX - digit) / 10) return error{errc::invalid_argument, "size overflows: '" + std::string(text) + "'"};
    value = value * 10 + digit;
    ++i;
  }
  if (i == 0) return error{errc::invalid_argument, "size must start with a number: '" + std::string(text) + "'"};
  std::string unit;
  for (; i < text.size(); ++i) unit.push_back(static_cast<char>(std::tolower(static_cast<unsigned char>(text[i]))));
  std::uint64_t mult = 0;
  if (unit.empty() || unit == "b")
    mult = 1;
  else if (unit == "k" || unit == "kb" || unit == "kib")
    mult = KiB;
  else if (unit == "m" || unit == "mb" || unit == "mib")
    mult = MiB;
  else if (unit == "g" || unit == "gb" || unit == "gib")
    mult = GiB;
  else if (unit == "t" || unit == "tb" || unit == "tib")
    mult = 1024 * GiB;
  else
    return error{errc::invalid_argument, "unknown size unit '" + unit + "' in '" + std::string(text) + "'"};
  if (value > UINT64_MAX / mult) return error{errc::invalid_argument, "size overflows: '" + std::string(text) + "'"};
  return value * mult;
}

//! "1.5 MiB" style rendering for logs and tables.
inline std::string format_size(std::uint64_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024.0 && u < 4) {
    v /= 1024.0;
    ++u;
  }
  char buf[32];
  if (u == 0)
    std::snprintf(buf, sizeof buf, "%llu B", static_cast<unsigned long long>(bytes));
  else
    std::snprintf(buf, sizeof buf, "%.4g %s", v, units[u]);
  return buf;
}

}  // namespace kvx
