#pragma once
//! \file
//! Batches of transfer operations and their results.
//!
//! An operation moves `count` equally strided blocks of `block_length` bytes
//! between this process's registered memory (`local_blocks`: a pointer into
//! any registered region, or a `local_segment` and an offset) and a remote
//! segment (`remote_blocks`: segment name and offset). Block `i` is
//! `[base + i * stride, + block_length)` on each side, so a 64-layer x
//! 1,000-block KV transfer is 64 operations (or one, when layers are equally
//! spaced), not 64,000. A stride of 0 means "contiguous" (`block_length`).
//!
//! The engine completes a batch with `void(std::error_code, batch_result)`:
//! the code is the first failed operation's (or `cancelled`, `timed_out`),
//! and `batch_result` has a status per operation with the context of its
//! error (segment, node, op index, offset, transport).
//!
//! \code
//! kvx::transfer::batch b;
//! b.read(std::span(dst), "decode-0/kv", 4096);                         // one contiguous range
//! b.add(kvx::transfer::transfer_op::read_blocks({layer0, 2 << 20}, {"prefill-0/kv", 0, 1 << 20}, 64, 16384));
//! auto [ec, res] = co_await engine.async_transfer(std::move(b), asio::as_tuple(asio::use_awaitable));
//! \endcode

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include <kvx/core/error.hpp>
#include <kvx/memory/segment.hpp>

namespace kvx::transfer {

enum class op_kind : std::uint8_t { read, write };

inline constexpr const char* to_string(op_kind k) noexcept { return k == op_kind::read ? "read" : "write"; }

//! The local side: blocks starting at `base` (inside memory registered with the engine), `stride` apart.
struct local_blocks {
  std::byte* base = nullptr;
  std::uint64_t stride = 0;  //!< 0: contiguous

  //! Blocks inside a registered segment, from `offset`.
  static local_blocks in(const memory::local_segment& seg, std::uint64_t offset, std::uint64_t stride = 0) {
    return {seg.region.data() + offset, stride};
  }
};

//! The remote side: blocks of segment `segment` from `offset`, `stride` apart.
struct remote_blocks {
  std::string segment;
  std::uint64_t offset = 0;
  std::uint64_t stride = 0;  //!< 0: contiguous
  //! The key of the registration the operation was planned against (its
  //! descriptor's `key`); the operation fails with `errc::stale` when the name
  //! holds another registration (the owner restarted and registered it
  //! again). 0: whichever registration the name has.
  std::uint64_t key = 0;
};

//! One operation of a batch.
struct transfer_op {
  op_kind kind = op_kind::read;
  local_blocks local;
  remote_blocks remote;
  std::uint64_t count = 1;
  std::uint64_t block_length = 0;

  [[nodiscard]] std::uint64_t local_stride() const noexcept { return local.stride ? local.stride : block_length; }
  [[nodiscard]] std::uint64_t remote_stride() const noexcept { return remote.stride ? remote.stride : block_length; }
  //! Bytes moved when the operation succeeds (saturates instead of overflowing).
  [[nodiscard]] std::uint64_t total_bytes() const noexcept {
    if (block_length != 0 && count > UINT64_MAX / block_length) return UINT64_MAX;
    return count * block_length;
  }

  static transfer_op read(std::span<std::byte> dst, std::string segment, std::uint64_t offset) {
    return {op_kind::read, {dst.data(), 0}, {std::move(segment), offset, 0}, 1, dst.size()};
  }
  static transfer_op write(std::span<const std::byte> src, std::string segment, std::uint64_t offset) {
    return {op_kind::write, {const_cast<std::byte*>(src.data()), 0}, {std::move(segment), offset, 0}, 1, src.size()};
  }
  static transfer_op read_blocks(local_blocks local, remote_blocks remote, std::uint64_t count, std::uint64_t block_length) {
    return {op_kind::read, local, std::move(remote), count, block_length};
  }
  static transfer_op write_blocks(local_blocks local, remote_blocks remote, std::uint64_t count, std::uint64_t block_length) {
    return {op_kind::write, local, std::move(remote), count, block_length};
  }
};

//! Operations moved together, with an optional deadline for the whole batch.
struct batch {
  std::vector<transfer_op> ops;
  //! Overrides the engine's default deadline; expiry completes the batch with `errc::timed_out`.
  std::optional<std::chrono::steady_clock::duration> deadline{};

  batch& add(transfer_op op) {
    ops.push_back(std::move(op));
    return *this;
  }
  batch& read(std::span<std::byte> dst, std::string segment, std::uint64_t offset) {
    return add(transfer_op::read(dst, std::move(segment), offset));
  }
  batch& write(std::span<const std::byte> src, std::string segment, std::uint64_t offset) {
    return add(transfer_op::write(src, std::move(segment), offset));
  }
  [[nodiscard]] std::size_t size() const noexcept { return ops.size(); }
};

//! The outcome of one operation.
struct op_status {
  std::error_code code;         //!< empty on success
  std::string context;          //!< where it failed: op index, kind, segment, node, offset, transport
  std::uint64_t bytes = 0;      //!< bytes moved by slices that succeeded
  std::uint32_t retries = 0;    //!< slices re-issued after transient errors
  std::string transport;        //!< the transport chosen for it ("" if none could be)

  [[nodiscard]] bool ok() const noexcept { return !code; }
  [[nodiscard]] kvx::error error() const { return {code, context}; }
};

//! The outcome of a batch: one status per operation, in batch order.
struct batch_result {
  std::vector<op_status> ops;
  std::uint64_t bytes = 0;    //!< total bytes moved
  std::uint32_t retries = 0;  //!< total slices re-issued
  std::uint32_t re_resolutions = 0;  //!< descriptors fetched again after stale / bad-key / unknown errors

  [[nodiscard]] bool ok() const noexcept {
    for (const auto& s : ops)
      if (!s.ok()) return false;
    return true;
  }
  //! The first failed operation's error (with its context), or an empty error.
  [[nodiscard]] kvx::error first_error() const {
    for (const auto& s : ops)
      if (!s.ok()) return s.error();
    return {};
  }
};

}  // namespace kvx::transfer
