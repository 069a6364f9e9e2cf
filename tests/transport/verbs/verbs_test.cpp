#include <kvx/transport/verbs.hpp>

#include <kvx/testing/transport_conformance.hpp>
#include <kvx/transport/multi_rail.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>

#include <kvx/core/config.hpp>

#include "support/run_until.hpp"

// Tests that need no RDMA device run everywhere; the rest skip with the reason
// when ibv_get_device_list finds nothing (see docs/transport-verbs.md).
namespace {

using kvx::errc;
using kvx::transport::verbs;
using kvx::transport::verbs_options;
namespace vd = kvx::transport::detail;

std::string missing_device() {
  if (!verbs::devices().empty()) return {};
  return "no RDMA device: ibv_get_device_list() found none (needs an RDMA NIC or SoftRoCE: "
         "`rdma link add rxe0 type rxe netdev eth0`)";
}

kvx::result<verbs_options> parse(const char* text) {
  auto j = kvx::config::parse(text);
  if (!j) return j.error();
  return verbs_options::from_config(kvx::config::view(*j, "transport.verbs"));
}

TEST(VerbsOptions, DefaultsWhenEmpty) {
  auto o = parse("{}");
  ASSERT_TRUE(o) << o.error().message();
  EXPECT_EQ(o->device, "");
  EXPECT_EQ(o->port, 1);
  EXPECT_EQ(o->gid_index, -1);
  EXPECT_EQ(o->max_outstanding, 128u);
  EXPECT_FALSE(o->busy_poll);
  EXPECT_EQ(o->handshake, "127.0.0.1:0");
  EXPECT_EQ(o->handshake_timeout_ms, 10000u);
}

TEST(VerbsOptions, ReadsEveryField) {
  auto o = parse(R"({"device": "mlx5_1", "port": 2, "gid_index": 3, "max_outstanding": 64, "signal_interval": 8,
                     "busy_poll": true, "handshake": "0.0.0.0:7000", "advertise": "10.0.0.5",
                     "handshake_timeout_ms": 2500})");
  ASSERT_TRUE(o) << o.error().message();
  EXPECT_EQ(o->device, "mlx5_1");
  EXPECT_EQ(o->port, 2);
  EXPECT_EQ(o->gid_index, 3);
  EXPECT_EQ(o->max_outstanding, 64u);
  EXPECT_EQ(o->signal_interval, 8u);
  EXPECT_TRUE(o->busy_poll);
  EXPECT_EQ(o->handshake, "0.0.0.0:7000");
  EXPECT_EQ(o->advertise, "10.0.0.5");
  EXPECT_EQ(o->handshake_timeout_ms, 2500u);
}

TEST(VerbsOptions, ErrorsNameTheField) {
  struct bad_case {
    const char* json;
    const char* field;
  } cases[] = {
      {R"({"port": 0})", "transport.verbs.port"},
      {R"({"port": "one"})", "transport.verbs.port"},
      {R"({"gid_index": -2})", "transport.verbs.gid_index"},
      {R"({"max_outstanding": 0})", "transport.verbs.max_outstanding"},
      {R"({"max_outstanding": 8, "signal_interval": 9})", "transport.verbs.signal_interval"},
      {R"({"busy_poll": 1})", "transport.verbs.busy_poll"},
      {R"({"handshake": "localhost:1"})", "transport.verbs.handshake"},
      {R"({"handshake": "10.0.0.1"})", "transport.verbs.handshake"},
      {R"({"handshake": "10.0.0.1:70000"})", "transport.verbs.handshake"},
      {R"({"advertise": "host.example"})", "transport.verbs.advertise"},
      {R"({"devcie": "mlx5_0"})", "transport.verbs.devcie"},
      {R"({"handshake_timeout_ms": 0})", "transport.verbs.handshake_timeout_ms"},
      {R"({"handshake_timeout_ms": 600001})", "transport.verbs.handshake_timeout_ms"},
      {R"({"handshake_timeout_ms": "10s"})", "transport.verbs.handshake_timeout_ms"},
  };
  for (const auto& c : cases) {
    auto o = parse(c.json);
    ASSERT_FALSE(o) << c.json;
    EXPECT_EQ(o.code(), errc::invalid_argument) << c.json;
    EXPECT_NE(o.error().message().find(c.field), std::string::npos) << c.json << ": " << o.error().message();
  }
}

TEST(VerbsOptions, SplitsIpv6Endpoints) {
  auto ep = verbs_options::split_endpoint("[fe80::1]:4791");
  ASSERT_TRUE(ep) << ep.error().message();
  EXPECT_EQ(ep->first, "fe80::1");
  EXPECT_EQ(ep->second, 4791);
}

