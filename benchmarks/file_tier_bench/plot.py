#!/usr/bin/python3
"""Plots file_tier_bench --json results: plot.py OUT.png RESULT.json [RESULT.json ...]"""
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

out, files = sys.argv[1], sys.argv[2:]
runs = sorted((json.load(open(f)) for f in files), key=lambda r: r["block_bytes"])
labels = ["%d KiB" % (r["block_bytes"] // 1024) for r in runs]
gib = 2.0 ** 30
fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
x = range(len(runs))
w = 0.27
a.bar([i - w for i in x], [r["reference_bytes_per_s"] / gib for r in runs], w, label="O_DIRECT sequential pread (reference)")
a.bar(list(x), [r["pread"]["bytes_per_s"] / gib for r in runs], w,
      label="file_tier load_many (pread, %s readers)" % runs[0].get("readers", 1))
if all("uring" in r for r in runs):
    a.bar([i + w for i in x], [r["uring"]["bytes_per_s"] / gib for r in runs], w, label="uring_file_tier load_many")
a.set_xticks(list(x), labels)
a.set_xlabel("block size")
a.set_ylabel("GiB/s (best of 3)")
a.set_title("File tier read bandwidth vs the reference, same run")
a.legend(fontsize=8)
for key, name in (("pread", "pread"), ("uring", "io_uring")):
    if all(key in r for r in runs):
        b.plot(labels, [r[key]["first_s"] * 1e3 for r in runs], "o-", label=name + ": first block")
        b.plot(labels, [r[key]["last_s"] * 1e3 for r in runs], "s--", label=name + ": last block")
b.set_yscale("log")
b.set_ylabel("ms after the load starts (512 MiB)")
b.set_xlabel("block size")
b.set_title("Pipelined multi-block load: first vs last block")
b.legend(fontsize=8)
fig.tight_layout()
fig.savefig(out, dpi=110)
