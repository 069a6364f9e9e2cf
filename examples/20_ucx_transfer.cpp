// UCX transport: register a segment, publish its descriptor entry, then read
// and write it with coroutines. Owner and initiator are two transports (two
// UCP workers) on one io_context here; across processes the descriptor JSON
// travels through a metadata backend instead.
#include <kvx/transport/ucx.hpp>

#include <cstdio>
#include <cstring>
#include <vector>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <kvx/memory/segment_table.hpp>

namespace asio = boost::asio;
using namespace std::chrono_literals;

int main() {
  asio::io_context io;
  // Force UCX's shared-memory transport; leave tls empty to let UCX_TLS decide.
  auto owner = kvx::transport::ucx::create(io.get_executor(), {.tls = "posix"});
  auto initiator = kvx::transport::ucx::create(io.get_executor(), {.tls = "posix"});
  if (!owner || !initiator) {
    std::fprintf(stderr, "ucx: %s\n", (owner ? initiator.error() : owner.error()).message().c_str());
    return 1;
  }

  // The owner's memory, from UCX so posix peers reach it one-sidedly.
  auto remote_mem = owner->allocate(1 << 20);
  if (!remote_mem) return 1;
  std::memset(remote_mem->data(), 'k', remote_mem->size());
  kvx::memory::segment_table owner_table("prefill-0");
  auto seg = *owner_table.add("kv-cache", remote_mem->region());
  auto desc = owner_table.describe(seg);
  desc.transports["ucx"] = *owner->register_memory(seg);  // worker address, rkey, base, ...

  std::vector<std::byte> local(4096);
  kvx::memory::segment_table local_table("decode-0");
  auto local_seg = *local_table.add("staging", {local.data(), local.size()});
  (void)*initiator->register_memory(local_seg);

  bool ok = false;
  asio::co_spawn(
      io,
      [&]() -> asio::awaitable<void> {
        co_await initiator->async_read(desc, 4096, std::span(local), asio::use_awaitable);
        std::memset(local.data(), 'v', 100);
        // Completes once the bytes are visible in the owner's memory (put + flush).
        auto [ec] = co_await initiator->async_write(desc, 0, std::span<const std::byte>(local).first(100),
                                                    kvx::cancel_after(2s, asio::as_tuple(asio::use_awaitable)));
        ok = !ec && local[200] == std::byte{'k'} && remote_mem->data()[99] == std::byte{'v'};
        io.stop();  // the transports keep io busy, like listening sockets
      },
      asio::detached);
  io.run();
  std::printf("ucx transfer %s\n", ok ? "ok" : "FAILED");
  (void)initiator->deregister_memory(local_seg);
  (void)owner->deregister_memory(seg);
  return ok ? 0 : 1;
}
