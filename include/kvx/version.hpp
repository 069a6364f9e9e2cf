#pragma once
//! \file
//! kvx's version, the one place it is written (CMake and Conan read it here).

#define KVX_VERSION_MAJOR 0
#define KVX_VERSION_MINOR 1
#define KVX_VERSION_PATCH 0

namespace kvx {
inline constexpr int version_major = KVX_VERSION_MAJOR;
inline constexpr int version_minor = KVX_VERSION_MINOR;
inline constexpr int version_patch = KVX_VERSION_PATCH;
}  // namespace kvx
