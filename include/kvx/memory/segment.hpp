#pragma once
//! \file
//! Segments: registered memory regions with a name, as seen locally
//! (`local_segment`) and as published to peers (`segment_descriptor`).
//!
//! A node registers a region once and names it; peers address it as
//! (segment, offset, length). The descriptor is what the metadata backend
//! stores under the segment's name: the owning node, length, location, a
//! random registration key every remote access must present, a generation
//! that changes when the owner restarts (so stale endpoints fail cleanly),
//! and one JSON entry per transport saying how to reach it (tcp: host and
//! port; shm: the owner's socket path; ucx: worker address and packed rkey).

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include <kvx/core/config.hpp>
#include <kvx/memory/memory_region.hpp>

namespace kvx::memory {

//! How deeply a descriptor's JSON may nest (the document itself is level 0,
//! `transports` 1). Real descriptors use about 5; a peer's descriptor is
//! untrusted, and nlohmann copies and prints recursively, so a bound keeps a
//! hostile one from exhausting the stack.
inline constexpr std::size_t max_descriptor_depth = 64;

namespace detail {
//! True when `j` (at `depth`) holds an array or object deeper than `max_depth`.
//! Iterative: it must not recurse on what it guards against.
inline bool nests_deeper_than(const nlohmann::json& j, std::size_t depth, std::size_t max_depth) {
  std::vector<std::pair<const nlohmann::json*, std::size_t>> pending{{&j, depth}};
  while (!pending.empty()) {
    auto [value, level] = pending.back();
    pending.pop_back();
    if (!value->is_structured()) continue;
    if (level > max_depth) return true;
    for (const auto& child : *value) pending.emplace_back(&child, level + 1);
  }
  return false;
}
}  // namespace detail

//! What peers need to address a segment. Serialises to and from JSON.
struct segment_descriptor {
  std::string name;               //!< unique in the cluster
  std::string node;               //!< owning node
  std::uint64_t length = 0;
  location where = location::host();
  std::uint64_t key = 0;          //!< presented by every remote access
  std::uint64_t generation = 0;   //!< owner incarnation; changes on restart
  std::string host_id;            //!< identifies the host (boot id): same-host transports compare it
  nlohmann::json transports = nlohmann::json::object();  //!< per-transport reachability

  [[nodiscard]] nlohmann::json to_json() const {
    return {{"name", name},         {"node", node},         {"length", length},   {"location", where.to_string()},
            {"key", key},           {"generation", generation}, {"host_id", host_id}, {"transports", transports}};
  }

  //! Parses a descriptor's JSON text, as a peer published it: text that is
  //! not JSON, nests deeper than `max_descriptor_depth` or fails `from_json`
  //! is `errc::malformed_message`, saying why.
  static result<segment_descriptor> parse(std::string_view text) {
    bool too_deep = false;
    // Refusing the first value past the bound makes the parser skip what it
    // holds, so nothing deeper is ever built.
    auto bound_depth = [&too_deep](int depth, nlohmann::json::parse_event_t event, nlohmann::json&) {
      const bool opens = event == nlohmann::json::parse_event_t::object_start ||
                         event == nlohmann::json::parse_event_t::array_start;
      if (opens && static_cast<std::size_t>(depth) > max_descriptor_depth) too_deep = true;
      return !too_deep;
    };
    auto j = nlohmann::json::parse(text, bound_depth, /*allow_exceptions=*/false);
    if (too_deep)
      return error{errc::malformed_message,
                   "segment descriptor nests deeper than " + std::to_string(max_descriptor_depth) + " levels"};
    if (j.is_discarded()) return error{errc::malformed_message, "segment descriptor is not JSON"};
    auto d = from_json(j);
    if (!d) return error{errc::malformed_message, d.error().context()};
    return d;
  }

  //! Validates every field; errors name the field.
  static result<segment_descriptor> from_json(const nlohmann::json& j) {
    config::view v(j, "segment");
    segment_descriptor d;
    auto name = v.required<std::string>("name");
    KVX_TRY(name);
    auto node = v.required<std::string>("node");
    KVX_TRY(node);
    auto length = v.required<std::uint64_t>("length");
    KVX_TRY(length);
    auto where = v.required<std::string>("location");
    KVX_TRY(where);
    auto loc = location::parse(*where);
    KVX_TRY(loc);
    auto key = v.required<std::uint64_t>("key");
    KVX_TRY(key);
    auto generation = v.required<std::uint64_t>("generation");
    KVX_TRY(generation);
    auto host_id = v.optional<std::string>("host_id", "");
    KVX_TRY(host_id);
    d.name = std::move(*name);
    d.node = std::move(*node);
    d.length = *length;
    d.where = *loc;
    d.key = *key;
    d.generation = *generation;
    d.host_id = std::move(*host_id);
    if (v.contains("transports")) {
      const auto& transports = j.at("transports");
      if (!transports.is_object())
        return error{errc::invalid_argument, "config field 'segment.transports': expected an object"};
      // Checked before the copy, which recurses as deep as the value nests.
      if (detail::nests_deeper_than(transports, 1, max_descriptor_depth))
        return error{errc::invalid_argument, "config field 'segment.transports': nests deeper than " +
                                                 std::to_string(max_descriptor_depth) + " levels"};
      d.transports = transports;
    }
    return d;
  }
};

//! A segment registered by this process.
struct local_segment {
  std::string name;
  memory_region region;
  std::uint64_t key = 0;
  std::uint64_t generation = 0;
};

}  // namespace kvx::memory
