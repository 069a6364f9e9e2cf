#pragma once
//! \file
//! `tiny::engine<Layout>`: a small, deterministic, transformer-shaped
//! inference engine on the CPU, for tests, the P/D demo and the planner's
//! speed figures. It lives under examples/ and includes kvx the way a user's
//! engine does: its KV memory is described by a kvx layout, and the kvx
//! connector joins its forward pass through `kvx::disagg::layer_hooks`
//! (kvx/disagg/engine_hooks.hpp). Nothing in kvx's headers includes it.
//! Loading real weights is a file format away: `make` takes the config; the
//! weights are drawn from `model_config::seed` in one place (the constructor).
//!
//! It is honest compute over paged KV memory: fixed-seed weights, RMSNorm,
//! RoPE, grouped-query causal attention and a SiLU MLP per attention layer, a
//! gated linear recurrence (a fixed-size per-request state, Mamba-style) per
//! recurrent layer, tied-embedding logits and greedy decoding. Prefill writes
//! every layer's K and V for every new token into the request's blocks in the
//! caller's `Layout`, layer by layer (layer l+1's K/V depend on layer l's
//! attention over the prefix, so layer-wise streaming is meaningful), and
//! reads back from that memory whatever it attends to: a prefix that another
//! instance computed and shipped is used, not recomputed. Tensor parallelism
//! is modelled by placement: with `tp = N` the engine writes head `h` into
//! shard `h / (kv_heads / N)`'s memory, so a TP=2 prefill produces exactly the
//! two shard pools a real TP=2 engine would.
//!
//! With `mix_kv_digest` (the default) the next token is the argmax shifted by
//! an XXH3 digest of every K/V byte (and recurrent state) the last position
//! read, so any changed or missing byte changes the token (with probability
//! 1 - 1/vocab): token-identical outputs then prove byte-identical KV. Turn it
//! off for a plain transformer whose argmax absorbs small perturbations.
//!
//! Thread safety: the engine is immutable after `make()`; calls for requests
//! with disjoint blocks and state slots may run concurrently. Nothing blocks
//! except the caller's hooks. `prefill` and `decode` allocate scratch vectors.
//!
//! \code
//! tiny::model_config cfg{.layers = 4, .kv_heads = 4, .head_dim = 32};
//! auto layout = kvx::disagg::layouts::layer_first::make(cfg.shard_shape(), 64).value();
//! std::vector<std::byte> pool(layout.bytes_required());
//! auto eng = tiny::engine<kvx::disagg::layouts::layer_first>::make(cfg, layout, pool).value();
//! std::vector<std::uint32_t> blocks{3, 9}, prompt{1, 2, 3, 4, 5};
//! std::uint32_t next = eng.prefill(prompt, {blocks}).value();
//! next = eng.decode(next, 5, {blocks}).value();  // token at position 5
//! \endcode

#include <algorithm>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <ctime>
#include <functional>
#include <span>
#include <string>
#include <system_error>
#include <vector>

#ifndef XXH_INLINE_ALL
#define XXH_INLINE_ALL
#endif
#include <xxhash.h>

#include <kvx/core/result.hpp>
#include <kvx/disagg/kv_layout.hpp>
#include <kvx/disagg/engine_hooks.hpp>
#include <kvx/disagg/layout_convert.hpp>

//! The tiny engine is a user of kvx, not part of it: its own namespace, kvx's
//! names brought in the way an engine's code would.
namespace tiny {

using kvx::errc;
using kvx::error;
using kvx::result;
using namespace kvx::disagg;  // kv_shape, kv_layout, layouts, kv_shard, kv_sequence, layer_hooks

//! Element type of the K/V the engine stores (computation is always fp32).
enum class kv_dtype : std::uint8_t { f32, bf16 };

//! The model. `shard_shape()` is the `kv_shape` each shard's layout must have.
struct model_config {
  std::uint32_t layers = 4;
  std::uint32_t kv_heads = 4;        //!< KV heads of the whole model (all shards)
  std::uint32_t q_per_kv = 1;        //!< query heads per KV head (grouped-query attention)
  std::uint32_t head_dim = 32;       //!< even (RoPE rotates pairs)
  std::uint32_t block_tokens = 16;
  std::uint32_t vocab = 512;
  kv_dtype dtype = kv_dtype::f32;
  std::vector<layer_kind> kinds{};   //!< empty: all attention
  std::uint32_t state_dim = 0;       //!< fp32 state elements per recurrent layer (whole model); a multiple of kv_heads
  std::uint32_t tp = 1;              //!< tensor-parallel shards the KV heads are split over
  std::uint64_t seed = 42;           //!< weights are a function of the seed alone
  bool mix_kv_digest = true;         //!< see the file comment

