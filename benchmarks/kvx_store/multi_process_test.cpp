// The store as separate processes: a `kvx-store master`, `kvx-store node`s
// and `kvx-store put/get/admin` clients on loopback, started by the test and
// always reaped (killed and waited for by their owners' destructors; the
// long-running ones also die with this process: --die-with-parent).
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "support/child_process.hpp"
#include "support/servers.hpp"

extern char** environ;

namespace {

using namespace std::chrono_literals;
using json = nlohmann::json;
namespace fs = std::filesystem;

struct finished {
  int status = -1;  // raw wait status
  std::string output;  // stdout and stderr
  [[nodiscard]] bool ok() const { return WIFEXITED(status) && WEXITSTATUS(status) == 0; }
  [[nodiscard]] json last_json() const {
    // The last line that parses as a JSON object (log lines may precede it).
    std::string best;
    std::size_t start = 0;
    while (start < output.size()) {
      auto end = output.find('\n', start);
      if (end == std::string::npos) end = output.size();
      auto line = output.substr(start, end - start);
      if (!line.empty() && line.front() == '{') best = line;
      start = end + 1;
    }
    auto j = json::parse(best, nullptr, false);
    return j.is_discarded() ? json::object() : j;
  }
};

// Runs kvx-store to completion (killed after `timeout`), stdout and stderr together.
finished run(const std::vector<std::string>& args, std::chrono::milliseconds timeout = 30s) {
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) throw std::runtime_error("pipe2 failed");
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, fds[1], STDOUT_FILENO);
  posix_spawn_file_actions_adddup2(&actions, fds[1], STDERR_FILENO);
  std::vector<std::string> storage{KVX_STORE_TOOL};
  storage.insert(storage.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& s : storage) argv.push_back(s.data());
  argv.push_back(nullptr);
  pid_t pid = -1;
  const int rc = ::posix_spawn(&pid, KVX_STORE_TOOL, &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  ::close(fds[1]);
  if (rc != 0) {
    ::close(fds[0]);
    throw std::runtime_error("posix_spawn kvx-store failed");
  }
  finished f;
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    pollfd p{fds[0], POLLIN, 0};
    if (left.count() <= 0 || ::poll(&p, 1, static_cast<int>(left.count())) <= 0) {
      ::kill(pid, SIGKILL);
      f.output += "\n[killed after the test's timeout]";
      break;
    }
    char chunk[4096];
    const auto n = ::read(fds[0], chunk, sizeof chunk);
    if (n <= 0) break;
    f.output.append(chunk, static_cast<std::size_t>(n));
  }
  ::close(fds[0]);
  while (::waitpid(pid, &f.status, 0) < 0 && errno == EINTR) {
  }
  return f;
}

// A process that runs until killed, started with --die-with-parent.
std::unique_ptr<kvx::test::child_process> spawn(std::vector<std::string> args) {
  args.push_back("--die-with-parent");
  return std::make_unique<kvx::test::child_process>(KVX_STORE_TOOL, args);
}

void write_json(const fs::path& path, const json& j) { std::ofstream(path) << j.dump(2) << '\n'; }

struct cluster {
  fs::path dir;
  std::string transport;
  std::unique_ptr<kvx::test::child_process> master;
  std::map<std::string, std::unique_ptr<kvx::test::child_process>> nodes;
  std::string master_endpoint, metadata_url;
  fs::path client_config;

  explicit cluster(std::string t) : transport(std::move(t)) {
    std::string pattern = (fs::temp_directory_path() / "kvx-store-tool-XXXXXX").string();
    if (!::mkdtemp(pattern.data())) throw std::runtime_error("mkdtemp failed");
    dir = pattern;
  }
  ~cluster() {
    nodes.clear();  // killed and reaped
    master.reset();
    std::error_code ec;
    fs::remove_all(dir, ec);
  }

