#pragma once
//! \file
//! `memory_region`: an address range and where it lives (host DRAM, a CUDA
//! device, a file mapping). The location drives transport choice: shm and tcp
//! touch host memory, cuda_ipc device memory, ucx either where UCX allows.
//!
//! \code
//! std::vector<std::byte> buf(1 << 20);
//! kvx::memory::memory_region r{buf.data(), buf.size()};           // host
//! kvx::memory::memory_region g{dev_ptr, n, kvx::memory::location::cuda(0)};
//! \endcode

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include <kvx/core/result.hpp>

namespace kvx::memory {

enum class location_kind : std::uint8_t { host, cuda, file };

//! Where bytes live: `host`, `cuda:N` or `file`.
struct location {
  location_kind kind = location_kind::host;
  int device = 0;  //!< CUDA device ordinal for `cuda`

  static constexpr location host() noexcept { return {location_kind::host, 0}; }
  static constexpr location cuda(int ordinal) noexcept { return {location_kind::cuda, ordinal}; }
  static constexpr location file() noexcept { return {location_kind::file, 0}; }

  [[nodiscard]] bool is_host_accessible() const noexcept { return kind != location_kind::cuda; }
  [[nodiscard]] std::string to_string() const {
    switch (kind) {
      case location_kind::host: return "host";
      case location_kind::cuda: return "cuda:" + std::to_string(device);
      case location_kind::file: return "file";
    }
    return "unknown";
  }
  //! Parses "host", "file", "cuda:N".
  static result<location> parse(std::string_view text) {
    if (text == "host") return host();
    if (text == "file") return file();
    if (text.size() > 5 && text.substr(0, 5) == "cuda:") {
      int n = 0;
      for (char c : text.substr(5)) {
        if (c < '0' || c > '9' || n > 100000) return error{errc::invalid_argument, "bad location '" + std::string(text) + "'"};
        n = n * 10 + (c - '0');
      }
      return cuda(n);
    }
    return error{errc::invalid_argument, "bad location '" + std::string(text) + "' (host, file or cuda:N)"};
  }
  friend bool operator==(const location&, const location&) = default;
};

//! A contiguous range of memory. Non-owning.
struct memory_region {
  void* address = nullptr;
  std::size_t length = 0;
  location where = location::host();

  [[nodiscard]] std::byte* data() const noexcept { return static_cast<std::byte*>(address); }
  //! Host view; meaningful only for host-accessible locations.
  [[nodiscard]] std::span<std::byte> bytes() const noexcept { return {data(), length}; }
  //! True when [offset, offset + len) lies inside the region (overflow-safe).
  [[nodiscard]] bool contains(std::uint64_t offset, std::uint64_t len) const noexcept {
    return offset <= length && len <= length - offset;
  }
  //! True when [p, p + len) lies inside the region.
  [[nodiscard]] bool contains(const void* p, std::size_t len) const noexcept {
    const auto base = reinterpret_cast<std::uintptr_t>(address);
    const auto q = reinterpret_cast<std::uintptr_t>(p);
    return q >= base && contains(q - base, len);
  }
  [[nodiscard]] memory_region subregion(std::uint64_t offset, std::uint64_t len) const noexcept {
    return {data() + offset, static_cast<std::size_t>(len), where};
  }
};

}  // namespace kvx::memory
