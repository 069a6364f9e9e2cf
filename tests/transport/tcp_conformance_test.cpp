#include <kvx/transport/tcp.hpp>

#include <kvx/testing/transport_conformance.hpp>

namespace {

// Two transports on the test's io_context: the owner serves, the initiator
// connects to it over loopback. Small slices and three connections so the
// suite's larger ops are cut into pipelined requests striped over several
// connections.
struct tcp_env {
  using transport_type = kvx::transport::tcp;
#if defined(__SANITIZE_THREAD__)
  static constexpr std::uint64_t large_transfer_bytes = 64u << 20;  // TSan is ~10x slower; stay well inside the timeout
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
  static constexpr std::uint64_t large_transfer_bytes = 64u << 20;
#else
  static constexpr std::uint64_t large_transfer_bytes = 256u << 20;
#endif
#else
  static constexpr std::uint64_t large_transfer_bytes = 256u << 20;
#endif

  static kvx::transport::tcp::config settings() {
    kvx::transport::tcp::config c;
    c.connections = 3;
    c.slice_size = 1u << 20;
    return c;
  }

  explicit tcp_env(boost::asio::io_context& io)
      : owner_(io.get_executor(), settings()), initiator_(io.get_executor(), settings()) {}
  transport_type& owner() { return owner_; }
  transport_type& initiator() { return initiator_; }

  transport_type owner_;
  transport_type initiator_;
};

}  // namespace

KVX_TRANSPORT_CONFORMANCE(TcpConformance, tcp_env);
