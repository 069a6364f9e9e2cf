#pragma once
//! \file
//! The core layer: errors, results, sizes, config, logging, metrics, async conventions.
#include <kvx/core/async.hpp>
#include <kvx/core/bytes.hpp>
#include <kvx/core/config.hpp>
#include <kvx/core/error.hpp>
#include <kvx/core/log.hpp>
#include <kvx/core/metrics.hpp>
#include <kvx/core/result.hpp>
#include <kvx/core/utf8.hpp>
#include <kvx/features.hpp>
#include <kvx/version.hpp>
