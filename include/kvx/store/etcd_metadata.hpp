#pragma once
//! \file
//! `kvx::store::etcd_metadata`: cluster state in etcd (v3, through its
//! HTTP/JSON gateway, with Boost.Beast), a `kvx::transfer::metadata_backend`,
//! plus etcd's own primitives the store needs: leases (grant, keep-alive,
//! revoke), lease-bound puts, create-if-absent and compare-and-swap
//! transactions, and named leases with the same API as `redis_metadata`.
//! Leader election on top of these is `kvx::store::etcd_election`.
//!
//! Each operation is a coroutine on the backend's strand that borrows an idle
//! keep-alive HTTP/1.1 connection or opens one (no pipelining: concurrent
//! operations use concurrent connections, at most `max_idle_connections`
//! are kept). No library beyond Boost and nlohmann/json is needed.
//!
//! What is stored where (`P` is `options.prefix`; etcd keys and values are
//! bytes, base64 on the wire):
//! | data | etcd key | notes |
//! | --- | --- | --- |
//! | metadata entry `k` | `P` `kv/` `k` | plain key, no lease |
//! | named lease `n` | `P` `lease/` `n` | value = owner, bound to an etcd lease of the requested TTL |
//! | election `e` | `P` `election/` `e` | value = leader id, bound to the leader's etcd lease |
//!
//! Errors: `errc::not_found`, `errc::already_exists` (create of a present
//! key), `errc::busy` (a compare that failed; a lease held by someone else),
//! `errc::unreachable`, `errc::connection_lost`, `errc::timed_out`
//! (`options.timeout` or `kvx::cancel_after`), `errc::cancelled`,
//! `errc::capacity_exceeded` (a value above etcd's `--max-request-bytes`,
//! 1.5 MiB by default: a 1 MiB value needs about 1.4 MiB of JSON),
//! `errc::malformed_message` / `errc::protocol_error` (a reply kvx does not
//! understand). A request that failed on a pooled connection before any reply
//! byte arrived is retried once on a fresh connection; so the backend
//! reconnects to a restarted server by itself.
//!
//! Thread-safety: operations may be started from any thread; completions run
//! on the handler's associated executor (default: `get_executor()`). Copies
//! share one client (connections, options). Nothing blocks.
//!
//! \code
//! kvx::store::etcd_metadata meta(io.get_executor(), {.address = "127.0.0.1:2379", .prefix = "cluster-a/"});
//! co_await meta.async_put("kvx/segment/kv", descriptor.dump(), asio::use_awaitable);
//! auto [ec, lease] = co_await meta.async_grant_lease(5s, asio::use_awaitable);
//! \endcode

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
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
#include <kvx/store/detail/etcd_http.hpp>
#include <kvx/store/detail/metadata_client.hpp>
#include <kvx/transfer/metadata_backend.hpp>

namespace kvx::store {

//! Settings of an `etcd_metadata`.
struct etcd_options {
  std::string address = "127.0.0.1:2379";           //!< host:port of an etcd client URL (plain http)
  std::string prefix;                                //!< namespace of every key this backend writes
  std::chrono::milliseconds timeout{5000};           //!< default deadline of each operation; 0 = none
  std::size_t max_idle_connections = 8;              //!< keep-alive connections kept for reuse
  std::uint64_t max_response_bytes = 256ull << 20;   //!< largest reply accepted (a big async_list)

  //! Reads `address`, `prefix`, `timeout_ms`, `max_idle_connections`; errors name the field.
  static result<etcd_options> from_config(const config::view& v) {
    etcd_options o;
    KVX_TRY(detail::read_client_options(v, o));
    return o;
  }
};

//! An etcd lease id (0: none).
using etcd_lease_id = std::int64_t;

//! One key as etcd holds it.
struct etcd_entry {
  std::string key;  //!< without the backend's prefix
  std::string value;
  std::int64_t create_revision = 0;
  std::int64_t mod_revision = 0;
  etcd_lease_id lease = 0;
};

namespace detail {

struct etcd_state {
  etcd_state(asio::any_io_executor e, etcd_options o)
      : ex(std::move(e)), strand(asio::make_strand(ex)), options(std::move(o)), pool(options.max_idle_connections) {
    auto parsed = parse_host_port(options.address);
    if (!parsed) throw std::invalid_argument("kvx::store::etcd_metadata: " + parsed.error().message());
    where = *parsed;
  }

