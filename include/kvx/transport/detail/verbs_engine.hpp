#pragma once
// The verbs transport's state: device, completion queue and channel,
// registration cache, handshake listener, and one RC queue pair per peer.
// Every member runs under `mu_`; completions are posted, never run inline.

#include <fcntl.h>

#include <infiniband/verbs.h>

#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/buffer.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/read_until.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/streambuf.hpp>
#include <boost/asio/write.hpp>

#include <nlohmann/json.hpp>

#include <kvx/core/async.hpp>
#include <kvx/core/log.hpp>
#include <kvx/memory/segment.hpp>
#include <kvx/transport/detail/verbs_device.hpp>
#include <kvx/transport/detail/verbs_send_queue.hpp>
#include <kvx/transport/detail/verbs_support.hpp>

namespace kvx::transport::detail {

struct verbs_peer {
  verbs_peer(const asio::any_io_executor& ex, const verbs_options& o, std::uint64_t max_msg)
      : sock(ex), deadline(ex), sq(o.max_outstanding, o.signal_interval, max_msg) {}
  enum class state { connecting, ready, broken } st = state::connecting;
  std::string endpoint;
  ibv_qp* qp = nullptr;
  std::uint32_t psn = 0;
  asio::ip::tcp::socket sock;
  asio::steady_timer deadline;  // of the handshake
  asio::streambuf in;
  std::string out;
  char probe = 0;
  verbs_send_queue sq;
};

// The owner's side of a connection: a QP that only responds to RDMA, alive while its socket is.
struct verbs_passive {
  explicit verbs_passive(const asio::any_io_executor& ex) : sock(ex), deadline(ex) {}
  asio::ip::tcp::socket sock;
  asio::steady_timer deadline;  // for the initiator's handshake line
  asio::streambuf in;
  std::string out;
  char probe = 0;
  ibv_qp* qp = nullptr;
};

inline constexpr std::uint64_t verbs_marker_wr = ~std::uint64_t{0};

class verbs_engine : public std::enable_shared_from_this<verbs_engine> {
 public:
  using executor_type = asio::any_io_executor;

  static result<std::shared_ptr<verbs_engine>> create(executor_type ex, const verbs_options& o) {
    auto dev = verbs_device::open(o);
    KVX_TRY(dev);
    auto e = std::shared_ptr<verbs_engine>(new verbs_engine(std::move(ex), o, std::move(*dev)));
    KVX_TRY(e->setup());
    return e;
  }

  verbs_engine(const verbs_engine&) = delete;
  verbs_engine& operator=(const verbs_engine&) = delete;
  ~verbs_engine() { shutdown(); }

  [[nodiscard]] const executor_type& executor() const noexcept { return ex_; }
  [[nodiscard]] const std::string& endpoint() const noexcept { return endpoint_; }
  [[nodiscard]] const verbs_device& device() const noexcept { return *dev_; }
  std::mutex& mutex() noexcept { return mu_; }

  std::size_t cached_registrations() {
    std::lock_guard lock(mu_);
    return mrs_.size();
  }

