#pragma once
//! \file
//! The transport conformance suite: typed GoogleTest tests every kvx transport
//! (and any user's own) runs, with `kvx::transport::local` as the reference.
//!
//! A transport instantiates it with an *environment*: a type that builds one
//! owner (serves the remote segment) and one initiator (issues reads and
//! writes) on a fresh `io_context` per test. They may be the same object.
//!
//! \code
//! struct my_env {
//!   using transport_type = my_transport;
//!   explicit my_env(boost::asio::io_context& io);
//!   transport_type& owner();       // serves the remote segment
//!   transport_type& initiator();   // issues reads and writes
//!   // optional: opt in to the large case (one read and one write of this many bytes)
//!   static constexpr std::uint64_t large_transfer_bytes = 256 << 20;
//! };
//! KVX_TRANSPORT_CONFORMANCE(MyTransport, my_env);   // at namespace scope, after the env
//! \endcode
//!
//! What it checks, on real bytes, every byte compared against the source:
//! randomized reads and writes of 1 byte to 4 MiB at unaligned offsets, both
//! directions; many operations in flight from several coroutines
//! (`co_spawn` + `use_awaitable`), from a burst of callbacks and from several
//! initiating threads while two threads run the `io_context`; every error path
//! (unknown segment, bad key, out of range including offset overflow, stale
//! generation, deregistered segment) leaves the target bytes untouched;
//! deadlines and cancellation (`kvx::cancel_after`, cancellation slots) end an
//! operation exactly once with success or `cancelled`/`timed_out`, never a
//! write outside the buffer; completions never run inside the initiating
//! function and run on the handler's associated executor; capabilities agree
//! with what `can_transfer` says.
//!
//! Each test drives the `io_context` with `run_one_for` and gives up after
//! 20 s (a failure, never a hang). The environment's transports must make
//! progress on that `io_context` alone (they may own helper threads of their
//! own, e.g. a peer process).
//!
//! Environments are named from the global namespace (the suite is
//! `::kvx_transport_conformance`), so define the env at namespace scope
//! (an anonymous namespace is fine) and invoke the macro in the same scope.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <kvx/core/async.hpp>
#include <kvx/memory/segment_table.hpp>
#include <kvx/testing/random_bytes.hpp>
#include <kvx/transport/transport.hpp>

namespace kvx::testing {

namespace detail {
template <class Env>
constexpr std::uint64_t large_transfer_bytes() {
  if constexpr (requires { Env::large_transfer_bytes; })
    return static_cast<std::uint64_t>(Env::large_transfer_bytes);
  else
    return 0;
}
}  // namespace detail

}  // namespace kvx::testing

//! The fixture of the suite; `Env` as described in the file comment.
template <class Env>
class kvx_transport_conformance : public ::testing::Test {
 protected:
  using env_type = Env;
  using transport_type = typename Env::transport_type;
  static_assert(kvx::transport::check_transport<transport_type>());

  static constexpr std::uint64_t remote_size = (8u << 20) + 123;  // odd length: no alignment luck
  static constexpr std::uint64_t max_op = 4u << 20;
  static constexpr std::size_t guard = 64;  // bytes checked on each side of a destination
  static constexpr auto give_up_after = std::chrono::seconds(20);

  //! A segment served by the owner, its bytes and the descriptor the initiator uses.
  struct remote_segment {
    kvx::memory::local_segment seg;
    kvx::memory::segment_descriptor desc;
    std::span<std::byte> bytes;
  };
  //! Memory of the initiator, registered with it.
  struct local_buffer {
    kvx::memory::local_segment seg;
    std::span<std::byte> bytes;  // usable bytes, with `guard` bytes before and after
    std::span<std::byte> with_guards;
  };

  kvx_transport_conformance() : env_(std::make_unique<Env>(io_)) {}

  ~kvx_transport_conformance() override {
    for (auto it = registered_.rbegin(); it != registered_.rend(); ++it) {
      auto r = it->first->deregister_memory(it->second);
      EXPECT_TRUE(r || r.code() == kvx::errc::unknown_segment) << r.error().message();
    }
    registered_.clear();
    drain();
    env_.reset();
    drain();
  }

