#pragma once
//! \file
//! `any_transport`: a transport chosen at run time from JSON config, for tools
//! and benchmarks (`{"transport": "local"}`, `{"transport": "tcp", ...}`).
//!
//! Transports announce themselves to the `transport_registry` with a factory;
//! the core knows only `local`. A backend header adds its own at static
//! initialisation, so including the header is what makes the name available:
//!
//! \code
//! // in kvx/transport/tcp.hpp
//! inline const bool kvx_tcp_registered = kvx::transfer::transport_registry::instance().add(
//!     "tcp", [](kvx::asio::any_io_executor ex, const kvx::config::view& cfg) -> kvx::result<kvx::transfer::any_transport> {
//!       ... validate cfg (cfg.allow_only({"transport", "port", ...})), build, return kvx::transfer::any_transport(std::move(t));
//!     });
//! // a tool
//! auto t = kvx::transfer::make_transport(io.get_executor(), *kvx::config::parse(R"({"transport": "local"})"));
//! \endcode
//!
//! An unknown name is an error listing the known ones; a factory's errors
//! name the bad field. The erased transport is a `transport` itself: its
//! static `capabilities` are the loosest (every memory kind, nothing
//! promised), `runtime_capabilities()` and `runtime_name()` report the
//! wrapped transport's, and the transfer engine publishes its descriptor entry
//! under `runtime_name()`, so peers using the concrete type interoperate.
//! Each operation costs one virtual call and one type-erased handler.

#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <utility>

#include <boost/asio/any_completion_handler.hpp>
#include <boost/asio/any_io_executor.hpp>

#include <kvx/core/async.hpp>
#include <kvx/core/config.hpp>
#include <kvx/transport/local.hpp>
#include <kvx/transport/transport.hpp>

namespace kvx::transfer {

class any_transport {
 public:
  using transport_concept = transport::transport_tag;
  using executor_type = asio::any_io_executor;
  static constexpr transport::transport_capabilities capabilities{
      .memory = transport::memory_kinds::host | transport::memory_kinds::cuda | transport::memory_kinds::file,
      .one_sided = false,
      .zero_copy = false,
      .bounce_buffered = false,
      .same_host_only = false,
      .same_process_only = false};
  static constexpr std::string_view name() noexcept { return "any"; }

  //! Wraps a concrete transport (moved or built in place).
  template <class T>
    requires(!std::same_as<std::decay_t<T>, any_transport>)
  explicit any_transport(T&& t) : impl_(std::make_unique<model<std::decay_t<T>>>(std::forward<T>(t))) {
    static_assert(transport::check_transport<std::decay_t<T>>());
  }
  template <class T, class... Args>
  explicit any_transport(std::in_place_type_t<T>, Args&&... args)
      : impl_(std::make_unique<model<T>>(std::in_place, std::forward<Args>(args)...)) {
    static_assert(transport::check_transport<T>());
  }

  [[nodiscard]] std::string_view runtime_name() const noexcept { return impl_->name(); }
  [[nodiscard]] transport::transport_capabilities runtime_capabilities() const noexcept { return impl_->caps(); }
  [[nodiscard]] executor_type get_executor() const { return impl_->executor(); }

  result<nlohmann::json> register_memory(const memory::local_segment& s) { return impl_->register_memory(s); }
  result<void> deregister_memory(const memory::local_segment& s) { return impl_->deregister_memory(s); }
  [[nodiscard]] std::error_code can_transfer(const memory::segment_descriptor& r) const { return impl_->can_transfer(r); }

  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_read(const memory::segment_descriptor& remote, std::uint64_t offset, std::span<std::byte> dst,
                  CompletionToken&& token) {
    return asio::async_initiate<CompletionToken, void(std::error_code)>(
        [this](auto handler, const memory::segment_descriptor& r, std::uint64_t off, std::span<std::byte> d) {
          impl_->read(r, off, d, handler_type(std::move(handler)));
        },
        token, std::cref(remote), offset, dst);
  }

  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_write(const memory::segment_descriptor& remote, std::uint64_t offset, std::span<const std::byte> src,
                   CompletionToken&& token) {
    return asio::async_initiate<CompletionToken, void(std::error_code)>(
        [this](auto handler, const memory::segment_descriptor& r, std::uint64_t off, std::span<const std::byte> s) {
          impl_->write(r, off, s, handler_type(std::move(handler)));
        },
        token, std::cref(remote), offset, src);
  }

 private:
  using handler_type = asio::any_completion_handler<void(std::error_code)>;

