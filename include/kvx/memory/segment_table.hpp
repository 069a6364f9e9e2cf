#pragma once
//! \file
//! `segment_table`: the segments this process has registered, and the one
//! place every server-side access (tcp, shm, ...) is checked before it touches
//! memory: unknown segment, wrong key and out-of-range requests are refused
//! with an error naming the segment, offset and length.
//!
//! Registration is range-aware: `find_containing` maps any sub-range of a
//! registered region back to its segment, so a sub-range needs no new
//! registration. Thread-safe. `remove` waits for accesses in flight on that
//! segment, so once it returns no server touches the region again.
//!
//! \code
//! kvx::memory::segment_table table("prefill-0");
//! auto seg = table.add("kv", region);                  // result<local_segment>
//! auto access = table.check_access("kv", seg->key, 4096, 512);
//! if (access) std::memcpy(access->data(), src, 512);   // checked, in range
//! \endcode

#include <atomic>
#include <concepts>
#include <cstdint>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <shared_mutex>
#include <span>
#include <string>
#include <thread>
#include <utility>

#include <kvx/memory/segment.hpp>

namespace kvx::memory {

namespace detail {
struct segment_entry {
  local_segment segment;
  std::atomic<int> in_flight{0};
  std::atomic<bool> removed{false};
};

inline std::uint64_t random_u64() {
  static thread_local std::mt19937_64 rng{std::random_device{}() ^
                                          (static_cast<std::uint64_t>(std::random_device{}()) << 32)};
  std::uint64_t v = 0;
  while (v == 0) v = rng();
  return v;
}
}  // namespace detail

//! The host's identity (Linux boot id): same-host transports compare it.
inline const std::string& this_host_id() {
  static const std::string id = [] {
    std::ifstream in("/proc/sys/kernel/random/boot_id");
    std::string s;
    std::getline(in, s);
    return s.empty() ? std::string("unknown-host") : s;
  }();
  return id;
}

class segment_table;

//! A checked, counted access to a segment's bytes. While it lives, the segment
//! cannot finish deregistering.
class segment_access {
 public:
  segment_access() = default;
  segment_access(segment_access&& o) noexcept
      : entry_(std::move(o.entry_)), offset_(o.offset_), length_(o.length_) {}
  segment_access& operator=(segment_access&& o) noexcept {
    release();
    entry_ = std::move(o.entry_);
    offset_ = o.offset_;
    length_ = o.length_;
    return *this;
  }
  ~segment_access() { release(); }

  [[nodiscard]] std::byte* data() const noexcept { return entry_->segment.region.data() + offset_; }
  [[nodiscard]] std::uint64_t size() const noexcept { return length_; }
  [[nodiscard]] std::span<std::byte> bytes() const noexcept { return {data(), static_cast<std::size_t>(length_)}; }
  [[nodiscard]] const local_segment& segment() const noexcept { return entry_->segment; }

 private:
  friend class segment_table;
  // Adopts one in-flight count already taken on `e`.
  segment_access(std::shared_ptr<detail::segment_entry> e, std::uint64_t offset, std::uint64_t length)
      : entry_(std::move(e)), offset_(offset), length_(length) {}
  void release() noexcept {
    if (entry_) entry_->in_flight.fetch_sub(1, std::memory_order_release);
    entry_.reset();
  }
  std::shared_ptr<detail::segment_entry> entry_;
  std::uint64_t offset_ = 0;
  std::uint64_t length_ = 0;
};

class segment_table {
 public:
  //! `generation` identifies this incarnation of the node; a fresh random one by default.
  explicit segment_table(std::string node, std::uint64_t generation = detail::random_u64())
      : node_(std::move(node)), generation_(generation) {}

  [[nodiscard]] const std::string& node() const noexcept { return node_; }
  [[nodiscard]] std::uint64_t generation() const noexcept { return generation_; }

  //! Registers `region` as `name` with a fresh random key.
  result<local_segment> add(const std::string& name, const memory_region& region) {
    if (name.empty()) return error{errc::invalid_argument, "segment name is empty"};
    if (region.address == nullptr || region.length == 0)
      return error{errc::invalid_argument, "segment '" + name + "': empty region"};
    std::unique_lock lock(mutex_);
    if (segments_.count(name)) return error{errc::already_exists, "segment '" + name + "' is already registered"};
    auto entry = std::make_shared<detail::segment_entry>();
    entry->segment = local_segment{name, region, detail::random_u64(), generation_};
    segments_.emplace(name, entry);
    return entry->segment;
  }

