#pragma once
//! \file
//! JSON configuration with validation that names the bad field.
//!
//! Policies and stacks read their settings through `kvx::config::view`, a
//! path-tracking view of a `nlohmann::json` object: every error says which
//! field (`transport.tcp.connections`) was wrong and how.
//!
//! \code
//! auto doc = kvx::config::parse(R"({"tcp": {"connections": 4, "slice": "1MiB"}})");
//! kvx::config::view root(*doc);
//! auto tcp = root.child("tcp");                              // result<view>
//! auto n = tcp->optional<unsigned>("connections", 1);        // 4
//! auto slice = tcp->optional<kvx::config::bytes>("slice", {64 * 1024});  // 1 MiB
//! if (auto ok = tcp->allow_only({"connections", "slice"}); !ok) report(ok.error());
//! \endcode

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <string>
#include <string_view>
#include <type_traits>

#include <nlohmann/json.hpp>

#include <kvx/core/bytes.hpp>
#include <kvx/core/result.hpp>

namespace kvx::config {

using json = nlohmann::json;

//! A byte size read from either a number or a string such as "64MiB".
struct bytes {
  std::uint64_t value = 0;
  friend bool operator==(bytes, bytes) = default;
};

//! Parses JSON text; the error says where parsing failed.
inline result<json> parse(std::string_view text) {
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return error{errc::invalid_argument, "config is not valid JSON"};
  return j;
}

namespace detail {
inline const char* type_name(const json& j) { return j.type_name(); }

//! The wrong value as an error quotes it: scalars up to 64 characters,
//! arrays and objects by type only. The value may come from a peer, and
//! printing it whole recurses as deep as it nests and is as long as it is.
inline std::string describe_value(const json& j) {
  if (j.is_structured()) return type_name(j);
  constexpr std::size_t max_quoted = 64;
  auto text = j.dump(-1, ' ', false, json::error_handler_t::replace);
  if (text.size() > max_quoted) text = text.substr(0, max_quoted) + "...";
  return std::string(type_name(j)) + " " + text;
}

template <class T>
result<T> convert(const json& j, const std::string& path) {
  auto wrong = [&](const char* expected) {
    return error{errc::invalid_argument, "config field '" + path + "': expected " + expected + ", got " + describe_value(j)};
  };
  if constexpr (std::is_same_v<T, bool>) {
    if (!j.is_boolean()) return wrong("a boolean");
    return j.get<bool>();
  } else if constexpr (std::is_same_v<T, bytes>) {
    if (j.is_number_unsigned()) return bytes{j.get<std::uint64_t>()};
    if (j.is_string()) {
      auto parsed = parse_size(j.get_ref<const std::string&>());
      if (!parsed) return error{errc::invalid_argument, "config field '" + path + "': " + parsed.error().context()};
      return bytes{*parsed};
    }
    return wrong("a byte size (number or string like \"64MiB\")");
  } else if constexpr (std::is_integral_v<T>) {
    if (!j.is_number_integer()) return wrong(std::is_unsigned_v<T> ? "an unsigned integer" : "an integer");
    if constexpr (std::is_unsigned_v<T>) {
      if (!j.is_number_unsigned()) return wrong("an unsigned integer");
      const auto v = j.get<std::uint64_t>();
      if (v > std::numeric_limits<T>::max())
        return error{errc::invalid_argument, "config field '" + path + "': " + std::to_string(v) + " is larger than " +
                                                 std::to_string(std::numeric_limits<T>::max())};
      return static_cast<T>(v);
    } else {
      const auto v = j.get<std::int64_t>();
      if (v < std::numeric_limits<T>::min() || v > std::numeric_limits<T>::max())
        return error{errc::invalid_argument, "config field '" + path + "': " + std::to_string(v) + " is out of range"};
      return static_cast<T>(v);
    }
  } else if constexpr (std::is_floating_point_v<T>) {
    if (!j.is_number()) return wrong("a number");
    return j.get<T>();
  } else if constexpr (std::is_same_v<T, std::string>) {
    if (!j.is_string()) return wrong("a string");
    return j.get<std::string>();
  } else {
    // User types read themselves through nlohmann's from_json found by ADL;
    // its exceptions are turned into an error naming the field.
#if defined(__cpp_exceptions)
    try {
      return j.get<T>();
    } catch (const std::exception& e) {
      return error{errc::invalid_argument, "config field '" + path + "': " + e.what()};
    }
#else
    return j.get<T>();
#endif
  }
}
}  // namespace detail

//! A path-tracking read-only view of a JSON object.
class view {
 public:
  explicit view(const json& j, std::string path = {}) : json_(&j), path_(std::move(path)) {}

  [[nodiscard]] const std::string& path() const noexcept { return path_; }
  [[nodiscard]] const json& raw() const noexcept { return *json_; }
  [[nodiscard]] bool contains(std::string_view key) const { return json_->is_object() && json_->contains(key); }

  //! The dotted path of `key` under this view, for error messages.
  [[nodiscard]] std::string path_of(std::string_view key) const {
    return path_.empty() ? std::string(key) : path_ + "." + std::string(key);
  }

  template <class T>
  result<T> required(std::string_view key) const {
    if (!json_->is_object()) return not_object();
    auto it = json_->find(key);
    if (it == json_->end()) return error{errc::invalid_argument, "config field '" + path_of(key) + "' is required"};
    return detail::convert<T>(*it, path_of(key));
  }

  template <class T>
  result<T> optional(std::string_view key, T fallback) const {
    if (!json_->is_object()) return not_object();
    auto it = json_->find(key);
    if (it == json_->end() || it->is_null()) return fallback;
    return detail::convert<T>(*it, path_of(key));
  }

  //! The object under `key`; an error if it is missing or not an object.
  result<view> child(std::string_view key) const {
    if (!json_->is_object()) return not_object();
    auto it = json_->find(key);
    if (it == json_->end()) return error{errc::invalid_argument, "config field '" + path_of(key) + "' is required"};
    if (!it->is_object())
      return error{errc::invalid_argument, "config field '" + path_of(key) + "': expected an object, got " +
                                               std::string(it->type_name())};
    return view(*it, path_of(key));
  }

  //! Rejects keys not in `allowed`, so a typo is an error rather than a default.
  result<void> allow_only(std::initializer_list<std::string_view> allowed) const {
    if (!json_->is_object()) return not_object();
    for (auto it = json_->begin(); it != json_->end(); ++it) {
      bool known = false;
      for (auto a : allowed) known = known || a == it.key();
      if (!known) {
        std::string list;
        for (auto a : allowed) list += (list.empty() ? "" : ", ") + std::string(a);
        return error{errc::invalid_argument, "unknown config field '" + path_of(it.key()) + "' (allowed: " + list + ")"};
      }
    }
    return {};
  }

 private:
  error not_object() const {
    return error{errc::invalid_argument,
                 "config " + (path_.empty() ? std::string("root") : "field '" + path_ + "'") + ": expected an object, got " +
                     std::string(json_->type_name())};
  }
  const json* json_;
  std::string path_;
};

}  // namespace kvx::config
