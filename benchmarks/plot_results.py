"""Renders a benchmark JSON of bench_scan.py (default benchmarks/results/h200.json) as a PNG: the
op's median forward and backward time per anchor shape and dtype (with the official kernel's time
where the JSON has it), and, when the JSON has the GPU sweeps, the time per element over seqlen and
the time over dstate. Needs matplotlib (the optional `plot` extra):
python benchmarks/plot_results.py [--json ..] [--out ..]."""
from __future__ import annotations

import argparse
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def shape_of(r):
    return (r["batch"], r["dim"], r["seqlen"], r["dstate"])


def plot_anchors(ax, ours):
    cases = sorted({shape_of(r) + (r["dtype"],) for r in ours}, key=lambda c: (c[4], c[:4]))
    width = 0.38
    for i, direction in enumerate(["fwd", "bwd"]):
        values, official = [], []
        for case in cases:
            match = [r for r in ours if shape_of(r) + (r["dtype"],) == case and r["direction"] == direction]
            values.append(match[0]["median_us"] if match else 0.0)
            official.append(match[0].get("official_h200_us") if match else None)
        xs = [k + (i - 0.5) * width for k in range(len(cases))]
        bars = ax.bar(xs, values, width, label=f"selective_scan {direction}")
        # A case without a record for this direction (e.g. dropped as out of date) reads "n/a".
        ax.bar_label(bars, labels=[f"{v:.0f}" if v else "n/a" for v in values], fontsize=7, rotation=90, padding=2)
        pts = [(x, o) for x, o in zip(xs, official) if o]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker="_", s=300, color="black", zorder=3,
                       label="official kernel" if i == 0 else None)
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([f"{b}x{d}\nx{l}x{n}\n{t}" for b, d, l, n, t in cases], fontsize=8)
    ax.set_ylabel("median time (us)")
    ax.legend(fontsize=8)
    ax.margins(y=0.15)


def plot_sweep(ax, recs, key, per_element, xlabel):
    for direction in ["fwd", "bwd"]:
        pts = sorted((r[key], r["median_us"] * (1e3 / (r["batch"] * r["dim"] * r["seqlen"]) if per_element else 1.0))
                     for r in recs if r["direction"] == direction)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=direction)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("ns per (b, d, l) element" if per_element else "median time (us)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=os.path.join(HERE, "results", "h200.json"))
    ap.add_argument("--out", default=None, help="default: the JSON's path with .png")
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(args.json) as f:
        data = json.load(f)
    machine, records = data["machine"], data["records"]
    ours = [r for r in records if r["provider"] == "selective_scan" and r.get("median_us")]
    anchors = [r for r in ours if r.get("suite", "anchor") == "anchor"]
    seq = [r for r in ours if r.get("suite") == "seqlen_sweep"]
    nst = [r for r in ours if r.get("suite") == "dstate_sweep"]
    n_cases = len({shape_of(r) + (r["dtype"],) for r in anchors})
    if seq or nst:
        fig = plt.figure(figsize=(max(10, 1.1 * n_cases), 8))
        grid = fig.add_gridspec(2, 2)
        plot_anchors(fig.add_subplot(grid[0, :]), anchors)
        ax = fig.add_subplot(grid[1, 0])
        plot_sweep(ax, seq, "seqlen", True, "seqlen at (8, 1536, L, 16), bf16")
        ax = fig.add_subplot(grid[1, 1])
        plot_sweep(ax, nst, "dstate", False, "dstate at (8, 1536, 2048, N), bf16")
    else:
        fig, ax = plt.subplots(figsize=(max(8, 1.1 * n_cases), 4.5))
        plot_anchors(ax, anchors)
    fig.suptitle(f"selective_scan on {machine.get('gpu') or machine.get('cpu')} "
                 f"(torch {machine.get('torch')}, {machine.get('date', '')[:10]}, commit {machine.get('commit')})",
                 fontsize=9)
    fig.tight_layout()
    out = args.out or os.path.splitext(args.json)[0] + ".png"
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
