// cuda_bench: kvx's CUDA data paths against cudaMemcpy measured in the same run.
//
//   cuda_bench [--min 1M] [--max 256M] [--bytes 4G] [--window 16] [--streams 4]
//
// Rows (bandwidth = bytes moved / wall time, completions included):
//   ipc_d2d   cuda_ipc async_read from another process's GPU segment into this
//             process's GPU memory, `window` ops in flight  vs  cudaMemcpyAsync
//             device-to-device within this process, same window and streams
//   h2d, d2h  kvx::cuda::async_copy between pinned host and device memory
//             vs  cudaMemcpy (synchronous) with the same pinned buffers
//   ipc_d2h   cuda_ipc async_read from the other process's GPU into pinned host
//             memory (the offload path)  vs  cudaMemcpy D2H pinned
// and the completion latency of one 4 KiB async_copy vs a 4 KiB cudaMemcpy.
// The second process is this program re-run with --serve; it exports a GPU
// buffer through cuda_ipc and prints its descriptor.

#include <kvx/cuda/event_poller.hpp>
#include <kvx/cuda/memory.hpp>
#include <kvx/cuda/stream.hpp>
#include <kvx/transfer/embedded_metadata.hpp>
#include <kvx/transfer/transfer_engine.hpp>
#include <kvx/transport/cuda_ipc.hpp>
#include <kvx/transport/local.hpp>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <string>
#include <vector>

extern char** environ;

namespace {

namespace asio = boost::asio;
using clock_type = std::chrono::steady_clock;

std::size_t parse_size(const std::string& s) {
  char* end = nullptr;
  double v = std::strtod(s.c_str(), &end);
  switch (end && *end ? *end : ' ') {
    case 'K': case 'k': v *= 1024; break;
    case 'M': case 'm': v *= 1024 * 1024; break;
    case 'G': case 'g': v *= 1024.0 * 1024 * 1024; break;
    default: break;
  }
  return static_cast<std::size_t>(v);
}

std::string human(std::size_t n) {
  if (n >= (1u << 30)) return std::to_string(n >> 30) + " GiB";
  if (n >= (1u << 20)) return std::to_string(n >> 20) + " MiB";
  return std::to_string(n >> 10) + " KiB";
}

[[noreturn]] void die(const std::string& what) {
  std::cerr << "cuda_bench: " << what << "\n";
  std::exit(1);
}

int serve(std::size_t size) {
  auto gpu = kvx::cuda::device_buffer::allocate(size, 0);
  if (!gpu) die(gpu.error().message());
  (void)cudaMemset(gpu->data(), 0x5a, size);
  (void)cudaDeviceSynchronize();
  asio::io_context io;
  kvx::transport::cuda_ipc t(io.get_executor());
  kvx::memory::segment_table table("bench-owner");
  auto seg = table.add("bench-gpu", gpu->region());
  if (!seg) die(seg.error().message());
  auto entry = t.register_memory(*seg);
  if (!entry) die(entry.error().message());
  auto d = table.describe(*seg);
  d.transports["cuda_ipc"] = *entry;
  std::cout << d.to_json().dump() << std::endl;
  // Until the parent closes our stdin.
  char c;
  while (::read(STDIN_FILENO, &c, 1) > 0) {
  }
  return 0;
}

struct peer_process {
  pid_t pid = -1;
  int to_child = -1;
  std::string line;
  peer_process(const char* self, std::size_t size) {
    int in[2], out[2];
    if (::pipe(in) != 0 || ::pipe(out) != 0) die("pipe");
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, in[0], STDIN_FILENO);
    posix_spawn_file_actions_adddup2(&fa, out[1], STDOUT_FILENO);
    posix_spawn_file_actions_addclose(&fa, in[1]);
    posix_spawn_file_actions_addclose(&fa, out[0]);
    std::string sz = std::to_string(size);
    char* argv[] = {const_cast<char*>(self), const_cast<char*>("--serve"), sz.data(), nullptr};
    if (posix_spawn(&pid, self, &fa, nullptr, argv, environ) != 0) die("posix_spawn");
    posix_spawn_file_actions_destroy(&fa);
    ::close(in[0]);
    ::close(out[1]);
    to_child = in[1];
    char c;
    while (::read(out[0], &c, 1) == 1 && c != '\n') line += c;
    ::close(out[0]);
  }
  ~peer_process() {
    ::close(to_child);
    int st = 0;
    ::waitpid(pid, &st, 0);
  }
};

