#pragma once
//! \file
//! `kvx::disagg::planner::model_shape`: what the planner needs to know about a
//! model (the KV bytes per token it caches and ships, the weights it reads per
//! decode step, the FLOPs per token it computes), with presets for well-known
//! open models and a JSON reader.
//!
//! Values; thread-safe as any value. Nothing blocks.
//!
//! \code
//! auto m = kvx::disagg::planner::model_preset("llama-3-70b").value();
//! m.kv_bytes_per_token();  // 80 layers * 8 KV heads * 128 dims * 2 (K, V) * 2 bytes = 327,680
//! \endcode

#include <cstdint>
#include <string>
#include <vector>

#include <kvx/core/config.hpp>
#include <kvx/core/result.hpp>

namespace kvx::disagg::planner {

//! A dense decoder-only transformer, as far as serving cost goes.
struct model_shape {
  std::string name;
  std::uint32_t layers = 0;
  std::uint32_t q_heads = 0;       //!< attention (query) heads; sets the attention FLOPs of prefill
  std::uint32_t kv_heads = 0;      //!< KV heads (GQA); sets the KV bytes
  std::uint32_t head_dim = 0;
  std::uint32_t dtype_bytes = 2;   //!< bytes per KV element and per weight (bf16: 2)
  double params = 0;               //!< parameter count

  //! K and V of one token, all layers.
  [[nodiscard]] std::uint64_t kv_bytes_per_token() const noexcept {
    return std::uint64_t{2} * layers * kv_heads * head_dim * dtype_bytes;
  }
  [[nodiscard]] double weight_bytes() const noexcept { return params * dtype_bytes; }
  //! FLOPs of the dense part per token (multiply-add = 2).
  [[nodiscard]] double flops_per_token() const noexcept { return 2.0 * params; }
  //! FLOPs of causal attention per (query token, context token) pair: QK^T and PV.
  [[nodiscard]] double attention_flops_per_pair() const noexcept {
    return 4.0 * layers * q_heads * head_dim;
  }

  [[nodiscard]] result<void> validate() const {
    if (layers == 0 || q_heads == 0 || kv_heads == 0 || head_dim == 0 || dtype_bytes == 0 || !(params > 0))
      return error{errc::invalid_argument, "model '" + name +
                                               "': layers, q_heads, kv_heads, head_dim, dtype and params must be positive"};
    if (q_heads % kv_heads != 0)
      return error{errc::invalid_argument, "model '" + name + "': q_heads = " + std::to_string(q_heads) +
                                               " is not a multiple of kv_heads = " + std::to_string(kv_heads)};
    return {};
  }
};

//! Bytes of one element of a dtype named "bf16", "fp16", "fp8", "int8", "fp32"/"f32".
inline result<std::uint32_t> dtype_bytes(const std::string& dtype) {
  if (dtype == "bf16" || dtype == "fp16" || dtype == "f16") return 2U;
  if (dtype == "fp8" || dtype == "int8") return 1U;
  if (dtype == "fp32" || dtype == "f32") return 4U;
  return error{errc::invalid_argument, "unknown dtype '" + dtype + "' (known: bf16, fp16, fp8, int8, fp32)"};
}

//! Names `model_preset` knows.
inline std::vector<std::string> model_preset_names() {
  return {"llama-3-8b", "llama-3-70b", "llama-3-405b", "qwen2.5-32b", "qwen2.5-72b", "mistral-7b", "tiny"};
}

//! Published shapes (config.json of each model), bf16. "tiny" is the default
//! `tiny_config` of kvx's tiny engine (fp32 KV, 512-token vocabulary).
inline result<model_shape> model_preset(const std::string& name) {
  if (name == "llama-3-8b") return model_shape{name, 32, 32, 8, 128, 2, 8.03e9};
  if (name == "llama-3-70b") return model_shape{name, 80, 64, 8, 128, 2, 70.6e9};
  if (name == "llama-3-405b") return model_shape{name, 126, 128, 8, 128, 2, 405.9e9};
  if (name == "qwen2.5-32b") return model_shape{name, 64, 40, 8, 128, 2, 32.8e9};
  if (name == "qwen2.5-72b") return model_shape{name, 80, 64, 8, 128, 2, 72.7e9};
  if (name == "mistral-7b") return model_shape{name, 32, 32, 8, 128, 2, 7.24e9};
  // d = 4 heads * 32 = 128; embedding 512 * 128, 6 d*d matrices per layer.
  if (name == "tiny") return model_shape{name, 4, 4, 4, 32, 4, 512.0 * 128 + 4 * 6 * 128.0 * 128};
  std::string known;
  for (const auto& n : model_preset_names()) known += (known.empty() ? "" : ", ") + n;
  return error{errc::invalid_argument, "unknown model preset '" + name + "' (known: " + known + ")"};
}

//! Reads `{"preset": NAME}` or `{"name", "layers", "q_heads", "kv_heads",
//! "head_dim", "dtype", "params"}` (a preset's fields may be overridden).
inline result<model_shape> model_from_config(const config::view& cfg) {
  KVX_TRY(cfg.allow_only({"preset", "name", "layers", "q_heads", "kv_heads", "head_dim", "dtype", "params"}));
  model_shape m;
  if (cfg.contains("preset")) {
    auto p = cfg.required<std::string>("preset");
    if (!p) return p.error();
    auto preset = model_preset(*p);
    if (!preset) return preset.error();
    m = *preset;
  }
  auto name = cfg.optional<std::string>("name", m.name.empty() ? std::string("custom") : m.name);
  if (!name) return name.error();
  m.name = *name;
  auto field = [&](const char* key, std::uint32_t& out) -> result<void> {
    auto v = cfg.optional<std::uint32_t>(key, out);
    if (!v) return v.error();
    out = *v;
    return {};
  };
  KVX_TRY(field("layers", m.layers));
  KVX_TRY(field("q_heads", m.q_heads));
  KVX_TRY(field("kv_heads", m.kv_heads));
  KVX_TRY(field("head_dim", m.head_dim));
  if (cfg.contains("dtype")) {
    auto d = cfg.required<std::string>("dtype");
    if (!d) return d.error();
    auto b = dtype_bytes(*d);
    if (!b) return error{errc::invalid_argument, "config field '" + cfg.path_of("dtype") + "': " + b.error().context()};
    m.dtype_bytes = *b;
  }
  auto params = cfg.optional<double>("params", m.params);
  if (!params) return params.error();
  m.params = *params;
  KVX_TRY(m.validate());
  return m;
}

}  // namespace kvx::disagg::planner
