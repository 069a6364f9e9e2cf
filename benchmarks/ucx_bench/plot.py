#!/usr/bin/python3
"""Plots ucx_bench JSON lines: kvx ucx write bandwidth beside ucx_perftest put_bw.

usage: plot.py results.jsonl docs/images/ucx_bandwidth.png
"""
import json
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
bw = [r for r in rows if r["kind"] == "bandwidth"]
fig, ax = plt.subplots(figsize=(7, 4.2))
for i, tls in enumerate(dict.fromkeys(r["tls"] for r in bw)):
    rs = sorted((r for r in bw if r["tls"] == tls), key=lambda r: r["size"])
    xs = [r["size"] for r in rs]
    c = f"C{i}"
    ax.plot(xs, [r["kvx_write_gbps"] for r in rs], "o-", color=c, label=f"kvx ucx write ({tls})")
    ax.plot(xs, [r["perftest_put_gbps"] for r in rs], "s--", color=c, alpha=0.6, label=f"ucx_perftest put_bw ({tls})")
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xlabel("message size (bytes)")
ax.set_ylabel("GB/s")
ax.set_title("kvx::transport::ucx vs ucx_perftest, same run, 2-core VM")
ax.legend(fontsize=7)
ax.grid(True, which="both", alpha=0.3)
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
