#include <kvx/testing/transport_conformance.hpp>

#include <kvx/testing/test_transports.hpp>
#include <kvx/transport/local.hpp>

namespace {

// Two `local` endpoints in one process: the reference run of the suite.
struct local_env {
  using transport_type = kvx::transport::local;
  static constexpr std::uint64_t large_transfer_bytes = 256u << 20;
  explicit local_env(boost::asio::io_context& io) : owner_(io.get_executor()), initiator_(io.get_executor()) {}
  transport_type& owner() { return owner_; }
  transport_type& initiator() { return initiator_; }
  transport_type owner_, initiator_;
};

}  // namespace

KVX_TRANSPORT_CONFORMANCE(Local, local_env);
