"""Renders a benchmark JSON of bench_scan.py (default benchmarks/results/h200.json) as a PNG: the
op's median forward and backward time per shape and dtype, next to the reference scans where they
ran. Needs matplotlib (the optional `plot` extra): python benchmarks/plot_results.py [--json ..] [--out ..]."""
from __future__ import annotations

import argparse
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


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
    cases = sorted({(r["batch"], r["dim"], r["seqlen"], r["dstate"], r["dtype"]) for r in ours},
                   key=lambda c: (c[4], c[:4]))
    directions = ["fwd", "bwd"]
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(cases)), 4.5))
    width = 0.38
    for i, direction in enumerate(directions):
        values = []
        for case in cases:
            match = [r for r in ours if (r["batch"], r["dim"], r["seqlen"], r["dstate"], r["dtype"]) == case
                     and r["direction"] == direction]
            values.append(match[0]["median_us"] if match else 0.0)
        xs = [k + (i - 0.5) * width for k in range(len(cases))]
        bars = ax.bar(xs, values, width, label=f"selective_scan {direction}")
        ax.bar_label(bars, labels=[f"{v:.0f}" for v in values], fontsize=7, rotation=90, padding=2)
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([f"{b}x{d}\nx{l}x{n}\n{t}" for b, d, l, n, t in cases], fontsize=8)
    ax.set_ylabel("median time (us)")
    ax.set_title(f"selective_scan on {machine.get('gpu') or machine.get('cpu')} "
                 f"(torch {machine.get('torch')}, {machine.get('date', '')[:10]}, commit {machine.get('commit')})",
                 fontsize=9)
    ax.legend(fontsize=8)
    ax.margins(y=0.15)
    fig.tight_layout()
    out = args.out or os.path.splitext(args.json)[0] + ".png"
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
