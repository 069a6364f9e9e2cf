#pragma once
//! \file
//! `kvx::cache::file_tier<Allocator>`: an SSD tier, one file carved by an
//! allocator policy, read and written with `pread`/`pwrite`.
//!
//! The file is opened with `O_DIRECT` when the file system allows it (ext4,
//! xfs) so cached blocks do not also fill the page cache and reads run at
//! device speed; where it does not (tmpfs, some overlay file systems) the
//! tier logs one warning and uses buffered I/O. Blocks start on 4 KiB
//! boundaries and occupy whole 4 KiB units; a caller buffer that is not 4 KiB
//! aligned or a block whose size is not a multiple of 4 KiB goes through an
//! aligned bounce buffer, so callers that want full speed pass aligned
//! buffers (the DRAM tier's arena is page-aligned).
//!
//! `config.path` names a file, created if missing and truncated to the
//! capacity, or a directory, in which an anonymous file is created and
//! unlinked at once (it disappears with the tier). The contents do not
//! survive the tier (the index is in memory). A named file is locked
//! (`flock`) for the tier's life: a second tier on it, in this process or
//! another, would overwrite its blocks, so its constructor throws ("in use by
//! another tier or process").
//!
//! `load_many` keeps `readers` preads in flight on as many threads (started
//! per call, the calling thread being one of them), and reports each block on
//! the calling thread as it lands; `kvx/cache/tiers/uring_file_tier.hpp`
//! keeps many reads in flight on one io_uring instead.
//!
//! Thread safety: as for every tier (`kvx/cache/tier.hpp`): the index sits
//! under a mutex, I/O runs outside it, concurrent calls on distinct keys
//! overlap. The constructor throws `std::system_error` when the file cannot
//! be opened or sized or is in use by another tier, and
//! `std::invalid_argument` for a bad config.
//!
//! \code
//! kvx::cache::file_tier<> ssd({.path = "/mnt/nvme/kvx", .capacity = 64ULL << 30});
//! ssd.store(key, bytes);
//! ssd.load(key, out);
//! \endcode

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include <kvx/cache/block_key.hpp>
#include <kvx/cache/tier.hpp>
#include <kvx/core/log.hpp>
#include <kvx/core/result.hpp>
#include <kvx/memory/allocator.hpp>
#include <kvx/memory/offset_allocator.hpp>

namespace kvx::cache {

struct file_tier_config {
  std::string path;            //!< a file, or a directory to create an anonymous file in
  std::uint64_t capacity = 0;  //!< bytes of file space
  std::string name = "file";   //!< metrics label
  watermarks marks{};
  bool direct = true;          //!< try O_DIRECT (falls back with a log line)
  unsigned readers = 4;        //!< preads `load_many` keeps in flight (threads; 1 = one block after another)
};

namespace detail {

inline constexpr std::uint64_t direct_align = 4096;

struct aligned_free {
  void operator()(std::byte* p) const noexcept { std::free(p); }
};
using aligned_buffer = std::unique_ptr<std::byte, aligned_free>;

inline aligned_buffer make_aligned(std::uint64_t n) {
  void* p = nullptr;
  if (::posix_memalign(&p, direct_align, n) != 0) return nullptr;
  return aligned_buffer(static_cast<std::byte*>(p));
}

inline bool is_direct_friendly(const void* p, std::uint64_t n) noexcept {
  return reinterpret_cast<std::uintptr_t>(p) % direct_align == 0 && n % direct_align == 0;
}

//! A file opened for a tier, with O_DIRECT if the file system takes it.
struct tier_file {
  int fd = -1;
  bool direct = false;

