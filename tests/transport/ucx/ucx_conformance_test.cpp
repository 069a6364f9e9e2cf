#include <kvx/transport/ucx.hpp>

#include <kvx/testing/transport_conformance.hpp>

#include <boost/asio/io_context.hpp>

// The conformance suite on UCX forced onto each transport it can use on one
// host. Owner and initiator are two transports (two workers) in this process
// on the same io_context; tests/transport/ucx/ucx_two_process_test.cpp covers
// a peer in another process.
// TSan cannot see UCX's acknowledgements through uninstrumented shared memory:
// see ucx_tsan.supp for why these UCX-internal copies are suppressed.
extern "C" const char* __tsan_default_suppressions();
extern "C" const char* __tsan_default_suppressions() {
  return "race:ucp_put_handler\nrace:ucp_get_req_handler\nrace:ucp_rma_sw_do_am_bcopy\n";
}

namespace {

// cma carries no active messages, so UCX needs a second transport for
// wire-up (and, in UCX 1.13, for RMA on user memory: see docs/transport-ucx.md).
constexpr const char* cma_tls = "cma,tcp";

template <const char* const& Tls, bool BusyPoll = false>
struct ucx_env {
  using transport_type = kvx::transport::ucx;
  static constexpr std::uint64_t large_transfer_bytes = 64u << 20;
  explicit ucx_env(boost::asio::io_context& io)
      : owner_(io.get_executor(), options()), initiator_(io.get_executor(), options()) {}
  static kvx::transport::ucx_options options() {
    kvx::transport::ucx_options o;
    o.tls = Tls;
    o.busy_poll = BusyPoll;
    return o;
  }
  transport_type& owner() { return owner_; }
  transport_type& initiator() { return initiator_; }
  transport_type owner_;
  transport_type initiator_;
};

constexpr const char* posix_tls = "posix";
constexpr const char* sysv_tls = "sysv";
constexpr const char* tcp_tls = "tcp";
using posix_env = ucx_env<posix_tls>;
using sysv_env = ucx_env<sysv_tls>;
using cma_env = ucx_env<cma_tls>;
using tcp_env = ucx_env<tcp_tls>;
using tcp_busy_poll_env = ucx_env<tcp_tls, true>;

}  // namespace

KVX_TRANSPORT_CONFORMANCE(UcxPosix, posix_env);
KVX_TRANSPORT_CONFORMANCE(UcxSysv, sysv_env);
KVX_TRANSPORT_CONFORMANCE(UcxCma, cma_env);
KVX_TRANSPORT_CONFORMANCE(UcxTcp, tcp_env);
KVX_TRANSPORT_CONFORMANCE(UcxTcpBusyPoll, tcp_busy_poll_env);
