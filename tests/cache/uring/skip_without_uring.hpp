#pragma once
// Skips the calling test, naming why, where this process cannot create an
// io_uring (old kernels, seccomp sandboxes).

#include <gtest/gtest.h>

#include <kvx/cache/tiers/uring_file_tier.hpp>

#define KVX_SKIP_WITHOUT_URING()                                                                           \
  do {                                                                                                     \
    if (auto ec = kvx::cache::uring_file_tier<>::probe())                                                  \
      GTEST_SKIP() << "io_uring unavailable here: io_uring_queue_init failed: " << ec.message();       \
  } while (false)