TEST(VerbsCompletionStatus, MapsEveryErrorToAnErrc) {
  EXPECT_FALSE(vd::verbs_wc_error(IBV_WC_SUCCESS));
  EXPECT_EQ(vd::verbs_wc_error(IBV_WC_REM_ACCESS_ERR), errc::stale);
  EXPECT_EQ(vd::verbs_wc_error(IBV_WC_REM_INV_REQ_ERR), errc::out_of_range);
  EXPECT_EQ(vd::verbs_wc_error(IBV_WC_LOC_LEN_ERR), errc::out_of_range);
  EXPECT_EQ(vd::verbs_wc_error(IBV_WC_LOC_PROT_ERR), errc::invalid_argument);
  EXPECT_EQ(vd::verbs_wc_error(IBV_WC_RETRY_EXC_ERR), errc::connection_lost);
  EXPECT_EQ(vd::verbs_wc_error(IBV_WC_RNR_RETRY_EXC_ERR), errc::connection_lost);
  EXPECT_EQ(vd::verbs_wc_error(IBV_WC_WR_FLUSH_ERR), errc::connection_lost);
  EXPECT_EQ(vd::verbs_wc_error(IBV_WC_RESP_TIMEOUT_ERR), errc::timed_out);
  EXPECT_EQ(vd::verbs_wc_error(IBV_WC_BAD_RESP_ERR), errc::protocol_error);
  EXPECT_EQ(vd::verbs_wc_error(IBV_WC_MW_BIND_ERR), errc::bad_key);
  EXPECT_EQ(vd::verbs_wc_error(IBV_WC_LOC_QP_OP_ERR), errc::internal);
  for (int s = IBV_WC_LOC_LEN_ERR; s <= IBV_WC_TM_RNDV_INCOMPLETE; ++s)
    EXPECT_TRUE(vd::verbs_wc_error(static_cast<ibv_wc_status>(s))) << ibv_wc_status_str(static_cast<ibv_wc_status>(s));
}

kvx::memory::segment_descriptor described(std::uint64_t length = 4096) {
  kvx::memory::segment_descriptor d;
  d.name = "kv";
  d.node = "prefill-0";
  d.length = length;
  d.key = 77;
  d.generation = 3;
  vd::verbs_entry e;
  e.segment = "kv";
  e.generation = 3;
  e.key_check = vd::verbs_key_check(77, 3);
  e.addr = 0x10000;
  e.length = length;
  e.rkey = 42;
  e.lid = 0;
  e.gid = *vd::verbs_gid_from_string("::ffff:10.0.0.5");
  e.qp_endpoint = "10.0.0.5:7000";
  d.transports["verbs"] = e.to_json();
  return d;
}

TEST(VerbsEntry, RoundTripsThroughJson) {
  auto d = described();
  auto e = vd::verbs_entry::parse(d.transports["verbs"]);
  ASSERT_TRUE(e) << e.error().message();
  EXPECT_EQ(e->rkey, 42u);
  EXPECT_EQ(e->addr, 0x10000u);
  EXPECT_EQ(vd::verbs_gid_to_string(e->gid), "::ffff:10.0.0.5");
  EXPECT_FALSE(e->check(d, 0, 4096));
}

TEST(VerbsEntry, MalformedEntriesAreRejected) {
  const auto good = described().transports["verbs"];
  for (const char* field : {"segment", "generation", "key_check", "addr", "length", "rkey", "lid", "gid", "qp_endpoint"}) {
    auto j = good;
    j.erase(field);
    auto e = vd::verbs_entry::parse(j);
    ASSERT_FALSE(e) << "accepted an entry without " << field;
    EXPECT_NE(e.error().message().find(field), std::string::npos) << e.error().message();
  }
  auto bad_gid = good;
  bad_gid["gid"] = "not-a-gid";
  EXPECT_EQ(vd::verbs_entry::parse(bad_gid).code(), errc::malformed_message);
  auto bad_ep = good;
  bad_ep["qp_endpoint"] = "nohost";
  EXPECT_EQ(vd::verbs_entry::parse(bad_ep).code(), errc::malformed_message);
  auto big_rkey = good;
  big_rkey["rkey"] = std::uint64_t{1} << 40;
  EXPECT_FALSE(vd::verbs_entry::parse(big_rkey));
  auto overflow = good;
  overflow["addr"] = ~std::uint64_t{0};
  EXPECT_EQ(vd::verbs_entry::parse(overflow).code(), errc::malformed_message);
  EXPECT_FALSE(vd::verbs_entry::parse(nlohmann::json::array()));
}

TEST(VerbsEntry, InitiatorChecksRefuseBeforePosting) {
  auto d = described(4096);
  auto e = *vd::verbs_entry::parse(d.transports["verbs"]);
  auto other = d;
  other.name = "nope";
  EXPECT_EQ(e.check(other, 0, 1), errc::unknown_segment);
  auto stale = d;
  stale.generation = 4;
  EXPECT_EQ(e.check(stale, 0, 1), errc::stale);
  auto bad = d;
  bad.key ^= 1;
  EXPECT_EQ(e.check(bad, 0, 1), errc::bad_key);
  constexpr auto max = ~std::uint64_t{0};
  EXPECT_EQ(e.check(d, 4000, 97), errc::out_of_range);
  EXPECT_EQ(e.check(d, max, 2), errc::out_of_range);
  EXPECT_EQ(e.check(d, max - 10, 64), errc::out_of_range);
  EXPECT_FALSE(e.check(d, 4095, 1));
  EXPECT_FALSE(e.check(d, 4096, 0));
  auto longer = d;  // a descriptor claiming more than was registered is bounded by the entry
  longer.length = 8192;
  EXPECT_EQ(e.check(longer, 4096, 1), errc::out_of_range);
}

