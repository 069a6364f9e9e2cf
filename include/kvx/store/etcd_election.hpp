#pragma once
//! \file
//! `kvx::store::etcd_election`: leader election on etcd, for the store's
//! master failover (one active master, standbys campaigning).
//!
//! A candidate holds an etcd lease of `options.ttl`, refreshed every
//! `ttl / 3` by a keep-alive coroutine on the client's executor. Campaigning
//! is a transaction that creates the election key (value: the candidate id,
//! bound to the lease) only if `create_revision == 0`; a candidate that finds
//! the key taken polls every `options.poll_interval` until it is gone and
//! tries again. The key disappears when the leader resigns (its lease is
//! revoked) or when its lease expires (process died, host partitioned), so a
//! standby takes over at most `ttl` + etcd's expiry check (~0.5 s) +
//! `poll_interval` after the leader's last keep-alive.
//!
//! Losing leadership: the keep-alive reports the lease gone, or no keep-alive
//! succeeded for `ttl` (etcd unreachable: the lease is presumed expired), or
//! the key no longer holds this candidate. Then `is_leader()` turns false and
//! `async_wait_lost` completes. A leader that stalls (paused process) can
//! still believe it leads for up to one keep-alive period after its lease
//! expired; use `leader_revision()` as a fencing token where that matters.
//!
//! | operation | completion | semantics |
//! | --- | --- | --- |
//! | `async_campaign(token)` | `void(std::error_code)` | completes once this candidate leads; waits (retrying through etcd outages) until then or cancellation |
//! | `async_leader(token)` | `void(std::error_code, std::string)` | the current leader's id; `errc::not_found` when none |
//! | `async_observe(known, token)` | `void(std::error_code, std::string)` | completes when the leader differs from `known` ("" = none) |
//! | `async_wait_lost(token)` | `void(std::error_code)` | completes when this candidate stops leading (at once if it does not lead) |
//! | `async_resign(token)` | `void(std::error_code)` | gives leadership up now: the lease is revoked, the key goes with it |
//!
//! Thread-safety: `is_leader()`, `lease()`, `leader_revision()` from any
//! thread; operations may be started from any thread. Destroying the object
//! stops its keep-alive without revoking (as a crash would: the key stays
//! until the lease expires); call `async_resign` first for a prompt handover.
//!
//! \code
//! kvx::store::etcd_metadata etcd(io.get_executor(), {.address = "127.0.0.1:2379", .prefix = "cluster-a/"});
//! kvx::store::etcd_election election(etcd, "master", "node-1", {.ttl = 3s});
//! co_await election.async_campaign(asio::use_awaitable);        // now the active master
//! co_await election.async_wait_lost(asio::use_awaitable);       // demoted: stop serving as master
//! \endcode

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <system_error>
#include <tuple>
#include <utility>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/experimental/awaitable_operators.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <kvx/core/async.hpp>
#include <kvx/store/etcd_metadata.hpp>

namespace kvx::store {

//! Settings of an `etcd_election`.
struct etcd_election_options {
  std::chrono::milliseconds ttl{5000};            //!< the leader's lease (whole seconds, rounded up)
  std::chrono::milliseconds poll_interval{200};   //!< how often a standby or observer looks at the key

  //! How often the leader refreshes its lease; also how long a stalled
  //! leader may still believe it leads after its lease expired.
  [[nodiscard]] std::chrono::milliseconds keepalive_period() const {
    return std::max(std::chrono::milliseconds(50), std::chrono::milliseconds(detail::etcd_ttl_seconds(ttl)) / 3);
  }
};

namespace detail {

inline bool etcd_transient(const std::error_code& ec) {
  return ec == errc::unreachable || ec == errc::connection_lost || ec == errc::timed_out;
}

struct election_state {
  election_state(etcd_metadata c, std::string k, std::string id, etcd_election_options o)
      : client(std::move(c)),
        key(std::move(k)),
        candidate(std::move(id)),
        options(o),
        changed(client.state()->strand, std::chrono::steady_clock::time_point::max()),
        keepalive_timer(client.state()->strand) {}

  etcd_metadata client;
  std::string key;  // full etcd key
  std::string candidate;
  etcd_election_options options;
  asio::steady_timer changed;  // never expires; cancel() wakes every waiter
  asio::steady_timer keepalive_timer;

  // Strand-only state.
  etcd_lease_id lease_id = 0;
  bool leading = false;
  bool stopped = false;
  bool keepalive_running = false;
  std::uint64_t generation = 0;
  std::chrono::steady_clock::time_point last_ok{};

  // Mirrors for other threads.
  std::atomic<bool> leader_flag{false};
  std::atomic<etcd_lease_id> lease_mirror{0};
  std::atomic<std::int64_t> revision_mirror{0};

  std::chrono::milliseconds ttl() const { return etcd_ttl_seconds(options.ttl); }
  std::chrono::milliseconds keepalive_period() const { return options.keepalive_period(); }