  // Short leases and timeouts so a test sees reclaiming and dropping within seconds.
  void start_master(int node_timeout_ms = 1500) {
    write_json(dir / "master.json", {{"listen", "127.0.0.1:0"}, {"metadata_server", "127.0.0.1:0"}, {"tick_ms", 50},
                                     {"node_timeout_ms", node_timeout_ms}, {"put_lease_ms", 1500}, {"read_lease_ms", 2000},
                                     {"tenant_quota", {{"capped", "1MiB"}}}});
    master = spawn({"master", "--config", (dir / "master.json").string()});
    auto line = master->read_line(30s);
    ASSERT_TRUE(line) << "the master printed nothing";
    auto hello = json::parse(*line);
    master_endpoint = hello["master"];
    metadata_url = hello["metadata_url"];
    client_config = dir / "client.json";
    write_json(client_config, engine_json("client"));
  }
  json engine_json(const std::string& name) const {
    json j{{"master", master_endpoint}, {"metadata", {{"backend", "http"}, {"url", metadata_url}}}, {"transport", transport}};
    if (transport == "ucx") j["ucx"] = {{"tls", "tcp"}};  // works on loopback between processes
    if (name != "client") j["name"] = name;  // clients default to a name of their pid
    return j;
  }
  void start_node(const std::string& name, const std::string& dram = "16MiB", const json& more = json::object()) {
    auto config = engine_json(name);
    config["dram"] = dram;
    config.update(more);
    config["heartbeat_ms"] = 100;
    const auto path = dir / (name + ".json");
    write_json(path, config);
    auto& node = nodes[name] = spawn({"node", "--config", path.string()});
    auto line = node->read_line(30s);
    ASSERT_TRUE(line) << "node " << name << " printed nothing";
    ASSERT_EQ(json::parse(*line)["node"], name);
  }
  // Ends a node's process abruptly and reaps it.
  void kill_node(const std::string& name) {
    nodes.at(name)->kill(SIGKILL);
    nodes.at(name)->wait();
  }

  json admin(const std::vector<std::string>& command) const {
    std::vector<std::string> args{"admin", "--master", master_endpoint, "--json"};
    args.insert(args.end(), command.begin(), command.end());
    auto r = run(args);
    EXPECT_TRUE(r.ok()) << r.output;
    return r.last_json();
  }
  finished put(const std::string& tenant, const std::string& key, std::uint64_t size, int seed, int replicas = 1) const {
    return run({"put", "--config", client_config.string(), "--tenant", tenant, "--key", key, "--size", std::to_string(size),
                "--seed", std::to_string(seed), "--replicas", std::to_string(replicas)});
  }
  finished get(const std::string& tenant, const std::string& key, int seed) const {
    return run({"get", "--config", client_config.string(), "--tenant", tenant, "--key", key, "--expect-seed",
                std::to_string(seed)});
  }
  json object(const std::string& tenant, const std::string& key) const {
    const auto list = admin({"objects", "--tenant", tenant});
    for (const auto& o : list["objects"])
      if (o["key"] == key) return o;
    return json();
  }
  // Polls `admin` until `done(answer)` (false after `timeout`).
  template <class Done>
  bool wait_for(const std::vector<std::string>& command, Done done, std::chrono::milliseconds timeout = 15s) const {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      if (done(admin(command))) return true;
      std::this_thread::sleep_for(100ms);
    }
    return false;
  }
};

struct StoreAcrossProcesses : ::testing::TestWithParam<std::string> {};

