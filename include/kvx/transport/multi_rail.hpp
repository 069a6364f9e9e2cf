#pragma once
//! \file
//! `multi_rail<T, Selector>`: several instances of one transport (one per NIC,
//! or any parallel link: the *rails*) behind the transport concept, with a
//! `kvx::topology::rail_selector` policy choosing the rail of every operation.
//! The transfer engine cuts a large operation into slices and keeps many in
//! flight, so a striping selector (`rail::round_robin`) spreads one transfer
//! over every rail and a topology selector (`rail::nearest`) keeps each
//! buffer on the NICs nearest its GPU.
//!
//! - **Registration** registers a segment on every rail; the descriptor entry
//!   is `{"rails": [entry of rail 0, entry of rail 1, ...]}` under `T::name()`.
//!   Rail `i` of an initiator talks to rail `i % n` of the owner (`n` its
//!   rail count), as Mooncake pairs NICs of the same index.
//! - **Failover.** An operation that fails on a rail with a link error
//!   (`connection_lost`, `unreachable`, `timed_out`) marks that rail failed in
//!   the selector and is re-issued on another healthy rail, up to once per
//!   rail; the caller sees the error only when every rail failed it. Errors
//!   the owner reports (`out_of_range`, `bad_key`, `stale`, ...) are final.
//!   A failed rail is offered to the selector again after `retry_after`, so a
//!   link that comes back is used again.
//! - The selector's hint carries the GPU of the local memory, or for host
//!   memory the NUMA node of its first page (both from the registered
//!   segment that contains it), and the slice's running index.
//!
//! Cancellation reaches the rail's operation through the handler's slot;
//! once cancelled, an operation whose rail fails is not failed over but
//! completes with `errc::cancelled` (the cancellation may have reached the
//! failed rail's operation after it had finished, and nothing else would end
//! the next rail's).
//! Thread safety: all members are thread-safe (the selector, which is not,
//! runs under a mutex). `multi_rail` owns its rails.
//!
//! \code
//! std::vector<std::unique_ptr<kvx::transport::tcp>> nics;
//! for (auto addr : {"10.0.0.1", "10.0.1.1"}) nics.push_back(std::make_unique<kvx::transport::tcp>(ex, cfg_for(addr)));
//! kvx::transport::multi_rail<kvx::transport::tcp, kvx::topology::rail::round_robin> striped(
//!     kvx::topology::rail::round_robin(nics.size()), std::move(nics));
//! kvx::transfer::transfer_engine<kvx::transfer::embedded_metadata, decltype(striped)> engine(meta, {}, striped);
//! \endcode

#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <boost/asio/associated_cancellation_slot.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/cancellation_signal.hpp>

#include <kvx/core/async.hpp>
#include <kvx/topology/rail_selector.hpp>
#include <kvx/topology/topology.hpp>
#include <kvx/transport/transport.hpp>

namespace kvx::transport {

//! True for the errors a different rail may not see.
inline bool is_link_error(std::error_code ec) noexcept {
  return ec == errc::connection_lost || ec == errc::unreachable || ec == errc::timed_out;
}

template <transport T, topology::rail_selector Selector>
class multi_rail {
 public:
  using transport_concept = transport_tag;
  using executor_type = decltype(std::declval<T&>().get_executor());
  static constexpr transport_capabilities capabilities = T::capabilities;
  static constexpr std::string_view name() noexcept { return T::name(); }

  //! `rails` must hold `selector.rail_count()` transports (at least one).
  multi_rail(Selector selector, std::vector<std::unique_ptr<T>> rails,
             std::chrono::steady_clock::duration retry_after = std::chrono::seconds(1))
      : state_(std::make_shared<state>(std::move(selector), std::move(rails), retry_after)) {
    if (state_->rails.empty() || state_->rails.size() > 64 || state_->rails.size() != state_->selector.rail_count())
      throw std::invalid_argument("multi_rail: " + std::to_string(state_->rails.size()) + " rails for a selector of " +
                                  std::to_string(state_->selector.rail_count()) + " (1 to 64 rails)");
  }

  [[nodiscard]] executor_type get_executor() const { return state_->rails.front()->get_executor(); }
  [[nodiscard]] std::size_t rail_count() const noexcept { return state_->rails.size(); }
  [[nodiscard]] T& rail(std::size_t i) { return *state_->rails.at(i); }
  //! Operations each rail carried to completion (success or final error).
  [[nodiscard]] std::vector<std::uint64_t> ops_per_rail() const {
    std::vector<std::uint64_t> v;
    for (const auto& c : state_->carried) v.push_back(c.load());
    return v;
  }

