#pragma once
//! \file
//! `checksummed<T>`: any transport, with every slice verified end to end by
//! XXH3-64; a mismatch completes the operation with `errc::checksum_mismatch`.
//!
//! How, without changing any wire protocol: the owner of a segment takes no
//! part in a one-sided transfer, so nobody on the far side can hash the bytes
//! for us. Instead every operation is followed by a *verification read* of the
//! same remote range into a scratch buffer this decorator registered with `T`:
//!
//! - write: hash the source, write it, read the range back, compare;
//! - read: read into the destination, hash it, read the range again, compare.
//!
//! What it costs: every slice crosses the link twice and is hashed twice
//! (XXH3 runs at tens of GB/s, so the second transfer dominates: expect about
//! half the bandwidth of `T`), plus `scratch_chunks` x `scratch_chunk` bytes
//! of registered scratch memory. Verifications wait for a free scratch chunk,
//! so at most `scratch_chunks` run at once. Use it where corruption must be
//! caught (a new NIC, a suspicious link, tests with `faulty<T>`), not on every
//! production path.
//!
//! What it catches: bytes changed in flight in either transfer (the two hashes
//! differ). A read also reports a mismatch when someone writes the remote
//! range while it is being read, which is a data race the caller should know
//! about. Hashing is chunked (the hash of chunk k seeds chunk k + 1) with the
//! same chunk boundaries on both sides.
//!
//! Thread-safe like `T`. Completions keep the caller's executor and
//! cancellation slot; cancelling during verification cancels the
//! verification read.
//!
//! \code
//! kvx::transport::checksummed<kvx::transport::local> t({}, io.get_executor());
//! t.async_write(desc, 0, src, [](std::error_code ec) { if (ec == kvx::errc::checksum_mismatch) ... });
//! \endcode

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <boost/asio/associated_cancellation_slot.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/dispatch.hpp>

#ifndef XXH_INLINE_ALL
#define XXH_INLINE_ALL
#endif
#include <xxhash.h>

#include <kvx/core/async.hpp>
#include <kvx/memory/segment_table.hpp>
#include <kvx/transport/decorators/decorator.hpp>
#include <kvx/transport/detail/then_handler.hpp>
#include <kvx/transport/local.hpp>
#include <kvx/transport/transport.hpp>

namespace kvx::transport {

struct checksummed_config {
  std::size_t scratch_chunk = 256 * 1024;  //!< bytes per verification read
  std::size_t scratch_chunks = 4;          //!< verifications that may run at once
};

namespace detail {
//! XXH3-64 of `bytes` hashed in `chunk`-sized pieces, each seeding the next.
inline std::uint64_t chunked_xxh3(std::span<const std::byte> bytes, std::size_t chunk) {
  std::uint64_t h = 0;
  for (std::size_t pos = 0; pos < bytes.size(); pos += chunk) {
    const std::size_t n = std::min(chunk, bytes.size() - pos);
    h = XXH3_64bits_withSeed(bytes.data() + pos, n, h);
  }
  return h;
}
}  // namespace detail

template <class T>
class checksummed : public decorator<T> {
 public:
  //! Registers the scratch memory with the inner transport; throws
  //! `std::runtime_error` when that fails (a set-up failure).
  template <class... Args>
  explicit checksummed(checksummed_config cfg, Args&&... inner_args)
      : decorator<T>(std::in_place, std::forward<Args>(inner_args)...), cfg_(cfg) {
    if (cfg_.scratch_chunk == 0 || cfg_.scratch_chunks == 0)
      throw std::invalid_argument("kvx: checksummed_config needs scratch_chunk > 0 and scratch_chunks > 0");
    scratch_.assign(cfg_.scratch_chunk * cfg_.scratch_chunks, std::byte{0});  // touched: pre-faulted
    scratch_seg_ = memory::local_segment{"kvx-checksum-scratch-" + std::to_string(memory::detail::random_u64()),
                                         memory::memory_region{scratch_.data(), scratch_.size()},
                                         memory::detail::random_u64(), memory::detail::random_u64()};
    auto reg = this->inner_.register_memory(scratch_seg_);
    if (!reg) throw std::runtime_error("kvx: checksummed<" + std::string(T::name()) + ">: " + reg.error().message());
    for (std::size_t i = 0; i < cfg_.scratch_chunks; ++i) free_.push_back(i);
  }
  checksummed(const checksummed&) = delete;
  checksummed& operator=(const checksummed&) = delete;
  ~checksummed() { (void)this->inner_.deregister_memory(scratch_seg_); }

  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_read(const memory::segment_descriptor& remote, std::uint64_t offset, std::span<std::byte> dst,
                  CompletionToken&& token) {
    return asio::async_initiate<CompletionToken, void(std::error_code)>(
        [this](auto handler, const memory::segment_descriptor& r, std::uint64_t off, std::span<std::byte> d) {
          auto rc = std::make_shared<memory::segment_descriptor>(r);
          this->inner_.async_read(*rc, off, d,
                            detail::make_then_handler(std::move(handler), [this, rc, off, d](auto h, std::error_code ec) {
                              if (ec) return std::move(h)(ec);
                              this->verify(std::move(h), std::move(rc), off, d.size(), detail::chunked_xxh3(d, this->cfg_.scratch_chunk));
                            }));
        },
        token, std::cref(remote), offset, dst);
  }

  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_write(const memory::segment_descriptor& remote, std::uint64_t offset, std::span<const std::byte> src,
                   CompletionToken&& token) {
    return asio::async_initiate<CompletionToken, void(std::error_code)>(
        [this](auto handler, const memory::segment_descriptor& r, std::uint64_t off, std::span<const std::byte> s) {
          auto rc = std::make_shared<memory::segment_descriptor>(r);
          const std::uint64_t expected = detail::chunked_xxh3(s, cfg_.scratch_chunk);
          this->inner_.async_write(*rc, off, s,
                             detail::make_then_handler(std::move(handler),
                                                       [this, rc, off, n = s.size(), expected](auto h, std::error_code ec) {
                                                         if (ec) return std::move(h)(ec);
                                                         this->verify(std::move(h), std::move(rc), off, n, expected);
                                                       }));
        },
        token, std::cref(remote), offset, src);
  }

