// The user-written decorator of examples/03 passes the conformance suite.
#define KVX_EXAMPLE_NO_MAIN
#include "../../examples/03_custom_transport_decorator.cpp"

#include <kvx/testing/transport_conformance.hpp>

namespace {

struct counting_env {
  using transport_type = example::counting<kvx::transport::local>;
  explicit counting_env(boost::asio::io_context& io) : t(io.get_executor()) {}
  transport_type& owner() { return t; }
  transport_type& initiator() { return t; }
  transport_type t;
};

}  // namespace

KVX_TRANSPORT_CONFORMANCE(CountingDecorator, counting_env);
