#pragma once
//! \file
//! `store_client<Engine>`: the object API of the distributed KV pool.
//!
//! Control goes to the master (`master_client`), bytes go node-to-client
//! through the transfer engine, zero-copy: `async_get` reads straight from
//! the holder's segment into the caller's buffer, `async_put` writes straight
//! from the caller's buffer into every replica. The caller's buffers must lie
//! in memory registered with the engine (any sub-range of a registered
//! region).
//!
//! | operation | completion | semantics |
//! | --- | --- | --- |
//! | `async_put(key, bytes, options, token)` | `void(std::error_code)` | allocate on the master, write every replica, commit; on failure abort (nothing half-written is ever visible). The writes end inside the put lease granted: `options.lease` asks for a longer (or shorter) one than the master's default, up to its `max_put_lease` (more: `invalid_argument`) |
//! | `async_get(key, dst, token)` | `void(std::error_code, std::uint64_t size)` | lease, read from the nearest replica (the next one if it fails, or if the engine's batch deadline, `engine_options::deadline`, passes: the only end for a dead node over a transport that cannot see deaths), release the lease (a notification sent without waiting) |
//! | `async_remove(key, token)` | `void(std::error_code)` | `errc::busy` while a reader holds a lease |
//! | `async_exists(key, token)` | `void(std::error_code, bool)` | |
//! | `async_longest_prefix(tenant, keys, token)` | `void(std::error_code, std::size_t)` | how many leading keys are stored |
//! | `async_put_batch` / `async_get_batch` / `async_remove_batch` | `void(std::error_code, std::vector<std::error_code>)` | the single operations run concurrently; the first code is the first failure |
//!
//! Objects are sliced by the engine, so their size is bounded only by the
//! segments (tested to 4 GiB where memory allows). Errors are `kvx::errc`
//! codes; their context goes to the log at `info`.

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <kvx/core/async.hpp>
#include <kvx/core/log.hpp>
#include <kvx/transfer/batch_deadline.hpp>
#include <kvx/store/master_client.hpp>
#include <kvx/store/master_state.hpp>
#include <kvx/transfer/batch.hpp>

namespace kvx::store {

struct client_options {
  std::string node;                //!< this client's node (locality of reads and placement)
  unsigned replicas = 1;           //!< default replicas per put
  std::chrono::milliseconds lease{5000};  //!< read lease asked for each get (the master cuts it to its `max_read_lease`)
  //! Transfers end this long before the master's deadline for them (a put's
  //! lease, a get's read lease): past it the master may give the range to
  //! another object, and bytes the transport sent before cancelling may
  //! still land at the node this much later.
  std::chrono::milliseconds lease_margin{250};
};

template <class Engine>
class store_client {
 public:
  using executor_type = asio::any_io_executor;
  using json = protocol::json;

  store_client(Engine& engine, std::shared_ptr<master_client> master, client_options options)
      : engine_(engine), master_(std::move(master)), options_(std::move(options)) {}

  [[nodiscard]] executor_type get_executor() const { return engine_.get_executor(); }

  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_put(object_key key, std::span<const std::byte> bytes, put_options opt, CompletionToken&& token) {
    return run<void(std::error_code)>(std::forward<CompletionToken>(token),
                                      [this, key = std::move(key), bytes, opt]() { return put_impl(key, bytes, opt); });
  }
  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_put(object_key key, std::span<const std::byte> bytes, CompletionToken&& token) {
    return async_put(std::move(key), bytes, default_put_options(), std::forward<CompletionToken>(token));
  }

