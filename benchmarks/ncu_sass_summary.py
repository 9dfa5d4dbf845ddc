"""Summarises Nsight Compute's per-instruction SASS page (`ncu --import R --page source --csv
--print-source sass`, plain or gzipped) for each kernel in it: the stall reasons over all sampled
instructions; each loop of the SASS (a backward branch and its body) with its share of the stall
samples and of the executed instructions, its executions per trip, shared-memory wavefronts (and the
bank conflicts among them: excessive wavefronts) and shuffles; and the instructions with the most
samples. Used by `benchmarks/gpu_run.sh profile`, whose report is too large to keep.

    python3 benchmarks/ncu_sass_summary.py ncu_sass.csv.gz [--top 20] [--window 0xbc60 0xcf80]
"""
import argparse
import csv
import gzip
import re
import sys
from collections import Counter

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"
WAVEFRONTS = "L1 Wavefronts Shared"
EXCESSIVE = "L1 Wavefronts Shared Excessive"
BRANCH_TARGET = re.compile(r"\bBRA\b.*?(0x[0-9a-fA-F]+)")
PREDICATE = re.compile(r"^@!?U?P\w+\s+")


def read_kernels(path):
    """{kernel name: [instruction rows as dicts]} from the CSV page; the file repeats a
    "Kernel Name" line and a header line per kernel."""
    opener = gzip.open if path.endswith(".gz") else open
    kernels, name, header = {}, None, None
    with opener(path, "rt", newline="") as f:
        for row in csv.reader(f):
            if not row:
                continue
            if row[0] == "Kernel Name":
                name, header = row[1] if len(row) > 1 else "?", None
                kernels.setdefault(name, [])
            elif header is None and name is not None:
                header = row
            elif name is not None and row[0].startswith("0x"):
                kernels[name].append(dict(zip(header, row)))
    return kernels


def number(row, key):
    try:
        return float(row.get(key) or 0)
    except ValueError:
        return 0.0


def opcode(sass):
    return PREDICATE.sub("", sass.strip()).split(" ")[0].split(".")[0]


def loops(rows):
    """(first, last) instruction indices of each loop: a branch to an address at or before it."""
    index = {int(r["Address"], 16): i for i, r in enumerate(rows)}
    found = set()
    for i, r in enumerate(rows):
        m = BRANCH_TARGET.search(r["Source"])
        if m:
            target = int(m.group(1), 16)
            if target <= int(r["Address"], 16) and target in index:
                found.add((index[target], i))
    return sorted(found)


def summarise(name, rows, top=15, window=None, out=sys.stdout):
    base = int(rows[0]["Address"], 16)
    samples = sum(number(r, SAMPLES) for r in rows) or 1.0
    executed = sum(number(r, EXECUTED) for r in rows) or 1.0
    print(f"== {name}", file=out)
    print(f"warp instructions {executed / 1e6:.1f} M, stall samples {samples:.0f}, shared wavefronts "
          f"{sum(number(r, WAVEFRONTS) for r in rows) / 1e6:.1f} M (excessive "
          f"{sum(number(r, EXCESSIVE) for r in rows) / 1e6:.1f} M)", file=out)
    stalls = Counter()
    for r in rows:
        for key, value in r.items():
            if key.startswith("stall_") and "Not Issued" not in key:
                stalls[key[len("stall_"):]] += number(r, key)
    total = sum(stalls.values()) or 1.0
    print("stall reasons: " + ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in stalls.most_common(10)), file=out)
    print("loops (offsets from the kernel's start): samples %, instructions %, executed per trip, "
          "shared wavefronts / excessive (M), shuffles (M)", file=out)
    for first, last in loops(rows):
        body = rows[first:last + 1]
        s = sum(number(r, SAMPLES) for r in body)
        e = sum(number(r, EXECUTED) for r in body)
        if s / samples < 0.005:
            continue
        trips = number(body[0], EXECUTED) or 1.0
        shuffles = sum(number(r, EXECUTED) for r in body if opcode(r["Source"]) == "SHFL")
        print(f"  {int(body[0]['Address'], 16) - base:#8x}-{int(body[-1]['Address'], 16) - base:#8x} "
              f"n={len(body):<5d}  {100 * s / samples:5.1f}%  {100 * e / executed:5.1f}%  {e / trips:7.0f}  "
              f"{sum(number(r, WAVEFRONTS) for r in body) / 1e6:7.1f} / "
              f"{sum(number(r, EXCESSIVE) for r in body) / 1e6:5.1f}  {shuffles / 1e6:6.1f}", file=out)
    by_op, op_samples = Counter(), Counter()
    for r in rows:
        by_op[opcode(r["Source"])] += number(r, EXECUTED)
        op_samples[opcode(r["Source"])] += number(r, SAMPLES)
    print("opcodes: " + ", ".join(f"{k} {v / 1e6:.1f}M ({100 * op_samples[k] / samples:.1f}% of samples)"
                                  for k, v in by_op.most_common(12)), file=out)
    print(f"top {top} instructions by samples (offset, samples, top stall, SASS):", file=out)
    for r in sorted(rows, key=lambda r: -number(r, SAMPLES))[:top]:
        reason = max((k for k in r if k.startswith("stall_") and "Not Issued" not in k),
                     key=lambda k: number(r, k), default="stall_?")
        print(f"  {int(r['Address'], 16) - base:#8x} {number(r, SAMPLES):7.0f}  {reason[len('stall_'):]:15s} "
              f"{r['Source'].strip()}", file=out)
    if window:
        lo, hi = window
        print(f"instructions {lo:#x}-{hi:#x} (offset, samples, executed, shared wavefronts, SASS):", file=out)
        for r in rows:
            offset = int(r["Address"], 16) - base
            if lo <= offset <= hi:
                print(f"  {offset:#8x} {number(r, SAMPLES):7.0f} {number(r, EXECUTED):10.0f} "
                      f"{number(r, WAVEFRONTS):10.0f}  {r['Source'].strip()}", file=out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", help="the SASS page as CSV (.csv or .csv.gz)")
    ap.add_argument("--top", type=int, default=15, help="instructions listed by samples")
    ap.add_argument("--window", nargs=2, metavar=("FROM", "TO"), type=lambda v: int(v, 0),
                    help="also list the instructions between these offsets (e.g. 0xbc60 0xcf80)")
    ap.add_argument("--kernel", default="", help="only kernels whose name contains this")
    args = ap.parse_args(argv)
    kernels = read_kernels(args.csv)
    if not kernels:
        raise SystemExit(f"no kernel's SASS page found in {args.csv}")
    for name, rows in kernels.items():
        if args.kernel in name and rows:
            summarise(name, rows, args.top, args.window)


if __name__ == "__main__":
    main()
