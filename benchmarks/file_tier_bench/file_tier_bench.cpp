// file_tier_bench: how fast a hit in the file tier is, against what the file
// system gives a plain O_DIRECT sequential reader of the same file in the
// same run.
//
//   file_tier_bench [--dir D] [--block-size 1MiB] [--blocks 256] [--depth 32] [--readers 4] [--repeat 3]
//                   [--json out.json]
//
// Prints, for each reader, GiB/s (best of --repeat) and its ratio to the
// reference; for the pipelined load also the time to the first and to the
// last block. With io_uring, also a one-tier `tiered_cache` over the
// io_uring tier read with `read_many` (pins, per-block callbacks): the
// cache's own batch load.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <kvx/cache/tiers/file_tier.hpp>
#include <kvx/core/bytes.hpp>
#include <kvx/features.hpp>
#if KVX_WITH_URING
#include <kvx/cache/tiered_cache.hpp>
#include <kvx/cache/tiers/uring_file_tier.hpp>
#endif

namespace kc = kvx::cache;
using clk = std::chrono::steady_clock;

namespace {

struct options {
  std::string dir = ".";
  std::uint64_t block = 1 << 20;
  std::uint64_t blocks = 256;
  unsigned depth = 32;
  unsigned readers = 4;
  int repeat = 3;
  std::string json;
};

[[noreturn]] void usage(const char* why) {
  std::fprintf(stderr,
               "file_tier_bench: %s\nusage: file_tier_bench [--dir D] [--block-size 1MiB] [--blocks N] [--depth N] "
               "[--readers N] [--repeat N] [--json FILE]\n",
               why);
  std::exit(2);
}

options parse(int argc, char** argv) {
  options o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto val = [&]() -> std::string {
      if (i + 1 >= argc) usage(("missing value after " + a).c_str());
      return argv[++i];
    };
    auto num = [&](const std::string& v) {
      auto r = kvx::parse_size(v);
      if (!r) usage(r.error().message().c_str());
      return *r;
    };
    if (a == "--dir") o.dir = val();
    else if (a == "--block-size") o.block = num(val());
    else if (a == "--blocks") o.blocks = num(val());
    else if (a == "--depth") o.depth = static_cast<unsigned>(num(val()));
    else if (a == "--readers") o.readers = static_cast<unsigned>(num(val()));
    else if (a == "--repeat") o.repeat = static_cast<int>(num(val()));
    else if (a == "--json") o.json = val();
    else usage(("unknown argument " + a).c_str());
  }
  if (o.block == 0 || o.block % 4096 != 0) usage("--block-size must be a positive multiple of 4096");
  if (o.blocks == 0 || o.depth == 0 || o.repeat <= 0) usage("--blocks, --depth and --repeat must be positive");
  return o;
}

double secs(clk::duration d) { return std::chrono::duration<double>(d).count(); }

struct aligned {
  explicit aligned(std::uint64_t n) : p(static_cast<std::byte*>(std::aligned_alloc(4096, n))), n(n) {
    std::memset(p, 0, n);  // fault the pages in before timing
  }
  ~aligned() { std::free(p); }
  std::byte* p;
  std::uint64_t n;
};

// The reference: one O_DIRECT fd, one pread after another, block-size chunks.
double reference_read(const std::string& path, std::uint64_t total, std::uint64_t chunk, aligned& buf) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_DIRECT);
  if (fd < 0) {
    std::perror("file_tier_bench: open O_DIRECT for the reference reader");
    std::exit(1);
  }
  const auto t0 = clk::now();
  for (std::uint64_t off = 0; off < total; off += chunk) {
    const ssize_t r = ::pread(fd, buf.p, chunk, static_cast<off_t>(off));
    if (r != static_cast<ssize_t>(chunk)) {
      std::perror("file_tier_bench: reference pread");
      std::exit(1);
    }
  }
  const double s = secs(clk::now() - t0);
  ::close(fd);
  return static_cast<double>(total) / s;
}

struct pipelined {
  double bw = 0, first = 0, last = 0;
};

// Times `load(on_block)`, a batch load into `outs` that calls
// `on_block(i, ec)` as each block lands.
template <class Load>
pipelined timed_load(Load&& load, std::vector<std::span<std::byte>>& outs) {
  pipelined p;
  const auto t0 = clk::now();
  bool first = true;
  std::size_t ok = 0;
  load([&](std::size_t, std::error_code ec) {
                  if (ec) {
                    std::fprintf(stderr, "file_tier_bench: load failed: %s\n", ec.message().c_str());
                    std::exit(1);
                  }
    if (first) p.first = secs(clk::now() - t0);
    first = false;
    ++ok;
  });
  p.last = secs(clk::now() - t0);
  std::uint64_t bytes = 0;
  for (auto& o : outs) bytes += o.size();
  p.bw = static_cast<double>(bytes) / p.last;
  return p;
}

