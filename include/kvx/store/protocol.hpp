#pragma once
//! \file
//! The store's control-plane protocol: length-prefixed JSON frames between
//! clients / nodes and the master.
//!
//! Frame: a 4-byte little-endian body length, then that many bytes of UTF-8
//! JSON. Request: `{"id": <u64>, "op": "<name>", ...fields}`. Response:
//! `{"id": <u64>, "ok": true, ...}` or `{"id": <u64>, "ok": false,
//! "error": "<errc name>", "message": "<context>"}`. A request with
//! `"reply": false` is a notification: the master acts on it in order with
//! the connection's other frames and sends nothing back, not even an error
//! (a reader's `release` goes this way, so a get costs one round trip to the
//! master, not two).
//!
//! The data plane never passes through here: bytes move node to client with
//! the transfer engine, zero-copy.
//!
//! | op | fields | response fields |
//! | --- | --- | --- |
//! | `register_segment` | `node, segment, capacity, tier, host` (`host` optional: the failure domain, default the node) | `recover_after_ms` (when the node may report its ledger) |
//! | `leave` | `node` (a clean stop: dropped now, not after `node_timeout`) | `node, lost` (objects whose only copies it held), `reclaimed_puts` |
//! | `heartbeat` | `node, ledger_ack?` (the last ledger change applied) | `tasks` (replication tasks for this node: `tenant, key, put_id, source, target, deadline_ms`, the copy's time left; past it the master reuses the target), `ledger` (changes after `ledger_ack`) |
//! | `put_start` | `tenant, key, size, replicas?, preferred_node?, soft_pin?, lease_ms?` (the put lease asked; absent or 0: the master's `put_lease`; over its `max_put_lease`: `invalid_argument`) | `put_id, replicas, deadline_ms` (the put lease granted, left), `checksum` (true: send one with the commit) |
//! | `put_commit` / `put_abort` | `tenant, key, put_id`, commit: `checksum?` (XXH3-64 of the bytes) | |
//! | `recover` | `node, objects: [ledger entry]` (at most 10,000) | `objects, replicas, rejected: [why]` |
//! | `get` | `tenant, key, reader_node?, lease_ms?` (absent or 0: the master's `read_lease`; cut to its `max_read_lease`) | `size, replicas, lease_ms` (the read lease granted, left), `lease_id` |
//! | `release` | `tenant, key, lease_id?` (from the get; without it the lease ends only if it is the object's only one) | |
//! | `remove` / `exists` | `tenant, key` | `exists` for exists |
//! | `longest_prefix` | `tenant, keys` | `count` |
//! | `replication_done` | `tenant, key, put_id, target` | |
//! | `stats` | | `used, capacity, objects, nodes` |
//! | `list_segments` (admin) | | `segments: [{name, node, host, tier, capacity, used, draining}]` |
//! | `list_objects` (admin) | `tenant?, limit?` | `objects: [{tenant, key, size, committed, pinned, replicas_wanted, replicas, copying, lease_ms}], truncated` |
//! | `usage` (admin) | | `used, capacity, objects, nodes, tiers: {tier: {used, capacity}}, tenants: {tenant: {used, quota?}}` |
//! | `drain_node` (admin) | `node` | `node, objects, only_here, copying, used, drained` (nothing only there), `empty` (no copy left there) |
//! | `undrain_node` (admin) | `node` | `node, was_draining` |
//! | `remove_node` (admin) | `node, force?` | `node, lost, reclaimed_puts`; `busy` for a node still heartbeating without `force` |
//!
//! Every field is validated; a malformed frame or request gets an error
//! response naming the field (`malformed_message`), never a crash, and a
//! frame over `max_frame_bytes` closes the connection.

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#ifndef XXH_INLINE_ALL
#define XXH_INLINE_ALL
#endif
#include <xxhash.h>

#include <kvx/core/config.hpp>
#include <kvx/core/result.hpp>
#include <kvx/core/utf8.hpp>
#include <kvx/store/types.hpp>