  result<nlohmann::json> register_memory(const memory::local_segment& seg) {
    nlohmann::json rails = nlohmann::json::array();
    for (std::size_t i = 0; i < state_->rails.size(); ++i) {
      auto e = state_->rails[i]->register_memory(seg);
      if (!e) {
        for (std::size_t j = 0; j < i; ++j) (void)state_->rails[j]->deregister_memory(seg);
        return kvx::error{e.code(), "rail " + std::to_string(i) + ": " + e.error().message()};
      }
      rails.push_back(std::move(*e));
    }
    std::lock_guard lock(state_->mu);
    const bool gpu = seg.region.where.kind == memory::location_kind::cuda;
    state_->local[reinterpret_cast<std::uintptr_t>(seg.region.address)] = {
        seg.region.length, gpu ? seg.region.where.device : -1,
        gpu ? -1 : topology::numa_node_of(seg.region.address)};
    return nlohmann::json{{"rails", std::move(rails)}};
  }

  result<void> deregister_memory(const memory::local_segment& seg) {
    result<void> first;
    for (auto& r : state_->rails)
      if (auto d = r->deregister_memory(seg); !d && first) first = d;
    std::lock_guard lock(state_->mu);
    state_->local.erase(reinterpret_cast<std::uintptr_t>(seg.region.address));
    return first;
  }

  [[nodiscard]] std::error_code can_transfer(const memory::segment_descriptor& remote) const {
    auto views = state_->rail_views(remote);
    if (!views) return views.code();
    return state_->rails.front()->can_transfer(*(**views).front());
  }

  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_read(const memory::segment_descriptor& remote, std::uint64_t offset, std::span<std::byte> dst,
                  CompletionToken&& token) {
    return asio::async_initiate<CompletionToken, void(std::error_code)>(
        initiation{state_}, token, std::cref(remote), offset, dst.data(), dst.size(), true);
  }

  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_write(const memory::segment_descriptor& remote, std::uint64_t offset, std::span<const std::byte> src,
                   CompletionToken&& token) {
    return asio::async_initiate<CompletionToken, void(std::error_code)>(
        initiation{state_}, token, std::cref(remote), offset, const_cast<std::byte*>(src.data()), src.size(), false);
  }

 private:
  using descriptor_ptr = std::shared_ptr<const memory::segment_descriptor>;

  struct local_range {
    std::size_t length;
    int gpu;   // CUDA ordinal, -1 for host memory
    int numa;  // host memory's NUMA node, -1 when unknown
  };

  struct state {
    state(Selector s, std::vector<std::unique_ptr<T>> r, std::chrono::steady_clock::duration after)
        : selector(std::move(s)), rails(std::move(r)), carried(rails.size()), failed_at(rails.size()),
          retry_after(after) {}

    Selector selector;
    std::vector<std::unique_ptr<T>> rails;
    std::vector<std::atomic<std::uint64_t>> carried;
    std::vector<std::optional<std::chrono::steady_clock::time_point>> failed_at;
    std::chrono::steady_clock::duration retry_after;
    std::mutex mu;
    std::map<std::uintptr_t, local_range> local;  // registered local memory: base -> (length, gpu, numa)
    // The descriptor as each rail sees it (rail `i`'s own entry under
    // T::name()), built once per segment registration (name, key, generation)
    // and shared by every op on it: one lookup per op, no copies.
    struct segment_views {
      std::uint64_t key = 0, generation = 0;
      std::shared_ptr<const std::vector<descriptor_ptr>> per_rail;
    };
    std::map<std::string, segment_views, std::less<>> views;
    std::size_t slices = 0;

    result<std::shared_ptr<const std::vector<descriptor_ptr>>> rail_views(const memory::segment_descriptor& remote) {
      std::lock_guard lock(mu);
      if (auto it = views.find(remote.name);
          it != views.end() && it->second.key == remote.key && it->second.generation == remote.generation)
        return it->second.per_rail;
      auto entry = remote.transports.find(T::name());
      if (entry == remote.transports.end() || !entry->is_object() || !entry->contains("rails") ||
          !(*entry)["rails"].is_array() || (*entry)["rails"].empty())
        return kvx::error{errc::unreachable, "multi_rail: segment '" + remote.name + "' has no rails for " + std::string(T::name())};
      const auto& list = (*entry)["rails"];
      auto per_rail = std::make_shared<std::vector<descriptor_ptr>>();
      for (std::size_t rail = 0; rail < rails.size(); ++rail) {
        auto view = std::make_shared<memory::segment_descriptor>(remote);
        view->transports[std::string(T::name())] = list[rail % list.size()];
        per_rail->push_back(std::move(view));
      }
      views[remote.name] = segment_views{remote.key, remote.generation, per_rail};
      return std::shared_ptr<const std::vector<descriptor_ptr>>(std::move(per_rail));
    }

