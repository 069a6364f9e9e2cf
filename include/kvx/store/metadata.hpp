#pragma once
//! \file
//! The store's metadata backends in one include, and `any_metadata_backend`,
//! the backend picked at run time from JSON config (for tools, benchmarks
//! and deployments that choose the backend without recompiling).
//!
//! Includes `embedded_metadata` and `etcd_metadata` (no library beyond Boost),
//! `etcd_election`, and `redis_metadata` when kvx is built with hiredis
//! (`KVX_WITH_REDIS`, from the `kvx::redis` target).
//!
//! Config (every field but `backend` optional; unknown fields are errors):
//! \code{.json}
//! {"backend": "embedded" | "redis" | "etcd",
//!  "address": "127.0.0.1:6379",   // redis, etcd: host:port
//!  "prefix": "cluster-a/",        // redis, etcd: namespace of every key
//!  "timeout_ms": 5000,            // redis, etcd: default deadline per operation, 0 = none
//!  "max_idle_connections": 8}     // redis, etcd
//! \endcode
//!
//! \code
//! auto meta = kvx::store::any_metadata_backend::from_json(io.get_executor(), R"({"backend": "etcd", "address": "127.0.0.1:2379"})");
//! if (!meta) return fail(meta.error());   // "config field 'address': ..."
//! co_await meta->async_put("kvx/segment/kv", text, asio::use_awaitable);
//! \endcode
//!
//! Thread-safety and completion rules are the wrapped backend's; copies share
//! one backend. Leases (`async_acquire_lease` ...) forward to backends that
//! have them (Redis, etcd) and complete with `errc::not_supported` otherwise.

#include <chrono>
#include <memory>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>

#include <boost/asio/any_completion_handler.hpp>
#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/async_result.hpp>

#include <kvx/core/async.hpp>
#include <kvx/core/config.hpp>
#include <kvx/core/result.hpp>
#include <kvx/features.hpp>
#include <kvx/store/etcd_election.hpp>
#include <kvx/store/etcd_metadata.hpp>
#include <kvx/transfer/embedded_metadata.hpp>
#include <kvx/transfer/metadata_backend.hpp>
#if KVX_WITH_REDIS
#include <kvx/store/redis_metadata.hpp>
#endif

namespace kvx::store {

namespace detail {
struct lease_archetype_handler {
  void operator()(std::error_code) const {}
  void operator()(std::error_code, std::string) const {}
};
}  // namespace detail

//! A metadata backend with named leases (`redis_metadata`, `etcd_metadata`):
//! `async_acquire_lease(name, owner, ttl, token)`, `async_renew_lease(name,
//! owner, ttl, token)`, `async_release_lease(name, owner, token)` completing
//! with `void(std::error_code)` (`errc::busy`: someone else's;
//! `errc::not_found`: expired), and `async_lease_holder(name, token)`
//! completing with `void(std::error_code, std::string)`.
template <class M>
concept leasing_metadata_backend =
    transfer::metadata_backend<M> && requires(M& m, std::string s, std::chrono::milliseconds ttl) {
      m.async_acquire_lease(s, s, ttl, detail::lease_archetype_handler{});
      m.async_renew_lease(s, s, ttl, detail::lease_archetype_handler{});
      m.async_release_lease(s, s, detail::lease_archetype_handler{});
      m.async_lease_holder(s, detail::lease_archetype_handler{});
    };

//! Any metadata backend, chosen at run time. See the file comment.
class any_metadata_backend {
  using void_handler = asio::any_completion_handler<void(std::error_code)>;
  using string_handler = asio::any_completion_handler<void(std::error_code, std::string)>;
  using list_handler = asio::any_completion_handler<void(std::error_code, transfer::metadata_entries)>;

  struct interface {
    virtual ~interface() = default;
    virtual void put(std::string, std::string, void_handler) = 0;
    virtual void get(std::string, string_handler) = 0;
    virtual void remove(std::string, void_handler) = 0;
    virtual void list(std::string, list_handler) = 0;
    virtual void acquire(std::string, std::string, std::chrono::milliseconds, void_handler) = 0;
    virtual void renew(std::string, std::string, std::chrono::milliseconds, void_handler) = 0;
    virtual void release(std::string, std::string, void_handler) = 0;
    virtual void holder(std::string, string_handler) = 0;
  };

