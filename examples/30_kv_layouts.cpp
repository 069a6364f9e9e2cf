// KV layouts: a prefill instance running tensor-parallel 2 in vLLM's
// layer-first layout hands a request's KV to a decode instance running TP=1
// in page-first with another block size; decode continues token-identically.
#include <kvx/disagg/layout_convert.hpp>
#include <kvx/disagg/layouts/layer_first.hpp>
#include <kvx/disagg/layouts/page_first.hpp>
#include <tiny/engine.hpp>

#include <cstddef>
#include <cstdio>
#include <vector>

namespace kd = kvx::disagg;

int main() {
  tiny::model_config cfg{.layers = 4, .kv_heads = 4, .head_dim = 32, .block_tokens = 16, .dtype = tiny::kv_dtype::bf16};
  std::vector<std::uint32_t> prompt(100);
  for (std::size_t i = 0; i < prompt.size(); ++i) prompt[i] = static_cast<std::uint32_t>(i * 37 % cfg.vocab);

  // Prefill: TP=2, layer-first, 16-token blocks; each rank holds 2 of the 4 KV heads.
  auto pcfg = cfg;
  pcfg.tp = 2;
  auto pl = kd::layouts::layer_first::make(pcfg.shard_shape(), 16).value();
  std::vector<std::byte> rank0(pl.bytes_required()), rank1(pl.bytes_required());
  auto prefill = tiny::engine<kd::layouts::layer_first>::make(pcfg, {{pl, rank0}, {pl, rank1}}).value();
  std::vector<std::uint32_t> ptable{9, 3, 12, 0, 5, 7, 1};
  const std::uint32_t first = prefill.prefill(prompt, {ptable}).value();

  // One block's bytes, as the transfer engine will be asked to move them.
  for (const auto& r : pl.block_ranges(ptable[0]))
    std::printf("layer_first block %u: offset %llu, %llu chunks of %llu bytes, stride %llu\n", ptable[0],
                static_cast<unsigned long long>(r.offset), static_cast<unsigned long long>(r.count),
                static_cast<unsigned long long>(r.length), static_cast<unsigned long long>(r.stride));

  // Decode: TP=1, page-first, 32-token blocks.
  auto dcfg = cfg;
  dcfg.block_tokens = 32;
  auto dl = kd::layouts::page_first::make(dcfg.shard_shape(), 8).value();
  std::vector<std::byte> pool(dl.bytes_required());
  auto decode = tiny::engine<kd::layouts::page_first>::make(dcfg, dl, pool).value();
  std::vector<std::uint32_t> dtable{6, 2, 4, 1};
  for (const auto& r : dl.block_ranges(dtable[0]))
    std::printf("page_first block %u: offset %llu, %llu bytes contiguous\n", dtable[0],
                static_cast<unsigned long long>(r.offset), static_cast<unsigned long long>(r.bytes()));

  // Merge the two prefill shards into the decode pool: heads 0-1 and 2-3.
  const kd::kv_source<kd::layouts::layer_first> src[] = {{&pl, rank0, ptable, 0}, {&pl, rank1, ptable, 2}};
  const kd::kv_target<kd::layouts::page_first> dst[] = {{&dl, pool, dtable, 0}};
  auto moved = kd::convert<kd::layouts::layer_first, kd::layouts::page_first>(src, dst, {0, 100});
  if (!moved) {
    std::printf("convert failed: %s\n", moved.error().message().c_str());
    return 1;
  }
  std::printf("converted %llu bytes in %llu copies\n", static_cast<unsigned long long>(moved->bytes),
              static_cast<unsigned long long>(moved->copies));

  std::vector<std::uint32_t> disagg{first};
  for (std::uint32_t i = 1; i < 8; ++i) disagg.push_back(decode.decode(disagg.back(), 99 + i, {dtable}).value());

  // The colocated reference: one TP=1 instance does everything.
  auto cl = kd::layouts::layer_first::make(cfg.shard_shape(), 8).value();
  std::vector<std::byte> cpool(cl.bytes_required());
  auto colocated = tiny::engine<kd::layouts::layer_first>::make(cfg, cl, cpool).value();
  std::vector<std::uint32_t> ctable{0, 1, 2, 3, 4, 5, 6};
  const auto want = colocated.generate(prompt, 8, {ctable}).value();

  std::printf("disaggregated:");
  for (auto t : disagg) std::printf(" %u", t);
  std::printf("\ncolocated:    ");
  for (auto t : want) std::printf(" %u", t);
  const bool same = disagg == want;
  std::printf("\n%s\n", same ? "identical" : "DIFFERENT");
  return same ? 0 : 1;
}
