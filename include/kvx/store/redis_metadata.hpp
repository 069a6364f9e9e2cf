#pragma once
//! \file
//! `kvx::store::redis_metadata`: cluster state in a Redis server (Debian's
//! `redis-server`), a `kvx::transfer::metadata_backend`, plus leases.
//!
//! The client speaks RESP over `asio::ip::tcp` with hiredis's reply parser
//! (so this header needs `kvx::redis`); see docs/store-metadata.md for why not
//! hiredis's own async context. Each operation is a coroutine on the
//! backend's strand that borrows a keep-alive connection from a small pool
//! (or opens one), so concurrent operations run on concurrent connections and
//! a dead connection never blocks the others.
//!
//! What is stored where (`P` is `options.prefix`):
//! | data | Redis key | type |
//! | --- | --- | --- |
//! | metadata entry `k` | `P` `kv/` `k` | string |
//! | lease `n` | `P` `lease/` `n` | string holding the owner, with a TTL (PX) |
//!
//! Errors: `errc::not_found`, `errc::busy` (a lease held by someone else),
//! `errc::unreachable` (connect refused), `errc::connection_lost` (the server
//! went away mid-command), `errc::timed_out` (`options.timeout`, or the
//! caller's `kvx::cancel_after`), `errc::cancelled`, `errc::protocol_error`
//! (an unexpected reply, e.g. `-ERR`), `errc::capacity_exceeded` (`-OOM`).
//! After a connection loss the next operation reconnects; an operation that
//! failed on a pooled connection before any reply byte arrived (the server
//! restarted while it sat idle) is retried once on a fresh connection.
//!
//! Thread-safety: operations may be started from any thread; completions run
//! on the handler's associated executor (default: `get_executor()`).
//! Nothing blocks. The object may be destroyed with operations in flight
//! (they hold the shared state), but the executor must outlive them.
//!
//! \code
//! kvx::store::redis_metadata meta(io.get_executor(), {.address = "127.0.0.1:6379", .prefix = "cluster-a/"});
//! co_await meta.async_put("kvx/segment/kv", descriptor.dump(), asio::use_awaitable);
//! std::error_code ec = co_await meta.async_acquire_lease("master", "node-1", 3s, asio::use_awaitable);  // errc::busy if held
//! \endcode

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <memory>
#include <stdexcept>
#include <string>
#include <system_error>
#include <tuple>
#include <utility>
#include <vector>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/strand.hpp>

#include <kvx/core/async.hpp>
#include <kvx/core/config.hpp>
#include <kvx/core/log.hpp>
#include <kvx/core/result.hpp>
#include <kvx/store/detail/metadata_client.hpp>
#include <kvx/store/detail/redis_connection.hpp>
#include <kvx/store/detail/redis_protocol.hpp>
#include <kvx/transfer/metadata_backend.hpp>

namespace kvx::store {

//! A RESP reply, as returned by `redis_metadata::async_execute`.
using redis_reply = detail::redis_reply;

//! Settings of a `redis_metadata`.
struct redis_options {
  std::string address = "127.0.0.1:6379";        //!< host:port of the server
  std::string prefix;                             //!< namespace of every key this backend writes
  std::chrono::milliseconds timeout{5000};        //!< default deadline of each operation; 0 = none
  std::size_t max_idle_connections = 8;           //!< keep-alive connections kept for reuse
  std::size_t list_batch = 512;                   //!< SCAN COUNT and MGET batch size of async_list

  //! Reads `address`, `prefix`, `timeout_ms`, `max_idle_connections` (other
  //! fields are the caller's to check); errors name the field.
  static result<redis_options> from_config(const config::view& v) {
    redis_options o;
    KVX_TRY(detail::read_client_options(v, o));
    return o;
  }
};

namespace detail {

inline std::error_code redis_error_of(const redis_reply& r) {
  if (r.str.rfind("OOM", 0) == 0) return errc::capacity_exceeded;
  return errc::protocol_error;
}

struct redis_state {
  redis_state(asio::any_io_executor e, redis_options o)
      : ex(std::move(e)), strand(asio::make_strand(ex)), options(std::move(o)), pool(options.max_idle_connections) {
    auto parsed = parse_host_port(options.address);
    if (!parsed) throw std::invalid_argument("kvx::store::redis_metadata: " + parsed.error().message());
    // A SCAN or MGET answer of more elements than the reply parser takes would fail every list.
    if (options.list_batch == 0 || options.list_batch > static_cast<std::size_t>(max_reply_elements))
      throw std::invalid_argument("kvx::store::redis_metadata: list_batch must be 1.." + std::to_string(max_reply_elements) +
                                  ", got " + std::to_string(options.list_batch));
    where = *parsed;
  }

