"""Compares the timings of cuda_quickcheck.py runs of two builds (the `ab` stage of gpu_run.sh):
`python3 benchmarks/ab_table.py BASE.json [BASE.json ...] -- NEW.json [NEW.json ...]`. Prints, per
shape, dtype and direction, the median of each run and the change of the new build against the
baseline, taken between each side's fastest run (slowdowns of the machine during a run, not the
kernels, make up most of the spread between runs)."""
from __future__ import annotations

import json
import sys


def load(paths):
    """{(shape, dtype, direction): [median_us of each run]} over the given JSON files."""
    runs = {}
    for path in paths:
        with open(path) as f:
            for t in json.load(f)["timings"]:
                for direction in ("fwd", "bwd"):
                    key = ("x".join(map(str, t["shape"])), t["dtype"].replace("torch.", ""), direction)
                    runs.setdefault(key, []).append(t[f"{direction}_us"])
    return runs


def table(base_paths, new_paths):
    base, new = load(base_paths), load(new_paths)
    lines = [f"{'shape':22s} {'dtype':9s} {'dir':4s} {'baseline us (runs)':24s} {'new us (runs)':24s} change"]
    for key in base:
        if key not in new:
            continue
        b, n = base[key], new[key]
        runs = lambda v: " ".join(f"{x:.0f}" for x in v)
        lines.append(f"{key[0]:22s} {key[1]:9s} {key[2]:4s} {runs(b):24s} {runs(n):24s} "
                     f"{100 * (min(n) / min(b) - 1):+.1f}%")
    return "\n".join(lines)


def main(argv):
    if "--" not in argv:
        raise SystemExit(__doc__)
    cut = argv.index("--")
    print(table(argv[:cut], argv[cut + 1:]))


if __name__ == "__main__":
    main(sys.argv[1:])