  //! Registers `seg` (reusing an enclosing registration), or through a dma-buf fd when `dmabuf_fd >= 0`.
  result<nlohmann::json> register_memory(const memory::local_segment& seg, int dmabuf_fd, std::uint64_t dmabuf_offset) {
    std::lock_guard lock(mu_);
    if (closed_) return error{errc::connection_lost, "verbs: transport is shut down"};
    if (segments_.count(seg.name)) return error{errc::already_exists, "verbs: segment '" + seg.name + "' is already registered"};
    if (seg.region.address == nullptr || seg.region.length == 0)
      return error{errc::invalid_argument, "verbs: segment '" + seg.name + "' is empty"};
    const auto base = reinterpret_cast<std::uintptr_t>(seg.region.address);
    if (dmabuf_fd < 0 && seg.region.where.kind == memory::location_kind::cuda)
      return error{errc::not_supported, "verbs: segment '" + seg.name +
                                            "' is CUDA memory: pass its dma-buf fd, or build with kvx::cuda to export it"};
    constexpr int access = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_READ | IBV_ACCESS_REMOTE_WRITE;
    auto r = mrs_.acquire(base, seg.region.length, [&]() -> result<ibv_mr*> {
      ibv_mr* mr = dmabuf_fd >= 0 ? ibv_reg_dmabuf_mr(dev_->pd, dmabuf_offset, seg.region.length, base, dmabuf_fd, access)
                                  : ibv_reg_mr(dev_->pd, seg.region.address, seg.region.length, access);
      if (!mr)
        return verbs_call_error(std::string(dmabuf_fd >= 0 ? "verbs: ibv_reg_dmabuf_mr" : "verbs: ibv_reg_mr") +
                                    "(segment '" + seg.name + "', " + std::to_string(seg.region.length) + " bytes)",
                                errno);
      return mr;
    });
    KVX_TRY(r);
    segments_[seg.name] = *r;
    verbs_entry e;
    e.segment = seg.name;
    e.generation = seg.generation;
    e.key_check = verbs_key_check(seg.key, seg.generation);
    e.addr = base;
    e.length = seg.region.length;
    e.rkey = (*r)->value->rkey;
    e.lid = dev_->info.lid;
    e.gid = dev_->info.gid;
    e.qp_endpoint = endpoint_;
    return e.to_json();
  }

  result<void> deregister_memory(const memory::local_segment& seg) {
    std::lock_guard lock(mu_);
    auto it = segments_.find(seg.name);
    if (it == segments_.end()) return error{errc::unknown_segment, "verbs: deregister of unknown segment '" + seg.name + "'"};
    auto last = mrs_.release(it->second);
    segments_.erase(it);
    // ibv_dereg_mr invalidates the rkey: remote accesses after it fail at the responder.
    if (last && ibv_dereg_mr(*last) != 0)
      return verbs_call_error("verbs: ibv_dereg_mr(segment '" + seg.name + "')", errno);
    return {};
  }

  //! Validates and queues `op` (or completes it with the refusal). Takes ownership.
  void start(verbs_op_base* op, const memory::segment_descriptor& remote, std::uint64_t offset) {
    std::lock_guard lock(mu_);
    auto refuse = [&](std::error_code ec) { op->finish(ec); };
    if (closed_) return refuse(errc::connection_lost);
    auto it = remote.transports.find("verbs");
    if (it == remote.transports.end()) return refuse(errc::unreachable);
    auto entry = verbs_entry::parse(*it);
    if (!entry) return refuse(entry.code());
    if (auto ec = entry->check(remote, offset, op->length)) return refuse(ec);
    if (op->length == 0) return refuse({});
    auto* local = mrs_.find_enclosing(reinterpret_cast<std::uintptr_t>(op->local), op->length);
    if (!local) return refuse(errc::invalid_argument);  // the local buffer is not registered with this transport
    op->lkey = local->value->lkey;
    op->remote_addr = entry->addr + offset;
    op->rkey = entry->rkey;
    op->endpoint = entry->qp_endpoint;
    enqueue(op);
  }

  //! Cancels `op`: unposted ops end now; posted ones by breaking their QP (flush stops the DMA).
  void cancel(verbs_op_base* op) {
    std::lock_guard lock(mu_);
    // Look the op up before touching it: it may have completed (and been freed) already.
    for (auto& [ep, peer] : peers_) {
      switch (peer->sq.cancel(op)) {
        case verbs_cancel_outcome::not_found: continue;
        case verbs_cancel_outcome::ended: return;
        case verbs_cancel_outcome::break_the_qp: return break_peer(*peer);
      }
    }
  }

