"""Quick CUDA check for kernel work: accuracy of the op against the float64 sequential reference on
a grid of configurations (forward and every gradient), then CUDA-event timings of the anchor shapes.
Prints a table and writes JSON (--out). Needs a GPU; the full test suite is tests/."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from selective_scan import selective_scan, selective_scan_ref


def rel_l2(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def make_inputs(batch, dim, seqlen, dstate, dtype, b_form="var", c_form="var", groups=1, z=True, D=True,
                bias=True, init=False, device="cuda", delta_scale=1.0):
    g = torch.Generator(device="cpu").manual_seed(1234 + seqlen + dstate + dim)

    def rn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    def bc(form):
        if form == "const":
            return rn(dim, dstate).float()
        if form == "var":
            return rn(batch, dstate, seqlen).to(dtype)
        return rn(batch, groups, dstate, seqlen).to(dtype)

    inp = dict(
        u=rn(batch, dim, seqlen).to(dtype),
        delta=(rn(batch, dim, seqlen, scale=0.5) * delta_scale).to(dtype),
        A=-torch.exp(rn(dim, dstate, scale=0.5)).float(),
        B=bc(b_form), C=bc(c_form),
        D=rn(dim).float() if D else None,
        z=rn(batch, dim, seqlen).to(dtype) if z else None,
        delta_bias=(rn(dim, scale=0.5) - 1.0).float() if bias else None,
        initial_state=rn(batch, dim, dstate).float() if init else None,
    )
    return inp


def check(cfg):
    dtype = cfg.pop("dtype")
    softplus = cfg.pop("softplus", True)
    inp = make_inputs(dtype=dtype, **cfg)
    names = [k for k, v in inp.items() if v is not None]
    ours_in = {k: (v.detach().clone().requires_grad_(True) if v is not None else None) for k, v in inp.items()}
    ref_in = {k: (v.detach().double().requires_grad_(True) if v is not None else None) for k, v in inp.items()}
    out, last = selective_scan(**ours_in, delta_softplus=softplus, return_last_state=True)
    rout, rlast = selective_scan_ref(**ref_in, delta_softplus=softplus, return_last_state=True)
    gen = torch.Generator(device="cpu").manual_seed(7)
    dout = torch.randn(out.shape, generator=gen).to(out.device)
    dlast = torch.randn(last.shape, generator=gen).to(out.device)
    torch.autograd.backward([out, last], [dout.to(out.dtype), dlast])
    torch.autograd.backward([rout, rlast], [dout.to(out.dtype).double(), dlast.double()])
    errs = {"out": rel_l2(out, rout), "last_state": rel_l2(last, rlast)}
    for k in names:
        errs["d" + k] = rel_l2(ours_in[k].grad, ref_in[k].grad)
    # Determinism: a second backward gives bitwise-identical gradients.
    grads1 = [ours_in[k].grad.clone() for k in names]
    for k in names:
        ours_in[k].grad = None
    out, last = selective_scan(**ours_in, delta_softplus=softplus, return_last_state=True)
    torch.autograd.backward([out, last], [dout.to(out.dtype), dlast])
    deterministic = all(torch.equal(a, ours_in[k].grad) for a, k in zip(grads1, names))
    return errs, deterministic


def bench(fn, reps=100, warm_s=0.3):
    """Median, 20th and 80th percentile of `reps` CUDA-event timed calls, in us. The calls run
    back to back (no host synchronisation between them) after `warm_s` seconds of warm-up calls,
    so that the GPU is at its working clock when timed."""
    end = time.perf_counter() + warm_s
    while time.perf_counter() < end:
        fn()
        torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for s, e in events:
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) * 1000.0 for s, e in events)
    return statistics.median(times), times[len(times) // 5], times[(4 * len(times)) // 5]


def timing(shape, dtype):
    batch, dim, seqlen, dstate = shape
    inp = make_inputs(batch, dim, seqlen, dstate, dtype)
    for k in ("u", "delta", "B", "C", "z", "D", "delta_bias", "A"):
        inp[k].requires_grad_(True)
    del inp["initial_state"]
    fwd = lambda: selective_scan(**inp, delta_softplus=True)
    med_f, p20_f, p80_f = bench(fwd)
    out = fwd()
    dout = torch.randn_like(out)
    bwd = lambda: torch.autograd.grad(out, [inp[k] for k in ("u", "delta", "B", "C", "z", "D", "delta_bias", "A")],
                                      dout, retain_graph=True)
    med_b, p20_b, p80_b = bench(bwd)
    return {"fwd_us": med_f, "fwd_p20": p20_f, "fwd_p80": p80_f, "bwd_us": med_b, "bwd_p20": p20_b, "bwd_p80": p80_b}


CONFIGS = [
    dict(batch=2, dim=8, seqlen=64, dstate=16, dtype=torch.float32),
    dict(batch=2, dim=8, seqlen=1, dstate=16, dtype=torch.float32),
    dict(batch=2, dim=40, seqlen=63, dstate=16, dtype=torch.float32, init=True),
    dict(batch=2, dim=40, seqlen=200, dstate=16, dtype=torch.float32, z=False, D=False, bias=False, softplus=False),
    dict(batch=1, dim=33, seqlen=130, dstate=5, dtype=torch.float32, init=True),
    dict(batch=2, dim=40, seqlen=300, dstate=8, dtype=torch.float32),
    dict(batch=2, dim=24, seqlen=129, dstate=7, dtype=torch.float32, b_form="group", c_form="var", groups=3),
    dict(batch=1, dim=6, seqlen=4100, dstate=6, dtype=torch.float32, init=True),
    dict(batch=2, dim=16, seqlen=257, dstate=1, dtype=torch.float32),
    dict(batch=2, dim=16, seqlen=100, dstate=64, dtype=torch.float32, init=True),
    dict(batch=2, dim=20, seqlen=150, dstate=32, dtype=torch.float32),
    dict(batch=1, dim=12, seqlen=90, dstate=128, dtype=torch.float32, init=True),
    dict(batch=2, dim=10, seqlen=130, dstate=40, dtype=torch.float32, b_form="group", c_form="var", groups=2),
    dict(batch=1, dim=8, seqlen=100, dstate=256, dtype=torch.float32, init=True),
    dict(batch=1, dim=8, seqlen=70, dstate=200, dtype=torch.float32),
    dict(batch=2, dim=24, seqlen=129, dstate=16, dtype=torch.float32, b_form="const", c_form="var"),
    dict(batch=2, dim=24, seqlen=129, dstate=16, dtype=torch.float32, b_form="var", c_form="const"),
    dict(batch=2, dim=24, seqlen=129, dstate=16, dtype=torch.float32, b_form="const", c_form="const", init=True),
    dict(batch=2, dim=24, seqlen=129, dstate=16, dtype=torch.float32, b_form="group", c_form="group", groups=4),
    dict(batch=2, dim=24, seqlen=129, dstate=16, dtype=torch.float32, b_form="group", c_form="var", groups=3),
    dict(batch=2, dim=48, seqlen=1000, dstate=16, dtype=torch.bfloat16),
    dict(batch=2, dim=48, seqlen=1000, dstate=16, dtype=torch.float16),
    dict(batch=1, dim=4, seqlen=4100, dstate=16, dtype=torch.float32, init=True),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--timing-only", action="store_true", help="skip the accuracy grid")
    ap.add_argument("--shapes", default="", help="timing shapes, e.g. 8x1536x2048x8,8x1536x2048x64:fp32 (bf16 "
                    "unless a shape names its dtype: bf16, fp16 or fp32; default: the anchors, in bf16 and at "
                    "(8, 1536, 2048, 16) also in fp32, and dstate 32 and 128)")
    args = ap.parse_args()
    results = {"spt": os.environ.get("SELECTIVE_SCAN_SPT", "auto"), "gpu": torch.cuda.get_device_name(),
               "checks": [], "timings": []}
    worst_ok = True
    for cfg in ([] if args.timing_only else CONFIGS):
        label = {k: (str(v).replace("torch.", "") if k == "dtype" else v) for k, v in cfg.items()}
        fp32 = cfg["dtype"] == torch.float32
        errs, det = check(dict(cfg))
        tol = 1e-5 if fp32 else 2e-2
        ok = det and all(e <= tol for e in errs.values())
        worst_ok &= ok
        results["checks"].append({"cfg": label, "errs": errs, "deterministic": det, "ok": ok})
        print(("OK  " if ok else "BAD ") + json.dumps(label) + " det=" + str(det) + " max=" +
              f"{max(errs.values()):.2e} " + " ".join(f"{k}={v:.1e}" for k, v in errs.items()), flush=True)
    if not args.no_timing:
        if args.shapes:
            dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
            cases = []
            for spec in args.shapes.split(","):
                dims, _, dtype_name = spec.partition(":")
                if dtype_name and dtype_name not in dtypes:
                    raise SystemExit(f"--shapes: dtype of {spec!r}: expected one of {sorted(dtypes)}, got {dtype_name!r}")
                cases.append((tuple(int(v) for v in dims.split("x")), dtypes[dtype_name or "bf16"]))
        else:
            anchors = [(8, 1536, 2048, 16), (4, 5120, 2048, 16), (1, 2048, 16384, 16), (16, 4096, 1024, 16),
                       (8, 1536, 2048, 64), (8, 1536, 2048, 32), (8, 1536, 2048, 128)]
            cases = [(shape, dtype) for shape in anchors for dtype in (torch.bfloat16, torch.float32)
                     if dtype == torch.bfloat16 or shape == (8, 1536, 2048, 16)]
        for shape, dtype in cases:
            t = timing(shape, dtype)
            results["timings"].append({"shape": shape, "dtype": str(dtype), **t})
            print(f"TIME {shape} {dtype}: fwd {t['fwd_us']:.0f} us, bwd {t['bwd_us']:.0f} us", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    print("ALL OK" if worst_ok else "SOME CHECKS FAILED")


if __name__ == "__main__":
    main()