  Env& env() { return *env_; }
  transport_type& owner() { return env_->owner(); }
  transport_type& initiator() { return env_->initiator(); }

  remote_segment make_remote(std::uint64_t size, std::uint64_t seed) {
    auto& mem = storage_.emplace_back(new std::byte[size]);
    std::span<std::byte> bytes(mem.get(), size);
    kvx::testing::fill_random(bytes, seed);
    auto seg = owner_table_.add(kvx::testing::unique_segment_name("conf-remote"), {bytes.data(), bytes.size()});
    EXPECT_TRUE(seg) << seg.error().message();
    auto entry = owner().register_memory(*seg);
    EXPECT_TRUE(entry) << entry.error().message();
    registered_.emplace_back(&owner(), *seg);
    auto desc = owner_table_.describe(*seg);
    desc.transports[std::string(transport_type::name())] = entry ? *entry : nlohmann::json::object();
    return {*seg, desc, bytes};
  }

  local_buffer make_local(std::uint64_t size, std::uint64_t seed) {
    const std::uint64_t total = size + 2 * guard;
    auto& mem = storage_.emplace_back(new std::byte[total]);
    std::span<std::byte> all(mem.get(), total);
    kvx::testing::fill_random(all, seed);
    auto seg = initiator_table_.add(kvx::testing::unique_segment_name("conf-local"), {all.data(), all.size()});
    EXPECT_TRUE(seg) << seg.error().message();
    auto entry = initiator().register_memory(*seg);
    EXPECT_TRUE(entry) << entry.error().message();
    registered_.emplace_back(&initiator(), *seg);
    return {*seg, all.subspan(guard, size), all};
  }

  //! Runs handlers until `done()` or the give-up deadline; false on the deadline.
  template <class Pred>
  bool run_until(Pred done) {
    const auto deadline = std::chrono::steady_clock::now() + give_up_after;
    while (!done()) {
      if (std::chrono::steady_clock::now() > deadline) return false;
      if (io_.stopped()) io_.restart();
      io_.run_one_for(std::chrono::milliseconds(5));
    }
    return true;
  }

  void drain() {
    io_.restart();
    io_.poll();
  }

  //! One read or write, checking that the completion is not inline.
  std::error_code read(const kvx::memory::segment_descriptor& d, std::uint64_t off, std::span<std::byte> dst) {
    std::optional<std::error_code> out;
    initiator().async_read(d, off, dst, [&out](std::error_code ec) { out = ec; });
    EXPECT_FALSE(out) << "async_read completed inside the initiating function";
    if (!run_until([&] { return out.has_value(); })) {
      ADD_FAILURE() << "async_read did not complete within " << give_up_after.count() << " s";
      return kvx::errc::internal;
    }
    return *out;
  }
  std::error_code write(const kvx::memory::segment_descriptor& d, std::uint64_t off, std::span<const std::byte> src) {
    std::optional<std::error_code> out;
    initiator().async_write(d, off, src, [&out](std::error_code ec) { out = ec; });
    EXPECT_FALSE(out) << "async_write completed inside the initiating function";
    if (!run_until([&] { return out.has_value(); })) {
      ADD_FAILURE() << "async_write did not complete within " << give_up_after.count() << " s";
      return kvx::errc::internal;
    }
    return *out;
  }

  //! The guard bytes around `buf.bytes` still hold what `snapshot` holds.
  static std::string guards_intact(const local_buffer& buf, const std::vector<std::byte>& snapshot) {
    const std::span<const std::byte> all = buf.with_guards;
    const std::span<const std::byte> snap(snapshot);
    if (auto d = kvx::testing::first_difference(all.first(guard), snap.first(guard)); !d.empty())
      return "guard before the buffer was written: " + d;
    if (auto d = kvx::testing::first_difference(all.last(guard), snap.last(guard)); !d.empty())
      return "guard after the buffer was written: " + d;
    return {};
  }