  template <class M>
  struct model final : interface {
    explicit model(std::shared_ptr<M> b) : backend(std::move(b)) {}
    void put(std::string k, std::string v, void_handler h) override { backend->async_put(std::move(k), std::move(v), std::move(h)); }
    void get(std::string k, string_handler h) override { backend->async_get(std::move(k), std::move(h)); }
    void remove(std::string k, void_handler h) override { backend->async_remove(std::move(k), std::move(h)); }
    void list(std::string p, list_handler h) override { backend->async_list(std::move(p), std::move(h)); }
    void acquire(std::string n, std::string o, std::chrono::milliseconds ttl, void_handler h) override {
      if constexpr (leasing_metadata_backend<M>)
        backend->async_acquire_lease(std::move(n), std::move(o), ttl, std::move(h));
      else
        unsupported(std::move(h));
    }
    void renew(std::string n, std::string o, std::chrono::milliseconds ttl, void_handler h) override {
      if constexpr (leasing_metadata_backend<M>)
        backend->async_renew_lease(std::move(n), std::move(o), ttl, std::move(h));
      else
        unsupported(std::move(h));
    }
    void release(std::string n, std::string o, void_handler h) override {
      if constexpr (leasing_metadata_backend<M>)
        backend->async_release_lease(std::move(n), std::move(o), std::move(h));
      else
        unsupported(std::move(h));
    }
    void holder(std::string n, string_handler h) override {
      if constexpr (leasing_metadata_backend<M>)
        backend->async_lease_holder(std::move(n), std::move(h));
      else
        kvx::detail::post_completion(backend->get_executor(), std::move(h), make_error_code(errc::not_supported), std::string{});
    }
    void unsupported(void_handler h) {
      kvx::detail::post_completion(backend->get_executor(), std::move(h), make_error_code(errc::not_supported));
    }
    std::shared_ptr<M> backend;
  };

 public:
  using metadata_backend_concept = transfer::metadata_backend_tag;
  using executor_type = asio::any_io_executor;

  //! Wraps `backend` (shared: the caller may keep using it), named `name` in diagnostics.
  template <class M>
  explicit any_metadata_backend(std::shared_ptr<M> backend, std::string name = "custom")
      : executor_(backend->get_executor()),
        name_(std::move(name)),
        leases_(leasing_metadata_backend<M>),
        target_(backend),
        target_type_(type_key<M>()),
        impl_(std::make_shared<model<M>>(std::move(backend))) {
    static_assert(transfer::check_metadata_backend<M>());
  }

  //! Builds the backend `v` describes (see the file comment); the error names
  //! the bad field.
  static result<any_metadata_backend> from_config(executor_type ex, const config::view& v) {
    auto backend = v.required<std::string>("backend");
    if (!backend) return backend.error();
    if (*backend == "embedded") {
      KVX_TRY(v.allow_only({"backend"}));
      return any_metadata_backend(std::make_shared<transfer::embedded_metadata>(ex), "embedded");
    }
    if (*backend == "etcd") {
      KVX_TRY(v.allow_only({"backend", "address", "prefix", "timeout_ms", "max_idle_connections"}));
      auto options = etcd_options::from_config(v);
      if (!options) return options.error();
      return any_metadata_backend(std::make_shared<etcd_metadata>(ex, std::move(*options)), "etcd");
    }
    if (*backend == "redis") {
#if KVX_WITH_REDIS
      KVX_TRY(v.allow_only({"backend", "address", "prefix", "timeout_ms", "max_idle_connections"}));
      auto options = redis_options::from_config(v);
      if (!options) return options.error();
      return any_metadata_backend(std::make_shared<redis_metadata>(ex, std::move(*options)), "redis");
#else
      return error{errc::not_supported, "config field '" + v.path_of("backend") +
                                            "': \"redis\" needs kvx built with hiredis (link kvx::redis; Debian: libhiredis-dev)"};
#endif
    }
    return error{errc::invalid_argument, "config field '" + v.path_of("backend") + "': unknown backend \"" + *backend +
                                             "\" (expected \"embedded\", \"redis\" or \"etcd\")"};
  }