  void shutdown() {
    std::unique_lock lock(mu_);
    if (closed_) return;
    closed_ = true;
    boost::system::error_code ignored;
    acceptor_.close(ignored);
    if (channel_sd_.is_open()) channel_sd_.release();  // the fd belongs to the completion channel
    for (auto& [ep, p] : peers_) {
      p->deadline.cancel();  // its handler holds the engine: it must not outlive the transport by a timeout
      p->sock.close(ignored);
      if (p->qp) verbs_break_qp(p->qp);
      p->sq.end_all(errc::connection_lost);
      if (p->qp) ibv_destroy_qp(p->qp);
      p->qp = nullptr;
    }
    peers_.clear();
    qp_peers_.clear();
    for (auto& pas : passive_) {
      pas->deadline.cancel();
      pas->sock.close(ignored);
      if (pas->qp) ibv_destroy_qp(pas->qp);
      pas->qp = nullptr;
    }
    passive_.clear();
    mrs_.for_each([](auto& r) { ibv_dereg_mr(r.value); });
    mrs_ = {};
    segments_.clear();
    if (cq_) ibv_destroy_cq(cq_);
    cq_ = nullptr;
    if (channel_) ibv_destroy_comp_channel(channel_);
    channel_ = nullptr;
    dev_.reset();
  }

 private:
  verbs_engine(executor_type ex, const verbs_options& o, std::unique_ptr<verbs_device> d)
      : ex_(std::move(ex)), opt_(o), dev_(std::move(d)), channel_sd_(ex_), acceptor_(ex_),
        rng_(std::random_device{}()) {}

  result<void> setup() {
    channel_ = ibv_create_comp_channel(dev_->ctx);
    if (!channel_) return verbs_call_error("verbs: ibv_create_comp_channel", errno);
    const int cqe = dev_->info.max_cqe < 65536 ? dev_->info.max_cqe : 65536;
    cq_ = ibv_create_cq(dev_->ctx, cqe, nullptr, channel_, 0);
    if (!cq_) return verbs_call_error("verbs: ibv_create_cq(" + std::to_string(cqe) + ")", errno);
    if (opt_.max_outstanding + 1 > static_cast<std::uint32_t>(dev_->info.max_qp_wr))
      return error{errc::invalid_argument, "verbs: max_outstanding " + std::to_string(opt_.max_outstanding) + " exceeds " +
                                               dev_->name + "'s max_qp_wr " + std::to_string(dev_->info.max_qp_wr)};
    if (int e = ibv_req_notify_cq(cq_, 0)) return verbs_call_error("verbs: ibv_req_notify_cq", e);
    const int fl = fcntl(channel_->fd, F_GETFL);
    if (fl < 0 || fcntl(channel_->fd, F_SETFL, fl | O_NONBLOCK) < 0) return verbs_call_error("verbs: fcntl(O_NONBLOCK)", errno);
    channel_sd_.assign(channel_->fd);

    auto hs = verbs_options::split_endpoint(opt_.handshake);
    KVX_TRY(hs);
    boost::system::error_code ec;
    const auto addr = asio::ip::make_address(hs->first, ec);
    if (ec) return error{errc::invalid_argument, "verbs: handshake address '" + hs->first + "': " + ec.message()};
    asio::ip::tcp::endpoint ep(addr, hs->second);
    acceptor_.open(ep.protocol(), ec);
    if (!ec) acceptor_.set_option(asio::socket_base::reuse_address(true), ec);
    if (!ec) acceptor_.bind(ep, ec);
    if (!ec) acceptor_.listen(asio::socket_base::max_listen_connections, ec);
    if (ec) return error{errc::unreachable, "verbs: handshake listener on " + opt_.handshake + ": " + ec.message()};
    std::string host = opt_.advertise.empty() ? hs->first : opt_.advertise;
    if (addr.is_unspecified() && opt_.advertise.empty())
      return error{errc::invalid_argument, "verbs: handshake listens on " + hs->first + ": set 'advertise' to the IP peers dial"};
    if (host.find(':') != std::string::npos) host = "[" + host + "]";
    endpoint_ = host + ":" + std::to_string(acceptor_.local_endpoint().port());
    accept_next();
    if (!opt_.busy_poll) arm_channel();
    return {};
  }

