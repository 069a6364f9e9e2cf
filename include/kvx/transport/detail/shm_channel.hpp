#pragma once
// The shm transport's control path: a SOCK_SEQPACKET unix socket in the
// abstract namespace (no file to clean up when a process dies), one JSON
// message per packet, file descriptors riding along as SCM_RIGHTS. Packets
// keep message boundaries, so an fd is always attached to the message it
// belongs to. Only mapping requests and revocation notices travel here; the
// bytes never do.

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <nlohmann/json.hpp>

#include <kvx/core/async.hpp>
#include <kvx/core/result.hpp>

namespace kvx::transport::detail {

class unique_fd {
 public:
  unique_fd() = default;
  explicit unique_fd(int fd) noexcept : fd_(fd) {}
  unique_fd(unique_fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  unique_fd& operator=(unique_fd&& o) noexcept {
    if (this != &o) reset(std::exchange(o.fd_, -1));
    return *this;
  }
  unique_fd(const unique_fd&) = delete;
  unique_fd& operator=(const unique_fd&) = delete;
  ~unique_fd() { reset(); }

  [[nodiscard]] int get() const noexcept { return fd_; }
  [[nodiscard]] int release() noexcept { return std::exchange(fd_, -1); }
  explicit operator bool() const noexcept { return fd_ >= 0; }
  void reset(int fd = -1) noexcept {
    if (fd_ >= 0) ::close(fd_);
    fd_ = fd;
  }
  //! A close-on-exec duplicate, or an empty fd when dup fails.
  [[nodiscard]] unique_fd dup() const noexcept { return unique_fd(fd_ >= 0 ? ::fcntl(fd_, F_DUPFD_CLOEXEC, 0) : -1); }

 private:
  int fd_ = -1;
};

inline constexpr std::size_t shm_max_message = 16 * 1024;
inline constexpr std::size_t shm_max_fds = 4;

// "@name" is an abstract-namespace address (leading NUL), anything else a path.
inline result<std::pair<sockaddr_un, socklen_t>> shm_socket_address(const std::string& name) {
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  if (name.empty() || name.size() >= sizeof(sa.sun_path))
    return error{errc::invalid_argument, "shm socket name '" + name + "' is empty or too long"};
  std::memcpy(sa.sun_path, name.data(), name.size());
  if (name[0] == '@') sa.sun_path[0] = '\0';
  return std::pair{sa, static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + name.size())};
}

inline std::string errno_text(int e) { return std::string(std::strerror(e)); }

class shm_channel : public std::enable_shared_from_this<shm_channel> {
 public:
  using message_handler = std::function<void(nlohmann::json&&, std::vector<unique_fd>&&)>;
  using close_handler = std::function<void()>;

  shm_channel(asio::any_io_executor ex, unique_fd fd) : sd_(ex, fd.release()) {}
  shm_channel(const shm_channel&) = delete;
  shm_channel& operator=(const shm_channel&) = delete;
  ~shm_channel() { close(); }

  //! Connects (non-blocking) to `name`; fails at once when nobody listens.
  static result<std::shared_ptr<shm_channel>> connect(const asio::any_io_executor& ex, const std::string& name) {
    auto addr = shm_socket_address(name);
    KVX_TRY(addr);
    unique_fd fd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    if (!fd) return error{errc::io_error, "shm: socket(): " + errno_text(errno)};
    int rc = 0;
    do {
      rc = ::connect(fd.get(), reinterpret_cast<const sockaddr*>(&addr->first), addr->second);
    } while (rc != 0 && errno == EINTR);
    if (rc != 0) {
      const int e = errno;
      return error{e == EAGAIN ? errc::busy : errc::unreachable,
                   "shm: connect to owner socket '" + name + "': " + errno_text(e)};
    }
    return std::make_shared<shm_channel>(ex, std::move(fd));
  }

  //! Starts the read loop. Handlers run on the executor; `on_close` runs once
  //! when the peer hangs up or breaks the protocol, never after `close()`.
  void start(message_handler on_message, close_handler on_close) {
    std::lock_guard lock(mutex_);
    on_message_ = std::move(on_message);
    on_close_ = std::move(on_close);
    wait_read_locked();
  }

