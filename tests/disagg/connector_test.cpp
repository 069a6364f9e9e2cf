#include <kvx/disagg/connector.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <future>
#include <limits>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>

#include <kvx/cache/eviction/lru.hpp>
#include <kvx/disagg/layouts/layer_first.hpp>
#include <kvx/disagg/layouts/layer_first_kv_split.hpp>
#include <kvx/disagg/layouts/page_first.hpp>
#include <kvx/disagg/router.hpp>
#include <kvx/memory/mapped_arena.hpp>
#include <kvx/store/store_client.hpp>  // before master_server.hpp, which uses asio::as_tuple without including it
#include <kvx/store/master_server.hpp>
#include <kvx/store/store_node.hpp>
#include <kvx/testing/test_transports.hpp>
#include <kvx/transfer/embedded_metadata.hpp>
#include <kvx/transfer/transfer_engine.hpp>
#include <kvx/transport/local.hpp>

#include <tiny/worker.hpp>

namespace {

namespace asio = boost::asio;
namespace kd = kvx::disagg;
using namespace std::chrono_literals;

using local_engine = kvx::transfer::transfer_engine<kvx::transfer::embedded_metadata, kvx::transport::local>;
using impulse_transport = kvx::testing::impulse<kvx::transport::local>;
using impulse_engine = kvx::transfer::transfer_engine<kvx::transfer::embedded_metadata, impulse_transport>;
using state_type = kvx::store::master_state<kvx::cache::eviction::lru>;
template <class E>
using pull_mode = kd::transfer_mode::pull<kvx::store::store_client<E>>;

// One party per instance: its own transport and transfer engine, sharing the
// in-process metadata backend, as separate machines would share etcd.
template <class Transport>
struct party {
  Transport transport;
  kvx::transfer::transfer_engine<kvx::transfer::embedded_metadata, Transport> engine;
  party(asio::io_context& io, kvx::transfer::embedded_metadata& meta, const std::string& name)
      : transport(io.get_executor()), engine(meta, {.node = name}, transport) {}
};

tiny::model_config model(std::uint32_t tp = 1, std::uint32_t block_tokens = 16) {
  return {.layers = 3, .kv_heads = 4, .head_dim = 16, .block_tokens = block_tokens, .vocab = 256, .tp = tp, .seed = 7};
}

std::vector<std::uint32_t> prompt(std::size_t n, std::uint32_t seed) {
  std::vector<std::uint32_t> p(n);
  for (std::size_t i = 0; i < n; ++i) p[i] = static_cast<std::uint32_t>((i * 7919U + seed * 104729U + 13U) % 256U);
  return p;
}

// The colocated run: one TP=1 instance does everything.
std::vector<std::uint32_t> reference(const std::vector<std::uint32_t>& p, std::uint32_t n) {
  auto cfg = model();
  auto l = kd::layouts::layer_first::make(cfg.shard_shape(), 64).value();
  std::vector<std::byte> mem(l.bytes_required());
  auto eng = tiny::engine<kd::layouts::layer_first>::make(cfg, l, mem).value();
  std::vector<std::uint32_t> table(64);
  for (std::uint32_t i = 0; i < 64; ++i) table[i] = 63 - i;
  return eng.generate(p, n, {table}).value();
}

struct Cluster : ::testing::Test {
  asio::io_context io;
  kvx::transfer::embedded_metadata meta{io.get_executor()};
  kvx::metrics::registry registry;
  state_type state{kvx::store::master_config{}, {}, registry};
  kvx::store::master_server<state_type> server{io.get_executor(), state, {.address = "127.0.0.1", .port = 0, .tick_interval = 50ms}};
  std::shared_ptr<kd::push_link> link = std::make_shared<kd::push_link>();
  std::vector<std::unique_ptr<party<kvx::transport::local>>> parties;
  std::vector<std::unique_ptr<party<impulse_transport>>> impulse_parties;
  std::vector<kvx::memory::mapped_arena> arenas;
  std::vector<std::unique_ptr<kvx::store::store_node<local_engine>>> nodes;
  std::vector<std::unique_ptr<kvx::store::store_client<local_engine>>> clients;
  std::vector<std::unique_ptr<kvx::store::store_client<impulse_engine>>> impulse_clients;
  std::optional<asio::executor_work_guard<asio::io_context::executor_type>> work;
  std::thread runner;

  void SetUp() override {
    ASSERT_TRUE(server.start());
    work.emplace(io.get_executor());
    runner = std::thread([this] { io.run(); });
  }
  // Subclasses destroy their workers first (connectors deregister through the running executor).
  void stop_io() {
    for (auto& n : nodes) n->stop();
    asio::post(io, [this] { server.stop(); });
    work.reset();
    std::this_thread::sleep_for(20ms);
    io.stop();
    if (runner.joinable()) runner.join();
  }
  void TearDown() override { stop_io(); }

  local_engine& add_local(const std::string& name) {
    return parties.emplace_back(std::make_unique<party<kvx::transport::local>>(io, meta, name))->engine;
  }
  party<impulse_transport>& add_impulse(const std::string& name) {
    return *impulse_parties.emplace_back(std::make_unique<party<impulse_transport>>(io, meta, name));
  }

  template <class F>
  std::error_code on_io(F f) {
    auto p = std::make_shared<std::promise<std::error_code>>();
    auto fut = p->get_future();
    asio::post(io, [f, p]() mutable { f([p](std::error_code ec, auto&&...) { p->set_value(ec); }); });
    if (fut.wait_for(10s) != std::future_status::ready) return kvx::errc::timed_out;
    return fut.get();
  }

