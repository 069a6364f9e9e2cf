#pragma once
//! \file
//! `kvx::cache::uring_file_tier<Allocator>`: the file tier with an io_uring
//! backend (Debian's liburing) for pipelined multi-block loads. Needs the
//! `kvx::uring` target (`KVX_WITH_URING`).
//!
//! Single-block `store`/`load` are those of `file_tier` (pread/pwrite, which
//! run concurrently from many threads). `load_many` keeps up to
//! `queue_depth` reads in flight on the tier's ring and calls
//! `on_block(i, ec)` as each block lands, in completion order, so the first
//! block of a long prefix is usable long before the last one arrives
//! (benchmarks/file_tier_bench measures both). Short reads are resubmitted
//! for the remainder.
//!
//! Thread safety: as `file_tier`; concurrent `load_many` calls on one tier
//! take turns on its ring (one mutex), while `load`/`store` never touch it.
//! The constructor throws `std::system_error` when `io_uring_queue_init`
//! fails (old kernels, seccomp sandboxes): `probe()` tells beforehand.
//!
//! \code
//! if (auto ec = kvx::cache::uring_file_tier<>::probe()) use_plain_file_tier(); else {
//!   kvx::cache::uring_file_tier<> ssd({.path = "/mnt/nvme", .capacity = 64ULL << 30}, 64);
//!   ssd.load_many(keys, buffers, [](std::size_t i, std::error_code ec) { hand_to_gpu(i); });
//! }
//! \endcode

#include <liburing.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <span>
#include <string>
#include <system_error>
#include <vector>

#include <kvx/cache/tiers/file_tier.hpp>
#include <kvx/features.hpp>

namespace kvx::cache {

template <class Allocator = memory::offset_allocator>
class uring_file_tier : public file_tier<Allocator> {
  using base = file_tier<Allocator>;

 public:
  //! Whether this process can create an io_uring (an error says why not).
  static std::error_code probe() noexcept {
    io_uring ring;
    if (const int r = ::io_uring_queue_init(1, &ring, 0); r < 0) return {-r, std::generic_category()};
    ::io_uring_queue_exit(&ring);
    return {};
  }

  explicit uring_file_tier(file_tier_config cfg, unsigned queue_depth = 32)
      : base(std::move(cfg)), depth_(queue_depth == 0 ? 1 : queue_depth) {
    if (const int r = ::io_uring_queue_init(depth_, &ring_, 0); r < 0)
      throw std::system_error(-r, std::generic_category(),
                              "kvx: uring file tier '" + std::string(this->name()) + "': io_uring_queue_init");
  }
  uring_file_tier(const uring_file_tier&) = delete;
  uring_file_tier& operator=(const uring_file_tier&) = delete;
  ~uring_file_tier() { ::io_uring_queue_exit(&ring_); }

  [[nodiscard]] unsigned queue_depth() const noexcept { return depth_; }

  //! Loads `keys[i]` into `outs[i]` with up to `queue_depth()` reads in
  //! flight; `on_block(i, ec)` once per key, in completion order.
  template <class OnBlock>
  void load_many(std::span<const block_key> keys, std::span<const std::span<std::byte>> outs, OnBlock&& on_block) {
    std::lock_guard lock(ring_mu_);
    std::vector<op> ops(keys.size());
    std::size_t next = 0, done = 0, inflight = 0;
    while (done < keys.size()) {
      while (inflight < depth_ && next < keys.size()) {
        if (prepare(ops[next], next, keys, outs, on_block)) {
          submit_read(ops[next]);
          // Start the first read at once rather than after the whole window
          // is queued: it is what the caller waits for first.
          if (inflight++ == 0 && next == 0) ::io_uring_submit(&ring_);
        } else {
          ++done;
        }
        ++next;
      }
      if (inflight == 0) continue;
      ::io_uring_submit(&ring_);
      io_uring_cqe* cqe = nullptr;
      int r = ::io_uring_wait_cqe(&ring_, &cqe);
      if (r == -EINTR) continue;
      if (r < 0) {  // the ring itself failed: every read in flight is lost
        fail_inflight(ops, next, std::error_code(-r, std::generic_category()), on_block);
        done += inflight;
        inflight = 0;
        continue;
      }
      const std::size_t i = static_cast<std::size_t>(::io_uring_cqe_get_data64(cqe));
      const int res = cqe->res;
      ::io_uring_cqe_seen(&ring_, cqe);
      op& o = ops[i];
      if (res < 0 || res == 0) {
        o.active = false;
        on_block(i, res < 0 ? std::error_code(-res, std::generic_category()) : make_error_code(errc::io_error));
      } else {
        o.done += static_cast<std::uint64_t>(res);
        if (o.done < o.len) {
          submit_read(o);  // short read: the rest
          continue;
        }
        o.active = false;
        if (o.bounce) std::memcpy(o.out, o.bounce.get(), o.size);
        o.bounce.reset();
        on_block(i, std::error_code{});
      }
      --inflight;
      ++done;
    }
  }

 private:
  struct op {
    std::size_t index = 0;
    std::byte* out = nullptr;   // caller's buffer
    std::byte* dst = nullptr;   // where the read lands (out or bounce)
    std::uint64_t size = 0;     // block bytes
    std::uint64_t len = 0;      // bytes to read
    std::uint64_t offset = 0;   // file offset
    std::uint64_t done = 0;
    bool active = false;
    detail::aligned_buffer bounce;
  };

  template <class OnBlock>
  bool prepare(op& o, std::size_t i, std::span<const block_key> keys, std::span<const std::span<std::byte>> outs,
               OnBlock& on_block) {
    if (i >= outs.size()) {
      on_block(i, make_error_code(errc::out_of_range));
      return false;
    }
    auto s = this->find(keys[i]);
    if (!s) {
      on_block(i, make_error_code(errc::not_found));
      return false;
    }
    if (outs[i].size() < s->size) {
      on_block(i, make_error_code(errc::out_of_range));
      return false;
    }
    o.index = i;
    o.out = outs[i].data();
    o.size = s->size;
    o.offset = s->where.offset;
    o.done = 0;
    if (!this->direct() || detail::is_direct_friendly(o.out, s->size)) {
      o.dst = o.out;
      o.len = s->size;
    } else {
      o.bounce = detail::make_aligned(s->where.size);
      if (!o.bounce) {
        on_block(i, make_error_code(errc::capacity_exceeded));
        return false;
      }
      o.dst = o.bounce.get();
      o.len = s->where.size;
    }
    o.active = true;
    return true;
  }

  void submit_read(op& o) {
    io_uring_sqe* sqe = ::io_uring_get_sqe(&ring_);
    if (!sqe) {  // queue full of unsubmitted entries: flush and retry
      ::io_uring_submit(&ring_);
      sqe = ::io_uring_get_sqe(&ring_);
    }
    ::io_uring_prep_read(sqe, this->native_handle(), o.dst + o.done, static_cast<unsigned>(o.len - o.done),
                         o.offset + o.done);
    ::io_uring_sqe_set_data64(sqe, o.index);
  }

  template <class OnBlock>
  void fail_inflight(std::vector<op>& ops, std::size_t upto, std::error_code ec, OnBlock& on_block) {
    for (std::size_t i = 0; i < upto; ++i)
      if (ops[i].active) {
        ops[i].active = false;
        on_block(i, ec);
      }
  }

  unsigned depth_;
  std::mutex ring_mu_;
  io_uring ring_{};
};

}  // namespace kvx::cache
