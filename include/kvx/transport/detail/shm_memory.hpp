#pragma once
// Memory plumbing of the shm transport: the process-wide registry of
// memfd-backed blocks (so register_memory can tell whether a region can be
// handed to a peer as an fd), the revocation block shared with peers, the
// initiator's view of one remote segment, and the process_vm copy fallback.

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <system_error>

#include <kvx/core/error.hpp>
#include <kvx/core/log.hpp>
#include <kvx/transport/detail/shm_channel.hpp>

namespace kvx::transport::detail {

inline std::size_t page_size() noexcept {
  static const std::size_t size = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
  return size;
}

// Blocks made by shm_allocate, by address. Looked up only at registration.
class memfd_registry {
 public:
  static memfd_registry& instance() {
    static memfd_registry r;
    return r;
  }
  void add(const std::byte* base, std::size_t size, int fd) {
    std::lock_guard lock(mutex_);
    blocks_[reinterpret_cast<std::uintptr_t>(base)] = block{size, fd};
  }
  void remove(const std::byte* base) {
    std::lock_guard lock(mutex_);
    blocks_.erase(reinterpret_cast<std::uintptr_t>(base));
  }
  //! A duplicate of the memfd holding [p, p + len) and p's offset in it.
  std::optional<std::pair<unique_fd, std::uint64_t>> find(const void* p, std::size_t len) const {
    const auto q = reinterpret_cast<std::uintptr_t>(p);
    std::lock_guard lock(mutex_);
    auto it = blocks_.upper_bound(q);
    if (it == blocks_.begin()) return std::nullopt;
    --it;
    const auto off = q - it->first;
    if (off > it->second.size || len > it->second.size - off) return std::nullopt;
    unique_fd fd(::fcntl(it->second.fd, F_DUPFD_CLOEXEC, 0));
    if (!fd) return std::nullopt;
    return std::pair{std::move(fd), static_cast<std::uint64_t>(off)};
  }

 private:
  struct block {
    std::size_t size;
    int fd;
  };
  mutable std::mutex mutex_;
  std::map<std::uintptr_t, block> blocks_;
};

// One page shared between the owner and every peer that mapped a segment.
// Dekker-style handshake (both sides store, then load, seq_cst): a peer
// raises in_flight and then checks revoked; the owner sets revoked and then
// waits for in_flight to drain. Either the peer sees the revocation, or the
// owner sees the copy and waits for it; never neither.
struct shm_control_block {
  static constexpr std::uint64_t magic_value = 0x6b76782d73686d31;  // "kvx-shm1"
  std::uint64_t magic;
  std::atomic<std::uint32_t> revoked;
  alignas(64) std::atomic<std::uint64_t> in_flight;
};
static_assert(std::atomic<std::uint64_t>::is_always_lock_free && std::atomic<std::uint32_t>::is_always_lock_free,
              "kvx: the shm transport needs lock-free atomics in shared memory");

// A memfd page holding a control block, mapped here.
class control_page {
 public:
  control_page() = default;
  control_page(control_page&& o) noexcept : fd_(std::move(o.fd_)), block_(std::exchange(o.block_, nullptr)) {}
  control_page& operator=(control_page&& o) noexcept {
    unmap();
    fd_ = std::move(o.fd_);
    block_ = std::exchange(o.block_, nullptr);
    return *this;
  }
  ~control_page() { unmap(); }

  static result<control_page> create() {
    control_page p;
    p.fd_.reset(::memfd_create("kvx-shm-control", MFD_CLOEXEC));
    if (!p.fd_) return error{errc::io_error, "shm: memfd_create(control): " + errno_text(errno)};
    if (::ftruncate(p.fd_.get(), static_cast<off_t>(page_size())) != 0)
      return error{errc::io_error, "shm: ftruncate(control): " + errno_text(errno)};
    KVX_TRY(p.map());
    p.block_->magic = shm_control_block::magic_value;
    return p;
  }
  static result<control_page> adopt(unique_fd fd) {
    control_page p;
    p.fd_ = std::move(fd);
    KVX_TRY(p.map());
    if (p.block_->magic != shm_control_block::magic_value)
      return error{errc::protocol_error, "shm: the owner sent a control page without kvx's magic"};
    p.fd_.reset();  // the mapping keeps the memory alive
    return p;
  }

  [[nodiscard]] int fd() const noexcept { return fd_.get(); }
  [[nodiscard]] shm_control_block& block() const noexcept { return *block_; }

