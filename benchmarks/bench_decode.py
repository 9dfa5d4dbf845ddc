"""Benchmark of the decode-step op (selective_state_update) against the same step in plain PyTorch:
median time per call (CUDA events over many calls, eager and CUDA-graph replay; wall clock on CPU),
achieved state bandwidth (fp32 state read + written) and its share of the device's copy bandwidth."""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import selective_scan  # noqa: E402
from bench_scan import git_commit  # noqa: E402
from selective_scan import selective_state_update, selective_state_update_ref  # noqa: E402

SHAPES = [(1, 5120, 16), (64, 5120, 16), (256, 5120, 16), (256, 5120, 64)]
H200_COPY_TBPS = 4.24  # the H200's measured device-to-device copy bandwidth (read + write), TB/s


def make_inputs(batch, dim, dstate, device, n_states, itype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    states = [r(batch, dim, dstate).to(device) for _ in range(n_states)]
    common = dict(
        x=r(batch, dim).to(device, itype), dt=(r(batch, dim) * 0.5).to(device, itype),
        A=(-torch.rand(dim, dstate, generator=g) - 0.1).to(device),
        B=r(batch, dstate).to(device, itype), C=r(batch, dstate).to(device, itype),
        D=r(dim).to(device), z=r(batch, dim).to(device, itype), dt_bias=(r(dim) * 0.5).to(device))
    return states, common


def op_call(state, c):
    return selective_state_update(state, c["x"], c["dt"], c["A"], c["B"], c["C"], c["D"], c["z"], c["dt_bias"], True)


def torch_call(state, c):
    return selective_state_update_ref(state, c["x"], c["dt"], c["A"], c["B"], c["C"], c["D"], c["z"], c["dt_bias"],
                                      True)


def copy_call(state, c):
    """A device copy of the same size as the step's state traffic (one state read, one written): the
    practical ceiling for a kernel that reads and writes the state once."""
    c["copy_dst"].copy_(state)


def time_cuda(fn, states, c, calls, reps, graph):
    """Median over `reps` of (elapsed / calls) for `calls` back-to-back calls rotating over states."""
    def body():
        for i in range(calls):
            fn(states[i % len(states)], c)

    if graph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            body()  # warm-up on a side stream before capture
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            body()
        run = g.replay
    else:
        run = body
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)  # us per call
    return statistics.median(times)


def time_cpu(fn, states, c, calls, reps):
    for i in range(3):
        fn(states[i % len(states)], c)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for i in range(calls):
            fn(states[i % len(states)], c)
        times.append((time.perf_counter() - t0) * 1e6 / calls)
    return statistics.median(times)


def machine_info(device):
    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "commit": git_commit(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "selective_scan": selective_scan.build_info(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": device}
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, sm_count=p.multi_processor_count, gpu_memory_gib=round(p.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, capability=f"{p.major}.{p.minor}",
                    l2_mib=getattr(p, "L2_cache_size", 0) / 2**20)
    else:
        info["processor"] = platform.processor() or platform.machine()
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--calls", type=int, default=0, help="calls per timing (default 200 on CUDA, 5 on CPU)")
    ap.add_argument("--reps", type=int, default=0, help="timings per case (default 15 on CUDA, 3 on CPU)")
    ap.add_argument("--working-set-mib", type=float, default=512.0,
                    help="states are rotated over enough buffers to exceed this (beats the L2), capped at 64")
    ap.add_argument("--shapes", default="", help="e.g. 1x5120x16,64x5120x16 (default: the four standard ones)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    cuda = dev == "cuda"
    calls = args.calls or (200 if cuda else 5)
    reps = args.reps or (15 if cuda else 3)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    rows = []
    print(f"device {dev}: {torch.cuda.get_device_name(0) if cuda else platform.processor() or platform.machine()}")
    print(f"{'batch':>5s} {'dim':>5s} {'dstate':>6s} | {'op us':>8s} {'graph us':>8s} {'torch us':>9s} "
          f"{'speedup':>7s} | {'op GB/s':>8s} {'graph GB/s':>10s} {'% 4.24TB/s':>10s} {'copy %':>6s}")
    for batch, dim, dstate in shapes:
        state_bytes = batch * dim * dstate * 4
        n_states = max(1, min(64, math.ceil(args.working_set_mib * 2**20 / state_bytes))) if cuda else 1
        states, c = make_inputs(batch, dim, dstate, dev, n_states)
        if cuda:
            t_op = time_cuda(op_call, states, c, calls, reps, graph=False)
            t_graph = time_cuda(op_call, states, c, calls, reps, graph=True)
            t_torch = time_cuda(torch_call, states, c, max(10, calls // 10), reps, graph=False)
            t_torch_graph = time_cuda(torch_call, states, c, max(10, calls // 10), reps, graph=True)
            c["copy_dst"] = torch.empty_like(states[0])
            t_copy_graph = time_cuda(copy_call, states, c, calls, reps, graph=True)
        else:
            t_op = time_cpu(op_call, states, c, calls, reps)
            t_torch = time_cpu(torch_call, states, c, max(2, calls // 2), reps)
            t_graph = t_torch_graph = t_copy_graph = None
        moved = 2 * state_bytes  # the state read once and written once
        other = batch * dim * 2 * 4 + dim * dstate * 4 + dim * 8 + batch * dstate * 2 * 2  # x dt z out, A, D bias, B C
        best = min(t for t in (t_op, t_graph) if t is not None)
        row = {"batch": batch, "dim": dim, "dstate": dstate, "state_buffers": n_states,
               "op_us": t_op, "op_graph_us": t_graph, "torch_us": t_torch, "torch_graph_us": t_torch_graph,
               "copy_graph_us": t_copy_graph,
               "speedup_vs_torch": t_torch / t_op,
               "state_bytes_moved": moved, "other_bytes": other,
               "op_state_GBps": moved / t_op / 1e3,
               "op_graph_state_GBps": moved / t_graph / 1e3 if t_graph else None,
               "best_state_GBps": moved / best / 1e3,
               "best_total_GBps": (moved + other) / best / 1e3}
        if cuda:
            row["best_pct_of_copy_bw"] = 100 * row["best_state_GBps"] / (H200_COPY_TBPS * 1e3)
            row["same_size_copy_pct_of_copy_bw"] = 100 * moved / t_copy_graph / 1e3 / (H200_COPY_TBPS * 1e3)
        rows.append(row)
        print(f"{batch:5d} {dim:5d} {dstate:6d} | {t_op:8.2f} {t_graph if t_graph else float('nan'):8.2f} "
              f"{t_torch:9.2f} {row['speedup_vs_torch']:7.1f} | {row['op_state_GBps']:8.1f} "
              f"{row['op_graph_state_GBps'] or float('nan'):10.1f} {row.get('best_pct_of_copy_bw', float('nan')):10.1f} "
              f"{row.get('same_size_copy_pct_of_copy_bw', float('nan')):6.1f}")
        del states, c
        if cuda:
            torch.cuda.empty_cache()
    report = {"benchmark": "decode step (selective_state_update)", "machine": machine_info(dev),
              "settings": {"x_dt_z_B_C": "bfloat16", "state": "float32", "dt_bias": True, "dt_softplus": True,
                           "D": True, "z": True, "n_groups": 1, "calls_per_timing": calls, "timings": reps,
                           "working_set_mib": args.working_set_mib if cuda else None,
                           "copy_bandwidth_TBps": H200_COPY_TBPS if cuda else None},
              "results": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