namespace kvx::store::protocol {

using json = nlohmann::json;

inline constexpr std::uint32_t max_frame_bytes = 16u << 20;
//! The longest time left a message may give (about 35 years): more is malformed.
inline constexpr std::int64_t max_deadline_ms = std::int64_t{1} << 40;

//! The first field of `body` (a name or a string value, at any depth) that
//! is not valid UTF-8, as a path (`key`, `keys[2]`); none: it encodes.
[[nodiscard]] inline std::optional<std::string> non_utf8_field(const json& body, const std::string& path = {}) {
  if (body.is_string()) return kvx::is_utf8(body.get_ref<const std::string&>()) ? std::nullopt : std::optional(path);
  if (body.is_object()) {
    for (const auto& [name, value] : body.items()) {
      const auto at = path.empty() ? name : path + "." + name;
      if (!kvx::is_utf8(name)) return path.empty() ? std::string("(a field name)") : path + ".(a field name)";
      if (auto bad = non_utf8_field(value, at)) return bad;
    }
  } else if (body.is_array()) {
    for (std::size_t i = 0; i < body.size(); ++i)
      if (auto bad = non_utf8_field(body[i], path + "[" + std::to_string(i) + "]")) return bad;
  }
  return std::nullopt;
}

//! Prepends the length header to a JSON body (valid UTF-8: `non_utf8_field`).
inline std::string encode_frame(const json& body) {
  const std::string text = body.dump();
  std::string out(4, '\0');
  const auto n = static_cast<std::uint32_t>(text.size());
  for (int i = 0; i < 4; ++i) out[static_cast<std::size_t>(i)] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + text;
}

//! `encode_frame` for a body that may hold a string that is not UTF-8 (from
//! a caller): `invalid_argument` naming the field instead of json's
//! exception. The body is walked for the name only when the encoding failed.
inline result<std::string> try_encode_frame(const json& body) {
  try {
    return encode_frame(body);
  } catch (const json::type_error&) {
    return error{errc::invalid_argument, "field '" + non_utf8_field(body).value_or("?") + "' is not valid UTF-8"};
  }
}

//! Incremental frame splitter: feed bytes as they arrive, take whole bodies out.
class frame_decoder {
 public:
  explicit frame_decoder(std::uint32_t max_frame = max_frame_bytes) : max_(max_frame) {}

  void feed(std::string_view bytes) { buffer_.append(bytes); }

  //! The next whole body; nothing if more bytes are needed; an error when
  //! the announced length exceeds the limit (the stream cannot be resynchronised).
  result<std::optional<std::string>> next() {
    if (buffer_.size() - pos_ < 4) return std::optional<std::string>{};
    std::uint32_t n = 0;
    for (int i = 0; i < 4; ++i) n |= static_cast<std::uint32_t>(static_cast<unsigned char>(buffer_[pos_ + static_cast<std::size_t>(i)])) << (8 * i);
    if (n > max_) return error{errc::malformed_message, "frame of " + std::to_string(n) + " bytes exceeds the limit of " + std::to_string(max_)};
    if (buffer_.size() - pos_ - 4 < n) return std::optional<std::string>{};
    std::string body = buffer_.substr(pos_ + 4, n);
    pos_ += 4 + n;
    if (pos_ > 65536 && pos_ * 2 > buffer_.size()) {
      buffer_.erase(0, pos_);
      pos_ = 0;
    }
    return std::optional<std::string>{std::move(body)};
  }
  [[nodiscard]] std::size_t buffered() const noexcept { return buffer_.size() - pos_; }