  // Pool nodes keep their segment registered in the process-wide local table: a fresh name per test.
  void add_pool_node(const std::string& base) {
    static std::atomic<int> serial{0};
    const std::string name = base + "-" + std::to_string(serial++);
    auto& e = add_local(name);
    arenas.push_back(std::move(*kvx::memory::mapped_arena::create(8 << 20)));
    auto& node = *nodes.emplace_back(std::make_unique<kvx::store::store_node<local_engine>>(
        e, kvx::store::master_client::create(io.get_executor(), server.endpoint()),
        kvx::store::node_options{.name = name, .segment = "", .tier = "dram", .heartbeat = 100ms}));
    auto region = arenas.back().region();
    ASSERT_FALSE(on_io([&node, region](auto cb) { node.async_start(region, cb); }));
  }
  template <class E>
  kvx::store::store_client<E>* client_for(E& e, const std::string& name) {
    auto c = std::make_unique<kvx::store::store_client<E>>(
        e, kvx::store::master_client::create(io.get_executor(), server.endpoint()),
        kvx::store::client_options{.node = name, .replicas = 1, .lease = 2000ms});
    auto* p = c.get();
    if constexpr (std::is_same_v<E, local_engine>)
      clients.push_back(std::move(c));
    else
      impulse_clients.push_back(std::move(c));
    return p;
  }
};

struct ConnectorTest : Cluster {
  // Workers of every kind a test uses; destroyed before the executor stops.
  std::vector<std::shared_ptr<void>> workers;
  void TearDown() override {
    workers.clear();
    stop_io();
  }
  template <class W>
  W* keep(std::unique_ptr<W> w) {
    auto* p = w.get();
    workers.push_back(std::shared_ptr<W>(std::move(w)));
    return p;
  }
  template <class Layout, class Load = kd::load::wait_until>
  auto* push_worker(tiny::worker_config cfg, Load load = Load{2s}) {
    auto& e = add_local(cfg.name);
    return keep(tiny::worker<Layout, local_engine, kd::transfer_mode::push, Load>::make(e, cfg, {link}, load).value());
  }
  template <class Layout, class Load = kd::load::best_effort>
  auto* pull_worker(tiny::worker_config cfg, Load load = Load{2s}) {
    auto& e = add_local(cfg.name);
    pull_mode<local_engine> mode{client_for(e, cfg.name), "t", "tiny"};
    return keep(tiny::worker<Layout, local_engine, pull_mode<local_engine>, Load>::make(e, cfg, mode, load).value());
  }
};

using kd::connector_role;

// ---- token identity, colocated vs disaggregated ---------------------------------

TEST_F(ConnectorTest, PushFromLayerFirstIntoPageFirstIsTokenIdenticalToColocated) {
  auto* p = push_worker<kd::layouts::layer_first>({.name = "p0", .role = connector_role::producer, .model = model(), .num_blocks = 32});
  auto* d = push_worker<kd::layouts::page_first>({.name = "d0", .role = connector_role::consumer, .model = model(), .num_blocks = 32});
  EXPECT_TRUE(d->connector().loads_in_place());
  const auto tokens = prompt(75, 1);
  const kd::kv_request req{1, tokens};
  auto ticket = d->admit(req, 6).value();
  EXPECT_EQ(ticket.external_tokens, 74u);
  auto pre = p->run_prefill(req);
  ASSERT_TRUE(pre) << pre.error().message();
  EXPECT_EQ(pre->saved.layers, 3u);
  auto out = d->run_decode(req, ticket, 6);
  ASSERT_TRUE(out) << out.error().message();
  EXPECT_EQ(out->tokens, reference(tokens, 6));
  EXPECT_EQ(out->tokens.front(), pre->first_token);
  EXPECT_TRUE(out->load.complete());
  EXPECT_EQ(p->connector().stats().bytes_saved, d->connector().stats().bytes_loaded);
  EXPECT_EQ(p->connector().stats().bytes_saved, 3u * 5u * model().shard_shape().block_layer_bytes());
  EXPECT_EQ(d->connector().known_requests(), 0u);
  EXPECT_EQ(link->waiting(), 0u);
}

TEST_F(ConnectorTest, PushFromTp2IntoTp1WithLargerBlocksConvertsAndIsTokenIdentical) {
  auto* p = push_worker<kd::layouts::layer_first>({.name = "p-tp2", .role = connector_role::producer, .model = model(2, 16), .num_blocks = 32});
  auto* d = push_worker<kd::layouts::page_first>({.name = "d-tp1",
                                                  .role = connector_role::consumer,
                                                  .model = model(1, 32),
                                                  .num_blocks = 32,
                                                  .source_tp = 2,
                                                  .source_block_tokens = 16,
                                                  .staging_blocks = 32});
  EXPECT_FALSE(d->connector().loads_in_place());
  const auto tokens = prompt(90, 2);
  const kd::kv_request req{2, tokens};
  auto ticket = d->admit(req, 5).value();
  ASSERT_TRUE(p->run_prefill(req));
  auto out = d->run_decode(req, ticket, 5);
  ASSERT_TRUE(out) << out.error().message();
  EXPECT_EQ(out->tokens, reference(tokens, 5));
  EXPECT_EQ(d->connector().stats().layers_converted, 3u);
}

TEST_F(ConnectorTest, PushIntoKvSplitLayoutPairsSplitRangesAndIsTokenIdentical) {
  auto* p = push_worker<kd::layouts::page_first>({.name = "p-pf", .role = connector_role::producer, .model = model(), .num_blocks = 16});
  auto* d = push_worker<kd::layouts::layer_first_kv_split>({.name = "d-kv", .role = connector_role::consumer, .model = model(), .num_blocks = 16});
  const auto tokens = prompt(40, 3);
  const kd::kv_request req{3, tokens};
  auto ticket = d->admit(req, 4).value();
  ASSERT_TRUE(p->run_prefill(req));
  auto out = d->run_decode(req, ticket, 4);
  ASSERT_TRUE(out) << out.error().message();
  EXPECT_EQ(out->tokens, reference(tokens, 4));
}

TEST_F(ConnectorTest, PullThroughThePoolIsTokenIdenticalAndTheNextTurnHitsThePool) {
  add_pool_node("node-0");
  auto* p = pull_worker<kd::layouts::layer_first>({.name = "pp", .role = connector_role::both, .model = model(), .num_blocks = 32});
  auto* d = pull_worker<kd::layouts::page_first>({.name = "pd", .role = connector_role::consumer, .model = model(), .num_blocks = 32});
  const auto turn1 = prompt(70, 4);
  const kd::kv_request r1{10, turn1};
  auto pre1 = p->run_prefill(r1);
  ASSERT_TRUE(pre1) << pre1.error().message();
  EXPECT_EQ(pre1->cached_tokens, 0u);
  auto t1 = d->admit(r1, 5).value();
  EXPECT_EQ(t1.external_tokens, 64u) << "four full blocks are in the pool; the partial one is recomputed";
  auto out1 = d->run_decode(r1, t1, 5);
  ASSERT_TRUE(out1) << out1.error().message();
  EXPECT_EQ(out1->tokens, reference(turn1, 5));

  // Turn 2 extends turn 1: the prefill instance loads the shared prefix.
  auto turn2 = turn1;
  turn2.insert(turn2.end(), out1->tokens.begin(), out1->tokens.end());
  for (auto t : prompt(30, 5)) turn2.push_back(t);
  const kd::kv_request r2{11, turn2};
  auto pre2 = p->run_prefill(r2);
  ASSERT_TRUE(pre2) << pre2.error().message();
  EXPECT_EQ(pre2->cached_tokens, 64u);
  auto t2 = d->admit(r2, 4).value();
  EXPECT_EQ(t2.external_tokens, 96u);
  auto out2 = d->run_decode(r2, t2, 4);
  ASSERT_TRUE(out2) << out2.error().message();
  EXPECT_EQ(out2->tokens, reference(turn2, 4));
  EXPECT_GT(d->connector().stats().objects_got, 0u);
}

TEST_F(ConnectorTest, PullFromTp2IntoTp1PageFirstIsTokenIdentical) {
  add_pool_node("node-0");
  auto* p = pull_worker<kd::layouts::page_first>({.name = "pp2", .role = connector_role::producer, .model = model(2, 16), .num_blocks = 32});
  auto* d = pull_worker<kd::layouts::layer_first>(
      {.name = "pd1", .role = connector_role::consumer, .model = model(1, 32), .num_blocks = 32, .source_tp = 2, .source_block_tokens = 16, .staging_blocks = 32});
  const auto tokens = prompt(100, 6);
  const kd::kv_request req{20, tokens};
  ASSERT_TRUE(p->run_prefill(req));
  auto t = d->admit(req, 5).value();
  EXPECT_EQ(t.external_tokens, 96u);
  auto out = d->run_decode(req, t, 5);
  ASSERT_TRUE(out) << out.error().message();
  EXPECT_EQ(out->tokens, reference(tokens, 5));
  EXPECT_EQ(d->connector().stats().objects_got, 6u * 3u * 2u);
}

// ---- the state machine against misuse --------------------------------------------

TEST_F(ConnectorTest, MisuseGetsClearErrors) {
  auto* p = push_worker<kd::layouts::layer_first>({.name = "mp", .role = connector_role::producer, .model = model(), .num_blocks = 16});
  auto* d = push_worker<kd::layouts::layer_first>({.name = "md", .role = connector_role::consumer, .model = model(), .num_blocks = 16});
  auto& pc = p->connector();
  auto& dc = d->connector();
  const auto tokens = prompt(40, 7);
  const kd::kv_request req{5, tokens};

  EXPECT_EQ(dc.start_load_kv(99).code(), kvx::errc::not_found);
  EXPECT_NE(dc.start_load_kv(99).error().message().find("request 99 is unknown"), std::string::npos);
  EXPECT_EQ(dc.wait_for_layer_load(99, 0).code(), kvx::errc::not_found);
  EXPECT_EQ(pc.save_kv_layer(99, 0).code(), kvx::errc::not_found);
  EXPECT_EQ(pc.wait_for_save(99).code(), kvx::errc::not_found);
  EXPECT_EQ(dc.request_finished(99).code(), kvx::errc::not_found);

  // A push producer needs the decode side's target first.
  std::vector<std::uint32_t> pblocks{0, 1, 2};
  EXPECT_EQ(pc.update_state_after_alloc(req, pblocks, 0).code(), kvx::errc::not_found);

  std::vector<std::uint32_t> dblocks{3, 4, 5, 6};
  EXPECT_EQ(dc.update_state_after_alloc(req, std::span(dblocks).first(2), 39).code(), kvx::errc::out_of_range) << "short table";
  std::vector<std::uint32_t> bad{0, 1, 99};
  EXPECT_EQ(dc.update_state_after_alloc(req, bad, 39).code(), kvx::errc::out_of_range) << "block past the pool";
  EXPECT_EQ(dc.update_state_after_alloc(req, dblocks, 40).code(), kvx::errc::invalid_argument) << "nothing left to compute";
  ASSERT_TRUE(dc.update_state_after_alloc(req, dblocks, 39));
  EXPECT_EQ(dc.update_state_after_alloc(req, dblocks, 39).code(), kvx::errc::already_exists);

  EXPECT_EQ(dc.wait_for_layer_load(5, 0).code(), kvx::errc::invalid_argument) << "wait without start";
  ASSERT_TRUE(dc.start_load_kv(5));
  EXPECT_EQ(dc.start_load_kv(5).code(), kvx::errc::invalid_argument) << "double start";
  EXPECT_EQ(dc.wait_for_layer_load(5, 3).code(), kvx::errc::out_of_range);
  EXPECT_EQ(dc.save_kv_layer(5, 0).code(), kvx::errc::not_supported) << "a consumer saves nothing";

  ASSERT_TRUE(pc.update_state_after_alloc(req, pblocks, 0));
  EXPECT_EQ(pc.wait_for_save(5).code(), kvx::errc::invalid_argument) << "wait_for_save without a save";
  ASSERT_TRUE(pc.save_kv_layer(5, 0));
  EXPECT_EQ(pc.save_kv_layer(5, 0).code(), kvx::errc::already_exists) << "double save";
  EXPECT_EQ(pc.save_kv_layer(5, 7).code(), kvx::errc::out_of_range);
  ASSERT_TRUE(pc.save_kv_layer(5, 1));
  ASSERT_TRUE(pc.save_kv_layer(5, 2));
  ASSERT_TRUE(pc.wait_for_save(5));
  EXPECT_TRUE(dc.wait_for_layer_load(5, 2)) << "every layer was pushed";
  EXPECT_TRUE(pc.request_finished(5));
  EXPECT_TRUE(dc.request_finished(5));
  EXPECT_EQ(dc.wait_for_layer_load(5, 0).code(), kvx::errc::not_found) << "finished requests are forgotten";
}

TEST_F(ConnectorTest, PushModeRefusesAnInstanceThatIsBothAndShapesThatNeedStaging) {
  auto& e = add_local("bad");
  auto cfg = model();
  auto l = kd::layouts::layer_first::make(cfg.shard_shape(), 4).value();
  std::vector<std::byte> mem(l.bytes_required());
  using conn = kd::kv_connector<kd::layouts::layer_first, local_engine, kd::transfer_mode::push>;
  auto both = conn::make(e, {.name = "bad", .role = connector_role::both}, {{l, mem}}, {link});
  EXPECT_EQ(both.code(), kvx::errc::invalid_argument);
  auto no_stage = conn::make(e, {.name = "bad", .role = connector_role::consumer, .source_tp = 2}, {{l, mem}}, {link});
  EXPECT_EQ(no_stage.code(), kvx::errc::invalid_argument);
  EXPECT_NE(no_stage.error().message().find("staging_blocks"), std::string::npos);
  auto no_link = conn::make(e, {.name = "bad", .role = connector_role::consumer}, {{l, mem}}, {});
  EXPECT_EQ(no_link.code(), kvx::errc::invalid_argument);
}

// ---- failures -----------------------------------------------------------------

TEST_F(ConnectorTest, PrefillDyingMidStreamFailsTheDecodeWithinItsDeadlineAndTheRouterRetriesElsewhere) {
  // prefill-0's transport holds every write until the test releases it: it
  // delivers layer 0, then dies. prefill-1 is healthy.
  auto& dying = add_impulse("prefill-0");
  using dying_worker = tiny::worker<kd::layouts::layer_first, impulse_engine, kd::transfer_mode::push, kd::load::wait_until>;
  auto* p0 = keep(dying_worker::make(dying.engine, {.name = "prefill-0", .role = connector_role::producer, .model = model(), .num_blocks = 16, .save_timeout = 20s},
                                     {link}, {}).value());
  auto* p1 = push_worker<kd::layouts::layer_first>({.name = "prefill-1", .role = connector_role::producer, .model = model(), .num_blocks = 16});
  auto* d = push_worker<kd::layouts::layer_first>({.name = "decode-0", .role = connector_role::consumer, .model = model(), .num_blocks = 32},
                                                  kd::load::wait_until{300ms});
  kd::router<kd::routing::round_robin> router;
  const auto id0 = router.add_instance({.name = "prefill-0", .role = kd::instance_role::prefill}).value();
  const auto id1 = router.add_instance({.name = "prefill-1", .role = kd::instance_role::prefill}).value();
  (void)router.add_instance({.name = "decode-0", .role = kd::instance_role::decode}).value();
  const kd::instance_id first_pick = router.route({.prompt_tokens = 50, .block_tokens = 16}).prefill;
  ASSERT_EQ(first_pick, id0);

  const auto tokens = prompt(50, 8);
  const kd::kv_request req{42, tokens};
  auto ticket = d->admit(req, 4).value();
  std::thread prefill0([&] { (void)p0->run_prefill(req); });
  // Layer 0's writes leave, then the instance goes silent.
  while (dying.transport.pending() == 0) std::this_thread::sleep_for(1ms);
  // The impulse transport is driven on the executor's thread, as a transport's progress would be.
  std::promise<std::size_t> released;
  asio::post(io, [&] { released.set_value(dying.transport.release_all()); });
  EXPECT_GT(released.get_future().get(), 0u);
  auto failed = d->run_decode(req, ticket, 4);
  ASSERT_FALSE(failed);
  EXPECT_EQ(failed.code(), kvx::errc::timed_out);
  EXPECT_NE(failed.error().message().find("did not deliver layer"), std::string::npos) << failed.error().message();
  ASSERT_TRUE(d->abort(ticket, /*quarantine=*/true));

  // The router learns that prefill-0 is gone and picks prefill-1.
  ASSERT_TRUE(router.set_up(id0, false));
  auto retry = router.route({.prompt_tokens = 50, .block_tokens = 16});
  ASSERT_TRUE(retry.accepted());
  EXPECT_EQ(retry.prefill, id1);
  auto ticket2 = d->admit(req, 4).value();
  ASSERT_TRUE(p1->run_prefill(req));
  auto out = d->run_decode(req, ticket2, 4);
  ASSERT_TRUE(out) << out.error().message();
  EXPECT_EQ(out->tokens, reference(tokens, 4));

  // Let the dead instance's stuck writes fail so its thread ends; the decode
  // side ignores what comes from the old attempt.
  std::atomic<bool> done{false};
  std::thread failer([&] {
    while (!done) {
      asio::post(io, [&dying] { dying.transport.fail_all(kvx::errc::connection_lost); });
      std::this_thread::sleep_for(1ms);
    }
  });
  prefill0.join();
  done = true;
  failer.join();
}

TEST_F(ConnectorTest, APushThatFailsIsAnErrorOnTheDecodeSide) {
  // The prefill's writes fail (the target names a segment that does not exist): its notices carry the error.
  auto* d = push_worker<kd::layouts::layer_first>({.name = "fd", .role = connector_role::consumer, .model = model(), .num_blocks = 16});
  const auto tokens = prompt(40, 9);
  const kd::kv_request req{50, tokens};
  auto ticket = d->admit(req, 3).value();
  auto target = link->take(50).value();
  auto forged = std::make_shared<kd::push_target>(*target);
  forged->segments = {"no-such-segment"};
  ASSERT_TRUE(link->publish(forged));
  auto* p = push_worker<kd::layouts::layer_first>({.name = "fp", .role = connector_role::producer, .model = model(), .num_blocks = 16});
  auto pre = p->run_prefill(req);
  ASSERT_FALSE(pre);
  EXPECT_EQ(pre.code(), kvx::errc::unknown_segment);
  auto out = d->run_decode(req, ticket, 3);
  ASSERT_FALSE(out);
  EXPECT_EQ(out.code(), kvx::errc::unknown_segment);
  EXPECT_NE(out.error().message().find("layer 0"), std::string::npos) << out.error().message();
}

TEST_F(ConnectorTest, APushTargetOfARestartedDecodeInstanceIsRefusedNotWrittenIntoTheNewOne) {
  // The decode instance restarts under its name (same segment names, new
  // registrations) and admits another request into the same blocks; a
  // prefill still holding the old instance's target must not write there.
  using push_decode = tiny::worker<kd::layouts::layer_first, local_engine, kd::transfer_mode::push, kd::load::wait_until>;
  const tiny::worker_config cfg{.name = "xd", .role = connector_role::consumer, .model = model(), .num_blocks = 16};
  auto& e = add_local("xd");
  auto first = push_decode::make(e, cfg, {link}, kd::load::wait_until{2s}).value();
  const auto tokens_a = prompt(40, 21);
  const auto tokens_b = prompt(40, 22);
  const kd::kv_request a{70, tokens_a};
  const kd::kv_request b{71, tokens_b};
  ASSERT_TRUE(first->admit(a, 3));
  auto stale_target = link->take(a.id).value();
  first.reset();  // the instance goes away; its segments are withdrawn
  auto* second = keep(push_decode::make(e, cfg, {link}, kd::load::wait_until{2s}).value());
  auto tb = second->admit(b, 3).value();
  auto* p1 = push_worker<kd::layouts::layer_first>({.name = "xp1", .role = connector_role::producer, .model = model(), .num_blocks = 16});
  ASSERT_TRUE(p1->run_prefill(b));

  ASSERT_TRUE(link->publish(stale_target));
  auto* p0 = push_worker<kd::layouts::layer_first>({.name = "xp0", .role = connector_role::producer, .model = model(), .num_blocks = 16});
  auto late = p0->run_prefill(a);
  ASSERT_FALSE(late) << "the prefill wrote request 70's KV into the restarted instance's blocks";
  EXPECT_EQ(late.code(), kvx::errc::stale) << late.error().message();
  auto out = second->run_decode(b, tb, 3);
  ASSERT_TRUE(out) << out.error().message();
  EXPECT_EQ(out->tokens, reference(tokens_b, 3));
}

// Named function objects: GCC 12 rejects the store client's init-captures when
// it is instantiated from nested lambdas.
struct set_code {
  std::shared_ptr<std::promise<std::error_code>> p;
  void operator()(std::error_code ec) const { p->set_value(ec); }
};
template <class Client>
struct remove_call {
  Client* client;
  std::string key;
  std::shared_ptr<std::promise<std::error_code>> p;
  void operator()() const { client->async_remove({"t", key}, set_code{p}); }
};

// Removes one object (block `block`, layer `layer`, heads from 0) from the pool.
template <class Client>
std::error_code remove_object(Cluster& c, Client* client, const std::vector<std::uint32_t>& tokens, std::size_t block, std::uint32_t layer) {
  auto h = kvx::cache::block_hasher::make({.block_tokens = 16, .ns = {.model = "tiny", .tenant = "t", .adapter = {}, .salt = {}}}).value();
  const auto key = h.keys(tokens).at(block).to_string() + "/l" + std::to_string(layer) + "/h0";
  auto p = std::make_shared<std::promise<std::error_code>>();
  auto f = p->get_future();
  asio::post(c.io, remove_call<Client>{client, key, p});
  if (f.wait_for(10s) != std::future_status::ready) return kvx::errc::timed_out;
  return f.get();
}

TEST_F(ConnectorTest, BestEffortRecomputesExactlyTheBlocksWhoseLoadFailed) {
  add_pool_node("node-0");
  auto* p = pull_worker<kd::layouts::layer_first>({.name = "bp", .role = connector_role::producer, .model = model(), .num_blocks = 32});
  auto* d = pull_worker<kd::layouts::layer_first>({.name = "bd", .role = connector_role::consumer, .model = model(), .num_blocks = 32});
  const auto tokens = prompt(100, 10);
  const kd::kv_request req{60, tokens};
  ASSERT_TRUE(p->run_prefill(req));
  ASSERT_FALSE(remove_object(*this, clients.front().get(), tokens, 2, 1));  // block 2 of layer 1 is evicted
  auto t = d->admit(req, 4).value();
  ASSERT_EQ(t.external_tokens, 96u);
  auto out = d->run_decode(req, t, 4);
  ASSERT_TRUE(out) << out.error().message();
  EXPECT_EQ(out->load.failed_blocks, std::vector<std::uint32_t>{t.blocks[2]});
  EXPECT_EQ(out->load.valid_tokens, 32u);
  EXPECT_EQ(out->recomputed_tokens, 64u);
  EXPECT_EQ(out->tokens, reference(tokens, 4));
}

TEST_F(ConnectorTest, WaitUntilFailsTheRequestWhenABlockIsMissing) {
  add_pool_node("node-0");
  auto* p = pull_worker<kd::layouts::layer_first>({.name = "wp", .role = connector_role::producer, .model = model(), .num_blocks = 32});
  auto* d = pull_worker<kd::layouts::layer_first, kd::load::wait_until>({.name = "wd", .role = connector_role::consumer, .model = model(), .num_blocks = 32});
  const auto tokens = prompt(70, 11);
  const kd::kv_request req{61, tokens};
  ASSERT_TRUE(p->run_prefill(req));
  ASSERT_FALSE(remove_object(*this, clients.front().get(), tokens, 3, 0));
  auto t = d->admit(req, 3).value();
  auto out = d->run_decode(req, t, 3);
  ASSERT_FALSE(out);
  EXPECT_EQ(out.code(), kvx::errc::not_found);
  EXPECT_NE(out.error().message().find("block 3"), std::string::npos) << out.error().message();
  EXPECT_TRUE(d->abort(t, false));
}

TEST_F(ConnectorTest, BestEffortPastTheDeadlineCancelsTheLoadsAndRecomputesEverything) {
  add_pool_node("node-0");
  auto* p = pull_worker<kd::layouts::layer_first>({.name = "sp", .role = connector_role::producer, .model = model(), .num_blocks = 32});
  // The decode instance's reads never complete on their own.
  auto& slow = add_impulse("sd");
  pull_mode<impulse_engine> mode{client_for(slow.engine, "sd"), "t", "tiny"};
  using slow_worker = tiny::worker<kd::layouts::layer_first, impulse_engine, pull_mode<impulse_engine>, kd::load::best_effort>;
  auto* d = keep(slow_worker::make(slow.engine, {.name = "sd", .role = connector_role::consumer, .model = model(), .num_blocks = 32}, mode,
                                   kd::load::best_effort{200ms}).value());
  const auto tokens = prompt(60, 12);
  const kd::kv_request req{62, tokens};
  ASSERT_TRUE(p->run_prefill(req));
  auto t = d->admit(req, 3).value();
  ASSERT_EQ(t.external_tokens, 48u);
  auto out = d->run_decode(req, t, 3);
  ASSERT_TRUE(out) << out.error().message();
  EXPECT_EQ(out->load.valid_tokens, 0u);
  EXPECT_EQ(out->load.failed_blocks.size(), 3u);
  EXPECT_EQ(out->tokens, reference(tokens, 3));
}

TEST_F(ConnectorTest, BestEffortWhoseGetsDoNotStopWhenCancelledFailsInsteadOfReportingACompleteLoad) {
  add_pool_node("node-0");
  auto* p = pull_worker<kd::layouts::layer_first>({.name = "sp", .role = connector_role::producer, .model = model(), .num_blocks = 32});
  // The decode instance's reads neither complete nor stop when cancelled
  // (requests already on their way): they may still write into its blocks.
  auto& deaf = add_impulse("sd");
  deaf.transport.honour_cancellation(false);
  pull_mode<impulse_engine> mode{client_for(deaf.engine, "sd"), "t", "tiny"};
  using slow_worker = tiny::worker<kd::layouts::layer_first, impulse_engine, pull_mode<impulse_engine>, kd::load::best_effort>;
  // (Its connector waits `control_timeout`, 5 s, for cancelled gets to end.)
  auto* d = keep(slow_worker::make(deaf.engine, {.name = "sd", .role = connector_role::consumer, .model = model(), .num_blocks = 32},
                                   mode, kd::load::best_effort{200ms}).value());
  const auto tokens = prompt(60, 12);
  const kd::kv_request req{63, tokens};
  ASSERT_TRUE(p->run_prefill(req));
  auto t = d->admit(req, 3).value();
  ASSERT_EQ(t.external_tokens, 48u);
  auto out = d->run_decode(req, t, 3);
  // Before: the wait gave up and forgot the gets (a later get's end then
  // wrapped the layer's count), finish_load reported every block valid while
  // they could still land, the engine decoded blocks never loaded, and only
  // request_finished's `busy` 5 s later failed the decode. Now the load is
  // abandoned: timed_out, naming the gets that did not stop.
  if (out) {
    EXPECT_EQ(out->load.valid_tokens, 0u) << "a load with gets still in flight was reported valid";
    EXPECT_EQ(out->tokens, reference(tokens, 3));
  } else {
    EXPECT_EQ(out.code(), kvx::errc::timed_out) << out.error().message();
  }
  deaf.transport.fail_all(kvx::errc::cancelled);  // let the stuck gets end
}

TEST_F(ConnectorTest, PushProducerWhoseBlocksHoldOtherBytesIsRefusedAndTheDecodeEndsPromptly) {
  // TP, block size and layers agree; head_dim does not: every block of every
  // layer is 16384 bytes on the prefill side and 8192 on the decode side.
  auto wide = model();
  wide.head_dim = 32;
  auto* p = push_worker<kd::layouts::layer_first>({.name = "hp", .role = connector_role::producer, .model = wide, .num_blocks = 16});
  auto* wu = push_worker<kd::layouts::layer_first>({.name = "hwu", .role = connector_role::consumer, .model = model(), .num_blocks = 16},
                                                   kd::load::wait_until{10s});
  auto* be = push_worker<kd::layouts::layer_first, kd::load::best_effort>(
      {.name = "hbe", .role = connector_role::consumer, .model = model(), .num_blocks = 16}, kd::load::best_effort{10s});
  const auto tokens = prompt(40, 30);

  const kd::kv_request req{200, tokens};
  auto t = wu->admit(req, 3).value();
  auto pre = p->run_prefill(req);
  ASSERT_FALSE(pre) << "the decode side would have decoded half of every block";
  EXPECT_EQ(pre.code(), kvx::errc::invalid_argument);
  EXPECT_NE(pre.error().message().find("8192 bytes"), std::string::npos) << pre.error().message();
  EXPECT_NE(pre.error().message().find("16384"), std::string::npos) << pre.error().message();
  auto t0 = std::chrono::steady_clock::now();
  auto failed = wu->run_decode(req, t, 3);
  ASSERT_FALSE(failed);
  EXPECT_EQ(failed.code(), kvx::errc::invalid_argument) << failed.error().message();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 5s) << "every layer's notice failed: nothing is waited for";
  EXPECT_TRUE(wu->abort(t, false));

