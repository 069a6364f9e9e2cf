// The transfer engine over `local` (memcpy between two engines of one
// process) beside a plain single-thread memcpy of the same bytes, measured in
// the same run: the gap is the engine's overhead (resolution is cached, so it
// is slicing, windowing, completion dispatch and the transport's checks).
//
//   BM_engine_small_batch   64 x 4 KiB reads per batch: ops/s ("items") and engine overhead per op
//   BM_engine_read/<bytes>  one read of 1..64 MiB per batch, sliced at 1 MiB: GB/s
//   BM_memcpy/<bytes>       the reference
#include <kvx/transfer.hpp>

#include <benchmark/benchmark.h>

#include <boost/asio/io_context.hpp>

#include <cstring>
#include <optional>
#include <vector>

namespace {

namespace asio = boost::asio;
using engine_t = kvx::transfer::transfer_engine<kvx::transfer::embedded_metadata, kvx::transport::local>;

struct setup {
  asio::io_context io;
  kvx::transfer::embedded_metadata meta{io.get_executor()};
  kvx::transport::local net_a{io.get_executor()}, net_b{io.get_executor()};
  engine_t owner{meta, {.node = "owner"}, net_a};
  engine_t user;
  std::vector<std::byte> remote, mine;

  explicit setup(std::size_t bytes, std::uint64_t slice)
      : user(meta, {.node = "user", .slice_size = slice, .max_in_flight = 64}, net_b), remote(bytes, std::byte{1}),
        mine(bytes, std::byte{2}) {  // both touched: no page faults inside the timing
    bool ok = true;
    owner.async_register_memory({remote.data(), remote.size()}, "bench-remote",
                                [&](std::error_code ec, kvx::memory::segment_descriptor) { ok = ok && !ec; });
    user.async_register_memory({mine.data(), mine.size()}, "bench-local",
                               [&](std::error_code ec, kvx::memory::segment_descriptor) { ok = ok && !ec; });
    io.run();
    if (!ok) std::abort();
  }

  bool run(kvx::transfer::batch b) {
    std::optional<std::error_code> out;
    user.async_transfer(std::move(b), [&](std::error_code ec, kvx::transfer::batch_result) { out = ec; });
    io.restart();
    io.run();
    return out && !*out;
  }
};

void BM_engine_small_batch(benchmark::State& state) {
  constexpr std::size_t block = 4096, ops = 64;
  setup s(block * ops, 1u << 20);
  s.run(kvx::transfer::batch{}.read(std::span(s.mine).first(block), "bench-remote", 0));  // resolve once
  for (auto _ : state) {
    kvx::transfer::batch b;
    for (std::size_t i = 0; i < ops; ++i) b.read(std::span(s.mine).subspan(i * block, block), "bench-remote", i * block);
    if (!s.run(std::move(b))) state.SkipWithError("transfer failed");
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations() * ops));
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * ops * block));
}
BENCHMARK(BM_engine_small_batch)->UseRealTime();

void BM_memcpy_small_batch(benchmark::State& state) {
  constexpr std::size_t block = 4096, ops = 64;
  std::vector<std::byte> a(block * ops, std::byte{1}), b(block * ops, std::byte{2});
  for (auto _ : state) {
    for (std::size_t i = 0; i < ops; ++i) std::memcpy(b.data() + i * block, a.data() + i * block, block);
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations() * ops));
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * ops * block));
}
BENCHMARK(BM_memcpy_small_batch)->UseRealTime();

void BM_engine_read(benchmark::State& state) {
  const auto bytes = static_cast<std::size_t>(state.range(0));
  setup s(bytes, 1u << 20);
  s.run(kvx::transfer::batch{}.read(std::span(s.mine).first(1), "bench-remote", 0));
  for (auto _ : state) {
    if (!s.run(kvx::transfer::batch{}.read(std::span(s.mine), "bench-remote", 0))) state.SkipWithError("transfer failed");
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * bytes));
}
BENCHMARK(BM_engine_read)->RangeMultiplier(4)->Range(1 << 20, 64 << 20)->UseRealTime();

void BM_memcpy(benchmark::State& state) {
  const auto bytes = static_cast<std::size_t>(state.range(0));
  std::vector<std::byte> a(bytes, std::byte{1}), b(bytes, std::byte{2});
  for (auto _ : state) {
    std::memcpy(b.data(), a.data(), bytes);
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * bytes));
}
BENCHMARK(BM_memcpy)->RangeMultiplier(4)->Range(1 << 20, 64 << 20)->UseRealTime();

}  // namespace