  [[nodiscard]] std::uint32_t model_dim() const noexcept { return kv_heads * q_per_kv * head_dim; }
  [[nodiscard]] std::uint32_t dtype_bytes() const noexcept { return dtype == kv_dtype::f32 ? 4U : 2U; }
  //! The shape of one shard's KV.
  [[nodiscard]] kv_shape shard_shape() const {
    kv_shape s{.layers = layers,
               .block_tokens = block_tokens,
               .kv_heads = tp ? kv_heads / tp : 0,
               .head_dim = head_dim,
               .dtype_bytes = dtype_bytes(),
               .state_bytes = 0,
               .kinds = kinds};
    if (s.recurrent_layers() > 0 && tp) s.state_bytes = std::uint64_t{state_dim} / tp * 4;
    return s;
  }
  [[nodiscard]] result<void> validate() const {
    auto bad = [](std::string w) { return error{errc::invalid_argument, "tiny::model_config: " + std::move(w)}; };
    if (layers == 0 || kv_heads == 0 || q_per_kv == 0 || head_dim == 0 || vocab == 0 || block_tokens == 0)
      return bad("layers, kv_heads, q_per_kv, head_dim, vocab and block_tokens must be positive");
    if (head_dim % 2 != 0) return bad("head_dim must be even (RoPE)");
    if (tp == 0 || kv_heads % tp != 0)
      return bad("kv_heads = " + std::to_string(kv_heads) + " does not split over tp = " + std::to_string(tp));
    if (!kinds.empty() && kinds.size() != layers) return bad("kinds needs one entry per layer");
    const auto shape = shard_shape();
    if (shape.recurrent_layers() > 0 && (state_dim == 0 || state_dim % kv_heads != 0))
      return bad("recurrent layers need state_dim > 0, a multiple of kv_heads");
    return shape.validate();
  }
};

//! Measured speed of one configuration (see `measure_engine`).
struct engine_speed {
  double prefill_tokens_per_s = 0;
  double decode_step_s = 0;           //!< one decode step at `context_tokens` of context
  std::uint32_t context_tokens = 0;
};

namespace detail {
inline std::uint64_t splitmix64(std::uint64_t& x) noexcept {
  std::uint64_t z = (x += 0x9E3779B97F4A7C15ULL);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}
inline std::uint16_t to_bf16(float f) noexcept {
  std::uint32_t u = std::bit_cast<std::uint32_t>(f);
  u += 0x7FFFU + ((u >> 16) & 1U);  // round to nearest even
  return static_cast<std::uint16_t>(u >> 16);
}
inline float from_bf16(std::uint16_t h) noexcept { return std::bit_cast<float>(std::uint32_t{h} << 16); }
}  // namespace detail

template <kv_layout Layout>
class engine {
 public:
  //! An engine over one shard per TP rank (`shards.size() == cfg.tp`), each
  //! of `cfg.shard_shape()`. `errc::invalid_argument` on a bad config or shape,
  //! `errc::out_of_range` on short memory.
  static result<engine> make(model_config cfg, std::vector<kv_shard<Layout>> shards) {
    KVX_TRY(cfg.validate());
    if (shards.size() != cfg.tp)
      return error{errc::invalid_argument, "tiny::engine: " + std::to_string(shards.size()) + " shards for tp = " +
                                               std::to_string(cfg.tp)};
    const kv_shape want = cfg.shard_shape();
    for (std::size_t i = 0; i < shards.size(); ++i) {
      if (!(shards[i].layout.shape() == want))
        return error{errc::invalid_argument,
                     "tiny::engine: shard " + std::to_string(i) + " layout shape differs from model_config::shard_shape()"};
      if (shards[i].memory.size() < shards[i].layout.bytes_required())
        return error{errc::out_of_range, "tiny::engine: shard " + std::to_string(i) + " memory holds " +
                                             std::to_string(shards[i].memory.size()) + " bytes, its layout needs " +
                                             std::to_string(shards[i].layout.bytes_required())};
    }
    return engine(std::move(cfg), std::move(shards));
  }
  //! TP = 1: one layout, one memory region.
  static result<engine> make(model_config cfg, Layout layout, std::span<std::byte> memory) {
    std::vector<kv_shard<Layout>> s;
    s.push_back({std::move(layout), memory});
    return make(std::move(cfg), std::move(s));
  }