  const kd::kv_request req2{201, tokens};
  auto t2 = be->admit(req2, 3).value();
  ASSERT_FALSE(p->run_prefill(req2));
  t0 = std::chrono::steady_clock::now();
  auto out = be->run_decode(req2, t2, 3);
  ASSERT_TRUE(out) << out.error().message();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 5s);
  EXPECT_EQ(out->load.valid_tokens, 0u) << "everything is recomputed";
  EXPECT_EQ(out->tokens, reference(tokens, 3));
}

TEST_F(ConnectorTest, PushProducerOfAnotherBlockSizeEndsABestEffortDecodePromptly) {
  // The geometry check fails at the producer's update_state_after_alloc: a
  // failing notice for every layer, not only layer 0, or the decode side
  // waits for layers 1 and 2 until its deadline and reports timed_out.
  auto* p = push_worker<kd::layouts::layer_first>({.name = "gp", .role = connector_role::producer, .model = model(1, 32), .num_blocks = 16});
  auto* d = push_worker<kd::layouts::layer_first, kd::load::best_effort>(
      {.name = "gd", .role = connector_role::consumer, .model = model(), .num_blocks = 16}, kd::load::best_effort{10s});
  const auto tokens = prompt(40, 31);
  const kd::kv_request req{205, tokens};
  auto t = d->admit(req, 3).value();
  auto pre = p->run_prefill(req);
  ASSERT_FALSE(pre);
  EXPECT_EQ(pre.code(), kvx::errc::invalid_argument);
  EXPECT_NE(pre.error().message().find("16-token blocks"), std::string::npos) << pre.error().message();
  const auto t0 = std::chrono::steady_clock::now();
  auto out = d->run_decode(req, t, 3);
  ASSERT_TRUE(out) << out.error().message();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 5s);
  EXPECT_EQ(out->load.valid_tokens, 0u);
  EXPECT_EQ(out->tokens, reference(tokens, 3));
}

