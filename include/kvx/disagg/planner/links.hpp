#pragma once
//! \file
//! `kvx::disagg::planner` link figures from kvx's own benchmarks: the
//! results `transfer_bench --json` and `file_tier_bench --json` write, read
//! and mapped onto the planner's links, so that a plan for this machine moves
//! KV at measured speeds instead of datasheet guesses.
//!
//! | benchmark result | planner figure |
//! | --- | --- |
//! | transfer_bench `ucx`, `tcp` or `shm` | `network_bytes_per_s` (each instance's link: pool reads, peer reads, prefill-to-decode KV) |
//! | transfer_bench `local` (a memcpy through the transport API) | `dram_bytes_per_s` (the pool's DRAM tier) |
//! | file_tier_bench (`pread`, or `uring` when faster) | `ssd_bytes_per_s` (the pool's SSD tier) |
//!
//! Several network transports measured: ucx, then tcp, then shm, unless one
//! is named. Several results of one transport: the block size nearest (in
//! ratio) to the model's KV block, and of those the slowest (KV moves both
//! ways: reads from the pool, writes to decode instances).
//!
//! Values; nothing blocks; thread-safe as any value.
//!
//! \code
//! auto m = kvx::disagg::planner::read_link_measurements(text, "tcp.json").value();
//! auto links = kvx::disagg::planner::choose_links(m, model.kv_bytes_per_token() * 16.0).value();
//! kvx::disagg::planner::apply_links(hw, links);
//! \endcode

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include <kvx/core/result.hpp>
#include <kvx/disagg/planner/hardware.hpp>

namespace kvx::disagg::planner {

//! One measured link.
struct link_measurement {
  std::string origin;        //!< "FILE entry N"
  std::string bench;         //!< "transfer_bench" or "file_tier_bench"
  std::string transport;     //!< local, shm, tcp, ucx; for file_tier_bench: pread or uring
  std::string op;            //!< read or write (file_tier_bench: read)
  double block_bytes = 0;
  double bytes_per_s = 0;