  [[nodiscard]] const model_config& config() const noexcept { return cfg_; }
  [[nodiscard]] const std::vector<kv_shard<Layout>>& shards() const noexcept { return shards_; }

  //! Computes K/V (and state) for `tokens[cached_tokens..)` given that the
  //! request's memory already holds them for `[0, cached_tokens)` (a prefix
  //! hit, or a transfer), and returns the token after the prompt.
  //! `errc::invalid_argument` for an empty range or a token outside the vocab,
  //! `errc::out_of_range` for a short block table, bad block id or state slot.
  result<std::uint32_t> prefill(std::span<const std::uint32_t> tokens, const kv_sequence& seq,
                                std::uint32_t cached_tokens = 0, const layer_hooks& hooks = {}) const {
    if (cached_tokens >= tokens.size())
      return error{errc::invalid_argument, "tiny::engine::prefill: " + std::to_string(cached_tokens) +
                                               " cached tokens leave nothing to compute in a prompt of " +
                                               std::to_string(tokens.size())};
    return forward(tokens.subspan(cached_tokens), cached_tokens, seq, hooks);
  }

  //! One decode step: `token` sits at `position`, the request's memory holds
  //! K/V (and state) for `[0, position)`; writes its K/V and returns the next token.
  result<std::uint32_t> decode(std::uint32_t token, std::uint32_t position, const kv_sequence& seq,
                               const layer_hooks& hooks = {}) const {
    const std::uint32_t one[1] = {token};
    return forward(std::span<const std::uint32_t>(one, 1), position, seq, hooks);
  }

  //! Prefill then `n` - 1 decode steps: the `n` tokens generated after
  //! `prompt` (the colocated reference run). The block table must cover
  //! `prompt.size() + n - 1` tokens.
  result<std::vector<std::uint32_t>> generate(std::span<const std::uint32_t> prompt, std::uint32_t n,
                                              const kv_sequence& seq) const {
    std::vector<std::uint32_t> out;
    if (n == 0) return out;
    auto first = prefill(prompt, seq);
    if (!first) return first.error();
    out.push_back(*first);
    for (std::uint32_t i = 1; i < n; ++i) {
      auto next = decode(out.back(), static_cast<std::uint32_t>(prompt.size() + i - 1), seq);
      if (!next) return next.error();
      out.push_back(*next);
    }
    return out;
  }

 private:
  struct attn_weights {
    std::vector<float> wq, wk, wv, wo, w1, w2;
  };
  struct rec_weights {
    std::vector<float> win, decay, wout, w1, w2;
  };

  engine(model_config cfg, std::vector<kv_shard<Layout>> shards) : cfg_(std::move(cfg)), shards_(std::move(shards)) {
    const std::uint32_t d = cfg_.model_dim(), kvd = cfg_.kv_heads * cfg_.head_dim;
    std::uint64_t rng = cfg_.seed;
    auto fill = [&](std::size_t n, float scale) {
      std::vector<float> w(n);
      for (auto& x : w) x = scale * (static_cast<float>(detail::splitmix64(rng) >> 40) / 8388608.0F - 1.0F);
      return w;
    };
    const float sd = 1.0F / std::sqrt(static_cast<float>(d));
    embed_ = fill(std::size_t{cfg_.vocab} * d, 1.0F);
    const kv_shape shape = cfg_.shard_shape();
    for (std::uint32_t l = 0; l < cfg_.layers; ++l) {
      if (shape.is_attention(l)) {
        attn_.push_back({fill(std::size_t{d} * d, sd), fill(std::size_t{kvd} * d, sd), fill(std::size_t{kvd} * d, sd),
                         fill(std::size_t{d} * d, sd), fill(std::size_t{d} * d, sd), fill(std::size_t{d} * d, sd)});
        rec_.emplace_back();
      } else {
        const std::uint32_t sdim = cfg_.state_dim;
        rec_weights r{fill(std::size_t{sdim} * d, sd), fill(sdim, 0.2F), fill(std::size_t{d} * sdim,
                      1.0F / std::sqrt(static_cast<float>(sdim))), fill(std::size_t{d} * d, sd), fill(std::size_t{d} * d, sd)};
        for (auto& x : r.decay) x += 0.75F;  // in [0.55, 0.95]: a stable, forgetting recurrence
        rec_.push_back(std::move(r));
        attn_.emplace_back();
      }
    }
  }

