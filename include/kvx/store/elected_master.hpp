#pragma once
//! \file
//! `elected_master<MasterState>`: a store master that serves only while it
//! leads an etcd election, so several of them give one active master and
//! standbys; and `leader_lookup`, with which `master_client`s (hence store
//! clients and nodes) follow whichever one leads.
//!
//! Each instance listens from `start()` on (its address is what it
//! campaigns with) and campaigns through `etcd_election`, its "host:port" as
//! the candidate id. While it does not lead, its `master_server` is a
//! standby and answers every request with `errc::stale`. On winning it
//! builds a fresh state (`make_state`) and serves it; on losing (keep-alive
//! failure, lease revoked, `async_resign`) it stops serving at once: every
//! session is closed, the state is dropped, and it campaigns again.
//!
//! What a new leader knows (docs/store.md, "Master failover"): nothing from
//! its predecessor. Nodes find it through the lookup and re-register their
//! segments on their next heartbeat (the new master answers the heartbeat of
//! a node it does not know with `not_found`). Objects of the old master are
//! gone (the pool is a cache: a miss means recompute) unless the state keeps
//! ledgers (`master_config::recover_objects`): then each node, once the
//! grace is over, reports the objects its ledger names whose bytes still
//! match their writer's checksum, and the new master takes them back. For `takeover_grace`
//! (default and minimum: `min_takeover_grace`, the state's longest lease
//! plus the election's keep-alive period) it refuses `put_start` with
//! `errc::busy`: writers, readers and copying nodes holding the old
//! master's word may still be moving bytes into or out of the ranges it
//! would hand out.
//!
//! Thread-safety: `is_leader()`, `leader_revision()`, `endpoint()` from any
//! thread. `start`, `stop` and `state()` on the strand (`get_executor()`)
//! or while the io_context does not run.
//!
//! \code
//! kvx::store::etcd_metadata etcd(io.get_executor(), {.address = "127.0.0.1:2379", .prefix = "cluster-a/"});
//! kvx::store::elected_master<state_type> master(etcd, {.server = {.address = "10.0.0.5", .port = 7700}});
//! if (auto s = master.start(); !s) return fail(s.error().message());   // campaigns from now on
//! // clients and nodes, anywhere:
//! auto client = kvx::store::master_client::create(ex, kvx::store::leader_lookup(etcd));
//! \endcode

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <system_error>
#include <utility>

#include <boost/asio/any_completion_handler.hpp>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <kvx/core/async.hpp>
#include <kvx/core/log.hpp>
#include <kvx/store/etcd_election.hpp>
#include <kvx/store/master_client.hpp>
#include <kvx/store/master_server.hpp>

namespace kvx::store {

//! The election role store masters campaign for, unless configured otherwise.
inline constexpr const char* default_master_role = "store-master";

struct elected_master_config {
  master_server_config server{};                    //!< where it listens
  std::string advertise{};                          //!< "host:port" published as leader; empty: the bound endpoint
  std::string role = default_master_role;           //!< election name (one per cluster prefix)
  etcd_election_options election{};                 //!< lease TTL (the failover time) and polling
  //! Puts refused after taking over; empty: `min_takeover_grace`. Shorter
  //! than that: `start` refuses it.
  std::optional<std::chrono::milliseconds> takeover_grace{};
};

//! The shortest takeover grace under which no range is reused while a
//! party may still move bytes on the previous master's word: the longest
//! lease `state` grants (`master_config::longest_lease`: put leases up to
//! `max_put_lease`, read leases up to `max_read_lease`, re-replication
//! copies) plus the election's keep-alive period, for which a stalled
//! previous leader may still grant leases after the new one took over.
[[nodiscard]] inline std::chrono::milliseconds min_takeover_grace(const master_config& state,
                                                                  const etcd_election_options& election) {
  return std::chrono::ceil<std::chrono::milliseconds>(state.longest_lease()) + election.keepalive_period();
}

//! A master for a `master_client` to follow: asks etcd who leads `role`
//! (the leader's "host:port"). One observer per lookup object, shared by
//! the copies of the returned function.
inline master_client::endpoint_lookup leader_lookup(etcd_metadata etcd, std::string role = default_master_role) {
  auto observer = std::make_shared<etcd_election>(std::move(etcd), std::move(role), "observer");
  return [observer](asio::any_completion_handler<void(std::error_code, std::string)> h) {
    observer->async_leader(std::move(h));
  };
}

template <class MasterState>
class elected_master {
 public:
  using executor_type = asio::strand<asio::any_io_executor>;
  using state_factory = std::function<std::unique_ptr<MasterState>()>;