  asio::any_io_executor ex;
  asio::strand<asio::any_io_executor> strand;
  redis_options options;
  host_port where;
  idle_pool<redis_connection> pool;

  std::string data_key(std::string_view key) const { return options.prefix + "kv/" + std::string(key); }
  std::string lease_key(std::string_view name) const { return options.prefix + "lease/" + std::string(name); }

  // Runs `commands` on a pooled or fresh connection (see the retry rule in
  // the header comment). Runs on the strand.
  asio::awaitable<std::tuple<std::error_code, std::vector<redis_reply>>> run(std::vector<redis_command> commands) {
    for (int attempt = 0;; ++attempt) {
      auto conn = pool.take();
      const bool reused = static_cast<bool>(conn);
      if (!conn) {
        conn = std::make_unique<redis_connection>(strand);
        if (auto ec = co_await conn->connect(where)) {
          log(log_level::debug, "kvx redis ", options.address, ": connect: ", ec.message());
          co_return std::tuple{ec, std::vector<redis_reply>{}};
        }
      }
      bool received_any = false;
      auto [ec, replies] = co_await conn->execute(commands, received_any);
      if (!ec) {
        pool.give_back(std::move(conn));
        co_return std::tuple{ec, std::move(replies)};
      }
      if (reused && !received_any && attempt == 0 && ec == errc::connection_lost) {
        // The server closed this idle connection (restart, idle timeout):
        // nothing was executed, so try once more on a fresh one.
        pool.clear();
        continue;
      }
      log(log_level::debug, "kvx redis ", options.address, ": ", ec.message());
      co_return std::tuple{ec, std::vector<redis_reply>{}};
    }
  }

  asio::awaitable<std::tuple<std::error_code, redis_reply>> run_one(redis_command command) {
    std::vector<redis_command> commands;
    commands.push_back(std::move(command));
    auto [ec, replies] = co_await run(std::move(commands));
    if (ec) co_return std::tuple{ec, redis_reply{}};
    co_return std::tuple{ec, std::move(replies.front())};
  }
};

inline constexpr const char* redis_acquire_script =
    "local cur = redis.call('GET', KEYS[1]) "
    "if not cur then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end "
    "if cur == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end "
    "return 0";
inline constexpr const char* redis_renew_script =
    "local cur = redis.call('GET', KEYS[1]) "
    "if not cur then return -1 end "
    "if cur ~= ARGV[1] then return 0 end "
    "redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1";
inline constexpr const char* redis_release_script =
    "local cur = redis.call('GET', KEYS[1]) "
    "if not cur then return -1 end "
    "if cur ~= ARGV[1] then return 0 end "
    "redis.call('DEL', KEYS[1]) return 1";

// 1: done, 0: held by someone else (busy), -1: no such lease (not_found).
inline std::error_code redis_lease_result(const redis_reply& r) {
  if (r.is_error()) return redis_error_of(r);
  if (r.type != redis_reply::kind::integer) return errc::protocol_error;
  if (r.integer == 1) return {};
  if (r.integer == 0) return errc::busy;
  return errc::not_found;
}

}  // namespace detail

//! A metadata backend on a Redis server. See the file comment.
class redis_metadata {
 public:
  using metadata_backend_concept = transfer::metadata_backend_tag;
  using executor_type = asio::any_io_executor;

  //! Throws `std::invalid_argument` if `options.address` is not host:port
  //! (validate config with `redis_options::from_config` to get an error instead)
  //! or `options.list_batch` is 0 or above `detail::max_reply_elements`.
  redis_metadata(executor_type ex, redis_options options)
      : state_(std::make_shared<detail::redis_state>(std::move(ex), std::move(options))) {}

  [[nodiscard]] executor_type get_executor() const noexcept { return state_->ex; }
  [[nodiscard]] const redis_options& options() const noexcept { return state_->options; }

  //! Creates or overwrites `key`. Completion: `void(std::error_code)`.
  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_put(std::string key, std::string value, CompletionToken&& token) {
    return launch<void(std::error_code)>(std::forward<CompletionToken>(token),
                                         [s = state_, key = std::move(key), value = std::move(value)]()
                                             -> asio::awaitable<std::tuple<std::error_code>> {
                                           const auto k = s->data_key(key);
                                           detail::redis_command c;
                                           c.arg("SET").arg(k).arg(value);
                                           auto [ec, r] = co_await s->run_one(std::move(c));
                                           if (!ec && r.is_error()) ec = detail::redis_error_of(r);
                                           co_return std::tuple{ec};
                                         });
  }

