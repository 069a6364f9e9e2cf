#include "kernels.hpp"

#include <kvx/cuda/kernels/kv_gather.cuh>

namespace example {

kvx::result<void> gather(const kvx::cuda::paged_kv_view& v, std::span<const std::uint32_t> blocks,
                         kvx::cuda::kv_slice slice, void* staging, std::uint64_t bytes, cudaStream_t s) {
  return kvx::cuda::gather_kv(v, kvx::cuda::host_block_ids{blocks}, slice, staging, bytes, s);
}

kvx::result<void> scatter(const kvx::cuda::paged_kv_view& v, std::span<const std::uint32_t> blocks,
                          kvx::cuda::kv_slice slice, const void* staging, std::uint64_t bytes, cudaStream_t s) {
  return kvx::cuda::scatter_kv(v, kvx::cuda::host_block_ids{blocks}, slice, staging, bytes, s);
}

std::uint64_t staging_bytes(const kvx::cuda::paged_kv_view& v, std::uint32_t blocks, kvx::cuda::kv_slice slice) {
  return kvx::cuda::kv_staging_bytes(v, blocks, slice);
}

}  // namespace example
