#pragma once
//! \file
//! What an inference engine hands kvx so the connector can move its KV: the
//! engine's KV memory per tensor-parallel shard (`kv_shard`), the blocks and
//! state slots of one request (`kv_sequence`), and the two places in the
//! forward pass where a connector joins it (`layer_hooks`). The connector
//! (kvx/disagg/connector.hpp) takes and returns these; an engine fills them
//! from its own scheduler and model runner (examples/tiny_engine shows one).
//!
//! \code
//! kvx::disagg::layer_hooks hooks = connector.hooks(request);  // wait per layer, save per layer
//! engine.prefill(prompt, kvx::disagg::kv_sequence{.block_table = blocks}, cached_tokens, hooks);
//! \endcode

#include <cstdint>
#include <functional>
#include <span>
#include <system_error>

#include <kvx/disagg/kv_layout.hpp>
#include <kvx/disagg/layout_convert.hpp>

namespace kvx::disagg {

//! One tensor-parallel shard's KV pool: a layout and the memory it addresses.
template <kv_layout Layout>
struct kv_shard {
  Layout layout;
  std::span<std::byte> memory;
};

//! The blocks and state slot of one request (shared by all shards, as TP
//! ranks share block ids).
//!
//! Recurrent state cannot be rewound, so a consumer that resumes from a
//! position other than the end of the prompt needs the state *at* that
//! position. `snapshot_slot` / `snapshot_at` ask the engine for it: while a
//! step runs through position `snapshot_at` (tokens processed, in
//! `[begin, end]` of the step), each recurrent layer leaves a copy of its
//! state there in `snapshot_slot`, before `after_layer` runs (a real engine
//! does the same with the intermediate states its chunked scan computes).
struct kv_sequence {
  std::span<const std::uint32_t> block_table{};
  std::uint32_t state_slot = no_state_slot;
  std::uint32_t snapshot_slot = no_state_slot;  //!< where to copy each recurrent layer's state at `snapshot_at` (none: no copy)
  std::uint32_t snapshot_at = 0;                //!< tokens processed when the copy is taken
};

//! Where a connector joins the forward pass (vLLM's `wait_for_layer_load` and
//! `save_kv_layer`). `before_layer(l)` runs before layer l reads any KV or
//! state; an error aborts the step with that error. `after_layer(l)` runs once
//! layer l's new K/V (or state) are in memory.
struct layer_hooks {
  std::function<std::error_code(std::uint32_t)> before_layer{};
  std::function<void(std::uint32_t)> after_layer{};
};

}  // namespace kvx::disagg
