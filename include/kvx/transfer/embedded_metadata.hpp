#pragma once
//! \file
//! `kvx::transfer::embedded_metadata`: the in-process metadata backend, for
//! one host or tests. Shareable between engines of one process (hold it by
//! reference or `shared_ptr`); operations complete through the executor,
//! never inline.
//!
//! \code
//! asio::io_context io;
//! kvx::transfer::embedded_metadata meta(io.get_executor());
//! co_await meta.async_put("kvx/segment/kv", descriptor.dump(), asio::use_awaitable);
//! \endcode

#include <map>
#include <mutex>
#include <string>
#include <system_error>
#include <utility>

#include <boost/asio/any_io_executor.hpp>

#include <kvx/core/async.hpp>
#include <kvx/transfer/metadata_backend.hpp>

namespace kvx::transfer {

class embedded_metadata {
 public:
  using metadata_backend_concept = metadata_backend_tag;
  using executor_type = asio::any_io_executor;

  explicit embedded_metadata(executor_type ex) : ex_(std::move(ex)) {}
  [[nodiscard]] executor_type get_executor() const noexcept { return ex_; }

  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_put(std::string key, std::string value, CompletionToken&& token) {
    return asio::async_initiate<CompletionToken, void(std::error_code)>(
        [this](auto handler, std::string k, std::string v) {
          {
            std::lock_guard lock(mutex_);
            entries_[std::move(k)] = std::move(v);
          }
          kvx::detail::post_completion(ex_, std::move(handler), std::error_code{});
        },
        token, std::move(key), std::move(value));
  }

  template <asio::completion_token_for<void(std::error_code, std::string)> CompletionToken>
  auto async_get(std::string key, CompletionToken&& token) {
    return asio::async_initiate<CompletionToken, void(std::error_code, std::string)>(
        [this](auto handler, std::string k) {
          std::error_code ec;
          std::string value;
          {
            std::lock_guard lock(mutex_);
            if (auto it = entries_.find(k); it != entries_.end())
              value = it->second;
            else
              ec = errc::not_found;
          }
          kvx::detail::post_completion(ex_, std::move(handler), ec, std::move(value));
        },
        token, std::move(key));
  }

  template <asio::completion_token_for<void(std::error_code)> CompletionToken>
  auto async_remove(std::string key, CompletionToken&& token) {
    return asio::async_initiate<CompletionToken, void(std::error_code)>(
        [this](auto handler, std::string k) {
          std::error_code ec;
          {
            std::lock_guard lock(mutex_);
            if (entries_.erase(k) == 0) ec = errc::not_found;
          }
          kvx::detail::post_completion(ex_, std::move(handler), ec);
        },
        token, std::move(key));
  }

  template <asio::completion_token_for<void(std::error_code, metadata_entries)> CompletionToken>
  auto async_list(std::string prefix, CompletionToken&& token) {
    return asio::async_initiate<CompletionToken, void(std::error_code, metadata_entries)>(
        [this](auto handler, std::string p) {
          metadata_entries out;
          {
            std::lock_guard lock(mutex_);
            for (auto it = entries_.lower_bound(p); it != entries_.end() && it->first.compare(0, p.size(), p) == 0; ++it)
              out.emplace_back(it->first, it->second);
          }
          kvx::detail::post_completion(ex_, std::move(handler), std::error_code{}, std::move(out));
        },
        token, std::move(prefix));
  }

 private:
  executor_type ex_;
  std::mutex mutex_;
  std::map<std::string, std::string> entries_;
};

static_assert(check_metadata_backend<embedded_metadata>());

}  // namespace kvx::transfer
