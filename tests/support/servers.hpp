#pragma once
// Real metadata servers for tests: redis-server and etcd, started on free
// 127.0.0.1 ports with a private temp dir, waited for until they answer, and
// killed (SIGKILL) and cleaned up in the destructor. They also die with the
// thread that started them (PR_SET_PDEATHSIG), so a crashed test leaves no
// server behind; start them from the main thread (SetUpTestSuite).
//
//   auto redis = kvx::test::redis_server::start();   // nullopt + reason if the binary is missing
//   if (!redis) GTEST_SKIP() << kvx::test::redis_server::missing_reason();
//   kvx::store::redis_metadata meta(io.get_executor(), {.address = redis->address()});
//   redis->kill(); redis->restart();                   // fault tests: same port, same dir
//   redis->pause(); redis->resume();                   // SIGSTOP / SIGCONT: a hung server

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace kvx::test {

//! `name` found on PATH, or empty.
inline std::string find_program(const std::string& name) {
  const char* path = std::getenv("PATH");
  std::string dirs = path ? path : "/usr/local/bin:/usr/bin:/bin";
  std::stringstream ss(dirs);
  std::string dir;
  while (std::getline(ss, dir, ':')) {
    if (dir.empty()) continue;
    auto candidate = std::filesystem::path(dir) / name;
    if (::access(candidate.c_str(), X_OK) == 0) return candidate.string();
  }
  return {};
}

//! A port on 127.0.0.1 nothing listens on right now (the kernel's pick).
inline std::uint16_t free_loopback_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) throw std::runtime_error("socket() failed");
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof addr;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    ::close(fd);
    throw std::runtime_error("bind to 127.0.0.1:0 failed");
  }
  ::close(fd);
  return ntohs(addr.sin_port);
}

namespace detail {

// Sends `request` to 127.0.0.1:port and returns what arrives within `timeout`
// (until the peer closes or `expect` is seen); empty when nothing answers.
inline std::string loopback_exchange(std::uint16_t port, const std::string& request, const std::string& expect,
                                     std::chrono::milliseconds timeout) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return {};
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(port);
  std::string out;
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0 &&
      ::send(fd, request.data(), request.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(request.size())) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (out.find(expect) == std::string::npos) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) break;
      pollfd p{fd, POLLIN, 0};
      if (::poll(&p, 1, static_cast<int>(left.count())) <= 0) break;
      char buf[4096];
      const auto n = ::recv(fd, buf, sizeof buf, 0);
      if (n <= 0) break;
      out.append(buf, static_cast<std::size_t>(n));
    }
  }
  ::close(fd);
  return out;
}

// A server process: started with fork + exec (so the child can ask for
// SIGKILL when its parent thread dies), output to a log file.
class server_process {
 public:
  server_process(std::string program, std::vector<std::string> args, std::filesystem::path log)
      : program_(std::move(program)), args_(std::move(args)), log_(std::move(log)) {}
  server_process(const server_process&) = delete;
  server_process& operator=(const server_process&) = delete;
  ~server_process() { kill(); }

  void start() {
    if (pid_ > 0) return;
    std::vector<std::string> storage{program_};
    storage.insert(storage.end(), args_.begin(), args_.end());
    std::vector<char*> argv;
    for (auto& s : storage) argv.push_back(s.data());
    argv.push_back(nullptr);
    const std::string log = log_.string();
    const pid_t parent = ::getpid();
    const pid_t pid = ::fork();
    if (pid < 0) throw std::runtime_error("fork failed");
    if (pid == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (::getppid() != parent) ::_exit(127);
      const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
      if (fd >= 0) {
        ::dup2(fd, STDOUT_FILENO);
        ::dup2(fd, STDERR_FILENO);
      }
      const int devnull = ::open("/dev/null", O_RDONLY);
      if (devnull >= 0) ::dup2(devnull, STDIN_FILENO);
      ::execv(argv[0], argv.data());
      ::_exit(127);
    }
    pid_ = pid;
  }

  void signal(int sig) {
    if (pid_ > 0) ::kill(pid_, sig);
  }

  //! SIGSTOP, returning once the kernel reports the process stopped: a
  //! request sent afterwards is certainly not answered (a busy server thread
  //! could otherwise answer it between kill() and the stop taking effect).
  void stop() {
    if (pid_ <= 0 || stopped_) return;
    stopped_ = true;
    ::kill(pid_, SIGSTOP);
    int status = 0;
    while (::waitpid(pid_, &status, WUNTRACED) < 0 && errno == EINTR) {
    }
  }
  void cont() {
    stopped_ = false;
    signal(SIGCONT);
  }

  void kill() {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGKILL);  // kills a stopped (paused) process too
    stopped_ = false;
    int status = 0;
    while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
    }
    pid_ = -1;
  }

  [[nodiscard]] bool exited() {
    if (pid_ <= 0) return true;
    int status = 0;
    if (::waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      return true;
    }
    return false;
  }

  [[nodiscard]] pid_t pid() const noexcept { return pid_; }

  [[nodiscard]] std::string log_tail(std::size_t max = 2000) const {
    std::ifstream in(log_);
    std::stringstream ss;
    ss << in.rdbuf();
    auto s = ss.str();
    return s.size() > max ? s.substr(s.size() - max) : s;
  }

 private:
  std::string program_;
  std::vector<std::string> args_;
  std::filesystem::path log_;
  pid_t pid_ = -1;
  bool stopped_ = false;
};