template <class Tier>
pipelined load_all(Tier& t, const std::vector<kc::block_key>& keys, std::vector<std::span<std::byte>>& outs) {
  return timed_load(
      [&](auto&& on_block) {
        kc::load_many(t, std::span<const kc::block_key>(keys), std::span<const std::span<std::byte>>(outs), on_block);
      },
      outs);
}

}  // namespace

int main(int argc, char** argv) {
  const options o = parse(argc, argv);
  const std::string path = (std::filesystem::path(o.dir) / "kvx-file-tier-bench.bin").string();
  const std::uint64_t total = o.block * o.blocks;
  kc::file_tier_config cfg;
  cfg.path = path;
  cfg.capacity = total;
  cfg.name = "bench";
  cfg.readers = o.readers;

#if KVX_WITH_URING
  const bool uring_ok = !kc::uring_file_tier<>::probe();
#else
  const bool uring_ok = false;
#endif
  kc::file_tier<> tier(cfg);
  if (!tier.direct()) {
    std::fprintf(stderr, "file_tier_bench: %s does not take O_DIRECT; the comparison needs it\n", o.dir.c_str());
    return 1;
  }
  aligned src(o.block);
  std::vector<kc::block_key> keys;
  for (std::uint64_t i = 0; i < o.blocks; ++i) {
    for (std::uint64_t b = 0; b < o.block; b += 8) std::memcpy(src.p + b, &i, sizeof i);
    keys.push_back({0xBE, i});
    if (auto r = tier.store(keys.back(), std::span<const std::byte>(src.p, o.block)); !r) {
      std::fprintf(stderr, "file_tier_bench: store: %s\n", r.error().message().c_str());
      return 1;
    }
  }
  ::fsync(tier.native_handle());

  aligned ref_buf(o.block);
  std::vector<std::unique_ptr<aligned>> bufs;
  std::vector<std::span<std::byte>> outs;
  for (std::uint64_t i = 0; i < o.blocks; ++i) {
    bufs.push_back(std::make_unique<aligned>(o.block));
    outs.emplace_back(bufs.back()->p, o.block);
  }

  double ref = 0;
  pipelined one{}, seq{}, ring{}, cached{};
  for (int r = 0; r < o.repeat; ++r) {
    ref = std::max(ref, reference_read(path, total, o.block, ref_buf));
    auto s = load_all(tier, keys, outs);  // `readers` preads in flight
    if (s.bw > seq.bw) seq = s;
    auto s1 = timed_load(  // one pread after another
        [&](auto&& on_block) {
          for (std::size_t i = 0; i < keys.size(); ++i) {
            auto r = tier.load(keys[i], outs[i]);
            on_block(i, r ? std::error_code{} : r.code());
          }
        },
        outs);
    if (s1.bw > one.bw) one = s1;
  }
  // Check the bytes: block i holds i in every 8-byte word.
  for (std::uint64_t i = 0; i < o.blocks; i += std::max<std::uint64_t>(1, o.blocks / 16)) {
    std::uint64_t v = 0;
    std::memcpy(&v, outs[i].data() + o.block - 8, 8);
    if (v != i) {
      std::fprintf(stderr, "file_tier_bench: block %llu read back wrong\n", static_cast<unsigned long long>(i));
      return 1;
    }
  }

#if KVX_WITH_URING
  if (uring_ok) {
    // A second tier object over the same named file would truncate it: the
    // uring tier stores its own copy in another file of the same directory.
    kc::file_tier_config ucfg = cfg;
    ucfg.path = (std::filesystem::path(o.dir) / "kvx-file-tier-bench-uring.bin").string();
    kc::uring_file_tier<> utier(ucfg, o.depth);
    for (std::uint64_t i = 0; i < o.blocks; ++i) {
      for (std::uint64_t b = 0; b < o.block; b += 8) std::memcpy(src.p + b, &i, sizeof i);
      if (auto r = utier.store(keys[i], std::span<const std::byte>(src.p, o.block)); !r) return 1;
    }
    ::fsync(utier.native_handle());
    for (int r = 0; r < o.repeat; ++r) {
      auto s = load_all(utier, keys, outs);
      if (s.bw > ring.bw) ring = s;
      ref = std::max(ref, reference_read(path, total, o.block, ref_buf));
    }
    std::filesystem::remove(ucfg.path);

    // The same reads through a cache over the io_uring tier: read_many.
    kc::file_tier_config ccfg = ucfg;
    ccfg.path = (std::filesystem::path(o.dir) / "kvx-file-tier-bench-cache.bin").string();
    ccfg.marks = {1.0, 1.0};
    kvx::metrics::registry reg;
    kc::tiered_cache<kc::tier_stack<kc::uring_file_tier<>>> cache({.block_bytes = o.block, .name = "bench", .registry = &reg},
                                                                 ccfg);
    for (std::uint64_t i = 0; i < o.blocks; ++i) {
      for (std::uint64_t b = 0; b < o.block; b += 8) std::memcpy(src.p + b, &i, sizeof i);
      if (auto r = cache.insert(keys[i], std::span<const std::byte>(src.p, o.block)); !r) return 1;
    }
    ::fsync(cache.tiers().get<0>().native_handle());
    for (int r = 0; r < o.repeat; ++r) {
      auto s = timed_load(
          [&](auto&& on_block) {
            cache.read_many(std::span<const kc::block_key>(keys), std::span<const std::span<std::byte>>(outs), on_block);
          },
          outs);
      if (s.bw > cached.bw) cached = s;
      ref = std::max(ref, reference_read(path, total, o.block, ref_buf));
    }
    std::filesystem::remove(ccfg.path);
  }
#endif
  std::filesystem::remove(path);

  const double gib = 1024.0 * 1024 * 1024;
  std::printf("file_tier_bench: %llu blocks of %s in %s (O_DIRECT), best of %d\n",
              static_cast<unsigned long long>(o.blocks), kvx::format_size(o.block).c_str(), o.dir.c_str(), o.repeat);
  std::printf("  %-36s %8.2f GiB/s  (reference)\n", "plain O_DIRECT sequential pread", ref / gib);
  std::printf("  %-36s %8.2f GiB/s  %5.1f%% of reference; first block %.3f ms, last %.3f ms\n",
              "file_tier load, one after another", one.bw / gib, 100 * one.bw / ref, one.first * 1e3, one.last * 1e3);
  std::printf("  %-36s %8.2f GiB/s  %5.1f%% of reference; first block %.3f ms, last %.3f ms (%u readers)\n",
              "file_tier load_many (pread)", seq.bw / gib, 100 * seq.bw / ref, seq.first * 1e3, seq.last * 1e3,
              o.readers);
  if (uring_ok)
    std::printf("  %-36s %8.2f GiB/s  %5.1f%% of reference; first block %.3f ms, last %.3f ms (depth %u)\n",
                "uring_file_tier load_many", ring.bw / gib, 100 * ring.bw / ref, ring.first * 1e3, ring.last * 1e3,
                o.depth);
  if (uring_ok)
    std::printf("  %-36s %8.2f GiB/s  %5.1f%% of reference; first block %.3f ms, last %.3f ms (depth %u)\n",
                "tiered_cache read_many (io_uring)", cached.bw / gib, 100 * cached.bw / ref, cached.first * 1e3,
                cached.last * 1e3, o.depth);
  else
    std::printf("  uring_file_tier: not measured (kvx::uring missing or io_uring unavailable)\n");
  if (!o.json.empty()) {
    std::ofstream j(o.json);
    j << "{\"block_bytes\":" << o.block << ",\"blocks\":" << o.blocks << ",\"depth\":" << o.depth
      << ",\"reference_bytes_per_s\":" << ref << ",\"readers\":" << o.readers << ",\"pread_one\":{\"bytes_per_s\":" << one.bw
      << ",\"ratio\":" << one.bw / ref << ",\"first_s\":" << one.first << ",\"last_s\":" << one.last << "}"
      << ",\"pread\":{\"bytes_per_s\":" << seq.bw
      << ",\"ratio\":" << seq.bw / ref << ",\"first_s\":" << seq.first << ",\"last_s\":" << seq.last << "}";
    if (uring_ok)
      j << ",\"uring\":{\"bytes_per_s\":" << ring.bw << ",\"ratio\":" << ring.bw / ref << ",\"first_s\":" << ring.first
        << ",\"last_s\":" << ring.last << "},\"cache_read_many\":{\"bytes_per_s\":" << cached.bw
        << ",\"ratio\":" << cached.bw / ref << ",\"first_s\":" << cached.first << ",\"last_s\":" << cached.last << "}";
    j << "}\n";
  }
  return 0;
}
