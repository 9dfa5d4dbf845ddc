"""Benchmark of selective_scan against the reference scans (sequential selective_scan_ref,
materialised selective_scan_parallel_ref) and mamba-ssm's selective_scan_fn when importable:
median/p20/p80 time and peak memory per direction; on a GPU also the sweeps over seqlen and dstate
and, per record, the achieved exp rate, bandwidth and share of the floor (see `floor_model`);
prints a table and ratios, writes JSON."""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
try:
    import selective_scan
except ImportError:  # an in-place build without PYTHONPATH
    sys.path.insert(0, os.path.join(ROOT, "python"))
    import selective_scan

from selective_scan import selective_scan_fn, selective_scan_parallel_ref, selective_scan_ref

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CPU_SHAPES = [(2, 256, 1024, 16)]
CPU_QUICK_SHAPES = [(2, 128, 512, 16)]
GPU_SHAPES = [(2, 1536, 2048, 16), (8, 1536, 2048, 16), (4, 5120, 2048, 16), (1, 2048, 16384, 16),
              (16, 4096, 1024, 16), (8, 1536, 2048, 64)]
# Sweeps (ours, and mamba-ssm when importable): seqlen at (8, 1536, *, 16), dstate at (8, 1536, 2048),
# and the off-path cases: batch 1, short sequences, fp16.
SEQLEN_SWEEP = [(8, 1536, L, 16) for L in (128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)]
DSTATE_SWEEP = [(8, 1536, 2048, N) for N in (4, 8, 16, 32, 64, 128, 256)]
OFF_PATH = [((1, 1536, 2048, 16), "bf16"), ((8, 1536, 2048, 16), "fp16"), ((8, 1536, 128, 16), "fp16")]
# The official kernel (mamba-ssm selective_scan_cuda, built for sm_90) measured on an H200 on
# 2026-11-29 with the same inputs (bf16, z, softplus, variable B/C; fp32 row: fp32 inputs), median us.
OFFICIAL_H200_US = {
    ((8, 1536, 2048, 16), "bf16"): {"fwd": 448, "bwd": 1740},
    ((4, 5120, 2048, 16), "bf16"): {"fwd": 734, "bwd": 2860},
    ((1, 2048, 16384, 16), "bf16"): {"fwd": 748, "bwd": 2911},
    ((16, 4096, 1024, 16), "bf16"): {"fwd": 1115, "bwd": 4584},
    ((8, 1536, 2048, 64), "bf16"): {"fwd": 1496, "bwd": 6637},
    ((8, 1536, 2048, 16), "fp32"): {"fwd": 878, "bwd": 2035},
}
# The references run at these GPU shapes only (the sequential one takes seconds per call and the
# parallel one materialises batch*seqlen*dim*dstate tensors); elsewhere the record says so.
GPU_REF_SHAPES = {(2, 1536, 2048, 16)}


def mamba_ssm_fn():
    """mamba-ssm's selective_scan_fn when the package imports (it needs CUDA), else None."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as fn
        return fn
    except Exception:  # not installed, or built for another torch/CUDA
        return None


def make_inputs(batch, dim, seqlen, dstate, dtype, device, seed=0):
    """Mamba-like inputs: variable B and C in u's dtype, z, D, delta_bias with softplus."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    dt0 = torch.exp(torch.rand(dim, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    kw = dict(
        u=randn(batch, dim, seqlen).to(dtype),
        delta=(0.5 * randn(batch, dim, seqlen)).to(dtype),
        A=-torch.arange(1, dstate + 1, dtype=torch.float32).repeat(dim, 1),
        B=randn(batch, dstate, seqlen).to(dtype),
        C=randn(batch, dstate, seqlen).to(dtype),
        D=randn(dim),
        z=randn(batch, dim, seqlen).to(dtype),
        delta_bias=torch.log(torch.expm1(dt0)),
    )
    return {k: v.to(device) for k, v in kw.items()}


