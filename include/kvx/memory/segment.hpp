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

#include <cstdint>
#include <string>
#include <utility>

#include <nlohmann/json.hpp>

#include <kvx/core/config.hpp>
#include <kvx/memory/memory_region.hpp>

namespace kvx::memory {

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
      if (!j.at("transports").is_object())
        return error{errc::invalid_argument, "config field 'segment.transports': expected an object"};
      d.transports = j.at("transports");
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
