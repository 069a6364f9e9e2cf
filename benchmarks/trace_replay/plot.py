#!/usr/bin/python3
"""Plots block hit rate against capacity, one line per policy, Belady dashed as
the bound, from the JSON written by trace_replay --json.

usage: plot.py RESULTS.json OUT.png [--metric block_hit_rate|prefix_hit_rate|token_hit_rate]
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(argv):
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    metric = argv[4] if len(argv) > 4 and argv[3] == "--metric" else "block_hit_rate"
    with open(argv[1]) as f:
        data = json.load(f)
    series = {}
    for row in data["results"]:
        series.setdefault(row["policy"], []).append((row["capacity_blocks"], 100 * row[metric]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pts in series.items():
        pts.sort()
        xs, ys = zip(*pts)
        style = dict(color="black", linestyle="--", linewidth=2) if name == "belady" else dict(marker="o")
        ax.plot(xs, ys, label="belady (offline bound)" if name == "belady" else name, **style)
    ax.set_xscale("log")
    ax.set_xlabel("cache capacity (512-token blocks)")
    ax.set_ylabel(metric.replace("_", " ") + " (%)")
    ax.set_title("%s: %d requests" % (data["trace"].split("/")[-1], data["requests"]))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(argv[2], dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