inline std::filesystem::path make_temp_dir(const std::string& stem) {
  std::string pattern = (std::filesystem::temp_directory_path() / ("kvx-" + stem + "-XXXXXX")).string();
  if (!::mkdtemp(pattern.data())) throw std::runtime_error("mkdtemp failed");
  return pattern;
}

// Base of the two servers: a process, its temp dir, a readiness probe.
class loopback_server {
 public:
  loopback_server(const loopback_server&) = delete;
  loopback_server& operator=(const loopback_server&) = delete;
  virtual ~loopback_server() {
    process_.reset();
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  [[nodiscard]] std::uint16_t port() const noexcept { return port_; }
  //! "127.0.0.1:<port>", the form the backends' `address` option takes.
  [[nodiscard]] std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  [[nodiscard]] const std::filesystem::path& dir() const noexcept { return dir_; }
  [[nodiscard]] pid_t pid() const noexcept { return process_ ? process_->pid() : -1; }
  [[nodiscard]] std::string log_tail() const { return process_ ? process_->log_tail() : std::string{}; }

  //! SIGKILL, as a crash would.
  void kill() { process_->kill(); }
  //! Starts the server again on the same port and dir and waits until it answers.
  void restart() {
    process_->kill();
    start_and_wait();
  }
  //! SIGSTOP: connections stay open but nothing is answered.
  void pause() { process_->stop(); }
  void resume() { process_->cont(); }

 protected:
  loopback_server(const std::string& stem, std::uint16_t port) : dir_(make_temp_dir(stem)), port_(port) {}

  void set_process(std::string program, std::vector<std::string> args) {
    process_ = std::make_unique<server_process>(std::move(program), std::move(args), dir_ / "server.log");
  }

  void start_and_wait(std::chrono::milliseconds timeout = std::chrono::seconds(15)) {
    process_->start();
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      if (process_->exited()) throw std::runtime_error("server exited during start-up; log:\n" + process_->log_tail());
      if (ready()) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    const auto tail = process_->log_tail();
    process_->kill();
    throw std::runtime_error("server did not answer within " + std::to_string(timeout.count()) + " ms; log:\n" + tail);
  }

  virtual bool ready() = 0;

 private:
  std::filesystem::path dir_;
  std::uint16_t port_;
  std::unique_ptr<server_process> process_;
};

}  // namespace detail

//! redis-server on a free loopback port, no persistence.
class redis_server : public detail::loopback_server {
 public:
  //! The reason `start()` returns nothing (for GTEST_SKIP).
  static std::string missing_reason() { return "redis-server not found on PATH (Debian: apt-get install redis-server)"; }

  //! A running server, or nothing if the binary is missing. Throws if it does not start.
  static std::unique_ptr<redis_server> start() {
    auto program = find_program("redis-server");
    if (program.empty()) return nullptr;
    std::unique_ptr<redis_server> s(new redis_server(program));
    s->start_and_wait();
    return s;
  }

 private:
  explicit redis_server(const std::string& program) : loopback_server("redis", free_loopback_port()) {
    set_process(program, {"--port", std::to_string(port()), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                          "--dir", dir().string(), "--daemonize", "no", "--databases", "1"});
  }
  bool ready() override { return detail::loopback_exchange(port(), "PING\r\n", "+PONG", std::chrono::milliseconds(500)).find("+PONG") != std::string::npos; }
};

//! A one-member etcd cluster on free loopback ports (client and peer), with
//! fast raft timings so leases expire on time, and a 16 MiB request limit.
class etcd_server : public detail::loopback_server {
 public:
  static std::string missing_reason() { return "etcd not found on PATH (Debian: apt-get install etcd-server)"; }

  static std::unique_ptr<etcd_server> start() {
    auto program = find_program("etcd");
    if (program.empty()) return nullptr;
    std::unique_ptr<etcd_server> s(new etcd_server(program));
    s->start_and_wait();
    return s;
  }

 private:
  explicit etcd_server(const std::string& program) : loopback_server("etcd", free_loopback_port()) {
    const auto peer = "http://127.0.0.1:" + std::to_string(free_loopback_port());
    const auto client = "http://" + address();
    set_process(program, {"--name", "kvx", "--data-dir", (dir() / "data").string(), "--listen-client-urls", client,
                          "--advertise-client-urls", client, "--listen-peer-urls", peer,
                          "--initial-advertise-peer-urls", peer, "--initial-cluster", "kvx=" + peer,
                          "--heartbeat-interval", "10", "--election-timeout", "100", "--max-request-bytes",
                          std::to_string(16 << 20), "--logger", "zap"});
  }
  bool ready() override {
    const auto reply = detail::loopback_exchange(
        port(), "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", "\"true\"",
        std::chrono::milliseconds(500));
    return reply.find("\"health\":\"true\"") != std::string::npos;
  }
};

//! The etcd every test of one executable shares (started by the first suite
//! that needs it; null where etcd is missing). One server per process keeps
//! a test run from starting an etcd per suite.
inline std::unique_ptr<etcd_server>& shared_etcd() {
  static std::unique_ptr<etcd_server> server;
  return server;
}

//! A key prefix no other test of any process uses: `<stem>-<pid>-<n>/`.
inline std::string fresh_prefix(const std::string& stem) {
  static std::atomic<int> n{0};
  return stem + "-" + std::to_string(::getpid()) + "-" + std::to_string(n++) + "/";
}

}  // namespace kvx::test
