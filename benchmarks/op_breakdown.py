"""Where one call of the op spends its time: the forward and the backward of `selective_scan` at
given shapes, split by what runs (torch.profiler). On CUDA each row is a device kernel (the scan
kernel, the fixed-order sums of the backward's partial buffers, copies and conversions) with its
time per call; on the CPU each row is an operator with its self time per call. The steps are those
of bench_scan.py (fwd: inference; bwd: torch.autograd.grad through a retained graph).

    python3 benchmarks/op_breakdown.py --device cuda --shapes 8x1536x2048x16,8x1536x2048x64 --dtype bf16

Prints one table per shape and direction; --out writes them as JSON with the machine header."""
from __future__ import annotations

import argparse
import json

import torch
from torch.profiler import ProfilerActivity, profile

import bench_scan


def event_time_us(event, device):
    """Time of a profiler row summed over its calls: device time of a kernel, self time of a CPU op."""
    if device == "cuda":
        return getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)
    return event.self_cpu_time_total


def breakdown(step, device, calls):
    """Rows (name, launches per call, us per call, share of the call) of `calls` runs of `step`."""
    for _ in range(3):  # warm-up: allocator, first-call setup
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    activity = ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        for _ in range(calls):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        us = event_time_us(event, device) / calls
        if us > 0:
            rows.append({"name": event.key, "per_call": event.count / calls, "us": us})
    total = sum(r["us"] for r in rows)
    for r in rows:
        r["share"] = r["us"] / total if total > 0 else 0.0
    rows.sort(key=lambda r: r["us"], reverse=True)
    return rows, total


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--shapes", default="8x1536x2048x16", help="BATCHxDIMxSEQLENxDSTATE, comma-separated")
    ap.add_argument("--dtype", default=None, choices=sorted(bench_scan.DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--directions", default="fwd,bwd", help="fwd, bwd or both")
    ap.add_argument("--calls", type=int, default=5, help="profiled calls per shape and direction")
    ap.add_argument("--rows", type=int, default=8, help="rows printed per table")
    ap.add_argument("--out", default=None, help="JSON file for the tables")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    dtype_name = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    directions = [d for d in args.directions.split(",") if d]
    if not directions or any(d not in ("fwd", "bwd") for d in directions):
        raise SystemExit(f"--directions: expected fwd, bwd or both, got {args.directions!r}")
    shapes = [bench_scan.parse_shape(s) for s in args.shapes.split(",") if s]

    tables = []
    unit = "device kernel" if args.device == "cuda" else "operator (self time)"
    for shape in shapes:
        kw = bench_scan.make_inputs(*shape, bench_scan.DTYPES[dtype_name], args.device)
        for direction in directions:
            step = bench_scan.make_steps(bench_scan.selective_scan_fn, kw, direction, args.device)
            rows, total = breakdown(step, args.device, args.calls)
            tables.append({"batch": shape[0], "dim": shape[1], "seqlen": shape[2], "dstate": shape[3],
                           "dtype": dtype_name, "direction": direction, "total_us": total, "rows": rows})
            print(f"\n{'x'.join(map(str, shape))} {dtype_name} {direction}: {total:.1f} us per call "
                  f"in {len(rows)} rows, by {unit}")
            for r in rows[:args.rows]:
                print(f"  {r['us']:10.1f} us {100 * r['share']:5.1f}%  x{r['per_call']:g}  {r['name'][:90]}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": bench_scan.machine_info(args.device), "tables": tables}, f, indent=1)
        print(f"\nwrote {args.out}")
    return tables


if __name__ == "__main__":
    main()
