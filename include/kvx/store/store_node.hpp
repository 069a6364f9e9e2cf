#pragma once
//! \file
//! `store_node<Engine>`: a process (or an object inside the engine) that
//! contributes memory to the pool. It registers its segment with the
//! transfer engine (so clients read and write it directly) and with the
//! master, heartbeats, and carries out the re-replication copies the master
//! hands it with each heartbeat answer.
//!
//! Lifetime: call `stop()` and let the io_context run (or stop it) before
//! destroying the node; the heartbeat coroutine checks `stop()` after every wait.
//!
//! A node that stops heartbeating (crashed, partitioned, `stop()`ped) is
//! dropped by the master after `node_timeout`: its replicas are forgotten and
//! objects with other replicas are copied again. `async_leave()` is the clean
//! stop: the master drops the node at once.
//!
//! A master that answers a heartbeat with `not_found` does not know the node:
//! a new master after a failover (`elected_master`), or one that dropped the
//! node while it was silent. The node then registers its segment again, whole
//! and empty (that master holds no objects in it), and heartbeats on. With a
//! `master_client` that follows the leader, the node reaches a new master
//! without being recreated.
//!
//! Ledger (`master_config::recover_objects`): heartbeat answers carry the
//! changes to the list of committed objects this segment holds (key, put,
//! range, the writer's checksum); the node applies them in order and
//! acknowledges the last. When it registers again, the ledger it had is what
//! the previous master knew; once the new master's `recover_after_ms` has
//! passed, the node hashes each listed range (XXH3-64, on its executor) and
//! reports those whose bytes still match (`recover`), so the objects come
//! back instead of being lost. A range whose bytes changed (reused by a put
//! whose removal notice the node never got) fails the check and is not
//! reported.
//!
//! \code
//! auto arena = kvx::memory::mapped_arena::create(1 << 30);
//! kvx::store::store_node node(engine, master, {.name = "node-0", .segment = "node-0/pool"});
//! co_await node.async_start(arena->region(), asio::use_awaitable);
//! \endcode

#include <atomic>
#include <chrono>
#include <deque>
#include <iterator>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <kvx/core/async.hpp>
#include <kvx/core/log.hpp>
#include <kvx/memory/memory_region.hpp>
#include <kvx/transfer/batch_deadline.hpp>
#include <kvx/store/master_client.hpp>
#include <kvx/store/node_ledger.hpp>
#include <kvx/transfer/batch.hpp>

namespace kvx::store {

struct node_options {
  std::string name;                 //!< node name, unique in the cluster
  std::string segment;              //!< segment name; "<name>/pool" when empty
  std::string tier = "dram";        //!< "dram" or "ssd"
  //! The machine (failure domain) the node runs on; its DRAM and SSD nodes
  //! name the same one so the master spreads replicas over machines. Empty:
  //! the node counts as its own machine.
  std::string host{};
  std::chrono::milliseconds heartbeat{500};
  //! A re-replication copy ends this long before the master's deadline for
  //! it (after which the master may give the target range to another
  //! object); bytes sent before cancelling may still land this much later.
  std::chrono::milliseconds copy_margin{250};
};

template <class Engine>
class store_node {
 public:
  store_node(Engine& engine, std::shared_ptr<master_client> master, node_options options)
      : engine_(engine), master_(std::move(master)), options_(std::move(options)),
        state_(std::make_shared<shared>(engine.get_executor())) {
    if (options_.segment.empty()) options_.segment = options_.name + "/pool";
  }
  store_node(const store_node&) = delete;
  store_node& operator=(const store_node&) = delete;
  ~store_node() { stop(); }

  [[nodiscard]] const node_options& options() const noexcept { return options_; }
  [[nodiscard]] std::size_t replications_done() const noexcept { return state_->replications; }
  //! Re-replication copies not made: no time was left before their deadline,
  //! or the transfer failed or ran past it.
  [[nodiscard]] std::size_t replications_failed() const noexcept { return state_->replications_failed; }
  //! Times the node registered again with a master that did not know it.
  [[nodiscard]] std::size_t reregistrations() const noexcept { return state_->registrations; }
  //! Objects (and further copies) a new master took back from this node's reports.
  [[nodiscard]] std::size_t recovered() const noexcept { return state_->recovered; }
  //! Ledger entries whose bytes no longer matched their checksum (not reported).
  [[nodiscard]] std::size_t recovery_mismatches() const noexcept { return state_->mismatches; }

