#pragma once
// etcd v3's HTTP/JSON gateway: base64 for keys and values, one keep-alive
// HTTP/1.1 connection per request in flight (Boost.Beast), gRPC status codes
// in error bodies mapped to kvx::errc.

#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <tuple>
#include <utility>

#include <boost/asio/awaitable.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http/message.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/string_body.hpp>
#include <boost/beast/http/write.hpp>
#include <nlohmann/json.hpp>

#include <kvx/core/result.hpp>
#include <kvx/store/detail/metadata_client.hpp>

namespace kvx::store::detail {

using json = nlohmann::json;

inline std::string base64_encode(std::string_view in) {
  static constexpr char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  out.reserve((in.size() + 2) / 3 * 4);
  std::size_t i = 0;
  for (; i + 3 <= in.size(); i += 3) {
    const auto n = (std::uint32_t(std::uint8_t(in[i])) << 16) | (std::uint32_t(std::uint8_t(in[i + 1])) << 8) |
                   std::uint32_t(std::uint8_t(in[i + 2]));
    out.push_back(alphabet[(n >> 18) & 63]);
    out.push_back(alphabet[(n >> 12) & 63]);
    out.push_back(alphabet[(n >> 6) & 63]);
    out.push_back(alphabet[n & 63]);
  }
  if (const auto rest = in.size() - i; rest > 0) {
    std::uint32_t n = std::uint32_t(std::uint8_t(in[i])) << 16;
    if (rest == 2) n |= std::uint32_t(std::uint8_t(in[i + 1])) << 8;
    out.push_back(alphabet[(n >> 18) & 63]);
    out.push_back(alphabet[(n >> 12) & 63]);
    out.push_back(rest == 2 ? alphabet[(n >> 6) & 63] : '=');
    out.push_back('=');
  }
  return out;
}

//! Decodes standard base64 (padding optional); nothing on a bad character.
inline std::optional<std::string> base64_decode(std::string_view in) {
  auto value = [](char c) -> int {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+' || c == '-') return 62;
    if (c == '/' || c == '_') return 63;
    return -1;
  };
  while (!in.empty() && in.back() == '=') in.remove_suffix(1);
  if (in.size() % 4 == 1) return std::nullopt;
  std::string out;
  out.reserve(in.size() * 3 / 4);
  std::uint32_t acc = 0;
  int bits = 0;
  for (char c : in) {
    const int v = value(c);
    if (v < 0) return std::nullopt;
    acc = (acc << 6) | static_cast<std::uint32_t>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(static_cast<char>((acc >> bits) & 0xff));
    }
  }
  return out;
}

//! The smallest key greater than every key starting with `prefix` (etcd's
//! range_end for a prefix); "\0" (all keys) for an empty prefix.
inline std::string etcd_prefix_end(std::string prefix) {
  while (!prefix.empty()) {
    auto& last = reinterpret_cast<unsigned char&>(prefix.back());
    if (last < 0xff) {
      ++last;
      return prefix;
    }
    prefix.pop_back();
  }
  return std::string(1, '\0');
}

//! etcd's int64 fields arrive as JSON strings (proto3 JSON mapping).
inline std::int64_t etcd_int(const json& object, const char* field) {
  auto it = object.find(field);
  if (it == object.end()) return 0;
  if (it->is_number_integer()) return it->get<std::int64_t>();
  if (it->is_string()) return std::strtoll(it->get_ref<const std::string&>().c_str(), nullptr, 10);
  return 0;
}

//! A txn reply's "succeeded" (proto3 JSON leaves a false one out); an error
//! when it is there but not a boolean (json's value() would throw).
inline result<bool> etcd_succeeded(const json& reply) {
  auto it = reply.find("succeeded");
  if (it == reply.end()) return false;
  if (!it->is_boolean()) return error{errc::malformed_message, "etcd txn reply: 'succeeded' is not a boolean"};
  return it->get<bool>();
}