  //! The value of `key`; `errc::not_found` when absent.
  template <asio::completion_token_for<void(std::error_code, std::string)> CompletionToken>
  auto async_get(std::string key, CompletionToken&& token) {
    return launch<void(std::error_code, std::string)>(
        std::forward<CompletionToken>(token),
        [s = state_, key = std::move(key)]() -> asio::awaitable<std::tuple<std::error_code, std::string>> {
          const auto k = s->data_key(key);
          detail::redis_command c;
          c.arg("GET").arg(k);
          auto [ec, r] = co_await s->run_one(std::move(c));
          if (ec) co_return std::tuple{ec, std::string{}};
          if (r.is_nil()) co_return std::tuple{make_error_code(errc::not_found), std::string{}};
          if (r.type != detail::redis_reply::kind::string)
            co_return std::tuple{r.is_error() ? detail::redis_error_of(r) : make_error_code(errc::protocol_error),
                                 std::string{}};
          co_return std::tuple{std::error_code{}, std::move(r.str)};
        });
  }

  //! Removes `key`; `errc::not_found` when absent.
  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_remove(std::string key, CompletionToken&& token) {
    return launch<void(std::error_code)>(
        std::forward<CompletionToken>(token),
        [s = state_, key = std::move(key)]() -> asio::awaitable<std::tuple<std::error_code>> {
          const auto k = s->data_key(key);
          detail::redis_command c;
          c.arg("DEL").arg(k);
          auto [ec, r] = co_await s->run_one(std::move(c));
          if (!ec) {
            if (r.is_error())
              ec = detail::redis_error_of(r);
            else if (r.type != detail::redis_reply::kind::integer)
              ec = errc::protocol_error;
            else if (r.integer == 0)
              ec = errc::not_found;
          }
          co_return std::tuple{ec};
        });
  }

  //! Every entry whose key starts with `prefix`, sorted by key. Not a
  //! snapshot: it is SCAN then MGET, so an entry removed meanwhile is left out
  //! and one added meanwhile may or may not appear.
  template <asio::completion_token_for<void(std::error_code, transfer::metadata_entries)> CompletionToken>
  auto async_list(std::string prefix, CompletionToken&& token) {
    using entries = transfer::metadata_entries;
    return launch<void(std::error_code, entries)>(
        std::forward<CompletionToken>(token),
        [s = state_, prefix = std::move(prefix)]() -> asio::awaitable<std::tuple<std::error_code, entries>> {
          const auto base = s->data_key("");
          const auto pattern = detail::redis_glob_escape(base + prefix) + "*";
          const auto count = static_cast<long long>(s->options.list_batch);
          std::vector<std::string> keys;
          std::string cursor = "0";
          do {
            detail::redis_command c;
            c.arg("SCAN").arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(count);
            auto [ec, r] = co_await s->run_one(std::move(c));
            if (ec) co_return std::tuple{ec, entries{}};
            if (r.type != detail::redis_reply::kind::array || r.elements.size() != 2 ||
                r.elements[1].type != detail::redis_reply::kind::array)
              co_return std::tuple{r.is_error() ? detail::redis_error_of(r) : make_error_code(errc::protocol_error),
                                   entries{}};
            cursor = r.elements[0].str;
            for (auto& k : r.elements[1].elements) keys.push_back(std::move(k.str));
          } while (cursor != "0");
          std::sort(keys.begin(), keys.end());
          keys.erase(std::unique(keys.begin(), keys.end()), keys.end());  // SCAN may repeat a key
          entries out;
          out.reserve(keys.size());
          for (std::size_t first = 0; first < keys.size(); first += s->options.list_batch) {
            const auto last = std::min(keys.size(), first + s->options.list_batch);
            detail::redis_command c;
            c.arg("MGET");
            for (auto i = first; i < last; ++i) c.arg(keys[i]);
            auto [ec, r] = co_await s->run_one(std::move(c));
            if (ec) co_return std::tuple{ec, entries{}};
            if (r.type != detail::redis_reply::kind::array || r.elements.size() != last - first)
              co_return std::tuple{r.is_error() ? detail::redis_error_of(r) : make_error_code(errc::protocol_error),
                                   entries{}};
            for (auto i = first; i < last; ++i) {
              auto& v = r.elements[i - first];
              if (v.type == detail::redis_reply::kind::string) out.emplace_back(keys[i].substr(base.size()), std::move(v.str));
            }
          }
          co_return std::tuple{std::error_code{}, std::move(out)};
        });
  }

