#!/usr/bin/env python3
"""Draws docs/edge_time.svg and docs/edge_memory.svg (issue 11's plots) from measurements.

Inputs (written by bench/edge.sh in one sitting):
  bench/results/expert.json  Google Benchmark JSON of bench/expert (BM_GluExpert_onednn,
                             BM_RawMatmul_Glu, BM_GluRotating_onednn, BM_ReadBandwidth)
  bench/results/rss.json     {"f32/exact": kilobytes, ..., "gguf q4_0/exact": kilobytes}: peak
                             RSS of `hypermoe run` (from the bf16 checkpoint, or from GGUF files)
  bench/results/peers.json   optional: {"pytorch f32": {"1": ms, "32": ms, ...}, ...} per-token
                             times of the PyTorch GLU expert (bench/peers/pytorch_moe.py --expert)
  bench/results/machine.json optional: {"cpu": model, "flags": "avx2 avx512f ...", "threads": n},
                             for the titles

Not part of the build, the tests or CI; needs Debian's python3-matplotlib.
Usage: /usr/bin/python3 bench/plot_edge.py [RESULTS_DIR [DOCS_DIR [NAME]]]: writes
DOCS_DIR/edge_time.svg and edge_memory.svg, or edge_time_NAME.svg and edge_memory_NAME.svg.
"""
import json
import pathlib
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

results = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results")
docs = pathlib.Path(sys.argv[2] if len(sys.argv) > 2 else "docs")
suffix = f"_{sys.argv[3]}" if len(sys.argv) > 3 and sys.argv[3] else ""
machine = ""
if (results / "machine.json").exists():
    m = json.loads((results / "machine.json").read_text())
    machine = f"{m['cpu']} ({m['flags'] or 'no AVX2'}), {m['threads']} threads"
bench = json.loads((results / "expert.json").read_text())["benchmarks"]

name_re = re.compile(r"(BM_\w+?)(?:_onednn)?/d:1024/ff:2816/M:(\d+)/(\w+)(?:/(exact|fast))?/real_time")
series, rotating, bandwidth = {}, {}, None
for b in bench:
    if b["name"].startswith("BM_ReadBandwidth"):
        bandwidth = b["GB/s"]
        continue
    m = name_re.match(b["name"])
    if not m:
        continue
    kind, rows, fmt, prec = m.group(1), int(m.group(2)), m.group(3), m.group(4) or "exact"
    ms = b["real_time"] / 1e6 if b["time_unit"] == "ns" else b["real_time"]
    label = "oneDNN f32 matmul (ceiling)" if kind == "BM_RawMatmul_Glu" else f"{fmt} {prec}"
    if kind == "BM_GluRotating":
        rotating[label] = (b["MB"], b["GB/s"], rows)
        label += " (weights from memory)"
    if kind in ("BM_GluExpert", "BM_RawMatmul_Glu", "BM_GluRotating"):
        series.setdefault(label, {})[rows] = ms * 1e3 / rows  # microseconds per token

peers = {}
if (results / "peers.json").exists():
    peers = json.loads((results / "peers.json").read_text())

colors = {"f32": "C0", "bf16": "C1", "q8_0": "C2", "q4_0": "C3", "mxfp4": "C4", "q4_k": "C8"}
fig, ax = plt.subplots(figsize=(10, 5.5))
for label, points in sorted(series.items()):
    xs = sorted(points)
    fmt = label.split()[0]
    if "ceiling" in label:
        ax.plot(xs, [points[x] for x in xs], "k:", marker=".", label=label)
    elif "from memory" in label:  # weights streamed from memory: markers only
        ax.plot(xs, [points[x] for x in xs], "^", color=colors[fmt], markersize=9, label=label)
    else:
        ax.plot(xs, [points[x] for x in xs], "--" if "fast" in label else "-", color=colors[fmt], marker="o", label=label)
for i, (label, points) in enumerate(peers.items()):
    xs = sorted(int(x) for x in points)
    ax.plot(xs, [points[str(x)] * 1e3 / x for x in xs], "-.", color=f"C{5 + i}", marker="s", label=label)
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xlabel("tokens T through one GLU expert (d = 1024, ff = 2816), 2 threads")
ax.set_ylabel("time per token (µs)")
title = "hypermoe expert time per token by weight format and precision"
if machine:
    title += f"\n{machine}"
if bandwidth:
    title += f"\n(read bandwidth in the same run: {bandwidth:.1f} GB/s)"
ax.set_title(title)
ax.grid(True, which="both", alpha=0.3)
ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
fig.tight_layout()
fig.savefig(docs / f"edge_time{suffix}.svg")

rss = json.loads((results / "rss.json").read_text())
fig, ax = plt.subplots(figsize=(8, 4))
labels = list(rss)
ax.bar(labels, [rss[k] / 1024 for k in labels], label="peak RSS of hypermoe run")
# bytes a weight as held: q4_k's super-block scales are held per block of 32 (4.625 bits a weight)
weights = {"f32": 4.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "mxfp4": 17 / 32, "q4_k": 37 / 64}
# keys "FORMAT/PRECISION", or "gguf FORMAT/PRECISION" for a block read from a GGUF file as stored
expert_mb = [8 * 3 * 1024 * 2816 * weights[k.split("/")[0].split()[-1]] / 2**20 for k in labels]
ax.plot(labels, expert_mb, "ko", label="expert weight bytes in the format")
ax.plot(labels, [1.15 * e + 64 for e in expert_mb], "r_", markersize=30, label="target: 1.15 x weights + 64 MiB")
ax.set_ylabel("MiB")
ax.tick_params(axis="x", labelrotation=30)
for tick in ax.get_xticklabels():
    tick.set_horizontalalignment("right")
title = "Mixtral-like block (E = 8, d = 1024, ff = 2816) from a 138 MB bf16 checkpoint\n(gguf: the same block from a GGUF file, its blocks used as stored)"
ax.set_title(title + (f"\n{machine}" if machine else ""))
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(docs / f"edge_memory{suffix}.svg")
print("wrote", docs / f"edge_time{suffix}.svg", "and", docs / f"edge_memory{suffix}.svg")