  // ---- completions -------------------------------------------------------

  void arm_channel() {
    channel_sd_.async_wait(asio::posix::stream_descriptor::wait_read, [self = shared_from_this()](boost::system::error_code ec) {
      if (ec) return;
      std::lock_guard lock(self->mu_);
      if (self->closed_) return;
      ibv_cq* cq = nullptr;
      void* ctx = nullptr;
      if (ibv_get_cq_event(self->channel_, &cq, &ctx) == 0) {
        ibv_ack_cq_events(cq, 1);
        ibv_req_notify_cq(cq, 0);  // re-arm before polling so no completion slips between
      }
      self->poll_cq();
      self->arm_channel();
    });
  }

  void schedule_busy_poll() {
    if (!opt_.busy_poll || busy_scheduled_) return;
    busy_scheduled_ = true;
    asio::post(ex_, [self = shared_from_this()] {
      std::lock_guard lock(self->mu_);
      self->busy_scheduled_ = false;
      if (self->closed_) return;
      self->poll_cq();
      if (self->work_in_flight()) self->schedule_busy_poll();
    });
  }

  // Whether the busy poller must go on: WRs on a QP not known complete (a
  // partly posted op counts: its WRs are out though it is not "in flight"),
  // or a broken QP whose drain marker is still to come (even an idle one:
  // until the marker, new ops to that peer wait for its replacement).
  bool work_in_flight() const {
    for (const auto& [ep, p] : peers_)
      if (p->qp && (p->sq.outstanding() > 0 || p->st == verbs_peer::state::broken)) return true;
    return false;
  }

  void poll_cq() {
    ibv_wc wc[32];
    for (;;) {
      const int n = ibv_poll_cq(cq_, 32, wc);
      if (n <= 0) return;
      for (int i = 0; i < n; ++i) on_completion(wc[i]);
    }
  }

  void on_completion(const ibv_wc& wc) {
    auto it = qp_peers_.find(wc.qp_num);
    if (it == qp_peers_.end()) return;  // a QP already replaced
    auto p = it->second;
    if (wc.wr_id == verbs_marker_wr) {
      // Every WR posted before the marker has been flushed: nothing touches caller buffers any more.
      p->sq.end_inflight();
      replace_peer(p);
      return;
    }
    if (wc.status == IBV_WC_SUCCESS) {
      p->sq.complete(wc.wr_id);
      post_pending(*p);
      return;
    }
    p->sq.fail(wc.wr_id, static_cast<ibv_wc_status>(wc.status));
    break_peer(*p);
  }

  // ---- posting -----------------------------------------------------------

  void enqueue(verbs_op_base* op) {
    auto& slot = peers_[op->endpoint];
    if (!slot) {
      slot = std::make_shared<verbs_peer>(ex_, opt_, dev_->info.max_msg);
      slot->endpoint = op->endpoint;
      slot->sq.push(op);
      connect_peer(slot);
      return;
    }
    slot->sq.push(op);
    if (slot->st == verbs_peer::state::ready) post_pending(*slot);
  }

