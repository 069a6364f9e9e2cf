#pragma once
//! \file
//! `transfer_engine<Metadata, Transports...>`: moves batches of reads and
//! writes between this process's registered memory and named segments
//! anywhere, over the best transport for each operation.
//!
//! - **Registration** (`async_register_memory(region, name)`): the region is
//!   added to the engine's segment table, registered with every transport that
//!   can touch its memory kind, and its descriptor (with one entry per
//!   transport) is published to the metadata backend under
//!   `kvx/segment/<name>`. Any sub-range of a registered region can then be
//!   the local side of an operation with nothing new to register. A name (or
//!   node) that is not UTF-8 is `errc::invalid_argument`; when publishing
//!   fails the registration is undone, so a retry starts afresh.
//!   `async_deregister_memory(name)` succeeds only once no peer reaches the
//!   memory; `timed_out` from a transport (a peer's copy outlived its revoke
//!   timeout) means the memory is not free yet: call it again until it succeeds.
//! - **Resolution**: remote segment names resolve through the metadata backend
//!   once and are cached (`async_open` resolves ahead of time). A descriptor
//!   that is not JSON, nests deeper than `memory::max_descriptor_depth` or
//!   lacks a field is `errc::malformed_message`.
//! - **Transport choice**, per operation, by locality then pack order:
//!   transports with `same_process_only` first, then `same_host_only`, then
//!   the rest (capabilities as `runtime_capabilities()` reports them where a
//!   transport has it, as `any_transport` does); the first whose
//!   `can_transfer(descriptor)` succeeds and which can touch the local memory
//!   kind carries the operation. So
//!   `transfer_engine<M, local, shm, tcp>` picks local in-process, shm on the
//!   same host and tcp elsewhere.
//! - **Slicing and striping**: each operation is cut into slices of at most
//!   `slice_size` bytes, or the chosen transport's `capabilities.min_slice`
//!   when larger (contiguous strided blocks are coalesced first); slices
//!   of all operations are kept in flight together, at most `max_in_flight`
//!   (any value: the window grows with the slices in flight).
//! - **Retries**: a slice that fails with `connection_lost`, `timed_out` or
//!   `checksum_mismatch` is re-issued up to `max_retries` times, after a
//!   backoff that doubles per attempt (`retry_backoff`, `max_retry_backoff`). A slice that
//!   fails with `stale`, `bad_key` or `unknown_segment` makes the engine fetch
//!   the segment's descriptor again, once per segment and batch (the owner may
//!   have restarted under the same name); if the fresh descriptor differs the
//!   slice is re-issued, otherwise the error stands.
//! - **Deadlines and cancellation**: `batch::deadline` or
//!   `engine_options::deadline` (completes with `errc::timed_out`), or any
//!   token wrapped in `kvx::cancel_after`; cancelling through the token's
//!   cancellation slot cancels every slice in flight and completes with
//!   `errc::cancelled`. The batch completes once the transports have released
//!   every buffer.
//! - **Completion**: `void(std::error_code, batch_result)`; the code is the
//!   first failed operation's, and `batch_result` has a status per operation
//!   whose context names the op index, kind, segment, node, offset and
//!   transport. Never inline: on the handler's associated executor.
//!
//! Thread-safety: all members may be called from any thread. Each batch runs
//! on its own strand of the engine's executor (the metadata backend's).
//! The engine holds references to the metadata backend and the transports:
//! they must outlive it.
//!
//! \code
//! kvx::transfer::embedded_metadata meta(io.get_executor());
//! kvx::transport::local net(io.get_executor());
//! kvx::transfer::transfer_engine<kvx::transfer::embedded_metadata, kvx::transport::local> engine(meta, {.node = "decode-0"}, net);
//! co_await engine.async_register_memory({buf.data(), buf.size()}, "decode-0/kv", asio::use_awaitable);
//! kvx::transfer::batch b;
//! b.read(std::span(buf).first(4096), "prefill-0/kv", 0);
//! auto [ec, r] = co_await engine.async_transfer(std::move(b), asio::use_awaitable);  // std::error_code: a tuple
//! \endcode

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <iterator>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <system_error>
#include <tuple>
#include <utility>
#include <vector>

#include <boost/asio/any_completion_handler.hpp>
#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>

#include <kvx/core/async.hpp>
#include <kvx/core/log.hpp>
#include <kvx/core/utf8.hpp>
#include <kvx/memory/segment_table.hpp>
#include <kvx/transfer/batch.hpp>
#include <kvx/transfer/metadata_backend.hpp>
#include <kvx/transport/transport.hpp>

