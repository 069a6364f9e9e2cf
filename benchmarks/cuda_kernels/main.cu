// cuda_kernels_bench: how close the KV gather / scatter kernels come to
// cudaMemcpyAsync device-to-device, and how fast the fp8 codec runs.
//
// For each case the kernel moves N blocks of a paged pool (layer_first or
// page_first) to or from one contiguous staging buffer; the reference is one
// cudaMemcpyAsync of the same number of bytes between two device buffers,
// timed with CUDA events in the same run. "ratio" = kernel GB/s / memcpy GB/s
// (bytes counted once: what was copied, not read + written).
//
//   cuda_kernels_bench [--iters N] [--bytes MiB]
//
// Prints a markdown table; exits 0 with a message when there is no GPU.
#include <kvx/cuda/device.hpp>
#include <kvx/cuda/kernels/kv_gather.cuh>
#include <kvx/cuda/kernels/kv_quant.cuh>
#include <kvx/cuda/memory.hpp>
#include <kvx/cuda/paged_kv_view_of.hpp>
#include <kvx/disagg/layouts/layer_first.hpp>
#include <kvx/disagg/layouts/page_first.hpp>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <vector>

namespace kc = kvx::cuda;
namespace kd = kvx::disagg;

namespace {

#define BENCH_CUDA(call)                                                                     \
  do {                                                                                       \
    const cudaError_t e_ = (call);                                                           \
    if (e_ != cudaSuccess) {                                                                 \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
      std::exit(1);                                                                          \
    }                                                                                        \
  } while (false)

template <class T>
T must(kvx::result<T> r, const char* what) {
  if (!r) {
    std::fprintf(stderr, "%s: %s\n", what, r.error().message().c_str());
    std::exit(1);
  }
  return std::move(*r);
}
void must(const kvx::result<void>& r, const char* what) {
  if (!r) {
    std::fprintf(stderr, "%s: %s\n", what, r.error().message().c_str());
    std::exit(1);
  }
}

struct options {
  int iters = 20;
  std::uint64_t bytes = 256ULL << 20;  // moved per launch
};

// Milliseconds per call of `f` (after two warm-up calls), timed with events.
double time_ms(cudaStream_t s, int iters, const std::function<void()>& f) {
  f();
  f();
  cudaEvent_t a, b;
  BENCH_CUDA(cudaEventCreate(&a));
  BENCH_CUDA(cudaEventCreate(&b));
  BENCH_CUDA(cudaEventRecord(a, s));
  for (int i = 0; i < iters; ++i) f();
  BENCH_CUDA(cudaEventRecord(b, s));
  BENCH_CUDA(cudaEventSynchronize(b));
  float ms = 0;
  BENCH_CUDA(cudaEventElapsedTime(&ms, a, b));
  BENCH_CUDA(cudaEventDestroy(a));
  BENCH_CUDA(cudaEventDestroy(b));
  return static_cast<double>(ms) / iters;
}

struct bench {
  options opt;
  cudaStream_t stream = nullptr;
  kc::device_buffer copy_src, copy_dst;  // the memcpy reference

  double memcpy_gbps(std::uint64_t bytes) {
    const double ms = time_ms(stream, opt.iters, [&] {
      BENCH_CUDA(cudaMemcpyAsync(copy_dst.data(), copy_src.data(), bytes, cudaMemcpyDeviceToDevice, stream));
    });
    return static_cast<double>(bytes) / (ms * 1e6);
  }

  void row(const std::string& name, std::uint64_t chunk, std::uint32_t n, std::uint64_t bytes, double ms) {
    const double gbps = static_cast<double>(bytes) / (ms * 1e6);
    const double ref = memcpy_gbps(bytes);
    std::printf("| %s | %llu KiB | %u | %.1f MiB | %.0f | %.0f | %.2f |\n", name.c_str(),
                static_cast<unsigned long long>(chunk >> 10), n, static_cast<double>(bytes) / (1 << 20), gbps, ref,
                gbps / ref);
  }

  // A pool of `layout` holding at least `n` blocks, its view and `n` random distinct ids on the device.
  template <class Layout>
  void run_case(const std::string& name, const kd::kv_shape& shape, std::uint32_t blocks, std::uint32_t n,
                kc::kv_slice slice, bool fp8 = false) {
    const auto layout = must(Layout::make(shape, blocks), "layout");
    auto pool = must(kc::device_buffer::allocate(layout.bytes_required(), 0), "pool");
    BENCH_CUDA(cudaMemset(pool.data(), 0x3c, pool.size()));  // finite bf16 / fp16 values
    const auto view = must(kc::paged_kv_view_of(layout, pool.region()), "view");
    std::vector<std::uint32_t> ids(blocks);
    std::iota(ids.begin(), ids.end(), 0U);
    std::shuffle(ids.begin(), ids.end(), std::mt19937(42));
    ids.resize(n);
    auto dids = must(kc::device_buffer::allocate(n * sizeof(std::uint32_t), 0), "ids");
    BENCH_CUDA(cudaMemcpy(dids.data(), ids.data(), n * sizeof(std::uint32_t), cudaMemcpyHostToDevice));
    const kc::device_block_ids bids{reinterpret_cast<const std::uint32_t*>(dids.data()), n};
    const std::uint64_t bytes = kc::kv_staging_bytes(view, n, slice);
    const std::uint64_t chunk = bytes / n / slice.resolved(view).layer_count();

    if (!fp8) {
      auto staging = must(kc::device_buffer::allocate(bytes, 0), "staging");
      const double g = time_ms(stream, opt.iters, [&] {
        must(kc::gather_kv(view, bids, slice, staging.data(), bytes, stream), "gather_kv");
      });
      row("gather " + name, chunk, n, bytes, g);
      const double s = time_ms(stream, opt.iters, [&] {
        must(kc::scatter_kv(view, bids, slice, staging.data(), bytes, stream), "scatter_kv");
      });
      row("scatter " + name, chunk, n, bytes, s);
      return;
    }
    const kc::fp8_e4m3_codec<__nv_bfloat16> codec{};
    const std::uint64_t sb = codec.staging_bytes(view, n, slice);
    auto staging = must(kc::device_buffer::allocate(sb, 0), "staging");
    const double e = time_ms(stream, opt.iters, [&] {
      must(codec.encode(view, bids, slice, staging.data(), sb, stream, nullptr), "encode");
    });
    row("fp8 encode " + name, chunk, n, bytes, e);
    const double d = time_ms(stream, opt.iters, [&] {
      must(codec.decode(view, bids, slice, staging.data(), sb, stream, nullptr), "decode");
    });
    row("fp8 decode " + name, chunk, n, bytes, d);
  }
};

}  // namespace

