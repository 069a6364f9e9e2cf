#pragma once
//! \file
//! Mooncake-format request traces (JSONL): one request per line with
//! `timestamp` (ms from the start), `input_length` and `output_length`
//! (tokens) and `hash_ids` (one id per prefix block; equal ids at the same
//! position are the same reusable block). Other fields are ignored.
//!
//! A malformed line is an error naming the source, the line and the field.
//! Pure functions; thread-safe.
//!
//! \code
//! auto t = kvx::cache::read_trace("conversation_trace.jsonl");
//! if (!t) { std::cerr << t.error().message() << '\n'; return 1; }
//! for (const auto& r : *t) use(r.hash_ids);
//! \endcode

#include <cstddef>
#include <cstdint>
#include <fstream>
#include <istream>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include <kvx/core/error.hpp>
#include <kvx/core/result.hpp>

namespace kvx::cache {

//! One request of a trace.
struct trace_request {
  std::uint64_t timestamp_ms = 0;
  std::uint64_t input_length = 0;
  std::uint64_t output_length = 0;
  std::vector<std::uint64_t> hash_ids;
};

//! Parses one JSONL line; `where` ("trace.jsonl line 7") prefixes errors.
inline result<trace_request> parse_trace_line(std::string_view line, const std::string& where) {
  using json = nlohmann::json;
  const json j = json::parse(line, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return error{errc::malformed_message, where + ": not valid JSON"};
  if (!j.is_object()) return error{errc::malformed_message, where + ": expected a JSON object, got " + j.type_name()};
  trace_request r;
  auto number = [&](const char* field, std::uint64_t& out) -> result<void> {
    auto it = j.find(field);
    if (it == j.end()) return error{errc::malformed_message, where + ": field '" + field + "' is missing"};
    if (it->is_number_unsigned()) {
      out = it->get<std::uint64_t>();
    } else if (it->is_number_float() && it->get<double>() >= 0) {
      // 2^64 and above have no uint64 value (converting them is undefined).
      if (it->get<double>() >= 18446744073709551616.0)
        return error{errc::malformed_message,
                     where + ": field '" + field + "': expected a non-negative number below 2^64, got " + it->dump()};
      out = static_cast<std::uint64_t>(it->get<double>());
    } else {
      return error{errc::malformed_message,
                   where + ": field '" + field + "': expected a non-negative number, got " + it->dump()};
    }
    return {};
  };
  KVX_TRY(number("timestamp", r.timestamp_ms));
  KVX_TRY(number("input_length", r.input_length));
  KVX_TRY(number("output_length", r.output_length));
  auto ids = j.find("hash_ids");
  if (ids == j.end()) return error{errc::malformed_message, where + ": field 'hash_ids' is missing"};
  if (!ids->is_array())
    return error{errc::malformed_message, where + ": field 'hash_ids': expected an array, got " + ids->type_name()};
  r.hash_ids.reserve(ids->size());
  for (std::size_t i = 0; i < ids->size(); ++i) {
    const auto& v = (*ids)[i];
    if (!v.is_number_unsigned())
      return error{errc::malformed_message, where + ": field 'hash_ids[" + std::to_string(i) +
                                                "]': expected a non-negative integer, got " + v.dump()};
    r.hash_ids.push_back(v.get<std::uint64_t>());
  }
  return r;
}

//! Parses a whole trace; blank lines are skipped. `source` names it in errors.
inline result<std::vector<trace_request>> parse_trace(std::istream& in, const std::string& source = "trace") {
  std::vector<trace_request> out;
  std::string line;
  for (std::size_t n = 1; std::getline(in, line); ++n) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    auto r = parse_trace_line(line, source + " line " + std::to_string(n));
    if (!r) return r.error();
    out.push_back(std::move(*r));
  }
  if (in.bad()) return error{errc::io_error, source + ": read failed"};
  return out;
}

//! Reads a trace file.
inline result<std::vector<trace_request>> read_trace(const std::string& path) {
  std::ifstream in(path);
  if (!in) return error{errc::not_found, "trace file '" + path + "' cannot be opened"};
  return parse_trace(in, path);
}

}  // namespace kvx::cache
