#include <kvx/disagg/push_wire.hpp>

#include <gtest/gtest.h>

#include <string>
#include <system_error>

namespace kd = kvx::disagg;
using nlohmann::json;

namespace {

kd::push_target sample_target() {
  kd::push_target t;
  t.request = 42;
  t.epoch = 7;
  t.node = "decode-1";
  t.segments = {"decode-1/kv0", "decode-1/kv1"};
  t.segment_keys = {0xfeedfacecafebeefULL, 17};
  t.write_by_ms = 1'795'000'000'123ULL;
  t.source_tp = 2;
  t.source_block_tokens = 16;
  t.source_blocks = 3;
  t.layers = 2;
  for (std::uint32_t s = 0; s < 2; ++s)
    for (std::uint32_t l = 0; l < 2; ++l)
      for (std::uint32_t b = 0; b < 3; ++b) {
        auto& d = t.destinations.emplace_back();
        d.segment = s;
        d.ranges.push_back({.offset = (l * 3 + b) * 4096u, .length = 512, .stride = 1024, .count = 4});
        if (b == 1) d.ranges.push_back({.offset = 1u << 20, .length = 64, .stride = 0, .count = 1});
      }
  return t;
}

// Through text, as a control channel carries it (a literal 4 assigned in C++ is a signed number; on the wire it parses unsigned).
json wire(const json& j) { return json::parse(j.dump()); }

void expect_malformed(const json& j, const std::string& names) {
  auto t = kd::push_target_from_json(wire(j));
  ASSERT_FALSE(t.has_value()) << j.dump();
  EXPECT_EQ(t.code(), kvx::errc::malformed_message);
  EXPECT_NE(t.error().message().find(names), std::string::npos) << t.error().message();
}

}  // namespace

TEST(PushWire, TargetRoundTripsEveryField) {
  const auto t = sample_target();
  // Through text, as a control channel carries it.
  auto back = kd::push_target_from_json(json::parse(kd::to_json(t).dump()));
  ASSERT_TRUE(back.has_value()) << back.error().message();
  EXPECT_EQ(back->request, 42u);
  EXPECT_EQ(back->epoch, 7u);
  EXPECT_EQ(back->node, "decode-1");
  EXPECT_EQ(back->segments, t.segments);
  EXPECT_EQ(back->segment_keys, t.segment_keys);
  EXPECT_EQ(back->write_by_ms, t.write_by_ms);
  EXPECT_EQ(back->source_tp, 2u);
  EXPECT_EQ(back->source_block_tokens, 16u);
  EXPECT_EQ(back->source_blocks, 3u);
  EXPECT_EQ(back->layers, 2u);
  ASSERT_EQ(back->destinations.size(), t.destinations.size());
  for (std::uint32_t s = 0; s < 2; ++s)
    for (std::uint32_t l = 0; l < 2; ++l)
      for (std::uint32_t b = 0; b < 3; ++b) {
        const auto& x = back->at(s, l, b);
        const auto& y = t.at(s, l, b);
        EXPECT_EQ(x.segment, y.segment);
        ASSERT_EQ(x.ranges.size(), y.ranges.size());
        for (std::size_t k = 0; k < x.ranges.size(); ++k) EXPECT_EQ(x.ranges[k], y.ranges[k]);
      }
  EXPECT_FALSE(back->notify);  // the receiver sets it
}

TEST(PushWire, TargetWithTheWrongNumberOfDestinationsIsRefused) {
  auto j = kd::to_json(sample_target());
  j["destinations"].erase(j["destinations"].size() - 1);
  expect_malformed(j, "source_tp x layers x source_blocks = 12");
  j = kd::to_json(sample_target());
  j["source_blocks"] = 4;  // the table no longer matches the geometry
  expect_malformed(j, "target.destinations");
}

