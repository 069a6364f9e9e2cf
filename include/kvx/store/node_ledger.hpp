#pragma once
//! \file
//! `node_ledger`: what a store node knows of the committed objects in its
//! segment (`master_config::recover_objects`): the changes its master sends
//! with heartbeat answers, applied in order, so that after a failover the
//! node can tell a new master what it holds (`store_node` reports the
//! entries whose bytes still match their checksum).
//!
//! Changes are numbered per node from 1. One already applied is skipped (the
//! master sends again what was not acknowledged); a gap means the master
//! dropped changes it could not keep (`ledger_backlog`), so the entries are
//! no longer trustworthy and are forgotten; a malformed change stops the
//! batch there, unacknowledged. Not thread-safe: the node's heartbeat strand
//! owns it.
//!
//! \code
//! kvx::store::node_ledger ledger("node-0/pool");
//! if (auto why = ledger.apply(answer["ledger"]); !why.empty()) log(log_level::warn, why);
//! request["ledger_ack"] = ledger.applied();
//! auto to_report = ledger.take();  // a new master: report these, start again from change 1
//! \endcode

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include <kvx/store/protocol.hpp>
#include <kvx/store/types.hpp>

namespace kvx::store {

class node_ledger {
 public:
  explicit node_ledger(std::string segment) : segment_(std::move(segment)) {}

  //! Applies a heartbeat answer's `ledger` array; what went wrong (for the
  //! log), or empty.
  std::string apply(const protocol::json& changes) {
    if (!changes.is_array()) return "the ledger changes are not an array; ignored";
    std::string why;
    for (std::size_t i = 0; i < changes.size(); ++i) {
      auto ev = protocol::ledger_event_from_json(changes[i], "heartbeat.ledger[" + std::to_string(i) + "]");
      if (!ev) return why + "a malformed ledger change, not acknowledged: " + ev.error().context();
      if (ev->seq <= applied_) continue;
      if (ev->seq != applied_ + 1) {
        why += "ledger changes " + std::to_string(applied_ + 1) + " to " + std::to_string(ev->seq - 1) +
               " were dropped by the master; the ledger is forgotten. ";
        entries_.clear();
      }
      applied_ = ev->seq;
      if (ev->entry.segment != segment_) continue;
      if (ev->add) {
        entries_[ev->entry.offset] = std::move(ev->entry);
      } else if (auto it = entries_.find(ev->entry.offset); it != entries_.end() && it->second.put_id == ev->entry.put_id) {
        entries_.erase(it);
      }
    }
    return why;
  }

  //! The last change applied: what the next heartbeat acknowledges.
  [[nodiscard]] std::uint64_t applied() const noexcept { return applied_; }
  //! The committed objects the segment holds, by offset.
  [[nodiscard]] const std::map<std::uint64_t, ledger_entry>& entries() const noexcept { return entries_; }

  //! Hands the entries over (to report to a new master) and starts again
  //! from change 1, as a new master numbers them.
  std::vector<ledger_entry> take() {
    std::vector<ledger_entry> out;
    out.reserve(entries_.size());
    for (auto& [offset, entry] : entries_) out.push_back(std::move(entry));
    entries_.clear();
    applied_ = 0;
    return out;
  }

 private:
  std::string segment_;
  std::map<std::uint64_t, ledger_entry> entries_;
  std::uint64_t applied_ = 0;
};

}  // namespace kvx::store