TEST(VerbsRegistrationCache, SubRangesReuseTheEnclosingRegistration) {
  vd::verbs_range_map<int> m;
  int made = 0;
  auto make = [&]() -> kvx::result<int> { return ++made; };
  auto a = m.acquire(1000, 100, make);
  ASSERT_TRUE(a);
  auto b = m.acquire(1010, 50, make);  // inside a
  ASSERT_TRUE(b);
  EXPECT_EQ(*a, *b);
  EXPECT_EQ(made, 1);
  auto c = m.acquire(1050, 100, make);  // crosses a's end: a new registration
  ASSERT_TRUE(c);
  EXPECT_EQ(made, 2);
  EXPECT_EQ(m.find_enclosing(1020, 30), *a);
  EXPECT_EQ(m.find_enclosing(1100, 50), *c);
  EXPECT_EQ(m.find_enclosing(990, 20), nullptr);
  EXPECT_EQ(m.find_enclosing(1000, 200), nullptr);
  EXPECT_FALSE(m.release(*b));          // a still referenced
  auto last = m.release(*a);
  ASSERT_TRUE(last);
  EXPECT_EQ(*last, 1);
  EXPECT_EQ(m.find_enclosing(1010, 1), nullptr);
  EXPECT_EQ(m.size(), 1u);
}

TEST(VerbsRegistrationCache, NestedRangesAreFoundBelowASmallerOne) {
  vd::verbs_range_map<int> m;
  auto make1 = []() -> kvx::result<int> { return 1; };
  auto make2 = []() -> kvx::result<int> { return 2; };
  ASSERT_TRUE(m.acquire(5000, 10, make1));
  ASSERT_TRUE(m.acquire(0, 100000, make2));  // registered later, encloses the first
  auto* r = m.find_enclosing(6000, 100);
  ASSERT_NE(r, nullptr);
  EXPECT_EQ(r->value, 2);
  vd::verbs_range_map<int> same_base;
  auto short_one = same_base.acquire(5000, 10, make1);
  auto long_one = same_base.acquire(5000, 20, make2);  // starts where the first does, reaches further
  ASSERT_TRUE(short_one);
  ASSERT_TRUE(long_one);
  EXPECT_EQ(same_base.size(), 2u);
  EXPECT_EQ(same_base.find_enclosing(5010, 10), *long_one);
  EXPECT_EQ(same_base.release(*long_one), 2);
  EXPECT_EQ(same_base.find_enclosing(5000, 10), *short_one);
  auto fail = m.acquire(1 << 20, 8, []() -> kvx::result<int> { return kvx::error{errc::io_error, "pin failed"}; });
  EXPECT_EQ(fail.code(), errc::io_error);
  EXPECT_EQ(m.size(), 2u);
}

TEST(VerbsGid, PrefersRoceV2Ipv4Mapped) {
  auto gid = [](const char* s) { return *vd::verbs_gid_from_string(s); };
  std::vector<vd::verbs_gid_candidate> gids{
      {0, gid("fe80::1"), IBV_GID_TYPE_ROCE_V1},
      {1, gid("fe80::1"), IBV_GID_TYPE_ROCE_V2},
      {2, gid("::ffff:10.0.0.5"), IBV_GID_TYPE_ROCE_V1},
      {3, gid("::ffff:10.0.0.5"), IBV_GID_TYPE_ROCE_V2},
      {4, gid("::"), IBV_GID_TYPE_ROCE_V2},
  };
  EXPECT_EQ(vd::verbs_choose_gid(gids), 3);
  gids.erase(gids.begin() + 3);
  EXPECT_EQ(vd::verbs_choose_gid(gids), 1);
  EXPECT_EQ(vd::verbs_choose_gid({{0, gid("::"), IBV_GID_TYPE_ROCE_V2}}), -1);
  EXPECT_EQ(vd::verbs_choose_gid({{0, gid("fe80::2"), IBV_GID_TYPE_IB}, {1, gid("fe80::3"), IBV_GID_TYPE_IB}}), 0);
}

TEST(VerbsGid, ChoosesFromTheSysfsTableOfAFixtureRocePort) {
  const auto root = std::filesystem::path(KVX_SOURCE_DIR) / "tests/data/topology";
  auto roce = kvx::topology::discover(root / "single_socket");
  ASSERT_TRUE(roce) << roce.error().message();
  const auto& nic = roce->nics.at(0);
  const auto candidates = vd::verbs_gid_candidates(nic);
  ASSERT_EQ(candidates.size(), 4u);
  EXPECT_EQ(candidates[0].type, IBV_GID_TYPE_ROCE_V1);
  EXPECT_EQ(candidates[1].type, IBV_GID_TYPE_ROCE_V2);
  EXPECT_EQ(vd::verbs_gid_to_string(candidates[3].gid), "::ffff:192.168.1.20");
  auto index = verbs::gid_index_for(nic);
  ASSERT_TRUE(index) << index.error().message();
  EXPECT_EQ(*index, 3) << "RoCE v2, IPv4-mapped";
  // The same port before its netdev has an IPv4 address: link-local v2.
  auto no_ipv4 = nic;
  no_ipv4.gids.resize(2);
  EXPECT_EQ(*verbs::gid_index_for(no_ipv4), 1);
  // Without any GID a RoCE port cannot be addressed; an IB port routes by LID.
  auto bare = nic;
  bare.gids.clear();
  auto none = verbs::gid_index_for(bare);
  EXPECT_EQ(none.code(), errc::unreachable);
  EXPECT_NE(none.error().message().find("IP address"), std::string::npos) << none.error().message();
  auto ib = kvx::topology::discover(root / "two_socket_8gpu");
  ASSERT_TRUE(ib);
  EXPECT_EQ(vd::verbs_gid_candidates(ib->nics[0]).at(0).type, IBV_GID_TYPE_IB);
  EXPECT_EQ(*verbs::gid_index_for(ib->nics[0]), 0);
  auto ib_bare = ib->nics[0];
  ib_bare.gids.clear();
  EXPECT_EQ(*verbs::gid_index_for(ib_bare), 0);
  EXPECT_EQ(verbs::gid_index_for(ib->nics.back()).code(), errc::not_found) << "eno1 is not an RDMA device";
  auto garbled = nic;
  garbled.gids[3].gid = "not a gid";
  EXPECT_EQ(vd::verbs_gid_candidates(garbled).size(), 3u);
  EXPECT_EQ(*verbs::gid_index_for(garbled), 1);
}