  //! Registers `region` with the engine and the master, then heartbeats
  //! until `stop()`. Completion: `void(std::error_code)` once registered.
  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_start(memory::memory_region region, CompletionToken&& token) {
    return asio::async_initiate<CompletionToken, void(std::error_code)>(
        [this](auto handler, memory::memory_region r) {
          auto ex = engine_.get_executor();
          asio::co_spawn(ex, start(r), [h = std::move(handler), ex](std::exception_ptr e, std::error_code ec) mutable {
            kvx::detail::post_completion(ex, std::move(h), e ? make_error_code(errc::internal) : ec);
          });
        },
        token, region);
  }

  //! A clean stop: stops heartbeating and tells the master, which drops the
  //! node at once instead of after `node_timeout` (its objects' other copies
  //! are copied again on the master's next tick, readers stop being sent
  //! here). Completion: `void(std::error_code)`, the master's answer; on
  //! any error the master still drops the node after its timeout. Bound it
  //! with `kvx::cancel_after` when the master may be unreachable.
  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_leave(CompletionToken&& token) {
    return asio::async_initiate<CompletionToken, void(std::error_code)>(
        [this, master = master_, name = options_.name, ex = engine_.get_executor()](auto handler) {
          stop();  // when the operation starts (a deferred token may start it later, or never)
          auto slot = asio::get_associated_cancellation_slot(handler);
          master->async_call(protocol::make_request("leave", "node", name),
                             asio::bind_cancellation_slot(slot, [h = std::move(handler), ex](std::error_code ec, const protocol::json&) mutable {
                               kvx::detail::post_completion(ex, std::move(h), ec);
                             }));
        },
        token);
  }

  //! Stops heartbeating; the master drops the node after its timeout.
  //! Any thread may call it (the heartbeat's timer is cancelled on its
  //! strand); destroy the node only once its executor no longer runs it
  //! or on that executor, as for any Asio I/O object.
  void stop() {
    state_->running = false;
    asio::dispatch(state_->strand, [st = state_] { st->timer.cancel(); });
  }

 private:
  // What the heartbeat loop shares with the node; atomics because stop() and
  // the counters' readers may be on another thread than the loop.
  struct shared {
    explicit shared(asio::any_io_executor ex) : strand(asio::make_strand(std::move(ex))), timer(strand) {}
    asio::strand<asio::any_io_executor> strand;
    asio::steady_timer timer;
    std::atomic<bool> running = false;
    std::atomic<std::size_t> replications = 0;
    std::atomic<std::size_t> replications_failed = 0;
    // Re-replication copies to make, in order, by one copier coroutine (on
    // the strand) beside the heartbeats: a long copy must not silence the
    // node, or the master drops it as dead.
    std::deque<replication_task> copies;
    bool copier_running = false;
    std::atomic<std::size_t> registrations = 0;
    std::atomic<std::size_t> recovered = 0;
    std::atomic<std::size_t> mismatches = 0;
    // The ledger (on the strand): this master's view of the segment's
    // committed objects, by offset; and what an earlier master's view left
    // to report to this one, from `recover_at` on.
    std::optional<node_ledger> ledger;  // set at start, with the segment's name
    std::vector<ledger_entry> to_report;
    clock::time_point recover_at{};
  };

  asio::awaitable<std::error_code> start(memory::memory_region region) {
    auto [rec, desc] = co_await engine_.async_register_memory(region, options_.segment, asio::as_tuple(asio::use_awaitable));
    if (rec) co_return rec;
    capacity_ = region.length;
    if (auto mec = co_await register_segment(nullptr); mec) co_return mec;
    base_ = region.data();
    state_->ledger.emplace(options_.segment);
    state_->running = true;
    asio::co_spawn(state_->strand, heartbeat_loop(state_), [name = options_.name](std::exception_ptr e) {
      // None is expected; without this line the node would only be seen to go silent.
      if (e) log(log_level::error, "store node '", name, "': heartbeats ended by an exception: ", exception_message(e));
    });
    co_return std::error_code{};
  }

