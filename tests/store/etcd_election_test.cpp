#include <kvx/store/etcd_election.hpp>

#include <gtest/gtest.h>

#include <boost/asio/bind_executor.hpp>
#include <boost/asio/io_context.hpp>

#include <atomic>
#include <chrono>
#include <memory>
#include <optional>
#include <string>

#include <kvx/testing/metadata_conformance.hpp>

#include "support/child_process.hpp"
#include "support/servers.hpp"

namespace {

namespace asio = boost::asio;
using namespace std::chrono_literals;
using kvx::testing::run_op;

class EtcdElection : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { server_ = kvx::test::etcd_server::start(); }
  static void TearDownTestSuite() { server_.reset(); }
  void SetUp() override {
    if (!server_) GTEST_SKIP() << kvx::test::etcd_server::missing_reason();
    prefix_ = kvx::test::fresh_prefix("election");
    etcd_.emplace(io_.get_executor(), kvx::store::etcd_options{.address = server_->address(), .prefix = prefix_, .timeout = 2s});
  }
  std::unique_ptr<kvx::store::etcd_election> candidate(const std::string& id) {
    return std::make_unique<kvx::store::etcd_election>(*etcd_, "master", id,
                                                       kvx::store::etcd_election_options{.ttl = 1s, .poll_interval = 50ms});
  }
  std::error_code campaign(kvx::store::etcd_election& e, std::chrono::milliseconds deadline = 5s) {
    return std::get<0>(run_op(io_, [&](auto h) { e.async_campaign(std::move(h)); }, deadline));
  }
  std::tuple<std::error_code, std::string> leader(kvx::store::etcd_election& e) {
    return run_op<std::string>(io_, [&](auto h) { e.async_leader(std::move(h)); });
  }

  static inline std::unique_ptr<kvx::test::etcd_server> server_;
  asio::io_context io_;
  std::string prefix_;
  std::optional<kvx::store::etcd_metadata> etcd_;
};

TEST_F(EtcdElection, TheFirstCandidateLeadsAndOthersSeeIt) {
  auto a = candidate("node-a");
  auto b = candidate("node-b");
  EXPECT_EQ(std::get<0>(leader(*a)), kvx::errc::not_found) << "no leader yet";
  ASSERT_FALSE(campaign(*a));
  EXPECT_TRUE(a->is_leader());
  EXPECT_GT(a->leader_revision(), 0);
  EXPECT_NE(a->lease(), 0);
  auto [ec, who] = leader(*b);
  ASSERT_FALSE(ec) << ec.message();
  EXPECT_EQ(who, "node-a");
  EXPECT_EQ(campaign(*b, 500ms), kvx::errc::timed_out) << "a standby waits while the leader lives";
  EXPECT_FALSE(b->is_leader());
  EXPECT_FALSE(campaign(*a)) << "campaigning again while leading completes at once";
}

TEST_F(EtcdElection, ResignHandsLeadershipToTheStandby) {
  auto a = candidate("node-a");
  auto b = candidate("node-b");
  ASSERT_FALSE(campaign(*a));
  std::optional<std::error_code> b_leads, a_lost;
  b->async_campaign(asio::bind_executor(io_, [&](std::error_code ec) { b_leads = ec; }));
  a->async_wait_lost(asio::bind_executor(io_, [&](std::error_code ec) { a_lost = ec; }));
  io_.restart();
  io_.run_for(150ms);
  EXPECT_FALSE(b_leads);
  EXPECT_FALSE(a_lost);
  auto [rec] = run_op(io_, [&](auto h) { a->async_resign(std::move(h)); });
  EXPECT_FALSE(rec) << rec.message();
  const auto give_up = std::chrono::steady_clock::now() + 5s;
  while ((!b_leads || !a_lost) && std::chrono::steady_clock::now() < give_up) io_.run_one_for(100ms);
  ASSERT_TRUE(b_leads);
  EXPECT_FALSE(*b_leads) << b_leads->message();
  ASSERT_TRUE(a_lost);
  EXPECT_FALSE(*a_lost);
  EXPECT_FALSE(a->is_leader());
  EXPECT_TRUE(b->is_leader());
  EXPECT_GT(b->leader_revision(), 0);
  EXPECT_EQ(std::get<1>(leader(*a)), "node-b");
}

