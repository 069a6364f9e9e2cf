#pragma once
//! \file
//! Push mode across processes: `push_target` and `push_notice` as JSON, so
//! the decode instance's target and the prefill instance's per-layer notices
//! can cross whatever control channel the serving stack already has (its
//! router, a bootstrap server, an RPC framework).
//!
//! In one process a `push_link` hands the target over directly. Across
//! processes the same link sits on both sides:
//!
//! | side | step |
//! | --- | --- |
//! | decode | `update_state_after_alloc` publishes the target on its own link; `take` it back, keep its `notify`, ship `to_json(target)` to the router |
//! | prefill | `push_target_from_json(msg)`, set `notify` to "send `to_json(notice)` back", `publish` it on its own link, then `run_prefill` as usual |
//! | decode | on each notice from the channel: `push_notice_from_json(msg)` and call the kept `notify` |
//!
//! Decoding validates everything the producer will act on: the destination
//! table has exactly `source_tp * layers * source_blocks` entries, each names
//! an existing segment, counts and sizes fit their types, a range's chunks
//! do not overlap (`stride >= length`), a destination lists at most 2^20
//! chunks, and an error names the field (`destinations[12].ranges[0].length`).
//! The producer then checks that each destination holds exactly the bytes of
//! its block (`update_state_after_alloc`). The bytes themselves are
//! still checked by the owner's transport against its registered regions,
//! so a hostile target cannot write outside the decode instance's memory.
//!
//! \code
//! // decode process
//! auto t = link->take(id).value();  // just published by update_state_after_alloc
//! keep_notify(id, t->epoch, t->notify);
//! send(router, {{"op", "admitted"}, {"target", kvx::disagg::to_json(*t)}});
//! // prefill process
//! auto t = kvx::disagg::push_target_from_json(msg["target"]).value();
//! t.notify = [ch](const push_notice& n) { ch->send(kvx::disagg::to_json(n)); };
//! link->publish(std::make_shared<const push_target>(std::move(t))).value();
//! \endcode

#include <cstdint>
#include <limits>
#include <string>
#include <system_error>

#include <nlohmann/json.hpp>

#include <kvx/core/config.hpp>
#include <kvx/core/error.hpp>
#include <kvx/core/result.hpp>
#include <kvx/disagg/kv_transfer_mode.hpp>

