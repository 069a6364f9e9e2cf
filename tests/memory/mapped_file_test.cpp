#include <kvx/memory/mapped_file.hpp>

#include <gtest/gtest.h>

#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <vector>

#include <sys/resource.h>

namespace fs = std::filesystem;
using kvx::memory::mapped_file;

namespace {

struct MappedFile : ::testing::Test {
  fs::path dir;
  void SetUp() override {
    char tmpl[] = "/tmp/kvx-mapped-file-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir = tmpl;
  }
  void TearDown() override { fs::remove_all(dir); }
};

std::vector<char> read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

}  // namespace

TEST_F(MappedFile, WritesThroughTheMappingReachTheFile) {
  const auto path = dir / "pool";
  auto f = mapped_file::create(path, 1 << 20);
  ASSERT_TRUE(f.has_value()) << f.error().message();
  EXPECT_EQ(f->size(), 1u << 20);
  EXPECT_EQ(fs::file_size(path), 1u << 20);
  auto r = f->region();
  ASSERT_EQ(r.length, 1u << 20);
  EXPECT_EQ(r.where, kvx::memory::location::host());
  for (std::size_t i = 0; i < r.length; i += 4096) r.data()[i + 7] = std::byte(i / 4096 + 1);
  ASSERT_TRUE(f->flush(4096 * 3 + 5, 10).has_value());  // an unaligned range flushes its pages
  ASSERT_TRUE(f->flush().has_value());
  const auto bytes = read_file(path);
  ASSERT_EQ(bytes.size(), 1u << 20);
  for (std::size_t i = 0; i < bytes.size(); i += 4096) ASSERT_EQ(static_cast<unsigned char>(bytes[i + 7]), (i / 4096 + 1) & 0xff) << i;
  EXPECT_EQ(f->flush(2 << 20, 1).code(), kvx::errc::out_of_range);
}

TEST_F(MappedFile, TheFileGoesWithTheMappingUnlessKept) {
  const auto a = dir / "a", b = dir / "b";
  {
    auto f = mapped_file::create(a, 8192);
    ASSERT_TRUE(f.has_value());
    auto moved = std::move(*f);  // ownership moves; the moved-from mapping removes nothing
    EXPECT_TRUE(fs::exists(a));
    EXPECT_EQ(moved.path(), a);
  }
  EXPECT_FALSE(fs::exists(a));
  {
    mapped_file::options o;
    o.keep = true;
    auto f = mapped_file::create(b, 8192, o);
    ASSERT_TRUE(f.has_value());
  }
  EXPECT_TRUE(fs::exists(b));
}

TEST_F(MappedFile, AnExistingFileIsRefusedUnlessReplaced) {
  const auto path = dir / "taken";
  { std::ofstream(path) << "somebody's data"; }
  auto f = mapped_file::create(path, 4096);
  ASSERT_FALSE(f.has_value());
  EXPECT_EQ(f.code(), kvx::errc::already_exists);
  EXPECT_NE(f.error().message().find(path.string()), std::string::npos);
  EXPECT_EQ(read_file(path).size(), 15u) << "the refused create touched the file";
  mapped_file::options o;
  o.replace = true;
  auto g = mapped_file::create(path, 4096, o);
  ASSERT_TRUE(g.has_value()) << g.error().message();
  EXPECT_EQ(fs::file_size(path), 4096u);
  EXPECT_EQ(g->region().data()[0], std::byte{0}) << "replaced file keeps old bytes";
}

TEST_F(MappedFile, BadArgumentsAreNamedErrors) {
  auto zero = mapped_file::create(dir / "zero", 0);
  EXPECT_EQ(zero.code(), kvx::errc::invalid_argument);
  EXPECT_FALSE(fs::exists(dir / "zero"));
  auto nodir = mapped_file::create(dir / "missing" / "pool", 4096);
  EXPECT_EQ(nodir.code(), kvx::errc::not_found);
  EXPECT_NE(nodir.error().message().find("missing/pool"), std::string::npos);
}

TEST_F(MappedFile, MoreThanTheFileSystemGrantsIsCapacityExceededNotSigbus) {
  // The process's file size limit stands in for a full disk: the kernel
  // refuses the reservation (EFBIG) exactly as it would with ENOSPC.
  rlimit old{};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &old), 0);
  auto previous = std::signal(SIGXFSZ, SIG_IGN);
  rlimit small = old;
  small.rlim_cur = 64 * 1024;
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &small), 0);
  auto f = mapped_file::create(dir / "big", 1 << 20);
  ::setrlimit(RLIMIT_FSIZE, &old);
  std::signal(SIGXFSZ, previous);
  ASSERT_FALSE(f.has_value());
  EXPECT_EQ(f.code(), kvx::errc::capacity_exceeded) << f.error().message();
  EXPECT_FALSE(fs::exists(dir / "big")) << "a failed create leaves its file behind";
}
