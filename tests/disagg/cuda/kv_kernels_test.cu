// KV gather / scatter kernels and the fp8 codec against CPU references built
// from kvx::disagg layout offsets (and convert() for tensor-parallel changes).
// Host-side checks (views, argument errors) run everywhere; the kernel tests
// skip without a GPU.
#include <kvx/cuda/kernels/kv_gather.cuh>

#include <kvx/cuda/device.hpp>
#include <kvx/cuda/kernels/kv_quant.cuh>
#include <kvx/cuda/kv_codec.hpp>
#include <kvx/cuda/memory.hpp>
#include <kvx/cuda/paged_kv_view.hpp>
#include <kvx/cuda/paged_kv_view_of.hpp>
#include <kvx/disagg/layout_convert.hpp>
#include <kvx/disagg/layouts/layer_first.hpp>
#include <kvx/disagg/layouts/layer_first_kv_split.hpp>
#include <kvx/disagg/layouts/page_first.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

namespace kc = kvx::cuda;
namespace kd = kvx::disagg;
using kd::layer_kind;
using kd::layouts::layer_first;
using kd::layouts::layer_first_kv_split;
using kd::layouts::page_first;

namespace {

#define KVX_SKIP_WITHOUT_GPU()                                         \
  do {                                                                 \
    if (kc::device_count() == 0) GTEST_SKIP() << kc::skip_reason();    \
  } while (false)

#define KVX_CUDA_OK(call) ASSERT_EQ(cudaSuccess, (call)) << #call

constexpr std::byte guard_fill{0xA5};
constexpr std::byte staging_fill{0x5A};

kd::kv_shape small_shape(std::uint32_t heads = 8, std::uint32_t head_dim = 64, std::uint32_t layers = 4,
                         std::uint32_t block_tokens = 16, std::uint32_t dtype = 2) {
  return kd::kv_shape{.layers = layers, .block_tokens = block_tokens, .kv_heads = heads, .head_dim = head_dim,
                      .dtype_bytes = dtype};
}

std::vector<std::byte> random_bytes(std::size_t n, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::byte> v(n);
  for (auto& b : v) b = std::byte(static_cast<unsigned char>(rng()));
  return v;
}

// `n` ids of [0, blocks): distinct unless `repeats`.
std::vector<std::uint32_t> random_ids(std::uint32_t n, std::uint32_t blocks, std::uint64_t seed, bool repeats = false) {
  std::mt19937_64 rng(seed);
  std::vector<std::uint32_t> ids;
  if (repeats) {
    for (std::uint32_t i = 0; i < n; ++i) ids.push_back(static_cast<std::uint32_t>(rng() % blocks));
    return ids;
  }
  ids.resize(blocks);
  std::iota(ids.begin(), ids.end(), 0U);
  std::shuffle(ids.begin(), ids.end(), rng);
  ids.resize(n);
  return ids;
}

// Device memory with `guard` bytes either side (and an optional misalignment
// of the payload), all filled with `fill`, so a stray write shows.
class guarded_buffer {
 public:
  static constexpr std::size_t guard = 4096;
  guarded_buffer(std::size_t n, std::size_t misalign = 0, std::byte fill = guard_fill)
      : n_(n), misalign_(misalign), fill_(fill) {
    buf_ = kc::device_buffer::allocate(n + 2 * guard + misalign, 0).value();
    EXPECT_EQ(cudaSuccess, cudaMemset(buf_.data(), static_cast<int>(fill), buf_.size()));
  }
  [[nodiscard]] std::byte* data() const { return buf_.data() + guard + misalign_; }
  [[nodiscard]] std::size_t size() const { return n_; }
  [[nodiscard]] kvx::memory::memory_region region() const { return {data(), n_, kvx::memory::location::cuda(0)}; }
  void upload(const std::vector<std::byte>& host) const {
    EXPECT_EQ(host.size(), n_);
    EXPECT_EQ(cudaSuccess, cudaMemcpy(data(), host.data(), n_, cudaMemcpyHostToDevice));
  }
  [[nodiscard]] std::vector<std::byte> download() const {
    std::vector<std::byte> out(n_);
    EXPECT_EQ(cudaSuccess, cudaMemcpy(out.data(), data(), n_, cudaMemcpyDeviceToHost));
    return out;
  }
  //! True when no byte outside [data(), data() + size()) changed.
  [[nodiscard]] bool guards_intact() const {
    std::vector<std::byte> all(buf_.size());
    EXPECT_EQ(cudaSuccess, cudaMemcpy(all.data(), buf_.data(), all.size(), cudaMemcpyDeviceToHost));
    const std::size_t lo = guard + misalign_, hi = lo + n_;
    for (std::size_t i = 0; i < all.size(); ++i)
      if ((i < lo || i >= hi) && all[i] != fill_) return false;
    return true;
  }