namespace kvx::transfer {

//! Engine-wide settings.
struct engine_options {
  std::string node = "kvx-node";          //!< this node's name (descriptors carry it)
  std::uint64_t slice_size = 1u << 20;    //!< largest slice handed to a transport
  std::size_t max_in_flight = 32;         //!< slices in flight per batch (0 counts as 1; no upper limit)
  std::uint32_t max_retries = 3;          //!< re-issues of one slice after transient errors
  //! Wait before the first re-issue of a slice; doubles with each further
  //! attempt, at most `max_retry_backoff`. Zero re-issues at once. A peer that
  //! dropped a connection or timed out is given time to come back instead of
  //! being hammered `max_retries` times in a microsecond.
  std::chrono::steady_clock::duration retry_backoff = std::chrono::milliseconds(1);
  std::chrono::steady_clock::duration max_retry_backoff = std::chrono::milliseconds(100);
  std::optional<std::chrono::steady_clock::duration> deadline{};  //!< default per-batch deadline
};

//! True for errors a retry of the same slice may cure.
inline bool is_transient(std::error_code ec) noexcept {
  return ec == errc::connection_lost || ec == errc::timed_out || ec == errc::checksum_mismatch;
}
//! True for errors a fresh descriptor may cure (the owner restarted or re-registered).
inline bool needs_re_resolution(std::error_code ec) noexcept {
  return ec == errc::stale || ec == errc::bad_key || ec == errc::unknown_segment;
}

namespace detail {
constexpr int locality_rank(const transport::transport_capabilities& c) noexcept {
  return c.same_process_only ? 0 : c.same_host_only ? 1 : 2;
}

// `s` quoted for an error message, with what is not UTF-8 shown as U+FFFD.
inline std::string quoted(const std::string& s) {
  return nlohmann::json(s).dump(-1, ' ', /*ensure_ascii=*/true, nlohmann::json::error_handler_t::replace);
}
}  // namespace detail

template <class Metadata, class... Transports>
class transfer_engine {
  static_assert(sizeof...(Transports) > 0, "kvx: transfer_engine needs at least one transport");
  static_assert(check_metadata_backend<Metadata>());
  static_assert((transport::check_transport<Transports>() && ...));

 public:
  using executor_type = asio::any_io_executor;
  using descriptor_ptr = std::shared_ptr<const memory::segment_descriptor>;
  static constexpr std::size_t transport_count = sizeof...(Transports);

  transfer_engine(Metadata& meta, engine_options options, Transports&... transports)
      : meta_(meta), ex_(meta.get_executor()), opts_(std::move(options)), table_(opts_.node), transports_(&transports...) {
    if (opts_.slice_size == 0) opts_.slice_size = 1;
    if (opts_.max_in_flight == 0) opts_.max_in_flight = 1;
    // A type-erased transport's static capabilities are the loosest (every
    // memory kind, no locality); what it wraps is known only at run time.
    for_each_transport([&](auto& t, std::size_t i) {
      if constexpr (requires { t.runtime_capabilities(); })
        caps_[i] = t.runtime_capabilities();
      else
        caps_[i] = std::remove_reference_t<decltype(t)>::capabilities;
    });
    // Preference order: locality rank, then pack order.
    for (std::size_t i = 0; i < transport_count; ++i) order_[i] = i;
    std::stable_sort(order_.begin(), order_.end(), [&](std::size_t a, std::size_t b) {
      return detail::locality_rank(caps_[a]) < detail::locality_rank(caps_[b]);
    });
  }

  transfer_engine(const transfer_engine&) = delete;
  transfer_engine& operator=(const transfer_engine&) = delete;

  //! Deregisters every segment still registered from the transports (so no
  //! peer reaches the memory afterwards). The metadata entries stay: withdraw
  //! them with `async_deregister_memory` first when peers should not find them.
  ~transfer_engine() {
    std::vector<std::string> names;
    {
      std::lock_guard lock(cache_mutex_);
      names.swap(registered_);
    }
    for (const auto& n : names) {
      auto seg = table_.find(n);
      if (!seg) continue;
      for_each_transport([&](auto& t, std::size_t i) {
        if (!can_touch(i, seg->region.where)) return;
        if (auto d = t.deregister_memory(*seg); !d)
          log(log_level::warn, "transfer engine '", opts_.node, "': deregistering '", n, "' from ", entry_key(t),
              " at destruction: ", d.error().message());
      });
      (void)table_.remove(n);
    }
  }

  [[nodiscard]] executor_type get_executor() const noexcept { return ex_; }
  [[nodiscard]] const engine_options& options() const noexcept { return opts_; }
  [[nodiscard]] memory::segment_table& segments() noexcept { return table_; }
  template <std::size_t I>
  auto& transport() noexcept { return *std::get<I>(transports_); }

