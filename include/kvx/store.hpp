#pragma once
//! \file
//! The store layer: the distributed KV pool (master, nodes, clients) and its
//! placement policies. Metadata backends: `kvx/store/metadata.hpp` (Redis
//! needs `kvx::redis`).
#include <kvx/store/master_client.hpp>
#include <kvx/store/master_handler.hpp>
#include <kvx/store/master_server.hpp>
#include <kvx/store/master_state.hpp>
#include <kvx/store/node_ledger.hpp>
#include <kvx/store/placement_policy.hpp>
#include <kvx/store/protocol.hpp>
#include <kvx/store/store_client.hpp>
#include <kvx/store/store_node.hpp>
#include <kvx/store/types.hpp>