  //! Expects `ec` to be an error (any of `allowed`) and the write to have left `remote` unchanged.
  void expect_refused_write(const remote_segment& r, const kvx::memory::segment_descriptor& d, std::uint64_t off,
                            std::span<const std::byte> src, std::initializer_list<kvx::errc> allowed) {
    std::vector<std::byte> before(r.bytes.begin(), r.bytes.end());
    auto ec = write(d, off, src);
    expect_one_of(ec, allowed);
    EXPECT_TRUE(std::memcmp(before.data(), r.bytes.data(), before.size()) == 0)
        << "a refused write changed the owner's bytes";
  }
  static void expect_one_of(std::error_code ec, std::initializer_list<kvx::errc> allowed) {
    bool ok = false;
    std::string names;
    for (auto a : allowed) {
      ok = ok || ec == a;
      names += (names.empty() ? "" : " or ") + make_error_code(a).message();
    }
    EXPECT_TRUE(ok) << "got '" << ec.message() << "', want " << names;
  }

  boost::asio::io_context io_;
  std::unique_ptr<Env> env_;
  kvx::memory::segment_table owner_table_{"conformance-owner"};
  kvx::memory::segment_table initiator_table_{"conformance-initiator"};
  std::vector<std::unique_ptr<std::byte[]>> storage_;
  std::vector<std::pair<transport_type*, kvx::memory::local_segment>> registered_;
};

TYPED_TEST_SUITE_P(kvx_transport_conformance);

TYPED_TEST_P(kvx_transport_conformance, CapabilitiesAgreeWithCanTransfer) {
  using T = typename TestFixture::transport_type;
  constexpr kvx::transport::transport_capabilities caps = T::capabilities;
  static_assert(!(caps.zero_copy && caps.bounce_buffered), "a transport cannot be zero-copy and bounce-buffered");
  static_assert(!caps.same_process_only || caps.same_host_only, "same_process_only implies same_host_only");
  static_assert(caps.memory != kvx::transport::memory_kinds::none, "a transport must touch some memory kind");
  EXPECT_FALSE(T::name().empty());

  auto r = this->make_remote(4096, 1);
  EXPECT_FALSE(this->initiator().can_transfer(r.desc)) << "cannot reach a segment its owner just registered";

  auto no_entry = r.desc;
  no_entry.transports = nlohmann::json::object();
  EXPECT_TRUE(this->initiator().can_transfer(no_entry)) << "accepts a descriptor without its transport entry";
  auto buf = this->make_local(64, 2);
  EXPECT_TRUE(this->read(no_entry, 0, buf.bytes.first(8))) << "read through a descriptor without an entry succeeded";

  for (auto kind : {kvx::memory::location::cuda(0), kvx::memory::location::file()}) {
    if (kvx::transport::has(caps.memory, kvx::transport::kind_of(kind))) continue;
    auto other = r.desc;
    other.where = kind;
    EXPECT_TRUE(this->initiator().can_transfer(other)) << "accepts " << kind.to_string() << " memory its capabilities exclude";
  }
  if (caps.same_host_only && !caps.same_process_only) {
    auto far = r.desc;
    far.host_id = "another-host-" + far.host_id;
    EXPECT_TRUE(this->initiator().can_transfer(far)) << "same_host_only transport accepts another host's segment";
  }
}

TYPED_TEST_P(kvx_transport_conformance, RandomizedReadsAreByteExact) {
  auto r = this->make_remote(TestFixture::remote_size, 11);
  auto buf = this->make_local(TestFixture::max_op, 12);
  kvx::testing::test_rng rng(13);
  for (int i = 0; i < 40; ++i) {
    const std::uint64_t len = rng.log_uniform(1, TestFixture::max_op);
    const std::uint64_t off = rng.uniform(0, TestFixture::remote_size - len);
    const std::uint64_t at = rng.uniform(0, TestFixture::max_op - len);  // unaligned destination too
    std::vector<std::byte> snapshot(buf.with_guards.begin(), buf.with_guards.end());
    auto dst = buf.bytes.subspan(at, len);
    ASSERT_FALSE(this->read(r.desc, off, dst)) << "read " << len << " bytes at " << off;
    ASSERT_EQ(kvx::testing::first_difference(dst, r.bytes.subspan(off, len)), "") << "read " << len << " at " << off;
    // Nothing outside dst changed.
    auto all = std::span<const std::byte>(buf.with_guards);
    const std::size_t start = TestFixture::guard + at;
    ASSERT_EQ(kvx::testing::first_difference(all.first(start), std::span<const std::byte>(snapshot).first(start)), "");
    ASSERT_EQ(kvx::testing::first_difference(all.subspan(start + len), std::span<const std::byte>(snapshot).subspan(start + len)), "");
  }
}