PROVIDERS = {
    "selective_scan": selective_scan_fn,
    "ref_sequential": selective_scan_ref,
    "ref_parallel": selective_scan_parallel_ref,
}


def call(fn, kw):
    return fn(kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw["D"], kw["z"], kw["delta_bias"],
              True)


# ---------------------------------------------------------------- timing and memory

def percentile(values, q):
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def time_calls(step, device, budget_s, min_reps, max_reps, warmup):
    """Per-call times in microseconds: CUDA events around each call on GPU, perf_counter on CPU.
    The first timed call also sizes the run: the repeat count fills `budget_s`, within
    [min_reps, max_reps]."""
    for _ in range(warmup):
        step()

    def timed_once():
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            return 1e3 * start.elapsed_time(end)
        t0 = time.perf_counter()
        step()
        return 1e6 * (time.perf_counter() - t0)

    first = timed_once()
    reps = int(max(min_reps, min(max_reps, budget_s / max(first * 1e-6, 1e-9))))
    times = [first]
    if device == "cuda" and reps > 1:  # back to back, one event pair per call
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(reps - 1)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize()
        times += [1e3 * s.elapsed_time(e) for s, e in events]
    else:
        times += [timed_once() for _ in range(reps - 1)]
    return times


class _QuietStderr:
    """Silences file descriptor 2 (the profiler's start/stop log lines) inside the block."""

    def __enter__(self):
        sys.stderr.flush()
        self.saved = os.dup(2)
        self.null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(self.null, 2)

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)
        os.close(self.null)


def _allocation_events(step):
    """(time_ns, bytes) of every torch CPU allocator event (frees negative) during one call, from
    the torch profiler with profile_memory; the low-level entry points skip the costly building
    of per-op event objects that torch.profiler.profile does on exit."""
    from torch._C._profiler import _EventType

    try:
        from torch._C._autograd import _disable_profiler, _enable_profiler, _prepare_profiler
        from torch._C._profiler import (ProfilerActivity, ProfilerConfig, ProfilerState,
                                        _ExperimentalConfig)

        config = ProfilerConfig(ProfilerState.KINETO, False, True, False, False, False,
                                _ExperimentalConfig())
        activities = {ProfilerActivity.CPU}
        with _QuietStderr():
            _prepare_profiler(config, activities)
            _enable_profiler(config, activities)
            try:
                step()
            finally:
                result = _disable_profiler()
        roots = result.experimental_event_tree()
    except (ImportError, TypeError, AttributeError):  # other torch versions: the public API
        from torch.profiler import ProfilerActivity, profile

        with _QuietStderr():
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                step()
        roots = prof.profiler.kineto_results.experimental_event_tree()
    events, stack = [], list(roots)
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
    events.sort(key=lambda e: e[0])
    return events


def cpu_peak_bytes(step):
    """Peak bytes held by torch's CPU allocator during one call, above what was held before it:
    the maximum running sum of the allocation and free events (memory that bypasses torch's
    allocator is not seen)."""
    live = peak = 0
    for _, size in _allocation_events(step):
        live += size
        peak = max(peak, live)
    return peak