namespace kvx::disagg {

namespace detail {

//! Limits on a decoded target: far above any real deployment, low enough
//! that a corrupt count cannot make the decoder allocate gigabytes.
inline constexpr std::uint64_t max_wire_destinations = std::uint64_t{1} << 24;
inline constexpr std::uint64_t max_wire_ranges = 64;
inline constexpr std::uint64_t max_wire_segments = 4096;
//! Chunks (strided counts, all ranges together) per destination: the producer
//! lists each one, so a count of 2^40 would hang it under its lock.
inline constexpr std::uint64_t max_wire_chunks = std::uint64_t{1} << 20;

inline nlohmann::json error_code_to_json(const std::error_code& ec) {
  if (!ec) return nullptr;
  return {{"category", ec.category().name()}, {"value", ec.value()}, {"message", ec.message()}};
}

inline result<std::error_code> error_code_from_json(const nlohmann::json& j, const std::string& path) {
  if (j.is_null()) return std::error_code{};
  config::view v(j, path);
  KVX_TRY(v.allow_only({"category", "value", "message"}));
  auto cat = v.required<std::string>("category");
  if (!cat) return cat.error();
  auto value = v.required<int>("value");
  if (!value) return value.error();
  if (*value == 0) return error{errc::malformed_message, "push wire: field '" + path + ".value' is 0 (success is null)"};
  if (*cat == error_category().name()) {
    if (*value < static_cast<int>(errc::invalid_argument) || *value > static_cast<int>(errc::internal))
      return error{errc::malformed_message, "push wire: field '" + path + ".value': " + std::to_string(*value) + " is not a kvx errc"};
    return std::error_code(*value, error_category());
  }
  if (*cat == std::system_category().name()) return std::error_code(*value, std::system_category());
  if (*cat == std::generic_category().name()) return std::error_code(*value, std::generic_category());
  // Another library's category cannot be rebuilt here: keep that it failed.
  return make_error_code(errc::io_error);
}

inline error wire_error(const kvx::error& e) { return error{errc::malformed_message, "push wire: " + e.context()}; }

}  // namespace detail

//! The target as JSON (everything but `notify`, which is the receiver's to set).
inline nlohmann::json to_json(const push_target& t) {
  nlohmann::json dests = nlohmann::json::array();
  for (const auto& d : t.destinations) {
    nlohmann::json ranges = nlohmann::json::array();
    for (const auto& r : d.ranges) ranges.push_back({r.offset, r.length, r.stride, r.count});
    dests.push_back({{"segment", d.segment}, {"ranges", std::move(ranges)}});
  }
  return {{"request", t.request},
          {"epoch", t.epoch},
          {"node", t.node},
          {"segments", t.segments},
          {"segment_keys", t.segment_keys},
          {"write_by_ms", t.write_by_ms},
          {"source_tp", t.source_tp},
          {"source_block_tokens", t.source_block_tokens},
          {"source_blocks", t.source_blocks},
          {"layers", t.layers},
          {"destinations", std::move(dests)}};
}

//! A target from JSON, validated; `notify` is left empty. Errors are
//! `errc::malformed_message` naming the field.
inline result<push_target> push_target_from_json(const nlohmann::json& j) {
  auto fail = [](const kvx::error& e) { return detail::wire_error(e); };
  config::view v(j, "target");
  if (auto ok = v.allow_only({"request", "epoch", "node", "segments", "segment_keys", "write_by_ms", "source_tp",
                              "source_block_tokens", "source_blocks", "layers", "destinations"});
      !ok)
    return fail(ok.error());
  push_target t;
  auto read = [&](std::string_view key, auto& out) -> result<void> {
    auto x = v.required<std::remove_reference_t<decltype(out)>>(key);
    if (!x) return fail(x.error());
    out = *x;
    return {};
  };
  KVX_TRY(read("request", t.request));
  KVX_TRY(read("epoch", t.epoch));
  KVX_TRY(read("node", t.node));
  KVX_TRY(read("source_tp", t.source_tp));
  KVX_TRY(read("source_block_tokens", t.source_block_tokens));
  KVX_TRY(read("source_blocks", t.source_blocks));
  KVX_TRY(read("layers", t.layers));
  auto write_by = v.optional<std::uint64_t>("write_by_ms", 0);  // absent from an older decode side: no deadline
  if (!write_by) return fail(write_by.error());
  t.write_by_ms = *write_by;
  if (t.node.empty()) return error{errc::malformed_message, "push wire: field 'target.node' is empty"};
  if (t.source_tp == 0 || t.source_block_tokens == 0 || t.layers == 0)
    return error{errc::malformed_message, "push wire: 'target.source_tp', 'source_block_tokens' and 'layers' must be positive"};

  const auto& segs = j.find("segments");
  if (segs == j.end() || !segs->is_array() || segs->empty() || segs->size() > detail::max_wire_segments)
    return error{errc::malformed_message, "push wire: field 'target.segments' must be a non-empty array of at most " +
                                              std::to_string(detail::max_wire_segments) + " names"};
  for (std::size_t i = 0; i < segs->size(); ++i) {
    const auto& s = (*segs)[i];
    if (!s.is_string() || s.get_ref<const std::string&>().empty())
      return error{errc::malformed_message, "push wire: field 'target.segments[" + std::to_string(i) + "]' must be a non-empty string"};
    t.segments.push_back(s.get<std::string>());
  }
  // Optional (a target from an older decode side has none): one registration
  // key per segment, 0 for a segment not pinned.
  if (const auto keys = j.find("segment_keys"); keys != j.end()) {
    if (!keys->is_array() || (!keys->empty() && keys->size() != t.segments.size()))
      return error{errc::malformed_message, "push wire: field 'target.segment_keys' must be an array of one key per segment (" +
                                                std::to_string(t.segments.size()) + ")"};
    for (std::size_t i = 0; i < keys->size(); ++i) {
      const auto& k = (*keys)[i];
      if (!k.is_number_unsigned())
        return error{errc::malformed_message, "push wire: field 'target.segment_keys[" + std::to_string(i) + "]' must be an unsigned integer"};
      t.segment_keys.push_back(k.get<std::uint64_t>());
    }
  }

  const std::uint64_t want = std::uint64_t{t.source_tp} * t.layers * t.source_blocks;
  const auto& dests = j.find("destinations");
  if (dests == j.end() || !dests->is_array())
    return error{errc::malformed_message, "push wire: field 'target.destinations' must be an array"};
  if (want > detail::max_wire_destinations || dests->size() != want)
    return error{errc::malformed_message, "push wire: field 'target.destinations' has " + std::to_string(dests->size()) +
                                              " entries; source_tp x layers x source_blocks = " + std::to_string(want)};
  t.destinations.reserve(static_cast<std::size_t>(want));
  for (std::size_t i = 0; i < dests->size(); ++i) {
    const std::string path = "target.destinations[" + std::to_string(i) + "]";
    config::view d((*dests)[i], path);
    if (auto ok = d.allow_only({"segment", "ranges"}); !ok) return fail(ok.error());
    auto seg = d.required<std::uint32_t>("segment");
    if (!seg) return fail(seg.error());
    if (*seg >= t.segments.size())
      return error{errc::malformed_message, "push wire: field '" + path + ".segment': " + std::to_string(*seg) + " names no segment (" +
                                                std::to_string(t.segments.size()) + " listed)"};
    const auto& ranges = (*dests)[i].find("ranges");
    if (ranges == (*dests)[i].end() || !ranges->is_array() || ranges->size() > detail::max_wire_ranges)
      return error{errc::malformed_message, "push wire: field '" + path + ".ranges' must be an array of at most " +
                                                std::to_string(detail::max_wire_ranges) + " [offset, length, stride, count]"};
    auto& out = t.destinations.emplace_back();
    out.segment = *seg;
    std::uint64_t chunks = 0;
    for (std::size_t k = 0; k < ranges->size(); ++k) {
      const auto& r = (*ranges)[k];
      const std::string rpath = path + ".ranges[" + std::to_string(k) + "]";
      if (!r.is_array() || r.size() != 4)
        return error{errc::malformed_message, "push wire: field '" + rpath + "' must be [offset, length, stride, count]"};
      strided_range x;
      std::uint64_t* fields[] = {&x.offset, &x.length, &x.stride, &x.count};
      static constexpr const char* names[] = {"offset", "length", "stride", "count"};
      for (std::size_t f = 0; f < 4; ++f) {
        if (!r[f].is_number_unsigned())
          return error{errc::malformed_message, "push wire: field '" + rpath + "." + names[f] + "' must be an unsigned integer"};
        *fields[f] = r[f].get<std::uint64_t>();
      }
      // The last chunk's end must be representable (the owner checks it against its region).
      if (x.length == 0 || x.count == 0 ||
          (x.count > 1 && x.stride > (std::numeric_limits<std::uint64_t>::max() - x.offset - x.length) / (x.count - 1)) ||
          x.offset > std::numeric_limits<std::uint64_t>::max() - x.length)
        return error{errc::malformed_message, "push wire: field '" + rpath + "' is empty or overflows 64 bits"};
      // Overlapping chunks would count bytes twice: the byte total the producer checks would lie.
      if (x.count > 1 && x.stride < x.length)
        return error{errc::malformed_message, "push wire: field '" + rpath + ".stride': " + std::to_string(x.stride) +
                                                  " is below the length " + std::to_string(x.length) + ", so the chunks overlap"};
      std::uint64_t bytes = 0;
      if (__builtin_mul_overflow(x.length, x.count, &bytes))
        return error{errc::malformed_message, "push wire: field '" + rpath + ".count': length x count overflows 64 bits"};
      if (x.count > detail::max_wire_chunks - chunks)
        return error{errc::malformed_message, "push wire: field '" + rpath + ".count': " + path + " lists more than " +
                                                  std::to_string(detail::max_wire_chunks) + " chunks"};
      chunks += x.count;
      out.ranges.push_back(x);
    }
  }
  return t;
}

//! A notice as JSON.
inline nlohmann::json to_json(const push_notice& n) {
  return {{"request", n.request}, {"epoch", n.epoch},     {"layer", n.layer},
          {"code", detail::error_code_to_json(n.code)}, {"context", n.context}, {"failed_blocks", n.failed_blocks},
          {"bytes", n.bytes}};
}

//! A notice from JSON, validated. Errors are `errc::malformed_message` naming the field.
inline result<push_notice> push_notice_from_json(const nlohmann::json& j) {
  auto fail = [](const kvx::error& e) { return detail::wire_error(e); };
  config::view v(j, "notice");
  if (auto ok = v.allow_only({"request", "epoch", "layer", "code", "context", "failed_blocks", "bytes"}); !ok) return fail(ok.error());
  push_notice n;
  auto req = v.required<std::uint64_t>("request");
  if (!req) return fail(req.error());
  auto epoch = v.required<std::uint64_t>("epoch");
  if (!epoch) return fail(epoch.error());
  auto layer = v.required<std::uint32_t>("layer");
  if (!layer) return fail(layer.error());
  auto context = v.optional<std::string>("context", {});
  if (!context) return fail(context.error());
  auto bytes = v.optional<std::uint64_t>("bytes", 0);
  if (!bytes) return fail(bytes.error());
  n.request = *req;
  n.epoch = *epoch;
  n.layer = *layer;
  n.context = std::move(*context);
  n.bytes = *bytes;
  if (auto c = j.find("code"); c != j.end()) {
    auto code = detail::error_code_from_json(*c, "notice.code");
    if (!code) return fail(code.error());
    n.code = *code;
  }
  if (auto f = j.find("failed_blocks"); f != j.end() && !f->is_null()) {
    if (!f->is_array() || f->size() > detail::max_wire_destinations)
      return error{errc::malformed_message, "push wire: field 'notice.failed_blocks' must be an array of block indexes"};
    for (std::size_t i = 0; i < f->size(); ++i) {
      const auto& b = (*f)[i];
      if (!b.is_number_unsigned() || b.get<std::uint64_t>() > std::numeric_limits<std::uint32_t>::max())
        return error{errc::malformed_message, "push wire: field 'notice.failed_blocks[" + std::to_string(i) + "]' must be a 32-bit block index"};
      n.failed_blocks.push_back(b.get<std::uint32_t>());
    }
  }
  if (!n.code && !n.failed_blocks.empty())
    return error{errc::malformed_message, "push wire: field 'notice.failed_blocks' lists blocks but 'code' is null"};
  return n;
}

}  // namespace kvx::disagg
