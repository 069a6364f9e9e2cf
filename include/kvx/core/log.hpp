#pragma once
//! \file
//! Logging hook. kvx logs little (set-up, peers coming and going, errors that
//! are not returned to a caller); the embedding engine redirects it with
//! `set_log_sink` and filters it with `set_log_level`. Default: stderr, `warn`.
//!
//! \code
//! kvx::set_log_level(kvx::log_level::debug);
//! kvx::set_log_sink([](kvx::log_level l, std::string_view msg) { my_engine_log(l, msg); });
//! kvx::log(kvx::log_level::info, "registered segment ", name, " of ", bytes, " bytes");
//! \endcode

#include <atomic>
#include <cstdio>
#include <functional>
#include <memory>
#include <mutex>
#include <sstream>
#include <string_view>

namespace kvx {

enum class log_level : int { trace = 0, debug, info, warn, error, off };

inline constexpr std::string_view to_string(log_level l) noexcept {
  constexpr std::string_view names[] = {"trace", "debug", "info", "warn", "error", "off"};
  return names[static_cast<int>(l)];
}

//! Receives each message whose level passes the filter. May be called from any
//! thread, concurrently; a sink that is not thread-safe must lock.
using log_sink = std::function<void(log_level, std::string_view)>;

namespace detail {
struct log_state {
  std::atomic<int> level{static_cast<int>(log_level::warn)};
  std::mutex mutex;
  std::shared_ptr<const log_sink> sink;
};
inline log_state& logger() {
  static log_state state;
  return state;
}
inline void default_sink(log_level l, std::string_view msg) {
  std::fprintf(stderr, "[kvx %.*s] %.*s\n", static_cast<int>(to_string(l).size()), to_string(l).data(),
               static_cast<int>(msg.size()), msg.data());
}
}  // namespace detail

inline void set_log_level(log_level l) noexcept {
  detail::logger().level.store(static_cast<int>(l), std::memory_order_relaxed);
}
inline log_level get_log_level() noexcept {
  return static_cast<log_level>(detail::logger().level.load(std::memory_order_relaxed));
}
inline bool log_enabled(log_level l) noexcept { return static_cast<int>(l) >= static_cast<int>(get_log_level()); }

//! Installs `sink`; an empty function restores the stderr default.
inline void set_log_sink(log_sink sink) {
  auto& s = detail::logger();
  std::lock_guard lock(s.mutex);
  s.sink = sink ? std::make_shared<const log_sink>(std::move(sink)) : nullptr;
}

//! Formats `parts` with `operator<<` and hands the line to the sink, if `l` passes the filter.
template <class... Parts>
void log(log_level l, const Parts&... parts) {
  if (!log_enabled(l) || l == log_level::off) return;
  std::ostringstream line;
  (line << ... << parts);
  auto& s = detail::logger();
  std::shared_ptr<const log_sink> sink;
  {
    std::lock_guard lock(s.mutex);
    sink = s.sink;
  }
  if (sink)
    (*sink)(l, line.view());
  else
    detail::default_sink(l, line.view());
}

}  // namespace kvx
