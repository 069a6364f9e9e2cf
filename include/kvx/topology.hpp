#pragma once
//! \file
//! The topology layer: sysfs discovery and rail selection.
#include <kvx/topology/rail_selector.hpp>
#include <kvx/topology/topology.hpp>