  void notify() {
    ++generation;
    changed.cancel();
  }
  void set_lease(etcd_lease_id id) {
    lease_id = id;
    lease_mirror = id;
  }
  void become_leader(std::int64_t revision) {
    leading = true;
    leader_flag = true;
    revision_mirror = revision;
    notify();
  }
  void lose() {
    if (lease_id == 0 && !leading) return;
    set_lease(0);
    leading = false;
    leader_flag = false;
    revision_mirror = 0;
    notify();
  }
};

// Waits `d` on the strand; false when the calling coroutine was cancelled.
inline asio::awaitable<bool> election_sleep(std::chrono::milliseconds d) {
  asio::steady_timer t(co_await asio::this_coro::executor, d);
  co_await t.async_wait(use_tuple);
  auto cs = co_await asio::this_coro::cancellation_state;
  co_return cs.cancelled() == asio::cancellation_type::none;
}

}  // namespace detail

//! Leader election for one named role among candidates. See the file comment.
class etcd_election {
 public:
  using executor_type = asio::any_io_executor;

  //! Candidate `candidate` for role `name`, through `client` (shared: copies
  //! of an `etcd_metadata` share connections). `candidate` must be unique
  //! among live candidates and non-empty.
  etcd_election(etcd_metadata client, std::string name, std::string candidate, etcd_election_options options = {})
      : state_(std::make_shared<detail::election_state>(client, client.election_key(name), std::move(candidate), options)) {}

  etcd_election(const etcd_election&) = delete;
  etcd_election& operator=(const etcd_election&) = delete;

  ~etcd_election() {
    asio::post(state_->client.state()->strand, [s = state_] {
      s->stopped = true;
      s->keepalive_timer.cancel();
      s->changed.cancel();
    });
  }

  [[nodiscard]] executor_type get_executor() const noexcept { return state_->client.get_executor(); }
  [[nodiscard]] const std::string& candidate() const noexcept { return state_->candidate; }
  //! Whether this candidate believes it leads (see the staleness note above).
  [[nodiscard]] bool is_leader() const noexcept { return state_->leader_flag; }
  //! This candidate's etcd lease (0: none).
  [[nodiscard]] etcd_lease_id lease() const noexcept { return state_->lease_mirror; }
  //! The etcd revision at which this candidate became leader (0: not leading):
  //! strictly increasing across leaders, so usable as a fencing token.
  [[nodiscard]] std::int64_t leader_revision() const noexcept { return state_->revision_mirror; }

  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_campaign(CompletionToken&& token) {
    return run<void(std::error_code)>(std::forward<CompletionToken>(token),
                                      [s = state_]() -> asio::awaitable<std::tuple<std::error_code>> {
                                        co_return std::tuple{co_await campaign(s)};
                                      });
  }

  template <asio::completion_token_for<void(std::error_code, std::string)> CompletionToken>
  auto async_leader(CompletionToken&& token) {
    return run<void(std::error_code, std::string)>(
        std::forward<CompletionToken>(token), [s = state_]() -> asio::awaitable<std::tuple<std::error_code, std::string>> {
          auto [ec, entry] = co_await read_key(s);
          co_return std::tuple{ec, std::move(entry.value)};
        });
  }

  template <asio::completion_token_for<void(std::error_code, std::string)> CompletionToken>
  auto async_observe(std::string known, CompletionToken&& token) {
    return run<void(std::error_code, std::string)>(
        std::forward<CompletionToken>(token),
        [s = state_, known = std::move(known)]() -> asio::awaitable<std::tuple<std::error_code, std::string>> {
          for (;;) {
            auto [ec, entry] = co_await read_key(s);
            if (!ec || ec == errc::not_found) {
              if (entry.value != known) co_return std::tuple{std::error_code{}, std::move(entry.value)};
            } else if (!detail::etcd_transient(ec)) {
              co_return std::tuple{ec, std::string{}};
            }
            if (!co_await detail::election_sleep(s->options.poll_interval))
              co_return std::tuple{make_error_code(errc::cancelled), std::string{}};
          }
        });
  }

  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_wait_lost(CompletionToken&& token) {
    return run<void(std::error_code)>(std::forward<CompletionToken>(token),
                                      [s = state_]() -> asio::awaitable<std::tuple<std::error_code>> {
                                        while (s->leading && !s->stopped) {
                                          co_await s->changed.async_wait(detail::use_tuple);
                                          auto cs = co_await asio::this_coro::cancellation_state;
                                          if (cs.cancelled() != asio::cancellation_type::none)
                                            co_return std::tuple{make_error_code(errc::cancelled)};
                                        }
                                        co_return std::tuple{std::error_code{}};
                                      });
  }

  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_resign(CompletionToken&& token) {
    return run<void(std::error_code)>(std::forward<CompletionToken>(token),
                                      [s = state_]() -> asio::awaitable<std::tuple<std::error_code>> {
                                        const auto id = s->lease_id;
                                        s->keepalive_timer.cancel();
                                        s->lose();
                                        if (id == 0) co_return std::tuple{std::error_code{}};
                                        // Revoking the lease deletes the key with it, atomically.
                                        std::error_code ec =
                                            co_await s->client.async_revoke_lease(id, asio::use_awaitable);
                                        if (ec == errc::not_found) ec = {};
                                        co_return std::tuple{ec};
                                      });
  }