TEST_F(ConnectorTest, AFailureNoticeNamingBlocksPastTheRequestFailsTheWholeLayer) {
  // A notice (from the wire, or a buggy producer) names source blocks the
  // request does not have: the layer is lost all the same, and must not be
  // reported as loaded.
  auto* d = push_worker<kd::layouts::layer_first, kd::load::best_effort>(
      {.name = "od", .role = connector_role::consumer, .model = model(), .num_blocks = 16});
  const auto tokens = prompt(40, 32);
  const kd::kv_request req{210, tokens};
  auto t = d->admit(req, 3).value();
  auto target = link->take(req.id).value();
  ASSERT_EQ(target->source_blocks, 3u);
  const auto lost = make_error_code(kvx::errc::connection_lost);
  target->notify({.request = req.id, .epoch = target->epoch, .layer = 0, .code = lost, .context = "forged", .failed_blocks = {99}, .bytes = 0});
  target->notify({.request = req.id, .epoch = target->epoch, .layer = 1, .code = lost, .context = "forged", .failed_blocks = {UINT32_MAX}, .bytes = 0});
  target->notify({.request = req.id, .epoch = target->epoch, .layer = 2, .code = {}, .context = {}, .failed_blocks = {}, .bytes = 0});
  auto out = d->run_decode(req, t, 3);
  ASSERT_TRUE(out) << out.error().message();
  EXPECT_FALSE(out->load.complete());
  EXPECT_EQ(out->load.valid_tokens, 0u);
  EXPECT_EQ(out->load.failed_blocks, (std::vector<std::uint32_t>{t.blocks[0], t.blocks[1], t.blocks[2]}));
  EXPECT_EQ(d->connector().stats().failed_blocks, 3u);
  EXPECT_EQ(out->tokens, reference(tokens, 3));
}

TEST_F(ConnectorTest, StagingBlocksAStuckPrefillMayStillWriteStayQuarantinedAfterTheRequestFinishes) {
  // prefill-0 holds every write until the test releases it; the decode side
  // stages (other block size), gives up on request A and serves request B
  // from prefill-1. A's late writes must not land in B's staging blocks.
  auto& stuck = add_impulse("qp0");
  using stuck_worker = tiny::worker<kd::layouts::layer_first, impulse_engine, kd::transfer_mode::push, kd::load::wait_until>;
  auto* p0 = keep(stuck_worker::make(stuck.engine, {.name = "qp0", .role = connector_role::producer, .model = model(), .num_blocks = 16, .save_timeout = 20s},
                                     {link}, {}).value());
  auto* p1 = push_worker<kd::layouts::layer_first>({.name = "qp1", .role = connector_role::producer, .model = model(), .num_blocks = 16});
  auto* d = push_worker<kd::layouts::page_first, kd::load::best_effort>({.name = "qd",
                                                                          .role = connector_role::consumer,
                                                                          .model = model(1, 32),
                                                                          .num_blocks = 16,
                                                                          .source_block_tokens = 16,
                                                                          .staging_blocks = 8},
                                                                         kd::load::best_effort{300ms});
  auto& dc = d->connector();
  const auto tokens_a = prompt(50, 35), tokens_b = prompt(50, 36);
  const kd::kv_request a{230, tokens_a}, b{231, tokens_b};
  auto ta = d->admit(a, 3).value();
  std::jthread prefill_a([&] { (void)p0->run_prefill(a); });
  // 3 layers x 4 blocks: every write of A waits in prefill-0's transport.
  for (const auto until = std::chrono::steady_clock::now() + 10s; stuck.transport.pending() < 12u && std::chrono::steady_clock::now() < until;)
    std::this_thread::sleep_for(1ms);
  EXPECT_EQ(stuck.transport.pending(), 12u);
  auto failed = d->run_decode(a, ta, 3);
  EXPECT_FALSE(failed);
  EXPECT_EQ(failed.code(), kvx::errc::timed_out);
  // A late writer cannot be fenced off: even under best_effort the request is abandoned.
  EXPECT_EQ(dc.wait_for_layer_load(a.id, 1).code(), kvx::errc::timed_out);
  EXPECT_EQ(dc.finish_load(a.id).code(), kvx::errc::timed_out);
  EXPECT_TRUE(d->abort(ta, /*quarantine=*/true));
  EXPECT_EQ(dc.stats().staging_quarantined, 4u) << "A's staging blocks are not handed out again";

  auto tb = d->admit(b, 3);
  EXPECT_TRUE(tb) << tb.error().message();
  EXPECT_TRUE(p1->run_prefill(b));
  // prefill-0 comes back: its writes land, its notices are stale.
  const auto stale = dc.stats().stale_notices;
  asio::post(io, [&stuck] { stuck.transport.release_all(); });
  for (const auto until = std::chrono::steady_clock::now() + 10s; dc.stats().stale_notices < stale + 3 && std::chrono::steady_clock::now() < until;)
    std::this_thread::sleep_for(1ms);
  EXPECT_EQ(dc.stats().stale_notices, stale + 3);
  prefill_a.join();
  ASSERT_TRUE(tb);
  auto out = d->run_decode(b, *tb, 3);
  ASSERT_TRUE(out) << out.error().message();
  EXPECT_TRUE(out->load.complete());
  EXPECT_EQ(out->tokens, reference(tokens_b, 3)) << "B's staging blocks held A's KV";
  EXPECT_EQ(dc.stats().staging_quarantined, 0u) << "every late layer reported: A's blocks are free again";
  const auto tokens_c = prompt(128, 37);  // needs all 8 staging blocks
  auto tc = d->admit({232, tokens_c}, 3);
  ASSERT_TRUE(tc) << tc.error().message();
  EXPECT_TRUE(d->abort(*tc, false));
}