TYPED_TEST_P(kvx_transport_conformance, RandomizedWritesAreByteExact) {
  auto r = this->make_remote(TestFixture::remote_size, 21);
  auto buf = this->make_local(TestFixture::max_op, 22);
  kvx::testing::test_rng rng(23);
  std::vector<std::byte> shadow(r.bytes.begin(), r.bytes.end());
  for (int i = 0; i < 40; ++i) {
    const std::uint64_t len = rng.log_uniform(1, TestFixture::max_op);
    const std::uint64_t off = rng.uniform(0, TestFixture::remote_size - len);
    const std::uint64_t at = rng.uniform(0, TestFixture::max_op - len);
    auto src = buf.bytes.subspan(at, len);
    kvx::testing::fill_random(src, 100 + static_cast<std::uint64_t>(i));
    ASSERT_FALSE(this->write(r.desc, off, src)) << "write " << len << " bytes at " << off;
    std::memcpy(shadow.data() + off, src.data(), len);
    ASSERT_EQ(kvx::testing::first_difference(r.bytes, shadow), "") << "after writing " << len << " at " << off;
  }
}

TYPED_TEST_P(kvx_transport_conformance, EdgesOfTheSegmentAreReachable) {
  auto r = this->make_remote(4099, 31);
  auto buf = this->make_local(4099, 32);
  const std::uint64_t n = r.bytes.size();
  ASSERT_FALSE(this->read(r.desc, 0, buf.bytes.first(1)));
  EXPECT_EQ(buf.bytes[0], r.bytes[0]);
  ASSERT_FALSE(this->read(r.desc, n - 1, buf.bytes.subspan(7, 1)));
  EXPECT_EQ(buf.bytes[7], r.bytes[n - 1]);
  ASSERT_FALSE(this->read(r.desc, 0, buf.bytes.first(n)));
  EXPECT_EQ(kvx::testing::first_difference(buf.bytes.first(n), r.bytes), "");
  kvx::testing::fill_random(buf.bytes, 33);
  ASSERT_FALSE(this->write(r.desc, 0, buf.bytes.first(n)));
  EXPECT_EQ(kvx::testing::first_difference(r.bytes, buf.bytes.first(n)), "");
  ASSERT_FALSE(this->write(r.desc, n - 3, buf.bytes.subspan(100, 3)));
  EXPECT_EQ(kvx::testing::first_difference(r.bytes.last(3), buf.bytes.subspan(100, 3)), "");
}

TYPED_TEST_P(kvx_transport_conformance, CompletionsAreNeverInline) {
  auto r = this->make_remote(4096, 41);
  auto buf = this->make_local(4096, 42);
  auto bad = r.desc;
  bad.key ^= 0x5a5a;
  for (const auto* d : {&r.desc, &bad}) {
    int done = 0;
    for (int i = 0; i < 8; ++i) {
      this->initiator().async_read(*d, 16u * i, buf.bytes.subspan(16u * i, 16), [&done](std::error_code) { ++done; });
      ASSERT_EQ(done, 0) << "read completed inside async_read";
      this->initiator().async_write(*d, 2048u + 16u * i, std::span<const std::byte>(buf.bytes.subspan(2048u + 16u * i, 16)),
                                    [&done](std::error_code) { ++done; });
      ASSERT_EQ(done, 0) << "write completed inside async_write";
    }
    ASSERT_TRUE(this->run_until([&] { return done == 16; }));
  }
}