  asio::any_io_executor ex;
  asio::strand<asio::any_io_executor> strand;
  etcd_options options;
  host_port where;
  idle_pool<etcd_connection> pool;

  // Runs on the strand. (Callers build `body` in a named variable: GCC 12
  // cannot keep a braced json temporary alive across a co_await.)
  asio::awaitable<std::tuple<std::error_code, json>> call(std::string_view target, const json& body) {
    const auto text = body.dump();
    for (int attempt = 0;; ++attempt) {
      auto conn = pool.take();
      const bool reused = static_cast<bool>(conn);
      if (!conn) {
        conn = std::make_unique<etcd_connection>(strand);
        if (auto ec = co_await conn->connect(where)) {
          log(log_level::debug, "kvx etcd ", options.address, ": connect: ", ec.message());
          co_return std::tuple{ec, json{}};
        }
      }
      bool got_reply = false;
      auto [ec, reply] = co_await conn->post(options.address, target, text, options.max_response_bytes, got_reply);
      if (conn->reusable()) pool.give_back(std::move(conn));
      if (ec && reused && !got_reply && attempt == 0 && ec == errc::connection_lost) {
        // The server closed this idle connection (restart): nothing was
        // executed, so try once more on a fresh one.
        pool.clear();
        continue;
      }
      if (ec) log(log_level::debug, "kvx etcd ", options.address, " ", target, ": ", ec.message());
      co_return std::tuple{ec, std::move(reply)};
    }
  }

  // A kv of a range reply; nothing when it is not one (proto3 JSON leaves an
  // empty value out, so only the key must be there).
  static std::optional<etcd_entry> entry_of(const json& kv, std::size_t strip) {
    if (!kv.is_object()) return std::nullopt;
    auto k = kv.find("key");
    auto v = kv.find("value");
    if (k == kv.end() || !k->is_string() || (v != kv.end() && !v->is_string())) return std::nullopt;
    auto key = base64_decode(k->get_ref<const std::string&>());
    auto value = base64_decode(v == kv.end() ? std::string() : v->get_ref<const std::string&>());
    if (!key || !value || key->size() < strip) return std::nullopt;
    return etcd_entry{key->substr(strip), std::move(*value), etcd_int(kv, "create_revision"), etcd_int(kv, "mod_revision"),
                      etcd_int(kv, "lease")};
  }

  // A single key's entry, or not_found.
  asio::awaitable<std::tuple<std::error_code, etcd_entry>> range_one(std::string full_key, std::size_t strip) {
    const json request{{"key", base64_encode(full_key)}};
    auto [ec, reply] = co_await call("/v3/kv/range", request);
    if (ec) co_return std::tuple{ec, etcd_entry{}};
    auto kvs = reply.find("kvs");
    if (kvs == reply.end() || !kvs->is_array() || kvs->empty()) co_return std::tuple{make_error_code(errc::not_found), etcd_entry{}};
    auto entry = entry_of(kvs->front(), strip);
    if (!entry) co_return std::tuple{make_error_code(errc::malformed_message), etcd_entry{}};
    co_return std::tuple{std::error_code{}, std::move(*entry)};
  }

  asio::awaitable<std::tuple<std::error_code, std::int64_t>> keep_alive(etcd_lease_id id) {
    const json request{{"ID", std::to_string(id)}};
    auto [ec, reply] = co_await call("/v3/lease/keepalive", request);
    if (ec) co_return std::tuple{ec, std::int64_t{0}};
    auto result = reply.find("result");
    if (result == reply.end() || !result->is_object()) {
      if (reply.contains("error")) co_return std::tuple{etcd_status_error(reply["error"]), std::int64_t{0}};
      co_return std::tuple{make_error_code(errc::malformed_message), std::int64_t{0}};
    }
    const auto ttl = etcd_int(*result, "TTL");
    if (ttl <= 0) co_return std::tuple{make_error_code(errc::not_found), std::int64_t{0}};
    co_return std::tuple{std::error_code{}, ttl};
  }

  asio::awaitable<std::tuple<std::error_code, etcd_lease_id>> grant(std::chrono::seconds ttl) {
    const json request{{"TTL", ttl.count()}};
    auto [ec, reply] = co_await call("/v3/lease/grant", request);
    if (ec) co_return std::tuple{ec, etcd_lease_id{0}};
    const auto id = etcd_int(reply, "ID");
    if (id == 0) co_return std::tuple{make_error_code(errc::protocol_error), etcd_lease_id{0}};
    co_return std::tuple{std::error_code{}, id};
  }

