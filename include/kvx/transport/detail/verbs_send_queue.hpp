#pragma once
// The send side of one RC queue pair as bookkeeping only: work-request
// sequence numbers, the bound on outstanding WRs, selective signaling, and
// which operations a completion or an error completion ends. It makes no
// ibverbs call, so the arithmetic is tested without a device; the engine
// turns each planned piece into an `ibv_send_wr` whose wr_id is its sequence.

#include <infiniband/verbs.h>

#include <algorithm>
#include <cstdint>
#include <deque>
#include <string>
#include <system_error>
#include <vector>

#include <kvx/core/error.hpp>
#include <kvx/transport/detail/verbs_support.hpp>

namespace kvx::transport::detail {

//! One async_read / async_write; `finish` posts the handler and deletes it.
struct verbs_op_base {
  virtual ~verbs_op_base() = default;
  virtual void finish(std::error_code ec) = 0;
  std::byte* local = nullptr;
  std::uint32_t lkey = 0;
  std::uint64_t remote_addr = 0;
  std::uint32_t rkey = 0;
  std::uint64_t length = 0;
  std::uint64_t posted = 0;      // bytes handed to the QP so far
  std::uint64_t first_seq = 0;   // first and last WR sequence numbers of this op
  std::uint64_t last_seq = 0;
  bool is_write = false;
  bool cancelled = false;
  std::string endpoint;
};

//! One work request to post: `length` bytes at `offset` into `op`.
struct verbs_piece {
  verbs_op_base* op = nullptr;
  std::uint64_t offset = 0;
  std::uint32_t length = 0;
  std::uint64_t seq = 0;   //!< the WR's wr_id; sequences start at 1 and never repeat on one QP
  bool signaled = false;   //!< IBV_SEND_SIGNALED
};

//! What `verbs_send_queue::cancel` found.
enum class verbs_cancel_outcome {
  not_found,     //!< not in this queue (finished already, or another peer's)
  ended,         //!< it had posted nothing: it ended with `cancelled`
  break_the_qp,  //!< WRs of it are on the QP: only breaking the QP stops their DMA
};

//! Pending and in-flight operations of one queue pair. Not thread-safe.
class verbs_send_queue {
 public:
  //! `max_outstanding` WRs at most on the QP, a completion requested at least
  //! every `signal_interval` WRs, pieces of at most `max_msg` bytes.
  verbs_send_queue(std::uint32_t max_outstanding, std::uint32_t signal_interval, std::uint64_t max_msg) noexcept
      : max_outstanding_(std::max<std::uint32_t>(max_outstanding, 1)),
        signal_interval_(std::max<std::uint32_t>(signal_interval, 1)),
        max_msg_(std::min<std::uint64_t>(std::max<std::uint64_t>(max_msg, 1), std::uint64_t{1} << 31)) {}

  void push(verbs_op_base* op) { pending_.push_back(op); }

  //! WRs posted and not known to be complete.
  [[nodiscard]] std::uint64_t outstanding() const noexcept { return next_seq_ - 1 - retired_; }
  [[nodiscard]] const std::deque<verbs_op_base*>& pending() const noexcept { return pending_; }
  [[nodiscard]] const std::deque<verbs_op_base*>& inflight() const noexcept { return inflight_; }
  [[nodiscard]] bool busy() const noexcept { return !pending_.empty() || !inflight_.empty(); }

  //! Cuts pending ops into pieces while the window has room. A completion is
  //! requested every `signal_interval` WRs and on the last piece of the burst
  //! (RC completes in order, so one completion retires every WR before it,
  //! and nothing later may come to report an unsignaled tail). Ops whose last
  //! piece is planned move to the in-flight list; a partly planned op stays
  //! at the front of the pending list.
  std::vector<verbs_piece> plan_burst() {
    std::vector<verbs_piece> out;
    while (!pending_.empty()) {
      auto* op = pending_.front();
      while (op->posted < op->length && outstanding() < max_outstanding_) {
        verbs_piece piece;
        piece.op = op;
        piece.offset = op->posted;
        piece.length = static_cast<std::uint32_t>(std::min(op->length - op->posted, max_msg_));
        piece.seq = next_seq_++;
        if (++unsignaled_ >= signal_interval_) {
          piece.signaled = true;
          unsignaled_ = 0;
        }
        if (op->posted == 0) op->first_seq = piece.seq;
        op->last_seq = piece.seq;
        op->posted += piece.length;
        out.push_back(piece);
      }
      if (op->posted < op->length) break;  // the window is full
      inflight_.push_back(op);
      pending_.pop_front();
    }
    if (!out.empty() && !out.back().signaled) {
      out.back().signaled = true;
      unsignaled_ = 0;
    }
    return out;
  }