  result<void> check(std::span<const std::uint32_t> tokens, std::uint32_t end, const kv_sequence& seq) const {
    for (auto t : tokens)
      if (t >= cfg_.vocab)
        return error{errc::invalid_argument,
                     "tiny::engine: token " + std::to_string(t) + " is outside the vocabulary of " + std::to_string(cfg_.vocab)};
    const kv_shape shape = cfg_.shard_shape();
    if (shape.attention_layers() > 0) {
      const std::uint64_t need = (std::uint64_t{end} + cfg_.block_tokens - 1) / cfg_.block_tokens;
      if (seq.block_table.size() < need)
        return error{errc::out_of_range, "tiny::engine: block table covers " +
                                             std::to_string(seq.block_table.size() * cfg_.block_tokens) +
                                             " tokens, the step needs " + std::to_string(end)};
      for (std::uint64_t i = 0; i < need; ++i)
        if (seq.block_table[i] >= shards_[0].layout.num_blocks())
          return error{errc::out_of_range, "tiny::engine: block table entry " + std::to_string(i) + " names block " +
                                               std::to_string(seq.block_table[i]) + " of " +
                                               std::to_string(shards_[0].layout.num_blocks())};
    }
    if (shape.recurrent_layers() > 0 && seq.state_slot >= shards_[0].layout.state_slots())
      return error{errc::out_of_range, "tiny::engine: the model has recurrent layers and the request's state slot " +
                                           (seq.state_slot == no_state_slot ? std::string("is not set")
                                                                            : std::to_string(seq.state_slot) + " is out of range")};
    if (shape.recurrent_layers() > 0 && seq.snapshot_slot != no_state_slot) {
      if (seq.snapshot_slot >= shards_[0].layout.state_slots() || seq.snapshot_slot == seq.state_slot)
        return error{errc::out_of_range, "tiny::engine: snapshot slot " + std::to_string(seq.snapshot_slot) +
                                             " is out of range or the request's own state slot"};
      const std::uint32_t begin = end - static_cast<std::uint32_t>(tokens.size());
      if (seq.snapshot_at < begin || seq.snapshot_at > end)
        return error{errc::invalid_argument, "tiny::engine: a state snapshot at position " + std::to_string(seq.snapshot_at) +
                                                 " lies outside the step's positions [" + std::to_string(begin) + ", " +
                                                 std::to_string(end) + "]"};
    }
    return {};
  }

  // The address of one head vector of K (kv = 0) or V (kv = 1).
  std::byte* head_ptr(std::uint32_t layer, std::uint32_t kv, std::uint32_t pos, std::uint32_t head,
                      const kv_sequence& seq) const {
    const std::uint32_t per = cfg_.kv_heads / cfg_.tp;
    const auto& sh = shards_[head / per];
    const kv_coord c{layer, kv, seq.block_table[pos / cfg_.block_tokens], pos % cfg_.block_tokens, head % per, 0};
    return sh.memory.data() + sh.layout.offset(c);
  }
  void store(std::byte* p, const float* x) const {
    if (cfg_.dtype == kv_dtype::f32) {
      std::memcpy(p, x, std::size_t{cfg_.head_dim} * 4);
    } else {
      for (std::uint32_t i = 0; i < cfg_.head_dim; ++i) {
        const std::uint16_t h = detail::to_bf16(x[i]);
        std::memcpy(p + 2 * i, &h, 2);
      }
    }
  }
  void load(const std::byte* p, float* x) const {
    if (cfg_.dtype == kv_dtype::f32) {
      std::memcpy(x, p, std::size_t{cfg_.head_dim} * 4);
    } else {
      for (std::uint32_t i = 0; i < cfg_.head_dim; ++i) {
        std::uint16_t h;
        std::memcpy(&h, p + 2 * i, 2);
        x[i] = detail::from_bf16(h);
      }
    }
  }
  // State of recurrent layer `layer`: shard s holds elements [s * sdim / tp, (s + 1) * sdim / tp).
  void state_io(std::uint32_t layer, std::uint32_t slot, float* s, bool write) const {
    const std::uint32_t per = cfg_.state_dim / cfg_.tp;
    for (std::uint32_t i = 0; i < cfg_.tp; ++i) {
      std::byte* p = shards_[i].memory.data() + shards_[i].layout.state_offset(slot, layer);
      if (write)
        std::memcpy(p, s + std::size_t{i} * per, std::size_t{per} * 4);
      else
        std::memcpy(s + std::size_t{i} * per, p, std::size_t{per} * 4);
    }
  }