def cuda_peak_bytes(step):
    """torch.cuda.max_memory_allocated during one call, above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def make_steps(fn, kw, direction, device, seed=1):
    """The callable timed for a direction. fwd: inference (torch.no_grad). fwdbwd: forward with
    inputs requiring grad, then torch.autograd.grad for a random dout. bwd: torch.autograd.grad
    through a graph built once (retain_graph), dout fixed."""
    g = torch.Generator().manual_seed(seed)
    dout = torch.randn(kw["u"].shape, generator=g).to(kw["u"].dtype).to(device)
    if direction == "fwd":
        def step():
            with torch.no_grad():
                call(fn, kw)
        return step
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in kw.items()}
    names = list(leaves)
    if direction == "fwdbwd":
        def step():
            out = call(fn, leaves)
            torch.autograd.grad(out, [leaves[n] for n in names], dout)
        return step
    out = call(fn, leaves)

    def step():
        torch.autograd.grad(out, [leaves[n] for n in names], dout, retain_graph=True)
    return step


def is_oom(err):
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower() or \
        isinstance(err, MemoryError)


def bench_one(provider, fn, shape, dtype_name, direction, device, args, sweep=False):
    batch, dim, seqlen, dstate = shape
    rec = dict(provider=provider, batch=batch, dim=dim, seqlen=seqlen, dstate=dstate,
               dtype=dtype_name, has_z=True, direction=direction, median_us=None, p20_us=None,
               p80_us=None, peak_mem_bytes=None, reps=0, skipped=None)
    kw = make_inputs(batch, dim, seqlen, dstate, DTYPES[dtype_name], device)
    slow = provider == "ref_sequential"
    if device == "cuda":
        budget, min_reps, max_reps, warmup = (0.3, 3, 20, 1) if slow else (1.0, 10, 200, 3)
    else:
        budget, min_reps, max_reps, warmup = (0.5, 1, 3, 0) if slow else (2.0, 5, 100, 0)
    if args.quick:
        budget, min_reps, max_reps = budget / 4, min(min_reps, 3), max(min(max_reps, 10), 1)
    if sweep:
        budget, min_reps = budget / 3, min(min_reps, 5)
    try:
        step = make_steps(fn, kw, direction, device)
        if device == "cpu":  # the profiled call (untimed) doubles as the warm-up
            try:
                rec["peak_mem_bytes"] = cpu_peak_bytes(step)
            except Exception as err:  # profiler internals differ in this torch version
                rec["peak_mem_bytes"] = None
                rec["mem_note"] = f"not measured: {type(err).__name__}: {err}"
                warmup = max(warmup, 1)
        times = time_calls(step, device, budget, min_reps, max_reps, warmup)
        rec.update(median_us=statistics.median(times), p20_us=percentile(times, 0.2),
                   p80_us=percentile(times, 0.8), reps=len(times))
        if device == "cuda":
            rec["peak_mem_bytes"] = cuda_peak_bytes(step)
    except Exception as err:
        if not is_oom(err):
            raise
        rec["skipped"] = f"out of memory: {str(err).splitlines()[0][:160]}"
        rec.update(median_us=None, p20_us=None, p80_us=None, peak_mem_bytes=None)
    finally:
        del kw
        if device == "cuda":
            torch.cuda.empty_cache()
    return rec


def parallel_ref_bytes(shape, direction):
    """Rough bytes the parallel reference holds: ~4 materialised (batch, seqlen, dim, dstate) fp32
    tensors per round of its log2(seqlen)-round scan when the graph is kept, ~4 otherwise."""
    batch, dim, seqlen, dstate = shape
    one = 4 * batch * dim * seqlen * dstate
    rounds = max(1, math.ceil(math.log2(max(seqlen, 2))))
    return one * (4 * rounds + 4 if direction != "fwd" else 6)


# H200 rates for the floor model: special-function (exp) results and FP32 instructions per SM per
# clock, the SM clock seen under load, and the measured device-to-device copy bandwidth.
MUFU_PER_SM_CLK, FP32_PER_SM_CLK, SM_CLOCK_HZ, HBM_BYTES_PER_S = 16, 128, 1.98e9, 4.24e12


def floor_model(shape, dtype_name, direction, sm_count):
    """Work of one call by the floor model of docs/design.md, per element (b, d, l) at N = dstate:
    forward N + 3 exps, 4N + 25 FP32 instructions, 4 row tensors moved (u, delta, z in, out);
    backward N + 4 exps, 12N + 40 FP32 instructions, 7 row tensors (u, delta, z, dout in; du,
    ddelta, dz out); plus B and C per (b, l) (and their fp32 gradients). Returns the exps, bytes
    and the floor time in us: the slowest of the exp, FP32 and HBM times at full rate."""
    batch, dim, seqlen, n = shape
    esize = 4 if dtype_name == "fp32" else 2
    elems, rows_bl = batch * dim * seqlen, batch * seqlen
    parts = {"fwd": [("fwd", n + 3, 4 * n + 25, 4 * esize * elems + 2 * n * esize * rows_bl)],
             "bwd": [("bwd", n + 4, 12 * n + 40, 7 * esize * elems + 2 * n * (esize + 4) * rows_bl)]}
    parts["fwdbwd"] = parts["fwd"] + parts["bwd"]
    exps = bytes_ = floor = 0.0
    for _, e, ops, b in parts[direction]:
        t_exp = elems * e / (sm_count * MUFU_PER_SM_CLK * SM_CLOCK_HZ)
        t_fp32 = elems * ops / (sm_count * FP32_PER_SM_CLK * SM_CLOCK_HZ)
        t_hbm = b / HBM_BYTES_PER_S
        exps, bytes_, floor = exps + elems * e, bytes_ + b, floor + max(t_exp, t_fp32, t_hbm)
    return exps, bytes_, floor * 1e6


def add_rates(rec, sm_count):
    """Achieved Texp/s and TB/s, the floor and the share of it reached, and the official kernel's time."""
    shape = (rec["batch"], rec["dim"], rec["seqlen"], rec["dstate"])
    exps, bytes_, floor_us = floor_model(shape, rec["dtype"], rec["direction"], sm_count)
    rec["floor_us"] = floor_us
    official = OFFICIAL_H200_US.get((shape, rec["dtype"]), {})
    rec["official_h200_us"] = (official["fwd"] + official["bwd"] if rec["direction"] == "fwdbwd" and official
                               else official.get(rec["direction"]))
    if rec["median_us"]:
        t = rec["median_us"] * 1e-6
        rec.update(texp_per_s=exps / t / 1e12, tb_per_s=bytes_ / t / 1e12,
                   pct_of_floor=100.0 * floor_us / rec["median_us"])


