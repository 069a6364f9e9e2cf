#pragma once
//! \file
//! `layouts::any_kv_layout`: a KV layout chosen at run time, from JSON, for
//! deployments that pick the pool's shape by configuration rather than by
//! template argument. It models `kv_layout` by forwarding to one of the
//! built-in layouts (one virtual call per member), so everything that takes a
//! layout (conversion, the connector, `cuda::paged_kv_view_of`) takes it.
//!
//! ```json
//! {"layout": "page_first",            // layer_first | page_first | layer_first_kv_split
//!  "num_blocks": 4096, "state_slots": 0,
//!  "shape": {"layers": 32, "block_tokens": 16, "kv_heads": 8, "head_dim": 128,
//!            "dtype": "bf16",          // bf16 | fp16 | fp32 | fp8, or "dtype_bytes": 2
//!            "state_bytes": 0,         // per recurrent layer per request
//!            "kinds": ["attention", "recurrent", ...]}}   // optional, one per layer
//! ```
//! Errors (`errc::invalid_argument`) name the field: an unknown layout, a
//! missing or mistyped field, an unknown field, an invalid shape.
//!
//! Thread safety: an immutable value; copies share the layout they forward to.
//! It does not promise `heads_contiguous` (no compile-time constant to give),
//! so `convert()` copies one head vector at a time with it: use the concrete
//! type where that copy is on a hot path.
//!
//! \code
//! auto l = kvx::disagg::layouts::any_kv_layout::from_json(R"({"layout": "layer_first", "num_blocks": 1024,
//!     "shape": {"layers": 32, "block_tokens": 16, "kv_heads": 8, "head_dim": 128, "dtype": "bf16"}})");
//! if (!l) die(l.error().message());   // "config field 'kv.shape.dtype': ..."
//! auto ranges = l->block_ranges(7);
//! \endcode

#include <memory>
#include <string>
#include <type_traits>
#include <string_view>
#include <utility>
#include <vector>

#include <kvx/core/config.hpp>
#include <kvx/disagg/kv_layout.hpp>
#include <kvx/disagg/layouts/layer_first.hpp>
#include <kvx/disagg/layouts/layer_first_kv_split.hpp>
#include <kvx/disagg/layouts/page_first.hpp>

namespace kvx::disagg::layouts {

class any_kv_layout {
 public:
  using kv_layout_concept = kv_layout_tag;

  //! Wraps any layout value.
  // Not a candidate for any_kv_layout itself: checking kv_layout<any_kv_layout>
  // while its own copy/move traits are being computed recurses (clang 14).
  template <class L>
    requires(!std::is_same_v<L, any_kv_layout> && kv_layout<L>)
  explicit any_kv_layout(L layout) : impl_(std::make_shared<model<L>>(std::move(layout))) {}

  //! Parses the JSON text above; `path` prefixes field names in errors.
  static result<any_kv_layout> from_json(std::string_view text, std::string path = "kv") {
    auto doc = config::parse(text);
    KVX_TRY(doc);
    return from_config(config::view(*doc, std::move(path)));
  }

  //! From a config node (a field of a larger config).
  static result<any_kv_layout> from_config(const config::view& v) {
    KVX_TRY(v.allow_only({"layout", "num_blocks", "state_slots", "shape"}));
    auto name = v.required<std::string>("layout");
    KVX_TRY(name);
    auto blocks = v.required<std::uint32_t>("num_blocks");
    KVX_TRY(blocks);
    auto slots = v.optional<std::uint32_t>("state_slots", 0);
    KVX_TRY(slots);
    auto sv = v.child("shape");
    KVX_TRY(sv);
    auto shape = shape_from_config(*sv);
    KVX_TRY(shape);
    auto wrap = [&](auto made) -> result<any_kv_layout> {
      if (!made) return kvx::error{made.code(), "config field '" + v.path() + "': " + made.error().message()};
      return any_kv_layout(std::move(*made));
    };
    if (*name == "layer_first") return wrap(layer_first::make(*shape, *blocks, *slots));
    if (*name == "page_first") return wrap(page_first::make(*shape, *blocks, *slots));
    if (*name == "layer_first_kv_split") return wrap(layer_first_kv_split::make(*shape, *blocks, *slots));
    return kvx::error{errc::invalid_argument, "config field '" + v.path_of("layout") + "': \"" + *name +
                                                  "\" is not a layout (layer_first, page_first, layer_first_kv_split)"};
  }