  // Eight partial sums in a fixed order: vectorizable without -ffast-math,
  // and still bit-for-bit deterministic.
  static float dot(const float* a, const float* b, std::uint32_t n) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::uint32_t i = 0;
    for (; i + 8 <= n; i += 8)
      for (std::uint32_t j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
    float tail = 0;
    for (; i < n; ++i) tail += a[i] * b[i];
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
  }
  static void matvec(const std::vector<float>& w, const float* x, float* y, std::uint32_t rows, std::uint32_t cols) {
    for (std::uint32_t r = 0; r < rows; ++r) y[r] = dot(w.data() + std::size_t{r} * cols, x, cols);
  }
  static void rmsnorm(const float* x, float* y, std::uint32_t n) {
    float ss = 0;
    for (std::uint32_t i = 0; i < n; ++i) ss += x[i] * x[i];
    const float inv = 1.0F / std::sqrt(ss / static_cast<float>(n) + 1e-6F);
    for (std::uint32_t i = 0; i < n; ++i) y[i] = x[i] * inv;
  }
  void rope(float* v, std::uint32_t heads, std::uint32_t pos) const {
    const std::uint32_t half = cfg_.head_dim / 2;
    for (std::uint32_t i = 0; i < half; ++i) {
      const double theta = static_cast<double>(pos) * std::pow(10000.0, -2.0 * i / cfg_.head_dim);
      const auto c = static_cast<float>(std::cos(theta)), s = static_cast<float>(std::sin(theta));
      for (std::uint32_t h = 0; h < heads; ++h) {
        float* p = v + std::size_t{h} * cfg_.head_dim;
        const float a = p[i], b = p[i + half];
        p[i] = a * c - b * s;
        p[i + half] = a * s + b * c;
      }
    }
  }
  void mlp(const std::vector<float>& w1, const std::vector<float>& w2, float* h, std::vector<float>& t1,
           std::vector<float>& t2) const {
    const std::uint32_t d = cfg_.model_dim();
    rmsnorm(h, t1.data(), d);
    matvec(w1, t1.data(), t2.data(), d, d);
    for (std::uint32_t i = 0; i < d; ++i) t2[i] = t2[i] / (1.0F + std::exp(-t2[i]));
    matvec(w2, t2.data(), t1.data(), d, d);
    for (std::uint32_t i = 0; i < d; ++i) h[i] += t1[i];
  }

