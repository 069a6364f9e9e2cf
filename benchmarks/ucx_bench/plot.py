#!/usr/bin/python3
"""Plots ucx_bench JSON lines: kvx ucx write bandwidth beside ucx_perftest
put_bw (left), and 4 KiB latency beside ucp_put_lat (right). Several runs of
one configuration are drawn as their median.

usage: plot.py results.jsonl docs/images/ucx_bandwidth.png
"""
import json
import statistics
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]


def median_by(rs, key, field):
    groups = {}
    for r in rs:
        groups.setdefault(key(r), []).append(r[field])
    return {k: statistics.median(v) for k, v in groups.items()}


fig, (ax, lat) = plt.subplots(1, 2, figsize=(11, 4.4), gridspec_kw={"width_ratios": [3, 2]})
bw = [r for r in rows if r["kind"] == "bandwidth"]
for i, tls in enumerate(dict.fromkeys(r["tls"] for r in bw)):
    rs = [r for r in bw if r["tls"] == tls]
    kvx = median_by(rs, lambda r: r["size"], "kvx_write_gbps")
    ref = median_by(rs, lambda r: r["size"], "perftest_put_gbps")
    xs = sorted(kvx)
    c = f"C{i}"
    ax.plot(xs, [kvx[x] for x in xs], "o-", color=c, label=f"kvx ucx write ({tls})")
    ax.plot(xs, [ref[x] for x in xs], "s--", color=c, alpha=0.6, label=f"ucx_perftest put_bw ({tls})")
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xlabel("message size (bytes)")
ax.set_ylabel("GB/s")
ax.set_title("bandwidth (median of runs)")
ax.legend(fontsize=6)
ax.grid(True, which="both", alpha=0.3)

# Latency: the default (event) progress rows; ping-pong is ucp_put_lat's own
# method. A spinning ping-pong figure of 1 ms or more is a scheduler stall (both
# processes on one core), not latency: left out of the median.
STALL_US = 1000.0
lr = [r for r in rows if r["kind"] == "latency" and r.get("progress", "event") == "event"]
tlss = list(dict.fromkeys(r["tls"] for r in lr))
series = [("kvx write", "kvx_write_us"), ("kvx ping-pong (half RTT)", "kvx_pingpong_half_rtt_us"),
          ("ucp_put_lat (half RTT)", "perftest_put_lat_us"), ("ucp_put_lat -E sleep", "perftest_put_lat_sleep_us")]
width = 0.8 / len(series)
for j, (label, field) in enumerate(series):
    vals = [statistics.median([r[field] for r in lr if r["tls"] == t and field in r and r[field] < STALL_US]
                              or [float("nan")]) for t in tlss]
    lat.bar([k + j * width for k in range(len(tlss))], vals, width, label=label)
lat.set_xticks([k + 1.5 * width for k in range(len(tlss))])
lat.set_xticklabels(tlss)
lat.set_yscale("log")
lat.set_ylabel("µs, p50 (median of runs)")
lat.set_title("4 KiB latency (stalls >= 1 ms left out)")
lat.legend(fontsize=6)
lat.grid(True, axis="y", which="both", alpha=0.3)
fig.suptitle("kvx::transport::ucx vs ucx_perftest, same runs, shared 2-core VM", fontsize=10)
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