TYPED_TEST_P(kvx_transport_conformance, CompletionRunsOnTheHandlersExecutor) {
  auto r = this->make_remote(4096, 51);
  auto buf = this->make_local(4096, 52);
  auto strand = boost::asio::make_strand(this->io_);
  std::optional<bool> on_strand;
  std::optional<std::error_code> result;
  this->initiator().async_read(r.desc, 0, buf.bytes.first(100),
                               boost::asio::bind_executor(strand, [&](std::error_code ec) {
                                 on_strand = strand.running_in_this_thread();
                                 result = ec;
                               }));
  ASSERT_TRUE(this->run_until([&] { return result.has_value(); }));
  EXPECT_FALSE(*result);
  EXPECT_TRUE(on_strand.value_or(false)) << "completion did not run on the handler's associated executor";
}

TYPED_TEST_P(kvx_transport_conformance, ManyOpsInFlightFromCoroutines) {
  constexpr int workers = 4;
  constexpr std::uint64_t span_each = 1u << 20;
  auto r = this->make_remote(workers * span_each, 61);
  auto buf = this->make_local(workers * span_each, 62);
  std::atomic<int> finished{0};
  std::vector<std::string> failures(workers);
  for (int w = 0; w < workers; ++w) {
    boost::asio::co_spawn(
        this->io_,
        [&, w]() -> boost::asio::awaitable<void> {
          kvx::testing::test_rng rng(600 + static_cast<std::uint64_t>(w));
          auto remote = r.bytes.subspan(w * span_each, span_each);
          auto local = buf.bytes.subspan(w * span_each, span_each);
          for (int i = 0; i < 24 && failures[w].empty(); ++i) {
            const std::uint64_t len = rng.log_uniform(1, 256u << 10);
            const std::uint64_t off = rng.uniform(0, span_each - len);
            const std::uint64_t at = rng.uniform(0, span_each - len);
            const std::uint64_t remote_off = w * span_each + off;
            if (rng.next() & 1) {
              auto [ec] = co_await this->initiator().async_read(r.desc, remote_off, local.subspan(at, len),
                                                                boost::asio::as_tuple(boost::asio::use_awaitable));
              if (ec) failures[w] = "read failed: " + ec.message();
              else failures[w] = kvx::testing::first_difference(local.subspan(at, len), remote.subspan(off, len));
            } else {
              kvx::testing::fill_random(local.subspan(at, len), rng.next());
              auto [ec] = co_await this->initiator().async_write(r.desc, remote_off,
                                                                 std::span<const std::byte>(local.subspan(at, len)),
                                                                 boost::asio::as_tuple(boost::asio::use_awaitable));
              if (ec) failures[w] = "write failed: " + ec.message();
              else failures[w] = kvx::testing::first_difference(remote.subspan(off, len), local.subspan(at, len));
            }
          }
          ++finished;
        },
        boost::asio::detached);
  }
  ASSERT_TRUE(this->run_until([&] { return finished.load() == workers; })) << "coroutines did not finish";
  for (int w = 0; w < workers; ++w) EXPECT_EQ(failures[w], "") << "coroutine " << w;
}

TYPED_TEST_P(kvx_transport_conformance, BurstOfOpsInFlight) {
  constexpr int ops = 64;
  constexpr std::uint64_t each = 8192 + 3;
  auto r = this->make_remote(2 * ops * each, 71);
  auto buf = this->make_local(2 * ops * each, 72);
  int done = 0;
  std::vector<std::error_code> results(2 * ops);
  // Even slots: read remote -> local; odd slots: write local -> remote. Disjoint ranges.
  for (int i = 0; i < 2 * ops; ++i) {
    const std::uint64_t off = static_cast<std::uint64_t>(i) * each;
    auto h = [&, i](std::error_code ec) {
      results[i] = ec;
      ++done;
    };
    if (i % 2 == 0)
      this->initiator().async_read(r.desc, off, buf.bytes.subspan(off, each), h);
    else
      this->initiator().async_write(r.desc, off, std::span<const std::byte>(buf.bytes.subspan(off, each)), h);
  }
  ASSERT_EQ(done, 0);
  ASSERT_TRUE(this->run_until([&] { return done == 2 * ops; }));
  for (int i = 0; i < 2 * ops; ++i) {
    ASSERT_FALSE(results[i]) << "op " << i << ": " << results[i].message();
    const std::uint64_t off = static_cast<std::uint64_t>(i) * each;
    ASSERT_EQ(kvx::testing::first_difference(buf.bytes.subspan(off, each), r.bytes.subspan(off, each)), "") << "op " << i;
  }
}