  //! Takes lease `name` for `owner` for `ttl` (SET NX PX semantics, in one Lua
  //! script): succeeds when the lease is free or already `owner`'s (then its
  //! TTL is reset); `errc::busy` when someone else holds it. The lease ends by
  //! itself `ttl` after the last acquire/renew.
  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_acquire_lease(std::string name, std::string owner, std::chrono::milliseconds ttl, CompletionToken&& token) {
    return lease_op(redis_detail_script::acquire, std::move(name), std::move(owner), ttl,
                    std::forward<CompletionToken>(token));
  }

  //! Extends `owner`'s lease to `ttl` from now; `errc::not_found` when it
  //! expired (or was never taken), `errc::busy` when someone else holds it.
  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_renew_lease(std::string name, std::string owner, std::chrono::milliseconds ttl, CompletionToken&& token) {
    return lease_op(redis_detail_script::renew, std::move(name), std::move(owner), ttl,
                    std::forward<CompletionToken>(token));
  }

  //! Ends `owner`'s lease now (compare-and-delete in a Lua script);
  //! `errc::not_found` when it already expired, `errc::busy` when it is not `owner`'s.
  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_release_lease(std::string name, std::string owner, CompletionToken&& token) {
    return lease_op(redis_detail_script::release, std::move(name), std::move(owner), std::chrono::milliseconds(1),
                    std::forward<CompletionToken>(token));
  }

  //! The current holder of lease `name`; `errc::not_found` when free.
  template <asio::completion_token_for<void(std::error_code, std::string)> CompletionToken>
  auto async_lease_holder(std::string name, CompletionToken&& token) {
    return launch<void(std::error_code, std::string)>(
        std::forward<CompletionToken>(token),
        [s = state_, name = std::move(name)]() -> asio::awaitable<std::tuple<std::error_code, std::string>> {
          const auto k = s->lease_key(name);
          detail::redis_command c;
          c.arg("GET").arg(k);
          auto [ec, r] = co_await s->run_one(std::move(c));
          if (ec) co_return std::tuple{ec, std::string{}};
          if (r.is_nil()) co_return std::tuple{make_error_code(errc::not_found), std::string{}};
          if (r.type != detail::redis_reply::kind::string) co_return std::tuple{make_error_code(errc::protocol_error), std::string{}};
          co_return std::tuple{std::error_code{}, std::move(r.str)};
        });
  }

  //! Runs one raw command (arguments as given, binary-safe) and completes with
  //! its reply; a Redis error reply is a reply, not an error code. For tools
  //! and tests (e.g. `CONFIG SET`); keys are not prefixed.
  template <asio::completion_token_for<void(std::error_code, redis_reply)> CompletionToken>
  auto async_execute(std::vector<std::string> args, CompletionToken&& token) {
    return launch<void(std::error_code, redis_reply)>(
        std::forward<CompletionToken>(token),
        [s = state_, args = std::move(args)]() -> asio::awaitable<std::tuple<std::error_code, redis_reply>> {
          if (args.empty()) co_return std::tuple{make_error_code(errc::invalid_argument), redis_reply{}};
          detail::redis_command c;
          for (const auto& a : args) c.arg(a);
          co_return co_await s->run_one(std::move(c));
        });
  }

 private:
  enum class redis_detail_script { acquire, renew, release };

  template <class Signature, class CompletionToken, class Make>
  auto launch(CompletionToken&& token, Make make) {
    return detail::launch<Signature>(state_->ex, state_->strand, state_->options.timeout,
                                     std::forward<CompletionToken>(token), std::move(make));
  }

  template <class CompletionToken>
  auto lease_op(redis_detail_script which, std::string name, std::string owner, std::chrono::milliseconds ttl,
                CompletionToken&& token) {
    return launch<void(std::error_code)>(
        std::forward<CompletionToken>(token),
        [s = state_, which, name = std::move(name), owner = std::move(owner),
         ttl]() -> asio::awaitable<std::tuple<std::error_code>> {
          if (ttl.count() <= 0 || name.empty()) co_return std::tuple{make_error_code(errc::invalid_argument)};
          const char* script = which == redis_detail_script::acquire ? detail::redis_acquire_script
                               : which == redis_detail_script::renew ? detail::redis_renew_script
                                                                     : detail::redis_release_script;
          const auto k = s->lease_key(name);
          detail::redis_command c;
          c.arg("EVAL").arg(script).arg("1").arg(k).arg(owner).arg(static_cast<long long>(ttl.count()));
          auto [ec, r] = co_await s->run_one(std::move(c));
          if (!ec) ec = detail::redis_lease_result(r);
          co_return std::tuple{ec};
        });
  }

  std::shared_ptr<detail::redis_state> state_;
};

static_assert(transfer::check_metadata_backend<redis_metadata>());

}  // namespace kvx::store