  asio::awaitable<std::error_code> revoke(etcd_lease_id id) {
    const json request{{"ID", std::to_string(id)}};
    auto [ec, reply] = co_await call("/v3/lease/revoke", request);
    co_return ec;
  }

  // Creates `full_key` (= value, bound to `lease` if non-zero) when absent;
  // otherwise completes with already_exists and the present entry.
  asio::awaitable<std::tuple<std::error_code, etcd_entry>> create(std::string full_key, std::string value,
                                                                 etcd_lease_id lease, std::size_t strip) {
    const auto k = base64_encode(full_key);
    json put{{"key", k}, {"value", base64_encode(value)}};
    if (lease != 0) put["lease"] = std::to_string(lease);
    json body{{"compare", json::array({json{{"key", k}, {"target", "CREATE"}, {"result", "EQUAL"}, {"create_revision", "0"}}})},
              {"success", json::array({json{{"request_put", put}}})},
              {"failure", json::array({json{{"request_range", json{{"key", k}}}}})}};
    auto [ec, reply] = co_await call("/v3/kv/txn", body);
    if (ec) co_return std::tuple{ec, etcd_entry{}};
    auto succeeded = etcd_succeeded(reply);
    if (!succeeded) co_return std::tuple{succeeded.code(), etcd_entry{}};
    if (*succeeded) {
      const auto revision = reply.contains("header") ? etcd_int(reply["header"], "revision") : 0;
      co_return std::tuple{std::error_code{}, etcd_entry{full_key.substr(strip), std::move(value), revision, revision, lease}};
    }
    // The failure branch's range tells who holds the key (it may have gone
    // meanwhile: then the caller sees already_exists with an empty entry).
    etcd_entry present;
    auto kv = etcd_failure_kv(reply);
    if (!kv) co_return std::tuple{kv.code(), etcd_entry{}};
    if (*kv)
      if (auto e = entry_of(**kv, strip)) present = std::move(*e);
    co_return std::tuple{make_error_code(errc::already_exists), std::move(present)};
  }

  // Deletes `full_key` only if its value is `expected` (and, when `lease` is
  // non-zero, it is bound to that lease); busy on a mismatch, not_found if absent.
  asio::awaitable<std::error_code> remove_if(std::string full_key, std::string expected, etcd_lease_id lease) {
    const auto k = base64_encode(full_key);
    json compare = json::array({json{{"key", k}, {"target", "VALUE"}, {"result", "EQUAL"}, {"value", base64_encode(expected)}}});
    if (lease != 0) compare.push_back(json{{"key", k}, {"target", "LEASE"}, {"result", "EQUAL"}, {"lease", std::to_string(lease)}});
    json body{{"compare", compare},
              {"success", json::array({json{{"request_delete_range", json{{"key", k}}}}})},
              {"failure", json::array({json{{"request_range", json{{"key", k}}}}})}};
    auto [ec, reply] = co_await call("/v3/kv/txn", body);
    if (ec) co_return ec;
    auto succeeded = etcd_succeeded(reply);
    if (!succeeded) co_return succeeded.code();
    if (*succeeded) co_return std::error_code{};
    auto kv = etcd_failure_kv(reply);
    if (!kv) co_return kv.code();
    co_return *kv ? errc::busy : errc::not_found;
  }
};

inline std::chrono::seconds etcd_ttl_seconds(std::chrono::milliseconds ttl) {
  // etcd leases count whole seconds; round up so a lease never ends early.
  return std::chrono::seconds(std::max<std::int64_t>(1, (ttl.count() + 999) / 1000));
}

}  // namespace detail

//! A metadata backend on an etcd server. See the file comment.
class etcd_metadata {
 public:
  using metadata_backend_concept = transfer::metadata_backend_tag;
  using executor_type = asio::any_io_executor;

  //! Throws `std::invalid_argument` if `options.address` is not host:port.
  etcd_metadata(executor_type ex, etcd_options options)
      : state_(std::make_shared<detail::etcd_state>(std::move(ex), std::move(options))) {}

  [[nodiscard]] executor_type get_executor() const noexcept { return state_->ex; }
  [[nodiscard]] const etcd_options& options() const noexcept { return state_->options; }