  template <asio::completion_token_for<void(std::error_code, std::uint64_t)> CompletionToken>
  auto async_get(object_key key, std::span<std::byte> dst, CompletionToken&& token) {
    return run<void(std::error_code, std::uint64_t)>(std::forward<CompletionToken>(token),
                                                     [this, key = std::move(key), dst]() { return get_impl(key, dst); });
  }

  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_remove(object_key key, CompletionToken&& token) {
    return run<void(std::error_code)>(std::forward<CompletionToken>(token), [this, key = std::move(key)]() -> asio::awaitable<std::error_code> {
      auto [ec, r] = co_await call(protocol::make_request("remove", "tenant", key.tenant, "key", key.key));
      co_return ec;
    });
  }

  template <asio::completion_token_for<void(std::error_code, bool)> CompletionToken>
  auto async_exists(object_key key, CompletionToken&& token) {
    return run<void(std::error_code, bool)>(std::forward<CompletionToken>(token),
                                            [this, key = std::move(key)]() -> asio::awaitable<std::tuple<std::error_code, bool>> {
                                              auto [ec, r] = co_await call(protocol::make_request("exists", "tenant", key.tenant, "key", key.key));
                                              if (ec) co_return std::tuple{ec, false};
                                              auto exists = answered<bool>(r, "exists", "exists", false);
                                              co_return std::tuple{exists ? std::error_code{} : exists.code(), exists && *exists};
                                            });
  }

  template <asio::completion_token_for<void(std::error_code, std::size_t)> CompletionToken>
  auto async_longest_prefix(std::string tenant, std::vector<std::string> keys, CompletionToken&& token) {
    return run<void(std::error_code, std::size_t)>(
        std::forward<CompletionToken>(token),
        [this, tenant = std::move(tenant), keys = std::move(keys)]() -> asio::awaitable<std::tuple<std::error_code, std::size_t>> {
          auto [ec, r] = co_await call(protocol::make_request("longest_prefix", "tenant", tenant, "keys", keys));
          if (ec) co_return std::tuple{ec, std::size_t{0}};
          auto count = answered<std::uint64_t>(r, "longest_prefix", "count", 0);
          co_return std::tuple{count ? std::error_code{} : count.code(), count ? static_cast<std::size_t>(*count) : 0};
        });
  }

  struct put_item {
    object_key key;
    std::span<const std::byte> bytes;
  };
  struct get_item {
    object_key key;
    std::span<std::byte> dst;
  };

  template <asio::completion_token_for<void(std::error_code, std::vector<std::error_code>)> CompletionToken>
  auto async_put_batch(std::vector<put_item> items, CompletionToken&& token) {
    return run<void(std::error_code, std::vector<std::error_code>)>(
        std::forward<CompletionToken>(token), [this, items = std::move(items)]() {
          return for_all(items.size(), [this, &items](std::size_t i) {
            return put_impl(items[i].key, items[i].bytes, default_put_options());
          });
        });
  }

  template <asio::completion_token_for<void(std::error_code, std::vector<std::error_code>)> CompletionToken>
  auto async_get_batch(std::vector<get_item> items, CompletionToken&& token) {
    return run<void(std::error_code, std::vector<std::error_code>)>(
        std::forward<CompletionToken>(token), [this, items = std::move(items)]() {
          return for_all(items.size(), [this, &items](std::size_t i) -> asio::awaitable<std::error_code> {
            auto [ec, n] = co_await get_impl(items[i].key, items[i].dst);
            co_return ec;
          });
        });
  }

  template <asio::completion_token_for<void(std::error_code, std::vector<std::error_code>)> CompletionToken>
  auto async_remove_batch(std::vector<object_key> keys, CompletionToken&& token) {
    return run<void(std::error_code, std::vector<std::error_code>)>(
        std::forward<CompletionToken>(token), [this, keys = std::move(keys)]() {
          return for_all(keys.size(), [this, &keys](std::size_t i) -> asio::awaitable<std::error_code> {
            auto [ec, r] = co_await call(protocol::make_request("remove", "tenant", keys[i].tenant, "key", keys[i].key));
            co_return ec;
          });
        });
  }

