#pragma once
// RESP on the wire: commands are framed here (gathered, so a 1 MiB value is
// never copied into a command buffer) and replies are parsed by hiredis's
// reader, building kvx's own reply tree directly (no redisReply copy).

#include <algorithm>
#include <cstddef>
#include <memory>
#include <new>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <boost/asio/buffer.hpp>

#include <hiredis/hiredis.h>

#include <kvx/core/async.hpp>
#include <kvx/core/result.hpp>

namespace kvx::store::detail {

//! One RESP2 reply.
struct redis_reply {
  enum class kind { nil, string, status, error, integer, array };
  kind type = kind::nil;
  std::string str;  // string, status, error
  long long integer = 0;
  std::vector<redis_reply> elements;

  [[nodiscard]] bool is_nil() const noexcept { return type == kind::nil; }
  [[nodiscard]] bool is_error() const noexcept { return type == kind::error; }
};

//! The most elements kvx takes in one reply array (its largest replies are
//! SCAN and MGET batches of `list_batch` keys); a larger count is refused as
//! malformed rather than waited for.
inline constexpr long long max_reply_elements = 1LL << 24;

// hiredis reader callbacks: roots are heap-allocated, children live inside
// their parent's `elements` (hiredis only frees roots). They run inside
// hiredis's C frames, so none may throw: a failure returns nullptr, which
// hiredis turns into a reader error. `task->privdata` is the reader's
// `std::string` for the reason, when there is a better one than hiredis's
// "Out of memory".
namespace redis_reader_fn {
inline void refuse_array(const redisReadTask* task, int elements) noexcept {
  if (!task->privdata) return;
  try {
    *static_cast<std::string*>(task->privdata) = "an array of " + std::to_string(elements) +
                                                 " elements, more than the " + std::to_string(max_reply_elements) +
                                                 " kvx takes";
  } catch (...) {  // hiredis's own message stands
  }
}
inline redis_reply* place(const redisReadTask* task) {
  if (task->parent) {
    // An array's elements grow as they arrive (hiredis builds them in
    // order), never from the count its header claims.
    auto& elements = static_cast<redis_reply*>(task->parent->obj)->elements;
    if (static_cast<std::size_t>(task->idx) != elements.size()) return nullptr;
    return &elements.emplace_back();
  }
  return new redis_reply{};
}
template <class Build>
void* create(const redisReadTask* task, Build&& build) noexcept {
  try {
    redis_reply* r = place(task);
    if (r) build(*r);
    return r;
  } catch (...) {
    return nullptr;
  }
}
inline void* create_string(const redisReadTask* task, char* str, std::size_t len) {
  return create(task, [&](redis_reply& r) {
    r.type = task->type == REDIS_REPLY_ERROR    ? redis_reply::kind::error
             : task->type == REDIS_REPLY_STATUS ? redis_reply::kind::status
                                                : redis_reply::kind::string;
    r.str.assign(str, len);
  });
}
inline void* create_array(const redisReadTask* task, int elements) {
  if (elements > max_reply_elements) {
    refuse_array(task, elements);
    return nullptr;
  }
  return create(task, [&](redis_reply& r) {
    r.type = redis_reply::kind::array;
    r.elements.reserve(static_cast<std::size_t>(std::clamp(elements, 0, 1024)));
  });
}
inline void* create_integer(const redisReadTask* task, long long value) {
  return create(task, [&](redis_reply& r) {
    r.type = redis_reply::kind::integer;
    r.integer = value;
  });
}
inline void* create_nil(const redisReadTask* task) {
  return create(task, [](redis_reply& r) { r.type = redis_reply::kind::nil; });
}
inline void free_object(void* p) { delete static_cast<redis_reply*>(p); }
inline redisReplyObjectFunctions* functions() {
  static redisReplyObjectFunctions fn{create_string, create_array, create_integer, create_nil, free_object};
  return &fn;
}
}  // namespace redis_reader_fn

//! Incremental RESP parser over hiredis's reader.
class redis_reader {
 public:
  redis_reader() : reader_(redisReaderCreateWithFunctions(redis_reader_fn::functions())) {
    if (!reader_) throw std::bad_alloc();
    reader_->privdata = &refused_;
  }
  redis_reader(const redis_reader&) = delete;
  redis_reader& operator=(const redis_reader&) = delete;
  ~redis_reader() { redisReaderFree(reader_); }

  result<void> feed(const char* data, std::size_t n) {
    if (redisReaderFeed(reader_, data, n) != REDIS_OK)
      return error{errc::malformed_message, std::string("redis reply: ") + reader_->errstr};
    return {};
  }

  //! The next complete reply, nothing when more bytes are needed, or an error
  //! on a protocol violation (the connection is then unusable).
  result<std::optional<redis_reply>> next() {
    void* raw = nullptr;
    if (redisReaderGetReply(reader_, &raw) != REDIS_OK)
      return error{errc::malformed_message, "redis reply: " + (refused_.empty() ? std::string(reader_->errstr) : refused_)};
    if (!raw) return std::optional<redis_reply>{};
    std::unique_ptr<redis_reply> owned(static_cast<redis_reply*>(raw));
    return std::optional<redis_reply>(std::move(*owned));
  }

 private:
  redisReader* reader_;
  std::string refused_;  // why a callback refused the reply, if it said
};

//! A command framed as RESP (an array of bulk strings). Small arguments are
//! copied into one frame; large ones are referenced, so the caller keeps the
//! argument strings alive until the write completes.
class redis_command {
 public:
  static constexpr std::size_t copy_limit = 4096;

  redis_command& arg(std::string_view a) {
    args_.push_back(a);
    return *this;
  }
  redis_command& arg(long long v) {
    owned_.push_back(std::make_unique<std::string>(std::to_string(v)));
    args_.push_back(*owned_.back());
    return *this;
  }

  //! Appends this command's buffers to `out`; `frame` holds the copied bytes
  //! and must outlive the write, unchanged: the buffers point into it, so
  //! each command of a pipeline needs a frame of its own.
  void gather(std::string& frame, std::vector<asio::const_buffer>& out) const {
    struct piece {
      bool external;
      std::size_t offset, length;
      const char* data;
    };
    std::vector<piece> pieces;
    auto copy = [&](std::string_view s) {
      if (!pieces.empty() && !pieces.back().external) {
        pieces.back().length += s.size();
      } else {
        pieces.push_back({false, frame.size(), s.size(), nullptr});
      }
      frame.append(s);
    };
    copy("*" + std::to_string(args_.size()) + "\r\n");
    for (auto a : args_) {
      copy("$" + std::to_string(a.size()) + "\r\n");
      if (a.size() <= copy_limit) {
        copy(a);
      } else {
        pieces.push_back({true, 0, a.size(), a.data()});
      }
      copy("\r\n");
    }
    for (const auto& p : pieces)
      out.push_back(p.external ? asio::const_buffer(p.data, p.length)
                             : asio::const_buffer(frame.data() + p.offset, p.length));
  }

  [[nodiscard]] std::size_t size() const noexcept { return args_.size(); }

 private:
  std::vector<std::string_view> args_;
  std::vector<std::unique_ptr<std::string>> owned_;
};

//! Escapes glob metacharacters so SCAN MATCH takes `s` literally.
inline std::string redis_glob_escape(std::string_view s) {
  std::string out;
  out.reserve(s.size() + 8);
  for (char c : s) {
    if (c == '*' || c == '?' || c == '[' || c == ']' || c == '\\') out.push_back('\\');
    out.push_back(c);
  }
  return out;
}

}  // namespace kvx::store::detail