  //! The etcd key of metadata entry `key`, of lease `name`, of election `name`.
  [[nodiscard]] std::string data_key(std::string_view key) const { return state_->options.prefix + "kv/" + std::string(key); }
  [[nodiscard]] std::string lease_key(std::string_view name) const {
    return state_->options.prefix + "lease/" + std::string(name);
  }
  [[nodiscard]] std::string election_key(std::string_view name) const {
    return state_->options.prefix + "election/" + std::string(name);
  }

  //! Creates or overwrites `key`. Completion: `void(std::error_code)`.
  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_put(std::string key, std::string value, CompletionToken&& token) {
    return async_put_with_lease(std::move(key), std::move(value), 0, std::forward<CompletionToken>(token));
  }

  //! Like `async_put`, with the key bound to `lease` (0: none): it vanishes
  //! when the lease ends. `errc::not_found` if the lease does not exist.
  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_put_with_lease(std::string key, std::string value, etcd_lease_id lease, CompletionToken&& token) {
    return launch<void(std::error_code)>(
        std::forward<CompletionToken>(token),
        [s = state_, k = data_key(key), value = std::move(value), lease]() -> asio::awaitable<std::tuple<std::error_code>> {
          detail::json body{{"key", detail::base64_encode(k)}, {"value", detail::base64_encode(value)}};
          if (lease != 0) body["lease"] = std::to_string(lease);
          auto [ec, reply] = co_await s->call("/v3/kv/put", body);
          co_return std::tuple{ec};
        });
  }

  //! The value of `key`; `errc::not_found` when absent.
  template <asio::completion_token_for<void(std::error_code, std::string)> CompletionToken>
  auto async_get(std::string key, CompletionToken&& token) {
    return launch<void(std::error_code, std::string)>(
        std::forward<CompletionToken>(token),
        [s = state_, k = data_key(key)]() -> asio::awaitable<std::tuple<std::error_code, std::string>> {
          auto [ec, entry] = co_await s->range_one(k, 0);
          co_return std::tuple{ec, std::move(entry.value)};
        });
  }

  //! `key` with its revisions and lease; `errc::not_found` when absent.
  template <asio::completion_token_for<void(std::error_code, etcd_entry)> CompletionToken>
  auto async_get_entry(std::string key, CompletionToken&& token) {
    return launch<void(std::error_code, etcd_entry)>(
        std::forward<CompletionToken>(token),
        [s = state_, k = data_key(key)]() -> asio::awaitable<std::tuple<std::error_code, etcd_entry>> {
          co_return co_await s->range_one(k, s->options.prefix.size() + 3);
        });
  }

  //! Removes `key`; `errc::not_found` when absent.
  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_remove(std::string key, CompletionToken&& token) {
    return launch<void(std::error_code)>(
        std::forward<CompletionToken>(token), [s = state_, k = data_key(key)]() -> asio::awaitable<std::tuple<std::error_code>> {
          const detail::json request{{"key", detail::base64_encode(k)}};
          auto [ec, reply] = co_await s->call("/v3/kv/deleterange", request);
          if (!ec && detail::etcd_int(reply, "deleted") == 0) ec = errc::not_found;
          co_return std::tuple{ec};
        });
  }

  //! Every entry whose key starts with `prefix`, sorted by key: one range
  //! request, so it is a consistent snapshot (unlike Redis).
  template <asio::completion_token_for<void(std::error_code, transfer::metadata_entries)> CompletionToken>
  auto async_list(std::string prefix, CompletionToken&& token) {
    using entries = transfer::metadata_entries;
    return launch<void(std::error_code, entries)>(
        std::forward<CompletionToken>(token),
        [s = state_, base = data_key(""), prefix = std::move(prefix)]() -> asio::awaitable<std::tuple<std::error_code, entries>> {
          const auto from = base + prefix;
          detail::json body{{"key", detail::base64_encode(from)},
                            {"range_end", detail::base64_encode(detail::etcd_prefix_end(from))},
                            {"sort_order", "ASCEND"},
                            {"sort_target", "KEY"}};
          auto [ec, reply] = co_await s->call("/v3/kv/range", body);
          if (ec) co_return std::tuple{ec, entries{}};
          entries out;
          if (auto kvs = reply.find("kvs"); kvs != reply.end() && kvs->is_array()) {
            out.reserve(kvs->size());
            for (const auto& kv : *kvs) {
              auto e = detail::etcd_state::entry_of(kv, base.size());
              if (!e) co_return std::tuple{make_error_code(errc::malformed_message), entries{}};
              out.emplace_back(std::move(e->key), std::move(e->value));
            }
          }
          std::sort(out.begin(), out.end());
          co_return std::tuple{std::error_code{}, std::move(out)};
        });
  }