 private:
  // The client's replicas and node (for locality-aware placement).
  put_options default_put_options() const {
    put_options opt;
    opt.replicas = options_.replicas;
    opt.preferred_node = options_.node;
    return opt;
  }

  // Runs the coroutine made by `make` and completes `token` with its result;
  // the token's cancellation slot reaches the awaited master call / transfer.
  template <class Signature, class CompletionToken, class Make>
  auto run(CompletionToken&& token, Make make) {
    return asio::async_initiate<CompletionToken, Signature>(
        [this](auto handler, Make mk) {
          auto slot = asio::get_associated_cancellation_slot(handler);
          auto ex = get_executor();
          asio::co_spawn(ex, [mk = std::move(mk)]() mutable { return invoke_owned(std::move(mk)); },
                         asio::bind_cancellation_slot(slot, [h = std::move(handler), ex](std::exception_ptr e, auto value) mutable {
                           if (e) {
                             complete_internal(ex, std::move(h), value);
                             return;
                           }
                           complete(ex, std::move(h), std::move(value));
                         }));
        },
        token, std::move(make));
  }

  // Keeps the lambda (and what it captured) alive for the whole coroutine.
  template <class Make>
  static auto invoke_owned(Make mk) -> decltype(mk()) {
    // Cancellation reaches the awaited operations, which complete with
    // `cancelled`; the coroutine still finishes its clean-up (abort, release).
    co_await asio::this_coro::throw_if_cancelled(false);
    co_return co_await mk();
  }

  template <class Handler>
  static void complete(const executor_type& ex, Handler h, std::error_code ec) {
    kvx::detail::post_completion(ex, std::move(h), ec);
  }
  template <class Handler, class... T>
  static void complete(const executor_type& ex, Handler h, std::tuple<std::error_code, T...> t) {
    std::apply([&](auto&&... a) { kvx::detail::post_completion(ex, std::move(h), std::move(a)...); }, std::move(t));
  }
  template <class Handler, class V>
  static void complete_internal(const executor_type& ex, Handler h, const V&) {
    if constexpr (std::is_same_v<V, std::error_code>)
      kvx::detail::post_completion(ex, std::move(h), make_error_code(errc::internal));
    else
      complete(ex, std::move(h), V{make_error_code(errc::internal), {}});
  }

  asio::awaitable<std::tuple<std::error_code, json>> call(json request) {
    auto [ec, r] = co_await master_->async_call(std::move(request), asio::as_tuple(asio::use_awaitable));
    if (ec) log(log_level::info, "store client '", options_.node, "': master: ", protocol::describe(ec, r));
    co_return std::tuple{std::error_code(ec), std::move(r)};
  }

  template <class One>
  asio::awaitable<std::tuple<std::error_code, std::vector<std::error_code>>> for_all(std::size_t n, One one) {
    std::vector<std::error_code> codes(n);
    // Run the single operations concurrently on the engine's executor, then gather.
    auto ex = co_await asio::this_coro::executor;
    std::size_t left = n;
    asio::steady_timer done(ex, asio::steady_timer::time_point::max());
    for (std::size_t i = 0; i < n; ++i)
      asio::co_spawn(ex, one(i), [&, i](std::exception_ptr e, std::error_code ec) {
        codes[i] = e ? make_error_code(errc::internal) : ec;
        if (--left == 0) done.cancel();
      });
    // Children reference this frame: wait for every one, even when cancelled.
    while (left > 0) co_await done.async_wait(asio::as_tuple(asio::use_awaitable));
    std::error_code first;
    for (auto c : codes)
      if (c && !first) first = c;
    co_return std::tuple{first, std::move(codes)};
  }

  // When the lease in `field` (ms left, as the master answered a request
  // sent at `asked`) ends on this host's clock; time_point::max() when the
  // answer has none (an older master).
  result<clock::time_point> answered_deadline(const json& answer, const char* op, const char* field,
                                              clock::time_point asked) const {
    auto d = protocol::deadline_field(config::view(answer, op), field, asked);
    if (!d) {
      log(log_level::warn, "store client '", options_.node, "': ", d.error().context());
      return error{errc::protocol_error, d.error().context()};
    }
    return d->value_or(clock::time_point::max());
  }