  // The new `tokens` sit at positions [begin, begin + tokens.size()).
  result<std::uint32_t> forward(std::span<const std::uint32_t> tokens, std::uint32_t begin, const kv_sequence& seq,
                                const layer_hooks& hooks) const {
    const auto n = static_cast<std::uint32_t>(tokens.size());
    const std::uint32_t end = begin + n;
    KVX_TRY(check(tokens, end, seq));
    const std::uint32_t d = cfg_.model_dim(), hd = cfg_.head_dim, kvh = cfg_.kv_heads, qh = kvh * cfg_.q_per_kv;
    const kv_shape shape = cfg_.shard_shape();
    std::vector<float> h(std::size_t{n} * d), t1(d), t2(d), q(std::size_t{n} * d), k(std::size_t{kvh} * hd),
        v(std::size_t{kvh} * hd), kx(hd), vx(hd), att(d), scores(end);
    for (std::uint32_t i = 0; i < n; ++i)
      std::copy_n(embed_.data() + std::size_t{tokens[i]} * d, d, h.data() + std::size_t{i} * d);
    XXH3_state_t digest;
    XXH3_64bits_reset(&digest);
    const float scale = 1.0F / std::sqrt(static_cast<float>(hd));

    for (std::uint32_t layer = 0; layer < cfg_.layers; ++layer) {
      if (hooks.before_layer)
        if (std::error_code ec = hooks.before_layer(layer))
          return error{ec, "tiny::engine: loading layer " + std::to_string(layer)};
      if (shape.is_attention(layer)) {
        const auto& w = attn_[layer];
        // Phase 1: K and V of every new token go to memory first, so that
        // attention below reads every position (new or cached) from memory.
        for (std::uint32_t i = 0; i < n; ++i) {
          float* hi = h.data() + std::size_t{i} * d;
          rmsnorm(hi, t1.data(), d);
          matvec(w.wq, t1.data(), q.data() + std::size_t{i} * d, d, d);
          matvec(w.wk, t1.data(), k.data(), kvh * hd, d);
          matvec(w.wv, t1.data(), v.data(), kvh * hd, d);
          rope(q.data() + std::size_t{i} * d, qh, begin + i);
          rope(k.data(), kvh, begin + i);
          for (std::uint32_t g = 0; g < kvh; ++g) {
            store(head_ptr(layer, 0, begin + i, g, seq), k.data() + std::size_t{g} * hd);
            store(head_ptr(layer, 1, begin + i, g, seq), v.data() + std::size_t{g} * hd);
          }
        }
        // Phase 2: causal attention over positions [0, pos].
        for (std::uint32_t i = 0; i < n; ++i) {
          const std::uint32_t pos = begin + i;
          std::fill(att.begin(), att.end(), 0.0F);
          for (std::uint32_t j = 0; j < qh; ++j) {
            const std::uint32_t g = j / cfg_.q_per_kv;
            const float* qj = q.data() + std::size_t{i} * d + std::size_t{j} * hd;
            float mx = -INFINITY;
            for (std::uint32_t p = 0; p <= pos; ++p) {
              load(head_ptr(layer, 0, p, g, seq), kx.data());
              scores[p] = dot(qj, kx.data(), hd) * scale;
              mx = std::max(mx, scores[p]);
            }
            float sum = 0;
            for (std::uint32_t p = 0; p <= pos; ++p) sum += (scores[p] = std::exp(scores[p] - mx));
            float* out = att.data() + std::size_t{j} * hd;
            for (std::uint32_t p = 0; p <= pos; ++p) {
              load(head_ptr(layer, 1, p, g, seq), vx.data());
              const float a = scores[p] / sum;
              for (std::uint32_t e = 0; e < hd; ++e) out[e] += a * vx[e];
            }
          }
          float* hi = h.data() + std::size_t{i} * d;
          matvec(w.wo, att.data(), t1.data(), d, d);
          for (std::uint32_t e = 0; e < d; ++e) hi[e] += t1[e];
          mlp(w.w1, w.w2, hi, t1, t2);
        }
        if (cfg_.mix_kv_digest) {
          const std::size_t hb = std::size_t{hd} * cfg_.dtype_bytes();
          for (std::uint32_t g = 0; g < kvh; ++g)
            for (std::uint32_t p = 0; p < end; ++p) {
              XXH3_64bits_update(&digest, head_ptr(layer, 0, p, g, seq), hb);
              XXH3_64bits_update(&digest, head_ptr(layer, 1, p, g, seq), hb);
            }
        }
      } else {
        const auto& w = rec_[layer];
        const std::uint32_t sd = cfg_.state_dim;
        std::vector<float> s(sd, 0.0F), u(sd);
        if (begin > 0) state_io(layer, seq.state_slot, s.data(), false);
        const bool snap = seq.snapshot_slot != no_state_slot;
        if (snap && seq.snapshot_at == begin) state_io(layer, seq.snapshot_slot, s.data(), true);
        for (std::uint32_t i = 0; i < n; ++i) {
          // The last position's digest covers the state it starts from, which
          // is the same bytes whether it was read from memory or just computed.
          if (cfg_.mix_kv_digest && i + 1 == n) XXH3_64bits_update(&digest, s.data(), std::size_t{sd} * 4);
          float* hi = h.data() + std::size_t{i} * d;
          rmsnorm(hi, t1.data(), d);
          matvec(w.win, t1.data(), u.data(), sd, d);
          for (std::uint32_t e = 0; e < sd; ++e) s[e] = w.decay[e] * s[e] + (1.0F - w.decay[e]) * std::tanh(u[e]);
          if (snap && seq.snapshot_at == begin + i + 1) state_io(layer, seq.snapshot_slot, s.data(), true);
          matvec(w.wout, s.data(), t1.data(), d, sd);
          for (std::uint32_t e = 0; e < d; ++e) hi[e] += t1[e];
          mlp(w.w1, w.w2, hi, t1, t2);
        }
        state_io(layer, seq.state_slot, s.data(), true);
      }
      if (hooks.after_layer) hooks.after_layer(layer);
    }

    const float* last = h.data() + std::size_t{n - 1} * d;
    rmsnorm(last, t1.data(), d);
    std::uint32_t best = 0;
    float best_logit = -INFINITY;
    for (std::uint32_t t = 0; t < cfg_.vocab; ++t) {
      const float logit = dot(embed_.data() + std::size_t{t} * d, t1.data(), d);
      if (logit > best_logit) {
        best_logit = logit;
        best = t;
      }
    }
    if (!cfg_.mix_kv_digest) return best;
    return static_cast<std::uint32_t>((best + XXH3_64bits_digest(&digest) % cfg_.vocab) % cfg_.vocab);
  }

