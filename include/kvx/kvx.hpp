#pragma once
//! \file
//! The dependency-free core of every layer. Optional backends have their own
//! headers (`kvx/transport/ucx.hpp`, ...) and targets.
#include <kvx/core.hpp>