// prefill-0's transport reports its writes cancelled at its save deadline
// while their bytes are still on the way (tcp: already in the sockets); they
// land when the test releases them, after the failure notices. The decode
// side recomputes request A, and must not hand A's blocks (staging, or the
// engine's) to request B while A's writes may still land.
template <class Layout>
void late_writes_case(ConnectorTest& t, const std::string& name, tiny::worker_config decode_cfg) {
  auto& late = t.add_impulse(name + "-p0");
  late.transport.land_after_cancel(true);
  using late_worker = tiny::worker<kd::layouts::layer_first, impulse_engine, kd::transfer_mode::push, kd::load::wait_until>;
  auto* p0 = t.keep(late_worker::make(late.engine,
                                      {.name = name + "-p0", .role = connector_role::producer, .model = model(), .num_blocks = 16, .save_timeout = 100ms},
                                      {t.link}, {}).value());
  auto* p1 = t.push_worker<kd::layouts::layer_first>({.name = name + "-p1", .role = connector_role::producer, .model = model(), .num_blocks = 16});
  decode_cfg.name = name + "-d";
  decode_cfg.role = connector_role::consumer;
  decode_cfg.num_blocks = 16;
  decode_cfg.drain_margin = 3s;  // the test's steps up to the late landing take far less
  auto* d = t.push_worker<Layout, kd::load::best_effort>(decode_cfg, kd::load::best_effort{5s});
  auto& dc = d->connector();
  const auto tokens_a = prompt(50, 41), tokens_b = prompt(50, 42);
  const kd::kv_request a{240, tokens_a}, b{241, tokens_b};
  const auto free_at_start = d->blocks().available();

  auto ta = d->admit(a, 3).value();
  auto pre = p0->run_prefill(a);  // every layer times out: three failure notices
  ASSERT_FALSE(pre);
  const auto held = late.transport.pending();
  EXPECT_GE(held, 12u) << "3 layers x 4 blocks of writes still on their way";
  auto out_a = d->run_decode(a, ta, 3);
  ASSERT_TRUE(out_a) << out_a.error().message();
  EXPECT_EQ(out_a->load.valid_tokens, 0u);
  EXPECT_EQ(out_a->tokens, reference(tokens_a, 3)) << "A is recomputed";
  EXPECT_EQ(dc.stats().requests_draining, 1u) << "A's writes may still land";
  EXPECT_EQ(dc.stats().staging_quarantined, dc.loads_in_place() ? 0u : 4u);
  EXPECT_EQ(d->blocks().available(), free_at_start - ta.blocks.size()) << "A's blocks are not free yet";

  auto tb = d->admit(b, 3).value();
  for (auto blk : tb.blocks) EXPECT_EQ(std::count(ta.blocks.begin(), ta.blocks.end(), blk), 0) << "B got A's block " << blk;
  ASSERT_TRUE(p1->run_prefill(b));
  // A's writes land now, after their notices, into what A held.
  std::promise<std::size_t> landed;
  asio::post(t.io, [&] { landed.set_value(late.transport.release_all()); });
  EXPECT_EQ(landed.get_future().get(), held);
  EXPECT_EQ(dc.stats().requests_draining, 1u) << "the margin passed before the test released the late writes";
  auto out_b = d->run_decode(b, tb, 3);
  ASSERT_TRUE(out_b) << out_b.error().message();
  EXPECT_TRUE(out_b->load.complete());
  EXPECT_EQ(out_b->tokens, reference(tokens_b, 3)) << "A's late writes landed in B's blocks";

  // Past the margin A's blocks come back (the next allocation asks for them).
  std::this_thread::sleep_for(3s);
  EXPECT_EQ(dc.release_quiet(), 1u);
  EXPECT_EQ(dc.stats().requests_draining, 0u);
  EXPECT_EQ(dc.stats().staging_quarantined, 0u);
  EXPECT_EQ(d->blocks().available(), free_at_start) << "A's and B's blocks are all free";
}

TEST_F(ConnectorTest, StagingAFailedLayerMayStillReceiveIsNotHandedToTheNextRequestBeforeTheDrainMargin) {
  late_writes_case<kd::layouts::page_first>(*this, "ls", {.model = model(1, 32), .source_block_tokens = 16, .staging_blocks = 8});
}

TEST_F(ConnectorTest, EngineBlocksAFailedLayerMayStillReceiveGoBackOnlyAfterTheDrainMargin) {
  late_writes_case<kd::layouts::layer_first>(*this, "ld", {.model = model()});
}

TEST_F(ConnectorTest, NoticesHeardAfterAnAbortReleaseTheBlocksTheyHeldAndUnknownOnesAreStale) {
  // The notices come over the caller's own channel (hear_notice), as in the
  // multi-process demo, after the decode side gave up on the request.
  auto* d = push_worker<kd::layouts::layer_first>({.name = "hn", .role = connector_role::consumer, .model = model(), .num_blocks = 16},
                                                  kd::load::wait_until{100ms});
  auto& dc = d->connector();
  const auto tokens = prompt(40, 43);
  const kd::kv_request req{250, tokens};
  auto t = d->admit(req, 3).value();
  auto target = link->take(req.id).value();  // a prefill took it, then went quiet
  auto out = d->run_decode(req, t, 3);
  ASSERT_FALSE(out);
  EXPECT_EQ(out.code(), kvx::errc::timed_out);
  ASSERT_TRUE(d->abort(t, /*quarantine=*/true));
  EXPECT_EQ(dc.stats().requests_draining, 1u);
  EXPECT_EQ(d->blocks().available(), 16u - t.blocks.size());
  const auto stale = dc.stats().stale_notices;
  dc.hear_notice({.request = 999, .epoch = target->epoch, .layer = 0, .code = {}, .context = {}, .failed_blocks = {}, .bytes = 0});
  for (std::uint32_t l = 0; l + 1 < target->layers; ++l)
    dc.hear_notice({.request = req.id, .epoch = target->epoch, .layer = l, .code = {}, .context = {}, .failed_blocks = {}, .bytes = 0});
  EXPECT_EQ(dc.release_quiet(), 0u) << "one layer has not reported";
  dc.hear_notice({.request = req.id, .epoch = target->epoch, .layer = target->layers - 1, .code = {}, .context = {}, .failed_blocks = {}, .bytes = 0});
  EXPECT_EQ(dc.release_quiet(), 1u);
  EXPECT_EQ(dc.stats().requests_draining, 0u);
  EXPECT_EQ(dc.stats().stale_notices, stale + 1 + target->layers);
  EXPECT_EQ(d->blocks().available(), 16u);
}

TEST_F(ConnectorTest, ANegativeDrainMarginIsRefused) {
  auto& e = add_local("nm");
  auto l = kd::layouts::layer_first::make(model().shard_shape(), 8).value();
  std::vector<std::byte> mem(l.bytes_required());
  using conn = kd::kv_connector<kd::layouts::layer_first, local_engine, kd::transfer_mode::push>;
  auto bad = conn::make(e, {.name = "nm", .role = connector_role::consumer, .drain_margin = -1ms}, {{l, mem}}, {link});
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.code(), kvx::errc::invalid_argument);
  EXPECT_NE(bad.error().message().find("drain_margin"), std::string::npos) << bad.error().message();
}

// A prefill took the target and went silent for good (it died before any
// notice): the decode side gives up on the request and holds its blocks,
// which come back once the target's write_by plus the drain margin has
// passed. Without a deadline they stayed quarantined for good.
template <class Layout>
void silent_prefill_case(ConnectorTest& t, const std::string& name, tiny::worker_config cfg) {
  cfg.name = name;
  cfg.role = connector_role::consumer;
  cfg.num_blocks = 16;
  cfg.push_lease = 3s;
  cfg.drain_margin = 200ms;
  auto* d = t.push_worker<Layout>(cfg, kd::load::wait_until{100ms});
  auto& dc = d->connector();
  const auto tokens = prompt(40, 44);
  const kd::kv_request req{260, tokens};
  const auto wall_before = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch());
  const auto published = std::chrono::steady_clock::now();
  auto tk = d->admit(req, 3).value();
  const auto wall_after = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch());
  auto target = t.link->take(req.id).value();  // a prefill took it, then went quiet for good
  EXPECT_GE(target->write_by_ms, static_cast<std::uint64_t>((wall_before + 3s).count()) - 1);
  EXPECT_LE(target->write_by_ms, static_cast<std::uint64_t>((wall_after + 3s).count()));
  auto out = d->run_decode(req, tk, 3);
  ASSERT_FALSE(out);
  EXPECT_EQ(out.code(), kvx::errc::timed_out);
  ASSERT_TRUE(d->abort(tk, /*quarantine=*/true));
  ASSERT_LT(std::chrono::steady_clock::now(), published + 3s) << "the host is too slow for this test's 3 s lease";
  EXPECT_EQ(dc.release_quiet(), 0u) << "before write_by the prefill may still write";
  EXPECT_EQ(dc.stats().requests_draining, 1u);
  const std::uint64_t staged = dc.loads_in_place() ? 0u : 3u;  // 40 tokens in 16-token source blocks
  EXPECT_EQ(dc.stats().staging_quarantined, staged);
  EXPECT_EQ(d->blocks().available(), 16u - tk.blocks.size());

  std::this_thread::sleep_until(published + 3s + 200ms + 50ms);
  EXPECT_EQ(dc.release_quiet(), 1u);
  EXPECT_EQ(dc.stats().requests_draining, 0u);
  EXPECT_EQ(dc.stats().staging_quarantined, 0u);
  EXPECT_EQ(dc.stats().targets_expired, 1u);
  EXPECT_EQ(d->blocks().available(), 16u) << "the request's blocks are back";
  const auto stale = dc.stats().stale_notices;
  dc.hear_notice({.request = req.id, .epoch = target->epoch, .layer = 0, .code = {}, .context = {}, .failed_blocks = {}, .bytes = 0});
  EXPECT_EQ(dc.stats().stale_notices, stale + 1) << "a notice after the expiry belongs to no request";
}

TEST_F(ConnectorTest, EngineBlocksOfASilentPrefillComeBackWhenItsTargetExpires) {
  silent_prefill_case<kd::layouts::layer_first>(*this, "sd", {.model = model()});
}

TEST_F(ConnectorTest, StagingOfASilentPrefillComesBackWhenItsTargetExpires) {
  silent_prefill_case<kd::layouts::page_first>(*this, "ss", {.model = model(1, 32), .source_block_tokens = 16, .staging_blocks = 8});
}