  //! Creates `key` only if absent (a txn on `create_revision == 0`), bound to
  //! `lease` (0: none). `errc::already_exists` if present.
  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_create(std::string key, std::string value, etcd_lease_id lease, CompletionToken&& token) {
    return launch<void(std::error_code)>(
        std::forward<CompletionToken>(token),
        [s = state_, k = data_key(key), value = std::move(value), lease]() -> asio::awaitable<std::tuple<std::error_code>> {
          auto [ec, present] = co_await s->create(k, value, lease, 0);
          co_return std::tuple{ec};
        });
  }

  //! Sets `key` to `desired` only if its value is `expected` (a txn on its
  //! value; `std::nullopt`: only if absent). `errc::busy` on a mismatch.
  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_compare_and_swap(std::string key, std::optional<std::string> expected, std::string desired,
                              CompletionToken&& token) {
    return launch<void(std::error_code)>(
        std::forward<CompletionToken>(token),
        [s = state_, k = data_key(key), expected = std::move(expected),
         desired = std::move(desired)]() -> asio::awaitable<std::tuple<std::error_code>> {
          const auto k64 = detail::base64_encode(k);
          detail::json compare =
              expected ? detail::json{{"key", k64}, {"target", "VALUE"}, {"result", "EQUAL"}, {"value", detail::base64_encode(*expected)}}
                       : detail::json{{"key", k64}, {"target", "CREATE"}, {"result", "EQUAL"}, {"create_revision", "0"}};
          detail::json body{
              {"compare", detail::json::array({compare})},
              {"success", detail::json::array({detail::json{
                              {"request_put", detail::json{{"key", k64}, {"value", detail::base64_encode(desired)}}}}})}};
          auto [ec, reply] = co_await s->call("/v3/kv/txn", body);
          if (!ec) {
            auto succeeded = detail::etcd_succeeded(reply);
            ec = !succeeded ? succeeded.code() : *succeeded ? std::error_code{} : make_error_code(errc::busy);
          }
          co_return std::tuple{ec};
        });
  }

  //! Grants an etcd lease of `ttl` (whole seconds, rounded up, at least 1).
  template <asio::completion_token_for<void(std::error_code, etcd_lease_id)> CompletionToken>
  auto async_grant_lease(std::chrono::milliseconds ttl, CompletionToken&& token) {
    return launch<void(std::error_code, etcd_lease_id)>(
        std::forward<CompletionToken>(token), [s = state_, ttl]() -> asio::awaitable<std::tuple<std::error_code, etcd_lease_id>> {
          if (ttl.count() <= 0) co_return std::tuple{make_error_code(errc::invalid_argument), etcd_lease_id{0}};
          co_return co_await s->grant(detail::etcd_ttl_seconds(ttl));
        });
  }

  //! Refreshes `lease` once; completes with its TTL in seconds, or
  //! `errc::not_found` when it already expired (or was revoked).
  template <asio::completion_token_for<void(std::error_code, std::int64_t)> CompletionToken>
  auto async_keep_alive_lease(etcd_lease_id lease, CompletionToken&& token) {
    return launch<void(std::error_code, std::int64_t)>(
        std::forward<CompletionToken>(token),
        [s = state_, lease]() -> asio::awaitable<std::tuple<std::error_code, std::int64_t>> { co_return co_await s->keep_alive(lease); });
  }

  //! Ends `lease` now, deleting every key bound to it; `errc::not_found` if it is gone.
  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_revoke_lease(etcd_lease_id lease, CompletionToken&& token) {
    return launch<void(std::error_code)>(std::forward<CompletionToken>(token),
                                         [s = state_, lease]() -> asio::awaitable<std::tuple<std::error_code>> {
                                           co_return std::tuple{co_await s->revoke(lease)};
                                         });
  }