  struct concept_base {
    virtual ~concept_base() = default;
    virtual std::string_view name() const noexcept = 0;
    virtual transport::transport_capabilities caps() const noexcept = 0;
    virtual executor_type executor() const = 0;
    virtual result<nlohmann::json> register_memory(const memory::local_segment&) = 0;
    virtual result<void> deregister_memory(const memory::local_segment&) = 0;
    virtual std::error_code can_transfer(const memory::segment_descriptor&) const = 0;
    virtual void read(const memory::segment_descriptor&, std::uint64_t, std::span<std::byte>, handler_type) = 0;
    virtual void write(const memory::segment_descriptor&, std::uint64_t, std::span<const std::byte>, handler_type) = 0;
  };

  template <class T>
  struct model final : concept_base {
    template <class U>
    explicit model(U&& u) : t(std::forward<U>(u)) {}
    template <class... Args>
    explicit model(std::in_place_t, Args&&... args) : t(std::forward<Args>(args)...) {}
    std::string_view name() const noexcept override { return T::name(); }
    transport::transport_capabilities caps() const noexcept override { return T::capabilities; }
    executor_type executor() const override { return t.get_executor(); }
    result<nlohmann::json> register_memory(const memory::local_segment& s) override { return t.register_memory(s); }
    result<void> deregister_memory(const memory::local_segment& s) override { return t.deregister_memory(s); }
    std::error_code can_transfer(const memory::segment_descriptor& r) const override { return t.can_transfer(r); }
    void read(const memory::segment_descriptor& r, std::uint64_t off, std::span<std::byte> d, handler_type h) override {
      t.async_read(r, off, d, std::move(h));
    }
    void write(const memory::segment_descriptor& r, std::uint64_t off, std::span<const std::byte> s, handler_type h) override {
      t.async_write(r, off, s, std::move(h));
    }
    T t;
  };

  std::unique_ptr<concept_base> impl_;
};

static_assert(transport::check_transport<any_transport>());

//! Builds a transport from the config object that names it.
using transport_factory = std::function<result<any_transport>(asio::any_io_executor, const config::view&)>;

//! Name -> factory. Thread-safe. `local` is always registered.
class transport_registry {
 public:
  static transport_registry& instance() {
    static transport_registry r;
    return r;
  }

  //! Adds `name`; `errc::already_exists` when it is taken.
  result<void> add(std::string name, transport_factory factory) {
    std::lock_guard lock(mutex_);
    if (!factories_.emplace(name, std::move(factory)).second)
      return error{errc::already_exists, "transport '" + name + "' is already registered"};
    return {};
  }

  [[nodiscard]] bool contains(std::string_view name) const {
    std::lock_guard lock(mutex_);
    return factories_.find(name) != factories_.end();
  }

  [[nodiscard]] std::string names() const {
    std::lock_guard lock(mutex_);
    std::string out;
    for (const auto& [n, f] : factories_) out += (out.empty() ? "" : ", ") + n;
    return out;
  }

  //! Builds the transport `cfg["transport"]` names, handing it the whole object.
  result<any_transport> make(asio::any_io_executor ex, const config::view& cfg) const {
    auto kind = cfg.required<std::string>("transport");
    KVX_TRY(kind);
    transport_factory f;
    {
      std::lock_guard lock(mutex_);
      auto it = factories_.find(*kind);
      if (it == factories_.end()) {
        std::string known;
        for (const auto& [n, g] : factories_) known += (known.empty() ? "" : ", ") + n;
        return error{errc::invalid_argument, "config field '" + cfg.path_of("transport") + "': unknown transport '" + *kind +
                                                 "' (known: " + known + ")"};
      }
      f = it->second;
    }
    return f(std::move(ex), cfg);
  }

 private:
  transport_registry() {
    factories_.emplace("local", [](asio::any_io_executor ex, const config::view& cfg) -> result<any_transport> {
      KVX_TRY(cfg.allow_only({"transport"}));
      return any_transport(std::in_place_type<transport::local>, std::move(ex));
    });
  }
  mutable std::mutex mutex_;
  std::map<std::string, transport_factory, std::less<>> factories_;
};

//! `transport_registry::instance().make(ex, config::view(cfg, path))`.
inline result<any_transport> make_transport(asio::any_io_executor ex, const nlohmann::json& cfg, std::string path = "") {
  return transport_registry::instance().make(std::move(ex), config::view(cfg, std::move(path)));
}

}  // namespace kvx::transfer
