#pragma once
//! \file
//! `kvx::cache::dram_tier<Allocator>`: a host-DRAM tier, one arena carved by
//! an allocator policy (`offset_allocator`, best fit; or `slab_allocator`).
//!
//! The arena is one anonymous mapping, asked for transparent huge pages and
//! pre-faulted (`MADV_POPULATE_WRITE`), so every page is in at construction: on the virtual machines kvx is tested on,
//! the first write into fresh memory costs about 2.9 ms per MiB (DESIGN.md,
//! "Zero copy"), more than the copy itself, and it must not land inside a
//! store or a transfer. `base()` and `length()` expose the arena so it can be
//! registered once as a transfer-engine segment; `locate(k)` gives a block's
//! offset in it for zero-copy reads by a peer.
//!
//! Placement (`kvx/cache/tier.hpp`): `place`, `write_at`, `read_at` and
//! `unplace` carve and copy ranges of the arena for a caller that keeps its
//! own index, as `tiered_cache` does, so a block costs one index entry, not
//! two. Such blocks are not in the tier's key index (`contains`, `locate`
//! and `blocks` do not count them; `used_bytes` does): under a cache, ask
//! the cache (`tiered_cache::locate`).
//!
//! Thread safety: all members may be called concurrently; the index and the
//! allocator sit under one mutex held for O(log n) bookkeeping, and the bytes
//! are copied outside it (see `kvx/cache/tier.hpp` for the caller's duty not
//! to erase a block being loaded). The constructor throws `std::system_error`
//! if the arena cannot be mapped and `std::invalid_argument` for a bad config.
//!
//! \code
//! kvx::cache::dram_tier<> dram({.capacity = 1 << 30});
//! dram.store(key, bytes);
//! dram.load(key, out);
//! register_segment("kv-dram", dram.base(), dram.length());
//! \endcode

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>

#include <kvx/cache/block_key.hpp>
#include <kvx/cache/detail/flat_key_map.hpp>
#include <kvx/cache/tier.hpp>
#include <kvx/core/result.hpp>
#include <kvx/memory/allocator.hpp>
#include <kvx/memory/offset_allocator.hpp>

namespace kvx::cache {

struct dram_tier_config {
  std::uint64_t capacity = 0;     //!< arena bytes
  std::string name = "dram";      //!< metrics label
  watermarks marks{};
  std::uint64_t alignment = 64;   //!< block start alignment (a power of two; 64 = a cache line)
  bool populate = true;           //!< pre-fault the arena (MADV_POPULATE_WRITE)
};

template <class Allocator = memory::offset_allocator>
class dram_tier {
  static_assert(memory::check_allocator<Allocator>());

 public:
  using tier_concept = tier_tag;
  static constexpr bool host_accessible = true;

