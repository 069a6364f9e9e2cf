#pragma once
//! \file
//! `kvx::cache::async_read_many(cache, keys, outs, on_block, ex, token)`:
//! `tiered_cache::read_many` as an Asio operation (the conventions of
//! `kvx/core/async.hpp`).
//!
//! The reads block on I/O, so they run on `ex`, an executor whose threads may
//! block (an `asio::thread_pool`'s, not that of an `io_context` that also
//! serves sockets). `on_block(i, ec)` runs there too, once per key as its
//! bytes land, in the order `read_many` documents (a pipelined tier's blocks
//! as its reads complete, so the first is usable long before the last). The
//! token completes with `void(std::error_code)` once every key has been
//! reported: empty, or `errc::cancelled` when the token's cancellation slot
//! fired before every block was read. Cancellation takes effect between
//! blocks: a block not yet started is reported with `errc::cancelled` and not
//! read; a tier's batch already in flight (io_uring, the pread tier's
//! readers) finishes first. Emit the slot's signal on the handler's
//! associated executor (as Asio requires): the operation clears the slot
//! there, just before the handler runs. Per-block errors (`not_found`, ...) go to
//! `on_block` only. `cache`, `keys`, `outs` and the buffers must outlive the
//! operation.
//!
//! \code
//! asio::thread_pool io_pool(2);
//! co_await kvx::cache::async_read_many(cache, keys, outs,
//!     [&](std::size_t i, std::error_code ec) { if (!ec) start_transfer(i); }, io_pool.get_executor(),
//!     asio::use_awaitable);
//! \endcode

#include <atomic>
#include <cstddef>
#include <memory>
#include <span>
#include <system_error>
#include <utility>

#include <boost/asio/associated_cancellation_slot.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/cancellation_type.hpp>
#include <boost/asio/post.hpp>

#include <kvx/cache/block_key.hpp>
#include <kvx/core/async.hpp>
#include <kvx/core/error.hpp>

namespace kvx::cache {

template <class Cache, class OnBlock, class Executor, asio::completion_token_for<void(std::error_code)> CompletionToken>
auto async_read_many(Cache& cache, std::span<const block_key> keys, std::span<const std::span<std::byte>> outs,
                     OnBlock on_block, const Executor& ex, CompletionToken&& token) {
  return asio::async_initiate<CompletionToken, void(std::error_code)>(
      [&cache, keys, outs, ex](auto handler, OnBlock on_block) {
        auto stop = std::make_shared<std::atomic<bool>>(false);
        auto slot = asio::get_associated_cancellation_slot(handler);
        if (slot.is_connected()) slot.assign([stop](asio::cancellation_type) { stop->store(true); });
        asio::post(ex, [&cache, keys, outs, ex, stop, on_block = std::move(on_block),
                        h = std::move(handler)]() mutable {
          bool cancelled = false;
          cache.read_many(
              keys, outs,
              [&](std::size_t i, std::error_code ec) {
                if (ec == errc::cancelled) cancelled = true;
                on_block(i, ec);
              },
              [&] { return stop->load(); });
          // The slot is cleared on the handler's executor, where its signal is
          // emitted: a clear here, on the pool's thread, races that emit.
          kvx::detail::post_completion_clearing_slot(ex, std::move(h),
                                                     cancelled ? make_error_code(errc::cancelled) : std::error_code{});
        });
      },
      token, std::move(on_block));
}

}  // namespace kvx::cache