 private:
  std::uint32_t max_;
  std::string buffer_;
  std::size_t pos_ = 0;
};

//! A validated request: its id, op, and the JSON it came in.
struct request {
  std::uint64_t id = 0;
  std::string op;
  json body;
  bool reply = true;  //!< false: a notification, answered with nothing
};

inline const std::vector<std::string>& known_ops() {
  static const std::vector<std::string> ops{"register_segment", "heartbeat", "put_start", "put_commit", "put_abort",
                                            "get", "release", "remove", "exists", "longest_prefix",
                                            "replication_done", "stats", "list_segments", "list_objects", "usage",
                                            "drain_node", "undrain_node", "remove_node", "recover", "leave"};
  return ops;
}

//! Parses and checks the envelope (id, op); the handler checks the op's fields.
inline result<request> parse_request(std::string_view body) {
  json j = json::parse(body, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return error{errc::malformed_message, "request is not valid JSON"};
  if (!j.is_object()) return error{errc::malformed_message, "request is not a JSON object"};
  config::view v(j, "request");
  auto id = v.required<std::uint64_t>("id");
  if (!id) return error{errc::malformed_message, id.error().context()};
  auto op = v.required<std::string>("op");
  if (!op) return error{errc::malformed_message, op.error().context()};
  bool known = false;
  for (const auto& k : known_ops()) known = known || k == *op;
  if (!known) return error{errc::malformed_message, "unknown op '" + *op + "'"};
  auto reply = v.optional<bool>("reply", true);
  if (!reply) return error{errc::malformed_message, reply.error().context()};
  return request{*id, std::move(*op), std::move(j), *reply};
}

namespace detail {
inline void add_fields(json&) {}
template <class Value, class... Rest>
void add_fields(json& j, const char* name, Value&& value, Rest&&... rest) {
  j[name] = std::forward<Value>(value);
  add_fields(j, std::forward<Rest>(rest)...);
}
}  // namespace detail

//! `{"op": op, name1: value1, ...}` from alternating names and values. Used
//! inside coroutines, where g++ 12 rejects braced JSON initializer lists
//! ("array used as initializer").
template <class... Fields>
json make_request(const char* op, Fields&&... fields) {
  static_assert(sizeof...(Fields) % 2 == 0, "kvx: make_request takes name, value pairs");
  json j = json::object();
  j["op"] = op;
  detail::add_fields(j, std::forward<Fields>(fields)...);
  return j;
}

inline json error_response(std::uint64_t id, const kvx::error& e) {
  const auto* name = e.code().category() == error_category() ? to_string(static_cast<errc>(e.code().value())) : "internal";
  // The context only: the code travels as "error", and a reader that prints
  // both (see `describe`) would otherwise name the code twice.
  return {{"id", id}, {"ok", false}, {"error", name}, {"message", e.context()}};
}

//! A failed call's code and the context the master (or the client) gave, for logs.
inline std::string describe(std::error_code ec, const json& response) {
  std::string why = ec.message();
  if (response.is_object() && response.contains("message") && response["message"].is_string() &&
      !response["message"].get_ref<const std::string&>().empty())
    why += ": " + response["message"].get<std::string>();
  return why;
}

//! Turns a response into the `kvx::error` it carries, if any.
inline result<json> check_response(json response) {
  if (!response.is_object() || !response.contains("ok") || !response["ok"].is_boolean())
    return error{errc::protocol_error, "master response lacks 'ok'"};
  if (response["ok"].get<bool>()) return response;
  // Read with care: json's value() throws on a wrong type, and this runs in
  // the client's read loop, which an exception would end without a word.
  const auto code = response.find("error");
  if (code != response.end() && !code->is_string())
    return error{errc::protocol_error, "master error response: 'error' is not a string: " + code->dump()};
  const auto message = response.find("message");
  return error{errc_from_string(code == response.end() ? "internal" : code->get_ref<const std::string&>()),
               message != response.end() && message->is_string() ? message->get<std::string>() : std::string()};
}

inline json to_json(const replica_location& r) {
  return {{"node", r.node}, {"segment", r.segment}, {"offset", r.offset}, {"size", r.size}};
}

inline result<replica_location> replica_from_json(const json& j, const std::string& path) {
  config::view v(j, path);
  auto node = v.required<std::string>("node");
  KVX_TRY(node);
  auto segment = v.required<std::string>("segment");
  KVX_TRY(segment);
  auto offset = v.required<std::uint64_t>("offset");
  KVX_TRY(offset);
  auto size = v.required<std::uint64_t>("size");
  KVX_TRY(size);
  return replica_location{*node, *segment, *offset, *size};
}

//! The checksum a writer sends with its commit and a node checks before
//! reporting the object after a failover: XXH3-64 (seed 0) of the bytes.
inline std::uint64_t object_checksum(const void* bytes, std::size_t size) noexcept { return XXH3_64bits(bytes, size); }

//! A ledger entry, as a `recover` report and a ledger change carry it.
inline json to_json(const ledger_entry& e) {
  return {{"tenant", e.key.tenant}, {"key", e.key.key},   {"put_id", e.put_id},
          {"segment", e.segment},   {"offset", e.offset}, {"size", e.size},
          {"checksum", e.checksum}, {"replicas_wanted", e.replicas_wanted}, {"pinned", e.pinned}};
}

//! A field of a master's answer, `fallback` when absent; `protocol_error`
//! naming `op.field` when it has the wrong type (json's value() would throw).
template <class T>
result<T> answer_field(const json& answer, const char* op, const char* field, T fallback) {
  auto v = config::view(answer, op).optional<T>(field, std::move(fallback));
  if (v) return v;
  return error{errc::protocol_error, v.error().context()};
}

//! The object a message names, from its "tenant" and "key" fields.
inline result<object_key> object_key_from(const config::view& v) {
  auto tenant = v.required<std::string>("tenant");
  KVX_TRY(tenant);
  auto key = v.required<std::string>("key");
  KVX_TRY(key);
  return object_key{std::move(*tenant), std::move(*key)};
}

inline result<ledger_entry> ledger_entry_from_json(const json& j, const std::string& path) {
  if (!j.is_object()) return error{errc::malformed_message, "field '" + path + "' is not an object"};
  config::view v(j, path);
  ledger_entry e;
  auto key = object_key_from(v);
  KVX_TRY(key);
  e.key = std::move(*key);
  auto segment = v.required<std::string>("segment");
  KVX_TRY(segment);
  e.segment = std::move(*segment);
  for (auto [name, field] : {std::pair{"put_id", &e.put_id}, std::pair{"offset", &e.offset}, std::pair{"size", &e.size},
                             std::pair{"checksum", &e.checksum}}) {
    auto n = v.required<std::uint64_t>(name);
    KVX_TRY(n);
    *field = *n;
  }
  auto wanted = v.optional<unsigned>("replicas_wanted", 1);
  KVX_TRY(wanted);
  e.replicas_wanted = *wanted;
  auto pinned = v.optional<bool>("pinned", false);
  KVX_TRY(pinned);
  e.pinned = *pinned;
  return e;
}

inline json to_json(const ledger_event& ev) {
  json j = to_json(ev.entry);
  j["seq"] = ev.seq;
  j["op"] = ev.add ? "add" : "drop";
  return j;
}

inline result<ledger_event> ledger_event_from_json(const json& j, const std::string& path) {
  auto entry = ledger_entry_from_json(j, path);
  KVX_TRY(entry);
  config::view v(j, path);
  auto seq = v.required<std::uint64_t>("seq");
  KVX_TRY(seq);
  auto op = v.required<std::string>("op");
  KVX_TRY(op);
  if (*op != "add" && *op != "drop") return error{errc::malformed_message, "field '" + path + ".op' is not add or drop"};
  return ledger_event{*seq, *op == "add", std::move(*entry)};
}

//! The deadline that `field` (milliseconds left, counted by the sender when
//! it answered) sets on this host's clock. It counts from `asked`, when the
//! request went out, so it never falls after the sender's own; negative is
//! no time left; absent is nullopt. Over `max_deadline_ms` is malformed (it
//! would overflow the clock).
inline result<std::optional<clock::time_point>> deadline_field(const config::view& v, const char* field,
                                                               clock::time_point asked) {
  if (!v.contains(field)) return std::optional<clock::time_point>{};
  auto ms = v.required<std::int64_t>(field);
  KVX_TRY(ms);
  if (*ms > max_deadline_ms)
    return error{errc::malformed_message,
                 "field '" + v.path_of(field) + "' is over " + std::to_string(max_deadline_ms) + " ms"};
  return std::optional{asked + std::chrono::milliseconds(std::max<std::int64_t>(*ms, 0))};
}

//! A re-replication task, as a heartbeat answer carries it to the source's
//! node at `now`: `deadline_ms` is what is left of the copy's time.
inline json to_json(const replication_task& t, clock::time_point now) {
  json j{{"tenant", t.key.tenant}, {"key", t.key.key}, {"put_id", t.put_id},
         {"source", to_json(t.source)}, {"target", to_json(t.target)}};
  if (t.deadline != clock::time_point{})
    j["deadline_ms"] = std::chrono::duration_cast<std::chrono::milliseconds>(t.deadline - now).count();
  return j;
}

//! `asked`: when the node sent the request this task answers. The task's
//! deadline counts from then, so it never falls after the master's (the
//! master computed `deadline_ms` later, when it answered).
inline result<replication_task> replication_task_from_json(const json& j, const std::string& path,
                                                           clock::time_point asked = clock::now()) {
  if (!j.is_object()) return error{errc::malformed_message, "field '" + path + "' is not an object"};
  config::view v(j, path);
  auto key = object_key_from(v);
  KVX_TRY(key);
  auto put_id = v.required<std::uint64_t>("put_id");
  KVX_TRY(put_id);
  replication_task t;
  t.key = std::move(*key);
  t.put_id = *put_id;
  for (auto [name, where] : {std::pair{"source", &t.source}, std::pair{"target", &t.target}}) {
    if (!j.contains(name)) return error{errc::malformed_message, "field '" + v.path_of(name) + "' is required"};
    auto r = replica_from_json(j[name], v.path_of(name));
    KVX_TRY(r);
    *where = std::move(*r);
  }
  auto deadline = deadline_field(v, "deadline_ms", asked);
  KVX_TRY(deadline);
  t.deadline = deadline->value_or(clock::time_point{});
  return t;
}

inline result<std::vector<replica_location>> replicas_from_json(const json& j, const std::string& path) {
  if (!j.is_array()) return error{errc::malformed_message, "field '" + path + "' is not an array"};
  std::vector<replica_location> out;
  for (std::size_t i = 0; i < j.size(); ++i) {
    auto r = replica_from_json(j[i], path + "[" + std::to_string(i) + "]");
    KVX_TRY(r);
    out.push_back(std::move(*r));
  }
  return out;
}

}  // namespace kvx::store::protocol