  tier_file(const file_tier_config& cfg) {
    struct stat st {};
    const bool is_dir = ::stat(cfg.path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
    auto open_it = [&](int extra) -> int {
      if (is_dir) {
        std::string templ = cfg.path + "/kvx-tier-XXXXXX";
        int f = ::mkostemp(templ.data(), O_CLOEXEC | extra);
        if (f >= 0) ::unlink(templ.c_str());
        return f;
      }
      return ::open(cfg.path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | extra, 0600);
    };
    if (cfg.direct) {
      fd = open_it(O_DIRECT);
      if (fd >= 0) {
        direct = true;
      } else if (errno == EINVAL) {
        kvx::log(log_level::warn, "file tier '", cfg.name, "': the file system of ", cfg.path,
                 " does not support O_DIRECT; using buffered I/O");
      } else {
        throw std::system_error(errno, std::generic_category(), "kvx: file tier '" + cfg.name + "': open " + cfg.path);
      }
    }
    if (fd < 0) fd = open_it(0);
    if (fd < 0) throw std::system_error(errno, std::generic_category(), "kvx: file tier '" + cfg.name + "': open " + cfg.path);
    // Before the truncate, which would already damage the holder's blocks.
    // flock belongs to the open file description, so it also tells two tiers
    // of one process apart.
    if (!is_dir && ::flock(fd, LOCK_EX | LOCK_NB) != 0) {
      const int e = errno;
      if (e == EWOULDBLOCK) {
        ::close(fd);
        throw std::system_error(e, std::generic_category(),
                                "kvx: file tier '" + cfg.name + "': " + cfg.path + " is in use by another tier or process");
      }
      kvx::log(log_level::warn, "file tier '", cfg.name, "': cannot lock ", cfg.path, " (", std::strerror(e),
               "); another tier on the same file would not be detected");
    }
    if (::ftruncate(fd, static_cast<off_t>(cfg.capacity)) != 0) {
      const int e = errno;
      ::close(fd);
      throw std::system_error(e, std::generic_category(),
                              "kvx: file tier '" + cfg.name + "': size " + cfg.path + " to " + std::to_string(cfg.capacity));
    }
  }
  tier_file(const tier_file&) = delete;
  tier_file& operator=(const tier_file&) = delete;
  ~tier_file() {
    if (fd >= 0) ::close(fd);
  }
};

//! Full-length positional I/O: retries short transfers and EINTR.
template <bool Write>
inline std::error_code positional_io(int fd, std::byte* p, std::uint64_t n, std::uint64_t off) {
  while (n > 0) {
    const ssize_t r = Write ? ::pwrite(fd, p, n, static_cast<off_t>(off)) : ::pread(fd, p, n, static_cast<off_t>(off));
    if (r < 0) {
      if (errno == EINTR) continue;
      return {errno, std::generic_category()};
    }
    if (r == 0) return make_error_code(errc::io_error);  // reading past the end: the file was truncated
    p += r;
    off += static_cast<std::uint64_t>(r);
    n -= static_cast<std::uint64_t>(r);
  }
  return {};
}

}  // namespace detail

template <class Allocator = memory::offset_allocator>
class file_tier {
  static_assert(memory::check_allocator<Allocator>());

 public:
  using tier_concept = tier_tag;
  static constexpr bool host_accessible = false;

  explicit file_tier(file_tier_config cfg) : cfg_(validated(std::move(cfg))), file_(cfg_), alloc_(make_alloc(cfg_.capacity)) {}
  file_tier(const file_tier&) = delete;
  file_tier& operator=(const file_tier&) = delete;

  [[nodiscard]] std::string_view name() const noexcept { return cfg_.name; }
  [[nodiscard]] std::uint64_t capacity() const noexcept { return alloc_.capacity(); }
  [[nodiscard]] std::uint64_t used_bytes() const {
    std::lock_guard lock(mu_);
    return alloc_.capacity() - alloc_.free_bytes();
  }
  [[nodiscard]] watermarks marks() const noexcept { return cfg_.marks; }
  //! Bytes a block of `n` bytes occupies in the file (whole 4 KiB units).
  [[nodiscard]] std::uint64_t footprint(std::uint64_t n) const noexcept {
    const std::uint64_t units = memory::detail::align_up(n, detail::direct_align);
    if constexpr (requires { alloc_.granted_size(units); })
      return alloc_.granted_size(units);
    else
      return units;
  }
  //! Whether the file was opened with O_DIRECT.
  [[nodiscard]] bool direct() const noexcept { return file_.direct; }
  [[nodiscard]] int native_handle() const noexcept { return file_.fd; }