def bench_cases(shapes, dtypes, sweeps):
    """(shape, dtype, suite) of every case: the anchor shapes in each dtype, then (with `sweeps`)
    the seqlen and dstate sweeps in bf16 and the off-path cases."""
    cases = [(shape, dt, "anchor") for shape in shapes for dt in dtypes]
    if sweeps:
        cases += [(shape, "bf16", "seqlen_sweep") for shape in SEQLEN_SWEEP]
        cases += [(shape, "bf16", "dstate_sweep") for shape in DSTATE_SWEEP]
        cases += [(shape, dt, "off_path") for shape, dt in OFF_PATH]
    return cases


def parse_shape(text):
    """(batch, dim, seqlen, dstate) from one BATCHxDIMxSEQLENxDSTATE entry of --shapes."""
    parts = text.lower().split("x")
    if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise SystemExit(f"--shapes: expected BATCHxDIMxSEQLENxDSTATE entries, got {text!r}")
    return tuple(int(p) for p in parts)


def plan(args, device):
    """(provider, fn, shape, dtype, direction, reason-to-skip-or-None) for every record."""
    if args.shapes:
        shapes = [parse_shape(s) for s in args.shapes.split(",")]
    elif device == "cuda":
        shapes = GPU_SHAPES[:1] if args.quick else GPU_SHAPES
    else:
        shapes = CPU_QUICK_SHAPES if args.quick else CPU_SHAPES
    dtypes = args.dtypes.split(",") if args.dtypes else (["fp32", "bf16"] if device == "cuda" else ["fp32"])
    directions = ["fwd", "bwd", "fwdbwd"] if device == "cuda" else ["fwd", "fwdbwd"]
    providers = dict(PROVIDERS)
    mamba = mamba_ssm_fn() if device == "cuda" else None
    if mamba is not None:
        providers["mamba_ssm"] = mamba
    free = torch.cuda.mem_get_info()[0] if device == "cuda" else None
    sweeps = device == "cuda" and not args.shapes and not args.quick and not args.no_sweeps
    cases = bench_cases(shapes, dtypes, sweeps)
    for shape, dt, suite in cases:
        sweep = suite != "anchor"
        for direction in directions:
            for name, fn in providers.items():
                if sweep and name.startswith("ref_"):
                    continue  # the references run at the anchor shapes only
                reason = None
                if name.startswith("ref_") and device == "cuda" and not args.all_refs \
                        and args.shapes is None and shape not in GPU_REF_SHAPES:
                    reason = ("reference not run at this shape (runtime budget; "
                              "--all-refs runs it): see the 2x1536x2048x16 rows")
                elif name == "ref_parallel" and free is not None and \
                        parallel_ref_bytes(shape, direction) > 0.8 * free:
                    reason = (f"would need ~{parallel_ref_bytes(shape, direction) / 2**30:.0f} GiB "
                              f"(materialised scan), {free / 2**30:.0f} GiB free")
                yield name, fn, shape, dt, direction, reason, suite


