#pragma once
//! \file
//! splitmix64 (Steele, Lea, Flood 2014): the one small, fast, well-mixed
//! generator kvx uses wherever it needs deterministic bits that are not a
//! secret: fault schedules, test bytes, a registration key's check value.
//! Bit-exact across platforms, so a seed names the same sequence everywhere.

#include <cstdint>

namespace kvx {

//! The golden-ratio increment between successive states.
inline constexpr std::uint64_t splitmix64_increment = 0x9e3779b97f4a7c15ULL;

//! splitmix64's output function: every input bit affects every output bit.
constexpr std::uint64_t splitmix64_mix(std::uint64_t z) noexcept {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

//! Advances `state` and returns the sequence's next value.
constexpr std::uint64_t splitmix64_next(std::uint64_t& state) noexcept {
  return splitmix64_mix(state += splitmix64_increment);
}

}  // namespace kvx