//! The first kv of the range a failed txn's first response carries (its
//! failure branch's `request_range`): null when there is none (the key is
//! absent); an error when the responses or the range are not objects.
inline result<const json*> etcd_failure_kv(const json& reply) {
  auto responses = reply.find("responses");
  if (responses == reply.end() || !responses->is_array() || responses->empty()) return nullptr;
  const auto& first = responses->front();
  if (!first.is_object()) return error{errc::malformed_message, "etcd txn reply: 'responses[0]' is not an object"};
  auto range = first.find("response_range");
  if (range == first.end()) return nullptr;
  if (!range->is_object()) return error{errc::malformed_message, "etcd txn reply: 'response_range' is not an object"};
  auto kvs = range->find("kvs");
  if (kvs == range->end() || !kvs->is_array() || kvs->empty()) return nullptr;
  return &kvs->front();
}

//! The gRPC status code in an error body, as a kvx code.
inline std::error_code etcd_status_error(const json& body) {
  switch (etcd_int(body, "code")) {
    case 3: return errc::invalid_argument;
    case 4: return errc::timed_out;
    case 5: return errc::not_found;
    case 6: return errc::already_exists;
    case 8: return errc::capacity_exceeded;
    case 14: return errc::unreachable;
    default: return errc::protocol_error;
  }
}

class etcd_connection {
 public:
  template <class Executor>
  explicit etcd_connection(const Executor& ex) : socket_(ex) {}

  asio::awaitable<std::error_code> connect(const host_port& where) { co_return co_await connect_tcp(socket_, where); }

  [[nodiscard]] bool reusable() const noexcept { return reusable_; }

  //! POSTs `body` to `target`; completes with the parsed JSON reply, or the
  //! mapped gRPC error for a non-200 reply. `got_reply` tells a stale pooled
  //! connection (closed before any byte arrived) from a failed request.
  asio::awaitable<std::tuple<std::error_code, json>> post(const std::string& host, std::string_view target,
                                                         std::string body, std::uint64_t body_limit, bool& got_reply) {
    namespace http = boost::beast::http;
    got_reply = false;
    reusable_ = false;
    http::request<http::string_body> req{http::verb::post, target, 11};
    req.set(http::field::host, host);
    req.set(http::field::content_type, "application/json");
    req.keep_alive(true);
    req.body() = std::move(body);
    req.prepare_payload();
    auto [wec, written] = co_await http::async_write(socket_, req, use_tuple);
    (void)written;
    if (wec) co_return std::tuple{io_error(wec), json{}};
    http::response_parser<http::string_body> parser;
    parser.body_limit(body_limit);
    auto [rec, read] = co_await http::async_read(socket_, buffer_, parser, use_tuple);
    (void)read;
    got_reply = parser.got_some();
    if (rec) {
      if (rec == http::error::end_of_stream || rec == http::error::partial_message)
        co_return std::tuple{make_error_code(errc::connection_lost), json{}};
      if (rec == http::error::body_limit) co_return std::tuple{make_error_code(errc::capacity_exceeded), json{}};
      if (rec.category() == http::make_error_code(http::error::end_of_stream).category())
        co_return std::tuple{make_error_code(errc::malformed_message), json{}};
      co_return std::tuple{io_error(rec), json{}};
    }
    auto res = parser.release();
    reusable_ = res.keep_alive();
    // A streamed reply (lease keep-alive) is newline-delimited: take the first object.
    auto& text = res.body();
    if (auto nl = text.find('\n'); nl != std::string::npos) text.resize(nl);
    json reply = json::parse(text, nullptr, /*allow_exceptions=*/false);
    if (reply.is_discarded() || !reply.is_object()) co_return std::tuple{make_error_code(errc::malformed_message), json{}};
    if (res.result() != http::status::ok) co_return std::tuple{etcd_status_error(reply), std::move(reply)};
    co_return std::tuple{std::error_code{}, std::move(reply)};
  }

 private:
  asio::ip::tcp::socket socket_;
  boost::beast::flat_buffer buffer_;
  bool reusable_ = false;
};

}  // namespace kvx::store::detail