 private:
  kc::device_buffer buf_;
  std::size_t n_, misalign_;
  std::byte fill_;
};

struct device_ids {
  kc::device_buffer buf;
  std::uint32_t n = 0;
  explicit device_ids(const std::vector<std::uint32_t>& ids) : n(static_cast<std::uint32_t>(ids.size())) {
    buf = kc::device_buffer::allocate(std::max<std::size_t>(ids.size(), 1) * 4, 0).value();
    EXPECT_EQ(cudaSuccess, cudaMemcpy(buf.data(), ids.data(), ids.size() * 4, cudaMemcpyHostToDevice));
  }
  [[nodiscard]] kc::device_block_ids get() const { return {reinterpret_cast<const std::uint32_t*>(buf.data()), n}; }
};

// Model layers of the attention layers.
std::vector<std::uint32_t> attention_layers(const kd::kv_shape& s) {
  std::vector<std::uint32_t> a;
  for (std::uint32_t l = 0; l < s.layers; ++l)
    if (s.is_attention(l)) a.push_back(l);
  return a;
}

// The staging order of kv_gather.cuh, from the layout's own offsets.
template <class L, class F>
void for_each_staged_head(const L& l, const std::vector<std::uint32_t>& ids, kc::kv_slice s, F&& f) {
  const auto attn = attention_layers(l.shape());
  const std::uint64_t hb = l.shape().head_bytes();
  std::uint64_t pos = 0;
  for (std::uint32_t id : ids)
    for (std::uint32_t a = s.layer_begin; a < s.layer_end; ++a)
      for (std::uint32_t kv = 0; kv < 2; ++kv)
        for (std::uint32_t t = 0; t < l.shape().block_tokens; ++t)
          for (std::uint32_t h = s.head_begin; h < s.head_begin + s.head_count; ++h, pos += hb)
            f(l.offset(kd::kv_coord{attn[a], kv, id, t, h, 0}), pos, hb);
}

template <class L>
std::vector<std::byte> reference_gather(const L& l, const std::vector<std::byte>& pool,
                                        const std::vector<std::uint32_t>& ids, kc::kv_slice s) {
  std::vector<std::byte> out(ids.size() * s.layer_count() * 2 * l.shape().block_tokens * s.head_count *
                             l.shape().head_bytes());
  for_each_staged_head(l, ids, s, [&](std::uint64_t off, std::uint64_t pos, std::uint64_t n) {
    std::memcpy(out.data() + pos, pool.data() + off, n);
  });
  return out;
}

template <class L>
void reference_scatter(const L& l, std::vector<std::byte>& pool, const std::vector<std::uint32_t>& ids, kc::kv_slice s,
                       const std::vector<std::byte>& staging) {
  for_each_staged_head(l, ids, s, [&](std::uint64_t off, std::uint64_t pos, std::uint64_t n) {
    std::memcpy(pool.data() + off, staging.data() + pos, n);
  });
}

class kv_kernels : public ::testing::Test {
 protected:
  void SetUp() override {
    if (kc::device_count() == 0) return;
    ASSERT_EQ(cudaSuccess, cudaStreamCreate(&stream_));
  }
  void TearDown() override {
    if (stream_) (void)cudaStreamDestroy(stream_);
  }
  void sync() { ASSERT_EQ(cudaSuccess, cudaStreamSynchronize(stream_)); }
  cudaStream_t stream_ = nullptr;

  // Gathers `ids` (slice `s`) of a random pool of layout `l` and checks the
  // staging against the reference, then scatters a random staging into the
  // same blocks and checks the whole pool.
  template <class L>
  void round_trip(const L& l, std::uint32_t n, kc::kv_slice s, std::uint64_t seed, std::size_t misalign = 0,
                  bool host_ids = false) {
    SCOPED_TRACE(std::string(l.name()) + " n=" + std::to_string(n) + " layers [" + std::to_string(s.layer_begin) +
                 "," + std::to_string(s.layer_end) + ") heads " + std::to_string(s.head_begin) + "+" +
                 std::to_string(s.head_count) + " misalign " + std::to_string(misalign));
    guarded_buffer pool(l.bytes_required(), misalign);
    auto host = random_bytes(pool.size(), seed);
    pool.upload(host);
    auto view = kc::paged_kv_view_of(l, pool.region());
    ASSERT_TRUE(view) << view.error().message();
    const auto ids = random_ids(n, l.num_blocks(), seed + 1, /*repeats=*/false);
    const kc::kv_slice rs = s.resolved(*view);
    const std::uint64_t bytes = kc::kv_staging_bytes(*view, n, s);
    ASSERT_EQ(bytes, reference_gather(l, host, ids, rs).size());
    guarded_buffer staging(bytes, misalign, staging_fill);

    device_ids dids(ids);
    const auto r = host_ids ? kc::gather_kv(*view, kc::host_block_ids{ids}, s, staging.data(), bytes, stream_)
                      : kc::gather_kv(*view, dids.get(), s, staging.data(), bytes, stream_);
    ASSERT_TRUE(r) << r.error().message();
    sync();
    EXPECT_TRUE(staging.download() == reference_gather(l, host, ids, rs)) << "gather differs from the reference";
    EXPECT_TRUE(staging.guards_intact()) << "gather wrote outside the staging buffer";
    EXPECT_TRUE(pool.download() == host) << "gather changed its source";

    // Scatter new bytes into other (distinct) blocks.
    const auto ids2 = random_ids(n, l.num_blocks(), seed + 2);
    auto incoming = random_bytes(bytes, seed + 3);
    staging.upload(incoming);
    device_ids dids2(ids2);
    const auto r2 = host_ids ? kc::scatter_kv(*view, kc::host_block_ids{ids2}, s, staging.data(), bytes, stream_)
                             : kc::scatter_kv(*view, dids2.get(), s, staging.data(), bytes, stream_);
    ASSERT_TRUE(r2) << r2.error().message();
    sync();
    reference_scatter(l, host, ids2, rs, incoming);
    EXPECT_TRUE(pool.download() == host) << "scatter differs from the reference";
    EXPECT_TRUE(pool.guards_intact()) << "scatter wrote outside the pool";
  }
};

// ---------------------------------------------------------------- views (host)

TEST(paged_kv_view, strides_of_the_built_in_layouts_match_the_table) {
  const auto s = small_shape();
  const std::uint64_t kvb = 16ULL * 8 * 128, blb = 2 * kvb;
  std::vector<std::byte> fake(1);
  auto region = [&](std::uint64_t n) { return kvx::memory::memory_region{fake.data(), n, kvx::memory::location::cuda(0)}; };

  const auto lf = layer_first::make(s, 10).value();
  auto v = kc::paged_kv_view_of(lf, region(lf.bytes_required())).value();
  EXPECT_EQ(v.layer_stride, 10 * blb);
  EXPECT_EQ(v.block_stride, blb);
  EXPECT_EQ(v.kv_stride, kvb);
  EXPECT_TRUE(v.kv_contiguous());
  EXPECT_EQ(v.layers, 4U);
  EXPECT_EQ(v.head_bytes, 128U);
  EXPECT_EQ(v.head_dim(), 64U);

  const auto pf = page_first::make(s, 10).value();
  v = kc::paged_kv_view_of(pf, region(pf.bytes_required())).value();
  EXPECT_EQ(v.layer_stride, blb);
  EXPECT_EQ(v.block_stride, 4 * blb);
  EXPECT_TRUE(v.kv_contiguous());

  const auto ks = layer_first_kv_split::make(s, 10).value();
  v = kc::paged_kv_view_of(ks, region(ks.bytes_required())).value();
  EXPECT_EQ(v.layer_stride, 10 * blb);
  EXPECT_EQ(v.block_stride, kvb);
  EXPECT_EQ(v.kv_stride, 10 * kvb);
  EXPECT_FALSE(v.kv_contiguous());
}

template <class L>
void expect_offsets_match(const L& l) {
  std::vector<std::byte> fake(1);
  auto v = kc::paged_kv_view_of(l, {fake.data(), l.bytes_required(), kvx::memory::location::cuda(0)});
  ASSERT_TRUE(v) << v.error().message();
  const auto attn = attention_layers(l.shape());
  ASSERT_EQ(v->layers, attn.size());
  std::mt19937 rng(7);
  for (int i = 0; i < 2000; ++i) {
    const kd::kv_coord c{attn[rng() % attn.size()], static_cast<std::uint32_t>(rng() % 2),
                         static_cast<std::uint32_t>(rng() % l.num_blocks()),
                         static_cast<std::uint32_t>(rng() % l.shape().block_tokens),
                         static_cast<std::uint32_t>(rng() % l.shape().kv_heads), 0};
    const std::uint32_t a = kc::attention_layer_index(l.shape(), c.layer).value();
    ASSERT_EQ(v->element(a, c.kv, c.block, c.token, c.head), fake.data() + l.offset(c)) << l.name();
  }
}

TEST(paged_kv_view, element_addresses_match_layout_offsets_including_hybrid_models) {
  auto s = small_shape(4, 32, 6, 8);
  expect_offsets_match(layer_first::make(s, 7).value());
  expect_offsets_match(page_first::make(s, 7).value());
  expect_offsets_match(layer_first_kv_split::make(s, 7).value());
  s.kinds = {layer_kind::recurrent, layer_kind::attention, layer_kind::attention,
             layer_kind::recurrent, layer_kind::attention, layer_kind::recurrent};
  s.state_bytes = 1000;
  expect_offsets_match(layer_first::make(s, 7, 3).value());
  expect_offsets_match(page_first::make(s, 7, 3).value());
  expect_offsets_match(layer_first_kv_split::make(s, 1, 3).value());
  EXPECT_EQ(kc::attention_layer_index(s, 4).value(), 2U);
  EXPECT_EQ(kc::attention_layer_index(s, 3).error().code(), kvx::errc::invalid_argument);
  EXPECT_EQ(kc::attention_layer_index(s, 6).error().code(), kvx::errc::out_of_range);
}

TEST(paged_kv_view, view_of_refuses_short_host_and_attention_free_regions) {
  const auto l = layer_first::make(small_shape(), 4).value();
  std::vector<std::byte> fake(1);
  const auto r = kc::paged_kv_view_of(l, {fake.data(), l.bytes_required() - 1, kvx::memory::location::cuda(0)});
  EXPECT_EQ(r.error().code(), kvx::errc::out_of_range);
  const auto r2 = kc::paged_kv_view_of(l, {fake.data(), l.bytes_required(), kvx::memory::location::host()});
  EXPECT_EQ(r2.error().code(), kvx::errc::invalid_argument);
  auto s = small_shape(2, 8, 2);
  s.kinds = {layer_kind::recurrent, layer_kind::recurrent};
  s.state_bytes = 64;
  const auto rec = page_first::make(s, 4, 2).value();
  const auto r3 = kc::paged_kv_view_of(rec, {fake.data(), rec.bytes_required(), kvx::memory::location::cuda(0)});
  EXPECT_EQ(r3.error().code(), kvx::errc::invalid_argument);
}

}  // namespace

