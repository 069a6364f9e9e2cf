#pragma once
//! \file
//! CUDA devices: how many there are (0 without a driver, never an abort),
//! a scoped current-device switch, and a device's identity (name, PCI bus id,
//! UUID) for descriptors and logs.
//!
//! Tests and tools skip GPU work with `kvx::cuda::skip_reason()`, which says
//! what is missing ("no CUDA driver", "no CUDA device").
//!
//! \code
//! if (kvx::cuda::device_count() == 0) return skip(kvx::cuda::skip_reason());
//! kvx::cuda::device_guard on(1);   // cudaSetDevice(1) until scope exit
//! \endcode

#include <cuda_runtime_api.h>

#include <cstdio>
#include <string>

#include <kvx/cuda/error.hpp>

namespace kvx::cuda {

//! Devices visible to this process; 0 when there is no driver or no device.
[[nodiscard]] inline int device_count() noexcept {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // not sticky, but keep later checks clean
    return 0;
  }
  return n;
}

//! Why GPU work cannot run here ("" when a device is present).
[[nodiscard]] inline std::string skip_reason() {
  int n = 0;
  const auto status = cudaGetDeviceCount(&n);
  (void)cudaGetLastError();
  if (status == cudaSuccess && n > 0) return {};
  if (status == cudaErrorInsufficientDriver || status == cudaErrorNoDevice || status == cudaSuccess)
    return "no CUDA device found (" + std::string(cudaGetErrorName(status)) + ")";
  return std::string("CUDA runtime unusable: ") + cudaGetErrorName(status) + " (" + cudaGetErrorString(status) + ")";
}

//! Makes `ordinal` the calling thread's current device until destruction.
class device_guard {
 public:
  explicit device_guard(int ordinal) noexcept {
    if (cudaGetDevice(&previous_) != cudaSuccess) previous_ = -1;
    if (previous_ != ordinal) {
      ok_ = cudaSetDevice(ordinal) == cudaSuccess;
      switched_ = ok_;
    }
  }
  device_guard(const device_guard&) = delete;
  device_guard& operator=(const device_guard&) = delete;
  ~device_guard() {
    if (switched_ && previous_ >= 0) (void)cudaSetDevice(previous_);
  }
  //! False when `cudaSetDevice` failed (bad ordinal); the caller's next CUDA call reports it.
  [[nodiscard]] bool ok() const noexcept { return ok_; }

 private:
  int previous_ = -1;
  bool ok_ = true;
  bool switched_ = false;
};

//! What identifies a device across processes of one host.
struct device_identity {
  int ordinal = 0;
  std::string name;    //!< "NVIDIA H100 80GB HBM3"
  std::string pci_bus; //!< "0000:1b:00.0"
  std::string uuid;    //!< 32 hex digits, stable across processes and CUDA_VISIBLE_DEVICES orders
};

//! Name, PCI bus id and UUID of device `ordinal`.
[[nodiscard]] inline result<device_identity> identify(int ordinal) {
  cudaDeviceProp prop{};
  KVX_TRY(check(cudaGetDeviceProperties(&prop, ordinal), "cudaGetDeviceProperties(" + std::to_string(ordinal) + ")"));
  device_identity id;
  id.ordinal = ordinal;
  id.name = prop.name;
  char bus[32];
  std::snprintf(bus, sizeof bus, "%04x:%02x:%02x.0", static_cast<unsigned>(prop.pciDomainID),
                static_cast<unsigned>(prop.pciBusID), static_cast<unsigned>(prop.pciDeviceID));
  id.pci_bus = bus;
  static constexpr char hex[] = "0123456789abcdef";
  for (char c : prop.uuid.bytes) {
    const auto b = static_cast<unsigned char>(c);
    id.uuid += hex[b >> 4];
    id.uuid += hex[b & 15];
  }
  return id;
}

//! The ordinal of the device with `uuid` in this process, or `errc::not_found`.
[[nodiscard]] inline result<int> ordinal_of(std::string_view uuid) {
  const int n = device_count();
  for (int i = 0; i < n; ++i) {
    auto id = identify(i);
    if (id && id->uuid == uuid) return i;
  }
  return kvx::error{errc::not_found, "no CUDA device with uuid " + std::string(uuid) + " in this process"};
}

}  // namespace kvx::cuda