    // The rail for the next slice, or nothing when every rail is down.
    std::optional<std::size_t> pick(const void* local_ptr, std::uint64_t avoid_mask) {
      std::lock_guard lock(mu);
      const auto now = std::chrono::steady_clock::now();
      for (std::size_t i = 0; i < failed_at.size(); ++i)
        if (failed_at[i] && now - *failed_at[i] >= retry_after && !(avoid_mask >> i & 1)) {
          failed_at[i].reset();
          selector.mark_healthy(i);
        }
      topology::slice_hint hint;
      hint.slice_index = slices++;
      const auto p = reinterpret_cast<std::uintptr_t>(local_ptr);
      if (auto it = local.upper_bound(p); it != local.begin()) {
        --it;
        if (p - it->first < it->second.length) {
          hint.gpu = it->second.gpu;
          hint.numa = it->second.numa;
        }
      }
      return selector.select(hint);
    }

    void mark_failed(std::size_t rail) {
      std::lock_guard lock(mu);
      if (!failed_at[rail]) {
        failed_at[rail] = std::chrono::steady_clock::now();
        selector.mark_failed(rail);
      }
    }
  };

  // One operation: tries rails until one succeeds, the error is final, the
  // caller cancels, or every rail failed it.
  template <class Handler>
  struct attempt {
    std::shared_ptr<state> st;
    std::shared_ptr<const std::vector<descriptor_ptr>> views;  // the descriptor as each rail sees it
    std::uint64_t offset;
    std::byte* local;
    std::size_t length;
    bool read;
    std::uint64_t tried = 0;  // rails already tried (bit mask)
    Handler handler;
    // The rail operation's own signal: the caller's slot holds one handler,
    // which outlives each rail's operation and remembers that it fired.
    asio::cancellation_signal rail_signal{};
    std::atomic<bool> cancelled{false};

    // Runs before the first rail starts; the handler stays until completion.
    void watch_caller_cancellation() {
      auto slot = asio::get_associated_cancellation_slot(handler);
      if (!slot.is_connected()) return;
      slot.assign([this](asio::cancellation_type_t type) {
        cancelled.store(true, std::memory_order_release);
        rail_signal.emit(type);
      });
    }

    // Before the handler runs (or is posted): the slot's handler points here.
    void stop_watching() {
      if (auto slot = asio::get_associated_cancellation_slot(handler); slot.is_connected()) slot.clear();
    }

    static void run(std::unique_ptr<attempt> self, std::error_code last) {
      auto rail = self->st->pick(self->local, self->tried);
      if (rail && (self->tried >> *rail & 1)) rail.reset();  // the selector offers only rails that failed it
      if (!rail) return finish(std::move(self), last ? last : make_error_code(errc::unreachable));
      self->tried |= std::uint64_t{1} << *rail;
      auto& t = *self->st->rails[*rail];
      auto* raw = self.get();
      // Completion where the caller asked; the caller's cancellation reaches the rail's op through rail_signal.
      auto ex = asio::get_associated_executor(raw->handler, t.get_executor());
      auto next = asio::bind_cancellation_slot(
          raw->rail_signal.slot(), asio::bind_executor(ex, [self = std::move(self), r = *rail](std::error_code ec) mutable {
            if (ec && is_link_error(ec)) {
              self->st->mark_failed(r);
              if (self->cancelled.load(std::memory_order_acquire))
                return finish(std::move(self), make_error_code(errc::cancelled));
              return run(std::move(self), ec);
            }
            self->st->carried[r].fetch_add(1, std::memory_order_relaxed);
            self->stop_watching();
            std::move(self->handler)(ec);
          }));
      const auto& view = *(*raw->views)[*rail];
      if (raw->read)
        t.async_read(view, raw->offset, std::span<std::byte>(raw->local, raw->length), std::move(next));
      else
        t.async_write(view, raw->offset, std::span<const std::byte>(raw->local, raw->length), std::move(next));
    }

    static void finish(std::unique_ptr<attempt> self, std::error_code ec) {
      self->stop_watching();
      auto ex = self->st->rails.front()->get_executor();
      kvx::detail::post_completion(ex, std::move(self->handler), ec);
    }
  };

  struct initiation {
    std::shared_ptr<state> st;
    template <class Handler>
    void operator()(Handler&& handler, const memory::segment_descriptor& remote, std::uint64_t offset, std::byte* local,
                    std::size_t length, bool read) const {
      using op = attempt<std::decay_t<Handler>>;
      auto views = st->rail_views(remote);
      if (!views) {
        kvx::detail::post_completion(st->rails.front()->get_executor(), std::forward<Handler>(handler), views.code());
        return;
      }
      std::unique_ptr<op> self(new op{st, std::move(*views), offset, local, length, read, 0, std::forward<Handler>(handler)});
      self->watch_caller_cancellation();
      op::run(std::move(self), {});
    }
  };

  std::shared_ptr<state> state_;
};

}  // namespace kvx::transport