// A layout that is not affine: blocks in reverse order. (Outside the anonymous
// namespace: nvcc warns about its members that only the concept names.)
namespace kv_kernels_test {
class reversed_blocks {
 public:
  using kv_layout_concept = kd::kv_layout_tag;
  explicit reversed_blocks(kd::kv_shape s, std::uint32_t n) : inner_(layer_first::make(s, n).value()) {}
  const kd::kv_shape& shape() const { return inner_.shape(); }
  std::uint32_t num_blocks() const { return inner_.num_blocks(); }
  std::uint32_t state_slots() const { return 0; }
  std::uint64_t bytes_required() const { return inner_.bytes_required(); }
  std::uint64_t offset(kd::kv_coord c) const {
    c.block = num_blocks() - 1 - c.block;
    return inner_.offset(c);
  }
  std::uint64_t state_offset(std::uint32_t, std::uint32_t) const { return 0; }
  kd::range_list block_ranges(std::uint32_t b) const { return inner_.block_ranges(num_blocks() - 1 - b); }
  kd::range_list block_layer_ranges(std::uint32_t b, std::uint32_t l) const {
    return inner_.block_layer_ranges(num_blocks() - 1 - b, l);
  }
  kd::range_list state_ranges(std::uint32_t) const { return {}; }
  kd::range_list state_layer_ranges(std::uint32_t, std::uint32_t) const { return {}; }
  std::string_view name() const { return "reversed_blocks"; }

 private:
  layer_first inner_;
};
}  // namespace kv_kernels_test

namespace {
using kv_kernels_test::reversed_blocks;

TEST(paged_kv_view, view_of_refuses_a_layout_that_is_not_affine) {
  const reversed_blocks l(small_shape(), 4);
  std::vector<std::byte> fake(1);
  auto r = kc::paged_kv_view_of(l, {fake.data(), l.bytes_required(), kvx::memory::location::cuda(0)});
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code(), kvx::errc::not_supported);
}

TEST(paged_kv_view, validate_names_what_is_wrong) {
  std::vector<std::byte> fake(1);
  const auto l = page_first::make(small_shape(), 4).value();
  const kc::paged_kv_view good =
      kc::paged_kv_view_of(l, {fake.data(), l.bytes_required(), kvx::memory::location::cuda(0)}).value();
  EXPECT_EQ(kc::validate(good), nullptr);
  auto v = good;
  v.base = nullptr;
  EXPECT_NE(kc::validate(v), nullptr);
  v = good;
  v.bytes -= 1;
  EXPECT_NE(kc::validate(v), nullptr);
  v = good;
  v.kv_stride = v.kv_bytes() - 1;
  EXPECT_NE(kc::validate(v), nullptr);
  v = good;
  v.layer_stride = ~0ULL;
  EXPECT_NE(kc::validate(v), nullptr);
  v = good;
  v.kv_heads = 0;
  EXPECT_NE(kc::validate(v), nullptr);
}