TEST_F(ConnectorTest, AProducerEndsItsWritesMaxClockSkewBeforeTheTargetsWriteBy) {
  // prefill-0's transport holds every write; its save deadline (20 s) is far
  // past the target's write_by, which must cut the writes short: the decode
  // side gives the blocks away drain_margin after write_by.
  auto& stuck = add_impulse("wb-p");
  using stuck_worker = tiny::worker<kd::layouts::layer_first, impulse_engine, kd::transfer_mode::push, kd::load::wait_until>;
  auto* p = keep(stuck_worker::make(stuck.engine,
                                    {.name = "wb-p", .role = connector_role::producer, .model = model(), .num_blocks = 16, .save_timeout = 20s,
                                     .max_clock_skew = 300ms},
                                    {link}, {}).value());
  auto* d = push_worker<kd::layouts::layer_first>(
      {.name = "wb-d", .role = connector_role::consumer, .model = model(), .num_blocks = 16, .push_lease = 1500ms},
      kd::load::wait_until{10s});
  const auto tokens = prompt(40, 45);
  const kd::kv_request req{261, tokens};
  const auto published = std::chrono::steady_clock::now();
  auto tk = d->admit(req, 3).value();
  auto pre = p->run_prefill(req);
  const auto ended = std::chrono::steady_clock::now();
  ASSERT_FALSE(pre);
  EXPECT_EQ(pre.code(), kvx::errc::timed_out);
  EXPECT_NE(pre.error().message().find("write_by"), std::string::npos) << pre.error().message();
  EXPECT_LT(ended, published + 1500ms) << "the writes outlived write_by - max_clock_skew";
  EXPECT_GE(ended, published + 1000ms) << "the writes were cut before the prefill's time was up";
  EXPECT_EQ(stuck.transport.pending(), 0u) << "every held write was cancelled";
  // The decode side heard every layer fail: wait_until fails the request
  // (the router retries it) without waiting out its 10 s.
  auto out = d->run_decode(req, tk, 3);
  ASSERT_FALSE(out);
  EXPECT_EQ(out.code(), kvx::errc::timed_out);
  EXPECT_NE(out.error().message().find("write_by"), std::string::npos) << out.error().message();
  EXPECT_LT(std::chrono::steady_clock::now(), published + 5s);
  EXPECT_TRUE(d->abort(tk, /*quarantine=*/true));
}

TEST_F(ConnectorTest, APrefillThatTakesATargetPastItsWriteByRefusesItAndTheDecodeSideHearsAtOnce) {
  auto* p = push_worker<kd::layouts::layer_first>({.name = "late-p", .role = connector_role::producer, .model = model(), .num_blocks = 16,
                                                   .max_clock_skew = 100ms});
  auto* d = push_worker<kd::layouts::layer_first, kd::load::best_effort>(
      {.name = "late-d", .role = connector_role::consumer, .model = model(), .num_blocks = 16, .push_lease = 600ms},
      kd::load::best_effort{10s});
  const auto tokens = prompt(40, 46);
  const kd::kv_request req{262, tokens};
  auto tk = d->admit(req, 3).value();
  std::this_thread::sleep_for(550ms);  // past write_by - max_clock_skew
  const auto started = std::chrono::steady_clock::now();
  auto pre = p->run_prefill(req);
  ASSERT_FALSE(pre);
  EXPECT_EQ(pre.code(), kvx::errc::timed_out);
  EXPECT_NE(pre.error().message().find("write_by"), std::string::npos) << pre.error().message();
  EXPECT_EQ(p->blocks().available(), 16u) << "the prefill freed what it allocated";
  auto out = d->run_decode(req, tk, 3);
  ASSERT_TRUE(out) << out.error().message();
  EXPECT_EQ(out->load.valid_tokens, 0u);
  EXPECT_EQ(out->tokens, reference(tokens, 3));
  EXPECT_LT(std::chrono::steady_clock::now(), started + 5s) << "the decode side waited out its deadline";
  EXPECT_EQ(d->connector().stats().bytes_loaded, 0u);
}

TEST_F(ConnectorTest, ATargetWhoseWriteByIsFarAheadOrAbsentIsServed) {
  // A deadline ages away on the wire (2^64 - 1 ms) must not overflow the
  // producer's clock arithmetic, and an older decode side's target has none.
  auto* p = push_worker<kd::layouts::layer_first>({.name = "far-p", .role = connector_role::producer, .model = model(), .num_blocks = 16});
  auto* d = push_worker<kd::layouts::layer_first>({.name = "far-d", .role = connector_role::consumer, .model = model(), .num_blocks = 16});
  std::uint32_t id = 263;
  for (const std::uint64_t write_by : {std::numeric_limits<std::uint64_t>::max(), std::uint64_t{0}}) {
    const auto tokens = prompt(40, id);
    const kd::kv_request req{id++, tokens};
    auto tk = d->admit(req, 3).value();
    auto t = *link->take(req.id).value();
    t.write_by_ms = write_by;
    ASSERT_TRUE(link->publish(std::make_shared<const kd::push_target>(std::move(t))));
    auto pre = p->run_prefill(req);
    ASSERT_TRUE(pre) << pre.error().message();
    auto out = d->run_decode(req, tk, 3);
    ASSERT_TRUE(out) << out.error().message();
    EXPECT_TRUE(out->load.complete());
    EXPECT_EQ(out->tokens, reference(tokens, 3));
  }
}

TEST_F(ConnectorTest, ANegativeOrTooShortPushLeaseAndANegativeClockSkewAreRefused) {
  auto& e = add_local("pl");
  auto l = kd::layouts::layer_first::make(model().shard_shape(), 8).value();
  std::vector<std::byte> mem(l.bytes_required());
  using conn = kd::kv_connector<kd::layouts::layer_first, local_engine, kd::transfer_mode::push>;
  const std::pair<kd::connector_config, const char*> cases[] = {
      {{.name = "pl", .role = connector_role::consumer, .push_lease = -1ms}, "push_lease is negative"},
      {{.name = "pl", .role = connector_role::producer, .max_clock_skew = -1ms}, "max_clock_skew is negative"},
      {{.name = "pl", .role = connector_role::consumer, .push_lease = 500ms, .max_clock_skew = 500ms}, "must exceed max_clock_skew"},
      // now + duration::max() overflowed.
      {{.name = "pl", .role = connector_role::consumer, .push_lease = std::chrono::steady_clock::duration::max()}, "is over 24 h"},
      {{.name = "pl", .role = connector_role::producer, .max_clock_skew = std::chrono::hours(2)}, "max_clock_skew (7200000 ms) is over 1 h"},
      {{.name = "pl", .role = connector_role::consumer, .drain_margin = std::chrono::steady_clock::duration::max()}, "drain_margin ("},
  };
  for (const auto& [cfg, why] : cases) {
    auto bad = conn::make(e, cfg, {{l, mem}}, {link});
    ASSERT_FALSE(bad) << why;
    EXPECT_EQ(bad.code(), kvx::errc::invalid_argument);
    EXPECT_NE(bad.error().message().find(why), std::string::npos) << bad.error().message();
  }
  auto none = conn::make(e, {.name = "pl", .role = connector_role::consumer, .push_lease = 0ms}, {{l, mem}}, {link});
  EXPECT_TRUE(none) << "0: no deadline";
}

TEST_F(ConnectorTest, WaitFullWithTheLongestTimeoutWaitsAndANegativeWaitIsRefused) {
  // now + duration::max() overflowed (undefined; in practice a deadline in the past).
  auto* p = push_worker<kd::layouts::layer_first>({.name = "lp", .role = connector_role::producer, .model = model(), .num_blocks = 16});
  auto* d = push_worker<kd::layouts::layer_first, kd::load::wait_full>(
      {.name = "ld", .role = connector_role::consumer, .model = model(), .num_blocks = 16},
      kd::load::wait_full{std::chrono::steady_clock::duration::max()});
  const auto tokens = prompt(40, 33);
  const kd::kv_request req{215, tokens};
  auto t = d->admit(req, 3).value();
  ASSERT_TRUE(p->run_prefill(req));
  auto out = d->run_decode(req, t, 3);
  ASSERT_TRUE(out) << out.error().message();
  EXPECT_TRUE(out->load.complete());
  EXPECT_EQ(out->tokens, reference(tokens, 3));

  auto& e = add_local("neg");
  using neg_worker = tiny::worker<kd::layouts::layer_first, local_engine, kd::transfer_mode::push, kd::load::wait_until>;
  auto neg = neg_worker::make(e, {.name = "neg", .role = connector_role::consumer, .model = model(), .num_blocks = 16}, {link},
                              kd::load::wait_until{-1ms});
  ASSERT_FALSE(neg);
  EXPECT_EQ(neg.code(), kvx::errc::invalid_argument);
  EXPECT_NE(neg.error().message().find("negative"), std::string::npos) << neg.error().message();
}

}  // namespace

// ---- hybrid models: recurrent state beside the paged KV ---------------------------

namespace hybrid_state {

using kd::connector_role;

tiny::model_config hybrid(std::uint32_t tp = 1, std::uint32_t block_tokens = 16) {
  auto c = model(tp, block_tokens);
  c.layers = 4;
  c.kinds = {kd::layer_kind::attention, kd::layer_kind::recurrent, kd::layer_kind::attention, kd::layer_kind::recurrent};
  c.state_dim = 16;
  return c;
}

std::vector<std::uint32_t> reference(const std::vector<std::uint32_t>& p, std::uint32_t n) {
  auto cfg = hybrid();
  auto l = kd::layouts::layer_first::make(cfg.shard_shape(), 64, 2).value();
  std::vector<std::byte> mem(l.bytes_required());
  auto eng = tiny::engine<kd::layouts::layer_first>::make(cfg, l, mem).value();
  std::vector<std::uint32_t> table(64);
  for (std::uint32_t i = 0; i < 64; ++i) table[i] = 63 - i;
  kd::kv_sequence seq;
  seq.block_table = table;
  seq.state_slot = 1;
  return eng.generate(p, n, seq).value();
}

// Forges the target the decode side published for `id`: the state of layer
// `layer` goes to a segment that does not exist, so that write fails.
void break_state_destination(kd::push_link& link, kd::request_id id, std::uint32_t layer) {
  auto target = link.take(id).value();
  auto forged = std::make_shared<kd::push_target>(*target);
  forged->segments.push_back("no-such-segment");
  forged->destinations[(std::size_t{0} * forged->layers + layer) * forged->source_blocks].segment =
      static_cast<std::uint32_t>(forged->segments.size() - 1);
  ASSERT_TRUE(link.publish(forged));
}

}  // namespace hybrid_state

