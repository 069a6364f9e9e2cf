#pragma once
#include <cstdlib>
// A second process for multi-process tests: started with posix_spawn, its
// stdout read line by line (with a deadline), killed on demand and always
// reaped. Tools live in KVX_TEST_TOOLS_DIR (tests/tools/<name>.cpp).

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

extern char** environ;

namespace kvx::test {

class child_process {
 public:
  //! Starts `program` with `args`; throws on failure (a set-up error).
  child_process(const std::string& program, const std::vector<std::string>& args) {
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0) throw std::runtime_error("pipe2 failed");
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, fds[1], STDOUT_FILENO);
    std::vector<std::string> storage{program};
    storage.insert(storage.end(), args.begin(), args.end());
    std::vector<char*> argv;
    for (auto& s : storage) argv.push_back(s.data());
    argv.push_back(nullptr);
    const int rc = ::posix_spawn(&pid_, program.c_str(), &actions, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    ::close(fds[1]);
    out_ = fds[0];
    if (rc != 0) {
      ::close(out_);
      throw std::runtime_error("posix_spawn " + program + " failed: " + std::to_string(rc));
    }
  }
  child_process(const child_process&) = delete;
  child_process& operator=(const child_process&) = delete;
  ~child_process() {
    kill(SIGKILL);
    wait();
    if (out_ >= 0) ::close(out_);
  }

  //! Tool path in the test build tree.
  //! Tool path in the test build tree (or in $KVX_TEST_TOOLS_DIR when set:
  //! tests copied to another machine, the GPU machine say).
  static std::string tool(const std::string& name) {
    const char* dir = std::getenv("KVX_TEST_TOOLS_DIR");
    return std::string(dir && *dir ? dir : KVX_TEST_TOOLS_DIR) + "/kvx_test_" + name;
  }

  //! The next line of the child's stdout, or nothing on EOF or after `timeout`.
  std::optional<std::string> read_line(std::chrono::milliseconds timeout = std::chrono::seconds(10)) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      if (auto pos = buffer_.find('\n'); pos != std::string::npos) {
        std::string line = buffer_.substr(0, pos);
        buffer_.erase(0, pos + 1);
        return line;
      }
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) return std::nullopt;
      pollfd p{out_, POLLIN, 0};
      if (::poll(&p, 1, static_cast<int>(left.count())) <= 0) return std::nullopt;
      char chunk[4096];
      const auto n = ::read(out_, chunk, sizeof chunk);
      if (n <= 0) return std::nullopt;
      buffer_.append(chunk, static_cast<std::size_t>(n));
    }
  }

  void kill(int sig = SIGKILL) {
    if (pid_ > 0 && !reaped_) ::kill(pid_, sig);
  }
  //! Waits for exit; returns the raw wait status (-1 if already reaped).
  int wait() {
    if (pid_ <= 0 || reaped_) return -1;
    int status = 0;
    while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
    }
    reaped_ = true;
    return status;
  }
  [[nodiscard]] pid_t pid() const noexcept { return pid_; }

 private:
  pid_t pid_ = -1;
  int out_ = -1;
  bool reaped_ = false;
  std::string buffer_;
};

}  // namespace kvx::test