TEST(paged_kv_view, staging_sizes) {
  std::vector<std::byte> fake(1);
  const auto l = layer_first::make(small_shape(), 4).value();
  const auto v = kc::paged_kv_view_of(l, {fake.data(), l.bytes_required(), kvx::memory::location::cuda(0)}).value();
  EXPECT_EQ(kc::kv_staging_bytes(v, 3, {}), 3 * 4 * v.block_layer_bytes());
  EXPECT_EQ(kc::kv_staging_bytes(v, 3, {.layer_begin = 1, .layer_end = 2}), 3 * v.block_layer_bytes());
  EXPECT_EQ(kc::kv_staging_bytes(v, 3, {.head_begin = 2, .head_count = 4}), 3 * 4 * v.block_layer_bytes() / 2);
  EXPECT_EQ(kc::kv_staging_bytes(v, 0, {}), 0U);
  kc::fp8_e4m3_codec<__half> fp8;
  const std::uint64_t payload = 3 * 4 * v.block_layer_bytes() / 2;
  EXPECT_EQ(fp8.payload_bytes(v, 3, {}), payload);
  EXPECT_EQ(fp8.scales_offset(v, 3, {}), (payload + 15) / 16 * 16);
  EXPECT_EQ(fp8.staging_bytes(v, 3, {}), fp8.scales_offset(v, 3, {}) + 3 * 4 * 2 * 4);
}

// ------------------------------------------------------ argument errors (host)

TEST(kv_gather_args, bad_arguments_are_refused_before_anything_is_enqueued) {
  std::vector<std::byte> fake(1);
  const auto l = layer_first::make(small_shape(), 8).value();
  const auto v = kc::paged_kv_view_of(l, {fake.data(), l.bytes_required(), kvx::memory::location::cuda(0)}).value();
  const std::uint32_t* ids = reinterpret_cast<const std::uint32_t*>(fake.data());
  void* stg = fake.data();
  const auto need = kc::kv_staging_bytes(v, 2, {});
  auto code = [](const kvx::result<void>& r) { return r ? kvx::errc{} : r.error().code(); };
  using kvx::errc;

  auto bad_view = v;
  bad_view.num_blocks = 0;
  EXPECT_EQ(code(kc::gather_kv(bad_view, {ids, 2}, {}, stg, need, nullptr)), errc::invalid_argument);
  EXPECT_EQ(code(kc::gather_kv(v, {nullptr, 2}, {}, stg, need, nullptr)), errc::invalid_argument);
  EXPECT_EQ(code(kc::gather_kv(v, {ids, 2}, {}, nullptr, need, nullptr)), errc::invalid_argument);
  EXPECT_EQ(code(kc::gather_kv(v, {ids, 2}, {}, stg, need - 1, nullptr)), errc::out_of_range);
  EXPECT_EQ(code(kc::scatter_kv(v, {ids, 2}, {}, stg, need - 1, nullptr)), errc::out_of_range);
  EXPECT_EQ(code(kc::gather_kv(v, {ids, 2}, {.layer_begin = 3, .layer_end = 5}, stg, need, nullptr)),
            errc::out_of_range);
  EXPECT_EQ(code(kc::gather_kv(v, {ids, 2}, {.layer_begin = 3, .layer_end = 1}, stg, need, nullptr)),
            errc::invalid_argument);
  EXPECT_EQ(code(kc::gather_kv(v, {ids, 2}, {.layer_begin = 9}, stg, need, nullptr)), errc::out_of_range);
  EXPECT_EQ(code(kc::gather_kv(v, {ids, 2}, {.head_begin = 6, .head_count = 4}, stg, need, nullptr)),
            errc::out_of_range);
  EXPECT_EQ(code(kc::gather_kv(v, {ids, 2}, {.head_begin = 8}, stg, need, nullptr)), errc::out_of_range);
  EXPECT_EQ(code(kc::gather_kv(v, {ids, 2}, {.head_count = 0}, stg, need, nullptr)), errc::out_of_range);
  // Host ids are checked on the host.
  const std::vector<std::uint32_t> host{1, 8};
  auto r = kc::gather_kv(v, kc::host_block_ids{host}, {}, stg, need, nullptr);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code(), errc::out_of_range);
  EXPECT_NE(r.error().message().find("position 1"), std::string::npos) << r.error().message();
  // Nothing to do is not an error (and touches nothing).
  EXPECT_TRUE(kc::gather_kv(v, {nullptr, 0}, {}, nullptr, 0, nullptr));
  EXPECT_TRUE(kc::gather_kv(v, {ids, 2}, {.layer_begin = 2, .layer_end = 2}, nullptr, 0, nullptr));
  // The fp8 codec checks the element size too.
  const auto l1 = layer_first::make(small_shape(8, 64, 4, 16, 4), 8).value();
  const auto v1 = kc::paged_kv_view_of(l1, {fake.data(), l1.bytes_required(), kvx::memory::location::cuda(0)}).value();
  kc::fp8_e4m3_codec<__nv_bfloat16> fp8;
  EXPECT_EQ(code(fp8.encode(v1, {ids, 2}, {}, stg, ~0ULL, nullptr, nullptr)), errc::invalid_argument);
  EXPECT_EQ(code(fp8.encode(v, {ids, 2}, {}, stg, fp8.staging_bytes(v, 2, {}) - 1, nullptr, nullptr)),
            errc::out_of_range);
  EXPECT_EQ(code(fp8.decode(v, {ids, 2}, {}, fake.data() + 1, ~0ULL, nullptr, nullptr)), errc::invalid_argument);

  kc::kv_status st{};
  EXPECT_TRUE(kc::check_status(st));
  st = {2, 5, 99};
  auto e = kc::check_status(st, "decode of request 7");
  ASSERT_FALSE(e);
  EXPECT_EQ(e.error().code(), errc::out_of_range);
  EXPECT_NE(e.error().message().find("position 5 names block 99"), std::string::npos) << e.error().message();
}

struct not_a_codec {};
static_assert(!kc::kv_codec<not_a_codec>);
static_assert(kc::kv_codec<kc::identity_codec> && kc::kv_codec_lossless_v<kc::identity_codec>);
static_assert(kc::kv_codec<kc::fp8_e4m3_codec<__half>> && !kc::kv_codec_lossless_v<kc::fp8_e4m3_codec<__half>>);

// ------------------------------------------------------------ gather / scatter