  explicit dram_tier(dram_tier_config cfg) : cfg_(std::move(cfg)), alloc_(make_alloc(cfg_)) {
    if (cfg_.capacity == 0) throw std::invalid_argument("kvx: dram_tier '" + cfg_.name + "': capacity is 0");
    if (!memory::detail::is_pow2(cfg_.alignment))
      throw std::invalid_argument("kvx: dram_tier '" + cfg_.name + "': alignment is not a power of two");
    if (auto ok = validate(cfg_.marks, "dram_tier '" + cfg_.name + "' watermarks"); !ok)
      throw std::invalid_argument("kvx: " + ok.error().message());
    // The offset allocator counts whole alignment units: a capacity below one
    // would make a tier that refuses every block.
    if (alloc_.capacity() == 0)
      throw std::invalid_argument("kvx: dram_tier '" + cfg_.name + "': capacity " + std::to_string(cfg_.capacity) +
                                  " is below one alignment unit of " + std::to_string(cfg_.alignment) + " bytes");
    void* p = ::mmap(nullptr, cfg_.capacity, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
      throw std::system_error(errno, std::generic_category(),
                              "kvx: dram_tier '" + cfg_.name + "': mmap of " + std::to_string(cfg_.capacity) + " bytes");
    base_ = static_cast<std::byte*>(p);
    // Huge pages where the kernel has them (a hint), then fault everything
    // in: block accesses all over a large arena should not miss the TLB too.
    (void)::madvise(p, cfg_.capacity, MADV_HUGEPAGE);
    if (cfg_.populate) populate();
  }
  dram_tier(const dram_tier&) = delete;
  dram_tier& operator=(const dram_tier&) = delete;
  ~dram_tier() { ::munmap(base_, cfg_.capacity); }

  [[nodiscard]] std::string_view name() const noexcept { return cfg_.name; }
  [[nodiscard]] std::uint64_t capacity() const noexcept { return alloc_capacity_(); }
  [[nodiscard]] std::uint64_t used_bytes() const {
    std::lock_guard lock(mu_);
    return alloc_.capacity() - alloc_.free_bytes();
  }
  [[nodiscard]] watermarks marks() const noexcept { return cfg_.marks; }
  //! Bytes a block of `n` bytes occupies in the arena.
  [[nodiscard]] std::uint64_t footprint(std::uint64_t n) const noexcept {
    if constexpr (requires { alloc_.granted_size(n); })
      return std::max(alloc_.granted_size(n), memory::detail::align_up(n, cfg_.alignment));
    else
      return memory::detail::align_up(n, cfg_.alignment);
  }

  //! The arena, for registration as a transfer segment.
  [[nodiscard]] std::byte* base() const noexcept { return base_; }
  [[nodiscard]] std::uint64_t length() const noexcept { return cfg_.capacity; }

  result<void> store(const block_key& k, std::span<const std::byte> in) {
    if (in.empty()) return error{errc::invalid_argument, "dram_tier '" + cfg_.name + "': store of an empty block " + k.to_string()};
    memory::allocation a;
    {
      std::lock_guard lock(mu_);
      if (index_.contains(k)) return error{errc::already_exists, "dram_tier '" + cfg_.name + "': block " + k.to_string()};
      auto got = alloc_.allocate(in.size(), cfg_.alignment);
      if (!got)
        return error{errc::capacity_exceeded, "dram_tier '" + cfg_.name + "': no free range of " +
                                                  std::to_string(in.size()) + " bytes for block " + k.to_string()};
      a = *got;
    }
    std::memcpy(base_ + a.offset, in.data(), in.size());
    std::lock_guard lock(mu_);
    if (!index_.try_emplace(k, slot{a, in.size()}).second) {
      alloc_.deallocate(a);  // a concurrent store of the same key won
      return error{errc::already_exists, "dram_tier '" + cfg_.name + "': block " + k.to_string()};
    }
    return {};
  }

  result<std::size_t> load(const block_key& k, std::span<std::byte> out) const {
    slot s;
    {
      std::lock_guard lock(mu_);
      auto it = index_.find(k);
      if (it == index_.end()) return error{errc::not_found, "dram_tier '" + cfg_.name + "': block " + k.to_string()};
      s = it->second;
    }
    if (out.size() < s.size)
      return error{errc::out_of_range, "dram_tier '" + cfg_.name + "': block " + k.to_string() + " has " +
                                           std::to_string(s.size) + " bytes, buffer " + std::to_string(out.size())};
    std::memcpy(out.data(), base_ + s.where.offset, s.size);
    return static_cast<std::size_t>(s.size);
  }

  // --- placement: the caller keeps the index -------------------------------

  //! A range of the arena for a block of `n` bytes (`footprint(n)` long), or
  //! `std::nullopt` if no free range is large enough.
  [[nodiscard]] std::optional<memory::allocation> place(std::uint64_t n) {
    if (n == 0) return std::nullopt;
    std::lock_guard lock(mu_);
    return alloc_.allocate(n, cfg_.alignment);
  }
  //! Copies `in` to the start of `a` (outside any lock).
  result<void> write_at(const memory::allocation& a, std::span<const std::byte> in) {
    if (in.size() > a.size)
      return error{errc::out_of_range, "dram_tier '" + cfg_.name + "': write of " + std::to_string(in.size()) +
                                           " bytes into a range of " + std::to_string(a.size)};
    std::memcpy(base_ + a.offset, in.data(), in.size());
    return {};
  }
  //! Copies the first `out.size()` bytes of `a` into `out`.
  result<std::size_t> read_at(const memory::allocation& a, std::span<std::byte> out) const {
    if (out.size() > a.size)
      return error{errc::out_of_range, "dram_tier '" + cfg_.name + "': read of " + std::to_string(out.size()) +
                                           " bytes from a range of " + std::to_string(a.size)};
    std::memcpy(out.data(), base_ + a.offset, out.size());
    return out.size();
  }
  //! Returns a range from `place`.
  void unplace(const memory::allocation& a) {
    std::lock_guard lock(mu_);
    alloc_.deallocate(a);
  }

  bool erase(const block_key& k) {
    std::lock_guard lock(mu_);
    auto it = index_.find(k);
    if (it == index_.end()) return false;
    alloc_.deallocate(it->second.where);
    index_.erase(it);
    return true;
  }

  [[nodiscard]] bool contains(const block_key& k) const {
    std::lock_guard lock(mu_);
    return index_.contains(k);
  }
  [[nodiscard]] std::optional<std::uint64_t> size_of(const block_key& k) const {
    std::lock_guard lock(mu_);
    auto it = index_.find(k);
    if (it == index_.end()) return std::nullopt;
    return it->second.size;
  }
  //! Where block `k` sits in the arena (offset and granted size), for zero-copy access.
  [[nodiscard]] std::optional<memory::allocation> locate(const block_key& k) const {
    std::lock_guard lock(mu_);
    auto it = index_.find(k);
    if (it == index_.end()) return std::nullopt;
    return memory::allocation{it->second.where.offset, it->second.size};
  }
  [[nodiscard]] std::size_t blocks() const {
    std::lock_guard lock(mu_);
    return index_.size();
  }

 private:
  void populate() noexcept {
#ifdef MADV_POPULATE_WRITE
    if (::madvise(base_, cfg_.capacity, MADV_POPULATE_WRITE) == 0) return;
#endif
    const auto page = static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
    for (std::uint64_t off = 0; off < cfg_.capacity; off += page) base_[off] = std::byte{0};
  }

  struct slot {
    memory::allocation where;
    std::uint64_t size = 0;
  };
  std::uint64_t alloc_capacity_() const noexcept { return alloc_.capacity(); }
  // The offset allocator's granule is the block alignment, so small blocks
  // are not rounded up to its default 256 bytes.
  static Allocator make_alloc(const dram_tier_config& c) {
    if constexpr (std::is_constructible_v<Allocator, std::uint64_t, std::uint64_t>)
      return memory::detail::is_pow2(c.alignment) ? Allocator(c.capacity, c.alignment) : Allocator(c.capacity);
    else
      return Allocator(c.capacity);
  }

  dram_tier_config cfg_;
  mutable std::mutex mu_;
  Allocator alloc_;
  detail::flat_key_map<slot> index_;
  std::byte* base_ = nullptr;
};

}  // namespace kvx::cache
