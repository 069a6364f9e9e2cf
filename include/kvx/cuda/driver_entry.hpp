#pragma once
//! \file
//! A CUDA driver API function reached through the runtime's entry-point
//! query (`cudaGetDriverEntryPointByVersion`), so that nothing links
//! libcuda: `driver_entry<Fn>(name, version)` is the function, or null when
//! the driver lacks it (the query's error is cleared so it does not surface
//! from a later runtime call). Callers keep it in a function-local static:
//! the lookup runs once.
//!
//! \code
//! using get_range_fn = CUresult (*)(CUdeviceptr*, std::size_t*, CUdeviceptr);
//! static const auto fn = kvx::cuda::driver_entry<get_range_fn>("cuMemGetAddressRange", 12000);
//! if (!fn) return kvx::error{errc::not_supported, "cuMemGetAddressRange is not available from the CUDA driver"};
//! \endcode

#include <cuda_runtime_api.h>

namespace kvx::cuda {

//! The driver function `name` as of driver API `version` (e.g. 12000), or null.
template <class Fn>
[[nodiscard]] inline Fn driver_entry(const char* name, int version) noexcept {
  void* f = nullptr;
  cudaDriverEntryPointQueryResult q{};
  if (cudaGetDriverEntryPointByVersion(name, &f, static_cast<unsigned int>(version), cudaEnableDefault, &q) != cudaSuccess ||
      q != cudaDriverEntryPointSuccess || f == nullptr) {
    (void)cudaGetLastError();
    return nullptr;
  }
  return reinterpret_cast<Fn>(f);
}

}  // namespace kvx::cuda
