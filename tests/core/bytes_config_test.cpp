#include <kvx/core/bytes.hpp>
#include <kvx/core/config.hpp>
#include <kvx/core/splitmix64.hpp>

#include <gtest/gtest.h>

namespace {

using namespace kvx::literals;

TEST(Bytes, ParsesBinaryMultiplesAndRejectsGarbage) {
  EXPECT_EQ(*kvx::parse_size("4096"), 4096u);
  EXPECT_EQ(*kvx::parse_size("4k"), 4_KiB);
  EXPECT_EQ(*kvx::parse_size("64MiB"), 64_MiB);
  EXPECT_EQ(*kvx::parse_size("2GB"), 2_GiB);
  EXPECT_EQ(kvx::parse_size("").code(), kvx::errc::invalid_argument);
  EXPECT_EQ(kvx::parse_size("MiB").code(), kvx::errc::invalid_argument);
  EXPECT_EQ(kvx::parse_size("12 parsecs").code(), kvx::errc::invalid_argument);
  EXPECT_EQ(kvx::parse_size("99999999999999999999").code(), kvx::errc::invalid_argument);
  EXPECT_EQ(kvx::parse_size("17179869184T").code(), kvx::errc::invalid_argument);
  EXPECT_EQ(kvx::format_size(1536), "1.5 KiB");
  EXPECT_EQ(kvx::format_size(12), "12 B");
}

TEST(Config, ReadsTypedFieldsWithDefaults) {
  auto doc = kvx::config::parse(R"({"tcp": {"connections": 4, "slice": "1MiB", "nodelay": true, "name": "a"}})");
  ASSERT_TRUE(doc);
  kvx::config::view root(*doc);
  auto tcp = root.child("tcp");
  ASSERT_TRUE(tcp);
  EXPECT_EQ(*tcp->required<unsigned>("connections"), 4u);
  EXPECT_EQ(tcp->optional<kvx::config::bytes>("slice", {1})->value, 1_MiB);
  EXPECT_EQ(*tcp->optional<bool>("nodelay", false), true);
  EXPECT_EQ(*tcp->optional<int>("retries", 3), 3);
  EXPECT_EQ(*tcp->required<std::string>("name"), "a");
  EXPECT_TRUE(tcp->allow_only({"connections", "slice", "nodelay", "name"}));
}

TEST(Config, ErrorsNameTheBadField) {
  auto doc = kvx::config::parse(R"({"tcp": {"connections": "four", "port": -1, "slice": "1 lightyear", "typo": 1}})");
  kvx::config::view root(*doc);
  auto tcp = *root.child("tcp");
  auto n = tcp.required<unsigned>("connections");
  EXPECT_EQ(n.code(), kvx::errc::invalid_argument);
  EXPECT_NE(n.error().context().find("'tcp.connections'"), std::string::npos) << n.error().context();
  EXPECT_NE(tcp.required<std::uint16_t>("port").error().context().find("tcp.port"), std::string::npos);
  EXPECT_NE(tcp.required<kvx::config::bytes>("slice").error().context().find("tcp.slice"), std::string::npos);
  EXPECT_NE(tcp.required<int>("missing").error().context().find("'tcp.missing' is required"), std::string::npos);
  auto strict = tcp.allow_only({"connections", "port", "slice"});
  EXPECT_NE(strict.error().context().find("'tcp.typo'"), std::string::npos);
  EXPECT_EQ(root.child("nope").code(), kvx::errc::invalid_argument);
  EXPECT_EQ(kvx::config::parse("{not json").code(), kvx::errc::invalid_argument);
}

// A wrong value may come from a peer: it is named by type, never printed
// whole (printing nests as deep as the value and is as long as it).
TEST(Config, AWrongValueIsQuotedBoundedAndNestedOnesByTypeOnly) {
  const std::string deep = std::string(100'000, '[') + std::string(100'000, ']');
  const std::string long_text(100'000, 'x');
  auto doc = kvx::config::parse(R"({"deep": )" + deep + R"(, "long": ")" + long_text + R"(", "short": "four"})");
  ASSERT_TRUE(doc);
  kvx::config::view root(*doc);
  auto nested = root.required<std::string>("deep");
  ASSERT_FALSE(nested);
  EXPECT_EQ(nested.error().context(), "config field 'deep': expected a string, got array");
  auto long_value = root.required<unsigned>("long");
  ASSERT_FALSE(long_value);
  EXPECT_LT(long_value.error().context().size(), 200u);
  EXPECT_NE(long_value.error().context().find("got string \"xxx"), std::string::npos) << long_value.error().context();
  EXPECT_EQ(root.required<unsigned>("short").error().context(),
            "config field 'short': expected an unsigned integer, got string \"four\"");
}

TEST(Config, IntegerRangeIsChecked) {
  auto doc = kvx::config::parse(R"({"small": 70000, "neg": -5})");
  kvx::config::view root(*doc);
  EXPECT_FALSE(root.required<std::uint16_t>("small"));
  EXPECT_FALSE(root.required<unsigned>("neg"));
  EXPECT_EQ(*root.required<int>("neg"), -5);
}

}  // namespace

namespace {

// The published reference outputs of splitmix64 seeded with 0 (Vigna's C
// implementation): every user of kvx::splitmix64_next depends on these bits.
TEST(Splitmix64, MatchesTheReferenceSequenceAndIsConstexpr) {
  std::uint64_t state = 0;
  EXPECT_EQ(kvx::splitmix64_next(state), 0xe220a8397b1dcdafULL);
  EXPECT_EQ(kvx::splitmix64_next(state), 0x6e789e6aa1b965f4ULL);
  EXPECT_EQ(kvx::splitmix64_next(state), 0x06c45d188009454fULL);
  EXPECT_EQ(state, 3 * kvx::splitmix64_increment);
  static_assert([] {
    std::uint64_t s = 0;
    return kvx::splitmix64_next(s);
  }() == 0xe220a8397b1dcdafULL);
  EXPECT_EQ(kvx::splitmix64_mix(kvx::splitmix64_increment), 0xe220a8397b1dcdafULL);
}

}  // namespace