TYPED_TEST_P(kvx_transport_conformance, OpsFromSeveralThreads) {
  constexpr int initiators = 3;
  constexpr int in_flight = 8;
  constexpr std::uint64_t chunk = 16384 + 5;
  constexpr std::uint64_t span_each = in_flight * chunk;
  auto r = this->make_remote(initiators * span_each, 81);
  auto buf = this->make_local(initiators * span_each, 82);
  auto guard = boost::asio::make_work_guard(this->io_);
  this->io_.restart();
  std::vector<std::thread> runners;
  for (int i = 0; i < 2; ++i) runners.emplace_back([this] { this->io_.run(); });
  std::vector<std::string> failures(initiators);
  std::vector<std::thread> issuers;
  for (int t = 0; t < initiators; ++t) {
    issuers.emplace_back([&, t] {
      kvx::testing::test_rng rng(800 + static_cast<std::uint64_t>(t));
      const std::uint64_t base = t * span_each;
      for (int round = 0; round < 12 && failures[t].empty(); ++round) {
        std::mutex m;
        std::condition_variable cv;
        int done = 0;
        std::vector<std::error_code> ecs(in_flight);
        std::vector<bool> is_read(in_flight);
        for (int k = 0; k < in_flight; ++k) {
          const std::uint64_t off = base + k * chunk;
          is_read[k] = (rng.next() & 1) != 0;
          auto h = [&, k](std::error_code ec) {
            std::lock_guard lock(m);
            ecs[k] = ec;
            ++done;
            cv.notify_one();
          };
          if (is_read[k]) {
            this->initiator().async_read(r.desc, off, buf.bytes.subspan(off, chunk), h);
          } else {
            kvx::testing::fill_random(buf.bytes.subspan(off, chunk), rng.next());
            this->initiator().async_write(r.desc, off, std::span<const std::byte>(buf.bytes.subspan(off, chunk)), h);
          }
        }
        std::unique_lock lock(m);
        if (!cv.wait_for(lock, std::chrono::seconds(20), [&] { return done == in_flight; })) {
          failures[t] = "ops did not complete within 20 s";
          // Wait without a limit: the handlers reference this frame.
          cv.wait(lock, [&] { return done == in_flight; });
          break;
        }
        for (int k = 0; k < in_flight && failures[t].empty(); ++k) {
          const std::uint64_t off = base + k * chunk;
          if (ecs[k]) failures[t] = (is_read[k] ? "read: " : "write: ") + ecs[k].message();
          else failures[t] = kvx::testing::first_difference(buf.bytes.subspan(off, chunk), r.bytes.subspan(off, chunk));
        }
      }
    });
  }
  for (auto& t : issuers) t.join();
  guard.reset();
  this->io_.stop();
  for (auto& t : runners) t.join();
  for (int t = 0; t < initiators; ++t) EXPECT_EQ(failures[t], "") << "initiating thread " << t;
}

TYPED_TEST_P(kvx_transport_conformance, UnknownSegmentIsRefused) {
  auto r = this->make_remote(4096, 91);
  auto buf = this->make_local(4096, 92);
  auto unknown = r.desc;
  unknown.name = "conformance-no-such-segment";
  std::vector<std::byte> snapshot(buf.with_guards.begin(), buf.with_guards.end());
  EXPECT_EQ(this->read(unknown, 0, buf.bytes.first(64)), kvx::errc::unknown_segment);
  EXPECT_EQ(kvx::testing::first_difference(buf.with_guards, snapshot), "") << "a refused read changed the destination";
  this->expect_refused_write(r, unknown, 0, buf.bytes.first(64), {kvx::errc::unknown_segment});
}