 private:
  template <class Handler>
  struct verification : std::enable_shared_from_this<verification<Handler>> {
    verification(checksummed* s, Handler h, std::shared_ptr<memory::segment_descriptor> r, std::uint64_t o,
                 std::size_t n, std::uint64_t e)
        : self(s), handler(std::move(h)), remote(std::move(r)), off(o), len(n), expected(e) {}
    checksummed* self;
    Handler handler;
    std::shared_ptr<memory::segment_descriptor> remote;
    std::uint64_t off;
    std::size_t len;
    std::uint64_t expected;
    std::uint64_t hash = 0;
    std::size_t pos = 0;
    std::size_t chunk = 0;
    asio::cancellation_signal signal;

    auto executor() const { return asio::get_associated_executor(handler, self->inner_.get_executor()); }
    void start(std::size_t c) {
      chunk = c;
      next();
    }
    void next() {
      if (pos == len) return finish(hash == expected ? std::error_code{} : make_error_code(errc::checksum_mismatch));
      const std::size_t n = std::min(self->cfg_.scratch_chunk, len - pos);
      std::byte* buf = self->scratch_.data() + chunk * self->cfg_.scratch_chunk;
      // Each read completes on the caller's executor, where `signal` is emitted
      // (from the caller's slot) and where finish() clears that slot.
      auto done = [me = this->shared_from_this(), buf, n](std::error_code ec) {
        if (ec) return me->finish(ec);
        me->hash = XXH3_64bits_withSeed(buf, n, me->hash);
        me->pos += n;
        me->next();
      };
      self->inner_.async_read(*remote, off + pos, std::span<std::byte>(buf, n),
                              asio::bind_cancellation_slot(signal.slot(), asio::bind_executor(executor(), std::move(done))));
    }
    void finish(std::error_code ec) {
      if (auto slot = asio::get_associated_cancellation_slot(handler); slot.is_connected()) slot.clear();
      self->release(chunk);
      kvx::detail::post_completion(self->inner_.get_executor(), std::move(handler), ec);
    }
  };

  template <class Handler>
  void verify(Handler handler, std::shared_ptr<memory::segment_descriptor> remote, std::uint64_t off, std::size_t n,
              std::uint64_t expected) {
    auto v = std::make_shared<verification<Handler>>(this, std::move(handler), std::move(remote), off, n, expected);
    if (auto slot = asio::get_associated_cancellation_slot(v->handler); slot.is_connected())
      slot.assign([weak = std::weak_ptr<verification<Handler>>(v)](asio::cancellation_type_t t) {
        if (auto p = weak.lock()) p->signal.emit(t);
      });
    std::unique_lock lock(mutex_);
    if (free_.empty()) {
      // Released on another verification's executor: start on this one's.
      waiters_.push_back([v](std::size_t chunk) { asio::dispatch(v->executor(), [v, chunk] { v->start(chunk); }); });
      return;
    }
    const std::size_t c = free_.back();
    free_.pop_back();
    lock.unlock();
    v->start(c);
  }

  void release(std::size_t chunk) {
    std::unique_lock lock(mutex_);
    if (waiters_.empty()) {
      free_.push_back(chunk);
      return;
    }
    auto w = std::move(waiters_.front());
    waiters_.pop_front();
    lock.unlock();
    w(chunk);
  }

  checksummed_config cfg_;
  std::vector<std::byte> scratch_;
  memory::local_segment scratch_seg_;
  std::mutex mutex_;
  std::vector<std::size_t> free_;
  std::deque<std::function<void(std::size_t)>> waiters_;
};

static_assert(check_transport<checksummed<local>>());

}  // namespace kvx::transport