TEST_F(ConnectorTest, HybridTinyEngineLeavesTheStateAtTheSnapshotPosition) {
  // The snapshot is the state a run that stops there leaves: resuming from it is token-identical.
  auto cfg = hybrid_state::hybrid();
  auto l = kd::layouts::layer_first::make(cfg.shard_shape(), 16, 3).value();
  std::vector<std::byte> mem(l.bytes_required());
  auto eng = tiny::engine<kd::layouts::layer_first>::make(cfg, l, mem).value();
  const auto tokens = prompt(40, 20);
  std::vector<std::uint32_t> table{0, 1, 2};
  kd::kv_sequence seq;
  seq.block_table = table;
  seq.state_slot = 0;
  seq.snapshot_slot = 1;
  seq.snapshot_at = 32;
  ASSERT_TRUE(eng.prefill(tokens, seq));
  kd::kv_sequence short_run;
  short_run.block_table = table;
  short_run.state_slot = 2;
  ASSERT_TRUE(eng.prefill(std::span(tokens).first(32), short_run));
  for (std::uint32_t layer : {1u, 3u})
    EXPECT_EQ(0, std::memcmp(mem.data() + l.state_offset(1, layer), mem.data() + l.state_offset(2, layer), cfg.shard_shape().state_bytes))
        << "layer " << layer;
  EXPECT_NE(0, std::memcmp(mem.data() + l.state_offset(0, 1), mem.data() + l.state_offset(1, 1), cfg.shard_shape().state_bytes));
  seq.snapshot_at = 41;
  EXPECT_EQ(eng.prefill(tokens, seq).code(), kvx::errc::invalid_argument) << "past the step";
  seq.snapshot_at = 32;
  seq.snapshot_slot = 0;
  EXPECT_EQ(eng.prefill(tokens, seq).code(), kvx::errc::out_of_range) << "the request's own slot";
}

TEST_F(ConnectorTest, HybridPushIsTokenIdenticalBothWaysBetweenLayerFirstAndPageFirst) {
  auto* p = push_worker<kd::layouts::layer_first>({.name = "hp0", .role = connector_role::producer, .model = hybrid_state::hybrid(), .num_blocks = 32});
  auto* d = push_worker<kd::layouts::page_first>({.name = "hd0", .role = connector_role::consumer, .model = hybrid_state::hybrid(), .num_blocks = 32});
  auto* p2 = push_worker<kd::layouts::page_first>({.name = "hp1", .role = connector_role::producer, .model = hybrid_state::hybrid(), .num_blocks = 32});
  auto* d2 = push_worker<kd::layouts::layer_first>({.name = "hd1", .role = connector_role::consumer, .model = hybrid_state::hybrid(), .num_blocks = 32});
  EXPECT_TRUE(d->connector().loads_in_place());
  EXPECT_EQ(p->connector().state_snapshot_position(75, 0), 74u);
  EXPECT_EQ(d->connector().state_snapshot_position(75, 0), 0u) << "a consumer sends nothing";
  const auto shape = hybrid_state::hybrid().shard_shape();
  auto run = [&](auto* prod, auto* cons, kd::request_id id) {
    const auto tokens = prompt(75, static_cast<std::uint32_t>(id));
    const kd::kv_request req{id, tokens};
    auto ticket = cons->admit(req, 6).value();
    EXPECT_EQ(ticket.external_tokens, 74u);
    EXPECT_NE(ticket.state_slot, kd::no_state_slot);
    auto pre = prod->run_prefill(req);
    ASSERT_TRUE(pre) << pre.error().message();
    auto out = cons->run_decode(req, ticket, 6);
    ASSERT_TRUE(out) << out.error().message();
    EXPECT_EQ(pre->saved.layers, 4u) << "two attention layers and two states";
    EXPECT_EQ(pre->saved.bytes, 2u * 5u * shape.block_layer_bytes() + 2u * shape.state_bytes);
    EXPECT_TRUE(out->load.complete());
    EXPECT_EQ(out->tokens, hybrid_state::reference(tokens, 6));
  };
  run(p, d, 100);
  run(p2, d2, 101);
  EXPECT_EQ(d->state_slots().available(), 16u) << "the decode side gave its state slot back";
  EXPECT_EQ(p->state_slots().available(), 16u) << "... and the prefill side both of its";
}

TEST_F(ConnectorTest, HybridPushWithoutTheSnapshotIsNotTokenIdentical) {
  // The test can fail: sending the state after the whole prompt (what the
  // engine's own slot holds) instead of the snapshot changes the output.
  auto* p = push_worker<kd::layouts::layer_first>({.name = "np", .role = connector_role::producer, .model = hybrid_state::hybrid(), .num_blocks = 32});
  auto* d = push_worker<kd::layouts::layer_first>({.name = "nd", .role = connector_role::consumer, .model = hybrid_state::hybrid(), .num_blocks = 32});
  const auto tokens = prompt(50, 21);
  const kd::kv_request req{120, tokens};
  auto ticket = d->admit(req, 4).value();
  auto& pc = p->connector();
  std::vector<std::uint32_t> blocks{0, 1, 2, 3};
  kd::kv_sequence seq;
  seq.block_table = blocks;
  seq.state_slot = 0;
  seq.snapshot_slot = 1;
  seq.snapshot_at = 49;
  ASSERT_TRUE(pc.update_state_after_alloc(req, seq, 0));
  ASSERT_TRUE(pc.start_load_kv(req.id));
  kd::kv_sequence wrong = seq;
  wrong.snapshot_slot = 2;  // the engine leaves the snapshot elsewhere: slot 1 keeps stale zeros
  ASSERT_TRUE(p->model().prefill(tokens, wrong, 0, pc.hooks(req.id)));
  ASSERT_TRUE(pc.wait_for_save(req.id));
  ASSERT_TRUE(pc.request_finished(req.id));
  auto out = d->run_decode(req, ticket, 4);
  ASSERT_TRUE(out) << out.error().message();
  EXPECT_NE(out->tokens, hybrid_state::reference(tokens, 4));
}

TEST_F(ConnectorTest, HybridPushFromTp2IntoTp1WithOtherBlocksConvertsTheState) {
  auto* p = push_worker<kd::layouts::page_first>({.name = "hp2", .role = connector_role::producer, .model = hybrid_state::hybrid(2, 16), .num_blocks = 32});
  auto* d = push_worker<kd::layouts::layer_first>({.name = "hd1", .role = connector_role::consumer, .model = hybrid_state::hybrid(1, 32),
                                                   .num_blocks = 32, .source_tp = 2, .source_block_tokens = 16, .staging_blocks = 24});
  EXPECT_FALSE(d->connector().loads_in_place());
  EXPECT_EQ(d->connector().source_shape().state_bytes, hybrid_state::hybrid().shard_shape().state_bytes / 2);
  const auto tokens = prompt(90, 22);
  const kd::kv_request req{130, tokens};
  auto ticket = d->admit(req, 5).value();
  ASSERT_TRUE(p->run_prefill(req));
  auto out = d->run_decode(req, ticket, 5);
  ASSERT_TRUE(out) << out.error().message();
  EXPECT_EQ(out->tokens, hybrid_state::reference(tokens, 5));
  EXPECT_EQ(d->connector().stats().layers_converted, 4u);
}

TEST_F(ConnectorTest, HybridPullIsTokenIdenticalAndTheNextTurnResumesFromTheSavedState) {
  add_pool_node("node-0");
  auto* p = pull_worker<kd::layouts::layer_first>({.name = "hpp", .role = connector_role::both, .model = hybrid_state::hybrid(), .num_blocks = 32});
  auto* d = pull_worker<kd::layouts::page_first>({.name = "hpd", .role = connector_role::consumer, .model = hybrid_state::hybrid(), .num_blocks = 32});
  EXPECT_EQ(p->connector().state_snapshot_position(70, 0), 64u);
  EXPECT_EQ(p->connector().state_snapshot_position(70, 64), 0u) << "the pool holds that state already";
  EXPECT_EQ(p->connector().state_snapshot_position(64, 0), 48u) << "the last token is always computed";
  const auto turn1 = prompt(70, 23);
  const kd::kv_request r1{140, turn1};
  auto pre1 = p->run_prefill(r1);
  ASSERT_TRUE(pre1) << pre1.error().message();
  auto t1 = d->admit(r1, 5).value();
  EXPECT_EQ(t1.external_tokens, 64u);
  auto out1 = d->run_decode(r1, t1, 5);
  ASSERT_TRUE(out1) << out1.error().message();
  EXPECT_TRUE(out1->load.complete());
  EXPECT_EQ(out1->tokens, hybrid_state::reference(turn1, 5));

  auto turn2 = turn1;
  turn2.insert(turn2.end(), out1->tokens.begin(), out1->tokens.end());
  for (auto t : prompt(30, 24)) turn2.push_back(t);
  const kd::kv_request r2{141, turn2};
  auto pre2 = p->run_prefill(r2);
  ASSERT_TRUE(pre2) << pre2.error().message();
  EXPECT_EQ(pre2->cached_tokens, 64u) << "the prefill instance resumed from turn 1's state";
  EXPECT_EQ(pre2->recomputed_tokens, 0u);
  auto t2 = d->admit(r2, 4).value();
  EXPECT_EQ(t2.external_tokens, 96u);
  auto out2 = d->run_decode(r2, t2, 4);
  ASSERT_TRUE(out2) << out2.error().message();
  EXPECT_EQ(out2->tokens, hybrid_state::reference(turn2, 4));
  EXPECT_EQ(d->state_slots().available(), 16u);
  EXPECT_EQ(p->state_slots().available(), 16u);
}

TEST_F(ConnectorTest, HybridPullFromTp2IntoTp1PageFirstIsTokenIdentical) {
  add_pool_node("node-0");
  auto* p = pull_worker<kd::layouts::page_first>({.name = "hpp2", .role = connector_role::producer, .model = hybrid_state::hybrid(2, 16), .num_blocks = 32});
  auto* d = pull_worker<kd::layouts::layer_first>({.name = "hpd1", .role = connector_role::consumer, .model = hybrid_state::hybrid(1, 32),
                                                   .num_blocks = 32, .source_tp = 2, .source_block_tokens = 16, .staging_blocks = 32});
  const auto tokens = prompt(100, 25);
  const kd::kv_request req{150, tokens};
  ASSERT_TRUE(p->run_prefill(req));
  auto t = d->admit(req, 5).value();
  EXPECT_EQ(t.external_tokens, 96u);
  auto out = d->run_decode(req, t, 5);
  ASSERT_TRUE(out) << out.error().message();
  EXPECT_EQ(out->tokens, hybrid_state::reference(tokens, 5));
  EXPECT_EQ(d->connector().stats().objects_got, 6u * 2u * 2u + 2u * 2u) << "KV of 6 blocks x 2 layers x 2 shards, 2 states x 2 shards";
}

