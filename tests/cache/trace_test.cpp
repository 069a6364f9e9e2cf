#include <kvx/cache/trace.hpp>

#include <sstream>
#include <string>

#include <gtest/gtest.h>

#include <kvx/cache/eviction/lru.hpp>
#include <kvx/cache/eviction/replay.hpp>

namespace {

std::string trace_error_of(const std::string& text) {
  std::istringstream in(text);
  auto r = kvx::cache::parse_trace(in, "t.jsonl");
  return r ? std::string("no error") : r.error().message();
}

}  // namespace

TEST(Trace, ParsesMooncakeLinesAndSkipsBlankOnes) {
  std::istringstream in(
      "{\"timestamp\": 0, \"input_length\": 1000, \"output_length\": 5, \"hash_ids\": [0, 1]}\n\n"
      "{\"timestamp\": 27.5, \"input_length\": 10, \"output_length\": 0, \"hash_ids\": [], \"extra\": true}\n");
  auto t = kvx::cache::parse_trace(in);
  ASSERT_TRUE(t) << t.error().message();
  ASSERT_EQ(t->size(), 2u);
  EXPECT_EQ((*t)[0].hash_ids, (std::vector<std::uint64_t>{0, 1}));
  EXPECT_EQ((*t)[0].input_length, 1000u);
  EXPECT_EQ((*t)[1].timestamp_ms, 27u);
  EXPECT_TRUE((*t)[1].hash_ids.empty());
}

TEST(Trace, MalformedLinesNameTheLineAndTheField) {
  const std::string ok = "{\"timestamp\": 0, \"input_length\": 1, \"output_length\": 1, \"hash_ids\": [1]}\n";
  EXPECT_EQ(trace_error_of(ok + "{not json\n"), "malformed message: t.jsonl line 2: not valid JSON");
  EXPECT_EQ(trace_error_of(ok + "[1, 2]\n"), "malformed message: t.jsonl line 2: expected a JSON object, got array");
  EXPECT_EQ(trace_error_of("{\"input_length\": 1, \"output_length\": 1, \"hash_ids\": []}\n"),
            "malformed message: t.jsonl line 1: field 'timestamp' is missing");
  EXPECT_EQ(trace_error_of("{\"timestamp\": -3, \"input_length\": 1, \"output_length\": 1, \"hash_ids\": []}"),
            "malformed message: t.jsonl line 1: field 'timestamp': expected a non-negative number, got -3");
  EXPECT_EQ(trace_error_of("{\"timestamp\": 1, \"input_length\": \"9\", \"output_length\": 1, \"hash_ids\": []}"),
            "malformed message: t.jsonl line 1: field 'input_length': expected a non-negative number, got \"9\"");
  EXPECT_EQ(trace_error_of("{\"timestamp\": 1, \"input_length\": 1, \"output_length\": 1}"),
            "malformed message: t.jsonl line 1: field 'hash_ids' is missing");
  EXPECT_EQ(trace_error_of("{\"timestamp\": 1, \"input_length\": 1, \"output_length\": 1, \"hash_ids\": 5}"),
            "malformed message: t.jsonl line 1: field 'hash_ids': expected an array, got number");
  EXPECT_EQ(trace_error_of(ok + ok + "{\"timestamp\": 1, \"input_length\": 1, \"output_length\": 1, \"hash_ids\": [3, -1]}"),
            "malformed message: t.jsonl line 3: field 'hash_ids[1]': expected a non-negative integer, got -1");
}

// A float of 2^64 or more has no uint64 value: the cast would be undefined
// behaviour (in practice 0 or 2^63), so it is an error, not a wrong number.
TEST(Trace, ANumberOfTwoToThe64OrMoreIsAnError) {
  EXPECT_EQ(trace_error_of("{\"timestamp\": 1e20, \"input_length\": 1, \"output_length\": 1, \"hash_ids\": []}"),
            "malformed message: t.jsonl line 1: field 'timestamp': expected a non-negative number below 2^64, got 1e+20");
  EXPECT_EQ(trace_error_of("{\"timestamp\": 1, \"input_length\": 18446744073709551616.0, \"output_length\": 1, "
                           "\"hash_ids\": []}"),
            "malformed message: t.jsonl line 1: field 'input_length': expected a non-negative number below 2^64, got "
            "1.8446744073709552e+19");
  std::istringstream in("{\"timestamp\": 1.8e19, \"input_length\": 1, \"output_length\": 1, \"hash_ids\": []}");
  auto t = kvx::cache::parse_trace(in);
  ASSERT_TRUE(t) << t.error().message();
  EXPECT_EQ((*t)[0].timestamp_ms, 18'000'000'000'000'000'000u);
}

TEST(Trace, AMissingFileIsNotFound) {
  auto r = kvx::cache::read_trace("/nonexistent/trace.jsonl");
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error(), kvx::errc::not_found);
  EXPECT_NE(r.error().message().find("/nonexistent/trace.jsonl"), std::string::npos);
}

TEST(Trace, TheFixtureParses) {
  auto r = kvx::cache::read_trace(KVX_SOURCE_DIR "/tests/data/eviction_trace_small.jsonl");
  ASSERT_TRUE(r) << r.error().message();
  EXPECT_EQ(r->size(), 10u);
}

TEST(TraceReplay, CountsBlockPrefixAndTokenHits) {
  // Request 2 re-reads blocks 1 and 3 but not 2: two block hits, one prefix hit.
  std::vector<kvx::cache::trace_request> t{{0, 1300, 0, {1, 2, 3}}, {1, 1100, 0, {1, 9, 3}}};
  const kvx::cache::eviction::replay_plan plan(t);
  EXPECT_EQ(plan.next_use()[0], 3u);
  EXPECT_EQ(plan.next_use()[1], kvx::cache::never);
  kvx::cache::eviction::lru p(10);
  const auto r = kvx::cache::eviction::replay(plan, p, {.capacity_blocks = 10});
  EXPECT_EQ(r.block_refs, 6u);
  EXPECT_EQ(r.block_hits, 2u);
  EXPECT_EQ(r.prefix_hit_blocks, 1u);
  EXPECT_EQ(r.input_tokens, 2400u);
  EXPECT_EQ(r.hit_tokens, 512u + 76u);  // block 3 of request 2 holds 1100 - 1024 tokens
  EXPECT_EQ(r.prefill_tokens_saved, 512u);
  EXPECT_EQ(r.evictions, 0u);
}

TEST(TraceReplay, PinsTheCurrentRequestsBlocks) {
  // Capacity 2, a request of 3 blocks: the third cannot evict the first two.
  std::vector<kvx::cache::trace_request> t{{0, 1536, 0, {1, 2, 3}}, {1, 512, 0, {1}}};
  const kvx::cache::eviction::replay_plan plan(t);
  kvx::cache::eviction::lru p(2);
  const auto r = kvx::cache::eviction::replay(plan, p, {.capacity_blocks = 2});
  EXPECT_EQ(r.rejected, 1u);
  EXPECT_EQ(r.block_hits, 1u);
}
