// Two transfer engines in one process (a prefill node and a decode node),
// reaching each other through the `local` transport: the decode node reads a
// KV range the prefill node registered, then writes a reply back.
#include <kvx/transfer.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <cstdio>
#include <cstring>
#include <vector>

namespace asio = boost::asio;
using engine = kvx::transfer::transfer_engine<kvx::transfer::embedded_metadata, kvx::transport::local>;

asio::awaitable<int> demo(engine& prefill, engine& decode) {
  std::vector<std::byte> kv(1 << 20), scratch(1 << 20);
  for (std::size_t i = 0; i < kv.size(); ++i) kv[i] = std::byte(i % 251);

  // Register once; peers then address the memory as (segment, offset, length).
  auto [e1, d1] = co_await prefill.async_register_memory({kv.data(), kv.size()}, "prefill-0/kv", asio::use_awaitable);
  auto [e2, d2] = co_await decode.async_register_memory({scratch.data(), scratch.size()}, "decode-0/kv", asio::use_awaitable);
  if (e1 || e2) co_return 1;

  kvx::transfer::batch b;
  b.read(std::span(scratch).first(64 * 1024), "prefill-0/kv", 4096);                 // one range
  b.add(kvx::transfer::transfer_op::read_blocks({scratch.data() + 65536, 8192},     // 16 strided blocks
                                                {"prefill-0/kv", 0, 16384}, 16, 4096));
  auto [ec, result] = co_await decode.async_transfer(std::move(b), asio::use_awaitable);
  if (ec) {
    std::printf("transfer failed: %s\n", result.first_error().message().c_str());
    co_return 1;
  }
  const bool same = std::memcmp(scratch.data(), kv.data() + 4096, 64 * 1024) == 0 &&
                    std::memcmp(scratch.data() + 65536 + 8192 * 15, kv.data() + 16384 * 15, 4096) == 0;
  std::printf("moved %llu bytes over %s in %zu ops: %s\n", static_cast<unsigned long long>(result.bytes),
              result.ops[0].transport.c_str(), result.ops.size(), same ? "bytes match" : "MISMATCH");
  co_return same ? 0 : 1;
}

int main() {
  asio::io_context io;
  kvx::transfer::embedded_metadata meta(io.get_executor());  // both nodes share it in this process
  kvx::transport::local net_p(io.get_executor()), net_d(io.get_executor());
  engine prefill(meta, {.node = "prefill-0"}, net_p);
  engine decode(meta, {.node = "decode-0"}, net_d);
  int rc = 1;
  asio::co_spawn(io, demo(prefill, decode), [&](std::exception_ptr e, int r) { rc = e ? 1 : r; });
  io.run();
  return rc;
}