TEST_F(ConnectorTest, HybridPullHitShrinksToTheLastBlockWhoseStateIsInThePool) {
  add_pool_node("node-0");
  auto* p = pull_worker<kd::layouts::layer_first>({.name = "sp", .role = connector_role::both, .model = hybrid_state::hybrid(), .num_blocks = 32});
  auto* d = pull_worker<kd::layouts::layer_first>({.name = "sd", .role = connector_role::consumer, .model = hybrid_state::hybrid(), .num_blocks = 32});
  const auto long_prompt = prompt(100, 26);
  const std::vector<std::uint32_t> short_prompt(long_prompt.begin(), long_prompt.begin() + 50);
  ASSERT_TRUE(p->run_prefill({160, short_prompt}));  // KV of 3 blocks, state after block 3
  auto pre = p->run_prefill({161, long_prompt});     // resumes from it, state after block 6
  ASSERT_TRUE(pre) << pre.error().message();
  EXPECT_EQ(pre->cached_tokens, 48u);

  // Present: the whole hit.
  const kd::kv_request req{162, long_prompt};
  auto t = d->admit(req, 4).value();
  EXPECT_EQ(t.external_tokens, 96u);
  ASSERT_TRUE(d->abort(t, false));

  // The state after block 6 is evicted: the hit falls back to block 3, where a state is.
  ASSERT_FALSE(remove_object(*this, clients.front().get(), long_prompt, 5, 3));
  auto t2 = d->admit(req, 4).value();
  EXPECT_EQ(t2.external_tokens, 48u);
  auto out = d->run_decode(req, t2, 4);
  ASSERT_TRUE(out) << out.error().message();
  EXPECT_TRUE(out->load.complete());
  EXPECT_EQ(out->tokens, hybrid_state::reference(long_prompt, 4));

  // No state at all: nothing is usable although every KV block is there.
  ASSERT_FALSE(remove_object(*this, clients.front().get(), long_prompt, 2, 3));
  const kd::kv_request again{163, long_prompt};
  auto t3 = d->admit(again, 4).value();
  EXPECT_EQ(t3.external_tokens, 0u);
  auto out3 = d->run_decode(again, t3, 4);
  ASSERT_TRUE(out3) << out3.error().message();
  EXPECT_EQ(out3->tokens, hybrid_state::reference(long_prompt, 4));
}

TEST_F(ConnectorTest, HybridPullStateThatFailsToLoadIsRecomputedFromZeroOrFailsTheRequest) {
  add_pool_node("node-0");
  auto* p = pull_worker<kd::layouts::layer_first>({.name = "fp", .role = connector_role::producer, .model = hybrid_state::hybrid(), .num_blocks = 32});
  auto* be = pull_worker<kd::layouts::layer_first>({.name = "fbe", .role = connector_role::consumer, .model = hybrid_state::hybrid(), .num_blocks = 32});
  auto* wu = pull_worker<kd::layouts::layer_first, kd::load::wait_until>(
      {.name = "fwu", .role = connector_role::consumer, .model = hybrid_state::hybrid(), .num_blocks = 32});
  const auto tokens = prompt(70, 27);
  ASSERT_TRUE(p->run_prefill({170, tokens}));
  // Layer 1's state is lost; the lookup (which checks the last recurrent layer) still sees a hit.
  ASSERT_FALSE(remove_object(*this, clients.front().get(), tokens, 3, 1));

  const kd::kv_request req{171, tokens};
  auto t = be->admit(req, 4).value();
  ASSERT_EQ(t.external_tokens, 64u);
  auto out = be->run_decode(req, t, 4);
  ASSERT_TRUE(out) << out.error().message();
  EXPECT_TRUE(out->load.state_failed);
  EXPECT_TRUE(out->load.failed_blocks.empty()) << "every KV block arrived";
  EXPECT_EQ(out->load.valid_tokens, 0u) << "no state before the failed one: start over";
  EXPECT_EQ(out->recomputed_tokens, 64u);
  EXPECT_EQ(out->tokens, hybrid_state::reference(tokens, 4));

  const kd::kv_request req2{172, tokens};
  auto t2 = wu->admit(req2, 4).value();
  auto failed = wu->run_decode(req2, t2, 4);
  ASSERT_FALSE(failed);
  EXPECT_EQ(failed.code(), kvx::errc::not_found);
  EXPECT_NE(failed.error().message().find("layer 1 state"), std::string::npos) << failed.error().message();
  EXPECT_TRUE(wu->abort(t2, false));
}

TEST_F(ConnectorTest, HybridPushStateThatFailsToArriveIsRecomputedUnderBestEffortAndFailsUnderWaitUntil) {
  auto* p = push_worker<kd::layouts::layer_first>({.name = "xp", .role = connector_role::producer, .model = hybrid_state::hybrid(), .num_blocks = 32});
  auto* be = push_worker<kd::layouts::layer_first, kd::load::best_effort>(
      {.name = "xbe", .role = connector_role::consumer, .model = hybrid_state::hybrid(), .num_blocks = 32});
  auto* wu = push_worker<kd::layouts::layer_first>({.name = "xwu", .role = connector_role::consumer, .model = hybrid_state::hybrid(), .num_blocks = 32});
  const auto tokens = prompt(60, 28);

  const kd::kv_request req{180, tokens};
  auto t = be->admit(req, 4).value();
  hybrid_state::break_state_destination(*link, req.id, 3);
  auto pre = p->run_prefill(req);
  ASSERT_FALSE(pre);
  EXPECT_EQ(pre.code(), kvx::errc::unknown_segment);
  auto out = be->run_decode(req, t, 4);
  ASSERT_TRUE(out) << out.error().message();
  EXPECT_TRUE(out->load.state_failed);
  EXPECT_EQ(out->load.valid_tokens, 0u);
  EXPECT_EQ(out->recomputed_tokens, 59u);
  EXPECT_EQ(out->tokens, hybrid_state::reference(tokens, 4));

  const kd::kv_request req2{181, tokens};
  auto t2 = wu->admit(req2, 4).value();
  hybrid_state::break_state_destination(*link, req2.id, 1);
  ASSERT_FALSE(p->run_prefill(req2));
  auto failed = wu->run_decode(req2, t2, 4);
  ASSERT_FALSE(failed);
  EXPECT_EQ(failed.code(), kvx::errc::unknown_segment);
  EXPECT_NE(failed.error().message().find("layer 1 state"), std::string::npos) << failed.error().message();
  EXPECT_TRUE(wu->abort(t2, false));
}

TEST_F(ConnectorTest, HybridPushProducerWithAnotherStateSizeIsRefusedAndTheDecodeEndsPromptly) {
  // The attention blocks agree; the recurrent state is 128 bytes per layer
  // here and 64 on the decode side.
  auto big_state = hybrid_state::hybrid();
  big_state.state_dim = 32;
  auto* p = push_worker<kd::layouts::layer_first>({.name = "sp", .role = connector_role::producer, .model = big_state, .num_blocks = 16});
  auto* d = push_worker<kd::layouts::layer_first>({.name = "sd", .role = connector_role::consumer, .model = hybrid_state::hybrid(), .num_blocks = 16},
                                                  kd::load::wait_until{10s});
  const auto tokens = prompt(40, 34);
  const kd::kv_request req{220, tokens};
  auto t = d->admit(req, 3).value();
  auto pre = p->run_prefill(req);
  ASSERT_FALSE(pre);
  EXPECT_EQ(pre.code(), kvx::errc::invalid_argument);
  EXPECT_NE(pre.error().message().find("64 bytes"), std::string::npos) << pre.error().message();
  EXPECT_NE(pre.error().message().find("layer 1"), std::string::npos) << pre.error().message();
  const auto t0 = std::chrono::steady_clock::now();
  auto failed = d->run_decode(req, t, 3);
  ASSERT_FALSE(failed);
  EXPECT_EQ(failed.code(), kvx::errc::invalid_argument) << failed.error().message();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 5s);
  EXPECT_TRUE(d->abort(t, false));
}

TEST_F(ConnectorTest, HybridMisuseGetsClearErrors) {
  auto* p = push_worker<kd::layouts::layer_first>({.name = "mhp", .role = connector_role::producer, .model = hybrid_state::hybrid(), .num_blocks = 16});
  auto* d = push_worker<kd::layouts::layer_first>({.name = "mhd", .role = connector_role::consumer, .model = hybrid_state::hybrid(), .num_blocks = 16});
  auto& pc = p->connector();
  auto& dc = d->connector();
  const auto tokens = prompt(40, 29);
  const kd::kv_request req{190, tokens};
  std::vector<std::uint32_t> dblocks{3, 4, 5};
  auto no_slot = dc.update_state_after_alloc(req, dblocks, 39);
  EXPECT_EQ(no_slot.code(), kvx::errc::out_of_range) << "a consumer of state needs a state slot";
  EXPECT_NE(no_slot.error().message().find("state slot is not set"), std::string::npos) << no_slot.error().message();
  kd::kv_sequence dseq;
  dseq.block_table = dblocks;
  dseq.state_slot = 99;
  EXPECT_EQ(dc.update_state_after_alloc(req, dseq, 39).code(), kvx::errc::out_of_range) << "slot past the layout";
  dseq.state_slot = 0;
  EXPECT_EQ(dc.update_state_after_alloc(req, dseq, 32).code(), kvx::errc::invalid_argument)
      << "push resumes from the last prompt token, where the producer's state is taken";
  ASSERT_TRUE(dc.update_state_after_alloc(req, dseq, 39));

  std::vector<std::uint32_t> pblocks{0, 1, 2};
  kd::kv_sequence pseq;
  pseq.block_table = pblocks;
  pseq.state_slot = 0;
  auto no_snapshot = pc.update_state_after_alloc(req, pseq, 0);
  EXPECT_EQ(no_snapshot.code(), kvx::errc::invalid_argument);
  EXPECT_NE(no_snapshot.error().message().find("snapshot slot"), std::string::npos) << no_snapshot.error().message();
  pseq.snapshot_slot = 1;
  pseq.snapshot_at = 32;
  auto wrong_at = pc.update_state_after_alloc(req, pseq, 0);
  EXPECT_EQ(wrong_at.code(), kvx::errc::invalid_argument);
  EXPECT_NE(wrong_at.error().message().find("position 39"), std::string::npos) << wrong_at.error().message();
  pseq.snapshot_at = 39;
  ASSERT_TRUE(pc.update_state_after_alloc(req, pseq, 0));
  EXPECT_TRUE(pc.request_finished(req.id));
  EXPECT_TRUE(dc.request_finished(req.id));

  // Pull: a hybrid load covers whole pool blocks.
  add_pool_node("node-0");
  auto* q = pull_worker<kd::layouts::layer_first>({.name = "mhq", .role = connector_role::consumer, .model = hybrid_state::hybrid(), .num_blocks = 16});
  EXPECT_EQ(q->connector().update_state_after_alloc(req, dseq, 39).code(), kvx::errc::invalid_argument);

  // A model with no attention layer at all is refused.
  auto& e = add_local("state-only");
  auto cfg = hybrid_state::hybrid();
  cfg.kinds.assign(4, kd::layer_kind::recurrent);
  auto l = kd::layouts::layer_first::make(cfg.shard_shape(), 4, 2).value();
  std::vector<std::byte> mem(l.bytes_required());
  using conn = kd::kv_connector<kd::layouts::layer_first, local_engine, kd::transfer_mode::push>;
  auto refused = conn::make(e, {.name = "state-only", .role = connector_role::consumer}, {{l, mem}}, {link});
  EXPECT_EQ(refused.code(), kvx::errc::not_supported);
}