  //! `from_config` on JSON text.
  static result<any_metadata_backend> from_json(executor_type ex, std::string_view text) {
    auto doc = config::parse(text);
    if (!doc) return doc.error();
    return from_config(std::move(ex), config::view(*doc));
  }

  [[nodiscard]] executor_type get_executor() const noexcept { return executor_; }
  //! "embedded", "redis", "etcd" or the name given to the constructor.
  [[nodiscard]] const std::string& backend_name() const noexcept { return name_; }
  [[nodiscard]] bool supports_leases() const noexcept { return leases_; }

  //! The wrapped backend if it is an `M` (e.g. an `etcd_metadata` to build
  //! an `etcd_election` on), else null.
  template <class M>
  [[nodiscard]] std::shared_ptr<M> target() const noexcept {
    if (target_type_ != type_key<M>()) return nullptr;
    return std::static_pointer_cast<M>(target_);
  }

  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_put(std::string key, std::string value, CompletionToken&& token) {
    return asio::async_initiate<CompletionToken, void(std::error_code)>(
        [impl = impl_](auto h, std::string k, std::string v) { impl->put(std::move(k), std::move(v), std::move(h)); }, token,
        std::move(key), std::move(value));
  }
  template <asio::completion_token_for<void(std::error_code, std::string)> CompletionToken>
  auto async_get(std::string key, CompletionToken&& token) {
    return asio::async_initiate<CompletionToken, void(std::error_code, std::string)>(
        [impl = impl_](auto h, std::string k) { impl->get(std::move(k), std::move(h)); }, token, std::move(key));
  }
  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_remove(std::string key, CompletionToken&& token) {
    return asio::async_initiate<CompletionToken, void(std::error_code)>(
        [impl = impl_](auto h, std::string k) { impl->remove(std::move(k), std::move(h)); }, token, std::move(key));
  }
  template <asio::completion_token_for<void(std::error_code, transfer::metadata_entries)> CompletionToken>
  auto async_list(std::string prefix, CompletionToken&& token) {
    return asio::async_initiate<CompletionToken, void(std::error_code, transfer::metadata_entries)>(
        [impl = impl_](auto h, std::string p) { impl->list(std::move(p), std::move(h)); }, token, std::move(prefix));
  }
  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_acquire_lease(std::string name, std::string owner, std::chrono::milliseconds ttl, CompletionToken&& token) {
    return asio::async_initiate<CompletionToken, void(std::error_code)>(
        [impl = impl_, ttl](auto h, std::string n, std::string o) { impl->acquire(std::move(n), std::move(o), ttl, std::move(h)); },
        token, std::move(name), std::move(owner));
  }
  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_renew_lease(std::string name, std::string owner, std::chrono::milliseconds ttl, CompletionToken&& token) {
    return asio::async_initiate<CompletionToken, void(std::error_code)>(
        [impl = impl_, ttl](auto h, std::string n, std::string o) { impl->renew(std::move(n), std::move(o), ttl, std::move(h)); },
        token, std::move(name), std::move(owner));
  }
  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_release_lease(std::string name, std::string owner, CompletionToken&& token) {
    return asio::async_initiate<CompletionToken, void(std::error_code)>(
        [impl = impl_](auto h, std::string n, std::string o) { impl->release(std::move(n), std::move(o), std::move(h)); }, token,
        std::move(name), std::move(owner));
  }
  template <asio::completion_token_for<void(std::error_code, std::string)> CompletionToken>
  auto async_lease_holder(std::string name, CompletionToken&& token) {
    return asio::async_initiate<CompletionToken, void(std::error_code, std::string)>(
        [impl = impl_](auto h, std::string n) { impl->holder(std::move(n), std::move(h)); }, token, std::move(name));
  }

 private:
  template <class M>
  static const void* type_key() noexcept {
    static const char key = 0;
    return &key;
  }

  executor_type executor_;
  std::string name_;
  bool leases_;
  std::shared_ptr<void> target_;
  const void* target_type_;
  std::shared_ptr<interface> impl_;
};

static_assert(transfer::check_metadata_backend<any_metadata_backend>());
static_assert(leasing_metadata_backend<etcd_metadata>);
static_assert(leasing_metadata_backend<any_metadata_backend>);
static_assert(!leasing_metadata_backend<transfer::embedded_metadata>);

}  // namespace kvx::store
