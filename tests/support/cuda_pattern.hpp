// Seeded byte patterns and a hash, shared by the CUDA tests and their peer
// process so both sides agree on what the bytes must be.
#pragma once
#include <cstddef>
#include <cstdint>
#include <span>

namespace kvx::test {

inline std::byte pattern_byte(std::size_t i, unsigned seed) {
  return std::byte(static_cast<unsigned char>((i * 131 + seed) ^ (i >> 9) ^ (i >> 17)));
}

inline void fill_pattern(std::span<std::byte> out, unsigned seed, std::size_t first_index = 0) {
  for (std::size_t i = 0; i < out.size(); ++i) out[i] = pattern_byte(first_index + i, seed);
}

inline std::uint64_t fnv1a(std::span<const std::byte> bytes) {
  std::uint64_t h = 1469598103934665603ULL;
  for (auto b : bytes) {
    h ^= static_cast<std::uint64_t>(b);
    h *= 1099511628211ULL;
  }
  return h;
}

}  // namespace kvx::test
