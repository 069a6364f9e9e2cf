// cuda_tier_bench: how fast the GPU tier moves a block between host memory
// and the GPU, against a plain synchronous cudaMemcpy of the same bytes
// between the same host memory and a device buffer, measured in the same run.
//
//   cuda_tier_bench [--device N] [--sizes 64KiB,256KiB,1MiB,4MiB] [--total 1GiB] [--arena 256MiB]
//                   [--lanes 4] [--chunk 1MiB] [--repeat 3]
//
// For each block size, host memory kind (pageable: malloc'd and pre-faulted;
// pinned: cudaHostAlloc) and direction, prints GB/s (best of --repeat, each
// moving about --total bytes) of `cuda_tier::store` (host to device) or
// `cuda_tier::load` (device to host), of cudaMemcpy, and their ratio, as a
// Markdown table. Host buffers rotate through an --arena of memory so small
// blocks are not served from the CPU caches. Without a GPU it says why and
// exits 0.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <kvx/cache/tiers/cuda_tier.hpp>
#include <kvx/core/bytes.hpp>
#include <kvx/cuda/device.hpp>
#include <kvx/cuda/memory.hpp>

namespace kc = kvx::cache;
using clk = std::chrono::steady_clock;

namespace {

struct options {
  int device = 0;
  std::vector<std::uint64_t> sizes = {64 << 10, 256 << 10, 1 << 20, 4 << 20};
  std::uint64_t total = 1ULL << 30;
  std::uint64_t arena = 256ULL << 20;
  std::size_t lanes = 4;
  std::uint64_t chunk = 1 << 20;
  int repeat = 3;
};

[[noreturn]] void usage(const std::string& why) {
  std::fprintf(stderr,
               "cuda_tier_bench: %s\nusage: cuda_tier_bench [--device N] [--sizes 64KiB,1MiB,...] [--total 1GiB] "
               "[--arena 256MiB] [--lanes N] [--chunk 1MiB] [--repeat N]\n",
               why.c_str());
  std::exit(2);
}

std::uint64_t size_arg(const std::string& v) {
  auto r = kvx::parse_size(v);
  if (!r) usage(r.error().message());
  return *r;
}

options parse(int argc, char** argv) {
  options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto val = [&]() -> std::string {
      if (i + 1 >= argc) usage("missing value after " + a);
      return argv[++i];
    };
    if (a == "--device") {
      o.device = static_cast<int>(size_arg(val()));
    } else if (a == "--sizes") {
      o.sizes.clear();
      std::string list = val();
      for (std::size_t p = 0; p <= list.size();) {
        const auto q = std::min(list.find(',', p), list.size());
        o.sizes.push_back(size_arg(list.substr(p, q - p)));
        p = q + 1;
      }
    } else if (a == "--total") {
      o.total = size_arg(val());
    } else if (a == "--arena") {
      o.arena = size_arg(val());
    } else if (a == "--lanes") {
      o.lanes = static_cast<std::size_t>(size_arg(val()));
    } else if (a == "--chunk") {
      o.chunk = size_arg(val());
    } else if (a == "--repeat") {
      o.repeat = static_cast<int>(size_arg(val()));
    } else {
      usage("unknown argument " + a);
    }
  }
  if (o.sizes.empty() || o.total == 0 || o.lanes == 0 || o.chunk == 0 || o.repeat <= 0)
    usage("--sizes, --total, --lanes, --chunk and --repeat must be positive");
  for (auto s : o.sizes)
    if (s == 0 || s > o.arena) usage("every size must be positive and at most --arena");
  return o;
}

std::string human(std::uint64_t n) {
  if (n >= (1 << 20) && n % (1 << 20) == 0) return std::to_string(n >> 20) + " MiB";
  if (n >= (1 << 10) && n % (1 << 10) == 0) return std::to_string(n >> 10) + " KiB";
  return std::to_string(n) + " B";
}

void die(const std::string& what) {
  std::fprintf(stderr, "cuda_tier_bench: %s\n", what.c_str());
  std::exit(1);
}
void check(cudaError_t s, const char* what) {
  if (s != cudaSuccess) die(std::string(what) + ": " + cudaGetErrorName(s) + " (" + cudaGetErrorString(s) + ")");
}