  //! `make_state` builds the state each time this instance starts leading.
  elected_master(etcd_metadata etcd, elected_master_config config,
                 state_factory make_state = [] { return std::make_unique<MasterState>(); })
      : core_(std::make_shared<core>(std::move(etcd), std::move(config), std::move(make_state))) {}

  elected_master(const elected_master&) = delete;
  elected_master& operator=(const elected_master&) = delete;
  //! Stops without resigning (as a crash would): a standby takes over when the lease expires.
  ~elected_master() { stop(); }

  //! Listens, then campaigns until `stop()` or `async_resign`. Builds one
  //! state with `make_state` first, to check `takeover_grace` against its
  //! leases (`invalid_argument` if shorter than `min_takeover_grace`).
  result<void> start() {
    auto& c = *core_;
    if (c.election) return error{errc::already_exists, "elected master already started"};
    if (!c.config.advertise.empty()) {
      if (auto parts = split_master_endpoint(c.config.advertise, "elected_master_config.advertise"); !parts)
        return error{errc::invalid_argument, parts.error().context()};
    }
    // A state refused now (master_state::check) would be refused on winning too.
    std::unique_ptr<MasterState> probe;
    try {
      probe = c.make_state();
    } catch (const std::invalid_argument& e) {
      return error{errc::invalid_argument, e.what()};
    }
    if (const auto least = min_takeover_grace(probe->config(), c.config.election);
        c.config.takeover_grace && *c.config.takeover_grace < least)
      return error{errc::invalid_argument,
                   "elected_master_config.takeover_grace: " + std::to_string(c.config.takeover_grace->count()) +
                       " ms is shorter than the longest lease the state grants plus the election's keep-alive period (" +
                       std::to_string(least.count()) +
                       " ms): a new put could land in a range an old writer, reader or copy still uses"};
    KVX_TRY(c.server.start());
    c.advertised = c.config.advertise.empty() ? c.server.endpoint() : c.config.advertise;
    {
      std::lock_guard lock(c.advertised_mutex);
      c.advertised_copy = c.advertised;
    }
    c.server.refuse("standby: campaigning to lead '" + c.config.role + "'");
    c.election.emplace(c.etcd, c.config.role, c.advertised, c.config.election);
    asio::co_spawn(c.server.get_executor(), run(core_), asio::bind_cancellation_slot(c.cancel.slot(), asio::detached));
    return {};
  }

  //! Stops serving and campaigning without resigning: the lease runs out
  //! (`ttl`) before a standby leads. Use `async_resign` for a prompt handover.
  void stop() {
    auto& c = *core_;
    if (c.stopped) return;
    c.stopped = true;
    c.step_down("stopped");
    c.cancel.emit(asio::cancellation_type::terminal);
    c.server.stop();
    c.election.reset();  // its keep-alive stops; the key stays until the lease expires
  }

  //! Gives leadership up now and stops campaigning (the object stays a
  //! standby that refuses every request). Completion: `void(std::error_code)`.
  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_resign(CompletionToken&& token) {
    return asio::async_initiate<CompletionToken, void(std::error_code)>(
        [c = core_](auto handler) {
          asio::dispatch(c->server.get_executor(), [c, h = std::move(handler)]() mutable {
            if (c->stopped || !c->election) {
              kvx::detail::post_completion(c->server.get_executor(), std::move(h), std::error_code{});
              return;
            }
            c->resigned = true;
            c->step_down("resigned");
            c->cancel.emit(asio::cancellation_type::terminal);
            c->election->async_resign(std::move(h));
          });
        },
        token);
  }

  //! Serving as the master now.
  [[nodiscard]] bool is_leader() const noexcept { return core_->leading; }
  //! The etcd revision at which it started leading (0: standby): a fencing token.
  [[nodiscard]] std::int64_t leader_revision() const noexcept { return core_->revision; }
  //! The "host:port" it campaigns with (empty before `start`).
  [[nodiscard]] std::string endpoint() const {
    std::lock_guard lock(core_->advertised_mutex);
    return core_->advertised_copy;
  }
  //! The state it serves; nullptr while a standby. On the strand only.
  [[nodiscard]] MasterState* state() noexcept { return core_->state.get(); }
  [[nodiscard]] executor_type get_executor() const { return core_->server.get_executor(); }

