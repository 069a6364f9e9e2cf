#pragma once
//! \file
//! The transport layer without optional backends: the `transport` concept,
//! the `local` reference transport and the decorators. Backend transports
//! have their own headers (`kvx/transport/tcp.hpp`, `shm.hpp`, `ucx.hpp`).

#include <kvx/transport/decorators/checksummed.hpp>
#include <kvx/transport/decorators/faulty.hpp>
#include <kvx/transport/decorators/metered.hpp>
#include <kvx/transport/local.hpp>
#include <kvx/transport/shm.hpp>
#include <kvx/transport/tcp.hpp>
#include <kvx/transport/transport.hpp>
