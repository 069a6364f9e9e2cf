#include <kvx/core/error.hpp>
#include <kvx/core/result.hpp>

#include <gtest/gtest.h>

#include <memory>
#include <string>

namespace {

TEST(Error, KvxCodesConvertToStdErrorCodeAndCompareByValue) {
  std::error_code ec = kvx::errc::out_of_range;
  EXPECT_EQ(ec, kvx::errc::out_of_range);
  EXPECT_NE(ec, kvx::errc::not_found);
  EXPECT_STREQ(ec.category().name(), "kvx");
  EXPECT_EQ(ec.message(), "out of range");
}

TEST(Error, TimeoutAndCancellationMatchTheGenericConditions) {
  std::error_code timeout = kvx::errc::timed_out;
  EXPECT_EQ(timeout, std::errc::timed_out);
  std::error_code cancelled = kvx::errc::cancelled;
  EXPECT_EQ(cancelled, std::errc::operation_canceled);
}

TEST(Error, EveryCodeHasItsOwnMessage) {
  std::set<std::string> messages;
  for (int v = 1; v <= static_cast<int>(kvx::errc::internal); ++v) {
    auto m = kvx::make_error_code(static_cast<kvx::errc>(v)).message();
    EXPECT_NE(m, "unknown kvx error") << v;
    EXPECT_TRUE(messages.insert(m).second) << "duplicate message " << m;
  }
}

TEST(Error, MessageCarriesContext) {
  kvx::error e{kvx::errc::unknown_segment, "read from peer 'decode-0' segment 'kv' offset 4096"};
  EXPECT_EQ(e.message(), "unknown segment: read from peer 'decode-0' segment 'kv' offset 4096");
  EXPECT_TRUE(e == kvx::errc::unknown_segment);
  EXPECT_TRUE(static_cast<bool>(e));
  EXPECT_FALSE(static_cast<bool>(kvx::error{}));
}

kvx::result<int> half(int v) {
  if (v % 2) return kvx::error{kvx::errc::invalid_argument, std::to_string(v) + " is odd"};
  return v / 2;
}

kvx::result<int> quarter(int v) {
  auto h = half(v);
  KVX_TRY(h);
  return half(*h);
}

TEST(Result, HoldsValueOrError) {
  auto ok = half(8);
  ASSERT_TRUE(ok);
  EXPECT_EQ(*ok, 4);
  EXPECT_FALSE(ok.code());
  auto bad = half(7);
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.code(), kvx::errc::invalid_argument);
  EXPECT_EQ(bad.error().context(), "7 is odd");
  EXPECT_EQ(bad.value_or(-1), -1);
}

TEST(Result, TryPropagatesTheFirstError) {
  EXPECT_EQ(*quarter(8), 2);
  EXPECT_EQ(quarter(6).error().context(), "3 is odd");
  EXPECT_EQ(quarter(5).error().context(), "5 is odd");
}

TEST(Result, MoveOnlyValuesAndVoid) {
  kvx::result<std::unique_ptr<int>> r = std::make_unique<int>(3);
  auto p = std::move(r).value();
  EXPECT_EQ(*p, 3);
  kvx::result<void> fine;
  EXPECT_TRUE(fine);
  kvx::result<void> broken = kvx::errc::busy;
  EXPECT_EQ(broken.code(), kvx::errc::busy);
}

TEST(ResultDeathTest, ValueOfAnErrorAbortsWithTheMessage) {
  EXPECT_DEATH((void)half(3).value(), "3 is odd");
}

}  // namespace

namespace {
TEST(Error, NamesRoundTripForWireProtocols) {
  for (int v = 1; v <= static_cast<int>(kvx::errc::internal); ++v) {
    auto e = static_cast<kvx::errc>(v);
    EXPECT_EQ(kvx::errc_from_string(kvx::to_string(e)), e);
  }
  EXPECT_EQ(kvx::errc_from_string("no_such_code"), kvx::errc::internal);
  EXPECT_STREQ(kvx::to_string(kvx::errc::out_of_range), "out_of_range");
}
}  // namespace