  //! Registers `region` as segment `name` with every transport that can touch
  //! it and publishes its descriptor. Completion `void(std::error_code, memory::segment_descriptor)`.
  //!
  //! A name or node that is not UTF-8 is `errc::invalid_argument`. When the
  //! metadata backend fails the put, the registration is undone (transports,
  //! table) before the completion reports the backend's error, so the memory
  //! may be freed and the call retried; after `timed_out` or
  //! `connection_lost` the put may have landed, so the descriptor is also
  //! withdrawn (best effort) first. If a peer that found a landed put is
  //! still copying when a transport's revoke timeout passes, the undo fails
  //! and the completion reports that error instead (`timed_out`): before
  //! freeing the memory after a `timed_out`, call `async_deregister_memory`
  //! with the name until it succeeds or reports `unknown_segment`.
  template <asio::completion_token_for<void(std::error_code, memory::segment_descriptor)> CompletionToken>
  auto async_register_memory(const memory::memory_region& region, std::string name, CompletionToken&& token) {
    return asio::async_initiate<CompletionToken, void(std::error_code, memory::segment_descriptor)>(
        [this](auto handler, memory::memory_region r, std::string n) {
          auto desc = [&]() -> result<memory::segment_descriptor> {
            if (auto unpublishable = check_publishable(n)) return unpublishable;
            return register_locally(r, n);
          }();
          if (!desc) {
            log(log_level::warn, "transfer engine '", opts_.node, "': ", desc.error().message());
            return kvx::detail::post_completion(ex_, std::move(handler), desc.code(), memory::segment_descriptor{});
          }
          auto d = std::move(*desc);
          auto text = d.to_json().dump();
          meta_.async_put(segment_metadata_key(d.name), std::move(text),
                          [h = std::move(handler), d, this](std::error_code ec) mutable {
                            if (!ec) {
                              {
                                std::lock_guard lock(cache_mutex_);
                                left_published_.erase(d.name);  // the put replaced what was left published
                              }
                              return kvx::detail::post_completion(ex_, std::move(h), ec, std::move(d));
                            }
                            log(log_level::warn, "transfer engine '", opts_.node, "': publishing segment '", d.name,
                                "' failed (", ec.message(), "); its registration is undone");
                            // A peer that found the landed put may be copying: then the
                            // memory is not free, which outranks the backend's error.
                            if (auto undone = undo_registration(d)) {
                              log(log_level::warn, "transfer engine '", opts_.node, "': ", undone.message(),
                                  "; the memory is not free to reuse until async_deregister_memory('", d.name,
                                  "') succeeds");
                              ec = undone.code();
                            }
                            if (ec != errc::timed_out && ec != errc::connection_lost)
                              return kvx::detail::post_completion(ex_, std::move(h), ec, memory::segment_descriptor{});
                            // Completing only after the remove keeps it from overtaking a retry's put.
                            meta_.async_remove(segment_metadata_key(d.name),
                                               [h = std::move(h), ec, this](std::error_code) mutable {
                                                 kvx::detail::post_completion(ex_, std::move(h), ec,
                                                                              memory::segment_descriptor{});
                                               });
                          });
        },
        token, region, std::move(name));
  }

  //! Withdraws segment `name`: deregisters it from the transports (waiting
  //! for remote accesses in flight), the table and the metadata backend.
  //! Success means no peer reaches the memory any more: it may be reused.
  //!
  //! When a transport cannot let go in time (a peer's copy into or out of
  //! the segment outlived its revoke timeout, as `shm` and `cuda_ipc` report
  //! with `errc::timed_out`), the completion carries that error and the
  //! memory is NOT free to reuse: the segment stays revoked in that transport
  //! (no new op starts on it), the table and the backend drop it anyway, and
  //! calling this again with the same name asks that transport again. When
  //! the backend fails the remove, the completion reports its error and the
  //! descriptor stays published; calling this again retries the remove. So
  //! after any error, call this again before reusing the memory, until it
  //! succeeds (or reports `unknown_segment`: nothing is left to withdraw).
  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_deregister_memory(std::string name, CompletionToken&& token) {
    return asio::async_initiate<CompletionToken, void(std::error_code)>(
        [this](auto handler, std::string n) {
          // Earlier registrations still held first, so that one this call
          // leaves held is not waited for twice.
          auto held = release_draining(n);
          auto seg = table_.find(n);
          if (seg) {
            if (auto e = withdraw_locally(*seg); e && !(held && *held)) held = std::move(e);
          } else if (!held && !is_left_published(n)) {
            return kvx::detail::post_completion(ex_, std::move(handler), seg.code());
          }
          const std::error_code local = held ? held->code() : std::error_code{};
          if (local)
            log(log_level::warn, "transfer engine '", opts_.node, "': ", held->message(), "; the memory of segment '", n,
                "' is not free to reuse until async_deregister_memory('", n, "') succeeds");
          meta_.async_remove(segment_metadata_key(n), [h = std::move(handler), n, local, this](std::error_code ec) mutable {
            if (ec == errc::not_found) ec = {};
            {
              std::lock_guard lock(cache_mutex_);
              if (ec)
                left_published_.insert(n);
              else
                left_published_.erase(n);
            }
            if (ec)
              log(log_level::warn, "transfer engine '", opts_.node, "': withdrawing segment '", n, "' failed (", ec.message(),
                  "); its descriptor stays published until async_deregister_memory('", n, "') succeeds");
            kvx::detail::post_completion(ex_, std::move(h), local ? local : ec);
          });
        },
        token, std::move(name));
  }

  //! Resolves `segment` to its descriptor (cached; `refresh` fetches again).
  //! Completion `void(std::error_code, memory::segment_descriptor)`.
  template <asio::completion_token_for<void(std::error_code, memory::segment_descriptor)> CompletionToken>
  auto async_open(std::string segment, CompletionToken&& token, bool refresh = false) {
    return asio::async_initiate<CompletionToken, void(std::error_code, memory::segment_descriptor)>(
        [this, refresh](auto handler, std::string name) {
          resolve(name, refresh, [this, h = std::move(handler)](kvx::error e, descriptor_ptr d) mutable {
            kvx::detail::post_completion(ex_, std::move(h), e.code(), d ? *d : memory::segment_descriptor{});
          });
        },
        token, std::move(segment));
  }

  //! Drops the cached descriptor of `segment` (the next transfer fetches it again).
  void forget(const std::string& segment) {
    std::lock_guard lock(cache_mutex_);
    cache_.erase(segment);
  }