  // Sets `b`'s deadline to end its transfer `lease_margin` before `lease_end`
  // (or the engine's own deadline, if sooner); false when no time is left.
  bool bounded_by(transfer::batch& b, clock::time_point lease_end) const {
    return transfer::end_before(b, lease_end, options_.lease_margin, engine_.options().deadline);
  }

  // A field of the master's answer (`fallback` when absent); a wrong type is
  // logged and is `protocol_error` (json's value() would throw instead).
  template <class T>
  result<T> answered(const json& answer, const char* op, const char* field, T fallback) const {
    auto v = protocol::answer_field<T>(answer, op, field, std::move(fallback));
    if (!v) log(log_level::warn, "store client '", options_.node, "': ", v.error().context());
    return v;
  }

  // Coroutine parameters by value: callers pass temporaries.
  asio::awaitable<std::error_code> put_impl(object_key key, std::span<const std::byte> bytes, put_options opt) {
    auto start = protocol::make_request("put_start", "tenant", key.tenant, "key", key.key, "size", bytes.size(), "replicas", opt.replicas, "preferred_node", opt.preferred_node, "soft_pin", opt.soft_pin);
    if (opt.lease) {
      // Rounded up: a lease under 1 ms must not become 0, which asks for the default.
      const auto ms = std::chrono::ceil<std::chrono::milliseconds>(*opt.lease);
      if (ms <= std::chrono::milliseconds::zero()) {
        log(log_level::info, "store client '", options_.node, "': put '", key.full(), "': a put lease must be positive");
        co_return errc::invalid_argument;
      }
      start["lease_ms"] = ms.count();
    }
    const auto asked = clock::now();
    auto [ec, ticket] = co_await call(std::move(start));
    if (ec) co_return ec;
    auto replicas = protocol::replicas_from_json(ticket.value("replicas", json::array()), "put_start.replicas");
    auto put_id = answered<std::uint64_t>(ticket, "put_start", "put_id", 0);
    auto checksum = answered<bool>(ticket, "put_start", "checksum", false);
    auto lease_end = answered_deadline(ticket, "put_start", "deadline_ms", asked);
    if (!replicas || !put_id || !checksum || !lease_end) {
      // Unusable: the master reclaims the allocation when the put lease ends.
      log(log_level::warn, "store client '", options_.node, "': put '", key.full(), "': ",
          !replicas ? replicas.error().context() : "malformed put_start answer");
      co_return errc::protocol_error;
    }
    // The write must be over before the put lease ends: then the master
    // reclaims the ranges, and a later write would land in another object.
    transfer::batch b;
    for (const auto& r : *replicas) b.write(bytes, r.segment, r.offset);
    std::error_code tec;
    transfer::batch_result result;
    if (!bounded_by(b, *lease_end)) {
      tec = errc::timed_out;
      log(log_level::info, "store client '", options_.node, "': put '", key.full(), "': no time left in its put lease");
    } else {
      std::tie(tec, result) = co_await engine_.async_transfer(std::move(b), asio::as_tuple(asio::use_awaitable));
      if (tec) log(log_level::info, "store client '", options_.node, "': put '", key.full(), "': ", result.first_error().message());
    }
    if (tec) {
      // Best effort: if the abort is lost, the master reclaims the space when the put lease expires.
      (void)co_await call(protocol::make_request("put_abort", "tenant", key.tenant, "key", key.key, "put_id", *put_id));
      co_return tec;
    }
    auto commit = protocol::make_request("put_commit", "tenant", key.tenant, "key", key.key, "put_id", *put_id);
    // The master keeps ledgers for recovery after a failover: the nodes
    // check this against their bytes before reporting the object.
    if (*checksum) commit["checksum"] = protocol::object_checksum(bytes.data(), bytes.size());
    auto [cec, committed] = co_await call(std::move(commit));
    co_return cec;
  }

