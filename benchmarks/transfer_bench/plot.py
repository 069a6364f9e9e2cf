#!/usr/bin/python3
"""Sweeps transfer_bench over block sizes (4 KiB .. 64 MiB) per transport and
plots GB/s against block size, each transport beside its same-run reference
(single-thread memcpy; for tcp the plain loopback socket stream moving the
same working set as the batch, with the one-buffer, cache-resident stream
drawn dotted beside it).

  /usr/bin/python3 benchmarks/transfer_bench/plot.py \
      --bench build/shm-rel/benchmarks/transfer_bench/transfer_bench \
      --out docs/images/transfer_bandwidth.png --json results.json

Each point is one `transfer_bench --mode both` run; the raw JSON lines are
written to --json so the table in docs/benchmarks/transfer.md can be made
from the same data. `--no-plot` only sweeps (for a machine without
matplotlib); `--from-json FILE` only plots a sweep written earlier.
"""
import argparse
import json
import subprocess
import sys

SIZES = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]
RUNS = [
    ("shm (memfd)", ["--transport", "shm", "--memory", "memfd"], "memcpy_gbps"),
    ("shm (process_vm)", ["--transport", "shm", "--memory", "heap"], "memcpy_gbps"),
    ("tcp (1 connection)", ["--transport", "tcp", "--connections", "1", "--no-iperf3"], "socket_stream_batch_gbps"),
    ("tcp (4 connections)", ["--transport", "tcp", "--connections", "4", "--no-iperf3"], "socket_stream_batch_gbps"),
    ("local", ["--transport", "local"], "memcpy_gbps"),
]


def batch_for(size):
    # 64 ops per batch for small blocks, fewer for large ones: at most 64 MiB in flight.
    return max(1, min(64, (64 << 20) // size))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", help="transfer_bench to sweep (not with --from-json)")
    ap.add_argument("--from-json", default=None, help="plot this earlier --json sweep instead of running one")
    ap.add_argument("--no-plot", action="store_true", help="sweep and write --json only")
    ap.add_argument("--title", default=None)
    ap.add_argument("--out", default="docs/images/transfer_bandwidth.png")
    ap.add_argument("--json", default=None, help="write all result lines here")
    ap.add_argument("--duration", default="1")
    ap.add_argument("--op", default="read")
    ap.add_argument("--transports", default=None, help="comma-separated labels prefixes to run (default: all)")
    args = ap.parse_args()
    if not args.from_json and not args.bench:
        ap.error("--bench or --from-json is required")

    results = []
    if args.from_json:
        with open(args.from_json) as f:
            results = json.load(f)
    for label, flags, ref in [] if args.from_json else RUNS:
        if args.transports and not any(label.startswith(t) for t in args.transports.split(",")):
            continue
        for size in SIZES:
            cmd = [args.bench, *flags, "--op", args.op, "--block-size", str(size), "--batch-size",
                   str(batch_for(size)), "--duration", args.duration, "--mode", "both"]
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if run.returncode != 0 or not run.stdout.strip():
                print(f"{label} {size}: failed: {run.stderr.strip()}", file=sys.stderr)
                continue
            r = json.loads(run.stdout.strip().splitlines()[-1])
            r["label"], r["reference_key"] = label, ref
            results.append(r)
            print(f"{label:20s} {size:>9d} B  {r['gbps']:7.2f} GB/s  ref {r.get(ref, 0):7.2f} GB/s", flush=True)

    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.no_plot:
        return

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, _, ref) in enumerate(RUNS):
        pts = [r for r in results if r["label"] == label]
        if not pts:
            continue
        xs = [r["block_size"] for r in pts]
        c = colors[i % len(colors)]
        ax.plot(xs, [r["gbps"] for r in pts], "o-", color=c, label=label)
        ref_name = "socket stream, batch's working set" if ref == "socket_stream_batch_gbps" else "memcpy"
        ax.plot(xs, [r.get(ref, 0) for r in pts], "--", color=c, alpha=0.6, label=f"{label}: {ref_name} (same run)")
        if ref == "socket_stream_batch_gbps" and label.startswith("tcp (1"):
            ax.plot(xs, [r.get("socket_stream_gbps", 0) for r in pts], ":", color=c, alpha=0.6,
                    label=f"{label}: socket stream, one cached buffer (same run)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(SIZES)
    ax.set_xticklabels(["4K", "16K", "64K", "256K", "1M", "4M", "16M", "64M"])
    ax.set_xlabel("block size")
    ax.set_ylabel("GB/s")
    ax.set_title(args.title or f"kvx transfer_bench, {args.op}, one initiating thread")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