TEST(VerbsHandshake, AddressLinesRoundTripAndBadLinesAreRefused) {
  vd::verbs_qp_address a{0x1234, 0xabcdef, 7, *vd::verbs_gid_from_string("::ffff:10.0.0.5"), IBV_MTU_4096};
  const auto line = a.to_line();
  ASSERT_EQ(line.back(), '\n');
  auto back = vd::verbs_qp_address::parse(line.substr(0, line.size() - 1));
  ASSERT_TRUE(back) << back.error().message();
  EXPECT_EQ(back->qpn, 0x1234u);
  EXPECT_EQ(back->psn, 0xabcdefu);
  EXPECT_EQ(back->lid, 7);
  EXPECT_EQ(vd::verbs_gid_to_string(back->gid), "::ffff:10.0.0.5");
  EXPECT_EQ(back->mtu, IBV_MTU_4096);
  // A connection runs at the smaller of the two ports' MTUs.
  EXPECT_EQ(vd::verbs_qp_address::path_mtu(IBV_MTU_4096, IBV_MTU_1024), IBV_MTU_1024);
  EXPECT_EQ(vd::verbs_qp_address::path_mtu(IBV_MTU_2048, IBV_MTU_4096), IBV_MTU_2048);
  struct bad_case {
    const char* line;
    const char* says;
  } cases[] = {
      {"", "not a JSON object"},
      {"[1, 2]", "not a JSON object"},
      {R"({"psn": 1, "lid": 0, "gid": "::", "mtu": 3})", "qpn"},
      {R"({"qpn": 1, "lid": 0, "gid": "::", "mtu": 3})", "psn"},
      {R"({"qpn": 1, "psn": 1, "gid": "::", "mtu": 3})", "lid"},
      {R"({"qpn": 1, "psn": 1, "lid": 0, "mtu": 3})", "gid"},
      {R"({"qpn": 1, "psn": 1, "lid": 0, "gid": "::"})", "mtu"},
      {R"({"qpn": 1, "psn": 1, "lid": 70000, "gid": "::", "mtu": 3})", "lid"},
      {R"({"qpn": 16777216, "psn": 1, "lid": 0, "gid": "::", "mtu": 3})", "24 bits"},
      {R"({"qpn": 1, "psn": 16777216, "lid": 0, "gid": "::", "mtu": 3})", "24 bits"},
      {R"({"qpn": 1, "psn": 1, "lid": 0, "gid": "10.0.0.5", "mtu": 3})", "not a GID"},
      {R"({"qpn": 1, "psn": 1, "lid": 0, "gid": "::", "mtu": 0})", "not an ibv_mtu"},
      {R"({"qpn": 1, "psn": 1, "lid": 0, "gid": "::", "mtu": 6})", "not an ibv_mtu"},
      {R"({"qpn": 1, "psn": 1, "lid": 0, "gid": "::", "mtu": "4096"})", "mtu"},
  };
  for (const auto& c : cases) {
    auto r = vd::verbs_qp_address::parse(c.line);
    ASSERT_FALSE(r) << "accepted: " << c.line;
    EXPECT_EQ(r.code(), errc::malformed_message) << c.line << ": " << r.error().message();
    EXPECT_NE(r.error().message().find(c.says), std::string::npos) << c.line << ": " << r.error().message();
  }
}

TEST(VerbsCompletionQueue, EveryActiveQpMayFlushItsWindowAndTheMarker) {
  EXPECT_EQ(vd::verbs_cq_entries_for(0, 128), 0u);
  EXPECT_EQ(vd::verbs_cq_entries_for(1, 128), 129u);
  EXPECT_EQ(vd::verbs_cq_entries_for(508, 128), 65532u) << "508 peers fit the default 65536-entry CQ";
  EXPECT_EQ(vd::verbs_cq_entries_for(509, 128), 65661u) << "the 509th makes the transport grow it";
  EXPECT_EQ(vd::verbs_cq_entries_for(std::size_t{1} << 32, 32768), (std::uint64_t{1} << 32) * 32769) << "no overflow";
}

// ---- send queue: WR batching, selective signaling, completion attribution ----