  asio::awaitable<std::tuple<std::error_code, std::uint64_t>> get_impl(object_key key, std::span<std::byte> dst) {
    const auto asked = clock::now();
    auto [ec, grant] = co_await call(protocol::make_request("get", "tenant", key.tenant, "key", key.key, "reader_node", options_.node, "lease_ms", options_.lease.count()));
    if (ec) co_return std::tuple{ec, std::uint64_t{0}};
    auto answered_size = answered<std::uint64_t>(grant, "get", "size", 0);
    const auto size = answered_size ? *answered_size : 0;
    auto replicas = protocol::replicas_from_json(grant.value("replicas", json::array()), "get.replicas");
    auto lease_end = answered_deadline(grant, "get", "lease_ms", asked);
    std::error_code result = replicas && answered_size && lease_end ? std::error_code{} : make_error_code(errc::protocol_error);
    if (!replicas) log(log_level::warn, "store client '", options_.node, "': get '", key.full(), "': ", replicas.error().context());
    if (!result && dst.size() < size) {
      log(log_level::info, "store client: get '", key.full(), "': buffer of ", dst.size(), " bytes for a ", size, "-byte object");
      result = errc::out_of_range;
    } else if (!result) {
      result = errc::not_found;
      for (const auto& r : *replicas) {
        // The read must be over while the lease holds: once it ends the
        // object may be evicted and its range given to another object.
        // A cancellation emitted between two awaits reaches no operation:
        // look before starting one.
        const auto before = co_await asio::this_coro::cancellation_state;
        if (before.cancelled() != asio::cancellation_type::none) {
          result = errc::cancelled;
          break;
        }
        transfer::batch b;
        b.read(dst.first(size), r.segment, r.offset);
        if (!bounded_by(b, *lease_end)) {
          log(log_level::info, "store client: get '", key.full(), "': no time left in its read lease");
          result = errc::timed_out;
          break;
        }
        auto [tec, res] = co_await engine_.async_transfer(std::move(b), asio::as_tuple(asio::use_awaitable));
        result = tec;
        // Done after the lease ended (the engine's deadline fires late on a
        // busy executor): the node may have read another object's bytes.
        if (!tec && clock::now() > *lease_end) {
          log(log_level::info, "store client: get '", key.full(), "': the read finished after its lease ended; its bytes are not trusted");
          result = errc::timed_out;
          break;
        }
        if (!tec) break;
        log(log_level::info, "store client: get '", key.full(), "' from ", r.node, ": ", res.first_error().message(),
            "; trying the next replica");
        if (tec == errc::cancelled) break;
        // timed_out is either the engine's batch deadline (this replica is
        // dead or stalled: try the next) or the caller's own deadline
        // (kvx::cancel_after), which cancelled this coroutine: stop.
        if (tec == errc::timed_out) {
          const auto cs = co_await asio::this_coro::cancellation_state;
          if (cs.cancelled() != asio::cancellation_type::none) break;
        }
      }
    }
    // A notification, not a call: the get completes without waiting for the
    // master, and the release rides with this client's next request. Best
    // effort: an unreleased lease only delays eviction until it expires.
    const json lease_id = grant.is_object() ? grant.value("lease_id", json(0)) : json(0);
    master_->notify(protocol::make_request("release", "tenant", key.tenant, "key", key.key, "lease_id",
                                           lease_id.is_number_unsigned() ? lease_id.template get<std::uint64_t>() : 0));
    co_return std::tuple{result, result ? std::uint64_t{0} : size};
  }

  Engine& engine_;
  std::shared_ptr<master_client> master_;
  client_options options_;
};

}  // namespace kvx::store
