#pragma once
//! \file
//! `kvx::transport::verbs`: one-sided RDMA READ and WRITE over libibverbs
//! reliable-connected queue pairs (InfiniBand, RoCE, SoftRoCE `rxe`). Needs
//! the `kvx::verbs` target (Debian `libibverbs-dev`).
//!
//! - One device, protection domain, completion queue and completion channel
//!   per transport object. The device is chosen by name (`device`), else the
//!   first one; `verbs::nearest_device(region, topo)` names the NIC nearest to
//!   a buffer (same PCIe switch as its GPU, same NUMA node as host memory).
//! - `register_memory(seg)` registers the region with a registration cache:
//!   a segment inside an already registered range reuses that memory region
//!   (MR), so a hot buffer is pinned once. CUDA memory goes through
//!   `ibv_reg_dmabuf_mr`: built with `kvx::cuda` (`KVX_WITH_CUDA`),
//!   `register_memory(seg)` exports the segment itself
//!   (`kvx::cuda::export_dmabuf`, `cuMemGetHandleForAddressRange`); without
//!   it, pass the fd: `register_memory(seg, dmabuf_fd, offset)`.
//!   The entry published under `transports["verbs"]` is `{"segment",
//!   "generation", "key_check", "addr", "length", "rkey", "lid", "gid",
//!   "qp_endpoint"}`.
//! - Queue pairs are per peer: the first operation towards an owner dials its
//!   `qp_endpoint` (a small TCP handshake that exchanges QPN, PSN, LID and GID,
//!   then moves both QPs INIT -> RTR -> RTS). The socket stays open as the
//!   liveness signal; when it closes the QP is torn down on both sides.
//! - Operations post one WR per slice piece (at most the port's max message),
//!   at most `max_outstanding` WRs in flight per QP (further ops queue), with
//!   a completion requested every `signal_interval` WRs and on the last WR of
//!   each burst (RC completes in order, so one completion retires all before it).
//! - Completions arrive through the completion channel fd, waited on with an
//!   `asio::posix::stream_descriptor` on the executor (`ibv_get_cq_event`,
//!   `ibv_ack_cq_events`, `ibv_req_notify_cq`, then poll until empty);
//!   `busy_poll` polls on the executor instead while work is in flight.
//! - Segment name, key, generation and bounds are checked on the initiator
//!   against the descriptor before posting. An error completion is mapped to
//!   `errc` (`detail::verbs_wc_error`: remote access error -> `stale`, retry
//!   exceeded / flush -> `connection_lost`, ...); the QP is moved to ERR,
//!   drained, and replaced on next use; ops not yet posted move to the new QP.
//! - Cancelling an operation that is queued ends it at once; one already
//!   posted breaks its QP (the flush stops the DMA before the handler runs),
//!   so other operations in flight to that peer end with `connection_lost`.
//!
//! Thread safety: every member may be called from any thread; they serialise
//! on one mutex. The transport keeps its executor busy (a listener and a
//! completion-channel wait); destroy it or stop the io_context to end `run()`.
//!
//! \code
//! asio::io_context io;
//! kvx::transport::verbs t(io.get_executor(), {.device = "mlx5_0", .handshake = "10.0.0.5:0"});
//! auto entry = t.register_memory(seg);            // publish under desc.transports["verbs"]
//! co_await t.async_read(remote, 0, dst, asio::use_awaitable);
//! \endcode

#include <cstdint>
#include <memory>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/associated_cancellation_slot.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/async_result.hpp>

#include <kvx/core/async.hpp>
#include <kvx/core/config.hpp>
#include <kvx/features.hpp>
#include <kvx/memory/memory_region.hpp>
#include <kvx/topology/topology.hpp>
#include <kvx/transport/detail/verbs_device.hpp>
#include <kvx/transport/detail/handler_work.hpp>
#include <kvx/transport/detail/verbs_engine.hpp>
#include <kvx/transport/detail/verbs_support.hpp>
#include <kvx/transport/transport.hpp>

#if KVX_WITH_CUDA
#include <kvx/cuda/dmabuf.hpp>
#endif

