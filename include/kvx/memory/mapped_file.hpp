#pragma once
//! \file
//! `mapped_file`: a file of fixed size mapped shared into memory, so a store
//! node can offer SSD capacity as a segment (`node_options::tier = "ssd"`)
//! that any transport moves bytes in and out of like DRAM: writes land in the
//! page cache and reach the file when the kernel writes them back (or at
//! `flush`), reads of cold pages come from the file.
//!
//! The file's blocks are reserved when it is created (`posix_fallocate`): a
//! full file system is an error here (`errc::capacity_exceeded` naming the
//! path), never a SIGBUS in the middle of a transfer. The file is created new
//! (an existing file is refused unless `replace`), and removed when the
//! mapping goes unless `keep`.
//!
//! \code
//! auto ssd = kvx::memory::mapped_file::create("/mnt/nvme/kvx-node-0.pool", 64ull << 30);   // result<mapped_file>
//! node.async_start(ssd->region(), token);   // a store_node with options.tier = "ssd"
//! \endcode
//!
//! The region is host memory (`location::host()`): the mapping is ordinary
//! addressable memory to every transport; "ssd" is the store's placement tier.

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <string>
#include <utility>

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <kvx/core/result.hpp>
#include <kvx/memory/memory_region.hpp>

namespace kvx::memory {

//! How `mapped_file::create` treats the file.
struct mapped_file_options {
  bool replace = false;  //!< truncate an existing file instead of refusing it
  bool keep = false;     //!< leave the file in place when the mapping goes
};

class mapped_file {
 public:
  using options = mapped_file_options;

  //! Creates `path` with `bytes` reserved and maps it. Errors name the path:
  //! `invalid_argument` (0 bytes), `already_exists`, `not_found` (no such
  //! directory), `capacity_exceeded` (the file system or the process's file
  //! size limit cannot hold it), `io_error` (anything else the kernel refuses).
  static result<mapped_file> create(const std::filesystem::path& path, std::size_t bytes, options opts = {}) {
    const std::string where = "mapped_file '" + path.string() + "'";
    if (bytes == 0) return error{errc::invalid_argument, where + ": size 0"};
    int flags = O_RDWR | O_CREAT | O_CLOEXEC | (opts.replace ? O_TRUNC : O_EXCL);
    const int fd = ::open(path.c_str(), flags, 0600);
    if (fd < 0) {
      const int e = errno;
      if (e == EEXIST) return error{errc::already_exists, where + ": the file exists (options.replace to reuse it)"};
      if (e == ENOENT) return error{errc::not_found, where + ": no such directory"};
      return error{errc::io_error, where + ": open: " + std::strerror(e)};
    }
    mapped_file f;
    f.fd_ = fd;
    f.path_ = path;
    f.size_ = bytes;
    f.keep_ = opts.keep;
    // Reserve every block now: a write fault into a hole on a full disk is a SIGBUS.
    if (const int e = ::posix_fallocate(fd, 0, static_cast<off_t>(bytes)); e != 0) {
      if (e == ENOSPC || e == EFBIG)
        return error{errc::capacity_exceeded, where + ": cannot reserve " + std::to_string(bytes) + " bytes: " + std::strerror(e)};
      if (e != EOPNOTSUPP && e != EINVAL) return error{errc::io_error, where + ": posix_fallocate: " + std::strerror(e)};
      // No fallocate on this file system: size it, and learn about a full disk when writing back.
      if (::ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
        const int t = errno;
        return error{t == EFBIG ? errc::capacity_exceeded : errc::io_error, where + ": ftruncate: " + std::strerror(t)};
      }
    }
    void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) return error{errc::io_error, where + ": mmap: " + std::strerror(errno)};
    f.data_ = p;
    return f;
  }

  mapped_file(mapped_file&& o) noexcept { *this = std::move(o); }
  mapped_file& operator=(mapped_file&& o) noexcept {
    if (this != &o) {
      release();
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
      fd_ = std::exchange(o.fd_, -1);
      path_ = std::exchange(o.path_, {});
      keep_ = o.keep_;
    }
    return *this;
  }
  mapped_file(const mapped_file&) = delete;
  mapped_file& operator=(const mapped_file&) = delete;
  ~mapped_file() { release(); }

  [[nodiscard]] memory_region region() const noexcept { return {data_, size_, location::host()}; }
  [[nodiscard]] const std::filesystem::path& path() const noexcept { return path_; }
  [[nodiscard]] std::size_t size() const noexcept { return size_; }

  //! Writes `[offset, offset + length)` back to the file and waits (msync).
  result<void> flush(std::size_t offset = 0, std::size_t length = SIZE_MAX) const {
    if (!data_) return error{errc::invalid_argument, "mapped_file: flush of a moved-from mapping"};
    if (offset > size_) return error{errc::out_of_range, "mapped_file '" + path_.string() + "': flush past the end"};
    length = std::min(length, size_ - offset);
    const std::size_t page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
    const std::size_t start = offset / page * page;
    if (::msync(static_cast<std::byte*>(data_) + start, length + (offset - start), MS_SYNC) != 0)
      return error{errc::io_error, "mapped_file '" + path_.string() + "': msync: " + std::strerror(errno)};
    return {};
  }

 private:
  mapped_file() = default;
  void release() noexcept {
    if (data_) ::munmap(data_, size_);
    if (fd_ >= 0) {
      ::close(fd_);
      if (!keep_) {
        std::error_code ignored;
        std::filesystem::remove(path_, ignored);
      }
    }
    data_ = nullptr;
    fd_ = -1;
  }

  void* data_ = nullptr;
  std::size_t size_ = 0;
  int fd_ = -1;
  std::filesystem::path path_;
  bool keep_ = false;
};

}  // namespace kvx::memory