# ---------------------------------------------------------------- machine info and output

def git_commit():
    if os.environ.get("SELECTIVE_SCAN_COMMIT"):  # a copy of the tree without its git history
        return os.environ["SELECTIVE_SCAN_COMMIT"]
    try:
        out = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        commit = out.stdout.strip() if out.returncode == 0 else "unknown"
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("+dirty" if dirty and commit != "unknown" else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device):
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "device": device,
        "selective_scan": selective_scan.build_info(),
        "mamba_ssm": mamba_ssm_fn() is not None if device == "cuda" else False,
        "timing": ("CUDA events per call, after warm-up" if device == "cuda"
                   else "time.perf_counter per call"),
        "peak_mem": ("torch.cuda.max_memory_allocated during one call minus the bytes allocated "
                     "before it" if device == "cuda" else
                     "peak of torch's CPU allocator during one call above the bytes held before it, "
                     "from the torch profiler's allocation events"),
        "fwd": "inference under torch.no_grad()",
        "bwd": "torch.autograd.grad through a retained graph",
        "fwdbwd": "forward with inputs requiring grad, then torch.autograd.grad",
    }
    return info


def fmt_us(us):
    if us is None:
        return "-"
    return f"{us / 1e3:.3f}" if us < 1e7 else f"{us / 1e6:.1f}s"


def fmt_mem(b):
    return "-" if b is None else f"{b / 2**20:.1f}"


def print_table(records):
    head = f"{'provider':<15} {'shape (BxDxLxN)':<18} {'dtype':<5} {'dir':<7} {'median ms':>10} " \
           f"{'p20 ms':>10} {'p80 ms':>10} {'peak MiB':>10} {'reps':>5}"
    print(head)
    print("-" * len(head))
    for r in records:
        shape = f"{r['batch']}x{r['dim']}x{r['seqlen']}x{r['dstate']}"
        line = f"{r['provider']:<15} {shape:<18} {r['dtype']:<5} {r['direction']:<7} " \
               f"{fmt_us(r['median_us']):>10} {fmt_us(r['p20_us']):>10} {fmt_us(r['p80_us']):>10} " \
               f"{fmt_mem(r['peak_mem_bytes']):>10} {r['reps']:>5}"
        if r["skipped"]:
            line += f"  skipped: {r['skipped']}"
        print(line)