TEST_F(kv_kernels, round_trips_every_layout_and_slice_byte_exact) {
  KVX_SKIP_WITHOUT_GPU();
  // 32 KiB block-layers (2 tiles), 16 KiB K/V runs (kv_split), short head runs.
  const auto s = small_shape();
  const kc::kv_slice slices[] = {
      {}, {.layer_begin = 1, .layer_end = 3}, {.layer_begin = 2, .layer_end = 3}, {.head_begin = 3, .head_count = 3},
      {.layer_begin = 1, .layer_end = 4, .head_begin = 4, .head_count = 4}};
  std::uint64_t seed = 1;
  for (const auto& sl : slices) {
    round_trip(layer_first::make(s, 48).value(), 17, sl, seed += 10);
    round_trip(page_first::make(s, 48).value(), 17, sl, seed += 10);
    round_trip(layer_first_kv_split::make(s, 48).value(), 17, sl, seed += 10);
  }
}

TEST_F(kv_kernels, round_trips_uneven_tiles_hybrid_models_and_one_block) {
  KVX_SKIP_WITHOUT_GPU();
  // 36 KiB block-layers: 2.25 tiles of 16 KiB.
  round_trip(layer_first::make(small_shape(8, 96, 3, 12), 20).value(), 9, {}, 101);
  round_trip(page_first::make(small_shape(8, 96, 3, 12), 20).value(), 9, {.head_begin = 1, .head_count = 6}, 102);
  auto h = small_shape(4, 64, 5, 16);
  h.kinds = {layer_kind::attention, layer_kind::recurrent, layer_kind::attention, layer_kind::attention,
             layer_kind::recurrent};
  h.state_bytes = 4096;
  round_trip(page_first::make(h, 12, 2).value(), 5, {.layer_begin = 1, .layer_end = 3}, 103);
  round_trip(layer_first::make(h, 12, 2).value(), 5, {}, 104);
  round_trip(layer_first::make(small_shape(), 1).value(), 1, {}, 105);
}

TEST_F(kv_kernels, misaligned_memory_takes_narrower_vectors_and_stays_exact) {
  KVX_SKIP_WITHOUT_GPU();
  round_trip(layer_first::make(small_shape(), 16).value(), 5, {}, 201, /*misalign=*/8);
  round_trip(page_first::make(small_shape(), 16).value(), 5, {.head_begin = 1, .head_count = 2}, 202, 4);
  round_trip(layer_first_kv_split::make(small_shape(), 16).value(), 5, {}, 203, 2);
  round_trip(layer_first::make(small_shape(), 16).value(), 5, {}, 204, 1);
  // 3-byte head vectors: byte-wide copies.
  round_trip(page_first::make(small_shape(5, 3, 2, 7, 1), 16).value(), 6, {.head_begin = 1, .head_count = 3}, 205);
  round_trip(layer_first::make(small_shape(5, 3, 2, 7, 1), 16).value(), 6, {}, 206);
}

TEST_F(kv_kernels, host_id_overloads_split_long_lists_across_launches) {
  KVX_SKIP_WITHOUT_GPU();
  const auto s = small_shape(2, 16, 2, 4);  // 512-byte block-layers
  round_trip(layer_first::make(s, 2000).value(), 1700, {}, 301, 0, /*host_ids=*/true);
  round_trip(page_first::make(s, 2000).value(), 800, {.head_begin = 1, .head_count = 1}, 302, 0, true);
}

TEST_F(kv_kernels, gather_with_repeated_ids_copies_each_occurrence) {
  KVX_SKIP_WITHOUT_GPU();
  const auto l = page_first::make(small_shape(), 8).value();
  guarded_buffer pool(l.bytes_required());
  const auto host = random_bytes(pool.size(), 401);
  pool.upload(host);
  const auto v = kc::paged_kv_view_of(l, pool.region()).value();
  const auto ids = random_ids(40, 8, 402, /*repeats=*/true);
  const auto bytes = kc::kv_staging_bytes(v, 40, {});
  guarded_buffer staging(bytes);
  device_ids d(ids);
  ASSERT_TRUE(kc::gather_kv(v, d.get(), {}, staging.data(), bytes, stream_));
  sync();
  EXPECT_TRUE(staging.download() == reference_gather(l, host, ids, kc::kv_slice{}.resolved(v)));
}

// -------------------------------------------------- tensor-parallel re-sharding

TEST_F(kv_kernels, tp2_prefill_into_tp1_decode_matches_convert) {
  KVX_SKIP_WITHOUT_GPU();
  constexpr std::uint32_t H = 8, n = 11;
  const auto pl = layer_first::make(small_shape(H / 2), 32).value();  // each prefill rank: 4 heads
  const auto dl = page_first::make(small_shape(H), 24).value();       // decode: all 8
  guarded_buffer p0(pl.bytes_required()), p1(pl.bytes_required()), dpool(dl.bytes_required());
  const auto h0 = random_bytes(p0.size(), 501), h1 = random_bytes(p1.size(), 502);
  auto hd = random_bytes(dpool.size(), 503);
  p0.upload(h0);
  p1.upload(h1);
  dpool.upload(hd);
  const auto t0 = random_ids(n, 32, 504), t1 = random_ids(n, 32, 505), td = random_ids(n, 24, 506);
  const auto v0 = kc::paged_kv_view_of(pl, p0.region()).value(), v1 = kc::paged_kv_view_of(pl, p1.region()).value();
  const auto vd = kc::paged_kv_view_of(dl, dpool.region()).value();

  const auto bytes = kc::kv_staging_bytes(v0, n, {});
  guarded_buffer s0(bytes), s1(bytes);
  device_ids d0(t0), d1(t1), dd(td);
  ASSERT_TRUE(kc::gather_kv(v0, d0.get(), {}, s0.data(), bytes, stream_));
  ASSERT_TRUE(kc::gather_kv(v1, d1.get(), {}, s1.data(), bytes, stream_));
  // (the transport would move s0 and s1 to the decode node here)
  ASSERT_TRUE(kc::scatter_kv(vd, dd.get(), {.head_begin = 0, .head_count = H / 2}, s0.data(), bytes, stream_));
  ASSERT_TRUE(kc::scatter_kv(vd, dd.get(), {.head_begin = H / 2, .head_count = H / 2}, s1.data(), bytes, stream_));
  sync();

  const kd::kv_source<layer_first> src[] = {{&pl, h0, t0, 0}, {&pl, h1, t1, H / 2}};
  const kd::kv_target<page_first> dst[] = {{&dl, hd, td, 0}};
  auto stats = kd::convert<layer_first, page_first>(src, dst, {0, n * 16});
  ASSERT_TRUE(stats) << stats.error().message();
  EXPECT_TRUE(dpool.download() == hd) << "decode pool differs from convert()";
  EXPECT_TRUE(dpool.guards_intact() && s0.guards_intact() && s1.guards_intact());
}