  //! Runs `b`. Completion `void(std::error_code, batch_result)`.
  template <asio::completion_token_for<void(std::error_code, batch_result)> CompletionToken>
  auto async_transfer(batch b, CompletionToken&& token) {
    return asio::async_initiate<CompletionToken, void(std::error_code, batch_result)>(
        [this](auto handler, batch bt) {
          auto st = std::make_shared<batch_state>(this, std::move(bt), completion_handler(std::move(handler)));
          st->start();
        },
        token, std::move(b));
  }

 private:
  using completion_handler = asio::any_completion_handler<void(std::error_code, batch_result)>;
  using resolve_callback = std::function<void(kvx::error, descriptor_ptr)>;

  bool can_touch(std::size_t transport_index, const memory::location& where) const {
    return transport::has(caps_[transport_index].memory, transport::kind_of(where));
  }

  template <class F>
  void for_each_transport(F&& f) {
    [&]<std::size_t... I>(std::index_sequence<I...>) { (f(*std::get<I>(transports_), I), ...); }(
        std::index_sequence_for<Transports...>{});
  }
  template <class F>
  void with_transport(std::size_t index, F&& f) {
    [&]<std::size_t... I>(std::index_sequence<I...>) { ((index == I ? (f(*std::get<I>(transports_)), 0) : 0), ...); }(
        std::index_sequence_for<Transports...>{});
  }
  // The key of a transport's entry in descriptors: `name()`, or `runtime_name()`
  // for a type-erased transport whose name is known only at run time.
  template <class T>
  static std::string entry_key(const T& t) {
    if constexpr (requires { t.runtime_name(); })
      return std::string(t.runtime_name());
    else
      return std::string(T::name());
  }
  std::string transport_name(std::size_t index) {
    std::string n;
    with_transport(index, [&](auto& t) { n = entry_key(t); });
    return n;
  }

  // Why `name` cannot be published in a descriptor, if it cannot.
  kvx::error check_publishable(const std::string& name) const {
    if (!kvx::is_utf8(name))
      return {errc::invalid_argument, "segment name " + detail::quoted(name) + " is not UTF-8 (descriptors are JSON)"};
    if (!kvx::is_utf8(opts_.node))
      return {errc::invalid_argument, "node name " + detail::quoted(opts_.node) + " is not UTF-8 (descriptors are JSON)"};
    return {};
  }

  bool is_left_published(const std::string& name) {
    std::lock_guard lock(cache_mutex_);
    return left_published_.contains(name);
  }

  // Asks transports `which` to let go of `seg`. Those that cannot (a peer's
  // copy outlived their revoke timeout) keep it revoked and are remembered
  // in draining_, for the next deregister to ask again; the first error.
  kvx::error release(const memory::local_segment& seg, const std::vector<std::size_t>& which) {
    draining_segment held{seg, {}};
    kvx::error failure;
    for (auto i : which)
      with_transport(i, [&](auto& t) {
        auto d = t.deregister_memory(seg);
        if (d || d.code() == errc::unknown_segment) return;  // it holds nothing of `seg` any more
        held.transports.push_back(i);
        if (!failure)
          failure = kvx::error{d.code(), "deregister '" + seg.name + "' from " + entry_key(t) + ": " + d.error().message()};
      });
    if (!held.transports.empty()) {
      std::lock_guard lock(cache_mutex_);
      draining_.push_back(std::move(held));
    }
    return failure;
  }

  // Drops `seg` from the transports that took it and from the table; the
  // first transport's error (see release).
  kvx::error withdraw_locally(const memory::local_segment& seg) {
    std::vector<std::size_t> which;
    for (std::size_t i = 0; i < transport_count; ++i)
      if (can_touch(i, seg.region.where)) which.push_back(i);
    auto failure = release(seg, which);
    (void)table_.remove(seg.name);
    std::lock_guard lock(cache_mutex_);
    std::erase(registered_, seg.name);
    return failure;
  }

  // Asks again the transports still holding earlier registrations of `name`:
  // nullopt when none does, else the first error (none once all let go).
  std::optional<kvx::error> release_draining(const std::string& name) {
    std::vector<draining_segment> mine;
    {
      std::lock_guard lock(cache_mutex_);
      const auto ours = std::stable_partition(draining_.begin(), draining_.end(),
                                              [&](const draining_segment& d) { return d.segment.name != name; });
      std::move(ours, draining_.end(), std::back_inserter(mine));
      draining_.erase(ours, draining_.end());
    }
    if (mine.empty()) return std::nullopt;
    kvx::error failure;
    for (const auto& d : mine)
      if (auto e = release(d.segment, d.transports); e && !failure) failure = std::move(e);
    return failure;
  }

  // Undoes the registration `d` describes, unless a deregister (and perhaps
  // a new registration under the same name) came first; the withdrawal's error.
  kvx::error undo_registration(const memory::segment_descriptor& d) {
    auto seg = table_.find(d.name);
    if (seg && seg->key == d.key) return withdraw_locally(*seg);
    return {};
  }

