#!/usr/bin/python3
"""Draws kvx-plan's JSON: cost against SLO attainment, and TTFT / TPOT CDFs.

usage: plot.py PLAN.json OUT_PREFIX
writes OUT_PREFIX + "cost_vs_attainment.png" and OUT_PREFIX + "ttft_cdf.png"
(e.g. OUT_PREFIX = docs/images/plan_).
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    with open(sys.argv[1]) as f:
        plan = json.load(f)
    prefix = sys.argv[2]
    slo = plan["slo"]
    title = "%s on %s, %d requests (x%g), SLO: TTFT p%g <= %gs, TPOT p%g <= %gs" % (
        plan["model"]["name"], plan["hardware"]["name"], plan["trace"]["requests"], plan["trace"]["time_scale"],
        slo["ttft_percentile"], slo["ttft_s"], slo["tpot_percentile"], slo["tpot_s"])

    fig, ax = plt.subplots(figsize=(9, 5.5))
    styles = {
        ("disagg", True): dict(marker="o", color="tab:blue", label="disaggregated, shared pool"),
        ("disagg", False): dict(marker="s", color="tab:cyan", label="disaggregated, no pool"),
        ("colocated", True): dict(marker="^", color="tab:red", label="colocated, shared pool"),
        ("colocated", False): dict(marker="v", color="tab:orange", label="colocated, no pool"),
    }
    seen = set()
    for e in plan["evaluated"]:
        key = (e["mode"], e["dram_gb"] > 0 or e["ssd_gb"] > 0)
        st = dict(styles[key])
        label = st.pop("label") if key not in seen else None
        seen.add(key)
        ax.scatter(e["cost_per_hour"], 100 * e["slo_attainment"], s=46, label=label,
                   facecolors=st["color"] if e["meets_slo"] else "none", edgecolors=st["color"], marker=st["marker"])
    best = plan.get("best")
    if best:
        ax.scatter(best["cost_per_hour"], 100 * best["slo_attainment"], s=260, marker="*", color="gold",
                   edgecolors="black", zorder=5, label="cheapest meeting the SLOs")
        ax.annotate(best["label"], (best["cost_per_hour"], 100 * best["slo_attainment"]), textcoords="offset points",
                    xytext=(8, -14), fontsize=8)
    ax.set_xlabel("cost, $ per hour")
    ax.set_ylabel("requests meeting both SLOs, %")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right", title="filled: meets the SLO percentiles", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(prefix + "cost_vs_attainment.png", dpi=110)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.6))
    qs = [q / 100 for q in range(101)]
    for c in plan["cdf"]:
        for ax, key in ((a1, "ttft_quantiles_s"), (a2, "tpot_quantiles_s")):
            xs = [x for x in c[key] if x is not None]
            ax.plot(xs, qs[:len(xs)], label="%s: %s" % (c["role"], c["label"]))
    a1.axvline(slo["ttft_s"], color="grey", ls="--")
    a2.axvline(slo["tpot_s"], color="grey", ls="--")
    a1.set_xscale("log")
    a2.set_xscale("log")
    a1.set_xlabel("time to first token, s")
    a2.set_xlabel("time per output token, s")
    a1.set_ylabel("fraction of requests (rejected never arrive)")
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
    a1.legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(prefix + "ttft_cdf.png", dpi=110)


if __name__ == "__main__":
    main()