  // `st`: the heartbeat loop's (the node may be gone when it is not running); null from start.
  asio::awaitable<std::error_code> register_segment(std::shared_ptr<shared> st) {
    auto [ec, r] = co_await master_->async_call(protocol::make_request("register_segment", "node", options_.name, "segment", options_.segment, "capacity", capacity_, "tier", options_.tier, "host", options_.host),
                                                asio::as_tuple(asio::use_awaitable));
    if (st && !st->running) co_return ec;
    if (ec)
      log(log_level::warn, "store node '", options_.name, "': registering with the master: ",
          protocol::describe(ec, r));
    else if (st)
      st->recover_at = clock::now() + std::chrono::milliseconds(answered(r, "register_segment", "recover_after_ms"));
    co_return ec;
  }

  asio::awaitable<void> heartbeat_loop(std::shared_ptr<shared> st) {
    while (st->running) {
      const auto asked = clock::now();
      auto [ec, r] = co_await master_->async_call(protocol::make_request("heartbeat", "node", options_.name, "ledger_ack", st->ledger->applied()),
                                                  kvx::cancel_after(options_.heartbeat * 4, asio::as_tuple(asio::use_awaitable)));
      if (!st->running) co_return;
      if (ec == errc::not_found) {
        log(log_level::info, "store node '", options_.name, "': the master does not know this node; registering again");
        // What the previous master told us is ours to report to this one.
        for (auto& entry : st->ledger->take()) st->to_report.push_back(std::move(entry));
        auto rec = co_await register_segment(st);
        if (!st->running) co_return;
        if (!rec || rec == errc::already_exists) ++st->registrations;
      } else if (ec) {
        log(log_level::warn, "store node '", options_.name, "': heartbeat: ", ec.message());
      } else {
        if (auto why = st->ledger->apply(r.value("ledger", protocol::json::array())); !why.empty())
          log(log_level::warn, "store node '", options_.name, "': ", why);
        queue_copies(r, st, asked);
      }
      if (st->running && !st->to_report.empty() && clock::now() >= st->recover_at) co_await report_ledger(st);
      st->timer.expires_after(options_.heartbeat);
      co_await st->timer.async_wait(asio::as_tuple(asio::use_awaitable));
    }
  }

  // A count in a master's answer; 0, logged, when it is not one (a json
  // `value` of the wrong type would throw and end the heartbeat loop).
  std::uint64_t answered(const protocol::json& answer, const char* op, const char* field) const {
    auto n = protocol::answer_field<std::uint64_t>(answer, op, field, 0);
    if (n) return *n;
    log(log_level::warn, "store node '", options_.name, "': ", n.error().context());
    return 0;
  }

  // Reports the previous master's ledger entries whose bytes still match
  // their checksum, in chunks. An entry that fails the check is dropped for
  // good; a chunk the master could not take now (`busy`: too early, or the
  // master is away) goes back to the front, to be checked and sent again
  // after the next heartbeat.
  asio::awaitable<void> report_ledger(std::shared_ptr<shared> st) {
    constexpr std::size_t chunk = 1000;
    while (st->running && !st->to_report.empty()) {
      std::vector<ledger_entry> checked;
      protocol::json objects = protocol::json::array();
      std::size_t taken = 0;
      for (; taken < st->to_report.size() && checked.size() < chunk; ++taken) {
        auto& e = st->to_report[taken];
        const bool inside = e.offset <= capacity_ && e.size <= capacity_ - e.offset;
        if (inside && protocol::object_checksum(base_ + e.offset, e.size) == e.checksum) {
          objects.push_back(protocol::to_json(e));
          checked.push_back(std::move(e));
        } else {
          ++st->mismatches;
          log(log_level::info, "store node '", options_.name, "': '", e.key.full(), "' at ", e.offset,
              " no longer holds its bytes; not reported");
        }
      }
      st->to_report.erase(st->to_report.begin(), st->to_report.begin() + static_cast<std::ptrdiff_t>(taken));
      if (checked.empty()) continue;
      auto [ec, r] = co_await master_->async_call(protocol::make_request("recover", "node", options_.name, "objects", std::move(objects)),
                                                  kvx::cancel_after(options_.heartbeat * 4, asio::as_tuple(asio::use_awaitable)));
      if (!st->running) co_return;
      if (ec == errc::busy || ec == errc::connection_lost || ec == errc::unreachable || ec == errc::stale ||
          ec == errc::timed_out || ec == errc::cancelled) {
        st->to_report.insert(st->to_report.begin(), std::make_move_iterator(checked.begin()), std::make_move_iterator(checked.end()));
        st->recover_at = clock::now() + options_.heartbeat;
        co_return;
      }
      if (ec) {
        log(log_level::warn, "store node '", options_.name, "': reporting its objects: ", protocol::describe(ec, r));
        continue;
      }
      st->recovered += answered(r, "recover", "objects") + answered(r, "recover", "replicas");
      for (const auto& why : r.value("rejected", protocol::json::array()))
        log(log_level::info, "store node '", options_.name, "': not taken back: ", why.dump());
    }
  }

