// A request's KV from a prefill GPU to a decode GPU: prefill runs tensor
// parallel 2 (two shards of 4 KV heads, layer_first pools), decode runs TP 1
// (8 KV heads, a page_first pool). Each prefill shard gathers the request's
// blocks into one staging buffer (one kernel), the decode engine reads both
// stagings through the transfer engine (cuda_ipc: GPU to GPU, no host
// copy), and two scatter kernels put each shard's heads into the decode
// pool's blocks. The result is checked byte for byte against the CPU
// reference (kvx::disagg::convert). Shape: 32 layers, 16-token blocks, 8 KV
// heads x 128, bf16; a 512-token prompt is 32 blocks, 64 MiB of KV.
#include <boost/asio/io_context.hpp>

#include <chrono>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

#include <kvx/cuda/memory.hpp>
#include <kvx/cuda/paged_kv_view_of.hpp>
#include <kvx/cuda/stream.hpp>
#include <kvx/disagg/layout_convert.hpp>
#include <kvx/disagg/layouts/layer_first.hpp>
#include <kvx/disagg/layouts/page_first.hpp>
#include <kvx/transfer/embedded_metadata.hpp>
#include <kvx/transfer/transfer_engine.hpp>
#include <kvx/transport/cuda_ipc.hpp>
#include <kvx/transport/local.hpp>

#include "kernels.hpp"

namespace asio = boost::asio;
using namespace kvx::disagg;
using engine_t = kvx::transfer::transfer_engine<kvx::transfer::embedded_metadata, kvx::transport::local,
                                                kvx::transport::cuda_ipc>;
using clock_type = std::chrono::steady_clock;

namespace {

int fail(const std::string& what) {
  std::printf("cuda_pd_transfer: %s\n", what.c_str());
  return 1;
}

double ms_since(clock_type::time_point t0) {
  return std::chrono::duration<double, std::milli>(clock_type::now() - t0).count();
}

std::vector<std::uint32_t> distinct_blocks(std::uint32_t n, std::uint32_t pool, std::uint64_t seed) {
  std::vector<std::uint32_t> all(pool);
  std::iota(all.begin(), all.end(), 0U);
  std::shuffle(all.begin(), all.end(), std::mt19937_64(seed));
  all.resize(n);
  return all;
}

}  // namespace

