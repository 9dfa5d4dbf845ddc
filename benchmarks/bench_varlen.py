"""Variable-length sequences: the scan of packed sequences (`cu_seqlens`) against the two ways
around it, one padded batch of all the sequences (padded to the longest; its last states would be
wrong) and one op call per sequence. Forward (no grad) and forward + backward, median time per
call with p20 / p80, and the steps each provider scans. Writes JSON with the machine's header.

    python3 benchmarks/bench_varlen.py [--device cuda] [--out benchmarks/results/h200_varlen.json]
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_scan import machine_info  # noqa: E402

from selective_scan import selective_scan  # noqa: E402
from selective_scan.varlen import padding_plan  # noqa: E402


def make_case(lengths, dim, dstate, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(device)
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return {
        "u": randn(1, dim, total).to(dtype), "delta": randn(1, dim, total, scale=0.5).to(dtype),
        "A": -torch.exp(randn(dim, dstate, scale=0.5)), "B": randn(1, dstate, total).to(dtype),
        "C": randn(1, dstate, total).to(dtype), "D": randn(dim), "z": randn(1, dim, total).to(dtype),
        "delta_bias": randn(dim, scale=0.1) - 4.0,
        "cu_seqlens": torch.tensor(offsets),  # on the CPU, as docs/api.md advises (no device sync)
    }


def padded_inputs(case, lengths):
    """All the sequences in one batch, each padded after its end to the longest."""
    longest, offsets = max(lengths), case["cu_seqlens"].tolist()

    def pad(x):
        rows = [torch.nn.functional.pad(x[..., offsets[i]:offsets[i + 1]], (0, longest - lengths[i]))
                for i in range(len(lengths))]
        return torch.cat(rows)
    return {k: pad(v) if k in ("u", "delta", "B", "C", "z") else v for k, v in case.items() if k != "cu_seqlens"}


def call(kw, cu_seqlens=None):
    return selective_scan(kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw["D"], kw["z"], kw["delta_bias"],
                          True, cu_seqlens=cu_seqlens)


def providers(case, lengths):
    offsets = case["cu_seqlens"].tolist()
    padded = padded_inputs(case, lengths)
    pieces = [{k: (v[..., offsets[i]:offsets[i + 1]] if k in ("u", "delta", "B", "C", "z") else v)
               for k, v in case.items() if k != "cu_seqlens"} for i in range(len(lengths)) if lengths[i] > 0]
    return {
        "varlen": (lambda kw: [call(kw, case["cu_seqlens"])], case),
        "padded_batch": (lambda kw: [call(kw)], padded),
        "per_sequence": (lambda kws: [call(kw) for kw in kws], pieces),
    }


def block_providers(lengths, dim, dstate, dtype, device):
    """A Mamba block (d_inner = dim) on the same sequences: packed (cu_seqlens), one padded batch,
    one call per sequence; hidden states (.., d_model = dim / 2)."""
    from selective_scan.nn import Mamba
    torch.manual_seed(0)
    block = Mamba(dim // 2, d_state=dstate, device=device, dtype=dtype)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, sum(lengths), dim // 2, generator=g).to(device=device, dtype=dtype)
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    cu = torch.tensor(offsets)
    longest = max(lengths)
    padded = torch.cat([torch.nn.functional.pad(x[:, offsets[i]:offsets[i + 1]], (0, 0, 0, longest - n))
                        for i, n in enumerate(lengths)])
    pieces = [x[:, offsets[i]:offsets[i + 1]] for i, n in enumerate(lengths) if n > 0]
    return {
        "block_varlen": (lambda h: [block(h, cu_seqlens=cu)], x),
        "block_padded_batch": (lambda h: [block(h)], padded),
        "block_per_sequence": (lambda hs: [block(h) for h in hs], pieces),
    }, block


def with_grad(inputs):
    def leaf(v):
        return v.detach().requires_grad_(True) if isinstance(v, torch.Tensor) and v.is_floating_point() else v

    def one(kw):
        return {k: leaf(v) for k, v in kw.items()} if isinstance(kw, dict) else leaf(kw)
    return [one(kw) for kw in inputs] if isinstance(inputs, list) else one(inputs)


def leaves_of(inputs):
    kws = inputs if isinstance(inputs, list) else [inputs]
    return [v for kw in kws for v in (kw.values() if isinstance(kw, dict) else [kw])
            if isinstance(v, torch.Tensor) and v.requires_grad]


def time_fn(fn, device, reps, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
    times.sort()
    def rank(q):
        return times[round(q * (len(times) - 1))]
    return statistics.median(times), rank(0.2), rank(0.8)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--num-seqs", type=int, default=64)
    ap.add_argument("--min-len", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--dstate", type=int, default=16)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--block", action="store_true",
                    help="also time a Mamba block (d_inner = dim) on the same sequences, three ways")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(args.min_len, args.max_len + 1, (args.num_seqs,), generator=g).tolist()
    case = make_case(lengths, args.dim, args.dstate, dtype, args.device)
    plan = padding_plan(lengths)
    steps = {"varlen": sum(len(b) * -(-lengths[b[0]] // 8) * 8 for b in plan),  # (rows of 8k steps)
             "padded_batch": len(lengths) * max(lengths),
             "per_sequence": sum(lengths)}
    records = []
    cases = dict(providers(case, lengths))
    if args.block:
        blocks, block = block_providers(lengths, args.dim, args.dstate, dtype, args.device)
        cases.update(blocks)
        for name, scan_name in (("block_varlen", "varlen"), ("block_padded_batch", "padded_batch"),
                                ("block_per_sequence", "per_sequence")):
            steps[name] = steps[scan_name]
    for name, (fn, inputs) in cases.items():
        with torch.no_grad():
            fwd = time_fn(lambda: fn(inputs), args.device, args.reps)
        grad_inputs = with_grad(inputs)
        leaves = leaves_of(grad_inputs)

        if name.startswith("block_"):  # the block's parameters too
            leaves = leaves + list(block.parameters())

        def fwdbwd():
            outs = fn(grad_inputs)
            torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs])
        both = time_fn(fwdbwd, args.device, args.reps)
        for direction, (med, p20, p80) in (("fwd", fwd), ("fwdbwd", both)):
            records.append({"provider": name, "direction": direction, "median_us": round(med, 1),
                            "p20_us": round(p20, 1), "p80_us": round(p80, 1), "steps_scanned": steps[name]})
            print(f"{name:14s} {direction:7s} {med:10.1f} us  (p20 {p20:.1f}, p80 {p80:.1f})  "
                  f"steps scanned {steps[name]}")
    machine = machine_info(args.device)
    for key in ("peak_mem", "bwd", "mamba_ssm"):  # (bench_scan's; not measured here)
        machine.pop(key, None)
    machine.update(timing=(f"median of {args.reps} calls after 3 warm-up calls, each timed alone "
                           f"({'CUDA events' if args.device == 'cuda' else 'time.perf_counter'})"),
                   fwd="inference under torch.no_grad()",
                   fwdbwd="forward with inputs requiring grad, then torch.autograd.grad of all outputs (ones)")
    result = {"machine": machine,
              "case": {"num_seqs": len(lengths), "total_steps": sum(lengths), "longest": max(lengths),
                       "lengths": lengths, "dim": args.dim, "dstate": args.dstate, "dtype": args.dtype,
                       "padded_batches": len(plan), "has_z": True, "delta_softplus": True},
              "records": records}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
