// expect: kvx: transport T lacks async_write
#include <boost/asio/any_io_executor.hpp>

#include <kvx/transport/transport.hpp>

struct read_only {
  using transport_concept = kvx::transport::transport_tag;
  static constexpr std::string_view name() { return "read_only"; }
  static constexpr kvx::transport::transport_capabilities capabilities{};
  boost::asio::any_io_executor get_executor() const;
  kvx::result<nlohmann::json> register_memory(const kvx::memory::local_segment&);
  kvx::result<void> deregister_memory(const kvx::memory::local_segment&);
  std::error_code can_transfer(const kvx::memory::segment_descriptor&) const;
  template <class Token>
  void async_read(const kvx::memory::segment_descriptor&, std::uint64_t, std::span<std::byte>, Token&&);
};
static_assert(kvx::transport::check_transport<read_only>());