def print_ratios(records):
    """ours vs each reference: time ratio (reference / ours, >1 means ours is faster) and memory
    ratio (reference / ours)."""
    ours = {(r["batch"], r["dim"], r["seqlen"], r["dstate"], r["dtype"], r["direction"]): r
            for r in records if r["provider"] == "selective_scan" and r["median_us"]}
    lines = []
    for r in records:
        if r["provider"] == "selective_scan" or not r["median_us"]:
            continue
        key = (r["batch"], r["dim"], r["seqlen"], r["dstate"], r["dtype"], r["direction"])
        o = ours.get(key)
        if o is None:
            continue
        speed = r["median_us"] / o["median_us"]
        mem = "-"
        if r["peak_mem_bytes"] and o["peak_mem_bytes"]:
            mem = f"{r['peak_mem_bytes'] / o['peak_mem_bytes']:.1f}x"
        shape = "x".join(str(k) for k in key[:4])
        lines.append(f"  {shape:<18} {key[4]:<5} {key[5]:<7} vs {r['provider']:<15} "
                     f"time {speed:8.1f}x   memory {mem}")
    if lines:
        print("\nselective_scan vs each reference (reference / ours; >1: ours faster or smaller):")
        print("\n".join(lines))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda when a GPU is present, else cpu")
    p.add_argument("--quick", action="store_true", help="one small shape, few repeats")
    p.add_argument("--out", default=None,
                   help="JSON path (default benchmarks/results/<device>.local.json)")
    p.add_argument("--shapes", default=None,
                   help="comma-separated BATCHxDIMxSEQLENxDSTATE (e.g. 2x256x1024x16)")
    p.add_argument("--dtypes", default=None, help="comma-separated fp32,bf16,fp16")
    p.add_argument("--providers", default=None,
                   help="comma-separated subset of selective_scan,ref_sequential,ref_parallel,mamba_ssm")
    p.add_argument("--all-refs", action="store_true", help="run the references at every GPU shape")
    p.add_argument("--no-sweeps", action="store_true", help="GPU: skip the seqlen / dstate / off-path sweeps")
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU visible to torch")
    if device == "cuda" and not selective_scan.build_info()["with_cuda"]:
        raise SystemExit("--device cuda: selective_scan was built without CUDA kernels")
    out_path = args.out or os.path.join(HERE, "results", f"{device}.local.json")
    wanted = set(args.providers.split(",")) if args.providers else None

    info = machine_info(device)
    print(f"# {info['date']}  commit {info['commit']}  torch {info['torch']}  cuda {info['cuda']}")
    print(f"# {info['gpu'] or info['cpu']}  ({info['cpu_count']} cpus, {info['torch_threads']} torch threads)")
    records = []
    sm_count = torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else 0
    if device == "cuda":
        info["floor_model"] = {"mufu_per_sm_clk": MUFU_PER_SM_CLK, "fp32_per_sm_clk": FP32_PER_SM_CLK,
                               "sm_clock_hz": SM_CLOCK_HZ, "hbm_bytes_per_s": HBM_BYTES_PER_S,
                               "sm_count": sm_count, "see": "floor_model() in benchmarks/bench_scan.py"}
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)

    def write(complete):
        with open(out_path, "w") as f:
            json.dump({"machine": dict(info, complete=complete), "records": records}, f, indent=1)

    for name, fn, shape, dt, direction, reason, suite in plan(args, device):
        if wanted is not None and name not in wanted:
            continue
        if reason is not None:
            rec = dict(provider=name, batch=shape[0], dim=shape[1], seqlen=shape[2], dstate=shape[3],
                       dtype=dt, has_z=True, direction=direction, median_us=None, p20_us=None,
                       p80_us=None, peak_mem_bytes=None, reps=0, skipped=reason)
        else:
            rec = bench_one(name, fn, shape, dt, direction, device, args, sweep=suite != "anchor")
        rec["suite"] = suite
        extra = ""
        if device == "cuda":
            add_rates(rec, sm_count)
            if rec.get("pct_of_floor"):
                extra = (f"  {rec['texp_per_s']:.2f} Texp/s  {rec['tb_per_s']:.2f} TB/s  "
                         f"{rec['pct_of_floor']:.0f}% of floor ({rec['floor_us']:.0f} us)")
                if rec["official_h200_us"]:
                    extra += f"  official {rec['official_h200_us']} us"
        records.append(rec)
        write(complete=False)  # after every record, so that an interrupted run keeps what it measured
        print(f"  {name:<15} {'x'.join(map(str, shape)):<18} {dt:<5} {direction:<7} "
              f"{fmt_us(rec['median_us']):>10} ms" + (f"  ({rec['skipped']})" if rec["skipped"] else "") + extra,
              flush=True)
    print()
    print_table(records)
    print_ratios(records)
    write(complete=True)
    print(f"\nwrote {out_path}")


if __name__ == "__main__":
    main()
