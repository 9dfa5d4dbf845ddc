"""Host time per call of the scan, where a short problem leaves the GPU waiting for the host: the
op's forward and backward called directly (torch.ops.selective_scan), the autograd calls through
selective_scan, and, for comparison, torch's own cost of a custom autograd.Function with the same
eight differentiable inputs that does no work (it saves them and returns them as its gradients);
on CUDA also a forward + backward step captured once in a CUDA graph and replayed.
Each figure is per call, the median of `--rounds` rounds of `--calls` calls issued back to back
from a drained queue: the host time to issue them, and the wall time until the queue has drained
(the larger where the GPU work of a call takes longer than its host time; keep --calls small enough
that the launch queue never fills, or the host time waits for the GPU too). Prints a table, writes JSON (--out).
Works on the CPU too (there the op's own work is part of every figure)."""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import bench_scan
from selective_scan import selective_scan

GRAD_NAMES = ("u", "delta", "B", "C", "z", "D", "delta_bias", "A")


class _NoWork(torch.autograd.Function):
    """Saves its inputs, returns a view of the first; its gradients are the inputs themselves."""

    @staticmethod
    def forward(ctx, *xs):
        ctx.save_for_backward(*xs)
        return xs[0].view_as(xs[0])

    @staticmethod
    def backward(ctx, dout):
        return ctx.saved_tensors


def make_inputs(batch, dim, seqlen, dstate, dtype, device):
    gen = torch.Generator(device="cpu").manual_seed(seqlen + dim)

    def rn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    return dict(u=rn(batch, dim, seqlen).to(dtype), delta=rn(batch, dim, seqlen, scale=0.5).to(dtype),
                A=-torch.exp(rn(dim, dstate, scale=0.5)), B=rn(batch, dstate, seqlen).to(dtype),
                C=rn(batch, dstate, seqlen).to(dtype), D=rn(dim), z=rn(batch, dim, seqlen).to(dtype),
                delta_bias=rn(dim, scale=0.5) - 1.0)


def per_call_us(fn, calls, rounds, sync):
    """Median over `rounds` of (host time, wall time) per call, in us: the time to issue `calls`
    calls back to back from a drained queue, and that time plus draining the queue they left."""
    for _ in range(max(10, calls // 10)):
        fn()
    host, wall = [], []
    for _ in range(rounds):
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        issued = time.perf_counter()
        sync()
        end = time.perf_counter()
        host.append((issued - start) / calls * 1e6)
        wall.append((end - start) / calls * 1e6)
    return statistics.median(host), min(host), max(host), statistics.median(wall)


def time_cases(shape, dtype, dev, calls, rounds):
    """Records {shape, case, host_us, host_min_us, host_max_us, wall_us} of every case at one shape."""
    batch, dim, seqlen, dstate = (int(x) for x in shape.split("x"))
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    inp = make_inputs(batch, dim, seqlen, dstate, dtype, dev)
    ops = torch.ops.selective_scan
    args_fwd = (inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], inp["D"], inp["z"], inp["delta_bias"], None, True)
    out, _, checkpoints = ops.fwd(*args_fwd)
    dout = torch.randn_like(out)
    cases = {
        "op fwd": lambda: ops.fwd(*args_fwd),
        "op bwd": lambda: ops.bwd(dout, None, inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], inp["D"], inp["z"],
                                  inp["delta_bias"], None, checkpoints, True),
    }
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inp.items()}
    grads_of = [leaves[k] for k in GRAD_NAMES]
    cases["autograd fwd"] = lambda: selective_scan(**leaves, delta_softplus=True)
    out_g = selective_scan(**leaves, delta_softplus=True)
    cases["autograd bwd"] = lambda: torch.autograd.grad(out_g, grads_of, dout, retain_graph=True)
    cases["no-work Function fwd"] = lambda: _NoWork.apply(*grads_of)
    out_n = _NoWork.apply(*grads_of)
    cases["no-work Function bwd"] = lambda: torch.autograd.grad(out_n, grads_of, dout.to(out_n.dtype), retain_graph=True)

    def step_of(step_leaves):
        def fwd_bwd():
            out_s = selective_scan(**step_leaves, delta_softplus=True)
            return torch.autograd.grad(out_s, [step_leaves[k] for k in GRAD_NAMES], dout)
        return fwd_bwd

    cases["autograd fwd+bwd"] = step_of(leaves)
    if dev.type == "cuda":
        # the same step captured once in a CUDA graph and replayed; its leaves are first used on the
        # side stream of the warm-up (leaves used on the default stream before would make the
        # captured backward wait on it)
        graph_step = step_of({k: v.detach().clone().requires_grad_(True) for k, v in inp.items()})
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                graph_step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            graph_step()
        cases["CUDA graph fwd+bwd"] = graph.replay
    records = []
    for name, fn in cases.items():
        med, lo, hi, wall = per_call_us(fn, calls, rounds, sync)
        records.append(dict(shape=shape, case=name, host_us=med, host_min_us=lo, host_max_us=hi, wall_us=wall))
        print(f"  {name:22s} host {med:7.1f} us (rounds {lo:.1f}-{hi:.1f}), wall {wall:7.1f} us")
    return records


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", default="8x1536x128x16,8x1536x512x16,1x64x128x16", help="comma-separated BxDxLxN")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    dev = torch.device(args.device)
    records = []
    for shape in args.shapes.split(","):
        print(f"host time per call, {shape} {args.dtype} on {args.device} ({args.calls} calls x {args.rounds} rounds)")
        records += time_cases(shape, dtype, dev, args.calls, args.rounds)
    if args.out:
        machine = bench_scan.machine_info(args.device)
        for key in ("peak_mem", "fwd", "bwd", "fwdbwd"):
            machine.pop(key, None)
        machine["timing"] = ("host: time.perf_counter to issue --calls calls back to back from a drained queue; "
                             "wall: until the queue has drained; per call, median of --rounds rounds")
        with open(args.out, "w") as f:
            json.dump(dict(machine=machine, dtype=args.dtype, calls=args.calls, rounds=args.rounds,
                           records=records), f, indent=1)
    return records


if __name__ == "__main__":
    main()