TEST_F(kv_kernels, tp1_prefill_into_tp2_decode_matches_convert) {
  KVX_SKIP_WITHOUT_GPU();
  constexpr std::uint32_t H = 8, n = 9;
  const auto pl = page_first::make(small_shape(H), 30).value();
  const auto dl = layer_first_kv_split::make(small_shape(H / 2), 20).value();
  guarded_buffer ppool(pl.bytes_required()), q0(dl.bytes_required()), q1(dl.bytes_required());
  const auto hp = random_bytes(ppool.size(), 601);
  auto hq0 = random_bytes(q0.size(), 602), hq1 = random_bytes(q1.size(), 603);
  ppool.upload(hp);
  q0.upload(hq0);
  q1.upload(hq1);
  const auto tp = random_ids(n, 30, 604), t0 = random_ids(n, 20, 605), t1 = random_ids(n, 20, 606);
  const auto vp = kc::paged_kv_view_of(pl, ppool.region()).value();
  const auto w0 = kc::paged_kv_view_of(dl, q0.region()).value(), w1 = kc::paged_kv_view_of(dl, q1.region()).value();

  const kc::kv_slice half0{.head_begin = 0, .head_count = H / 2}, half1{.head_begin = H / 2, .head_count = H / 2};
  const auto bytes = kc::kv_staging_bytes(vp, n, half0);
  ASSERT_EQ(bytes, kc::kv_staging_bytes(w0, n, {}));
  guarded_buffer s0(bytes), s1(bytes);
  device_ids dp(tp), d0(t0), d1(t1);
  ASSERT_TRUE(kc::gather_kv(vp, dp.get(), half0, s0.data(), bytes, stream_));
  ASSERT_TRUE(kc::gather_kv(vp, dp.get(), half1, s1.data(), bytes, stream_));
  ASSERT_TRUE(kc::scatter_kv(w0, d0.get(), {}, s0.data(), bytes, stream_));
  ASSERT_TRUE(kc::scatter_kv(w1, d1.get(), {}, s1.data(), bytes, stream_));
  sync();

  const kd::kv_source<page_first> src[] = {{&pl, hp, tp, 0}};
  const kd::kv_target<layer_first_kv_split> dst[] = {{&dl, hq0, t0, 0}, {&dl, hq1, t1, H / 2}};
  auto stats = kd::convert<page_first, layer_first_kv_split>(src, dst, {0, n * 16});
  ASSERT_TRUE(stats) << stats.error().message();
  EXPECT_TRUE(q0.download() == hq0) << "decode rank 0 differs from convert()";
  EXPECT_TRUE(q1.download() == hq1) << "decode rank 1 differs from convert()";
  EXPECT_TRUE(q0.guards_intact() && q1.guards_intact() && s0.guards_intact() && s1.guards_intact());
}

TEST_F(kv_kernels, layer_by_layer_gather_equals_one_whole_gather_reordered) {
  KVX_SKIP_WITHOUT_GPU();
  // Per-layer streaming: n blocks of layer l, for each l, into a page-first receiver.
  const auto src = layer_first::make(small_shape(), 40).value();
  const auto dst = page_first::make(small_shape(), 40).value();
  guarded_buffer a(src.bytes_required()), b(dst.bytes_required());
  const auto ha = random_bytes(a.size(), 701);
  auto hb = random_bytes(b.size(), 702);
  a.upload(ha);
  b.upload(hb);
  const auto va = kc::paged_kv_view_of(src, a.region()).value();
  const auto vb = kc::paged_kv_view_of(dst, b.region()).value();
  const auto ta = random_ids(13, 40, 703), tb = random_ids(13, 40, 704);
  device_ids da(ta), db(tb);
  for (std::uint32_t l = 0; l < va.layers; ++l) {
    const kc::kv_slice one{.layer_begin = l, .layer_end = l + 1};
    const auto bytes = kc::kv_staging_bytes(va, 13, one);
    guarded_buffer stg(bytes);
    ASSERT_TRUE(kc::gather_kv(va, da.get(), one, stg.data(), bytes, stream_));
    ASSERT_TRUE(kc::scatter_kv(vb, db.get(), one, stg.data(), bytes, stream_));
    sync();
  }
  ASSERT_TRUE(kd::copy_blocks(src, std::span<const std::byte>(ha), std::span<const std::uint32_t>(ta), dst,
                              std::span<std::byte>(hb), std::span<const std::uint32_t>(tb)));
  EXPECT_TRUE(b.download() == hb);
}

// ------------------------------------------------------------ bad ids on device