// An op that records how it ended instead of posting a handler.
struct recorded_op final : vd::verbs_op_base {
  explicit recorded_op(std::uint64_t len, std::vector<std::optional<std::error_code>>* log, std::size_t slot)
      : log_(log), slot_(slot) {
    length = len;
  }
  void finish(std::error_code ec) override {
    auto& entry = (*log_)[slot_];
    EXPECT_FALSE(entry.has_value()) << "op " << slot_ << " finished twice";
    entry = ec;
  }
  std::vector<std::optional<std::error_code>>* log_;
  std::size_t slot_;
};

struct send_queue_fixture {
  explicit send_queue_fixture(std::vector<std::uint64_t> lengths) : ended(lengths.size()) {
    for (std::size_t i = 0; i < lengths.size(); ++i) ops.push_back(std::make_unique<recorded_op>(lengths[i], &ended, i));
  }
  std::vector<std::optional<std::error_code>> ended;
  std::vector<std::unique_ptr<recorded_op>> ops;
};

std::vector<std::uint64_t> seqs_of(const std::vector<vd::verbs_piece>& pieces) {
  std::vector<std::uint64_t> out;
  for (const auto& p : pieces) out.push_back(p.seq);
  return out;
}
std::vector<std::uint64_t> signaled_of(const std::vector<vd::verbs_piece>& pieces) {
  std::vector<std::uint64_t> out;
  for (const auto& p : pieces)
    if (p.signaled) out.push_back(p.seq);
  return out;
}

TEST(VerbsSendQueue, CutsOpsIntoMaxMessagePiecesWithinTheOutstandingBound) {
  send_queue_fixture f({2500, 100, 4000});
  vd::verbs_send_queue q(/*max_outstanding=*/4, /*signal_interval=*/3, /*max_msg=*/1000);
  for (auto& op : f.ops) q.push(op.get());
  auto burst = q.plan_burst();
  // op 0: 1000 + 1000 + 500; op 1: 100; op 2 waits: the window (4) is full.
  ASSERT_EQ(burst.size(), 4u);
  EXPECT_EQ(seqs_of(burst), (std::vector<std::uint64_t>{1, 2, 3, 4}));
  EXPECT_EQ(burst[2].offset, 2000u);
  EXPECT_EQ(burst[2].length, 500u);
  EXPECT_EQ(burst[3].op, f.ops[1].get());
  EXPECT_EQ(signaled_of(burst), (std::vector<std::uint64_t>{3, 4})) << "every 3rd WR and the burst's last";
  EXPECT_EQ(q.outstanding(), 4u);
  EXPECT_TRUE(q.plan_burst().empty()) << "a full window posts nothing";
  EXPECT_EQ(q.inflight().size(), 2u);
  EXPECT_EQ(q.pending().size(), 1u);
  EXPECT_EQ(f.ops[0]->first_seq, 1u);
  EXPECT_EQ(f.ops[0]->last_seq, 3u);

  q.complete(3);  // retires WRs 1..3: op 0 ends, op 1 (WR 4) does not
  EXPECT_EQ(f.ended[0], std::error_code{});
  EXPECT_FALSE(f.ended[1]);
  EXPECT_EQ(q.outstanding(), 1u);
  burst = q.plan_burst();  // three slots free: op 2's first three pieces, the last of them signaled
  EXPECT_EQ(seqs_of(burst), (std::vector<std::uint64_t>{5, 6, 7}));
  EXPECT_EQ(signaled_of(burst), (std::vector<std::uint64_t>{7}));
  EXPECT_EQ(q.pending().size(), 1u) << "op 2 is partly posted";
  q.complete(7);
  EXPECT_EQ(f.ended[1], std::error_code{});
  burst = q.plan_burst();
  ASSERT_EQ(burst.size(), 1u);
  EXPECT_EQ(burst[0].offset, 3000u);
  EXPECT_TRUE(burst[0].signaled);
  q.complete(8);
  EXPECT_EQ(f.ended[2], std::error_code{});
  EXPECT_FALSE(q.busy());
  EXPECT_EQ(q.outstanding(), 0u);
}

TEST(VerbsSendQueue, SignalsEveryIntervalAcrossBursts) {
  std::vector<std::uint64_t> lengths(40, 64);
  send_queue_fixture f(lengths);
  vd::verbs_send_queue q(/*max_outstanding=*/128, /*signal_interval=*/16, /*max_msg=*/1 << 20);
  for (std::size_t i = 0; i < 10; ++i) q.push(f.ops[i].get());
  auto first = q.plan_burst();
  EXPECT_EQ(signaled_of(first), (std::vector<std::uint64_t>{10})) << "the tail of a burst is always signaled";
  for (std::size_t i = 10; i < 40; ++i) q.push(f.ops[i].get());
  auto second = q.plan_burst();  // the count restarts after the signaled tail
  EXPECT_EQ(signaled_of(second), (std::vector<std::uint64_t>{26, 40}));
  q.complete(26);
  for (std::size_t i = 0; i < 26; ++i) EXPECT_EQ(f.ended[i], std::error_code{}) << i;
  for (std::size_t i = 26; i < 40; ++i) EXPECT_FALSE(f.ended[i]) << i;
  // A window smaller than the interval: each burst's tail is what gets signaled, so the window drains.
  send_queue_fixture g(std::vector<std::uint64_t>(8, 64));
  vd::verbs_send_queue small(/*max_outstanding=*/5, /*signal_interval=*/8, /*max_msg=*/64);
  for (auto& op : g.ops) small.push(op.get());
  EXPECT_EQ(signaled_of(small.plan_burst()), (std::vector<std::uint64_t>{5}));
  small.complete(5);
  EXPECT_EQ(signaled_of(small.plan_burst()), (std::vector<std::uint64_t>{8}));
  small.complete(8);
  EXPECT_FALSE(small.busy());
}

