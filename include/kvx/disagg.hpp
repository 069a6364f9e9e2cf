#pragma once
//! \file
//! The disagg layer: KV layouts and conversion, the cache-aware router, and
//! the engine connector (push / pull modes, load policies, layer-wise
//! streaming) with the types an engine hands it (engine_hooks.hpp).
//! docs/disagg-layouts.md and docs/disagg-guide.md describe them; the tiny
//! engine and its prefill/decode workers (examples/tiny_engine) are the
//! worked example of an engine using them.

#include <kvx/disagg/connector.hpp>
#include <kvx/disagg/engine_hooks.hpp>
#include <kvx/disagg/kv_layout.hpp>
#include <kvx/disagg/kv_transfer_mode.hpp>
#include <kvx/disagg/layout_convert.hpp>
#include <kvx/disagg/layouts/layer_first.hpp>
#include <kvx/disagg/layouts/layer_first_kv_split.hpp>
#include <kvx/disagg/layouts/page_first.hpp>
#include <kvx/disagg/load_policy.hpp>
#include <kvx/disagg/router.hpp>
#include <kvx/disagg/router_policy.hpp>