TYPED_TEST_P(kvx_transport_conformance, BadKeyIsRefused) {
  auto r = this->make_remote(4096, 101);
  auto buf = this->make_local(4096, 102);
  auto bad = r.desc;
  bad.key ^= 1;
  std::vector<std::byte> snapshot(buf.with_guards.begin(), buf.with_guards.end());
  EXPECT_EQ(this->read(bad, 0, buf.bytes.first(64)), kvx::errc::bad_key);
  EXPECT_EQ(kvx::testing::first_difference(buf.with_guards, snapshot), "") << "a refused read changed the destination";
  this->expect_refused_write(r, bad, 0, buf.bytes.first(64), {kvx::errc::bad_key});
}

TYPED_TEST_P(kvx_transport_conformance, OutOfRangeIsRefusedIncludingOverflow) {
  auto r = this->make_remote(4096, 111);
  auto buf = this->make_local(8192, 112);
  constexpr auto max = std::numeric_limits<std::uint64_t>::max();
  const struct {
    std::uint64_t off, len;
  } cases[] = {{4000, 97}, {4096, 1}, {0, 4097}, {max, 2}, {max - 10, 64}, {1ULL << 63, 4096}};
  for (auto c : cases) {
    std::vector<std::byte> snapshot(buf.with_guards.begin(), buf.with_guards.end());
    EXPECT_EQ(this->read(r.desc, c.off, buf.bytes.first(c.len)), kvx::errc::out_of_range)
        << "read " << c.len << " at " << c.off;
    EXPECT_EQ(kvx::testing::first_difference(buf.with_guards, snapshot), "");
    this->expect_refused_write(r, r.desc, c.off, buf.bytes.first(c.len), {kvx::errc::out_of_range});
  }
  // In range right after: the transport still works.
  EXPECT_FALSE(this->read(r.desc, 4000, buf.bytes.first(96)));
}

TYPED_TEST_P(kvx_transport_conformance, StaleGenerationIsRefused) {
  auto r = this->make_remote(4096, 121);
  auto buf = this->make_local(4096, 122);
  auto stale = r.desc;
  stale.generation += 1;
  std::vector<std::byte> snapshot(buf.with_guards.begin(), buf.with_guards.end());
  EXPECT_EQ(this->read(stale, 0, buf.bytes.first(64)), kvx::errc::stale);
  EXPECT_EQ(kvx::testing::first_difference(buf.with_guards, snapshot), "");
  this->expect_refused_write(r, stale, 0, buf.bytes.first(64), {kvx::errc::stale});
}

TYPED_TEST_P(kvx_transport_conformance, DeregisteredSegmentIsRefused) {
  auto r = this->make_remote(4096, 131);
  auto buf = this->make_local(4096, 132);
  ASSERT_FALSE(this->read(r.desc, 0, buf.bytes.first(64)));
  auto dereg = this->owner().deregister_memory(r.seg);
  ASSERT_TRUE(dereg) << dereg.error().message();
  EXPECT_EQ(this->owner().deregister_memory(r.seg).code(), kvx::errc::unknown_segment) << "deregistered twice";
  std::vector<std::byte> snapshot(buf.with_guards.begin(), buf.with_guards.end());
  const auto ec = this->read(r.desc, 0, buf.bytes.first(64));
  this->expect_one_of(ec, {kvx::errc::unknown_segment, kvx::errc::stale});
  EXPECT_EQ(kvx::testing::first_difference(buf.with_guards, snapshot), "");
  this->expect_refused_write(r, r.desc, 0, buf.bytes.first(64), {kvx::errc::unknown_segment, kvx::errc::stale});
}