int main() {
  if (kvx::cuda::device_count() == 0) {
    std::printf("cuda_pd_transfer: skipped: %s\n", kvx::cuda::skip_reason().c_str());
    return 0;
  }
  constexpr std::uint32_t heads = 8, tp_prefill = 2, pool_blocks = 128, prompt = 512;
  const kv_shape full{.layers = 32, .block_tokens = 16, .kv_heads = heads, .head_dim = 128, .dtype_bytes = 2};
  kv_shape shard = full;
  shard.kv_heads = heads / tp_prefill;
  const auto prefill_layout = layouts::layer_first::make(shard, pool_blocks).value();
  const auto decode_layout = layouts::page_first::make(full, pool_blocks).value();
  const std::uint32_t nblocks = prompt / full.block_tokens;
  const auto prefill_table = distinct_blocks(nblocks, pool_blocks, 1);  // both ranks share the block table
  const auto decode_table = distinct_blocks(nblocks, pool_blocks, 2);

  // Prefill pools: random KV, as the forward pass would have left it.
  std::vector<kvx::cuda::device_buffer> prefill_pools;
  std::vector<std::vector<std::byte>> prefill_host;
  for (std::uint32_t r = 0; r < tp_prefill; ++r) {
    auto& host = prefill_host.emplace_back(prefill_layout.bytes_required());
    std::mt19937_64 rng(100 + r);
    for (auto& b : host) b = std::byte(static_cast<unsigned char>(rng()));
    prefill_pools.push_back(kvx::cuda::device_buffer::allocate(host.size(), 0).value());
    if (cudaMemcpy(prefill_pools.back().data(), host.data(), host.size(), cudaMemcpyHostToDevice) != cudaSuccess)
      return fail("upload");
  }
  auto decode_pool = kvx::cuda::device_buffer::allocate(decode_layout.bytes_required(), 0).value();
  (void)cudaMemset(decode_pool.data(), 0, decode_pool.size());

  const auto pview = kvx::cuda::paged_kv_view_of(prefill_layout, prefill_pools[0].region()).value();
  const auto dview = kvx::cuda::paged_kv_view_of(decode_layout, decode_pool.region()).value();
  const std::uint64_t stage_bytes = example::staging_bytes(pview, nblocks, {});

  // Two engines (in one process here; the same code runs across processes:
  // cuda_ipc then maps the prefill staging through its IPC handle).
  asio::io_context io;
  kvx::transfer::embedded_metadata meta(io.get_executor());
  kvx::transport::local pl(io.get_executor()), dl(io.get_executor());
  kvx::transport::cuda_ipc pipc(io.get_executor()), dipc(io.get_executor());
  engine_t prefill(meta, {.node = "prefill-0"}, pl, pipc);
  engine_t decode(meta, {.node = "decode-0"}, dl, dipc);
  std::vector<kvx::cuda::device_buffer> staging, receive;
  int pending = 0;
  std::error_code setup_error;
  auto registered = [&](std::error_code ec, const kvx::memory::segment_descriptor&) {
    if (ec) setup_error = ec;
    --pending;
  };
  for (std::uint32_t r = 0; r < tp_prefill; ++r) {
    staging.push_back(kvx::cuda::device_buffer::allocate(stage_bytes, 0).value());
    receive.push_back(kvx::cuda::device_buffer::allocate(stage_bytes, 0).value());
    pending += 2;
    prefill.async_register_memory(staging.back().region(), "prefill-0/staging-" + std::to_string(r), registered);
    decode.async_register_memory(receive.back().region(), "decode-0/receive-" + std::to_string(r), registered);
  }
  io.run();
  if (setup_error || pending) return fail("register: " + setup_error.message());

  auto stream = kvx::cuda::stream::create(0).value();
  // Twice: the first pass also pays one-time costs (kernel load, IPC mapping,
  // streams, the poller thread); the second is what every later request costs.
  double gather_ms = 0, transfer_ms = 0, scatter_ms = 0;
  kvx::transfer::batch_result result;
  for (int pass = 0; pass < 2; ++pass) {
    const auto t0 = clock_type::now();
    // 1. Prefill: each rank gathers its shard's blocks (all layers, its 4 heads).
    for (std::uint32_t r = 0; r < tp_prefill; ++r) {
      auto v = kvx::cuda::paged_kv_view_of(prefill_layout, prefill_pools[r].region()).value();
      if (auto g = example::gather(v, prefill_table, {}, staging[r].data(), stage_bytes, stream.native()); !g)
        return fail(g.error().message());
    }
    std::error_code ec;
    kvx::cuda::async_wait(stream.native(), io.get_executor(), [&](std::error_code e) { ec = e; });
    io.restart();
    io.run();
    if (ec) return fail("gather: " + ec.message());
    gather_ms = ms_since(t0);

    // 2. Decode pulls both stagings, GPU to GPU (the engine picks cuda_ipc: device memory).
    const auto t1 = clock_type::now();
    kvx::transfer::batch b;
    for (std::uint32_t r = 0; r < tp_prefill; ++r)
      b.read(std::span(receive[r].data(), stage_bytes), "prefill-0/staging-" + std::to_string(r), 0);
    decode.async_transfer(std::move(b), [&](std::error_code e, kvx::transfer::batch_result r) {
      ec = e;
      result = std::move(r);
    });
    io.restart();
    io.run();
    if (ec) return fail("transfer: " + result.first_error().message());
    transfer_ms = ms_since(t1);

    // 3. Decode scatters rank r's staging into heads [4r, 4r + 4) of its blocks.
    const auto t2 = clock_type::now();
    for (std::uint32_t r = 0; r < tp_prefill; ++r) {
      const kvx::cuda::kv_slice heads_of_r{.head_begin = r * heads / tp_prefill, .head_count = heads / tp_prefill};
      if (auto s = example::scatter(dview, decode_table, heads_of_r, receive[r].data(), stage_bytes, stream.native()); !s)
        return fail(s.error().message());
    }
    if (auto s = stream.synchronize(); !s) return fail(s.error().message());
    scatter_ms = ms_since(t2);
  }

  // The CPU reference: kvx::disagg::convert over the same tables.
  std::vector<std::byte> expected(decode_layout.bytes_required()), got(decode_layout.bytes_required());
  const std::vector<kv_source<layouts::layer_first>> src{
      {&prefill_layout, prefill_host[0], prefill_table, 0}, {&prefill_layout, prefill_host[1], prefill_table, heads / tp_prefill}};
  const std::vector<kv_target<layouts::page_first>> dst{{&decode_layout, expected, decode_table, 0}};
  if (auto c = convert<layouts::layer_first, layouts::page_first>(src, dst, {0, prompt}); !c) return fail(c.error().message());
  if (cudaMemcpy(got.data(), decode_pool.data(), got.size(), cudaMemcpyDeviceToHost) != cudaSuccess) return fail("download");
  const bool same = got == expected;

  const double total_mb = 2.0 * static_cast<double>(stage_bytes) / 1e6;
  std::printf("%u-token prompt, %u blocks, %.1f MB of KV: prefill TP=%u layer_first -> decode TP=1 page_first over %s\n",
              prompt, nblocks, total_mb, tp_prefill, result.ops[0].transport.c_str());
  std::printf("second pass: gather %.3f ms, transfer %.3f ms (%.0f GB/s), scatter %.3f ms; total %.3f ms: %s\n", gather_ms, transfer_ms,
              total_mb / transfer_ms, scatter_ms, gather_ms + transfer_ms + scatter_ms,
              same ? "decode KV matches the CPU reference" : "MISMATCH against the CPU reference");
  return same ? 0 : 1;
}