TEST_F(EtcdElection, ALeaderWhoseLeaseIsRevokedLosesAndTheStandbyTakesOverWithinTheTtl) {
  auto a = candidate("node-a");
  auto b = candidate("node-b");
  ASSERT_FALSE(campaign(*a));
  const auto first_revision = a->leader_revision();
  std::optional<std::error_code> a_lost;
  a->async_wait_lost(asio::bind_executor(io_, [&](std::error_code ec) { a_lost = ec; }));
  // Someone else (an operator, etcd itself on expiry) ends a's lease.
  auto [ec] = run_op(io_, [&](auto h) { etcd_->async_revoke_lease(a->lease(), std::move(h)); });
  ASSERT_FALSE(ec) << ec.message();
  EXPECT_FALSE(campaign(*b, 3s)) << "the standby leads within the TTL (1 s) plus polling";
  EXPECT_GT(b->leader_revision(), first_revision) << "leader revisions fence out the old leader";
  const auto give_up = std::chrono::steady_clock::now() + 3s;
  while (!a_lost && std::chrono::steady_clock::now() < give_up) io_.run_one_for(100ms);
  ASSERT_TRUE(a_lost) << "the old leader notices within a keep-alive period";
  EXPECT_FALSE(a->is_leader());
}

TEST_F(EtcdElection, ObserveReportsLeaderChanges) {
  auto a = candidate("node-a");
  auto watcher = candidate("watcher");
  std::optional<std::tuple<std::error_code, std::string>> seen;
  watcher->async_observe("", asio::bind_executor(io_, [&](std::error_code ec, std::string who) { seen.emplace(ec, who); }));
  io_.restart();
  io_.run_for(100ms);
  EXPECT_FALSE(seen) << "nothing changed yet";
  ASSERT_FALSE(campaign(*a));
  const auto give_up = std::chrono::steady_clock::now() + 3s;
  while (!seen && std::chrono::steady_clock::now() < give_up) io_.run_one_for(100ms);
  ASSERT_TRUE(seen);
  EXPECT_FALSE(std::get<0>(*seen));
  EXPECT_EQ(std::get<1>(*seen), "node-a");
  auto [ec, who] = run_op<std::string>(io_, [&](auto h) { watcher->async_observe("node-a", std::move(h)); }, 300ms);
  EXPECT_EQ(ec, kvx::errc::timed_out) << "no change while node-a leads";
}

TEST_F(EtcdElection, AStandbyTakesOverWhenTheLeaderProcessDies) {
  kvx::test::child_process leader_process(kvx::test::child_process::tool("etcd_campaigner"),
                                          {server_->address(), prefix_, "master", "process-leader", "1000"});
  ASSERT_EQ(leader_process.read_line(10s), "campaigning");
  auto line = leader_process.read_line(10s);
  ASSERT_TRUE(line && line->rfind("leader ", 0) == 0) << (line ? *line : "nothing");

  auto standby = candidate("standby");
  auto [ec, who] = leader(*standby);
  ASSERT_FALSE(ec) << ec.message();
  EXPECT_EQ(who, "process-leader");
  EXPECT_EQ(campaign(*standby, 300ms), kvx::errc::timed_out);

  leader_process.kill();  // SIGKILL: no resign, the lease just stops being kept alive
  leader_process.wait();
  // TTL 1 s + etcd's expiry sweep (~0.5 s) + one poll: well within 4 s.
  EXPECT_FALSE(campaign(*standby, 4s));
  EXPECT_TRUE(standby->is_leader());
  std::tie(ec, who) = leader(*standby);
  EXPECT_EQ(who, "standby");
}

TEST_F(EtcdElection, CampaignRidesOutAnEtcdRestart) {
  auto a = candidate("node-a");
  server_->kill();
  std::optional<std::error_code> led;
  a->async_campaign(asio::bind_executor(io_, [&](std::error_code ec) { led = ec; }));
  io_.restart();
  io_.run_for(200ms);
  EXPECT_FALSE(led) << "unreachable etcd: campaigning keeps retrying";
  server_->restart();
  const auto give_up = std::chrono::steady_clock::now() + 8s;
  while (!led && std::chrono::steady_clock::now() < give_up) io_.run_one_for(100ms);
  ASSERT_TRUE(led);
  EXPECT_FALSE(*led) << led->message();
}

TEST_F(EtcdElection, ALeaderThatCannotReachEtcdStepsDownWithinTheTtl) {
  auto a = candidate("node-a");
  ASSERT_FALSE(campaign(*a));
  std::optional<std::error_code> lost;
  a->async_wait_lost(asio::bind_executor(io_, [&](std::error_code ec) { lost = ec; }));
  server_->pause();
  io_.restart();
  const auto give_up = std::chrono::steady_clock::now() + 4s;
  while (!lost && std::chrono::steady_clock::now() < give_up) io_.run_one_for(100ms);
  server_->resume();
  ASSERT_TRUE(lost) << "no keep-alive for a TTL: presumed expired";
  EXPECT_FALSE(a->is_leader());
}

}  // namespace