TEST_P(StoreAcrossProcesses, PutAndGetAreByteExactWithReplicasOnDistinctNodes) {
  cluster c(GetParam());
  ASSERT_NO_FATAL_FAILURE(c.start_master());
  ASSERT_NO_FATAL_FAILURE(c.start_node("n0"));
  ASSERT_NO_FATAL_FAILURE(c.start_node("n1"));
  const std::vector<std::pair<std::string, std::uint64_t>> objects{{"one-byte", 1}, {"odd", 100'003}, {"big", 3u << 20}};
  int seed = 10;
  for (const auto& [key, size] : objects) {
    auto put = c.put("t", key, size, ++seed, 2);
    ASSERT_TRUE(put.ok()) << put.output;
  }
  seed = 10;
  for (const auto& [key, size] : objects) {
    auto get = c.get("t", key, ++seed);  // another process, another engine
    ASSERT_TRUE(get.ok()) << get.output;
    EXPECT_EQ(get.last_json()["size"], size);
    EXPECT_EQ(get.last_json()["verified"], true);
    auto o = c.object("t", key);
    EXPECT_EQ(o["lease_ms"], 0) << "the reader released its lease before it exited";
    ASSERT_EQ(o["replicas"].size(), 2u) << o.dump();
    EXPECT_NE(o["replicas"][0]["node"], o["replicas"][1]["node"]);
  }
  // A wrong expectation is caught: the check compares bytes.
  auto wrong = c.get("t", "odd", 99);
  EXPECT_FALSE(wrong.ok());
  EXPECT_NE(wrong.output.find("differs"), std::string::npos) << wrong.output;

  // A file round trip.
  std::string text = "the quick brown fox\n";
  for (int i = 0; i < 12; ++i) text += text;
  std::ofstream(c.dir / "in.bin", std::ios::binary) << text;
  auto put = run({"put", "--config", c.client_config.string(), "--tenant", "t", "--key", "file", "--file", (c.dir / "in.bin").string()});
  ASSERT_TRUE(put.ok()) << put.output;
  auto get = run({"get", "--config", c.client_config.string(), "--tenant", "t", "--key", "file", "--expect-file", (c.dir / "in.bin").string(),
                  "--out", (c.dir / "out.bin").string()});
  ASSERT_TRUE(get.ok()) << get.output;
  EXPECT_EQ(fs::file_size(c.dir / "out.bin"), text.size());

  auto usage = c.admin({"usage"});
  EXPECT_EQ(usage["objects"], 4);
  EXPECT_EQ(usage["tenants"]["t"]["used"], 2 * (1 + 100'003 + (3u << 20)) + text.size());
  auto segments = c.admin({"segments"});
  ASSERT_EQ(segments["segments"].size(), 2u);
}

#if defined(KVX_STORE_TOOL_UCX)  // kvx-store is built with UCX
const auto tool_transports = ::testing::Values("tcp", "shm", "ucx");
#else
const auto tool_transports = ::testing::Values("tcp", "shm");
#endif
INSTANTIATE_TEST_SUITE_P(Transports, StoreAcrossProcesses, tool_transports, [](const auto& info) { return info.param; });

TEST(StoreProcesses, AnSsdFileOfANodeTakesWhatItsDramCannotHold) {
  cluster c("tcp");
  // A node timeout no test waits for: the clean stop below must leave by itself.
  ASSERT_NO_FATAL_FAILURE(c.start_master(/*node_timeout_ms=*/600000));
  const auto pool = c.dir / "n0.pool";
  ASSERT_NO_FATAL_FAILURE(c.start_node("n0", "1MiB", {{"ssd", {{"path", pool.string()}, {"bytes", "8MiB"}}}}));
  EXPECT_EQ(fs::file_size(pool), 8u << 20);
  auto put = c.put("t", "big", 3u << 20, 4);
  ASSERT_TRUE(put.ok()) << put.output;
  auto o = c.object("t", "big");
  ASSERT_EQ(o["replicas"].size(), 1u) << o.dump();
  EXPECT_EQ(o["replicas"][0]["node"], "n0-ssd");
  EXPECT_EQ(o["replicas"][0]["segment"], "n0-ssd/ssd");
  auto get = c.get("t", "big", 4);
  EXPECT_TRUE(get.ok()) << get.output;
  auto usage = c.admin({"usage"});
  EXPECT_EQ(usage["tiers"]["ssd"]["used"], 3u << 20) << usage.dump();
  EXPECT_EQ(usage["tiers"]["dram"]["capacity"], 1u << 20);
  // A clean stop removes the file, and the node (DRAM and SSD) leaves the
  // master before its process ends, not a node timeout later.
  c.nodes.at("n0")->kill(SIGTERM);
  EXPECT_EQ(c.nodes.at("n0")->wait(), 0);
  EXPECT_FALSE(fs::exists(pool));
  const auto after = c.admin({"segments"});
  EXPECT_TRUE(after["segments"].empty()) << after.dump();
  EXPECT_EQ(c.admin({"usage"})["objects"], 0) << "its only copy left with it";
}

TEST(StoreProcesses, NodesKilledWithAGetAndAPutInFlightLeaveThePoolConsistent) {
  cluster c("tcp");
  // A frozen node must not be dropped before the put below is placed on it,
  // however slowly the writer process starts on a busy machine.
  ASSERT_NO_FATAL_FAILURE(c.start_master(/*node_timeout_ms=*/3000));
  for (auto n : {"n0", "n1", "n2"}) ASSERT_NO_FATAL_FAILURE(c.start_node(n));
  const std::uint64_t size = 4u << 20;
  ASSERT_TRUE(c.put("t", "kept", size, 7, 2).ok());
  auto kept = c.object("t", "kept");
  ASSERT_EQ(kept["replicas"].size(), 2u);
  const std::string first = kept["replicas"][0]["node"], second = kept["replicas"][1]["node"];
  std::string third;
  for (auto n : {"n0", "n1", "n2"})
    if (n != first && n != second) third = n;

  // A get whose first replica's node freezes, then dies: the other replica serves it.
  c.nodes.at(first)->kill(SIGSTOP);
  auto reader = spawn({"get", "--config", c.client_config.string(), "--tenant", "t", "--key", "kept", "--expect-seed", "7"});
  std::this_thread::sleep_for(500ms);  // its read is sent to the frozen node
  c.kill_node(first);
  auto line = reader->read_line(30s);
  ASSERT_TRUE(line) << "the reader printed nothing";
  EXPECT_EQ(json::parse(*line)["verified"], true) << *line;
  EXPECT_EQ(reader->wait(), 0);

  // The master drops the dead node and copies "kept" to the third node.
  ASSERT_TRUE(c.wait_for({"objects", "--tenant", "t"}, [&](const json& r) {
    const auto& o = r["objects"][0];
    if (o["replicas"].size() != 2u) return false;
    for (const auto& rep : o["replicas"])
      if (rep["node"] == first) return false;
    return true;
  })) << c.admin({"objects"}).dump();

  // A put whose replicas are on the two live nodes, one of which freezes then dies mid-write.
  c.nodes.at(third)->kill(SIGSTOP);
  auto writer = spawn({"put", "--config", c.client_config.string(), "--tenant", "t", "--key", "doomed", "--size",
                       std::to_string(size), "--seed", "8", "--replicas", "2"});
  ASSERT_TRUE(c.wait_for({"objects", "--tenant", "t"}, [](const json& r) { return r["objects"].size() == 2u; }));
  auto doomed = c.object("t", "doomed");
  EXPECT_EQ(doomed["committed"], false) << "the put is in flight";
  auto early = c.get("t", "doomed", 8);
  EXPECT_FALSE(early.ok()) << "no half object is visible: " << early.output;
  EXPECT_NE(early.output.find("not found"), std::string::npos) << early.output;
  c.kill_node(third);
  const int status = writer->wait();
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 1) << status;

  // Consistent: "doomed" is gone (aborted), "kept" is whole on the survivor, every byte accounted for.
  ASSERT_TRUE(c.wait_for({"usage"}, [&](const json& r) { return r["nodes"].size() == 1u && r["objects"] == 1; }))
      << c.admin({"usage"}).dump() << c.admin({"objects"}).dump();
  EXPECT_FALSE(c.get("t", "doomed", 8).ok());
  auto survivor = c.get("t", "kept", 7);
  EXPECT_TRUE(survivor.ok()) << survivor.output;
  auto usage = c.admin({"usage"});
  EXPECT_EQ(usage["used"], size) << usage.dump();
  EXPECT_EQ(usage["tenants"]["t"]["used"], 2 * size) << "charged for the replicas it asked for";
  auto put = c.put("t", "after", 4096, 9);
  EXPECT_TRUE(put.ok()) << put.output;
}

TEST(StoreProcesses, AWriterKilledBetweenAllocateAndCommitIsReclaimedAfterItsPutLease) {
  cluster c("tcp");
  ASSERT_NO_FATAL_FAILURE(c.start_master());
  ASSERT_NO_FATAL_FAILURE(c.start_node("n0"));
  auto writer = spawn({"put", "--config", c.client_config.string(), "--tenant", "t", "--key", "half", "--size", "1MiB",
                       "--hold-after-allocate"});
  auto line = writer->read_line(30s);
  ASSERT_TRUE(line) << "the writer printed nothing";
  ASSERT_TRUE(json::parse(*line).contains("put_id")) << *line;
  writer->kill(SIGKILL);
  writer->wait();
  auto usage = c.admin({"usage"});
  EXPECT_EQ(usage["used"], 1 << 20) << usage.dump();
  EXPECT_EQ(c.object("t", "half")["committed"], false);
  auto get = c.get("t", "half", 1);
  EXPECT_FALSE(get.ok());
  EXPECT_NE(get.output.find("not found"), std::string::npos) << get.output;
  // The put lease (1.5 s in this config) runs out: the space comes back.
  ASSERT_TRUE(c.wait_for({"usage"}, [](const json& r) { return r["used"] == 0 && r["objects"] == 0; }))
      << c.admin({"usage"}).dump();
  EXPECT_EQ(c.admin({"usage"})["tenants"]["t"]["used"], 0);
  auto again = c.put("t", "half", 1 << 20, 3);
  EXPECT_TRUE(again.ok()) << again.output;
  EXPECT_TRUE(c.get("t", "half", 3).ok());
}

TEST(StoreProcesses, AQuotaExceededIsAClearErrorInTheWritersProcess) {
  cluster c("tcp");
  ASSERT_NO_FATAL_FAILURE(c.start_master());
  ASSERT_NO_FATAL_FAILURE(c.start_node("n0"));
  ASSERT_TRUE(c.put("capped", "a", 700 << 10, 1).ok());
  auto over = c.put("capped", "b", 400 << 10, 2);
  EXPECT_FALSE(over.ok());
  EXPECT_NE(over.output.find("capacity exceeded"), std::string::npos) << over.output;
  EXPECT_NE(over.output.find("tenant 'capped' quota of 1048576 bytes: 716800 used, put needs 409600"), std::string::npos)
      << over.output;
  EXPECT_TRUE(c.put("uncapped", "b", 400 << 10, 2).ok()) << "other tenants are not limited";
  auto usage = c.admin({"usage"});
  EXPECT_EQ(usage["tenants"]["capped"]["used"], 700 << 10);
  EXPECT_EQ(usage["tenants"]["capped"]["quota"], 1 << 20);
}

TEST(StoreProcesses, DrainingANodeCopiesItsObjectsElsewhereAndGivesBackItsOwn) {
  cluster c("tcp");
  ASSERT_NO_FATAL_FAILURE(c.start_master());
  ASSERT_NO_FATAL_FAILURE(c.start_node("n0"));
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(c.put("t", "k" + std::to_string(i), 256 << 10, 20 + i).ok());
  ASSERT_NO_FATAL_FAILURE(c.start_node("n1"));
  ASSERT_NO_FATAL_FAILURE(c.start_node("n2"));
  auto drained = run({"admin", "--master", c.master_endpoint, "drain", "n0", "--wait", "20"});
  ASSERT_TRUE(drained.ok()) << drained.output;
  // 3 objects while n0 still holds its copies, 0 once a tick gave them back.
  EXPECT_TRUE(drained.output.find("node 'n0': 3 objects, 0 only there") != std::string::npos ||
              drained.output.find("node 'n0': 0 objects, 0 only there") != std::string::npos)
      << drained.output;
  EXPECT_NE(drained.output.find(": drained"), std::string::npos) << drained.output;
  const auto segments = c.admin({"segments"});
  for (const auto& s : segments["segments"]) EXPECT_EQ(s["draining"], s["node"] == "n0");
  // The master's next ticks give back n0's copies: every object is whole elsewhere.
  ASSERT_TRUE(c.wait_for({"segments"}, [](const json& r) {
    for (const auto& s : r["segments"])
      if (s["node"] == "n0" && s["used"] != 0) return false;
    return true;
  })) << c.admin({"segments"}).dump();
  auto empty = run({"admin", "--master", c.master_endpoint, "drain", "n0", "--wait", "20", "--until", "empty"});
  EXPECT_TRUE(empty.ok()) << empty.output;
  EXPECT_NE(empty.output.find("node 'n0': 0 objects, 0 only there, 0 copies in flight, 0 B held: drained and empty"),
            std::string::npos)
      << empty.output;
  auto undrained = run({"admin", "--master", c.master_endpoint, "undrain", "n0"});
  ASSERT_TRUE(undrained.ok()) << undrained.output;
  EXPECT_NE(undrained.output.find("node 'n0': no longer draining"), std::string::npos) << undrained.output;
  const auto after = c.admin({"segments"});
  for (const auto& s : after["segments"]) EXPECT_FALSE(s["draining"]) << s.dump();
  c.kill_node("n0");
  ASSERT_TRUE(c.wait_for({"segments"}, [](const json& r) { return r["segments"].size() == 2u; }));
  for (int i = 0; i < 3; ++i) {
    auto get = c.get("t", "k" + std::to_string(i), 20 + i);
    EXPECT_TRUE(get.ok()) << get.output;
  }
  EXPECT_EQ(c.admin({"usage"})["objects"], 3);
}

TEST(StoreProcesses, AnOperatorRemovesAKilledNodeLongBeforeItsTimeout) {
  cluster c("tcp");
  ASSERT_NO_FATAL_FAILURE(c.start_master(/*node_timeout_ms=*/600000));
  ASSERT_NO_FATAL_FAILURE(c.start_node("n0"));
  ASSERT_NO_FATAL_FAILURE(c.start_node("n1"));
  ASSERT_TRUE(c.put("t", "two", 256 << 10, 31, 2).ok());
  ASSERT_NO_FATAL_FAILURE(c.start_node("n2"));
  auto live = run({"admin", "--master", c.master_endpoint, "remove", "n0"});
  EXPECT_FALSE(live.ok()) << live.output;
  EXPECT_NE(live.output.find("still heartbeating"), std::string::npos) << live.output;
  c.kill_node("n0");
  // n0 heartbeated every 100 ms: the master waits three intervals, each
  // counted as at least a second.
  std::this_thread::sleep_for(3500ms);
  auto removed = run({"admin", "--master", c.master_endpoint, "remove", "n0"});
  ASSERT_TRUE(removed.ok()) << removed.output;
  EXPECT_NE(removed.output.find("node 'n0' removed: 0 objects lost with it"), std::string::npos) << removed.output;
  // Copied again from n1 to n2 now, not after the 10-minute node timeout.
  ASSERT_TRUE(c.wait_for({"objects", "--tenant", "t"}, [](const json& r) {
    const auto& reps = r["objects"][0]["replicas"];
    return reps.size() == 2u && reps[0]["node"] != "n0" && reps[1]["node"] != "n0";
  })) << c.admin({"objects"}).dump();
  c.kill_node("n1");
  auto get = c.get("t", "two", 31);
  EXPECT_TRUE(get.ok()) << "n2's copy serves it: " << get.output;
  auto forced = run({"admin", "--master", c.master_endpoint, "remove", "n2", "--force"});
  ASSERT_TRUE(forced.ok()) << forced.output;
  EXPECT_NE(forced.output.find("node 'n2' removed"), std::string::npos) << forced.output;
  // A live node so removed registers again, empty.
  ASSERT_TRUE(c.wait_for({"segments"}, [](const json& r) {
    for (const auto& seg : r["segments"])
      if (seg["node"] == "n2") return true;
    return false;
  })) << c.admin({"segments"}).dump();
  auto misuse = run({"admin", "--master", c.master_endpoint, "drain", "n2", "--force"});
  EXPECT_EQ(WEXITSTATUS(misuse.status), 2) << misuse.output;
  auto until = run({"admin", "--master", c.master_endpoint, "drain", "n2", "--until", "empty"});
  EXPECT_EQ(WEXITSTATUS(until.status), 2) << "--until needs --wait: " << until.output;
}

TEST(StoreProcesses, ClientsAndNodesFollowAStandbyMasterWhenTheLeaderIsKilled) {
  auto etcd = kvx::test::etcd_server::start();
  if (!etcd) GTEST_SKIP() << kvx::test::etcd_server::missing_reason();
  cluster c("tcp");
  const json where{{"address", etcd->address()}, {"prefix", "kvx-store-tool/"}};
  json election = where;
  election["ttl_ms"] = 1000;
  election["poll_interval_ms"] = 50;
  // At least the longest lease below (1000 ms) plus the keep-alive period (333 ms).
  election["takeover_grace_ms"] = 1500;
  std::vector<std::unique_ptr<kvx::test::child_process>> masters;
  std::vector<std::string> endpoints;
  for (int i = 0; i < 2; ++i) {
    const auto path = c.dir / ("master-" + std::to_string(i) + ".json");
    write_json(path, {{"listen", "127.0.0.1:0"}, {"tick_ms", 50}, {"node_timeout_ms", 1500}, {"put_lease_ms", 1000},
                      {"read_lease_ms", 1000}, {"replication_timeout_ms", 1000}, {"election", election}});
    masters.push_back(spawn({"master", "--config", path.string()}));
    auto line = masters.back()->read_line(30s);
    ASSERT_TRUE(line) << "master " << i << " printed nothing";
    endpoints.push_back(json::parse(*line)["master"]);
  }
  // Nodes and clients find the master through etcd, and share their segments' descriptors there.
  json metadata = where;
  metadata["backend"] = "etcd";
  c.master_endpoint = endpoints[0];  // replaced below by the leader's
  for (auto name : {"n0", "n1"}) {
    const auto path = c.dir / (std::string(name) + ".json");
    write_json(path, {{"name", name}, {"master", where}, {"metadata", metadata}, {"dram", "16MiB"}, {"heartbeat_ms", 100}});
    auto& node = c.nodes[name] = spawn({"node", "--config", path.string()});
    auto line = node->read_line(30s);
    ASSERT_TRUE(line) << "node " << name << " printed nothing";
  }
  c.client_config = c.dir / "client.json";
  write_json(c.client_config, {{"master", where}, {"metadata", metadata}});
  auto admin_via_etcd = [&](const std::string& command) {
    return run({"admin", "--etcd", etcd->address(), "--prefix", "kvx-store-tool/", "--json", command});
  };
  // A master takes puts once its takeover grace is over (busy until then).
  auto put_eventually = [&](const std::string& key, int seed) {
    const auto until = std::chrono::steady_clock::now() + 15s;
    finished put;
    while (!(put = c.put("t", key, 200'000, seed, 2)).ok() && std::chrono::steady_clock::now() < until)
      std::this_thread::sleep_for(100ms);
    return put;
  };
  auto before = put_eventually("before", 5);
  ASSERT_TRUE(before.ok()) << before.output;
  ASSERT_TRUE(c.get("t", "before", 5).ok());
  // The standby refuses; the leader answers.
  std::size_t leader = 2;
  for (std::size_t i = 0; i < 2; ++i)
    if (run({"admin", "--master", endpoints[i], "--json", "usage"}).ok()) leader = i;
  ASSERT_LT(leader, 2u) << "no master leads";
  EXPECT_FALSE(run({"admin", "--master", endpoints[1 - leader], "usage"}).ok()) << "a standby answers nothing";

  std::this_thread::sleep_for(500ms);  // heartbeats (100 ms) carry the commit to the nodes' ledgers
  masters[leader]->kill(SIGKILL);
  masters[leader]->wait();
  // The standby leads within the TTL; both nodes register with it again.
  const auto deadline = std::chrono::steady_clock::now() + 20s;
  json usage;
  while (std::chrono::steady_clock::now() < deadline) {
    auto r = admin_via_etcd("usage");
    if (r.ok() && (usage = r.last_json())["nodes"].size() == 2u) break;
    std::this_thread::sleep_for(100ms);
  }
  ASSERT_EQ(usage["nodes"].size(), 2u) << usage.dump();
  // With an election the master keeps ledgers (recover_objects): after its
  // grace the nodes report what they hold and the object is back, byte-exact.
  bool back = false;
  for (const auto until = std::chrono::steady_clock::now() + 15s; !back && std::chrono::steady_clock::now() < until;
       std::this_thread::sleep_for(100ms))
    back = c.get("t", "before", 5).ok();
  EXPECT_TRUE(back) << "the object put before the failover is read through the new master";
  auto put = put_eventually("after", 6);
  ASSERT_TRUE(put.ok()) << put.output;
  auto get = c.get("t", "after", 6);
  EXPECT_TRUE(get.ok()) << get.output;
  c.nodes.clear();
  masters.clear();
}

}  // namespace