  result<memory::segment_descriptor> register_locally(const memory::memory_region& r, const std::string& name) {
    auto seg = table_.add(name, r);
    KVX_TRY(seg);
    auto desc = table_.describe(*seg);
    std::vector<std::size_t> done;
    kvx::error failure;
    for_each_transport([&](auto& t, std::size_t i) {
      if (failure || !can_touch(i, r.where)) return;
      auto entry = t.register_memory(*seg);
      if (!entry) {
        failure = kvx::error{entry.code(), "register '" + name + "' with " + entry_key(t) + ": " +
                                               entry.error().message()};
        return;
      }
      desc.transports[entry_key(t)] = std::move(*entry);
      done.push_back(i);
    });
    if (failure || done.empty()) {
      for (auto i : done) with_transport(i, [&](auto& t) { (void)t.deregister_memory(*seg); });
      (void)table_.remove(name);
      if (!failure) failure = kvx::error{errc::not_supported, "no transport can touch " + r.where.to_string() + " memory of '" + name + "'"};
      return failure;
    }
    std::lock_guard lock(cache_mutex_);
    registered_.push_back(name);
    return desc;
  }

  // The cached descriptor of `name`, or null.
  descriptor_ptr cached(const std::string& name) {
    std::lock_guard lock(cache_mutex_);
    auto it = cache_.find(name);
    return it == cache_.end() ? nullptr : it->second;
  }

  // Resolves through the cache or the metadata backend; `cb` runs on the backend's executor or later.
  void resolve(const std::string& name, bool refresh, resolve_callback cb) {
    if (!refresh) {
      std::lock_guard lock(cache_mutex_);
      if (auto it = cache_.find(name); it != cache_.end()) {
        auto d = it->second;
        asio::post(ex_, [cb = std::move(cb), d = std::move(d)]() mutable { cb({}, std::move(d)); });
        return;
      }
    }
    meta_.async_get(segment_metadata_key(name), [this, name, cb = std::move(cb)](std::error_code ec, std::string text) mutable {
      if (ec == errc::not_found)
        return cb(kvx::error{errc::unknown_segment, "segment '" + name + "' is not in the metadata backend"}, nullptr);
      if (ec) return cb(kvx::error{ec, "resolving segment '" + name + "'"}, nullptr);
      // Whatever the backend holds came from a peer: parse() bounds the nesting.
      auto d = memory::segment_descriptor::parse(text);
      if (!d) return cb(kvx::error{d.code(), "descriptor of segment '" + name + "': " + d.error().context()}, nullptr);
      auto p = std::make_shared<const memory::segment_descriptor>(std::move(*d));
      {
        std::lock_guard lock(cache_mutex_);
        cache_[name] = p;
      }
      cb({}, std::move(p));
    });
  }

  // The preferred transport able to reach `d` with local memory at `where`.
  result<std::size_t> choose(const memory::segment_descriptor& d, const memory::location& where) {
    std::string why;
    for (std::size_t idx : order_) {
      std::error_code ec;
      with_transport(idx, [&](auto& t) {
        if (!can_touch(idx, where))
          ec = errc::not_supported;
        else
          ec = t.can_transfer(d);
      });
      if (!ec) return idx;
      why += (why.empty() ? "" : ", ") + transport_name(idx) + ": " + ec.message();
    }
    return kvx::error{errc::unreachable, "no transport reaches segment '" + d.name + "' on node '" + d.node + "' (" + why + ")"};
  }

  // ---- one batch ------------------------------------------------------------
  struct slice {
    std::size_t op;
    std::uint64_t local_offset;   // from the op's local base
    std::uint64_t remote_offset;  // absolute in the segment
    std::uint64_t length;
    std::uint32_t attempts = 0;
    descriptor_ptr desc;          // the descriptor it was (or will be) issued with
  };

  struct op_state {
    descriptor_ptr desc;
    std::size_t transport = 0;
    memory::location where;
    bool ready = false, failed = false;
    // Cursor over blocks (coalesced into runs when both sides are contiguous).
    std::uint64_t run_length = 0, runs = 0, run = 0, in_run = 0;
    std::uint64_t outstanding = 0;
  };

  struct segment_state {
    descriptor_ptr current;
    std::vector<std::size_t> ops;       // ops waiting for the first resolution
    bool resolving = false;
    bool re_resolved = false;           // the one re-fetch has happened
    std::vector<slice> parked;          // slices waiting for the re-fetch
    std::error_code park_error;
  };

  struct window_slot {
    asio::cancellation_signal signal;
    bool busy = false;
  };

  struct batch_state : std::enable_shared_from_this<batch_state> {
    batch_state(transfer_engine* e, batch b, completion_handler h)
        : eng(e), strand(asio::make_strand(e->ex_)), bt(std::move(b)), handler(std::move(h)),
          ops(bt.ops.size()), timer(strand) {
      result.ops.resize(bt.ops.size());
    }

    transfer_engine* eng;
    asio::strand<executor_type> strand;
    batch bt;
    completion_handler handler;
    batch_result result;
    std::vector<op_state> ops;
    std::map<std::string, segment_state, std::less<>> segments;
    std::deque<std::size_t> ready_ops;
    std::deque<slice> retries;
    std::list<asio::steady_timer> backoff_timers;  // slices waiting out their retry backoff
    // Grows to the most slices in flight at once, at most max_in_flight (which
    // may be huge); a deque keeps the slots' signals in place as it grows.
    std::deque<window_slot> window;
    std::vector<std::size_t> free_slots;
    std::size_t in_flight = 0;
    std::size_t resolving = 0;
    bool stopping = false, finished = false;
    std::error_code stop_code;
    asio::steady_timer timer;