  //! Registers a segment another table created, keeping its key and
  //! generation (a transport's mirror of its node's registrations).
  result<local_segment> adopt(const local_segment& seg) {
    if (seg.name.empty() || seg.region.address == nullptr || seg.region.length == 0)
      return error{errc::invalid_argument, "segment '" + seg.name + "': empty name or region"};
    std::unique_lock lock(mutex_);
    if (segments_.count(seg.name)) return error{errc::already_exists, "segment '" + seg.name + "' is already registered"};
    auto entry = std::make_shared<detail::segment_entry>();
    entry->segment = seg;
    segments_.emplace(seg.name, entry);
    return entry->segment;
  }

  //! Deregisters `name`, waiting for accesses in flight to finish.
  result<void> remove(const std::string& name) {
    return remove(name, [] {});
  }
  //! As above; `stop_accesses` runs once no new access can start, before the
  //! wait: it ends the accesses that would not end on their own (a server
  //! session waiting on a stalled peer).
  template <std::invocable<> StopAccesses>
  result<void> remove(const std::string& name, StopAccesses&& stop_accesses) {
    std::shared_ptr<detail::segment_entry> entry;
    {
      std::unique_lock lock(mutex_);
      auto it = segments_.find(name);
      if (it == segments_.end()) return error{errc::unknown_segment, "deregister '" + name + "'"};
      entry = std::move(it->second);
      segments_.erase(it);
    }
    entry->removed.store(true, std::memory_order_release);
    std::forward<StopAccesses>(stop_accesses)();
    while (entry->in_flight.load(std::memory_order_acquire) != 0) std::this_thread::yield();
    return {};
  }

  [[nodiscard]] result<local_segment> find(const std::string& name) const {
    std::shared_lock lock(mutex_);
    auto it = segments_.find(name);
    if (it == segments_.end()) return error{errc::unknown_segment, "segment '" + name + "' on node '" + node_ + "'"};
    return it->second->segment;
  }

  //! The segment whose region contains [p, p + len), and the offset of p in it.
  [[nodiscard]] result<std::pair<local_segment, std::uint64_t>> find_containing(const void* p, std::size_t len) const {
    std::shared_lock lock(mutex_);
    for (const auto& [name, entry] : segments_) {
      const auto& r = entry->segment.region;
      if (r.contains(p, len))
        return std::pair{entry->segment, static_cast<std::uint64_t>(static_cast<const std::byte*>(p) - r.data())};
    }
    return error{errc::unknown_segment, "no registered segment on node '" + node_ + "' contains the " +
                                            std::to_string(len) + "-byte range"};
  }

  //! Checks a remote request and pins the segment for the access.
  [[nodiscard]] result<segment_access> check_access(const std::string& name, std::uint64_t key, std::uint64_t offset,
                                                    std::uint64_t length) const {
    std::shared_ptr<detail::segment_entry> entry;
    {
      std::shared_lock lock(mutex_);
      auto it = segments_.find(name);
      if (it == segments_.end())
        return error{errc::unknown_segment, "segment '" + name + "' on node '" + node_ + "'"};
      entry = it->second;
      entry->in_flight.fetch_add(1, std::memory_order_acquire);
    }
    segment_access access(entry, offset, length);  // releases the count on every path below
    if (entry->removed.load(std::memory_order_acquire))
      return error{errc::unknown_segment, "segment '" + name + "' is being deregistered"};
    if (key != entry->segment.key) return error{errc::bad_key, "segment '" + name + "' on node '" + node_ + "'"};
    if (!entry->segment.region.contains(offset, length))
      return error{errc::out_of_range, "segment '" + name + "' offset " + std::to_string(offset) + " length " +
                                           std::to_string(length) + " exceeds its " +
                                           std::to_string(entry->segment.region.length) + " bytes"};
    return access;
  }

  //! The descriptor peers resolve, without transport entries (the engine adds those).
  [[nodiscard]] segment_descriptor describe(const local_segment& s) const {
    segment_descriptor d;
    d.name = s.name;
    d.node = node_;
    d.length = s.region.length;
    d.where = s.region.where;
    d.key = s.key;
    d.generation = s.generation;
    d.host_id = this_host_id();
    return d;
  }

 private:
  std::string node_;
  std::uint64_t generation_;
  mutable std::shared_mutex mutex_;
  std::map<std::string, std::shared_ptr<detail::segment_entry>, std::less<>> segments_;
};

}  // namespace kvx::memory