namespace kvx::transport {

namespace detail {
template <class Handler>
struct verbs_op final : verbs_op_base {
  verbs_op(Handler&& h, const asio::any_io_executor& ex) : handler(std::move(h)), io_ex(ex), work(handler, ex) {}

  // Runs on the completion thread: the slot is cleared on the handler's own
  // executor, where the caller emits (a clear here raced that emit); a
  // cancel arriving before then finds no op (verbs_engine::cancel looks it up).
  void finish(std::error_code ec) override {
    auto h = std::move(handler);
    auto ex = io_ex;
    delete this;
    kvx::detail::post_completion_clearing_slot(ex, std::move(h), ec);
  }

  Handler handler;
  asio::any_io_executor io_ex;
  handler_work<Handler, asio::any_io_executor> work;  // not make_work_guard: see handler_work.hpp
};
}  // namespace detail

class verbs {
 public:
  using transport_concept = transport_tag;
  using executor_type = asio::any_io_executor;
  //! Host memory; CUDA memory when registered through its dma-buf fd
  //! (`register_memory(seg, fd)`), so `cuda` is in the set.
  static constexpr transport_capabilities capabilities{.memory = memory_kinds::host | memory_kinds::cuda,
                                                       .one_sided = true,
                                                       .zero_copy = true,
                                                       .bounce_buffered = false,
                                                       .same_host_only = false,
                                                       .same_process_only = false};
  static constexpr std::string_view name() noexcept { return "verbs"; }

  //! Names of the RDMA devices `ibv_get_device_list` finds (empty: none).
  static std::vector<std::string> devices() { return detail::verbs_device_names(); }

  //! The RDMA NIC nearest to `region` in `topo` (GPU memory: by PCIe distance
  //! to that GPU; host memory: by NUMA node of its first page).
  static result<std::string> nearest_device(const memory::memory_region& region, const topology::system& topo) {
    std::vector<std::size_t> order;
    if (region.where.kind == memory::location_kind::cuda) {
      order = topo.nearest_nics_to_gpu(region.where.device);
    } else {
      order = topo.nearest_nics_to_numa(topology::numa_node_of(region.address));
    }
    for (auto i : order)
      if (i < topo.nics.size() && topo.nics[i].rdma) return topo.nics[i].name;
    return error{errc::not_found, "verbs: the topology lists no RDMA NIC near " + region.where.to_string() + " memory"};
  }

  //! The GID index `gid_index: -1` picks on `nic`'s port 1, from the table
  //! `kvx::topology` read in sysfs (no device opened): RoCE v2 IPv4-mapped
  //! first. `not_found` for a NIC that is not an RDMA device; `unreachable`
  //! for a RoCE port without a GID (no IP address on its netdev).
  static result<int> gid_index_for(const topology::nic& nic) {
    if (!nic.rdma) return error{errc::not_found, "verbs: '" + nic.name + "' is not an RDMA device"};
    return detail::verbs_resolve_gid(detail::verbs_gid_candidates(nic), nic.link_layer == "Ethernet", nic.name + " port 1");
  }

  //! Opens the device and starts the handshake listener; the error names the
  //! verbs call and device.
  static result<verbs> create(executor_type ex, const verbs_options& options = {}) {
    auto e = detail::verbs_engine::create(std::move(ex), options);
    KVX_TRY(e);
    return verbs(std::move(*e));
  }

  //! As `create`; a set-up failure throws `std::system_error` with the context.
  explicit verbs(executor_type ex, const verbs_options& options = {}) {
    auto made = create(std::move(ex), options);
    if (!made) throw std::system_error(made.code(), made.error().context());
    e_ = std::move(made->e_);
  }

  verbs(verbs&&) noexcept = default;
  verbs& operator=(verbs&& o) noexcept {
    if (this != &o) {
      reset();
      e_ = std::move(o.e_);
    }
    return *this;
  }
  verbs(const verbs&) = delete;
  verbs& operator=(const verbs&) = delete;
  //! Destroys QPs (operations in flight end with `connection_lost`),
  //! deregisters memory, closes the device.
  ~verbs() { reset(); }