TYPED_TEST_P(kvx_transport_conformance, DeadlinesAndCancellationEndOpsExactlyOnce) {
  constexpr std::uint64_t len = 2u << 20;
  auto r = this->make_remote(len, 141);
  auto buf = this->make_local(len, 142);
  for (int round = 0; round < 6; ++round) {
    std::vector<std::byte> snapshot(buf.with_guards.begin(), buf.with_guards.end());
    int calls = 0;
    std::error_code result;
    auto h = [&](std::error_code ec) {
      ++calls;
      result = ec;
    };
    boost::asio::cancellation_signal signal;
    const bool is_read = round % 2 == 0;
    switch (round / 2) {
      case 0:  // a deadline that has passed before the op can finish
        if (is_read) this->initiator().async_read(r.desc, 0, buf.bytes, kvx::cancel_after(this->io_.get_executor(), std::chrono::nanoseconds(1), h));
        else this->initiator().async_write(r.desc, 0, std::span<const std::byte>(buf.bytes), kvx::cancel_after(this->io_.get_executor(), std::chrono::nanoseconds(1), h));
        break;
      case 1:  // the caller cancels right after starting
        if (is_read) this->initiator().async_read(r.desc, 0, buf.bytes, boost::asio::bind_cancellation_slot(signal.slot(), h));
        else this->initiator().async_write(r.desc, 0, std::span<const std::byte>(buf.bytes), boost::asio::bind_cancellation_slot(signal.slot(), h));
        signal.emit(boost::asio::cancellation_type::terminal);
        break;
      default:  // a generous deadline that does not fire
        if (is_read) this->initiator().async_read(r.desc, 0, buf.bytes, kvx::cancel_after(this->io_.get_executor(), std::chrono::seconds(30), h));
        else this->initiator().async_write(r.desc, 0, std::span<const std::byte>(buf.bytes), kvx::cancel_after(this->io_.get_executor(), std::chrono::seconds(30), h));
        break;
    }
    ASSERT_TRUE(this->run_until([&] { return calls > 0; })) << "round " << round << " never completed";
    this->drain();
    EXPECT_EQ(calls, 1) << "completion ran more than once";
    if (round / 2 == 2) {
      EXPECT_FALSE(result) << result.message();
    } else if (result) {
      this->expect_one_of(result, {kvx::errc::cancelled, kvx::errc::timed_out});
    }
    if (!result) {  // success means every byte arrived
      EXPECT_EQ(kvx::testing::first_difference(buf.bytes, r.bytes), "") << "round " << round;
    }
    EXPECT_EQ(TestFixture::guards_intact(buf, snapshot), "") << "round " << round;
    kvx::testing::fill_random(buf.bytes, 1000 + static_cast<std::uint64_t>(round));
  }
  // The transport still works after cancellations.
  ASSERT_FALSE(this->read(r.desc, 5, buf.bytes.first(1000)));
  EXPECT_EQ(kvx::testing::first_difference(buf.bytes.first(1000), r.bytes.subspan(5, 1000)), "");
}

TYPED_TEST_P(kvx_transport_conformance, LargeTransfersAreByteExact) {
  constexpr std::uint64_t n = kvx::testing::detail::large_transfer_bytes<typename TestFixture::env_type>();
  if constexpr (n == 0) {
    GTEST_SKIP() << "the environment does not opt in (static constexpr std::uint64_t large_transfer_bytes)";
  } else {
    auto r = this->make_remote(n, 151);
    auto buf = this->make_local(n, 152);
    ASSERT_FALSE(this->read(r.desc, 0, buf.bytes));
    ASSERT_EQ(kvx::testing::first_difference(buf.bytes, r.bytes), "");
    kvx::testing::fill_random(buf.bytes, 153);
    ASSERT_FALSE(this->write(r.desc, 0, buf.bytes));
    ASSERT_EQ(kvx::testing::first_difference(r.bytes, buf.bytes), "");
  }
}

REGISTER_TYPED_TEST_SUITE_P(kvx_transport_conformance, CapabilitiesAgreeWithCanTransfer, RandomizedReadsAreByteExact,
                            RandomizedWritesAreByteExact, EdgesOfTheSegmentAreReachable, CompletionsAreNeverInline,
                            CompletionRunsOnTheHandlersExecutor, ManyOpsInFlightFromCoroutines, BurstOfOpsInFlight,
                            OpsFromSeveralThreads, UnknownSegmentIsRefused, BadKeyIsRefused,
                            OutOfRangeIsRefusedIncludingOverflow, StaleGenerationIsRefused,
                            DeregisteredSegmentIsRefused, DeadlinesAndCancellationEndOpsExactlyOnce,
                            LargeTransfersAreByteExact);

//! Runs the conformance suite on the environment `Env` under the test-name prefix `Name`.
#define KVX_TRANSPORT_CONFORMANCE(Name, Env) \
  INSTANTIATE_TYPED_TEST_SUITE_P(Name, kvx_transport_conformance, ::testing::Types<Env>)
