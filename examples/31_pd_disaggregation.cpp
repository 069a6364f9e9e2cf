// Prefill/decode disaggregation with the engine connector: a prefill instance
// computes a prompt and streams its KV layer by layer straight into the blocks
// a decode instance pre-allocated (push mode); the decode instance waits per
// layer, computes the last prompt token and decodes, token-identically to a
// colocated run.
#include <kvx/disagg/connector.hpp>
#include <kvx/disagg/layouts/layer_first.hpp>
#include <kvx/disagg/layouts/page_first.hpp>
#include <kvx/transfer/embedded_metadata.hpp>
#include <kvx/transfer/transfer_engine.hpp>
#include <kvx/transport/local.hpp>

#include <tiny/worker.hpp>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>

#include <chrono>
#include <cstdio>
#include <thread>
#include <vector>

namespace asio = boost::asio;
namespace kd = kvx::disagg;
using engine_t = kvx::transfer::transfer_engine<kvx::transfer::embedded_metadata, kvx::transport::local>;

int main() {
  // The transfer engines' executor runs on its own thread; the workers block on theirs.
  asio::io_context io;
  auto work = asio::make_work_guard(io);
  std::thread runner([&] { io.run(); });
  kvx::transfer::embedded_metadata meta(io.get_executor());
  kvx::transport::local net_p(io.get_executor()), net_d(io.get_executor());
  engine_t eng_p(meta, {.node = "prefill-0"}, net_p), eng_d(meta, {.node = "decode-0"}, net_d);
  auto link = std::make_shared<kd::push_link>();  // where decode publishes its blocks for prefill
  // Every return, early ones included, stops and joins the runner (a joinable
  // std::thread destroyed would abort the program and lose the message); the
  // workers declared below are gone by then, the engines and metadata are not.
  struct stop_runner {
    decltype(work)& w;
    std::thread& t;
    ~stop_runner() {
      w.reset();
      if (t.joinable()) t.join();
    }
  } stop{work, runner};

  const tiny::model_config model{.layers = 4, .kv_heads = 4, .q_per_kv = 2, .head_dim = 32, .block_tokens = 16};
  using prefill_t = tiny::worker<kd::layouts::layer_first, engine_t, kd::transfer_mode::push, kd::load::wait_until>;
  using decode_t = tiny::worker<kd::layouts::page_first, engine_t, kd::transfer_mode::push, kd::load::wait_until>;
  const kd::load::wait_until deadline{std::chrono::seconds(30)};  // generous: sanitizer builds on a busy machine
  auto prefill = prefill_t::make(eng_p, {.name = "prefill-0", .role = kd::connector_role::producer, .model = model, .num_blocks = 64},
                                 {link}, deadline);
  auto decode = decode_t::make(eng_d, {.name = "decode-0", .role = kd::connector_role::consumer, .model = model, .num_blocks = 64},
                               {link}, deadline);
  if (!prefill || !decode) {
    std::printf("set-up failed: %s\n", (!prefill ? prefill.error() : decode.error()).message().c_str());
    return 1;
  }

  std::vector<std::uint32_t> prompt(200);
  for (std::size_t i = 0; i < prompt.size(); ++i) prompt[i] = static_cast<std::uint32_t>(i * 37 % model.vocab);
  const kd::kv_request req{1, prompt};

  // The router picked the pair; decode allocates first and publishes its blocks.
  auto ticket = (*decode)->admit(req, 8);
  if (!ticket) return std::printf("admit: %s\n", ticket.error().message().c_str()), 1;
  // Decode waits for each layer while prefill computes and pushes them.
  std::thread decode_thread;
  kvx::result<tiny::decode_outcome> out = kvx::error{kvx::errc::internal};
  decode_thread = std::thread([&] { out = (*decode)->run_decode(req, *ticket, 8); });
  auto pre = (*prefill)->run_prefill(req);
  decode_thread.join();
  if (!pre || !out) {
    std::printf("failed: %s\n", (!pre ? pre.error() : out.error()).message().c_str());
    return 1;
  }
  std::printf("prefill pushed %llu bytes in %u layers; %.0f%% of the transfer time overlapped compute\n",
              static_cast<unsigned long long>(pre->saved.bytes), pre->saved.layers,
              pre->saved.busy_s > 0 ? 100.0 * std::max(0.0, 1.0 - pre->save_tail_s / pre->saved.busy_s) : 0.0);

  // The colocated reference: one instance does everything.
  auto l = kd::layouts::layer_first::make(model.shard_shape(), 16).value();
  std::vector<std::byte> mem(l.bytes_required());
  auto colocated = tiny::engine<kd::layouts::layer_first>::make(model, l, mem).value();
  std::vector<std::uint32_t> table{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13};
  const auto want = colocated.generate(prompt, 8, {table}).value();

  std::printf("disaggregated:");
  for (auto t : out->tokens) std::printf(" %u", t);
  std::printf("\ncolocated:    ");
  for (auto t : want) std::printf(" %u", t);
  const bool same = out->tokens == want;
  std::printf("\n%s\n", same ? "identical" : "DIFFERENT");

  prefill->reset();
  decode->reset();
  return same ? 0 : 1;
}
