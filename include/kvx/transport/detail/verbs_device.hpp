#pragma once
// Opening an RDMA device and the queue-pair state machine, as plain functions
// over libibverbs objects; the transport owns them and their lifetimes.

#include <infiniband/verbs.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <kvx/core/result.hpp>
#include <kvx/transport/detail/verbs_support.hpp>

namespace kvx::transport::detail {

inline error verbs_call_error(const std::string& call, int err, errc code = errc::io_error) {
  return error{code, call + " failed: " + std::strerror(err)};
}

//! Names of the RDMA devices present (empty when there are none, or no driver).
inline std::vector<std::string> verbs_device_names() {
  std::vector<std::string> names;
  int n = 0;
  ibv_device** list = ibv_get_device_list(&n);
  if (!list) return names;
  for (int i = 0; i < n; ++i) names.emplace_back(ibv_get_device_name(list[i]));
  ibv_free_device_list(list);
  return names;
}

//! What the transport needs to know about its port.
struct verbs_port_info {
  std::uint16_t lid = 0;
  ibv_mtu mtu = IBV_MTU_1024;
  bool ethernet = false;  // RoCE: address by GID, not LID
  int gid_index = 0;
  ibv_gid gid{};
  std::uint32_t max_msg = 1u << 30;
  std::uint8_t max_rd_atomic = 1;
  int max_cqe = 4096;
  int max_qp_wr = 1024;
};

//! An opened device with a protection domain; frees them on destruction.
struct verbs_device {
  ibv_context* ctx = nullptr;
  ibv_pd* pd = nullptr;
  std::string name;
  std::uint8_t port = 1;
  verbs_port_info info{};

  verbs_device() = default;
  verbs_device(const verbs_device&) = delete;
  verbs_device& operator=(const verbs_device&) = delete;
  ~verbs_device() {
    if (pd) ibv_dealloc_pd(pd);
    if (ctx) ibv_close_device(ctx);
  }