TEST(PushWire, TargetFieldsAreCheckedAndNamed) {
  auto j = kd::to_json(sample_target());
  j["destinations"][5]["segment"] = 2;
  expect_malformed(j, "target.destinations[5].segment");
  j = kd::to_json(sample_target());
  j["destinations"][3]["ranges"][0] = json::array({0, 1, 2});
  expect_malformed(j, "target.destinations[3].ranges[0]");
  j = kd::to_json(sample_target());
  j["destinations"][3]["ranges"][0][1] = -5;
  expect_malformed(j, "target.destinations[3].ranges[0].length");
  j = kd::to_json(sample_target());
  j["destinations"][0]["ranges"][0] = json::array({~0ULL - 10, 100, 0, 1});
  expect_malformed(j, "overflows 64 bits");
  j = kd::to_json(sample_target());
  j["destinations"][0]["ranges"][0] = json::array({0, 10, ~0ULL / 2, 4});
  expect_malformed(j, "overflows 64 bits");
  j = kd::to_json(sample_target());
  j["destinations"][0]["ranges"][0][1] = 0;
  expect_malformed(j, "is empty");
  j = kd::to_json(sample_target());
  j["layers"] = "two";
  expect_malformed(j, "'target.layers'");
  j = kd::to_json(sample_target());
  j.erase("node");
  expect_malformed(j, "'target.node' is required");
  j = kd::to_json(sample_target());
  j["segments"] = json::array();
  expect_malformed(j, "target.segments");
  j = kd::to_json(sample_target());
  j["segments"][1] = 3;
  expect_malformed(j, "target.segments[1]");
  j = kd::to_json(sample_target());
  j["segment_keys"] = json::array({1});  // one key for two segments
  expect_malformed(j, "target.segment_keys");
  j = kd::to_json(sample_target());
  j["segment_keys"][1] = -5;
  expect_malformed(j, "target.segment_keys[1]");
  j = kd::to_json(sample_target());
  j.erase("segment_keys");  // an older decode side's target: not pinned
  auto unpinned = kd::push_target_from_json(wire(j));
  ASSERT_TRUE(unpinned.has_value()) << unpinned.error().message();
  EXPECT_TRUE(unpinned->segment_keys.empty());
  j = kd::to_json(sample_target());
  j["write_by_ms"] = -1;
  expect_malformed(j, "target.write_by_ms");
  j["write_by_ms"] = "soon";
  expect_malformed(j, "target.write_by_ms");
  j.erase("write_by_ms");  // an older decode side's target: no deadline
  auto open_ended = kd::push_target_from_json(wire(j));
  ASSERT_TRUE(open_ended.has_value()) << open_ended.error().message();
  EXPECT_EQ(open_ended->write_by_ms, 0u);
  j = kd::to_json(sample_target());
  j["layer_count"] = 1;
  expect_malformed(j, "unknown config field 'target.layer_count'");
  expect_malformed(json::array({1, 2}), "expected an object");
  j = kd::to_json(sample_target());
  j["source_tp"] = 0;
  expect_malformed(j, "must be positive");
  j = kd::to_json(sample_target());
  j["source_blocks"] = 1u << 30;  // a corrupt count must not allocate gigabytes
  expect_malformed(j, "target.destinations");
}

TEST(PushWire, RangesWhoseChunksOverlapOrAreTooManyAreRefused) {
  // 2^40 one-byte chunks: the producer would list every one of them.
  auto j = kd::to_json(sample_target());
  j["destinations"][2]["ranges"][0] = json::array({0, 1, 1, 1ULL << 40});
  expect_malformed(j, "target.destinations[2].ranges[0].count");
  // Chunks on top of each other; length x count wraps to 4096 bytes.
  j = kd::to_json(sample_target());
  j["destinations"][2]["ranges"][0] = json::array({0, 4096, 0, (1ULL << 52) + 1});
  expect_malformed(j, "target.destinations[2].ranges[0].stride");
  j = kd::to_json(sample_target());
  j["destinations"][2]["ranges"][0] = json::array({0, 512, 256, 4});
  expect_malformed(j, "target.destinations[2].ranges[0].stride");
  // The cap counts every range of a destination together.
  j = kd::to_json(sample_target());
  j["destinations"][4]["ranges"][0] = json::array({0, 1, 1, 1ULL << 20});
  j["destinations"][4]["ranges"][1] = json::array({1ULL << 21, 1, 1, 1});
  expect_malformed(j, "target.destinations[4].ranges[1].count");
  // A stride below the length is harmless for a single chunk (the sample's stride 0).
  j = kd::to_json(sample_target());
  j["destinations"][2]["ranges"][0] = json::array({0, 4096, 0, 1});
  EXPECT_TRUE(kd::push_target_from_json(wire(j)));
}