TEST_F(kv_kernels, out_of_range_device_ids_are_reported_and_never_touched) {
  KVX_SKIP_WITHOUT_GPU();
  const auto l = layer_first::make(small_shape(), 16).value();
  guarded_buffer pool(l.bytes_required());
  auto host = random_bytes(pool.size(), 801);
  pool.upload(host);
  const auto v = kc::paged_kv_view_of(l, pool.region()).value();
  std::vector<std::uint32_t> ids = {3, 7, 1, 16 + 1000, 9, 0xffffffffU};
  device_ids d(ids);
  auto status = kc::device_buffer::allocate(sizeof(kc::kv_status), 0).value();
  auto* st = reinterpret_cast<kc::kv_status*>(status.data());
  auto read_status = [&] {
    kc::kv_status h{};
    EXPECT_EQ(cudaSuccess, cudaMemcpy(&h, st, sizeof h, cudaMemcpyDeviceToHost));
    return h;
  };

  for (const kc::kv_slice sl : {kc::kv_slice{}, kc::kv_slice{.head_begin = 2, .head_count = 3}}) {
    const auto bytes = kc::kv_staging_bytes(v, 6, sl);
    guarded_buffer staging(bytes, 0, staging_fill);
    ASSERT_TRUE(kc::reset_status(st, stream_));
    ASSERT_TRUE(kc::gather_kv(v, d.get(), sl, staging.data(), bytes, stream_, st));
    sync();
    const auto h = read_status();
    EXPECT_EQ(h.bad_ids, 2U);
    EXPECT_TRUE((h.bad_position == 3 && h.bad_id == 1016) || (h.bad_position == 5 && h.bad_id == 0xffffffffU));
    EXPECT_EQ(kc::check_status(h).error().code(), kvx::errc::out_of_range);
    // Good blocks are gathered; a bad block's staging is left as it was.
    const auto got = staging.download();
    const auto per = bytes / 6;
    for (std::size_t i = 0; i < ids.size(); ++i) {
      const std::vector<std::byte> part(got.begin() + i * per, got.begin() + (i + 1) * per);
      if (ids[i] >= 16) {
        EXPECT_TRUE(std::all_of(part.begin(), part.end(), [](std::byte b) { return b == staging_fill; })) << i;
      } else {
        EXPECT_TRUE(part == reference_gather(l, host, {ids[i]}, sl.resolved(v))) << i;
      }
    }
    EXPECT_TRUE(staging.guards_intact());

    // Scatter: the good blocks are written, nothing else.
    auto incoming = random_bytes(bytes, 802);
    staging.upload(incoming);
    ASSERT_TRUE(kc::reset_status(st, stream_));
    ASSERT_TRUE(kc::scatter_kv(v, d.get(), sl, staging.data(), bytes, stream_, st));
    sync();
    EXPECT_EQ(read_status().bad_ids, 2U);
    for (std::size_t i = 0; i < ids.size(); ++i)
      if (ids[i] < 16)
        reference_scatter(l, host, {ids[i]}, sl.resolved(v),
                          std::vector<std::byte>(incoming.begin() + i * per, incoming.begin() + (i + 1) * per));
    EXPECT_TRUE(pool.download() == host);
    EXPECT_TRUE(pool.guards_intact());
  }
  // Without a status the bad ids are still skipped.
  const auto bytes = kc::kv_staging_bytes(v, 6, {});
  guarded_buffer staging(bytes);
  ASSERT_TRUE(kc::scatter_kv(v, d.get(), {}, staging.data(), bytes, stream_, nullptr));
  sync();
  EXPECT_TRUE(pool.guards_intact());
}

// ------------------------------------------------------------------------ fp8

template <class Elem>
float to_f(Elem e) {
  if constexpr (std::is_same_v<Elem, __half>)
    return __half2float(e);
  else
    return __bfloat162float(e);
}
template <class Elem>
Elem from_f(float f) {
  if constexpr (std::is_same_v<Elem, __half>)
    return __float2half_rn(f);
  else
    return __float2bfloat16_rn(f);
}
float fp8_to_f(std::uint8_t q) { return __half2float(__half(__nv_cvt_fp8_to_halfraw(q, __NV_E4M3))); }

// A pool of `Elem` values with a different magnitude per block-layer, one
// all-zero K, and some values small enough to be e4m3 subnormals.
template <class Elem, class L>
std::vector<std::byte> random_elems(const L& l, std::uint64_t seed, std::uint32_t zero_block) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0F, 1.0F);
  std::uniform_real_distribution<float> mag(-4.0F, 3.0F);
  std::vector<std::byte> out(l.bytes_required());
  const auto& s = l.shape();
  for (std::uint32_t layer : attention_layers(s))
    for (std::uint32_t b = 0; b < l.num_blocks(); ++b)
      for (std::uint32_t kv = 0; kv < 2; ++kv) {
        const float scale = std::pow(10.0F, mag(rng));
        for (std::uint32_t t = 0; t < s.block_tokens; ++t)
          for (std::uint32_t h = 0; h < s.kv_heads; ++h)
            for (std::uint32_t d = 0; d < s.head_dim; ++d) {
              float x = normal(rng) * scale;
              if (rng() % 16 == 0) x *= 1e-3F;  // e4m3 subnormals after scaling
              if (b == zero_block && kv == 0) x = 0.0F;
              const Elem e = from_f<Elem>(x);
              std::memcpy(out.data() + l.offset({layer, kv, b, t, h, d}), &e, sizeof e);
            }
      }
  return out;
}