    void start() {
      auto slot = asio::get_associated_cancellation_slot(handler);
      if (slot.is_connected()) {
        slot.assign([weak = this->weak_from_this()](asio::cancellation_type_t) {
          if (auto me = weak.lock()) asio::dispatch(me->strand, [me] { me->stop(errc::cancelled); });
        });
      }
      asio::dispatch(strand, [me = this->shared_from_this()] { me->begin(); });
    }

    std::string where(std::size_t i, std::uint64_t remote_offset) const {
      const auto& op = bt.ops[i];
      std::string s = "op " + std::to_string(i) + " (" + to_string(op.kind) + ") segment '" + op.remote.segment + "'";
      if (ops[i].desc) s += " on node '" + ops[i].desc->node + "'";
      s += " offset " + std::to_string(remote_offset);
      if (!result.ops[i].transport.empty()) s += " via " + result.ops[i].transport;
      return s;
    }

    void fail(std::size_t i, std::error_code ec, const std::string& detail, std::uint64_t remote_offset) {
      if (ops[i].failed) return;
      ops[i].failed = true;
      result.ops[i].code = ec;
      result.ops[i].context = where(i, remote_offset) + (detail.empty() ? "" : ": " + detail);
    }

    void begin() {
      const auto deadline = bt.deadline ? bt.deadline : eng->opts_.deadline;
      if (deadline) {
        timer.expires_after(*deadline);
        timer.async_wait([me = this->shared_from_this()](boost::system::error_code ec) {
          if (!ec) me->stop(errc::timed_out);
        });
      }
      for (std::size_t i = 0; i < bt.ops.size(); ++i) {
        const auto& op = bt.ops[i];
        if (auto err = validate_local(i)) {
          fail(i, err.code(), err.context(), op.remote.offset);
          continue;
        }
        if (op.total_bytes() == 0) continue;  // nothing to move
        auto& seg = segments[op.remote.segment];
        seg.ops.push_back(i);
      }
      for (auto& [name, seg] : segments) {
        seg.resolving = true;
        ++resolving;
      }
      for (auto& [name, seg] : segments) {
        // A descriptor in the cache binds here, on the strand: no trip
        // through the executor and back (two posts) for what is in hand.
        if (auto d = eng->cached(name)) {
          resolved(name, {}, std::move(d));
          continue;
        }
        eng->resolve(name, false, [me = this->shared_from_this(), name = name](kvx::error e, descriptor_ptr d) {
          asio::dispatch(me->strand, [me, name, e = std::move(e), d = std::move(d)] { me->resolved(name, e, d); });
        });
      }
      pump();
    }

    kvx::error validate_local(std::size_t i) {
      auto& op = bt.ops[i];
      auto& st = ops[i];
      if (op.total_bytes() == 0) return {};
      if (op.block_length == 0 || op.count == 0 || op.local.base == nullptr)
        return {errc::invalid_argument, "empty operation or null local base"};
      const std::uint64_t ls = op.local_stride(), rs = op.remote_stride();
      if (ls < op.block_length || rs < op.block_length)
        return {errc::invalid_argument, "a stride is shorter than the block length (blocks would overlap)"};
      if ((op.count - 1) > (UINT64_MAX - op.block_length) / ls || (op.count - 1) > (UINT64_MAX - op.block_length) / rs ||
          op.remote.offset > UINT64_MAX - ((op.count - 1) * rs + op.block_length))
        return {errc::out_of_range, "the strided range overflows"};
      const std::uint64_t local_span = (op.count - 1) * ls + op.block_length;
      auto found = eng->table_.find_containing(op.local.base, static_cast<std::size_t>(local_span));
      if (!found)
        return {errc::out_of_range, "the local range of " + std::to_string(local_span) +
                                        " bytes is not inside memory registered with this engine (node '" + eng->opts_.node + "')"};
      st.where = found->first.region.where;
      // Coalesce: both sides contiguous -> one run of count * block_length bytes.
      if (ls == op.block_length && rs == op.block_length) {
        st.run_length = op.count * op.block_length;
        st.runs = 1;
      } else {
        st.run_length = op.block_length;
        st.runs = op.count;
      }
      return {};
    }

    void resolved(const std::string& name, const kvx::error& e, descriptor_ptr d) {
      --resolving;
      // A stopped batch (deadline, cancellation) completes without waiting for
      // its resolutions; one that arrives afterwards has nothing left to bind.
      if (finished) return;
      auto& seg = segments[name];
      seg.resolving = false;
      if (seg.re_resolved && !seg.parked.empty()) {
        finish_re_resolution(seg, e, std::move(d));
      } else {
        seg.current = d;
        for (auto i : seg.ops) {
          if (e) {
            fail(i, e.code(), e.context(), bt.ops[i].remote.offset);
            continue;
          }
          bind_op(i, d);
        }
        seg.ops.clear();
      }
      pump();
    }