int main(int argc, char** argv) {
  options opt;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--iters" && i + 1 < argc) {
      opt.iters = std::max(1, std::atoi(argv[++i]));
    } else if (a == "--bytes" && i + 1 < argc) {
      opt.bytes = std::max<std::uint64_t>(1, std::strtoull(argv[++i], nullptr, 10)) << 20;
    } else {
      std::printf("usage: %s [--iters N] [--bytes MiB moved per launch]\n", argv[0]);
      return a == "--help" || a == "-h" ? 0 : 2;
    }
  }
  if (kc::device_count() == 0) {
    std::printf("cuda_kernels_bench: skipped: %s\n", kc::skip_reason().c_str());
    return 0;
  }
  bench b;
  b.opt = opt;
  BENCH_CUDA(cudaStreamCreateWithFlags(&b.stream, cudaStreamNonBlocking));
  b.copy_src = must(kc::device_buffer::allocate(opt.bytes, 0), "memcpy source");
  b.copy_dst = must(kc::device_buffer::allocate(opt.bytes, 0), "memcpy destination");
  BENCH_CUDA(cudaMemset(b.copy_src.data(), 1, opt.bytes));

  const auto id = must(kc::identify(0), "identify");
  std::printf("device: %s; %d launches per figure; %.0f MiB per launch; GB/s = 1e9 bytes/s\n\n", id.name.c_str(),
              opt.iters, static_cast<double>(opt.bytes) / (1 << 20));
  std::printf("| case | block-layer | blocks | bytes | kernel GB/s | memcpy GB/s | ratio |\n");
  std::printf("| --- | --- | --- | --- | --- | --- | --- |\n");

  // Chunk sizes 16..256 KiB: 16-token blocks of 128-dim bf16 heads, 8 KiB per head
  // (K and V), 8 layers, 2..32 heads.
  constexpr std::uint32_t layers = 8;
  for (std::uint32_t heads : {2U, 4U, 8U, 16U, 32U}) {
    const kd::kv_shape s{.layers = layers, .block_tokens = 16, .kv_heads = heads, .head_dim = 128, .dtype_bytes = 2};
    const std::uint64_t per_block = s.block_bytes();
    const auto n = static_cast<std::uint32_t>(std::max<std::uint64_t>(1, opt.bytes / per_block));
    b.run_case<kd::layouts::layer_first>("layer_first, all layers", s, n * 2, n, {});
  }
  // The realistic shape: 32 layers, 16-token blocks, 8 KV heads x 128, bf16 (64 KiB block-layers).
  const kd::kv_shape real{.layers = 32, .block_tokens = 16, .kv_heads = 8, .head_dim = 128, .dtype_bytes = 2};
  const auto n = static_cast<std::uint32_t>(std::max<std::uint64_t>(1, opt.bytes / real.block_bytes()));
  b.run_case<kd::layouts::layer_first>("layer_first, 32 layers", real, n * 2, n, {});
  b.run_case<kd::layouts::page_first>("page_first, 32 layers", real, n * 2, n, {});
  // Layer-wise streaming moves one layer of the same blocks per launch (1/32 of the bytes).
  b.run_case<kd::layouts::layer_first>("layer_first, one layer (streaming)", real, n * 2, n,
                                       {.layer_begin = 5, .layer_end = 6});
  b.run_case<kd::layouts::layer_first>("layer_first, heads 0-3 of 8 (TP 1->2)", real, n * 2, n,
                                       {.head_begin = 0, .head_count = 4});
  b.run_case<kd::layouts::page_first>("page_first, heads 4-7 of 8 (TP 2->1)", real, n * 2, n,
                                      {.head_begin = 4, .head_count = 4});
  b.run_case<kd::layouts::layer_first>("layer_first bf16, 32 layers", real, n * 2, n, {}, /*fp8=*/true);

  std::printf("\nfp8 rows count the bf16 bytes (the input of encode, the output of decode); the staging is half of it.\n");
  BENCH_CUDA(cudaStreamSynchronize(b.stream));
  BENCH_CUDA(cudaStreamDestroy(b.stream));
  return 0;
}
