#pragma once
//! \file
//! CUDA runtime errors as `kvx::error`: every `cudaError_t` maps to an `errc`
//! (allocation failure to `capacity_exceeded`, bad arguments to
//! `invalid_argument`, a missing driver or device to `not_supported`, a handle
//! from a dead or older exporter to `stale`, anything else to `device_error`),
//! and the context keeps CUDA's own name and text for the log.
//!
//! Plain C++ against the CUDA runtime API: no nvcc needed.
//!
//! \code
//! KVX_TRY(kvx::cuda::check(cudaMemcpy(dst, src, n, cudaMemcpyDefault), "copy block 7"));
//! \endcode

#include <cuda_runtime_api.h>

#include <string>
#include <string_view>
#include <system_error>

#include <kvx/core/error.hpp>
#include <kvx/core/result.hpp>

namespace kvx::cuda {

//! The `errc` a CUDA runtime status maps to; `errc{}` (0) for `cudaSuccess`.
[[nodiscard]] inline errc errc_of(cudaError_t status) noexcept {
  switch (status) {
    case cudaSuccess: return errc{};
    case cudaErrorMemoryAllocation: return errc::capacity_exceeded;
    case cudaErrorInvalidValue:
    case cudaErrorInvalidDevice:
    case cudaErrorInvalidDevicePointer:
    case cudaErrorInvalidMemcpyDirection:
    case cudaErrorInvalidPitchValue:
    case cudaErrorInvalidConfiguration: return errc::invalid_argument;
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
    case cudaErrorNotSupported:
    case cudaErrorCallRequiresNewerDriver:
    case cudaErrorPeerAccessUnsupported:
    case cudaErrorDevicesUnavailable:
    case cudaErrorNoKernelImageForDevice:
    case cudaErrorUnsupportedPtxVersion: return errc::not_supported;
    // What cudaIpcOpenMemHandle answers for a handle whose exporter freed the
    // memory or exited: the descriptor outlived its registration.
    case cudaErrorInvalidResourceHandle:
    case cudaErrorMapBufferObjectFailed: return errc::stale;
    case cudaErrorNotReady: return errc::busy;
    default: return errc::device_error;
  }
}

//! `std::error_code` of a CUDA status (empty for `cudaSuccess`).
[[nodiscard]] inline std::error_code error_code_of(cudaError_t status) noexcept {
  const auto e = errc_of(status);
  return e == errc{} ? std::error_code{} : make_error_code(e);
}

//! A `kvx::error` for a failed CUDA call: "device error: <what>: cudaErrorX (text)".
[[nodiscard]] inline kvx::error make_error(cudaError_t status, std::string_view what) {
  std::string context(what);
  context += ": ";
  context += cudaGetErrorName(status);
  context += " (";
  context += cudaGetErrorString(status);
  context += ")";
  return kvx::error{errc_of(status), std::move(context)};
}

//! `result<void>` of a CUDA call: empty on success, else `make_error`.
[[nodiscard]] inline result<void> check(cudaError_t status, std::string_view what) {
  if (status == cudaSuccess) return {};
  return make_error(status, what);
}

}  // namespace kvx::cuda