    void bind_op(std::size_t i, const descriptor_ptr& d) {
      auto& op = bt.ops[i];
      auto& st = ops[i];
      st.desc = d;
      if (op.remote.key != 0 && d->key != op.remote.key)
        return fail(i, errc::stale,
                    "the segment was registered again since the operation was planned (it names registration key " +
                        std::to_string(op.remote.key) + ", the segment's is " + std::to_string(d->key) + ")",
                    op.remote.offset);
      const std::uint64_t end = op.remote.offset + (op.count - 1) * op.remote_stride() + op.block_length;
      if (end > d->length)
        return fail(i, errc::out_of_range,
                    "the remote range ends at " + std::to_string(end) + ", past the segment's " + std::to_string(d->length) + " bytes",
                    op.remote.offset);
      auto chosen = eng->choose(*d, st.where);
      if (!chosen) return fail(i, chosen.code(), chosen.error().context(), op.remote.offset);
      st.transport = *chosen;
      result.ops[i].transport = eng->transport_name(*chosen);
      if (!st.ready) {
        st.ready = true;
        ready_ops.push_back(i);
      }
    }

    std::optional<slice> next_slice() {
      if (!retries.empty()) {
        auto s = std::move(retries.front());
        retries.pop_front();
        return s;
      }
      while (!ready_ops.empty()) {
        const std::size_t i = ready_ops.front();
        auto& st = ops[i];
        if (st.failed || st.run == st.runs) {
          ready_ops.pop_front();
          continue;
        }
        const auto& op = bt.ops[i];
        const std::uint64_t slice_size = std::max(eng->opts_.slice_size, eng->caps_[st.transport].min_slice);
        const std::uint64_t n = std::min<std::uint64_t>(slice_size, st.run_length - st.in_run);
        slice s{i, st.run * op.local_stride() + st.in_run, op.remote.offset + st.run * op.remote_stride() + st.in_run, n, 0,
                st.desc};
        st.in_run += n;
        if (st.in_run == st.run_length) {
          st.in_run = 0;
          ++st.run;
        }
        return s;
      }
      return std::nullopt;
    }

    void pump() {
      while (!stopping && in_flight < eng->opts_.max_in_flight) {
        auto s = next_slice();
        if (!s) break;
        if (ops[s->op].failed) continue;
        issue(std::move(*s));
      }
      if (in_flight == 0 && backoff_timers.empty() &&
          (stopping || (resolving == 0 && retries.empty() && ready_ops.empty() && !parked_any())))
        finish();
    }

    bool parked_any() const {
      for (const auto& [n, s] : segments)
        if (!s.parked.empty()) return true;
      return false;
    }

    void issue(slice s) {
      if (free_slots.empty()) {
        free_slots.push_back(window.size());
        window.emplace_back();
      }
      const std::size_t slot = free_slots.back();
      free_slots.pop_back();
      window[slot].busy = true;
      ++in_flight;
      auto& st = ops[s.op];
      ++st.outstanding;
      const auto& op = bt.ops[s.op];
      std::byte* local = op.local.base + s.local_offset;
      const std::uint64_t remote_offset = s.remote_offset;
      const std::size_t len = static_cast<std::size_t>(s.length);
      const descriptor_ptr desc = s.desc;
      const bool is_read = op.kind == op_kind::read;
      auto h = asio::bind_cancellation_slot(
          window[slot].signal.slot(),
          asio::bind_executor(strand, [me = this->shared_from_this(), slot, s = std::move(s)](std::error_code ec) mutable {
            me->slice_done(slot, std::move(s), ec);
          }));
      eng->with_transport(st.transport, [&](auto& t) {
        if (is_read)
          t.async_read(*desc, remote_offset, std::span<std::byte>(local, len), std::move(h));
        else
          t.async_write(*desc, remote_offset, std::span<const std::byte>(local, len), std::move(h));
      });
    }

    void slice_done(std::size_t slot, slice s, std::error_code ec) {
      window[slot].busy = false;
      window[slot].signal.slot().clear();
      free_slots.push_back(slot);
      --in_flight;
      auto& st = ops[s.op];
      --st.outstanding;
      if (!ec && s.desc != st.desc && !st.failed) {
        // Moved under a registration the op has since left (the owner
        // registered the segment again): the op's bytes would mix two.
        fail(s.op, errc::stale, incarnations_mixed(s.op, *s.desc, *st.desc), s.remote_offset);
      } else if (!ec) {
        result.ops[s.op].bytes += s.length;
        result.bytes += s.length;
      } else if (!stopping && !st.failed) {
        on_error(std::move(s), ec);
      }
      pump();
    }

    void on_error(slice s, std::error_code ec) {
      const std::size_t i = s.op;
      if (is_transient(ec) && s.attempts < eng->opts_.max_retries) {
        ++s.attempts;
        ++result.ops[i].retries;
        ++result.retries;
        retry_later(std::move(s));
        return;
      }
      if (needs_re_resolution(ec)) {
        auto& seg = segments[bt.ops[i].remote.segment];
        if (seg.current && s.desc != seg.current) {  // already re-resolved since this slice left
          s.desc = seg.current;
          retries.push_back(std::move(s));
          return;
        }
        if (!seg.re_resolved) {
          seg.re_resolved = true;
          seg.park_error = ec;
          seg.parked.push_back(std::move(s));
          seg.resolving = true;
          ++resolving;
          ++result.re_resolutions;
          const std::string name = bt.ops[i].remote.segment;
          eng->forget(name);
          eng->resolve(name, true, [me = this->shared_from_this(), name](kvx::error e, descriptor_ptr d) {
            asio::dispatch(me->strand, [me, name, e = std::move(e), d = std::move(d)] { me->resolved(name, e, d); });
          });
          return;
        }
        if (seg.resolving) {
          seg.parked.push_back(std::move(s));
          return;
        }
      }
      fail(i, ec, is_transient(ec) ? "after " + std::to_string(s.attempts) + " retries" : std::string(), s.remote_offset);
    }

