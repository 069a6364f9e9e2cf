#include <kvx/transport/cuda_ipc.hpp>

#include <gtest/gtest.h>

#include <boost/asio/io_context.hpp>

#include <csignal>
#include <optional>
#include <random>
#include <thread>
#include <vector>

#include <kvx/cuda/memory.hpp>
#include <kvx/transfer/embedded_metadata.hpp>
#include <kvx/transfer/transfer_engine.hpp>
#include <kvx/transport/local.hpp>

#include "support/child_process.hpp"
#include "support/cuda_pattern.hpp"
#include "support/run_until.hpp"

namespace {

namespace asio = boost::asio;
using kvx::memory::segment_descriptor;
using kvx::transport::cuda_ipc;
using namespace std::chrono_literals;

#define KVX_REQUIRE_GPU()                                                    \
  do {                                                                       \
    if (kvx::cuda::device_count() == 0) GTEST_SKIP() << kvx::cuda::skip_reason(); \
  } while (false)

using kvx::test::run_until;

std::error_code op(asio::io_context& io, cuda_ipc& t, const segment_descriptor& d, std::uint64_t off, std::span<std::byte> buf,
                   bool read) {
  std::optional<std::error_code> out;
  if (read)
    t.async_read(d, off, buf, [&](std::error_code ec) { out = ec; });
  else
    t.async_write(d, off, std::span<const std::byte>(buf), [&](std::error_code ec) { out = ec; });
  EXPECT_FALSE(out) << "completion ran inside the initiating function";
  EXPECT_TRUE(run_until(io, [&] { return out.has_value(); })) << "op did not complete";
  return out.value_or(kvx::errc::internal);
}

// A descriptor that looks like another process's export on this host.
segment_descriptor foreign_descriptor(std::uint64_t length) {
  segment_descriptor d;
  d.name = "foreign";
  d.node = "elsewhere";
  d.length = length;
  d.where = kvx::memory::location::cuda(0);
  d.key = 42;
  d.host_id = kvx::memory::this_host_id();
  d.transports["cuda_ipc"] = {{"process", "another-process"}, {"handle", std::string(128, '0')}, {"offset", 0},
                              {"revocation", "/kvx-cuda-ipc-does-not-exist"}, {"slot", 0}};
  return d;
}

// ---- checks that need no GPU: they run in CI ---------------------------------

TEST(CudaIpc, SatisfiesTheTransportConceptWithDeviceMemoryCapabilities) {
  static_assert(kvx::transport::check_transport<cuda_ipc>());
  EXPECT_TRUE(kvx::transport::has(cuda_ipc::capabilities.memory, kvx::transport::memory_kinds::cuda));
  EXPECT_TRUE(cuda_ipc::capabilities.same_host_only);
  EXPECT_FALSE(cuda_ipc::capabilities.same_process_only);
  EXPECT_EQ(cuda_ipc::name(), "cuda_ipc");
}

TEST(CudaIpc, CanTransferOnlyToDeviceSegmentsOnThisHostWithAnEntry) {
  asio::io_context io;
  cuda_ipc t(io.get_executor());
  auto d = foreign_descriptor(4096);
  EXPECT_FALSE(t.can_transfer(d));
  auto other_host = d;
  other_host.host_id = "another-boot-id";
  EXPECT_EQ(t.can_transfer(other_host), kvx::errc::unreachable);
  auto host_mem = d;
  host_mem.where = kvx::memory::location::host();
  EXPECT_EQ(t.can_transfer(host_mem), kvx::errc::not_supported);
  auto no_entry = d;
  no_entry.transports = nlohmann::json::object();
  EXPECT_EQ(t.can_transfer(no_entry), kvx::errc::unreachable);
}

TEST(CudaIpc, HostSegmentsRegisterAsLocalSideOnlyAndFileSegmentsAreRefused) {
  asio::io_context io;
  cuda_ipc t(io.get_executor());
  std::vector<std::byte> buf(4096);
  kvx::memory::segment_table table("n");
  auto host_seg = table.add("h", {buf.data(), buf.size()});
  ASSERT_TRUE(host_seg);
  auto e = t.register_memory(*host_seg);
  ASSERT_TRUE(e) << e.error().message();
  EXPECT_TRUE(e->value("host", false));
  EXPECT_FALSE(e->contains("handle"));
  EXPECT_TRUE(t.deregister_memory(*host_seg));
  auto file_seg = table.add("f", {buf.data(), buf.size(), kvx::memory::location::file()});
  ASSERT_TRUE(file_seg);
  EXPECT_EQ(t.register_memory(*file_seg).code(), kvx::errc::not_supported);
}

TEST(CudaIpc, OutOfRangeAccessesFailBeforeTouchingAnything) {
  asio::io_context io;
  cuda_ipc t(io.get_executor());
  auto d = foreign_descriptor(4096);
  std::vector<std::byte> buf(64);
  EXPECT_EQ(op(io, t, d, 4096 - 32, buf, true), kvx::errc::out_of_range);
  EXPECT_EQ(op(io, t, d, ~std::uint64_t{0} - 8, buf, false), kvx::errc::out_of_range);
}

TEST(CudaIpc, MalformedEntriesAreRefusedWithAClearCode) {
  asio::io_context io;
  cuda_ipc t(io.get_executor());
  std::vector<std::byte> buf(64);
  auto bad_hex = foreign_descriptor(4096);
  bad_hex.transports["cuda_ipc"]["handle"] = "zz";
  EXPECT_EQ(op(io, t, bad_hex, 0, buf, true), kvx::errc::malformed_message);
  auto no_slot = foreign_descriptor(4096);
  no_slot.transports["cuda_ipc"].erase("slot");
  EXPECT_EQ(op(io, t, no_slot, 0, buf, true), kvx::errc::malformed_message);
  // Fields of the wrong type (a peer's entry): malformed, not an exception from the initiating call.
  for (auto [field, value] : {std::pair<const char*, nlohmann::json>{"handle", 5}, {"process", 7},
                              {"revocation", nlohmann::json::array()}, {"device_uuid", nlohmann::json::object()},
                              {"pid", "x"}}) {
    auto wrong = foreign_descriptor(4096);
    wrong.transports["cuda_ipc"][field] = value;
    EXPECT_EQ(op(io, t, wrong, 0, buf, true), kvx::errc::malformed_message) << field;
  }
  auto gone = foreign_descriptor(4096);  // its revocation table does not exist: the owner is gone
  EXPECT_EQ(op(io, t, gone, 0, buf, true), kvx::errc::stale);
}

// ---- GPU: one process -----------------------------------------------------------

TEST(CudaIpcGpu, ExporterReachesItsOwnSegmentsDirectly) {
  KVX_REQUIRE_GPU();
  asio::io_context io;
  cuda_ipc t(io.get_executor());
  constexpr std::size_t size = 1 << 20;
  auto gpu = kvx::cuda::device_buffer::allocate(size, 0).value();
  kvx::memory::segment_table table("self");
  auto seg = table.add("gpu", gpu.region()).value();
  auto entry = t.register_memory(seg);
  ASSERT_TRUE(entry) << entry.error().message();
  EXPECT_EQ(entry->at("handle").get<std::string>().size(), 128u);
  auto d = table.describe(seg);
  d.transports["cuda_ipc"] = *entry;

  std::vector<std::byte> in(size), out(size);
  kvx::test::fill_pattern(in, 3);
  auto pinned = kvx::cuda::pinned_buffer::allocate(size).value();
  std::memcpy(pinned.data(), in.data(), size);
  ASSERT_FALSE(op(io, t, d, 0, pinned.region().bytes(), false));  // pinned host -> device
  std::memset(pinned.data(), 0, size);
  ASSERT_FALSE(op(io, t, d, 0, pinned.region().bytes(), true));
  EXPECT_EQ(std::memcmp(pinned.data(), in.data(), size), 0);
  ASSERT_FALSE(op(io, t, d, 4096, std::span(out).first(8192), true));  // pageable host works too
  EXPECT_EQ(std::memcmp(out.data(), in.data() + 4096, 8192), 0);

  auto stale = d;
  stale.generation += 1;
  EXPECT_EQ(op(io, t, stale, 0, std::span(out).first(64), true), kvx::errc::stale);
  auto wrong_key = d;
  wrong_key.key += 1;
  EXPECT_EQ(op(io, t, wrong_key, 0, std::span(out).first(64), true), kvx::errc::bad_key);
  ASSERT_TRUE(t.deregister_memory(seg));
  EXPECT_EQ(op(io, t, d, 0, std::span(out).first(64), true), kvx::errc::unknown_segment);
}

TEST(CudaIpcGpu, ADestroyedTransportReleasesItsExports) {
  KVX_REQUIRE_GPU();
  asio::io_context io;
  auto gpu = kvx::cuda::device_buffer::allocate(1 << 20, 0).value();
  kvx::memory::segment_table table("self");
  auto seg = table.add("gpu", gpu.region()).value();
  {
    cuda_ipc first(io.get_executor());
    ASSERT_TRUE(first.register_memory(seg));
    cuda_ipc second(io.get_executor());
    EXPECT_EQ(second.register_memory(seg).code(), kvx::errc::already_exists) << "one exporter per name in a process";
  }  // destroyed without deregistering
  cuda_ipc third(io.get_executor());
  auto again = third.register_memory(seg);
  EXPECT_TRUE(again) << again.error().message();
}

// A peer stopped mid-op (modelled by marking an op in flight in the export's
// revocation slot, as a peer's prepare does) holds the memory past the revoke
// timeout: deregistration must not report it free, nor hand the slot out again.
TEST(CudaIpcGpu, AnOpOutlivingTheRevokeTimeoutFailsDeregistrationAndRetiresTheSlot) {
  KVX_REQUIRE_GPU();
  asio::io_context io;
  cuda_ipc t(io.get_executor(), kvx::transport::cuda_ipc_options{.revoke_timeout = 50ms, .max_segments = 2});
  auto gpu = kvx::cuda::device_buffer::allocate(3 << 20, 0).value();
  kvx::memory::segment_table table("self");
  auto seg = table.add("held", gpu.region().subregion(0, 1 << 20)).value();
  auto other = table.add("other", gpu.region().subregion(1 << 20, 1 << 20)).value();
  auto third = table.add("third", gpu.region().subregion(2 << 20, 1 << 20)).value();
  auto entry = t.register_memory(seg);
  ASSERT_TRUE(entry) << entry.error().message();
  auto slots = kvx::transport::detail::cuda_ipc_slot_table::open(entry->at("revocation").get<std::string>());
  ASSERT_TRUE(slots) << slots.error().message();
  const auto slot = entry->at("slot").get<std::size_t>();
  (*slots)->in_flight(slot).fetch_add(1);

  auto held = t.deregister_memory(seg);
  ASSERT_FALSE(held) << "deregistration reported memory free while a peer's op was in flight";
  EXPECT_EQ(held.code(), kvx::errc::timed_out);
  EXPECT_NE(held.error().message().find("'held': 1 peer ops"), std::string::npos) << held.error().message();
  EXPECT_EQ((*slots)->key(slot).load(), 0u) << "the slot is not revoked";
  ASSERT_TRUE(t.register_memory(other));
  EXPECT_EQ(t.register_memory(third).code(), kvx::errc::capacity_exceeded) << "the revoked slot was handed out again";
  EXPECT_EQ(t.deregister_memory(seg).code(), kvx::errc::timed_out) << "a second call waits for the op again";

  (*slots)->in_flight(slot).fetch_sub(1);
  EXPECT_TRUE(t.deregister_memory(seg)) << "the op ended: the slot is released";
  EXPECT_EQ(t.deregister_memory(seg).code(), kvx::errc::unknown_segment);
  EXPECT_TRUE(t.register_memory(third)) << "the released slot is free again";
  EXPECT_TRUE(t.deregister_memory(other));
  EXPECT_TRUE(t.deregister_memory(third));
}

TEST(CudaIpcGpu, RejectsMemoryThatIsNotFromCudaMalloc) {
  KVX_REQUIRE_GPU();
  asio::io_context io;
  cuda_ipc t(io.get_executor());
  std::vector<std::byte> host(4096);
  kvx::memory::segment_table table("self");
  // Host memory claiming to be on a GPU: the driver does not know the address.
  auto seg = table.add("liar", {host.data(), host.size(), kvx::memory::location::cuda(0)}).value();
  EXPECT_EQ(t.register_memory(seg).code(), kvx::errc::invalid_argument);
}

TEST(CudaIpcGpu, DeviceMemoryExhaustedIsCapacityExceeded) {
  KVX_REQUIRE_GPU();
  auto huge = kvx::cuda::device_buffer::allocate(std::size_t{1} << 50, 0);
  ASSERT_FALSE(huge);
  EXPECT_EQ(huge.code(), kvx::errc::capacity_exceeded) << huge.error().message();
  EXPECT_NE(huge.error().message().find("cudaErrorMemoryAllocation"), std::string::npos);
  // The failure left nothing sticky behind.
  auto small = kvx::cuda::device_buffer::allocate(4096, 0);
  EXPECT_TRUE(small) << small.error().message();
}

// Two engines in one process choose cuda_ipc for device memory by its location.
TEST(CudaIpcGpu, TransferEngineMovesDeviceSegmentsThroughCudaIpc) {
  KVX_REQUIRE_GPU();
  using engine_t = kvx::transfer::transfer_engine<kvx::transfer::embedded_metadata, kvx::transport::local, cuda_ipc>;
  asio::io_context io;
  kvx::transfer::embedded_metadata meta(io.get_executor());
  kvx::transport::local local_a(io.get_executor()), local_b(io.get_executor());
  cuda_ipc ipc_a(io.get_executor()), ipc_b(io.get_executor());
  engine_t prefill(meta, {.node = "prefill"}, local_a, ipc_a);
  engine_t decode(meta, {.node = "decode"}, local_b, ipc_b);
  constexpr std::size_t size = 4 << 20;
  auto src = kvx::cuda::device_buffer::allocate(size, 0).value();
  auto dst = kvx::cuda::device_buffer::allocate(size, 0).value();
  std::vector<std::byte> host(size);
  kvx::test::fill_pattern(host, 9);
  ASSERT_EQ(cudaMemcpy(src.data(), host.data(), size, cudaMemcpyHostToDevice), cudaSuccess);
  const auto name = "prefill-kv-" + std::to_string(::getpid());

  auto reg = [&](auto& e, const kvx::memory::memory_region& r, const std::string& n) {
    std::optional<std::error_code> out;
    e.async_register_memory(r, n, [&](std::error_code ec, segment_descriptor d) {
      out = ec;
      EXPECT_TRUE(d.transports.contains("cuda_ipc"));
    });
    EXPECT_TRUE(run_until(io, [&] { return out.has_value(); }));
    return out.value_or(kvx::errc::internal);
  };
  ASSERT_FALSE(reg(prefill, src.region(), name));
  ASSERT_FALSE(reg(decode, dst.region(), name + "-decode"));

  kvx::transfer::batch b;
  b.read(std::span(dst.data(), size), name, 0);
  std::optional<std::error_code> out;
  kvx::transfer::batch_result result;
  decode.async_transfer(std::move(b), [&](std::error_code ec, kvx::transfer::batch_result r) {
    out = ec;
    result = std::move(r);
  });
  ASSERT_TRUE(run_until(io, [&] { return out.has_value(); }));
  ASSERT_FALSE(*out) << out->message() << (result.ops.empty() ? "" : ": " + result.ops[0].context);
  std::vector<std::byte> back(size);
  ASSERT_EQ(cudaMemcpy(back.data(), dst.data(), size, cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(back, host);
}

// ---- GPU: two processes -----------------------------------------------------------

struct two_process : ::testing::Test {
  static constexpr std::size_t size = 8 << 20;
  static constexpr unsigned seed = 7;
  asio::io_context io;
  cuda_ipc t{io.get_executor()};
  std::optional<kvx::test::child_process> peer;
  segment_descriptor d;

  void SetUp() override {
    KVX_REQUIRE_GPU();
    peer.emplace(kvx::test::child_process::tool("cuda_ipc_peer"),
                 std::vector<std::string>{"--size", std::to_string(size), "--seed", std::to_string(seed)});
    auto line = peer->read_line(30s);
    ASSERT_TRUE(line) << "peer printed nothing";
    auto j = nlohmann::json::parse(*line, nullptr, false);
    ASSERT_FALSE(j.is_discarded()) << *line;
    auto parsed = segment_descriptor::from_json(j);
    ASSERT_TRUE(parsed) << *line;
    d = *parsed;
  }
  std::string ask(int sig) {
    peer->kill(sig);
    return peer->read_line(30s).value_or("(nothing)");
  }
};

TEST_F(two_process, ReadsAndWritesAreByteExactGpuToGpu) {
  EXPECT_TRUE(t.can_transfer(d) == std::error_code{});
  auto local = kvx::cuda::device_buffer::allocate(size, 0).value();
  ASSERT_FALSE(op(io, t, d, 0, std::span(local.data(), size), true));
  std::vector<std::byte> got(size), want(size);
  ASSERT_EQ(cudaMemcpy(got.data(), local.data(), size, cudaMemcpyDeviceToHost), cudaSuccess);
  kvx::test::fill_pattern(want, seed);
  ASSERT_EQ(got, want);
  EXPECT_EQ(t.imported_count(), 1u);

  // Unaligned sub-ranges both ways, then the owner hashes what it holds.
  std::vector<std::byte> patch(12345);
  kvx::test::fill_pattern(patch, 99);
  ASSERT_EQ(cudaMemcpy(local.data(), patch.data(), patch.size(), cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_FALSE(op(io, t, d, 777, std::span(local.data(), patch.size()), false));
  std::memcpy(want.data() + 777, patch.data(), patch.size());
  EXPECT_EQ(ask(SIGUSR2), "hash " + std::to_string(kvx::test::fnv1a(want)));
  std::vector<std::byte> tail(1000);
  ASSERT_FALSE(op(io, t, d, size - tail.size(), tail, true));  // into pageable host memory
  EXPECT_TRUE(std::equal(tail.begin(), tail.end(), want.end() - 1000));
  EXPECT_EQ(t.imported_count(), 1u) << "the handle is opened once and cached";
}

TEST_F(two_process, RevokedSegmentsCompleteStaleAndDropTheMapping) {
  auto local = kvx::cuda::device_buffer::allocate(4096, 0).value();
  ASSERT_FALSE(op(io, t, d, 0, std::span(local.data(), 4096), true));
  ASSERT_EQ(ask(SIGUSR1), "revoked");
  EXPECT_EQ(op(io, t, d, 0, std::span(local.data(), 4096), true), kvx::errc::stale);
  EXPECT_EQ(t.imported_count(), 0u);
}

TEST_F(two_process, ABadHandleIsStaleNotACrash) {
  auto bad = d;
  // 64 random bytes: no driver export looks like that.
  std::string hex;
  std::mt19937_64 rng(1234);
  for (int i = 0; i < 128; ++i) hex += "0123456789abcdef"[rng() % 16];
  bad.transports["cuda_ipc"]["handle"] = hex;
  auto local = kvx::cuda::device_buffer::allocate(4096, 0).value();
  const auto ec = op(io, t, bad, 0, std::span(local.data(), 4096), true);
  EXPECT_TRUE(ec) << "a made-up handle must not open";
  // The good descriptor still works afterwards: nothing sticky.
  EXPECT_FALSE(op(io, t, d, 0, std::span(local.data(), 4096), true));
}

TEST_F(two_process, ADeadOwnerIsConnectionLost) {
  auto local = kvx::cuda::device_buffer::allocate(4096, 0).value();
  ASSERT_FALSE(op(io, t, d, 0, std::span(local.data(), 4096), true));
  peer->kill(SIGKILL);
  peer->wait();
  std::this_thread::sleep_for(5ms);  // owners are checked at most once a millisecond
  EXPECT_EQ(op(io, t, d, 0, std::span(local.data(), 4096), true), kvx::errc::connection_lost);
  EXPECT_EQ(t.imported_count(), 0u);
}

}  // namespace