  //! Queues `body` (and duplicates of `fds`) for sending. Thread-safe.
  std::error_code send(const nlohmann::json& body, std::initializer_list<int> fds = {}) {
    outgoing m;
    m.text = body.dump();
    if (m.text.size() > shm_max_message || fds.size() > shm_max_fds) return errc::invalid_argument;
    for (int fd : fds) {
      m.fds.emplace_back(::fcntl(fd, F_DUPFD_CLOEXEC, 0));
      if (!m.fds.back()) return errc::io_error;
    }
    std::lock_guard lock(mutex_);
    if (closed_) return errc::connection_lost;
    queue_.push_back(std::move(m));
    if (!writing_) flush_locked();
    return closed_ ? std::error_code(errc::connection_lost) : std::error_code{};
  }

  void close() {
    std::lock_guard lock(mutex_);
    close_locked();
  }

  [[nodiscard]] bool is_open() const {
    std::lock_guard lock(mutex_);
    return !closed_;
  }

 private:
  struct outgoing {
    std::string text;
    std::vector<unique_fd> fds;
  };

  void close_locked() {
    if (closed_) return;
    closed_ = true;
    boost::system::error_code ignored;
    sd_.cancel(ignored);
    sd_.close(ignored);
    queue_.clear();
  }

  void wait_read_locked() {
    if (closed_) return;
    sd_.async_wait(asio::posix::descriptor_base::wait_read,
                   [self = shared_from_this()](const boost::system::error_code& ec) { self->on_readable(ec); });
  }

  void on_readable(const boost::system::error_code& ec) {
    if (ec == asio::error::operation_aborted) return;
    for (;;) {
      nlohmann::json body;
      std::vector<unique_fd> fds;
      bool hang_up = false;
      message_handler on_message;
      {
        std::lock_guard lock(mutex_);
        if (closed_) return;
        const auto got = receive_locked(body, fds);
        if (got == receive_result::again) {
          wait_read_locked();
          return;
        }
        hang_up = got == receive_result::closed;
        if (hang_up) close_locked();
        on_message = on_message_;
      }
      if (hang_up) {
        close_handler on_close;
        {
          std::lock_guard lock(mutex_);
          on_close = std::move(on_close_);
          on_message_ = nullptr;
        }
        if (on_close) on_close();
        return;
      }
      if (on_message) on_message(std::move(body), std::move(fds));
    }
  }

  enum class receive_result { message, again, closed };

  receive_result receive_locked(nlohmann::json& body, std::vector<unique_fd>& fds) {
    buffer_.resize(shm_max_message + 1);
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * shm_max_fds)];
    iovec iov{buffer_.data(), buffer_.size()};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    ssize_t n = 0;
    do {
      n = ::recvmsg(sd_.native_handle(), &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    } while (n < 0 && errno == EINTR);
    if (n < 0) return errno == EAGAIN || errno == EWOULDBLOCK ? receive_result::again : receive_result::closed;
    for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
      if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
      const std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (std::size_t i = 0; i < count; ++i) {
        int fd = -1;
        std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
        fds.emplace_back(fd);
      }
    }
    // An empty packet is EOF (kvx never sends one); an oversized, truncated
    // or unparsable one is a broken peer: hang up rather than guess.
    if (n == 0 || (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) != 0) return receive_result::closed;
    body = nlohmann::json::parse(buffer_.data(), buffer_.data() + n, nullptr, false);
    if (body.is_discarded() || !body.is_object()) return receive_result::closed;
    return receive_result::message;
  }

  void flush_locked() {
    while (!queue_.empty() && !closed_) {
      auto& m = queue_.front();
      iovec iov{m.text.data(), m.text.size()};
      msghdr msg{};
      msg.msg_iov = &iov;
      msg.msg_iovlen = 1;
      alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * shm_max_fds)];
      if (!m.fds.empty()) {
        msg.msg_control = control;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * m.fds.size());
        cmsghdr* c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * m.fds.size());
        for (std::size_t i = 0; i < m.fds.size(); ++i) {
          const int fd = m.fds[i].get();
          std::memcpy(CMSG_DATA(c) + i * sizeof(int), &fd, sizeof fd);
        }
      }
      ssize_t n = 0;
      do {
        n = ::sendmsg(sd_.native_handle(), &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
      } while (n < 0 && errno == EINTR);
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        writing_ = true;
        sd_.async_wait(asio::posix::descriptor_base::wait_write,
                       [self = shared_from_this()](const boost::system::error_code& ec) {
                         std::lock_guard lock(self->mutex_);
                         self->writing_ = false;
                         if (!ec) self->flush_locked();
                       });
        return;
      }
      if (n < 0) {
        // The read side reports the hang-up; here the queue just dies with the socket.
        close_locked();
        return;
      }
      queue_.pop_front();
    }
  }

  mutable std::mutex mutex_;
  asio::posix::stream_descriptor sd_;
  std::deque<outgoing> queue_;
  std::vector<char> buffer_;
  bool writing_ = false;
  bool closed_ = false;
  message_handler on_message_;
  close_handler on_close_;
};