template <class Elem, class L>
void fp8_round_trip(cudaStream_t stream, const L& l, std::uint32_t n, kc::kv_slice slice,
                    std::uint64_t seed) {
  SCOPED_TRACE(std::string(l.name()) + (std::is_same_v<Elem, __half> ? " fp16" : " bf16") + " heads " +
               std::to_string(slice.head_begin));
  const auto ids = random_ids(n, l.num_blocks(), seed);
  guarded_buffer pool(l.bytes_required());
  auto host = random_elems<Elem>(l, seed + 1, ids[0]);
  pool.upload(host);
  const auto v = kc::paged_kv_view_of(l, pool.region()).value();
  const kc::kv_slice s = slice.resolved(v);
  const kc::fp8_e4m3_codec<Elem> codec{};
  const std::uint64_t bytes = codec.staging_bytes(v, n, slice);
  guarded_buffer staging(bytes, 0, staging_fill);
  device_ids d(ids);
  const auto r = codec.encode(v, d.get(), slice, staging.data(), bytes, stream, nullptr);
  ASSERT_TRUE(r) << r.error().message();
  ASSERT_EQ(cudaSuccess, cudaStreamSynchronize(stream));
  EXPECT_TRUE(staging.guards_intact());
  const auto stg = staging.download();

  // Reference codes and scales, from the layout's offsets.
  const auto attn = attention_layers(l.shape());
  const std::uint32_t hd = l.shape().head_dim;
  std::vector<float> xs;
  const std::uint64_t scales_at = codec.scales_offset(v, n, slice);
  std::uint64_t pos = 0, group = 0;
  const double elem_rel = std::is_same_v<Elem, __half> ? std::ldexp(1.0, -11) : std::ldexp(1.0, -8);
  const double elem_abs = std::is_same_v<Elem, __half> ? std::ldexp(1.0, -25) : 0.0;
  std::vector<std::byte> expect_pool = host;
  std::size_t code_mismatches = 0, bound_violations = 0, nans = 0;
  for (std::uint32_t id : ids)
    for (std::uint32_t a = s.layer_begin; a < s.layer_end; ++a)
      for (std::uint32_t kv = 0; kv < 2; ++kv, ++group) {
        std::vector<std::uint64_t> offs;
        xs.clear();
        for (std::uint32_t t = 0; t < l.shape().block_tokens; ++t)
          for (std::uint32_t h = s.head_begin; h < s.head_begin + s.head_count; ++h)
            for (std::uint32_t e = 0; e < hd; ++e) {
              const auto off = l.offset({attn[a], kv, id, t, h, e});
              Elem x;
              std::memcpy(&x, host.data() + off, sizeof x);
              offs.push_back(off);
              xs.push_back(to_f(x));
            }
        float amax = 0.0F;
        for (float x : xs) amax = std::max(amax, std::fabs(x));
        const float scale = amax / 448.0F, inv = amax > 0.0F ? 448.0F / amax : 0.0F;
        float got_scale;
        std::memcpy(&got_scale, stg.data() + scales_at + group * 4, 4);
        EXPECT_EQ(got_scale, scale) << "group " << group;
        if (id == ids[0] && kv == 0) EXPECT_EQ(got_scale, 0.0F);
        for (std::size_t k = 0; k < xs.size(); ++k, ++pos) {
          const auto want = __nv_cvt_float_to_fp8(xs[k] * inv, __NV_SATFINITE, __NV_E4M3);
          const auto got = static_cast<std::uint8_t>(stg[pos]);
          code_mismatches += got != want;
          const float y = to_f(from_f<Elem>(fp8_to_f(got) * got_scale));
          const double tol = std::ldexp(1.0, -4) * std::fabs(xs[k]) + got_scale * std::ldexp(1.0, -9) +
                             elem_rel * std::fabs(y) + elem_abs + 1e-30;
          bound_violations += std::fabs(double(xs[k]) - y) > tol * (1 + 1e-6);
          nans += std::isnan(y);
          const Elem ye = from_f<Elem>(fp8_to_f(got) * got_scale);
          std::memcpy(expect_pool.data() + offs[k], &ye, sizeof ye);
        }
      }
  EXPECT_EQ(pos, codec.payload_bytes(v, n, slice));
  EXPECT_EQ(code_mismatches, 0U) << "fp8 codes differ from cuda_fp8.h's host conversion";
  EXPECT_EQ(bound_violations, 0U) << "dequantized values outside the documented error bound";
  EXPECT_EQ(nans, 0U);

  // Decode into a cleared pool, other blocks: byte-exact against the reference dequantization.
  const auto ids2 = random_ids(n, l.num_blocks(), seed + 7);
  guarded_buffer out(l.bytes_required());
  auto out_host = random_bytes(out.size(), seed + 8);
  out.upload(out_host);
  const auto w = kc::paged_kv_view_of(l, out.region()).value();
  device_ids d2(ids2);
  const auto r2 = codec.decode(w, d2.get(), slice, staging.data(), bytes, stream, nullptr);
  ASSERT_TRUE(r2) << r2.error().message();
  ASSERT_EQ(cudaSuccess, cudaStreamSynchronize(stream));
  // Expected: the dequantized slice of block ids[i] lands in block ids2[i].
  const auto deq = reference_gather(l, expect_pool, ids, s);
  reference_scatter(l, out_host, ids2, s, deq);
  EXPECT_TRUE(out.download() == out_host) << "decode differs from the reference dequantization";
  EXPECT_TRUE(out.guards_intact());
}

TEST_F(kv_kernels, fp8_codec_round_trip_within_bounds_for_fp16_and_bf16) {
  KVX_SKIP_WITHOUT_GPU();
  const auto s = small_shape(8, 64, 3, 16);
  fp8_round_trip<__half>(stream_, layer_first::make(s, 24).value(), 7, {}, 901);
  fp8_round_trip<__nv_bfloat16>(stream_, page_first::make(s, 24).value(), 7, {}, 902);
  fp8_round_trip<__nv_bfloat16>(stream_, layer_first_kv_split::make(s, 24).value(), 7,
                                {.layer_begin = 1, .layer_end = 3, .head_begin = 2, .head_count = 5}, 903);
  fp8_round_trip<__half>(stream_, page_first::make(s, 24).value(), 5, {.head_begin = 6, .head_count = 1}, 904);
  // head_dim 3: 6-byte head vectors, the scalar path.
  fp8_round_trip<__nv_bfloat16>(stream_, layer_first::make(small_shape(4, 3, 2, 8), 10).value(), 4, {}, 905);
  // head_dim 2 with 3 heads: 4-byte aligned pairs.
  fp8_round_trip<__half>(stream_, page_first::make(small_shape(3, 2, 2, 8), 10).value(), 4, {}, 906);
}

TEST_F(kv_kernels, fp8_codec_reports_bad_ids_and_identity_codec_is_gather) {
  KVX_SKIP_WITHOUT_GPU();
  const auto l = page_first::make(small_shape(), 8).value();
  guarded_buffer pool(l.bytes_required());
  pool.upload(random_elems<__half>(l, 1001, 0));
  const auto v = kc::paged_kv_view_of(l, pool.region()).value();
  const std::vector<std::uint32_t> ids = {2, 8, 5};
  device_ids d(ids);
  auto status = kc::device_buffer::allocate(sizeof(kc::kv_status), 0).value();
  auto* st = reinterpret_cast<kc::kv_status*>(status.data());
  const kc::fp8_e4m3_codec<__half> fp8{};
  const auto bytes = fp8.staging_bytes(v, 3, {});
  guarded_buffer staging(bytes);
  ASSERT_TRUE(kc::reset_status(st, stream_));
  ASSERT_TRUE(fp8.encode(v, d.get(), {}, staging.data(), bytes, stream_, st));
  sync();
  kc::kv_status h{};
  ASSERT_EQ(cudaSuccess, cudaMemcpy(&h, st, sizeof h, cudaMemcpyDeviceToHost));
  EXPECT_EQ(h.bad_ids, 1U);
  EXPECT_EQ(h.bad_position, 1U);
  EXPECT_EQ(h.bad_id, 8U);
  EXPECT_TRUE(staging.guards_intact());
  const auto before = pool.download();
  ASSERT_TRUE(fp8.decode(v, d.get(), {}, staging.data(), bytes, stream_, st));
  sync();
  EXPECT_TRUE(pool.guards_intact());
  // Decode rewrote blocks 2 and 5 (lossy); the identity gather below reads what is there now.
  const auto after = pool.download();

  const kc::identity_codec id{};
  const std::vector<std::uint32_t> good = {2, 4};
  device_ids g(good);
  const auto ib = id.staging_bytes(v, 2, {});
  guarded_buffer is(ib);
  ASSERT_TRUE(id.encode(v, g.get(), {}, is.data(), ib, stream_, nullptr));
  sync();
  EXPECT_TRUE(is.download() == reference_gather(l, after, good, kc::kv_slice{}.resolved(v)));
}

}  // namespace
