#pragma once
//! \file
//! Vocabulary of the distributed KV pool: object keys in tenant namespaces,
//! replica locations, and the records the master keeps about segments.

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace kvx::store {

using clock = std::chrono::steady_clock;

//! An object's name: a tenant namespace and a key inside it. Tenants never
//! see each other's objects; quotas are per tenant.
struct object_key {
  std::string tenant;
  std::string key;
  [[nodiscard]] std::string full() const { return tenant + "/" + key; }
  friend bool operator==(const object_key&, const object_key&) = default;
  friend auto operator<=>(const object_key&, const object_key&) = default;
};

//! Where one replica's bytes live: `size` bytes at `offset` of `segment`,
//! owned by `node`. Readers fetch it with a transfer-engine read.
struct replica_location {
  std::string node;
  std::string segment;
  std::uint64_t offset = 0;
  std::uint64_t size = 0;
  friend bool operator==(const replica_location&, const replica_location&) = default;
};

//! Ask a node holding `source` to copy it into `target` (re-replication).
struct replication_task {
  object_key key;
  replica_location source;
  replica_location target;
  std::uint64_t put_id = 0;  //!< commit with `replication_done(key, put_id, target)`
  //! When the master gives the copy up and may reuse `target`; the source
  //! must have stopped writing by then. On the master its own clock; on a
  //! node, its clock from the answer's `deadline_ms` and the time the
  //! heartbeat was sent (never later than the master's). `{}`: none given.
  clock::time_point deadline{};
};

inline void to_json(nlohmann::json& j, const replica_location& r) {
  j = {{"node", r.node}, {"segment", r.segment}, {"offset", r.offset}, {"size", r.size}};
}

//! One committed replica as the node holding it keeps it in its ledger
//! (`master_config::recover_objects`): what a new master needs to take the
//! object back after a failover, once the node has checked `checksum`
//! against the bytes it holds.
struct ledger_entry {
  object_key key;
  std::uint64_t put_id = 0;  //!< the put that wrote the object: of two versions of a key, the higher is newer
  std::string segment;
  std::uint64_t offset = 0;
  std::uint64_t size = 0;
  std::uint64_t checksum = 0;  //!< XXH3-64 of the object's bytes, as its writer computed it
  unsigned replicas_wanted = 1;
  bool pinned = false;
};

//! A change to one node's ledger; numbered per node from 1, without gaps
//! unless the master had to forget some (the node then forgets its ledger).
struct ledger_event {
  std::uint64_t seq = 0;
  bool add = true;  //!< false: put `entry.put_id`'s replica at `entry.offset` of `entry.segment` is gone
  ledger_entry entry;
};

//! What a node contributes: a segment (DRAM or SSD) of `capacity` bytes.
struct segment_info {
  std::string name;
  std::string node;
  std::uint64_t capacity = 0;
  std::string tier = "dram";  //!< "dram" or "ssd": placement prefers dram
  //! The failure domain (a machine): a DRAM node and the SSD node of one host
  //! name the same host, so replicas land on other hosts first. Empty: the
  //! node is its own host.
  std::string host{};

  [[nodiscard]] const std::string& host_or_node() const noexcept { return host.empty() ? node : host; }
};

}  // namespace kvx::store