// The owner's listening socket: accepts connections and hands them over.
class shm_listener : public std::enable_shared_from_this<shm_listener> {
 public:
  shm_listener(asio::any_io_executor ex, unique_fd fd, std::string name)
      : ex_(ex), sd_(ex, fd.release()), name_(std::move(name)) {}
  ~shm_listener() { close(); }

  static result<std::shared_ptr<shm_listener>> open(const asio::any_io_executor& ex, const std::string& name) {
    auto addr = shm_socket_address(name);
    KVX_TRY(addr);
    unique_fd fd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    if (!fd) return error{errc::io_error, "shm: socket(): " + errno_text(errno)};
    if (::bind(fd.get(), reinterpret_cast<const sockaddr*>(&addr->first), addr->second) != 0)
      return error{errc::io_error, "shm: bind '" + name + "': " + errno_text(errno)};
    if (::listen(fd.get(), 128) != 0) return error{errc::io_error, "shm: listen '" + name + "': " + errno_text(errno)};
    return std::make_shared<shm_listener>(ex, std::move(fd), name);
  }

  [[nodiscard]] const std::string& name() const noexcept { return name_; }

  void start(std::function<void(std::shared_ptr<shm_channel>)> on_accept) {
    std::lock_guard lock(mutex_);
    on_accept_ = std::move(on_accept);
    wait_locked();
  }

  void close() {
    std::lock_guard lock(mutex_);
    if (closed_) return;
    closed_ = true;
    boost::system::error_code ignored;
    sd_.cancel(ignored);
    sd_.close(ignored);
    on_accept_ = nullptr;
  }

 private:
  void wait_locked() {
    if (closed_) return;
    sd_.async_wait(asio::posix::descriptor_base::wait_read, [self = shared_from_this()](const boost::system::error_code& ec) {
      if (ec == asio::error::operation_aborted) return;
      self->on_ready();
    });
  }

  void on_ready() {
    for (;;) {
      std::function<void(std::shared_ptr<shm_channel>)> on_accept;
      unique_fd fd;
      {
        std::lock_guard lock(mutex_);
        if (closed_) return;
        fd.reset(::accept4(sd_.native_handle(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC));
        if (!fd) {
          if (errno != EINTR && errno != ECONNABORTED) {
            wait_locked();
            return;
          }
          continue;
        }
        on_accept = on_accept_;
      }
      if (on_accept) on_accept(std::make_shared<shm_channel>(ex_, std::move(fd)));
    }
  }

  asio::any_io_executor ex_;
  std::mutex mutex_;
  asio::posix::stream_descriptor sd_;
  std::string name_;
  bool closed_ = false;
  std::function<void(std::shared_ptr<shm_channel>)> on_accept_;
};

}  // namespace kvx::transport::detail