  //! A successful completion of WR `seq`: every WR up to it is done; the ops
  //! whose last WR that covers end with success.
  void complete(std::uint64_t seq) {
    retired_ = std::max(retired_, seq);
    while (!inflight_.empty() && inflight_.front()->last_seq <= seq) {
      auto* op = inflight_.front();
      inflight_.pop_front();
      op->finish({});  // done before any cancellation could stop it
    }
  }

  //! An error completion of WR `seq`. RC stops at the first failing WR, so
  //! ops wholly before it succeeded, the op holding it gets the mapped error,
  //! and a flush (the QP was already in error) is `connection_lost`. Ops after
  //! `seq` are left to their own flush completions or to `end_inflight`. A
  //! partly posted op hit by the error ends too (retrying it would only hit
  //! the same refusal). The caller breaks the QP afterwards.
  void fail(std::uint64_t seq, ibv_wc_status status) {
    const bool flushed = status == IBV_WC_WR_FLUSH_ERR;
    const std::error_code mapped = verbs_wc_error(status);
    auto verdict = [&](const verbs_op_base& op) -> std::error_code {
      if (op.cancelled) return errc::cancelled;
      if (flushed) return errc::connection_lost;
      if (op.last_seq < seq) return {};
      return mapped;
    };
    while (!inflight_.empty() && inflight_.front()->first_seq <= seq) {
      auto* op = inflight_.front();
      inflight_.pop_front();
      op->finish(verdict(*op));
    }
    // A flushed partial op is retried on the next QP like any unposted one.
    if (!flushed && !pending_.empty()) {
      auto* op = pending_.front();
      if (op->posted > 0 && op->first_seq <= seq && seq <= op->last_seq) {
        pending_.pop_front();
        op->finish(verdict(*op));
      }
    }
  }

  //! The QP is gone (its flush is over, or it was destroyed): every op with
  //! WRs on it ends with `connection_lost` (`cancelled` when cancelled).
  void end_inflight() {
    for (auto* op : inflight_) op->finish(op->cancelled ? errc::cancelled : errc::connection_lost);
    inflight_.clear();
  }

  //! For a fresh QP: the ops not fully posted, reset to start over (RDMA READ
  //! and WRITE are idempotent); cancelled ones end here instead.
  std::deque<verbs_op_base*> take_pending() {
    std::deque<verbs_op_base*> out;
    for (auto* op : pending_) {
      if (op->cancelled) {
        op->finish(errc::cancelled);
        continue;
      }
      op->posted = 0;
      out.push_back(op);
    }
    pending_.clear();
    return out;
  }

  //! Every op, pending or in flight, ends with `ec` (shutdown, failed handshake).
  void end_all(std::error_code ec) {
    for (auto* op : inflight_) op->finish(ec);
    for (auto* op : pending_) op->finish(ec);
    inflight_.clear();
    pending_.clear();
  }

  //! Cancels `op` if it is here (see `verbs_cancel_outcome`).
  verbs_cancel_outcome cancel(verbs_op_base* op) {
    for (auto it = pending_.begin(); it != pending_.end(); ++it) {
      if (*it != op) continue;
      if (op->posted == 0) {
        pending_.erase(it);
        op->finish(errc::cancelled);
        return verbs_cancel_outcome::ended;
      }
      op->cancelled = true;
      return verbs_cancel_outcome::break_the_qp;
    }
    if (std::find(inflight_.begin(), inflight_.end(), op) == inflight_.end()) return verbs_cancel_outcome::not_found;
    op->cancelled = true;
    return verbs_cancel_outcome::break_the_qp;
  }

 private:
  std::uint32_t max_outstanding_;
  std::uint32_t signal_interval_;
  std::uint64_t max_msg_;
  std::deque<verbs_op_base*> pending_;   // not (fully) posted yet, in order
  std::deque<verbs_op_base*> inflight_;  // fully posted, ordered by last_seq
  std::uint64_t next_seq_ = 1;
  std::uint64_t retired_ = 0;            // every WR <= retired_ has completed
  std::uint32_t unsignaled_ = 0;         // WRs since the last signaled one
};

}  // namespace kvx::transport::detail
