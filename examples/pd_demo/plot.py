#!/usr/bin/python3
"""Plots the TTFT and TPOT distributions (empirical CDFs, one line per
deployment) from the JSON report written by kvx_pd_demo --json.

usage: plot.py REPORT.json OUT.png
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def cdf(values):
    xs = sorted(values)
    n = len(xs)
    return xs, [(i + 1) / n for i in range(n)]


def main(argv):
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[1]) as f:
        report = json.load(f)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for metric, ax, title in (("ttft_samples_s", axes[0], "time to first token"),
                              ("tpot_samples_s", axes[1], "time per output token")):
        for mode in report["modes"]:
            samples = [1e3 * v for v in mode.get(metric, [])]
            if not samples:
                continue
            xs, ys = cdf(samples)
            ax.step(xs, ys, where="post", label=mode["mode"])
        ax.set_xscale("log")
        ax.set_xlabel("ms (log scale)")
        ax.set_ylabel("share of requests")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("kvx_pd_demo: " + report.get("source", ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(argv[2], dpi=110)
    print("wrote " + argv[2])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