TEST(VerbsSendQueue, AnErrorCompletionEndsOpsBeforeItWithSuccessItsOwnWithTheMappedErrorAndLaterOnesByFlush) {
  send_queue_fixture f({100, 100, 100, 100});
  vd::verbs_send_queue q(16, 16, 1000);
  for (auto& op : f.ops) q.push(op.get());
  ASSERT_EQ(q.plan_burst().size(), 4u);
  q.fail(2, IBV_WC_REM_ACCESS_ERR);  // WR 1 completed (RC is in order), WR 2 was refused
  EXPECT_EQ(f.ended[0], std::error_code{});
  EXPECT_EQ(f.ended[1], errc::stale);
  EXPECT_FALSE(f.ended[2]) << "later WRs get their own flush completions";
  q.fail(3, IBV_WC_WR_FLUSH_ERR);
  EXPECT_EQ(f.ended[2], errc::connection_lost);
  q.end_inflight();  // the drain marker: whatever is left
  EXPECT_EQ(f.ended[3], errc::connection_lost);
  EXPECT_FALSE(q.busy());
}

TEST(VerbsSendQueue, APartlyPostedOpHitByAnErrorEndsInsteadOfRetryingForever) {
  send_queue_fixture f({4000, 10});
  vd::verbs_send_queue q(/*max_outstanding=*/2, 1, /*max_msg=*/1000);
  for (auto& op : f.ops) q.push(op.get());
  ASSERT_EQ(q.plan_burst().size(), 2u);  // two of op 0's four pieces
  q.fail(1, IBV_WC_REM_ACCESS_ERR);
  EXPECT_EQ(f.ended[0], errc::stale);
  EXPECT_FALSE(f.ended[1]);
  auto retry = q.take_pending();  // op 1 posted nothing: it moves to the next QP
  ASSERT_EQ(retry.size(), 1u);
  EXPECT_EQ(retry.front(), f.ops[1].get());

  // A flush of a partly posted op (the QP broke under it) retries it from byte 0.
  send_queue_fixture g({4000});
  vd::verbs_send_queue r(2, 1, 1000);
  r.push(g.ops[0].get());
  ASSERT_EQ(r.plan_burst().size(), 2u);
  r.fail(1, IBV_WC_WR_FLUSH_ERR);
  EXPECT_FALSE(g.ended[0]);
  auto again = r.take_pending();
  ASSERT_EQ(again.size(), 1u);
  EXPECT_EQ(again.front()->posted, 0u);
}

TEST(VerbsSendQueue, CancellationEndsUnpostedOpsAndAsksToBreakTheQpForPostedOnes) {
  send_queue_fixture f({100, 100, 100});
  vd::verbs_send_queue q(/*max_outstanding=*/1, 1, 1000);
  for (auto& op : f.ops) q.push(op.get());
  ASSERT_EQ(q.plan_burst().size(), 1u);
  EXPECT_EQ(q.cancel(f.ops[2].get()), vd::verbs_cancel_outcome::ended);
  EXPECT_EQ(f.ended[2], errc::cancelled);
  EXPECT_EQ(q.cancel(f.ops[2].get()), vd::verbs_cancel_outcome::not_found);
  EXPECT_EQ(q.cancel(f.ops[0].get()), vd::verbs_cancel_outcome::break_the_qp);
  EXPECT_FALSE(f.ended[0]) << "its DMA may still run: it ends when the QP is flushed";
  q.fail(1, IBV_WC_WR_FLUSH_ERR);
  EXPECT_EQ(f.ended[0], errc::cancelled);
  EXPECT_EQ(q.take_pending().size(), 1u);
  q.end_all(errc::connection_lost);
  EXPECT_FALSE(f.ended[1]) << "take_pending handed op 1 over";
}

TEST(VerbsTopology, NearestDeviceFollowsTheGpu) {
  kvx::topology::system topo;
  topo.pci = {{"0000:10:00.0", "pci0000:00", {"0000:00:01.0", "0000:01:00.0", "0000:10:00.0"}, 0, 0, 0},
              {"0000:11:00.0", "pci0000:00", {"0000:00:01.0", "0000:01:00.0", "0000:11:00.0"}, 0, 0, 0},
              {"0000:80:00.0", "pci0000:80", {"0000:80:00.0"}, 0, 0, 1}};
  topo.nics = {{"mlx5_far", true, {}, "0000:80:00.0", 1, 200, "Ethernet", {}},
               {"mlx5_near", true, {}, "0000:11:00.0", 0, 200, "Ethernet", {}}};
  topo.gpus = {{0, "0000:10:00.0", 0}};
  topo.numa_nodes = {{0, {0}}, {1, {1}}};
  auto n = verbs::nearest_device({reinterpret_cast<void*>(0x1000), 64, kvx::memory::location::cuda(0)}, topo);
  ASSERT_TRUE(n) << n.error().message();
  EXPECT_EQ(*n, "mlx5_near");
  kvx::topology::system empty;
  EXPECT_EQ(verbs::nearest_device({nullptr, 0, kvx::memory::location::host()}, empty).code(), errc::not_found);
}