  model_config cfg_;
  std::vector<kv_shard<Layout>> shards_;
  std::vector<float> embed_;
  std::vector<attn_weights> attn_;
  std::vector<rec_weights> rec_;
};

//! Seconds of `std::chrono::steady_clock`: `measure_engine`'s default clock.
struct wall_seconds {
  double operator()() const noexcept {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
  }
};

//! CPU seconds the calling thread has used: compute timed by it leaves out
//! the waits for a core (a tool on a loaded machine, and a worker reporting
//! what its engine took, time with it).
struct thread_cpu_seconds {
  double operator()() const noexcept {
    timespec ts{};
    ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
  }
};

//! Times one prefill of `prompt_tokens` tokens and `decode_steps` decode
//! steps of a fresh engine of `cfg` (weights, layout and memory of its own,
//! pre-faulted before timing): the figures a planner or router needs
//! (prefill speed, decode step time at that context). `seconds_now` is the
//! clock, a callable returning seconds as a double: wall time by default; a
//! tool on a loaded machine passes the thread's CPU time.
template <class Layout, class SecondsNow = wall_seconds>
result<engine_speed> measure_engine(const model_config& cfg, std::uint32_t prompt_tokens,
                                         std::uint32_t decode_steps, SecondsNow seconds_now = {}) {
  KVX_TRY(cfg.validate());
  if (prompt_tokens == 0 || decode_steps == 0)
    return error{errc::invalid_argument, "measure_engine: prompt_tokens and decode_steps must be positive"};
  const std::uint32_t total = prompt_tokens + decode_steps;
  const std::uint32_t blocks = (total + cfg.block_tokens - 1) / cfg.block_tokens;
  std::vector<std::vector<std::byte>> pools;
  pools.reserve(cfg.tp);  // the shards keep spans into these buffers
  std::vector<kv_shard<Layout>> shards;
  for (std::uint32_t i = 0; i < cfg.tp; ++i) {
    auto l = Layout::make(cfg.shard_shape(), blocks, 1);
    if (!l) return l.error();
    pools.emplace_back(l->bytes_required(), std::byte{0});
    shards.push_back({*l, pools.back()});
  }
  auto eng = engine<Layout>::make(cfg, std::move(shards));
  if (!eng) return eng.error();
  std::vector<std::uint32_t> table(blocks), prompt(prompt_tokens);
  for (std::uint32_t i = 0; i < blocks; ++i) table[i] = i;
  for (std::uint32_t i = 0; i < prompt_tokens; ++i) prompt[i] = (i * 7919U + 13U) % cfg.vocab;
  const kv_sequence seq{table, 0};
  const double t0 = seconds_now();
  auto first = eng->prefill(prompt, seq);
  if (!first) return first.error();
  const double t1 = seconds_now();
  std::uint32_t tok = *first;
  for (std::uint32_t i = 0; i < decode_steps; ++i) {
    auto next = eng->decode(tok, prompt_tokens + i, seq);
    if (!next) return next.error();
    tok = *next;
  }
  const double t2 = seconds_now();
  const double pf = std::max(t1 - t0, 1e-9), dc = t2 - t1;
  return engine_speed{static_cast<double>(prompt_tokens) / pf, dc / decode_steps, prompt_tokens + decode_steps / 2};
}

}  // namespace tiny