  // The heartbeat answer's re-replication tasks (answering a heartbeat sent
  // at `asked`) join the copier's queue. One that is malformed, or names
  // bytes this node does not hold, is logged and skipped: a master's bad
  // answer must neither end the heartbeat loop nor read outside the segment.
  void queue_copies(const protocol::json& answer, const std::shared_ptr<shared>& st, clock::time_point asked) {
    if (!answer.contains("tasks")) return;
    const auto& tasks = answer["tasks"];
    if (!tasks.is_array()) {
      log(log_level::warn, "store node '", options_.name, "': the heartbeat answer's 'tasks' is not an array; ignored");
      return;
    }
    for (std::size_t i = 0; i < tasks.size(); ++i) {
      auto task = protocol::replication_task_from_json(tasks[i], "heartbeat.tasks[" + std::to_string(i) + "]", asked);
      if (!task) {
        log(log_level::warn, "store node '", options_.name, "': ignoring a malformed replication task: ", task.error().context());
        continue;
      }
      const auto& source = task->source;
      if (source.segment != options_.segment || source.offset > capacity_ || source.size > capacity_ - source.offset) {
        log(log_level::warn, "store node '", options_.name, "': ignoring a replication task for ", source.size,
            " bytes at ", source.offset, " of '", source.segment, "': not inside this node's segment '",
            options_.segment, "' (", capacity_, " bytes)");
        continue;
      }
      st->copies.push_back(std::move(*task));
    }
    if (st->copies.empty() || st->copier_running) return;
    st->copier_running = true;
    asio::co_spawn(st->strand, copy_queued(st), [st, name = options_.name](std::exception_ptr e) {
      if (!e) return;
      st->copier_running = false;  // the next answer's tasks start another copier
      log(log_level::error, "store node '", name, "': re-replication ended by an exception: ", exception_message(e));
    });
  }

  asio::awaitable<void> copy_queued(std::shared_ptr<shared> st) {
    while (st->running && !st->copies.empty()) {
      auto task = std::move(st->copies.front());
      st->copies.pop_front();
      co_await replicate(task, st);
    }
    st->copier_running = false;
  }

  // Copies a replica this node holds into the target segment, then tells the
  // master. The copy must be over before the master's deadline for it: then
  // the master gives the target range up, maybe to another object.
  asio::awaitable<void> replicate(const replication_task& task, std::shared_ptr<shared> st) {
    const auto& source = task.source;
    const auto& target = task.target;
    transfer::batch b;
    b.write(std::span<const std::byte>(base_ + source.offset, source.size), target.segment, target.offset);
    const auto until = task.deadline == clock::time_point{} ? clock::time_point::max() : task.deadline;
    if (!transfer::end_before(b, until, options_.copy_margin, engine_.options().deadline)) {
      ++st->replications_failed;
      log(log_level::warn, "store node '", options_.name, "': replication of '", task.key.full(),
          "': no time left before its deadline; not copied");
      co_return;
    }
    auto [tec, res] = co_await engine_.async_transfer(std::move(b), asio::as_tuple(asio::use_awaitable));
    if (!st->running) co_return;  // stopped (maybe destroyed) meanwhile
    if (tec) {
      ++st->replications_failed;
      log(log_level::warn, "store node '", options_.name, "': replication: ", res.first_error().message());
      co_return;
    }
    auto [ec, r] = co_await master_->async_call(protocol::make_request("replication_done", "tenant", task.key.tenant, "key", task.key.key, "put_id", task.put_id, "target", protocol::to_json(target)),
                                                asio::as_tuple(asio::use_awaitable));
    if (!ec && st->running) ++st->replications;
  }

  Engine& engine_;
  std::shared_ptr<master_client> master_;
  node_options options_;
  std::shared_ptr<shared> state_;
  std::byte* base_ = nullptr;
  std::uint64_t capacity_ = 0;
};

}  // namespace kvx::store