 private:
  struct core {
    core(etcd_metadata e, elected_master_config cfg, state_factory make)
        : etcd(std::move(e)), config(std::move(cfg)), make_state(std::move(make)),
          server(etcd.get_executor(), config.server), grace_timer(server.get_executor()) {}

    etcd_metadata etcd;
    elected_master_config config;
    state_factory make_state;
    master_server<MasterState> server;
    asio::steady_timer grace_timer;
    std::optional<etcd_election> election;
    std::unique_ptr<MasterState> state;
    asio::cancellation_signal cancel;
    std::string advertised;
    mutable std::mutex advertised_mutex;
    std::string advertised_copy;
    bool stopped = false;
    bool resigned = false;
    std::atomic<bool> leading{false};
    std::atomic<std::int64_t> revision{0};

    [[nodiscard]] bool done() const noexcept { return stopped || resigned; }

    // Serves a fresh state; puts wait out the grace (see the file comment).
    // Never shorter than the state needs, whatever the factory returned now.
    void lead() {
      state = make_state();
      const auto least = min_takeover_grace(state->config(), config.election);
      const auto grace = std::max(config.takeover_grace.value_or(least), least);
      const auto since = clock::now();
      // Nodes' reports of what they hold (master_config::recover_objects)
      // wait out the grace too: until then old writers may change the bytes.
      if constexpr (requires { state->hold_recovery_until(since + grace); }) state->hold_recovery_until(since + grace);
      auto admit = [since, grace](const protocol::request& r) -> result<void> {
        if (r.op != "put_start") return {};
        const auto waited = std::chrono::duration_cast<std::chrono::milliseconds>(clock::now() - since);
        if (waited >= grace) return {};
        return error{errc::busy, "this master took over " + std::to_string(waited.count()) + " ms ago; puts resume in " +
                                     std::to_string((grace - waited).count()) +
                                     " ms (writers of the previous master may still use the space)"};
      };
      server.serve(*state, grace.count() > 0 ? std::function<result<void>(const protocol::request&)>(admit) : nullptr);
      if (grace.count() > 0) {
        grace_timer.expires_after(grace);
        grace_timer.async_wait([this, generation = ++terms](boost::system::error_code ec) {
          if (!ec && leading && generation == terms) server.set_admission(nullptr);  // no per-request check from now on
        });
      }
      revision = election->leader_revision();
      leading = true;
      log(log_level::info, "store master ", advertised, ": leading '", config.role, "' from etcd revision ",
          revision.load(), "; nodes re-register, puts resume in ", grace.count(), " ms");
    }

    void step_down(const std::string& why) {
      const bool was = leading.exchange(false);
      revision = 0;
      ++terms;
      grace_timer.cancel();
      server.refuse("standby: " + why + "; not the leading master");
      state.reset();  // after refuse: the handler referenced it
      if (was) log(log_level::warn, "store master ", advertised, ": stopped leading '", config.role, "': ", why);
    }

    std::uint64_t terms = 0;
  };

  // The campaign loop, on the server's strand; it owns the core with it.
  static asio::awaitable<void> run(std::shared_ptr<core> c) {
    co_await asio::this_coro::throw_if_cancelled(false);
    while (!c->done()) {
      auto [ec] = co_await c->election->async_campaign(asio::as_tuple(asio::use_awaitable));
      if (c->done()) break;
      if (ec) {
        log(log_level::warn, "store master ", c->advertised, ": campaigning: ", ec.message(), "; trying again");
        asio::steady_timer pause(c->server.get_executor(), c->config.election.poll_interval);
        co_await pause.async_wait(asio::as_tuple(asio::use_awaitable));
        continue;
      }
      c->lead();
      co_await c->election->async_wait_lost(asio::as_tuple(asio::use_awaitable));
      if (c->done()) break;
      c->step_down("lost the election (lease expired or revoked, or etcd unreachable for a TTL)");
    }
  }

  std::shared_ptr<core> core_;
};

}  // namespace kvx::store
