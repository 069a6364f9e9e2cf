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
//! for the remainder. `load_many` returns, by an exception from `on_block`
//! too, only once none of its reads is left in the kernel (those in flight
//! are cancelled and waited for): nothing lands in the caller's buffers
//! afterwards and a later call never sees its completions.
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

#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <span>
#include <string>
#include <system_error>
#include <thread>
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
  //! flight; `on_block(i, ec)` once per key, in completion order. Returns,
  //! normally or by an exception from `on_block`, only once the kernel holds
  //! no read of this call (those in flight are cancelled and waited for):
  //! no block lands in a buffer afterwards, no completion is left for a later
  //! call, and after a throw no further `on_block` runs.
  template <class OnBlock>
  void load_many(std::span<const block_key> keys, std::span<const std::span<std::byte>> outs, OnBlock&& on_block) {
    std::lock_guard lock(ring_mu_);
    batch b(*this, keys.size());
    std::size_t next = 0, done = 0;
    while (done < keys.size()) {
      while (b.inflight < depth_ && next < keys.size()) {
        op& o = b.ops[next];
        if (!prepare(o, next, keys, outs, on_block)) {
          ++done;
        } else if (!submit_read(b, o)) {
          o.active = false;
          ++done;
          on_block(next, std::error_code(EBUSY, std::generic_category()));
        } else if (b.inflight++ == 0 && next == 0) {
          // Start the first read at once rather than after the whole window
          // is queued: it is what the caller waits for first.
          ::io_uring_submit(&ring_);
        }
        ++next;
      }
      if (b.inflight == 0) continue;
      io_uring_cqe* cqe = nullptr;
      if (const int r = next_completion(cqe); r == -EINTR) {
        continue;
      } else if (r < 0) {  // the ring failed: the reads in flight fail, once the kernel is done with their buffers
        settle(b);
        for (std::size_t i = 0; i < next; ++i)
          if (b.ops[i].lost) {
            b.ops[i].lost = false;
            ++done;
            on_block(i, std::error_code(-r, std::generic_category()));
          }
        continue;
      }
      const std::uint64_t tag = ::io_uring_cqe_get_data64(cqe);
      const int res = cqe->res;
      ::io_uring_cqe_seen(&ring_, cqe);
      op* const found = b.owner(tag);
      if (!found) continue;  // not one of this call's reads (see batch)
      op& o = *found;
      const std::size_t i = o.index;
      if (res > 0) {
        o.done += static_cast<std::uint64_t>(res);
        if (o.done < o.len) {  // short read: the rest
          if (submit_read(b, o)) continue;
          o.active = false;
          --b.inflight;
          ++done;
          on_block(i, std::error_code(EBUSY, std::generic_category()));
          continue;
        }
      }
      o.active = false;
      --b.inflight;
      ++done;
      if (res < 0) {
        on_block(i, std::error_code(-res, std::generic_category()));
      } else if (res == 0) {
        on_block(i, make_error_code(errc::io_error));
      } else {
        if (o.bounce) std::memcpy(o.out, o.bounce.get(), o.size);
        o.bounce.reset();
        on_block(i, std::error_code{});
      }
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
    bool active = false;        // a read of it is queued or in the kernel
    bool lost = false;          // settled while active: not yet reported
    detail::aligned_buffer bounce;
  };

  // A read's user_data: the call's generation above the op's index, so that a
  // completion of another call (there should be none: see batch) is never
  // taken for one of this call's. Indexes fit in 48 bits: a span of 2^48
  // 16-byte keys exceeds the address space.
  static constexpr unsigned index_bits = 48;
  static constexpr std::uint64_t index_mask = (std::uint64_t{1} << index_bits) - 1;
  static constexpr std::uint64_t cancel_index = index_mask;  // the cancel request's own completion

  // One load_many call's reads. Its destructor (settle) runs on every way
  // out, an exception from on_block included: the ring is single and shared
  // by the tier's calls, so a read left in it would complete into the next
  // call (as a block it did not read) and into buffers already given back.
  struct batch {
    batch(uring_file_tier& tier, std::size_t n) : t(tier), gen(++tier.generation_), ops(n) {}
    batch(const batch&) = delete;
    batch& operator=(const batch&) = delete;
    ~batch() { t.settle(*this); }

    std::uint64_t tag(std::size_t i) const noexcept { return (gen << index_bits) | i; }
    op* owner(std::uint64_t tag_value) noexcept {
      const std::uint64_t i = tag_value & index_mask;
      if (tag_value >> index_bits != (gen & (~std::uint64_t{0} >> index_bits)) || i >= ops.size() || !ops[i].active)
        return nullptr;
      return &ops[i];
    }

    uring_file_tier& t;
    std::uint64_t gen;
    std::vector<op> ops;
    std::size_t inflight = 0;  // ops with a read queued or in the kernel
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

  io_uring_sqe* get_sqe() noexcept {
    io_uring_sqe* sqe = ::io_uring_get_sqe(&ring_);
    if (!sqe) {  // queue full of unsubmitted entries: flush and retry
      ::io_uring_submit(&ring_);
      sqe = ::io_uring_get_sqe(&ring_);
    }
    return sqe;
  }

  bool submit_read(const batch& b, op& o) noexcept {
    io_uring_sqe* sqe = get_sqe();
    if (!sqe) return false;
    ::io_uring_prep_read(sqe, this->native_handle(), o.dst + o.done, static_cast<unsigned>(o.len - o.done),
                         o.offset + o.done);
    ::io_uring_sqe_set_data64(sqe, b.tag(o.index));
    return true;
  }

  // Submits what is queued and takes the next completion: 0, or -errno
  // (-EINTR: try again). A failed submission with nothing completed is an
  // error rather than a wait: the reads it left queued may be all there is.
  // No system call when a completion is already there and nothing is queued.
  int next_completion(io_uring_cqe*& cqe) noexcept {
    const int s = ::io_uring_submit(&ring_);
    if (::io_uring_peek_cqe(&ring_, &cqe) == 0 && cqe) return 0;
    if (s < 0) return s;
    return ::io_uring_wait_cqe(&ring_, &cqe);
  }

  // Cancels the batch's reads still queued or in the kernel and waits for
  // each one's completion; those are then marked lost. A read the kernel
  // cannot cancel (already at the device) is waited for. Errors of the ring
  // are retried, never given up on: returning while the kernel may still
  // write into the caller's buffers is not an option.
  void settle(batch& b) noexcept {
    if (b.inflight == 0) return;
    bool cancel_pending = false;
    if (io_uring_sqe* sqe = get_sqe()) {
      // One request cancels every read on the ring: the ring is this call's alone (ring_mu_).
      ::io_uring_prep_cancel64(sqe, 0, IORING_ASYNC_CANCEL_ALL | IORING_ASYNC_CANCEL_ANY);
      ::io_uring_sqe_set_data64(sqe, b.tag(cancel_index));
      cancel_pending = true;
    }
    while (b.inflight > 0 || cancel_pending) {
      io_uring_cqe* cqe = nullptr;
      if (const int r = next_completion(cqe); r < 0) {
        if (r != -EINTR) std::this_thread::sleep_for(std::chrono::milliseconds(1));
        continue;
      }
      const std::uint64_t tag = ::io_uring_cqe_get_data64(cqe);
      ::io_uring_cqe_seen(&ring_, cqe);
      if (tag == b.tag(cancel_index)) {
        cancel_pending = false;
      } else if (op* o = b.owner(tag)) {
        o->active = false;
        o->lost = true;
        --b.inflight;
      }
    }
  }

  unsigned depth_;
  std::uint64_t generation_ = 0;  // load_many calls so far (under ring_mu_)
  std::mutex ring_mu_;
  io_uring ring_{};
};

}  // namespace kvx::cache
