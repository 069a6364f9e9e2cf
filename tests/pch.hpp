// Precompiled for every test executable: the heavy, stable headers.
#pragma once
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <boost/asio.hpp>
#include <nlohmann/json.hpp>

#include <kvx/core.hpp>