  [[nodiscard]] executor_type get_executor() const noexcept { return e_->executor(); }
  //! "ip:port" peers dial to connect a queue pair.
  [[nodiscard]] const std::string& qp_endpoint() const noexcept { return e_->endpoint(); }
  [[nodiscard]] const std::string& device_name() const noexcept { return e_->device().name; }
  //! Memory registrations currently held (segments inside one share it).
  [[nodiscard]] std::size_t cached_registrations() const { return e_->cached_registrations(); }

  //! Host memory; CUDA memory too when built with `kvx::cuda` (exported as a dma-buf).
  result<nlohmann::json> register_memory(const memory::local_segment& seg) {
#if KVX_WITH_CUDA
    if (seg.region.where.kind == memory::location_kind::cuda && seg.region.address && seg.region.length) {
      auto buf = cuda::export_dmabuf(seg.region.address, seg.region.length);
      if (!buf) return error{buf.code(), "verbs: segment '" + seg.name + "': " + buf.error().context()};
      return e_->register_memory(seg, buf->fd(), buf->offset());  // the MR holds its own reference: `buf` closes the fd
    }
#endif
    return e_->register_memory(seg, -1, 0);
  }
  //! Registers device memory exported as a dma-buf: `fd` and the offset of
  //! `seg.region.address` inside it. The fd may be closed afterwards.
  result<nlohmann::json> register_memory(const memory::local_segment& seg, int dmabuf_fd, std::uint64_t dmabuf_offset = 0) {
    if (dmabuf_fd < 0) return error{errc::invalid_argument, "verbs: dma-buf fd for segment '" + seg.name + "' is negative"};
    return e_->register_memory(seg, dmabuf_fd, dmabuf_offset);
  }
  result<void> deregister_memory(const memory::local_segment& seg) { return e_->deregister_memory(seg); }

  //! `unreachable` without a valid `verbs` entry; no I/O.
  [[nodiscard]] std::error_code can_transfer(const memory::segment_descriptor& remote) const {
    auto it = remote.transports.find(name());
    if (it == remote.transports.end()) return errc::unreachable;
    if (!detail::verbs_entry::parse(*it)) return errc::unreachable;
    if (!has(capabilities.memory, kind_of(remote.where))) return errc::not_supported;
    return {};
  }

  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_read(const memory::segment_descriptor& remote, std::uint64_t offset, std::span<std::byte> dst,
                  CompletionToken&& token) {
    return asio::async_initiate<CompletionToken, void(std::error_code)>(
        [self = this](auto handler, const memory::segment_descriptor& r, std::uint64_t off, std::span<std::byte> d) {
          self->start(std::move(handler), r, off, d.data(), d.size(), false);
        },
        token, std::cref(remote), offset, dst);
  }

  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_write(const memory::segment_descriptor& remote, std::uint64_t offset, std::span<const std::byte> src,
                   CompletionToken&& token) {
    return asio::async_initiate<CompletionToken, void(std::error_code)>(
        [self = this](auto handler, const memory::segment_descriptor& r, std::uint64_t off, std::span<const std::byte> s) {
          // The HCA only reads a WRITE's source; the cast fits the shared issue path.
          self->start(std::move(handler), r, off, const_cast<std::byte*>(s.data()), s.size(), true);
        },
        token, std::cref(remote), offset, src);
  }

 private:
  explicit verbs(std::shared_ptr<detail::verbs_engine> e) : e_(std::move(e)) {}

  void reset() {
    if (e_) e_->shutdown();
    e_.reset();
  }

  template <class Handler>
  void start(Handler&& handler, const memory::segment_descriptor& remote, std::uint64_t offset, std::byte* local,
             std::size_t length, bool is_write) {
    auto* op = new detail::verbs_op<std::decay_t<Handler>>(std::forward<Handler>(handler), e_->executor());
    op->local = local;
    op->length = length;
    op->is_write = is_write;
    auto slot = asio::get_associated_cancellation_slot(op->handler);
    if (slot.is_connected()) {
      slot.assign([e = e_.get(), op](asio::cancellation_type_t type) {
        if (type != asio::cancellation_type::none) e->cancel(op);
      });
    }
    e_->start(op, remote, offset);
  }

  std::shared_ptr<detail::verbs_engine> e_;
};

static_assert(check_transport<verbs>());

}  // namespace kvx::transport
