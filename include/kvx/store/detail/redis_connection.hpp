#pragma once
// One Redis connection: pipelined commands, one reply each. Used from the
// backend's strand only; a connection that failed or was cancelled
// mid-command is dropped, never reused (its reply stream is out of step).

#include <array>
#include <cstddef>
#include <span>
#include <string>
#include <system_error>
#include <tuple>
#include <vector>

#include <boost/asio/awaitable.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/write.hpp>

#include <kvx/store/detail/metadata_client.hpp>
#include <kvx/store/detail/redis_protocol.hpp>

namespace kvx::store::detail {

class redis_connection {
 public:
  template <class Executor>
  explicit redis_connection(const Executor& ex) : socket_(ex) {}

  asio::awaitable<std::error_code> connect(const host_port& where) { co_return co_await connect_tcp(socket_, where); }

  //! Sends `commands` in one write and reads one reply per command.
  //! `received_any` tells the caller whether the server answered at all (a
  //! stale pooled connection fails before any reply byte arrives).
  asio::awaitable<std::tuple<std::error_code, std::vector<redis_reply>>> execute(std::span<const redis_command> commands,
                                                                                bool& received_any) {
    received_any = false;
    // One frame per command, sized before any is written: a command's buffers
    // point into its frame, which a later command's appends must not move.
    std::vector<std::string> frames(commands.size());
    std::vector<asio::const_buffer> buffers;
    for (std::size_t i = 0; i < commands.size(); ++i) commands[i].gather(frames[i], buffers);
    auto [wec, written] = co_await asio::async_write(socket_, buffers, use_tuple);
    (void)written;
    std::vector<redis_reply> replies;
    if (wec) co_return std::tuple{io_error(wec), std::move(replies)};
    replies.reserve(commands.size());
    while (replies.size() < commands.size()) {
      auto next = reader_.next();
      if (!next) co_return std::tuple{next.code(), std::move(replies)};
      if (*next) {
        replies.push_back(std::move(**next));
        continue;
      }
      auto [rec, n] = co_await socket_.async_read_some(asio::buffer(buffer_), use_tuple);
      if (rec) co_return std::tuple{io_error(rec), std::move(replies)};
      received_any = true;
      if (auto fed = reader_.feed(buffer_.data(), n); !fed) co_return std::tuple{fed.code(), std::move(replies)};
    }
    co_return std::tuple{std::error_code{}, std::move(replies)};
  }

 private:
  asio::ip::tcp::socket socket_;
  redis_reader reader_;
  std::array<char, 64 * 1024> buffer_{};
};

}  // namespace kvx::store::detail