// GB/s (1e9 bytes per second) of `op(i)` for i in [0, iters), best of `repeat`, after two warm-up calls.
double bandwidth(std::uint64_t bytes_per_op, std::uint64_t iters, int repeat, const std::function<void(std::uint64_t)>& op) {
  op(0);
  op(1);
  double best = 0;
  for (int r = 0; r < repeat; ++r) {
    const auto t0 = clk::now();
    for (std::uint64_t i = 0; i < iters; ++i) op(i);
    // cudaMemcpy from pageable memory may return before its DMA has landed.
    check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    const double s = std::chrono::duration<double>(clk::now() - t0).count();
    best = std::max(best, static_cast<double>(bytes_per_op * iters) / s / 1e9);
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  const options o = parse(argc, argv);
  if (kvx::cuda::device_count() == 0) {
    std::printf("cuda_tier_bench: skipped: %s\n", kvx::cuda::skip_reason().c_str());
    return 0;
  }
  auto id = kvx::cuda::identify(o.device);
  if (!id) die(id.error().message());
  kvx::cuda::device_guard on(o.device);

  const std::uint64_t largest = *std::max_element(o.sizes.begin(), o.sizes.end());
  // Pageable host memory, pre-faulted (a first touch must not land in a copy).
  std::unique_ptr<std::byte[]> pageable(new std::byte[o.arena]);
  for (std::uint64_t i = 0; i < o.arena; ++i) pageable[i] = static_cast<std::byte>(i * 131 + 7);
  auto pinned = kvx::cuda::pinned_buffer::allocate(o.arena);
  if (!pinned) die(pinned.error().message());
  std::memcpy(pinned->data(), pageable.get(), o.arena);
  auto dev = kvx::cuda::device_buffer::allocate(largest, o.device);
  if (!dev) die(dev.error().message());

  kc::cuda_tier_config cfg;
  cfg.capacity = 4 * largest + (64ULL << 20);
  cfg.device = o.device;
  cfg.lanes = o.lanes;
  cfg.staging_chunk = o.chunk;
  kc::cuda_tier<> tier(cfg);

  std::printf("cuda_tier_bench on cuda:%d (%s, %s): lanes %zu, staging chunk %s, ~%s moved per measurement, best of %d\n\n",
              o.device, id->name.c_str(), id->pci_bus.c_str(), o.lanes, human(o.chunk).c_str(), human(o.total).c_str(),
              o.repeat);
  std::printf("| block | host memory | direction | cuda_tier GB/s | cudaMemcpy GB/s | ratio |\n");
  std::printf("| ---: | --- | --- | ---: | ---: | ---: |\n");

  for (const std::uint64_t s : o.sizes) {
    const std::uint64_t iters = std::max<std::uint64_t>(8, o.total / s);
    const std::uint64_t slots = std::max<std::uint64_t>(1, o.arena / s);
    const kc::block_key held{1, s};
    if (!tier.store(held, {pinned->data(), s})) die("store of the block to load");
    for (const bool is_pinned : {false, true}) {
      std::byte* host = is_pinned ? pinned->data() : pageable.get();
      auto at = [&](std::uint64_t i) { return host + (i % slots) * s; };
      // Host to device: store a block, then erase it (its room is reused by the next).
      const double store = bandwidth(s, iters, o.repeat, [&](std::uint64_t i) {
        const kc::block_key k{2, i};
        if (auto r = tier.store(k, {at(i), s}); !r) die(r.error().message());
        tier.erase(k);
      });
      const double h2d = bandwidth(s, iters, o.repeat, [&](std::uint64_t i) {
        check(cudaMemcpy(dev->data(), at(i), s, cudaMemcpyHostToDevice), "cudaMemcpy H2D");
      });
      const double load = bandwidth(s, iters, o.repeat, [&](std::uint64_t i) {
        if (auto r = tier.load(held, {at(i), s}); !r) die(r.error().message());
      });
      const double d2h = bandwidth(s, iters, o.repeat, [&](std::uint64_t i) {
        check(cudaMemcpy(at(i), dev->data(), s, cudaMemcpyDeviceToHost), "cudaMemcpy D2H");
      });
      const char* kind = is_pinned ? "pinned" : "pageable";
      std::printf("| %s | %s | store (H2D) | %.2f | %.2f | %.2f |\n", human(s).c_str(), kind, store, h2d, store / h2d);
      std::printf("| %s | %s | load (D2H) | %.2f | %.2f | %.2f |\n", human(s).c_str(), kind, load, d2h, load / d2h);
      std::fflush(stdout);
    }
    tier.erase(held);
  }
  const auto st = tier.stats();
  std::printf("\n%llu direct and %llu staged tier copies\n", static_cast<unsigned long long>(st.direct_copies),
              static_cast<unsigned long long>(st.staged_copies));
  return 0;
}