    // Re-issues `s` after the backoff of its attempt (at once when it is zero).
    void retry_later(slice s) {
      auto delay = eng->opts_.retry_backoff;
      for (std::uint32_t a = 1; a < s.attempts && delay < eng->opts_.max_retry_backoff; ++a) delay *= 2;
      delay = std::min(delay, eng->opts_.max_retry_backoff);
      if (delay <= std::chrono::steady_clock::duration::zero()) {
        retries.push_back(std::move(s));
        return;
      }
      auto t = backoff_timers.emplace(backoff_timers.end(), strand, delay);
      t->async_wait([me = this->shared_from_this(), t, s = std::move(s)](boost::system::error_code) mutable {
        me->backoff_timers.erase(t);
        if (!me->stopping) me->retries.push_back(std::move(s));
        me->pump();
      });
    }

    void finish_re_resolution(segment_state& seg, const kvx::error& e, descriptor_ptr d) {
      auto parked = std::move(seg.parked);
      seg.parked.clear();
      const bool fresh = !e && d && seg.current && (d->generation != seg.current->generation || d->key != seg.current->key);
      if (!fresh) {
        for (auto& s : parked)
          fail(s.op, seg.park_error,
               e ? "re-resolving after '" + seg.park_error.message() + "' failed: " + e.message()
                 : "the re-fetched descriptor is unchanged",
               s.remote_offset);
        return;
      }
      seg.current = d;
      for (auto& s : parked) {
        // Ops on this segment continue with the fresh descriptor and a
        // transport chosen for it; an op that already moved bytes under the
        // old registration fails instead (its bytes would mix the two).
        const std::size_t i = s.op;
        if (ops[i].desc != d) rebind_op(i, d, s.remote_offset);
        if (ops[i].failed) continue;
        s.desc = d;
        retries.push_back(std::move(s));
      }
      for (std::size_t i = 0; i < bt.ops.size(); ++i)
        if (ops[i].desc && ops[i].desc != d && !ops[i].failed && bt.ops[i].remote.segment == d->name)
          rebind_op(i, d, bt.ops[i].remote.offset);
    }

    // Moves op `i` to the segment's new registration `d`, unless some of its
    // bytes already moved under the old one: then it fails (`stale`).
    void rebind_op(std::size_t i, const descriptor_ptr& d, std::uint64_t remote_offset) {
      if (result.ops[i].bytes > 0) return fail(i, errc::stale, incarnations_mixed(i, *ops[i].desc, *d), remote_offset);
      bind_op(i, d);
    }

    std::string incarnations_mixed(std::size_t i, const memory::segment_descriptor& old_desc,
                                   const memory::segment_descriptor& new_desc) const {
      return "the segment was registered again (generation " + std::to_string(old_desc.generation) + " -> " +
             std::to_string(new_desc.generation) + ") after " + std::to_string(result.ops[i].bytes) +
             " bytes of this operation had moved under the old registration; retry the operation";
    }

    void stop(std::error_code ec) {
      if (stopping || finished) return;
      stopping = true;
      stop_code = ec;
      retries.clear();
      for (auto& t : backoff_timers) t.cancel();
      for (auto& w : window)
        if (w.busy) w.signal.emit(asio::cancellation_type::terminal);
      pump();
    }

    void finish() {
      if (finished) return;
      finished = true;
      timer.cancel();
      for (std::size_t i = 0; i < ops.size(); ++i) {
        auto& st = ops[i];
        const bool complete = st.failed || bt.ops[i].total_bytes() == 0 || result.ops[i].bytes == bt.ops[i].total_bytes();
        if (!complete) {
          if (stopping) {
            fail(i, stop_code, stop_code == errc::timed_out ? "the batch deadline passed" : "the batch was cancelled",
                 bt.ops[i].remote.offset);
          } else {
            fail(i, errc::internal, "finished with bytes missing", bt.ops[i].remote.offset);
          }
        }
      }
      std::error_code ec = stopping ? stop_code : result.first_error().code();
      if (auto slot = asio::get_associated_cancellation_slot(handler); slot.is_connected()) slot.clear();
      auto ex = eng->ex_;
      kvx::detail::post_completion(ex, std::move(handler), ec, std::move(result));
    }
  };

  Metadata& meta_;
  executor_type ex_;
  engine_options opts_;
  memory::segment_table table_;
  std::tuple<Transports*...> transports_;
  std::array<transport::transport_capabilities, transport_count> caps_{};  // per transport, run-time where known
  std::array<std::size_t, transport_count> order_{};
  std::mutex cache_mutex_;
  std::map<std::string, descriptor_ptr, std::less<>> cache_;
  std::vector<std::string> registered_;  // guarded by cache_mutex_
  // Deregistered here, but the backend's remove failed: the descriptor may
  // still be published. Guarded by cache_mutex_.
  std::set<std::string, std::less<>> left_published_;
  // Withdrawn from the table, but some transports still hold them (a peer's
  // copy outlived the revoke timeout): their memory is not free to reuse.
  struct draining_segment {
    memory::local_segment segment;
    std::vector<std::size_t> transports;
  };
  std::vector<draining_segment> draining_;  // guarded by cache_mutex_
};

}  // namespace kvx::transfer