  void post_pending(verbs_peer& p) {
    if (p.st != verbs_peer::state::ready) return;
    const auto pieces = p.sq.plan_burst();
    if (pieces.empty()) return;
    std::vector<ibv_send_wr> wrs(pieces.size());
    std::vector<ibv_sge> sges(pieces.size());
    for (std::size_t i = 0; i < pieces.size(); ++i) {
      const auto& piece = pieces[i];
      sges[i].addr = reinterpret_cast<std::uint64_t>(piece.op->local + piece.offset);
      sges[i].length = piece.length;
      sges[i].lkey = piece.op->lkey;
      auto& wr = wrs[i];
      wr.wr_id = piece.seq;
      wr.opcode = piece.op->is_write ? IBV_WR_RDMA_WRITE : IBV_WR_RDMA_READ;
      wr.send_flags = piece.signaled ? IBV_SEND_SIGNALED : 0;
      wr.num_sge = 1;
      wr.sg_list = &sges[i];
      wr.wr.rdma.remote_addr = piece.op->remote_addr + piece.offset;
      wr.wr.rdma.rkey = piece.op->rkey;
      wr.next = i + 1 < pieces.size() ? &wrs[i + 1] : nullptr;
    }
    ibv_send_wr* bad = nullptr;
    if (ibv_post_send(p.qp, wrs.data(), &bad) != 0) {
      // The QP refused the chain (WRs before `bad` are on it): treat it as a
      // broken connection; the flush ends those, unposted ops retry on a fresh QP.
      break_peer(p);
      return;
    }
    schedule_busy_poll();
  }

  // Moves the QP to ERR and posts a signaled marker: its flush completion
  // arrives after every earlier WR's, and then the peer is replaced.
  void break_peer(verbs_peer& p) {
    if (p.st == verbs_peer::state::broken) return;
    const bool was_ready = p.st == verbs_peer::state::ready;
    p.st = verbs_peer::state::broken;
    boost::system::error_code ignored;
    p.sock.close(ignored);
    if (!was_ready || !p.qp) {
      // Still handshaking: no WR was posted, so the peer can go now.
      auto self = peers_.find(p.endpoint);
      if (self != peers_.end()) replace_peer(self->second);
      return;
    }
    verbs_break_qp(p.qp);
    ibv_send_wr marker{};
    marker.wr_id = verbs_marker_wr;
    marker.opcode = IBV_WR_RDMA_WRITE;
    marker.send_flags = IBV_SEND_SIGNALED;
    ibv_send_wr* bad = nullptr;
    if (ibv_post_send(p.qp, &marker, &bad) != 0) {
      // No marker slot: the flush of the signaled WRs already posted still arrives; end the rest now.
      p.sq.end_inflight();
      auto self = peers_.find(p.endpoint);
      if (self != peers_.end()) replace_peer(self->second);
      return;
    }
    schedule_busy_poll();
  }

  // Drops a broken peer; its unposted ops start over on a new connection.
  void replace_peer(std::shared_ptr<verbs_peer> p) {
    auto it = peers_.find(p->endpoint);
    if (it != peers_.end() && it->second == p) peers_.erase(it);
    if (p->qp) {
      qp_peers_.erase(p->qp->qp_num);
      ibv_destroy_qp(p->qp);
      p->qp = nullptr;
    }
    boost::system::error_code ignored;
    p->deadline.cancel();
    p->sock.close(ignored);
    p->sq.end_inflight();
    for (auto* op : p->sq.take_pending()) enqueue(op);  // READ and WRITE are idempotent: start over
  }

  void fail_connecting(const std::shared_ptr<verbs_peer>& p, std::error_code ec) {
    p->st = verbs_peer::state::broken;  // the handshake's own handlers see it and stop
    p->deadline.cancel();
    auto it = peers_.find(p->endpoint);
    if (it != peers_.end() && it->second == p) peers_.erase(it);
    if (p->qp) {
      qp_peers_.erase(p->qp->qp_num);
      ibv_destroy_qp(p->qp);
      p->qp = nullptr;
    }
    boost::system::error_code ignored;
    p->sock.close(ignored);
    p->sq.end_all(ec);
  }

  // ---- handshake ---------------------------------------------------------

  // The peer's handshake line, parsed.
  static result<verbs_qp_address> read_address(asio::streambuf& in) {
    std::istream is(&in);
    std::string line;
    std::getline(is, line);
    return verbs_qp_address::parse(line);
  }

