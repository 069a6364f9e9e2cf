#pragma once
//! \file
//! The transfer layer: batches, the transfer engine, metadata backends and the
//! run-time configured `any_transport`.

#include <kvx/transfer/any_transport.hpp>
#include <kvx/transfer/batch.hpp>
#include <kvx/transfer/embedded_metadata.hpp>
#include <kvx/transfer/metadata_backend.hpp>
#include <kvx/transfer/transfer_engine.hpp>
#include <kvx/transport.hpp>