  //! Opens `name` (empty: the first device), queries the port and picks the GID.
  static result<std::unique_ptr<verbs_device>> open(const verbs_options& o) {
    int n = 0;
    ibv_device** list = ibv_get_device_list(&n);
    if (!list || n == 0) {
      if (list) ibv_free_device_list(list);
      return error{errc::not_supported,
                   "verbs: ibv_get_device_list found no RDMA device (no NIC, no rdma-core provider, or no "
                   "SoftRoCE link: rdma link add rxe0 type rxe netdev eth0)"};
    }
    ibv_device* pick = nullptr;
    std::string seen;
    for (int i = 0; i < n; ++i) {
      const std::string nm = ibv_get_device_name(list[i]);
      seen += (seen.empty() ? "" : ", ") + nm;
      if (!pick && (o.device.empty() || o.device == nm)) pick = list[i];
    }
    if (!pick) {
      ibv_free_device_list(list);
      return error{errc::not_found, "verbs: no RDMA device named '" + o.device + "' (present: " + seen + ")"};
    }
    auto d = std::make_unique<verbs_device>();
    d->name = ibv_get_device_name(pick);
    d->port = o.port;
    d->ctx = ibv_open_device(pick);
    const int open_err = errno;
    ibv_free_device_list(list);
    if (!d->ctx) return verbs_call_error("verbs: ibv_open_device(" + d->name + ")", open_err);
    d->pd = ibv_alloc_pd(d->ctx);
    if (!d->pd) return verbs_call_error("verbs: ibv_alloc_pd(" + d->name + ")", errno);

    ibv_device_attr dev{};
    if (int e = ibv_query_device(d->ctx, &dev)) return verbs_call_error("verbs: ibv_query_device(" + d->name + ")", e);
    ibv_port_attr pa{};
    if (int e = ibv_query_port(d->ctx, o.port, &pa))
      return verbs_call_error("verbs: ibv_query_port(" + d->name + " port " + std::to_string(o.port) + ")", e,
                              errc::invalid_argument);
    if (pa.state != IBV_PORT_ACTIVE)
      return error{errc::unreachable, "verbs: " + d->name + " port " + std::to_string(o.port) + " is not active (state " +
                                          ibv_port_state_str(pa.state) + ")"};
    auto& info = d->info;
    info.lid = pa.lid;
    info.mtu = pa.active_mtu;
    info.ethernet = pa.link_layer == IBV_LINK_LAYER_ETHERNET;
    info.max_msg = pa.max_msg_sz == 0 ? (1u << 30) : (pa.max_msg_sz < (1u << 30) ? pa.max_msg_sz : (1u << 30));
    info.max_rd_atomic = static_cast<std::uint8_t>(dev.max_qp_rd_atom < 1 ? 1 : (dev.max_qp_rd_atom > 16 ? 16 : dev.max_qp_rd_atom));
    info.max_cqe = dev.max_cqe;
    info.max_qp_wr = dev.max_qp_wr;

    if (o.gid_index >= 0) {
      if (o.gid_index >= pa.gid_tbl_len)
        return error{errc::invalid_argument, "verbs: gid_index " + std::to_string(o.gid_index) + " is beyond " + d->name +
                                                 "'s GID table (" + std::to_string(pa.gid_tbl_len) + " entries)"};
      if (int e = ibv_query_gid(d->ctx, o.port, o.gid_index, &info.gid))
        return verbs_call_error("verbs: ibv_query_gid(" + std::to_string(o.gid_index) + ")", e);
      info.gid_index = o.gid_index;
    } else {
      std::vector<verbs_gid_candidate> gids;
      for (int i = 0; i < pa.gid_tbl_len; ++i) {
        ibv_gid_entry entry{};
        // Entries not in use answer ENODATA; the type tells RoCE v1 from v2.
        if (ibv_query_gid_ex(d->ctx, o.port, static_cast<std::uint32_t>(i), &entry, 0) != 0) continue;
        gids.push_back({i, entry.gid, static_cast<ibv_gid_type>(entry.gid_type)});
      }
      auto best = verbs_resolve_gid(gids, info.ethernet, d->name + " port " + std::to_string(o.port));
      KVX_TRY(best);
      info.gid_index = *best;
      for (const auto& g : gids)
        if (g.index == *best) info.gid = g.gid;
    }
    return d;
  }
};

inline result<ibv_qp*> verbs_create_qp(verbs_device& d, ibv_cq* cq, std::uint32_t max_send_wr) {
  ibv_qp_init_attr init{};
  init.send_cq = cq;
  init.recv_cq = cq;
  init.qp_type = IBV_QPT_RC;
  init.sq_sig_all = 0;  // selective signaling
  init.cap.max_send_wr = max_send_wr;
  init.cap.max_recv_wr = 1;
  init.cap.max_send_sge = 1;
  init.cap.max_recv_sge = 1;
  ibv_qp* qp = ibv_create_qp(d.pd, &init);
  if (!qp) return verbs_call_error("verbs: ibv_create_qp(" + d.name + ", " + std::to_string(max_send_wr) + " WRs)", errno);
  ibv_qp_attr a{};
  a.qp_state = IBV_QPS_INIT;
  a.pkey_index = 0;
  a.port_num = d.port;
  a.qp_access_flags = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_READ | IBV_ACCESS_REMOTE_WRITE;
  if (int e = ibv_modify_qp(qp, &a, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS)) {
    ibv_destroy_qp(qp);
    return verbs_call_error("verbs: ibv_modify_qp(INIT)", e);
  }
  return qp;
}

//! INIT -> RTR -> RTS towards `remote`; `local_psn` is this side's send PSN.
inline result<void> verbs_connect_qp(verbs_device& d, ibv_qp* qp, const verbs_qp_address& remote, std::uint32_t local_psn) {
  ibv_qp_attr a{};
  a.qp_state = IBV_QPS_RTR;
  a.path_mtu = verbs_qp_address::path_mtu(d.info.mtu, remote.mtu);
  a.dest_qp_num = remote.qpn;
  a.rq_psn = remote.psn;
  a.max_dest_rd_atomic = d.info.max_rd_atomic;
  a.min_rnr_timer = 12;
  a.ah_attr.port_num = d.port;
  a.ah_attr.dlid = remote.lid;
  if (d.info.ethernet || (!verbs_gid_is_zero(remote.gid) && remote.lid == 0)) {
    a.ah_attr.is_global = 1;
    a.ah_attr.grh.dgid = remote.gid;
    a.ah_attr.grh.sgid_index = static_cast<std::uint8_t>(d.info.gid_index);
    a.ah_attr.grh.hop_limit = 64;
  }
  if (int e = ibv_modify_qp(qp, &a,
                            IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN |
                                IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER))
    return verbs_call_error("verbs: ibv_modify_qp(RTR, remote qpn " + std::to_string(remote.qpn) + ")", e, errc::unreachable);
  ibv_qp_attr s{};
  s.qp_state = IBV_QPS_RTS;
  s.timeout = 14;   // 4.096 us * 2^14 = 67 ms per try
  s.retry_cnt = 7;
  s.rnr_retry = 7;
  s.sq_psn = local_psn;
  s.max_rd_atomic = d.info.max_rd_atomic;
  if (int e = ibv_modify_qp(qp, &s,
                            IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY | IBV_QP_SQ_PSN |
                                IBV_QP_MAX_QP_RD_ATOMIC))
    return verbs_call_error("verbs: ibv_modify_qp(RTS)", e, errc::unreachable);
  return {};
}

//! Moves a QP to ERR so every posted WR is flushed (stops DMA into caller buffers).
inline void verbs_break_qp(ibv_qp* qp) noexcept {
  ibv_qp_attr a{};
  a.qp_state = IBV_QPS_ERR;
  ibv_modify_qp(qp, &a, IBV_QP_STATE);
}

}  // namespace kvx::transport::detail