  result<ibv_qp*> new_qp(std::uint32_t& psn) {
    auto qp = verbs_create_qp(*dev_, cq_, opt_.max_outstanding + 1);
    KVX_TRY(qp);
    psn = static_cast<std::uint32_t>(rng_()) & 0xffffffu;
    return *qp;
  }

  // Grows the shared CQ so `qps` active queue pairs cannot overrun it (an
  // overrun puts the CQ and every QP on it in error).
  result<void> fit_cq(std::size_t qps) {
    const auto need = verbs_cq_entries_for(qps, opt_.max_outstanding);
    if (need <= static_cast<std::uint64_t>(cq_->cqe)) return {};
    if (need > static_cast<std::uint64_t>(dev_->info.max_cqe))
      return error{errc::capacity_exceeded, "verbs: " + std::to_string(qps) + " peers need " + std::to_string(need) +
                                                " CQ entries, beyond " + dev_->name + "'s max_cqe " +
                                                std::to_string(dev_->info.max_cqe) + ": lower max_outstanding"};
    if (int e = ibv_resize_cq(cq_, static_cast<int>(need)))
      return verbs_call_error("verbs: ibv_resize_cq(" + std::to_string(need) + ")", e, errc::capacity_exceeded);
    return {};
  }

  void connect_peer(const std::shared_ptr<verbs_peer>& p) {
    if (auto fits = fit_cq(peers_.size()); !fits) {
      log(log_level::warn, fits.error().message());
      return fail_connecting(p, fits.code());
    }
    auto qp = new_qp(p->psn);
    if (!qp) return fail_connecting(p, qp.code());
    p->qp = *qp;
    qp_peers_[p->qp->qp_num] = p;
    auto ep = verbs_options::split_endpoint(p->endpoint);
    boost::system::error_code ec;
    const auto addr = ep ? asio::ip::make_address(ep->first, ec) : asio::ip::address{};
    if (!ep || ec) return fail_connecting(p, errc::unreachable);
    p->out = verbs_qp_address{p->qp->qp_num, p->psn, dev_->info.lid, dev_->info.gid, dev_->info.mtu}.to_line();
    // A peer that accepts and then says nothing (stopped, wedged) must not hold the ops forever.
    p->deadline.expires_after(std::chrono::milliseconds(opt_.handshake_timeout_ms));
    p->deadline.async_wait([self = shared_from_this(), p](boost::system::error_code ec) {
      if (ec) return;
      std::lock_guard lock(self->mu_);
      if (self->closed_ || p->st != verbs_peer::state::connecting) return;
      log(log_level::warn, "verbs: QP handshake with ", p->endpoint, " timed out");
      self->fail_connecting(p, errc::timed_out);
    });
    p->sock.async_connect({addr, ep->second}, [self = shared_from_this(), p](boost::system::error_code ec) {
      std::lock_guard lock(self->mu_);
      if (self->closed_ || p->st != verbs_peer::state::connecting) return;
      if (ec) return self->fail_connecting(p, errc::unreachable);
      asio::async_write(p->sock, asio::buffer(p->out), [self, p](boost::system::error_code ec, std::size_t) {
        std::lock_guard lock(self->mu_);
        if (self->closed_ || p->st != verbs_peer::state::connecting) return;
        if (ec) return self->fail_connecting(p, errc::unreachable);
        asio::async_read_until(p->sock, p->in, '\n', [self, p](boost::system::error_code ec, std::size_t) {
          std::lock_guard lock(self->mu_);
          if (self->closed_ || p->st != verbs_peer::state::connecting) return;
          if (ec) return self->fail_connecting(p, errc::unreachable);
          auto remote = read_address(p->in);
          if (!remote) return self->fail_connecting(p, remote.code());
          if (auto r = verbs_connect_qp(*self->dev_, p->qp, *remote, p->psn); !r) return self->fail_connecting(p, r.code());
          p->st = verbs_peer::state::ready;
          p->deadline.cancel();
          self->watch_peer(p);
          self->post_pending(*p);
        });
      });
    });
  }