TEST(Verbs, SatisfiesTheTransportConcept) {
  static_assert(kvx::transport::check_transport<verbs>());
  static_assert(verbs::name() == "verbs");
  static_assert(kvx::transport::has(verbs::capabilities.memory, kvx::transport::memory_kinds::cuda));
}

TEST(Verbs, OneVerbsPerNicBehindMultiRailIsATransport) {
  using rails = kvx::transport::multi_rail<verbs, kvx::topology::rail::nearest>;
  static_assert(kvx::transport::check_transport<rails>());
  // Compiled, not run (it needs NICs): the data path of verbs rails instantiates.
  [[maybe_unused]] auto read_through = [](rails& r, const kvx::memory::segment_descriptor& d, std::span<std::byte> dst) {
    r.async_read(d, 0, dst, [](std::error_code) {});
    r.async_write(d, 0, std::span<const std::byte>(dst), [](std::error_code) {});
  };
  SUCCEED();
}

TEST(Verbs, CreateWithoutADeviceSaysWhatIsMissing) {
  boost::asio::io_context io;
  verbs_options o;
  o.device = "kvx-no-such-rdma-device";
  auto t = verbs::create(io.get_executor(), o);
  ASSERT_FALSE(t);
  const auto msg = t.error().message();
  if (verbs::devices().empty())
    EXPECT_NE(msg.find("no RDMA device"), std::string::npos) << msg;
  else
    EXPECT_NE(msg.find("kvx-no-such-rdma-device"), std::string::npos) << msg;
}

// ---- device-gated ----------------------------------------------------------

struct verbs_pair {
  explicit verbs_pair(boost::asio::io_context& io, bool busy_poll = false, std::uint32_t max_outstanding = 16) {
    verbs_options o;
    o.busy_poll = busy_poll;
    o.max_outstanding = max_outstanding;
    o.signal_interval = std::min<std::uint32_t>(4, max_outstanding);
    owner.emplace(io.get_executor(), o);
    initiator.emplace(io.get_executor(), o);
  }
  std::optional<verbs> owner;
  std::optional<verbs> initiator;
};

#define KVX_NEED_RDMA_DEVICE()                        \
  do {                                                \
    if (auto why = missing_device(); !why.empty()) GTEST_SKIP() << why; \
  } while (0)

using kvx::test::run_until;

TEST(VerbsDevice, ManyOutstandingOpsQueueAndCompleteByteExact) {
  KVX_NEED_RDMA_DEVICE();
  boost::asio::io_context io;
  verbs_pair p(io);
  std::vector<std::byte> remote(1 << 20), local(1 << 20);
  for (std::size_t i = 0; i < remote.size(); ++i) remote[i] = static_cast<std::byte>(i * 7 + 1);
  kvx::memory::local_segment rs{"verbs-remote", {remote.data(), remote.size()}, 5, 1};
  kvx::memory::local_segment ls{"verbs-local", {local.data(), local.size()}, 6, 1};
  auto entry = p.owner->register_memory(rs);
  ASSERT_TRUE(entry) << entry.error().message();
  ASSERT_TRUE(p.initiator->register_memory(ls));
  kvx::memory::segment_descriptor d{"verbs-remote", "n", remote.size(), kvx::memory::location::host(), 5, 1, "", {}};
  d.transports["verbs"] = *entry;
  // Sub-ranges reuse the enclosing registration.
  kvx::memory::local_segment sub{"verbs-sub", {local.data() + 4096, 4096}, 7, 1};
  ASSERT_TRUE(p.initiator->register_memory(sub));
  EXPECT_EQ(p.initiator->cached_registrations(), 1u);
  int done = 0;
  constexpr int n = 256;  // far more than max_outstanding (16)
  for (int i = 0; i < n; ++i) {
    const std::size_t chunk = remote.size() / n;
    p.initiator->async_read(d, i * chunk, std::span(local).subspan(i * chunk, chunk), [&](std::error_code ec) {
      EXPECT_FALSE(ec) << ec.message();
      ++done;
    });
  }
  ASSERT_TRUE(run_until(io, [&] { return done == n; }));
  EXPECT_EQ(std::memcmp(local.data(), remote.data(), remote.size()), 0);
  std::optional<std::error_code> w;
  local[3] = std::byte{0x5a};
  p.initiator->async_write(d, 100, std::span<const std::byte>(local).first(10), [&](std::error_code ec) { w = ec; });
  ASSERT_TRUE(run_until(io, [&] { return w.has_value(); }));
  EXPECT_FALSE(*w);
  EXPECT_EQ(remote[103], std::byte{0x5a});
}

