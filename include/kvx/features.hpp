#pragma once
//! \file
//! Feature macros, always defined to 0 or 1 so they are tested with `#if` under
//! `-Wundef`. The optional CMake targets (`kvx::ucx`, `kvx::verbs`, `kvx::cuda`,
//! `kvx::redis`, `kvx::uring`) define theirs to 1.

#ifndef KVX_WITH_UCX
#define KVX_WITH_UCX 0
#endif
#ifndef KVX_WITH_VERBS
#define KVX_WITH_VERBS 0
#endif
#ifndef KVX_WITH_CUDA
#define KVX_WITH_CUDA 0
#endif
#ifndef KVX_WITH_REDIS
#define KVX_WITH_REDIS 0
#endif
#ifndef KVX_WITH_URING
#define KVX_WITH_URING 0
#endif