  // The owner holds its QP while the socket is open: EOF means it is gone.
  void watch_peer(const std::shared_ptr<verbs_peer>& p) {
    asio::async_read(p->sock, asio::buffer(&p->probe, 1), [self = shared_from_this(), p](boost::system::error_code, std::size_t) {
      std::lock_guard lock(self->mu_);
      if (self->closed_ || p->st != verbs_peer::state::ready) return;
      self->break_peer(*p);
    });
  }

  void accept_next() {
    auto pas = std::make_shared<verbs_passive>(ex_);
    acceptor_.async_accept(pas->sock, [self = shared_from_this(), pas](boost::system::error_code ec) {
      std::lock_guard lock(self->mu_);
      if (self->closed_ || ec == asio::error::operation_aborted) return;
      self->accept_next();
      if (ec) return;
      self->passive_.push_back(pas);
      pas->deadline.expires_after(std::chrono::milliseconds(self->opt_.handshake_timeout_ms));
      pas->deadline.async_wait([self, pas](boost::system::error_code ec) {
        if (ec) return;
        std::lock_guard lock(self->mu_);
        if (!self->closed_ && !pas->qp) self->drop_passive(pas);  // no handshake line in time
      });
      asio::async_read_until(pas->sock, pas->in, '\n', [self, pas](boost::system::error_code ec, std::size_t) {
        std::lock_guard lock(self->mu_);
        if (self->closed_) return;
        if (ec) return self->drop_passive(pas);
        auto remote = read_address(pas->in);
        if (!remote) return self->drop_passive(pas);
        std::uint32_t psn = 0;
        auto qp = self->new_qp(psn);
        if (!qp) return self->drop_passive(pas);
        pas->qp = *qp;
        if (auto r = verbs_connect_qp(*self->dev_, pas->qp, *remote, psn); !r) return self->drop_passive(pas);
        pas->deadline.cancel();
        pas->out =
            verbs_qp_address{pas->qp->qp_num, psn, self->dev_->info.lid, self->dev_->info.gid, self->dev_->info.mtu}.to_line();
        asio::async_write(pas->sock, asio::buffer(pas->out), [self, pas](boost::system::error_code ec, std::size_t) {
          std::lock_guard lock(self->mu_);
          if (self->closed_) return;
          if (ec) return self->drop_passive(pas);
          asio::async_read(pas->sock, asio::buffer(&pas->probe, 1), [self, pas](boost::system::error_code, std::size_t) {
            std::lock_guard lock(self->mu_);
            if (!self->closed_) self->drop_passive(pas);
          });
        });
      });
    });
  }

  void drop_passive(const std::shared_ptr<verbs_passive>& pas) {
    boost::system::error_code ignored;
    pas->deadline.cancel();
    pas->sock.close(ignored);
    if (pas->qp) ibv_destroy_qp(pas->qp);
    pas->qp = nullptr;
    std::erase(passive_, pas);
  }

  executor_type ex_;
  verbs_options opt_;
  std::unique_ptr<verbs_device> dev_;
  std::mutex mu_;
  bool closed_ = false;
  bool busy_scheduled_ = false;
  ibv_comp_channel* channel_ = nullptr;
  ibv_cq* cq_ = nullptr;
  asio::posix::stream_descriptor channel_sd_;
  asio::ip::tcp::acceptor acceptor_;
  std::string endpoint_;
  std::mt19937 rng_;
  verbs_range_map<ibv_mr*> mrs_;
  std::map<std::string, verbs_range_map<ibv_mr*>::range*> segments_;
  std::map<std::string, std::shared_ptr<verbs_peer>> peers_;
  std::map<std::uint32_t, std::shared_ptr<verbs_peer>> qp_peers_;
  std::vector<std::shared_ptr<verbs_passive>> passive_;
};

}  // namespace kvx::transport::detail