  result<void> store(const block_key& k, std::span<const std::byte> in) {
    if (in.empty()) return error{errc::invalid_argument, "file tier '" + cfg_.name + "': store of an empty block " + k.to_string()};
    const std::uint64_t span_bytes = memory::detail::align_up(in.size(), detail::direct_align);
    memory::allocation a;
    {
      std::lock_guard lock(mu_);
      if (index_.contains(k)) return error{errc::already_exists, "file tier '" + cfg_.name + "': block " + k.to_string()};
      auto got = alloc_.allocate(span_bytes, detail::direct_align);
      if (!got)
        return error{errc::capacity_exceeded, "file tier '" + cfg_.name + "': no free range of " +
                                                  std::to_string(span_bytes) + " bytes for block " + k.to_string()};
      a = *got;
    }
    std::error_code ec;
    if (!file_.direct || detail::is_direct_friendly(in.data(), in.size())) {
      ec = detail::positional_io<true>(file_.fd, const_cast<std::byte*>(in.data()), in.size(), a.offset);
    } else {
      auto bounce = detail::make_aligned(span_bytes);
      if (!bounce) {
        ec = make_error_code(errc::capacity_exceeded);
      } else {
        std::memcpy(bounce.get(), in.data(), in.size());
        std::memset(bounce.get() + in.size(), 0, span_bytes - in.size());
        ec = detail::positional_io<true>(file_.fd, bounce.get(), span_bytes, a.offset);
      }
    }
    std::lock_guard lock(mu_);
    if (ec) {
      alloc_.deallocate(a);
      return error{ec, "file tier '" + cfg_.name + "': write block " + k.to_string() + " at offset " + std::to_string(a.offset)};
    }
    if (!index_.try_emplace(k, slot{a, in.size()}).second) {
      alloc_.deallocate(a);
      return error{errc::already_exists, "file tier '" + cfg_.name + "': block " + k.to_string()};
    }
    return {};
  }

  result<std::size_t> load(const block_key& k, std::span<std::byte> out) const {
    auto s = find(k);
    if (!s) return error{errc::not_found, "file tier '" + cfg_.name + "': block " + k.to_string()};
    if (auto ec = read_slot(*s, out)) return error{ec, "file tier '" + cfg_.name + "': read block " + k.to_string() + " at offset " + std::to_string(s->where.offset)};
    return static_cast<std::size_t>(s->size);
  }

  //! `on_block(i, ec)` for each key as it lands, on the calling thread, in
  //! completion order; up to `readers` preads in flight (the calling thread
  //! reads too, and delivers between its reads).
  template <class OnBlock>
  void load_many(std::span<const block_key> keys, std::span<const std::span<std::byte>> outs, OnBlock&& on_block) const {
    auto read_one = [&](std::size_t i) -> std::error_code {
      if (i >= outs.size()) return make_error_code(errc::out_of_range);
      auto r = load(keys[i], outs[i]);
      return r ? std::error_code{} : r.code();
    };
    const std::size_t helpers = std::min<std::size_t>(cfg_.readers > 0 ? cfg_.readers - 1 : 0, keys.size() / 2);
    if (helpers == 0) {
      for (std::size_t i = 0; i < keys.size(); ++i) on_block(i, read_one(i));
      return;
    }
    std::mutex m;
    std::condition_variable cv;
    std::vector<std::pair<std::size_t, std::error_code>> landed;  // read by helpers, not yet reported
    std::atomic<std::size_t> next{0};
    auto help = [&] {
      for (std::size_t i; (i = next.fetch_add(1)) < keys.size();) {
        const std::error_code ec = read_one(i);
        std::lock_guard lock(m);
        landed.emplace_back(i, ec);
        cv.notify_one();
      }
    };
    std::vector<std::jthread> pool;  // joined before the state above goes, even if on_block throws
    pool.reserve(helpers);
    for (std::size_t h = 0; h < helpers; ++h) pool.emplace_back(help);
    std::vector<std::pair<std::size_t, std::error_code>> batch;
    for (std::size_t reported = 0; reported < keys.size();) {
      {
        std::unique_lock lock(m);
        // Read a block of our own only when none is waiting to be reported.
        if (landed.empty() && next.load() < keys.size()) {
          lock.unlock();
          if (const std::size_t i = next.fetch_add(1); i < keys.size()) {
            on_block(i, read_one(i));
            ++reported;
          }
          continue;
        }
        cv.wait(lock, [&] { return !landed.empty(); });
        batch.swap(landed);
      }
      for (const auto& [i, ec] : batch) on_block(i, ec);
      reported += batch.size();
      batch.clear();
    }
  }