  //! Named leases, the same contract as `redis_metadata`'s: takes `name` for
  //! `owner` (an etcd lease of `ttl` plus a create-if-absent txn); succeeds
  //! when free or already `owner`'s (then refreshed), `errc::busy` otherwise.
  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_acquire_lease(std::string name, std::string owner, std::chrono::milliseconds ttl, CompletionToken&& token) {
    return launch<void(std::error_code)>(
        std::forward<CompletionToken>(token),
        [s = state_, k = lease_key(name), empty = name.empty(), owner = std::move(owner),
         ttl]() -> asio::awaitable<std::tuple<std::error_code>> {
          if (ttl.count() <= 0 || empty) co_return std::tuple{make_error_code(errc::invalid_argument)};
          auto [gec, lease] = co_await s->grant(detail::etcd_ttl_seconds(ttl));
          if (gec) co_return std::tuple{gec};
          for (int attempt = 0; attempt < 3; ++attempt) {
            auto [ec, present] = co_await s->create(k, owner, lease, 0);
            if (ec != errc::already_exists) {
              if (ec) co_await s->revoke(lease);
              co_return std::tuple{ec};
            }
            if (present.value != owner || present.create_revision == 0) {
              if (present.create_revision == 0) continue;  // it vanished meanwhile: try again
              co_await s->revoke(lease);
              co_return std::tuple{make_error_code(errc::busy)};
            }
            // Already ours: refresh the lease that holds it.
            co_await s->revoke(lease);
            auto [kec, ttl_left] = co_await s->keep_alive(present.lease);
            if (kec != errc::not_found) co_return std::tuple{kec};
            std::tie(gec, lease) = co_await s->grant(detail::etcd_ttl_seconds(ttl));
            if (gec) co_return std::tuple{gec};
          }
          co_await s->revoke(lease);
          co_return std::tuple{make_error_code(errc::busy)};
        });
  }

  //! Refreshes `owner`'s lease (its etcd lease's original TTL: etcd cannot
  //! change a TTL, so `ttl` only has to be positive); `errc::not_found` when
  //! it expired, `errc::busy` when someone else holds it.
  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_renew_lease(std::string name, std::string owner, std::chrono::milliseconds ttl, CompletionToken&& token) {
    return launch<void(std::error_code)>(
        std::forward<CompletionToken>(token),
        [s = state_, k = lease_key(name), owner = std::move(owner), ttl]() -> asio::awaitable<std::tuple<std::error_code>> {
          if (ttl.count() <= 0) co_return std::tuple{make_error_code(errc::invalid_argument)};
          auto [ec, present] = co_await s->range_one(k, 0);
          if (ec) co_return std::tuple{ec};
          if (present.value != owner) co_return std::tuple{make_error_code(errc::busy)};
          auto [kec, left] = co_await s->keep_alive(present.lease);
          co_return std::tuple{kec};
        });
  }

  //! Ends `owner`'s lease now (compare-and-delete, then its etcd lease is
  //! revoked); `errc::not_found` when it already expired, `errc::busy` when not `owner`'s.
  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_release_lease(std::string name, std::string owner, CompletionToken&& token) {
    return launch<void(std::error_code)>(
        std::forward<CompletionToken>(token),
        [s = state_, k = lease_key(name), owner = std::move(owner)]() -> asio::awaitable<std::tuple<std::error_code>> {
          auto [ec, present] = co_await s->range_one(k, 0);
          if (ec) co_return std::tuple{ec};
          if (present.value != owner) co_return std::tuple{make_error_code(errc::busy)};
          ec = co_await s->remove_if(k, owner, present.lease);
          if (!ec && present.lease != 0) co_await s->revoke(present.lease);
          co_return std::tuple{ec};
        });
  }

  //! The current holder of lease `name`; `errc::not_found` when free.
  template <asio::completion_token_for<void(std::error_code, std::string)> CompletionToken>
  auto async_lease_holder(std::string name, CompletionToken&& token) {
    return launch<void(std::error_code, std::string)>(
        std::forward<CompletionToken>(token),
        [s = state_, k = lease_key(name)]() -> asio::awaitable<std::tuple<std::error_code, std::string>> {
          auto [ec, present] = co_await s->range_one(k, 0);
          co_return std::tuple{ec, std::move(present.value)};
        });
  }

  //! For `etcd_election` (same strand and connections).
  [[nodiscard]] const std::shared_ptr<detail::etcd_state>& state() const noexcept { return state_; }

 private:
  template <class Signature, class CompletionToken, class Make>
  auto launch(CompletionToken&& token, Make make) {
    return detail::launch<Signature>(state_->ex, state_->strand, state_->options.timeout,
                                     std::forward<CompletionToken>(token), std::move(make));
  }

  std::shared_ptr<detail::etcd_state> state_;
};

static_assert(transfer::check_metadata_backend<etcd_metadata>());

}  // namespace kvx::store