 private:
  using state_ptr = std::shared_ptr<detail::election_state>;

  template <class Signature, class CompletionToken, class Make>
  auto run(CompletionToken&& token, Make make) {
    const auto& st = state_->client.state();
    // No default deadline: campaigning and observing wait by design; each
    // etcd request inside has the client's own timeout.
    return detail::launch<Signature>(st->ex, st->strand, std::chrono::milliseconds(0), std::forward<CompletionToken>(token),
                                     std::move(make));
  }

  // A raw etcd request (outside the kv/ namespace) under the client's
  // timeout, raced against a timer on the strand. (No lambda or other
  // temporary with a destructor inside the co_await: GCC 12 destroys those twice.)
  template <class Result>
  static asio::awaitable<Result> bounded(const state_ptr& s, asio::awaitable<Result> op) {
    const auto timeout = s->client.options().timeout;
    if (timeout.count() <= 0) co_return co_await std::move(op);
    using namespace asio::experimental::awaitable_operators;
    asio::steady_timer timer(co_await asio::this_coro::executor, timeout);
    auto outcome = co_await (std::move(op) || timer.async_wait(detail::use_tuple));
    if (outcome.index() == 0) co_return std::get<0>(std::move(outcome));
    Result r{};
    std::get<0>(r) = make_error_code(errc::timed_out);
    co_return r;
  }

  static asio::awaitable<std::tuple<std::error_code, etcd_entry>> read_key(state_ptr s) {
    auto op = s->client.state()->range_one(s->key, 0);
    co_return co_await bounded(s, std::move(op));
  }

  static asio::awaitable<std::error_code> campaign(state_ptr s) {
    for (;;) {
      if (s->stopped) co_return errc::cancelled;
      if (s->leading) co_return std::error_code{};
      if (s->lease_id == 0) {
        auto [ec, id] = co_await s->client.async_grant_lease(s->options.ttl, asio::use_awaitable);
        if (ec && !detail::etcd_transient(ec)) co_return ec;
        if (!ec) {
          s->set_lease(id);
          s->last_ok = std::chrono::steady_clock::now();
          if (!s->keepalive_running) asio::co_spawn(s->client.state()->strand, keep_alive(s), asio::detached);
        }
      }
      if (s->lease_id != 0) {
        const auto id = s->lease_id;
        auto op = s->client.state()->create(s->key, s->candidate, id, 0);
        auto [ec, present] = co_await bounded(s, std::move(op));
        if (!ec && s->lease_id == id) {
          s->become_leader(present.create_revision);
          co_return std::error_code{};
        }
        if (ec == errc::already_exists && present.value == s->candidate && present.lease == id && s->lease_id == id) {
          s->become_leader(present.create_revision);
          co_return std::error_code{};
        }
        if (ec && ec != errc::already_exists && ec != errc::not_found && !detail::etcd_transient(ec)) co_return ec;
      }
      if (!co_await detail::election_sleep(s->options.poll_interval)) co_return errc::cancelled;
    }
  }

  static asio::awaitable<void> keep_alive(state_ptr s) {
    s->keepalive_running = true;
    while (!s->stopped && s->lease_id != 0) {
      s->keepalive_timer.expires_after(s->keepalive_period());
      co_await s->keepalive_timer.async_wait(detail::use_tuple);
      if (s->stopped || s->lease_id == 0) break;
      const auto id = s->lease_id;
      const auto sent = std::chrono::steady_clock::now();
      // Bounded by one period, so a hung server is noticed within `ttl`.
      auto [ec, left] = co_await s->client.async_keep_alive_lease(
          id, kvx::cancel_after(s->keepalive_period(), asio::use_awaitable));
      if (s->lease_id != id) continue;  // resigned or replaced meanwhile
      if (ec == errc::not_found) {
        s->lose();
        break;
      }
      if (!ec) {
        s->last_ok = sent;
        if (s->leading) {
          auto [rec, entry] = co_await read_key(s);
          if (s->lease_id == id && (rec == errc::not_found || (!rec && (entry.value != s->candidate || entry.lease != id)))) {
            s->lose();
            break;
          }
        }
      }
      if (std::chrono::steady_clock::now() - s->last_ok >= s->ttl()) {
        s->lose();
        break;
      }
    }
    s->keepalive_running = false;
  }

  state_ptr state_;
};

}  // namespace kvx::store
