// A store node in its own process for tests/store/ucx: a transfer engine
// over kvx::transport::ucx (its descriptors published through the test's
// http_metadata_server), a store_node contributing `bytes` of DRAM to the
// test's master. Prints {"node": NAME} once registered, then serves (heartbeats,
// progresses its UCX worker, carries out re-replication copies) until killed.
//
//   kvx_test_ucx_store_node <master HOST:PORT> <metadata URL> <name> <bytes> <tls>
#include <kvx/store/store_node.hpp>
#include <kvx/transfer/http_metadata.hpp>
#include <kvx/transfer/transfer_engine.hpp>
#include <kvx/transport/ucx.hpp>

#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>

#include <boost/asio/io_context.hpp>

#include <kvx/memory/mapped_arena.hpp>

int main(int argc, char** argv) {
  if (argc != 6) {
    std::fprintf(stderr, "usage: %s <master HOST:PORT> <metadata URL> <name> <bytes> <tls>\n", argv[0]);
    return 2;
  }
  const std::string master = argv[1], url = argv[2], name = argv[3], tls = argv[5];
  const std::size_t bytes = std::strtoull(argv[4], nullptr, 10);
  auto fail = [](const std::string& what) {
    std::fprintf(stderr, "ucx_store_node: %s\n", what.c_str());
    return 1;
  };
  boost::asio::io_context io;
  auto meta = kvx::transfer::http_metadata::from_url(io.get_executor(), url);
  if (!meta) return fail(meta.error().message());
  auto transport = kvx::transport::ucx::create(io.get_executor(), {.tls = tls});
  if (!transport) return fail(transport.error().message());
  kvx::transfer::transfer_engine<kvx::transfer::http_metadata, kvx::transport::ucx> engine(*meta, {.node = name},
                                                                                          *transport);
  auto arena = kvx::memory::mapped_arena::create(bytes);
  if (!arena) return fail(arena.error().message());
  kvx::store::store_node node(engine, kvx::store::master_client::create(io.get_executor(), master),
                              {.name = name, .segment = "", .tier = "dram", .heartbeat = std::chrono::milliseconds(100)});
  int rc = 0;
  node.async_start(arena->region(), [&](std::error_code ec) {
    if (ec) {
      rc = fail("registering: " + ec.message());
      io.stop();
      return;
    }
    std::cout << nlohmann::json{{"node", name}}.dump() << std::endl;
  });
  io.run();  // the transport keeps the context busy: runs until killed
  return rc;
}