TEST(PushWire, NoticeRoundTripsSuccessAndFailure) {
  kd::push_notice ok{.request = 9, .epoch = 3, .layer = 1, .code = {}, .context = {}, .failed_blocks = {}, .bytes = 8192};
  auto a = kd::push_notice_from_json(json::parse(kd::to_json(ok).dump()));
  ASSERT_TRUE(a.has_value()) << a.error().message();
  EXPECT_EQ(a->request, 9u);
  EXPECT_EQ(a->epoch, 3u);
  EXPECT_EQ(a->layer, 1u);
  EXPECT_FALSE(a->code);
  EXPECT_TRUE(a->failed_blocks.empty());
  EXPECT_EQ(a->bytes, 8192u);

  kd::push_notice bad{.request = 9, .epoch = 3, .layer = 2, .code = make_error_code(kvx::errc::connection_lost),
                      .context = "write to decode-1/kv0", .failed_blocks = {0, 4}, .bytes = 0};
  auto b = kd::push_notice_from_json(json::parse(kd::to_json(bad).dump()));
  ASSERT_TRUE(b.has_value()) << b.error().message();
  EXPECT_EQ(b->code, kvx::errc::connection_lost);
  EXPECT_EQ(b->context, "write to decode-1/kv0");
  EXPECT_EQ(b->failed_blocks, (std::vector<std::uint32_t>{0, 4}));

  kd::push_notice sys{.request = 1, .epoch = 1, .layer = 0, .code = std::make_error_code(std::errc::connection_reset),
                      .context = {}, .failed_blocks = {}, .bytes = 0};
  auto c = kd::push_notice_from_json(kd::to_json(sys));
  ASSERT_TRUE(c.has_value());
  EXPECT_EQ(c->code, std::make_error_code(std::errc::connection_reset));
}

TEST(PushWire, MalformedNoticesAreRefused) {
  auto base = kd::to_json(kd::push_notice{.request = 1, .epoch = 1, .layer = 0, .code = {}, .context = {}, .failed_blocks = {}, .bytes = 0});
  auto check = [](const json& j, const std::string& names) {
    auto n = kd::push_notice_from_json(wire(j));
    ASSERT_FALSE(n.has_value()) << j.dump();
    EXPECT_EQ(n.code(), kvx::errc::malformed_message);
    EXPECT_NE(n.error().message().find(names), std::string::npos) << n.error().message();
  };
  auto j = base;
  j.erase("epoch");
  check(j, "'notice.epoch' is required");
  j = base;
  j["layer"] = -1;
  check(j, "notice.layer");
  j = base;
  j["failed_blocks"] = json::array({1});  // failed blocks with no error
  check(j, "'code' is null");
  j = base;
  j["code"] = {{"category", "kvx"}, {"value", 999}};
  check(j, "is not a kvx errc");
  j = base;
  j["code"] = {{"category", "kvx"}, {"value", 0}};
  check(j, "success is null");
  j = base;
  j["code"] = {{"category", "kvx"}, {"value", 9}};
  j["failed_blocks"] = json::array({1ULL << 40});
  check(j, "notice.failed_blocks[0]");
  j = base;
  j["extra"] = true;
  check(j, "notice.extra");
}

TEST(PushWire, AForeignErrorCategoryStaysAnError) {
  auto j = kd::to_json(kd::push_notice{.request = 1, .epoch = 1, .layer = 0, .code = {}, .context = {}, .failed_blocks = {}, .bytes = 0});
  j["code"] = {{"category", "cuda"}, {"value", 700}};
  auto n = kd::push_notice_from_json(j);
  ASSERT_TRUE(n.has_value());
  EXPECT_EQ(n->code, kvx::errc::io_error);
}