  bool erase(const block_key& k) {
    std::lock_guard lock(mu_);
    auto it = index_.find(k);
    if (it == index_.end()) return false;
    alloc_.deallocate(it->second.where);
    index_.erase(it);
    return true;
  }
  [[nodiscard]] bool contains(const block_key& k) const {
    std::lock_guard lock(mu_);
    return index_.contains(k);
  }
  [[nodiscard]] std::optional<std::uint64_t> size_of(const block_key& k) const {
    auto s = find(k);
    return s ? std::optional<std::uint64_t>(s->size) : std::nullopt;
  }
  //! Where block `k` sits in the file: `offset` and its stored `size`.
  [[nodiscard]] std::optional<memory::allocation> locate(const block_key& k) const {
    auto s = find(k);
    return s ? std::optional<memory::allocation>(memory::allocation{s->where.offset, s->size}) : std::nullopt;
  }
  [[nodiscard]] std::size_t blocks() const {
    std::lock_guard lock(mu_);
    return index_.size();
  }

 protected:
  struct slot {
    memory::allocation where;  // 4 KiB-aligned range in the file
    std::uint64_t size = 0;    // the block's bytes
  };

  std::optional<slot> find(const block_key& k) const {
    std::lock_guard lock(mu_);
    auto it = index_.find(k);
    if (it == index_.end()) return std::nullopt;
    return it->second;
  }

  std::error_code read_slot(const slot& s, std::span<std::byte> out) const {
    if (out.size() < s.size) return make_error_code(errc::out_of_range);
    if (!file_.direct || detail::is_direct_friendly(out.data(), s.size))
      return detail::positional_io<false>(file_.fd, out.data(), s.size, s.where.offset);
    auto bounce = detail::make_aligned(s.where.size);
    if (!bounce) return make_error_code(errc::capacity_exceeded);
    if (auto ec = detail::positional_io<false>(file_.fd, bounce.get(), s.where.size, s.where.offset)) return ec;
    std::memcpy(out.data(), bounce.get(), s.size);
    return {};
  }

  const file_tier_config& config() const noexcept { return cfg_; }
  const detail::tier_file& file() const noexcept { return file_; }

 private:
  static file_tier_config validated(file_tier_config cfg) {
    if (cfg.path.empty()) throw std::invalid_argument("kvx: file tier '" + cfg.name + "': path is empty");
    if (cfg.capacity < detail::direct_align)
      throw std::invalid_argument("kvx: file tier '" + cfg.name + "': capacity " + std::to_string(cfg.capacity) +
                                  " is below 4096 bytes");
    if (auto ok = validate(cfg.marks, "file tier '" + cfg.name + "' watermarks"); !ok)
      throw std::invalid_argument("kvx: " + ok.error().message());
    return cfg;
  }
  static Allocator make_alloc(std::uint64_t capacity) {
    if constexpr (std::is_constructible_v<Allocator, std::uint64_t, std::uint64_t>)
      return Allocator(capacity, detail::direct_align);
    else
      return Allocator(capacity);
  }

  file_tier_config cfg_;
  detail::tier_file file_;
  mutable std::mutex mu_;
  Allocator alloc_;
  std::unordered_map<block_key, slot, block_key_hash> index_;
};

}  // namespace kvx::cache
