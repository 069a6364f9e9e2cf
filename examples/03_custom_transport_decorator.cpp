// A user-written transport decorator in one short file: `counting<T>` counts
// the bytes each direction moves and otherwise forwards to T. Its base,
// kvx::transport::decorator<T>, owns T, opts in with the transport tag and
// forwards executor, capabilities, name, registration and can_transfer (a
// transport written from scratch declares those itself: docs/transfer.md);
// it passes kvx::transport::check_transport and the transport conformance
// suite (tests/transport/custom_decorator_test.cpp includes this file with
// KVX_EXAMPLE_NO_MAIN defined).
#include <kvx/transport/decorators/decorator.hpp>
#include <kvx/transport/local.hpp>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/bind_executor.hpp>

#include <atomic>

namespace example {

template <class T>
class counting : public kvx::transport::decorator<T> {
 public:
  template <class... Args>
  explicit counting(Args&&... args) : kvx::transport::decorator<T>(std::in_place, std::forward<Args>(args)...) {}

  // T does the work (it never completes inline and honours cancellation); the
  // wrapper counts after success and keeps the caller's executor and cancellation slot.
  template <class Token>
  auto async_read(const kvx::memory::segment_descriptor& r, std::uint64_t off, std::span<std::byte> dst, Token&& token) {
    return kvx::asio::async_initiate<Token, void(std::error_code)>(
        [this, &r, off, dst](auto handler) {
          this->inner().async_read(r, off, dst, count(std::move(handler), read_, dst.size()));
        },
        token);
  }
  template <class Token>
  auto async_write(const kvx::memory::segment_descriptor& r, std::uint64_t off, std::span<const std::byte> src, Token&& token) {
    return kvx::asio::async_initiate<Token, void(std::error_code)>(
        [this, &r, off, src](auto handler) {
          this->inner().async_write(r, off, src, count(std::move(handler), written_, src.size()));
        },
        token);
  }

  std::uint64_t bytes_read() const { return read_.load(); }
  std::uint64_t bytes_written() const { return written_.load(); }

 private:
  template <class Handler>
  auto count(Handler h, std::atomic<std::uint64_t>& n, std::size_t len) {
    auto ex = kvx::asio::get_associated_executor(h, this->get_executor());
    auto slot = kvx::asio::get_associated_cancellation_slot(h);
    return kvx::asio::bind_cancellation_slot(
        slot, kvx::asio::bind_executor(ex, [h = std::move(h), &n, len](std::error_code ec) mutable {
          if (!ec) n += len;
          std::move(h)(ec);
        }));
  }
  std::atomic<std::uint64_t> read_{0}, written_{0};
};

static_assert(kvx::transport::check_transport<counting<kvx::transport::local>>());

}  // namespace example

#ifndef KVX_EXAMPLE_NO_MAIN
#include <boost/asio/io_context.hpp>

#include <cstdio>
#include <vector>

int main() {
  boost::asio::io_context io;
  kvx::memory::segment_table owner("owner");
  std::vector<std::byte> remote(4096, std::byte{7}), local_bytes(4096);
  auto seg = *owner.add("example-03", {remote.data(), remote.size()});
  example::counting<kvx::transport::local> t(io.get_executor());
  auto desc = owner.describe(seg);
  desc.transports["local"] = *t.register_memory(seg);
  std::error_code result = kvx::errc::internal;
  t.async_read(desc, 0, std::span(local_bytes).first(1000), [&](std::error_code ec) { result = ec; });
  io.run();
  (void)t.deregister_memory(seg);
  std::printf("read: %s, counted %llu bytes read\n", result ? result.message().c_str() : "ok",
              static_cast<unsigned long long>(t.bytes_read()));
  return !result && t.bytes_read() == 1000 && local_bytes[999] == std::byte{7} ? 0 : 1;
}
#endif
