// The two kernel calls the example needs, declared for the g++ side. Keeping
// Boost.Asio out of nvcc's way is how we suggest engines split their code.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>
#include <span>

#include <kvx/core/result.hpp>
#include <kvx/cuda/paged_kv_view.hpp>

namespace example {
kvx::result<void> gather(const kvx::cuda::paged_kv_view& v, std::span<const std::uint32_t> blocks,
                         kvx::cuda::kv_slice slice, void* staging, std::uint64_t bytes, cudaStream_t s);
kvx::result<void> scatter(const kvx::cuda::paged_kv_view& v, std::span<const std::uint32_t> blocks,
                          kvx::cuda::kv_slice slice, const void* staging, std::uint64_t bytes, cudaStream_t s);
std::uint64_t staging_bytes(const kvx::cuda::paged_kv_view& v, std::uint32_t blocks, kvx::cuda::kv_slice slice);
}  // namespace example