// Runs `count` ops of `start(i, done)` with at most `window` in flight; seconds elapsed.
double run_windowed(asio::io_context& io, std::size_t count, std::size_t window,
                    const std::function<void(std::size_t, std::function<void(std::error_code)>)>& start) {
  std::size_t issued = 0, completed = 0;
  std::error_code failure;
  std::function<void()> issue = [&] {
    while (issued < count && issued - completed < window) {
      const auto i = issued++;
      start(i, [&](std::error_code ec) {
        if (ec && !failure) failure = ec;
        ++completed;
        issue();
      });
    }
  };
  const auto t0 = clock_type::now();
  issue();
  io.restart();
  io.run();
  const auto t1 = clock_type::now();
  if (failure) die("op failed: " + failure.message());
  if (completed != count) die("lost completions");
  return std::chrono::duration<double>(t1 - t0).count();
}

double gbps(std::size_t bytes, double seconds) { return static_cast<double>(bytes) / seconds / 1e9; }

}  // namespace

int main(int argc, char** argv) {
  std::size_t min_size = 1 << 20, max_size = 256 << 20, total = std::size_t{4} << 30, window = 16, nstreams = 4;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) die("missing value after " + a);
      return argv[++i];
    };
    if (a == "--serve") return serve(parse_size(next()));
    if (a == "--min") min_size = parse_size(next());
    else if (a == "--max") max_size = parse_size(next());
    else if (a == "--bytes") total = parse_size(next());
    else if (a == "--window") window = parse_size(next());
    else if (a == "--streams") nstreams = parse_size(next());
    else die("unknown flag " + a);
  }
  if (kvx::cuda::device_count() == 0) {
    std::cout << "cuda_bench: " << kvx::cuda::skip_reason() << "; nothing measured\n";
    return 0;
  }
  auto id = kvx::cuda::identify(0).value();
  int driver = 0, runtime = 0;
  (void)cudaDriverGetVersion(&driver);
  (void)cudaRuntimeGetVersion(&runtime);
  std::cout << "device: " << id.name << " (" << id.pci_bus << "), driver API " << driver << ", runtime " << runtime << "\n\n";

  peer_process peer(argv[0], max_size);
  auto j = nlohmann::json::parse(peer.line, nullptr, false);
  if (j.is_discarded()) die("peer: " + peer.line);
  auto remote = kvx::memory::segment_descriptor::from_json(j);
  if (!remote) die(remote.error().message());

  asio::io_context io;
  kvx::transport::cuda_ipc ipc(io.get_executor(), {.streams_per_device = nstreams});
  kvx::transport::cuda_ipc ipc_cb(io.get_executor(),
                                  {.streams_per_device = nstreams, .completion = kvx::cuda::completion_mode::callback});
  auto local = kvx::cuda::device_buffer::allocate(max_size * 2, 0).value();
  auto pinned = kvx::cuda::pinned_buffer::allocate(max_size).value();
  auto streams = kvx::cuda::stream_pool::create(0, nstreams).value();
  auto& poller = kvx::cuda::event_poller::instance();
  auto ex = io.get_executor();

  std::cout << "| path | size | kvx GB/s | reference | reference GB/s | ratio |\n| --- | --- | --- | --- | --- | --- |\n";
  auto row = [](const char* path, std::size_t size, double ours, const char* ref, double theirs) {
    std::printf("| %s | %s | %.1f | %s | %.1f | %.2f |\n", path, human(size).c_str(), ours, ref, theirs, ours / theirs);
    std::fflush(stdout);
  };
  for (std::size_t size = min_size; size <= max_size; size *= 4) {
    const std::size_t count = std::max<std::size_t>(16, total / size);
    const std::size_t bytes = count * size;
    // Plain CUDA: cudaMemcpy one at a time (synchronized: a device-to-device
    // cudaMemcpy returns before the copy ends), and cudaMemcpyAsync back to
    // back over the same streams with one synchronize at the end.
    auto sync_ref = [&](void* dst, const void* src) {
      (void)cudaMemcpy(dst, src, size, cudaMemcpyDefault);
      (void)cudaDeviceSynchronize();
      const auto t0 = clock_type::now();
      for (std::size_t i = 0; i < count; ++i) {
        if (cudaMemcpy(dst, src, size, cudaMemcpyDefault) != cudaSuccess) die("cudaMemcpy");
        (void)cudaStreamSynchronize(nullptr);
      }
      return std::chrono::duration<double>(clock_type::now() - t0).count();
    };
    auto pipelined_ref = [&](void* dst, const void* src) {
      (void)cudaDeviceSynchronize();
      const auto t0 = clock_type::now();
      for (std::size_t i = 0; i < count; ++i)
        if (cudaMemcpyAsync(dst, src, size, cudaMemcpyDefault, streams.next()) != cudaSuccess) die("cudaMemcpyAsync");
      (void)streams.synchronize();
      return std::chrono::duration<double>(clock_type::now() - t0).count();
    };
    // Warm-up: maps the handle, creates streams, faults in pages.
    run_windowed(io, 4, window, [&](std::size_t, auto done) { ipc.async_read(*remote, 0, std::span(local.data(), size), done); });
    run_windowed(io, 4, window, [&](std::size_t, auto done) { ipc_cb.async_read(*remote, 0, std::span(local.data(), size), done); });
    const double d2d_sync = sync_ref(local.data(), local.data() + max_size);
    const double d2d_pipe = pipelined_ref(local.data(), local.data() + max_size);
    const double ipc_s = run_windowed(io, count, window, [&](std::size_t, auto done) {
      ipc.async_read(*remote, 0, std::span(local.data(), size), done);
    });
    const double ipc_cb_s = run_windowed(io, count, window, [&](std::size_t, auto done) {
      ipc_cb.async_read(*remote, 0, std::span(local.data(), size), done);
    });
    row("cuda_ipc D2D (poll)", size, gbps(bytes, ipc_s), "cudaMemcpy D2D", gbps(bytes, d2d_sync));
    row("cuda_ipc D2D (poll)", size, gbps(bytes, ipc_s), "cudaMemcpyAsync D2D pipelined", gbps(bytes, d2d_pipe));
    row("cuda_ipc D2D (callback)", size, gbps(bytes, ipc_cb_s), "cudaMemcpy D2D", gbps(bytes, d2d_sync));

    const double h2d_ref = sync_ref(local.data(), pinned.data());
    const double h2d = run_windowed(io, count, window, [&](std::size_t, auto done) {
      poller.async_copy(streams.next(), 0, local.data(), pinned.data(), size, ex, done);
    });
    const double h2d_cb = run_windowed(io, count, window, [&](std::size_t, auto done) {
      kvx::cuda::async_copy(streams.next(), local.data(), pinned.data(), size, ex, done);
    });
    row("async_copy H2D pinned (poll)", size, gbps(bytes, h2d), "cudaMemcpy H2D pinned", gbps(bytes, h2d_ref));
    row("async_copy H2D pinned (callback)", size, gbps(bytes, h2d_cb), "cudaMemcpy H2D pinned", gbps(bytes, h2d_ref));
    const double d2h_ref = sync_ref(pinned.data(), local.data());
    const double d2h = run_windowed(io, count, window, [&](std::size_t, auto done) {
      poller.async_copy(streams.next(), 0, pinned.data(), local.data(), size, ex, done);
    });
    row("async_copy D2H pinned (poll)", size, gbps(bytes, d2h), "cudaMemcpy D2H pinned", gbps(bytes, d2h_ref));
    const double ipc_d2h = run_windowed(io, count, window, [&](std::size_t, auto done) {
      ipc.async_read(*remote, 0, std::span(pinned.data(), size), done);
    });
    row("cuda_ipc read into pinned host (poll)", size, gbps(bytes, ipc_d2h), "cudaMemcpy D2H pinned", gbps(bytes, d2h_ref));
  }

  // Through the transfer engine: a batch of reads of the peer's segment into
  // this process's registered GPU memory (the engine picks cuda_ipc by location).
  {
    using engine_t = kvx::transfer::transfer_engine<kvx::transfer::embedded_metadata, kvx::transport::local,
                                                    kvx::transport::cuda_ipc>;
    kvx::transfer::embedded_metadata meta(ex);
    kvx::transport::local local_net(ex);
    engine_t engine(meta, {.node = "bench"}, local_net, ipc);
    bool put = false, registered = false;
    meta.async_put(kvx::transfer::segment_metadata_key(remote->name), remote->to_json().dump(), [&](std::error_code) { put = true; });
    engine.async_register_memory(local.region(), "bench-local", [&](std::error_code ec, kvx::memory::segment_descriptor) {
      if (ec) die("register: " + ec.message());
      registered = true;
    });
    io.restart();
    io.run();
    if (!put || !registered) die("engine set-up");
    std::printf("\n| transfer engine, batch of reads | bytes | engine GB/s | cudaMemcpy D2D GB/s | ratio |\n| --- | --- | --- | --- | --- |\n");
    for (std::size_t size : {std::size_t{16} << 20, std::size_t{64} << 20, max_size}) {
      const std::size_t rounds = std::max<std::size_t>(4, total / size);
      auto one_batch = [&] {
        kvx::transfer::batch b;
        b.read(std::span(local.data(), size), remote->name, 0);
        bool done = false;
        engine.async_transfer(std::move(b), [&](std::error_code ec, kvx::transfer::batch_result r) {
          if (ec) die("engine: " + r.first_error().message());
          done = true;
        });
        io.restart();
        io.run();
        if (!done) die("engine: no completion");
      };
      one_batch();
      const auto t0 = clock_type::now();
      for (std::size_t i = 0; i < rounds; ++i) one_batch();
      const double eng_s = std::chrono::duration<double>(clock_type::now() - t0).count();
      (void)cudaDeviceSynchronize();
      const auto t1 = clock_type::now();
      for (std::size_t i = 0; i < rounds; ++i) {
        (void)cudaMemcpy(local.data(), local.data() + max_size, size, cudaMemcpyDeviceToDevice);
        (void)cudaStreamSynchronize(nullptr);
      }
      const double ref_s = std::chrono::duration<double>(clock_type::now() - t1).count();
      std::printf("| one read of %s | %s | %.1f | %.1f | %.2f |\n", human(size).c_str(), human(rounds * size).c_str(),
                  gbps(rounds * size, eng_s), gbps(rounds * size, ref_s), ref_s / eng_s);
    }
  }

  // Completion latency: one small copy at a time.
  constexpr std::size_t small = 4096, rounds = 2000;
  auto s = kvx::cuda::stream::create(0).value();
  auto timed = [&](auto&& start) { return run_windowed(io, rounds, 1, start) / rounds * 1e6; };
  const double cb_lat = timed([&](std::size_t, auto done) {
    kvx::cuda::async_copy(s.native(), local.data(), pinned.data(), small, ex, done);
  });
  const double poll_lat = timed([&](std::size_t, auto done) {
    poller.async_copy(s.native(), 0, local.data(), pinned.data(), small, ex, done);
  });
  const double ipc_lat = timed([&](std::size_t, auto done) { ipc.async_read(*remote, 0, std::span(local.data(), small), done); });
  const auto t0 = clock_type::now();
  for (std::size_t i = 0; i < rounds; ++i) (void)cudaMemcpy(local.data(), pinned.data(), small, cudaMemcpyHostToDevice);
  const double ref_h2d = std::chrono::duration<double>(clock_type::now() - t0).count() / rounds * 1e6;
  const auto t1 = clock_type::now();
  for (std::size_t i = 0; i < rounds; ++i) (void)cudaMemcpy(local.data(), local.data() + max_size, small, cudaMemcpyDeviceToDevice);
  const double ref_d2d = std::chrono::duration<double>(clock_type::now() - t1).count() / rounds * 1e6;
  std::printf("\n| 4 KiB op, one at a time | kvx us | reference | reference us | ratio |\n| --- | --- | --- | --- | --- |\n");
  std::printf("| async_copy H2D (callback) | %.1f | cudaMemcpy H2D | %.1f | %.2f |\n", cb_lat, ref_h2d, cb_lat / ref_h2d);
  std::printf("| async_copy H2D (poll) | %.1f | cudaMemcpy H2D | %.1f | %.2f |\n", poll_lat, ref_h2d, poll_lat / ref_h2d);
  std::printf("| cuda_ipc read D2D (poll) | %.1f | cudaMemcpy D2D | %.1f | %.2f |\n", ipc_lat, ref_d2d, ipc_lat / ref_d2d);
  return 0;
}