  //! A `kv_shape` from `{"layers", "block_tokens", "kv_heads", "head_dim", "dtype" | "dtype_bytes", "state_bytes", "kinds"}`.
  static result<kv_shape> shape_from_config(const config::view& v) {
    KVX_TRY(v.allow_only({"layers", "block_tokens", "kv_heads", "head_dim", "dtype", "dtype_bytes", "state_bytes", "kinds"}));
    kv_shape s;
    auto layers = v.required<std::uint32_t>("layers");
    KVX_TRY(layers);
    auto tokens = v.required<std::uint32_t>("block_tokens");
    KVX_TRY(tokens);
    auto heads = v.required<std::uint32_t>("kv_heads");
    KVX_TRY(heads);
    auto dim = v.required<std::uint32_t>("head_dim");
    KVX_TRY(dim);
    auto state = v.optional<std::uint64_t>("state_bytes", 0);
    KVX_TRY(state);
    s.layers = *layers;
    s.block_tokens = *tokens;
    s.kv_heads = *heads;
    s.head_dim = *dim;
    s.state_bytes = *state;
    if (v.contains("dtype") == v.contains("dtype_bytes"))
      return kvx::error{errc::invalid_argument, "config field '" + v.path() + "': give exactly one of dtype and dtype_bytes"};
    if (v.contains("dtype")) {
      auto dtype = v.required<std::string>("dtype");
      KVX_TRY(dtype);
      if (*dtype == "bf16" || *dtype == "fp16")
        s.dtype_bytes = 2;
      else if (*dtype == "fp32")
        s.dtype_bytes = 4;
      else if (*dtype == "fp8")
        s.dtype_bytes = 1;
      else
        return kvx::error{errc::invalid_argument,
                          "config field '" + v.path_of("dtype") + "': \"" + *dtype + "\" is not a dtype (bf16, fp16, fp32, fp8)"};
    } else {
      auto bytes = v.required<std::uint32_t>("dtype_bytes");
      KVX_TRY(bytes);
      s.dtype_bytes = *bytes;
    }
    if (v.contains("kinds")) {
      const auto& kinds = v.raw().at("kinds");
      if (!kinds.is_array())
        return kvx::error{errc::invalid_argument, "config field '" + v.path_of("kinds") + "': expected an array"};
      for (std::size_t i = 0; i < kinds.size(); ++i) {
        const auto& k = kinds[i];
        if (k == "attention")
          s.kinds.push_back(layer_kind::attention);
        else if (k == "recurrent")
          s.kinds.push_back(layer_kind::recurrent);
        else
          return kvx::error{errc::invalid_argument, "config field '" + v.path_of("kinds") + "[" + std::to_string(i) +
                                                        "]': expected \"attention\" or \"recurrent\""};
      }
    }
    if (auto ok = s.validate(); !ok) return kvx::error{ok.code(), "config field '" + v.path() + "': " + ok.error().message()};
    return s;
  }

  [[nodiscard]] const kv_shape& shape() const noexcept { return impl_->shape(); }
  [[nodiscard]] std::uint32_t num_blocks() const noexcept { return impl_->num_blocks(); }
  [[nodiscard]] std::uint32_t state_slots() const noexcept { return impl_->state_slots(); }
  [[nodiscard]] std::uint64_t bytes_required() const noexcept { return impl_->bytes_required(); }
  [[nodiscard]] std::uint64_t offset(const kv_coord& c) const noexcept { return impl_->offset(c); }
  [[nodiscard]] std::uint64_t state_offset(std::uint32_t slot, std::uint32_t layer) const noexcept {
    return impl_->state_offset(slot, layer);
  }
  [[nodiscard]] range_list block_ranges(std::uint32_t b) const { return impl_->block_ranges(b); }
  [[nodiscard]] range_list block_layer_ranges(std::uint32_t b, std::uint32_t layer) const {
    return impl_->block_layer_ranges(b, layer);
  }
  [[nodiscard]] range_list state_ranges(std::uint32_t s) const { return impl_->state_ranges(s); }
  [[nodiscard]] range_list state_layer_ranges(std::uint32_t s, std::uint32_t layer) const {
    return impl_->state_layer_ranges(s, layer);
  }
  //! The wrapped layout's name ("page_first", ...).
  [[nodiscard]] std::string_view name() const noexcept { return impl_->name(); }

 private:
  struct concept_t {
    virtual ~concept_t() = default;
    virtual const kv_shape& shape() const noexcept = 0;
    virtual std::uint32_t num_blocks() const noexcept = 0;
    virtual std::uint32_t state_slots() const noexcept = 0;
    virtual std::uint64_t bytes_required() const noexcept = 0;
    virtual std::uint64_t offset(const kv_coord&) const noexcept = 0;
    virtual std::uint64_t state_offset(std::uint32_t, std::uint32_t) const noexcept = 0;
    virtual range_list block_ranges(std::uint32_t) const = 0;
    virtual range_list block_layer_ranges(std::uint32_t, std::uint32_t) const = 0;
    virtual range_list state_ranges(std::uint32_t) const = 0;
    virtual range_list state_layer_ranges(std::uint32_t, std::uint32_t) const = 0;
    virtual std::string_view name() const noexcept = 0;
  };

  template <class L>
  struct model final : concept_t {
    explicit model(L l) : layout(std::move(l)) {}
    const kv_shape& shape() const noexcept override { return layout.shape(); }
    std::uint32_t num_blocks() const noexcept override { return layout.num_blocks(); }
    std::uint32_t state_slots() const noexcept override { return layout.state_slots(); }
    std::uint64_t bytes_required() const noexcept override { return layout.bytes_required(); }
    std::uint64_t offset(const kv_coord& c) const noexcept override { return layout.offset(c); }
    std::uint64_t state_offset(std::uint32_t s, std::uint32_t l) const noexcept override { return layout.state_offset(s, l); }
    range_list block_ranges(std::uint32_t b) const override { return layout.block_ranges(b); }
    range_list block_layer_ranges(std::uint32_t b, std::uint32_t l) const override { return layout.block_layer_ranges(b, l); }
    range_list state_ranges(std::uint32_t s) const override { return layout.state_ranges(s); }
    range_list state_layer_ranges(std::uint32_t s, std::uint32_t l) const override { return layout.state_layer_ranges(s, l); }
    std::string_view name() const noexcept override { return layout.name(); }
    L layout;
  };

  std::shared_ptr<const concept_t> impl_;
};

static_assert(check_kv_layout<any_kv_layout>());

}  // namespace kvx::disagg::layouts