  [[nodiscard]] std::string describe() const {
    std::ostringstream s;
    s << bench << ' ' << transport << ' ' << op << ' ' << block_bytes / 1024 << " KiB blocks: " << bytes_per_s / 1e9
      << " GB/s (" << origin << ')';
    return s.str();
  }
};

enum class link_tier : std::uint8_t { network, dram, ssd };

//! The planner figure a measurement gives.
[[nodiscard]] inline link_tier tier_of(const link_measurement& m) noexcept {
  if (m.bench == "file_tier_bench") return link_tier::ssd;
  return m.transport == "local" ? link_tier::dram : link_tier::network;
}

namespace detail {

inline result<double> positive_number(const nlohmann::json& j, const char* key, const std::string& where) {
  if (!j.contains(key) || !j[key].is_number() || !(j[key].get<double>() > 0) || !std::isfinite(j[key].get<double>()))
    return error{errc::invalid_argument, where + ": '" + key + "' is missing or not a positive number"};
  return j[key].get<double>();
}

inline result<void> add_entry(const nlohmann::json& j, const std::string& where, std::vector<link_measurement>& out) {
  if (!j.is_object()) return error{errc::invalid_argument, where + ": not a JSON object"};
  if (j.contains("transport")) {
    const std::string bench_where = where + " (transfer_bench)";
    link_measurement m;
    m.origin = where;
    m.bench = "transfer_bench";
    if (!j["transport"].is_string()) return error{errc::invalid_argument, bench_where + ": 'transport' is not a string"};
    m.transport = j["transport"].get<std::string>();
    if (m.transport != "local" && m.transport != "shm" && m.transport != "tcp" && m.transport != "ucx")
      return error{errc::invalid_argument,
                   bench_where + ": unknown transport '" + m.transport + "' (known: local, shm, tcp, ucx)"};
    m.op = j.contains("op") && j["op"].is_string() ? j["op"].get<std::string>() : "";
    if (m.op != "read" && m.op != "write")
      return error{errc::invalid_argument, bench_where + ": 'op' is missing or not read/write"};
    auto block = positive_number(j, "block_size", bench_where);
    if (!block) return block.error();
    auto gbps = positive_number(j, "gbps", bench_where);
    if (!gbps) return gbps.error();
    m.block_bytes = *block;
    m.bytes_per_s = *gbps * 1e9;
    if (j.contains("errors") && !j["errors"].is_number_unsigned())
      return error{errc::invalid_argument, bench_where + ": 'errors' is not a whole number >= 0"};
    if (const auto errors = j.value("errors", std::uint64_t{0}); errors > 0) {
      std::string first = j.contains("first_error") && j["first_error"].is_string() ? j["first_error"].get<std::string>() : "";
      return error{errc::invalid_argument, bench_where + ": " + m.transport + " " + m.op + " had " +
                                               std::to_string(errors) + " failed transfers" +
                                               (first.empty() ? "" : " (first: " + first + ")") +
                                               ": not a measurement to plan with"};
    }
    out.push_back(std::move(m));
    return {};
  }
  if (j.contains("pread")) {
    const std::string bench_where = where + " (file_tier_bench)";
    auto block = positive_number(j, "block_bytes", bench_where);
    if (!block) return block.error();
    for (const char* reader : {"pread", "uring"}) {
      if (!j.contains(reader)) continue;
      if (!j[reader].is_object()) return error{errc::invalid_argument, bench_where + ": '" + reader + "' is not an object"};
      auto bw = positive_number(j[reader], "bytes_per_s", bench_where + " " + reader);
      if (!bw) return bw.error();
      out.push_back({where, "file_tier_bench", reader, "read", *block, *bw});
    }
    return {};
  }
  return error{errc::invalid_argument,
               where + ": neither a transfer_bench result (transport, op, block_size, gbps) nor a file_tier_bench "
                       "result (block_bytes, pread.bytes_per_s)"};
}

}  // namespace detail

//! Reads what transfer_bench or file_tier_bench wrote: one JSON object
//! (`--json FILE`), an array of them, or one object per line (transfer_bench
//! prints one line per run: `transfer_bench ... >> links.jsonl`). `origin`
//! names the source in errors. Errors (`errc::invalid_argument`): text that
//! is not JSON, an entry of neither benchmark, a missing or non-positive
//! figure, an unknown transport, a run with failed transfers, no entries.
[[nodiscard]] inline result<std::vector<link_measurement>> read_link_measurements(std::string_view text,
                                                                                 const std::string& origin) {
  std::vector<link_measurement> out;
  auto whole = nlohmann::json::parse(text.begin(), text.end(), nullptr, false);
  if (!whole.is_discarded()) {
    if (whole.is_array()) {
      for (std::size_t i = 0; i < whole.size(); ++i)
        KVX_TRY(detail::add_entry(whole[i], origin + " entry " + std::to_string(i + 1), out));
    } else {
      KVX_TRY(detail::add_entry(whole, origin, out));
    }
  } else {
    std::size_t line_no = 0, start = 0;
    while (start <= text.size()) {
      std::size_t end = text.find('\n', start);
      if (end == std::string_view::npos) end = text.size();
      const std::string_view line = text.substr(start, end - start);
      start = end + 1;
      ++line_no;
      if (line.find_first_not_of(" \t\r") == std::string_view::npos) continue;
      auto j = nlohmann::json::parse(line.begin(), line.end(), nullptr, false);
      const std::string where = origin + " line " + std::to_string(line_no);
      if (j.is_discarded())
        return error{errc::invalid_argument,
                     where + ": not JSON (expected transfer_bench or file_tier_bench output: one object, an array, "
                             "or one object per line)"};
      KVX_TRY(detail::add_entry(j, where, out));
    }
  }
  if (out.empty()) return error{errc::invalid_argument, origin + ": no measurements in it"};
  return out;
}

//! The measurements chosen for each figure; empty where none was given.
struct link_figures {
  std::optional<link_measurement> network, dram, ssd;
};

//! Chooses a measurement per figure (see the file comment). `block_bytes`:
//! the model's KV bytes per cache block. `network_transport`: ucx, tcp or
//! shm, or empty for the first of those measured. Errors: a named transport
//! that was not measured.
[[nodiscard]] inline result<link_figures> choose_links(const std::vector<link_measurement>& all, double block_bytes,
                                                      const std::string& network_transport = {}) {
  auto pick = [&](auto&& accept) -> std::optional<link_measurement> {
    std::optional<link_measurement> best;
    double best_dist = 0;
    for (const auto& m : all) {
      if (!accept(m)) continue;
      const double dist = block_bytes > 0 ? std::abs(std::log(m.block_bytes / block_bytes)) : 0.0;
      if (!best || dist < best_dist - 1e-9 || (std::abs(dist - best_dist) <= 1e-9 && m.bytes_per_s < best->bytes_per_s)) {
        best = m;
        best_dist = dist;
      }
    }
    return best;
  };
  link_figures f;
  std::string measured;
  for (const auto& m : all)
    if (tier_of(m) == link_tier::network && measured.find(m.transport) == std::string::npos)
      measured += (measured.empty() ? "" : ", ") + m.transport;
  if (!network_transport.empty()) {
    if (network_transport != "ucx" && network_transport != "tcp" && network_transport != "shm")
      return error{errc::invalid_argument, "network transport '" + network_transport + "': not one of ucx, tcp, shm"};
    f.network = pick([&](const link_measurement& m) { return tier_of(m) == link_tier::network && m.transport == network_transport; });
    if (!f.network)
      return error{errc::invalid_argument, "network transport '" + network_transport +
                                               "' was not measured (network transports measured: " +
                                               (measured.empty() ? std::string("none") : measured) + ")"};
  } else {
    for (const char* t : {"ucx", "tcp", "shm"}) {
      f.network = pick([&](const link_measurement& m) { return tier_of(m) == link_tier::network && m.transport == t; });
      if (f.network) break;
    }
  }
  f.dram = pick([](const link_measurement& m) { return tier_of(m) == link_tier::dram; });
  // The file tier: the faster reader at the nearest block size (kvx uses the
  // uring tier where it is available).
  std::optional<link_measurement> ssd;
  double ssd_dist = 0;
  for (const auto& m : all) {
    if (tier_of(m) != link_tier::ssd) continue;
    const double dist = block_bytes > 0 ? std::abs(std::log(m.block_bytes / block_bytes)) : 0.0;
    if (!ssd || dist < ssd_dist - 1e-9 || (std::abs(dist - ssd_dist) <= 1e-9 && m.bytes_per_s > ssd->bytes_per_s)) {
      ssd = m;
      ssd_dist = dist;
    }
  }
  f.ssd = ssd;
  return f;
}

//! Sets the figures that were measured; the others keep their values.
inline void apply_links(hardware& hw, const link_figures& f) {
  if (f.network) hw.network_bytes_per_s = f.network->bytes_per_s;
  if (f.dram) hw.dram_bytes_per_s = f.dram->bytes_per_s;
  if (f.ssd) hw.ssd_bytes_per_s = f.ssd->bytes_per_s;
}

}  // namespace kvx::disagg::planner