 private:
  result<void> map() {
    struct stat st {};
    if (::fstat(fd_.get(), &st) != 0 || static_cast<std::size_t>(st.st_size) < page_size())
      return error{errc::protocol_error, "shm: control page has the wrong size"};
    void* p = ::mmap(nullptr, page_size(), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd_.get(), 0);
    if (p == MAP_FAILED) return error{errc::io_error, "shm: mmap(control): " + errno_text(errno)};
    block_ = static_cast<shm_control_block*>(p);
    return {};
  }
  void unmap() noexcept {
    if (block_) ::munmap(block_, page_size());
    block_ = nullptr;
  }
  unique_fd fd_;
  shm_control_block* block_ = nullptr;
};

// The initiator's handle on one remote segment (name, key, generation).
struct shm_mapping {
  std::string name;
  std::uint64_t key = 0;
  std::uint64_t generation = 0;
  std::uint64_t length = 0;  // as the owner reports it, not as the descriptor claims
  bool memfd = false;
  std::byte* base = nullptr;  // memfd: where offset 0 of the segment is mapped here
  void* map_address = nullptr;
  std::size_t map_length = 0;
  pid_t pid = 0;                    // process_vm: the owner's pid
  std::uintptr_t remote_address = 0;  // process_vm: the segment's address in the owner
  control_page control;

  shm_mapping() = default;
  shm_mapping(const shm_mapping&) = delete;
  shm_mapping& operator=(const shm_mapping&) = delete;
  ~shm_mapping() {
    if (map_address) ::munmap(map_address, map_length);
  }

  //! Maps `length` bytes at `offset` of `fd`, pre-faulting the page tables.
  result<void> map_memfd(int fd, std::uint64_t offset) {
    // The owner says where the segment lies in its file; a range past the
    // file's end would map (and fault with SIGBUS on the first copy).
    struct stat st {};
    if (::fstat(fd, &st) != 0) return error{errc::io_error, "shm: fstat of segment '" + name + "': " + errno_text(errno)};
    const auto file_size = static_cast<std::uint64_t>(st.st_size);
    if (length == 0 || offset > file_size || length > file_size - offset)
      return error{errc::protocol_error, "shm: segment '" + name + "' claims " + std::to_string(length) + " bytes at offset " +
                                             std::to_string(offset) + " of a " + std::to_string(file_size) + "-byte file"};
    const std::uint64_t start = offset / page_size() * page_size();
    const std::uint64_t delta = offset - start;
    map_length = static_cast<std::size_t>((delta + length + page_size() - 1) / page_size() * page_size());
    void* p = ::mmap(nullptr, map_length, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd,
                     static_cast<off_t>(start));
    if (p == MAP_FAILED) return error{errc::io_error, "shm: mmap of segment '" + name + "': " + errno_text(errno)};
    map_address = p;
    base = static_cast<std::byte*>(p) + delta;
    return {};
  }
};

inline std::string ptrace_hint() {
  std::ifstream in("/proc/sys/kernel/yama/ptrace_scope");
  int scope = -1;
  in >> scope;
  const std::string yama = scope < 0 ? std::string("Yama is not enabled")
                                     : "/proc/sys/kernel/yama/ptrace_scope is " + std::to_string(scope);
  return yama +
         "; register memory from kvx::transport::shm_allocate (shared by fd, no ptrace needed) or let the owner "
         "grant access with shm_options::grant_ptrace (prctl PR_SET_PTRACER)";
}

// One copy through the kernel between this process and the owner; loops over
// partial transfers.
inline std::error_code process_vm_copy(const shm_mapping& m, std::uint64_t offset, std::byte* local, std::size_t len,
                                       bool read) {
  std::size_t done = 0;
  while (done < len) {
    iovec l{local + done, len - done};
    iovec r{reinterpret_cast<void*>(m.remote_address + offset + done), len - done};
    const ssize_t n = read ? ::process_vm_readv(m.pid, &l, 1, &r, 1, 0) : ::process_vm_writev(m.pid, &l, 1, &r, 1, 0);
    if (n > 0) {
      done += static_cast<std::size_t>(n);
      continue;
    }
    const int e = n < 0 ? errno : EIO;
    if (e == EINTR) continue;
    if (e == ESRCH) return errc::connection_lost;
    if (e == EPERM) {
      log(log_level::error, "shm: process_vm_", read ? "readv" : "writev", " on pid ", m.pid, " segment '", m.name,
          "' refused (EPERM): ", ptrace_hint());
      return errc::not_supported;
    }
    log(log_level::error, "shm: process_vm_", read ? "readv" : "writev", " on pid ", m.pid, " segment '", m.name,
        "' offset ", offset + done, ": ", errno_text(e));
    return errc::io_error;
  }
  return {};
}

}  // namespace kvx::transport::detail
