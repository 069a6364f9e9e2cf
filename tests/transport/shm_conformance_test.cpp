#include <kvx/testing/transport_conformance.hpp>

#include <kvx/transport/shm.hpp>

namespace {

// Owner and initiator are two shm transports in one process talking over the
// owner's unix socket; the suite's heap segments take the process_vm path
// (memfd segments are covered by shm_test.cpp, in one and two processes).
struct shm_env {
  using transport_type = kvx::transport::shm;
  static constexpr std::uint64_t large_transfer_bytes = 32u << 20;
  explicit shm_env(boost::asio::io_context& io) : owner_(io.get_executor()), initiator_(io.get_executor()) {}
  transport_type& owner() { return owner_; }
  transport_type& initiator() { return initiator_; }
  transport_type owner_, initiator_;
};

// One transport that serves and initiates (an engine that reads its own segments through shm).
struct shm_self_env {
  using transport_type = kvx::transport::shm;
  explicit shm_self_env(boost::asio::io_context& io) : t_(io.get_executor()) {}
  transport_type& owner() { return t_; }
  transport_type& initiator() { return t_; }
  transport_type t_;
};

}  // namespace

KVX_TRANSPORT_CONFORMANCE(Shm, shm_env);
KVX_TRANSPORT_CONFORMANCE(ShmSelf, shm_self_env);