TEST(VerbsDevice, WrongRkeyEndsWithAnErrorAndTheNextOpReconnects) {
  KVX_NEED_RDMA_DEVICE();
  boost::asio::io_context io;
  verbs_pair p(io);
  std::vector<std::byte> remote(4096, std::byte{1}), local(4096);
  kvx::memory::local_segment rs{"verbs-remote-2", {remote.data(), remote.size()}, 5, 1};
  kvx::memory::local_segment ls{"verbs-local-2", {local.data(), local.size()}, 6, 1};
  auto entry = p.owner->register_memory(rs);
  ASSERT_TRUE(entry);
  ASSERT_TRUE(p.initiator->register_memory(ls));
  kvx::memory::segment_descriptor d{"verbs-remote-2", "n", remote.size(), kvx::memory::location::host(), 5, 1, "", {}};
  d.transports["verbs"] = *entry;
  auto broken = d;
  broken.transports["verbs"]["rkey"] = (*entry)["rkey"].get<std::uint32_t>() ^ 0x5500u;
  std::optional<std::error_code> r;
  p.initiator->async_read(broken, 0, std::span(local).first(64), [&](std::error_code ec) { r = ec; });
  ASSERT_TRUE(run_until(io, [&] { return r.has_value(); }));
  EXPECT_EQ(*r, errc::stale) << r->message();
  r.reset();
  p.initiator->async_read(d, 0, std::span(local).first(64), [&](std::error_code ec) { r = ec; });
  ASSERT_TRUE(run_until(io, [&] { return r.has_value(); }));
  EXPECT_FALSE(*r) << r->message();
  EXPECT_EQ(local[0], std::byte{1});
}

// Busy polling instead of the completion channel, with a one-WR window: ops
// larger than the port's max message (8 MiB on rxe) are posted piece by piece
// across bursts.
TEST(VerbsDevice, BusyPollingWithAOneWrWindowMovesLargeOpsInPieces) {
  KVX_NEED_RDMA_DEVICE();
  boost::asio::io_context io;
  verbs_pair p(io, /*busy_poll=*/true, /*max_outstanding=*/1);
  std::vector<std::byte> remote(24u << 20), local(24u << 20);
  for (std::size_t i = 0; i < remote.size(); ++i) remote[i] = static_cast<std::byte>(i * 13 + 5);
  kvx::memory::local_segment rs{"verbs-remote-busy", {remote.data(), remote.size()}, 5, 1};
  kvx::memory::local_segment ls{"verbs-local-busy", {local.data(), local.size()}, 6, 1};
  auto entry = p.owner->register_memory(rs);
  ASSERT_TRUE(entry) << entry.error().message();
  ASSERT_TRUE(p.initiator->register_memory(ls));
  kvx::memory::segment_descriptor d{"verbs-remote-busy", "n", remote.size(), kvx::memory::location::host(), 5, 1, "", {}};
  d.transports["verbs"] = *entry;
  int done = 0;
  for (int i = 0; i < 2; ++i) {
    const std::size_t half = remote.size() / 2;
    p.initiator->async_read(d, i * half, std::span(local).subspan(i * half, half), [&](std::error_code ec) {
      EXPECT_FALSE(ec) << ec.message();
      ++done;
    });
  }
  ASSERT_TRUE(run_until(io, [&] { return done == 2; }));
  EXPECT_EQ(std::memcmp(local.data(), remote.data(), remote.size()), 0);
}

// An owner endpoint that accepts and never answers the handshake: the op ends
// with timed_out after handshake_timeout_ms instead of waiting forever.
TEST(VerbsDevice, ASilentPeerTimesTheHandshakeOut) {
  KVX_NEED_RDMA_DEVICE();
  boost::asio::io_context io;
  boost::asio::ip::tcp::acceptor silent(io, {boost::asio::ip::make_address("127.0.0.1"), 0});
  boost::asio::ip::tcp::socket held(io);
  silent.async_accept(held, [](boost::system::error_code) {});  // accepted, never read nor written
  verbs_options o;
  o.handshake_timeout_ms = 200;
  verbs initiator(io.get_executor(), o);
  std::vector<std::byte> local(4096);
  kvx::memory::local_segment ls{"verbs-local-silent", {local.data(), local.size()}, 6, 1};
  ASSERT_TRUE(initiator.register_memory(ls));
  auto d = described(4096);
  d.transports["verbs"]["qp_endpoint"] = "127.0.0.1:" + std::to_string(silent.local_endpoint().port());
  std::optional<std::error_code> r;
  const auto t0 = std::chrono::steady_clock::now();
  initiator.async_read(d, 0, std::span(local).first(64), [&](std::error_code ec) { r = ec; });
  ASSERT_TRUE(run_until(io, [&] { return r.has_value(); }));
  EXPECT_EQ(*r, errc::timed_out) << r->message();
  EXPECT_GE(std::chrono::steady_clock::now() - t0, std::chrono::milliseconds(150));
}

// The conformance suite, gated on the same check: the env skips from the
// fixture's constructor (GoogleTest does not run a test whose constructor skipped).
struct verbs_env {
  using transport_type = verbs;
  static constexpr std::uint64_t large_transfer_bytes = 64u << 20;
  explicit verbs_env(boost::asio::io_context& io) {
    if (auto why = missing_device(); !why.empty()) {
      skip(why);
      return;
    }
    owner_.emplace(io.get_executor());
    initiator_.emplace(io.get_executor());
  }
  // GTEST_SKIP() expands to a return statement: it cannot sit in a constructor itself.
  static void skip(const std::string& why) { GTEST_SKIP() << why; }
  transport_type& owner() { return *owner_; }
  transport_type& initiator() { return *initiator_; }
  std::optional<verbs> owner_;
  std::optional<verbs> initiator_;
};

}  // namespace

KVX_TRANSPORT_CONFORMANCE(Verbs, verbs_env);
