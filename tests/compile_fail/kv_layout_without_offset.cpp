// expect: kvx: KV layout L lacks offset
#include <kvx/disagg/kv_layout.hpp>

struct my_layout {
  using kv_layout_concept = kvx::disagg::kv_layout_tag;
  const kvx::disagg::kv_shape& shape() const;
  std::uint32_t num_blocks() const;
  std::uint32_t state_slots() const;
  std::uint64_t bytes_required() const;
  std::uint64_t state_offset(std::uint32_t, std::uint32_t) const;
  kvx::disagg::range_list block_ranges(std::uint32_t) const;
  kvx::disagg::range_list block_layer_ranges(std::uint32_t, std::uint32_t) const;
  kvx::disagg::range_list state_ranges(std::uint32_t) const;
  kvx::disagg::range_list state_layer_ranges(std::uint32_t, std::uint32_t) const;
  std::string_view name() const;
};
static_assert(kvx::disagg::check_kv_layout<my_layout>());
