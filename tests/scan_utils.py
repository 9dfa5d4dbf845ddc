"""Shared helpers of the test suite: seeded input factories for every B/C form and option, the
float64 reference runs, error measures and the tolerances that the tests apply (see docs/api.md,
"Accuracy")."""
from __future__ import annotations

import math
import random
from typing import Dict, Optional

import pytest
import torch

from selective_scan import selective_scan, selective_scan_ref

# Tensor arguments of the op, in signature order.
TENSOR_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
BC_FORMS = ("const", "var", "group")  # (dim, dstate) | (batch, dstate, seqlen) | (batch, G, dstate, seqlen)
LOW_PRECISION = (torch.float16, torch.bfloat16)

# Relative L2 error bounds of the op against the float64 reference.
FWD_TOL = {("cpu", torch.float64): 1e-12, ("cpu", torch.float32): 1e-6, ("cuda", torch.float32): 1e-5}
GRAD_TOL = {("cpu", torch.float64): 1e-10, ("cpu", torch.float32): 1e-5, ("cuda", torch.float32): 5e-5}
# fp16/bf16: at most LOWP_FACTOR times the error of the reference computed in that dtype, and
# at most these caps (outputs; gradients).
LOWP_FACTOR = 2.0
LOWP_FWD_CAP = {torch.bfloat16: 4e-3, torch.float16: 1e-3}
LOWP_GRAD_CAP = {torch.bfloat16: 1e-2, torch.float16: 3e-3}

CUDA = pytest.mark.cuda
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
# Every (device, dtype) the op accepts: float64 is CPU-only.
DEVICE_DTYPES = [
    pytest.param("cpu", torch.float32, id="cpu-fp32"),
    pytest.param("cpu", torch.float64, id="cpu-fp64"),
    pytest.param("cpu", torch.float16, id="cpu-fp16"),
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param("cuda", torch.float32, id="cuda-fp32", marks=CUDA),
    pytest.param("cuda", torch.float16, id="cuda-fp16", marks=CUDA),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=CUDA),
]
DEVICE_FP32 = [pytest.param("cpu", torch.float32, id="cpu-fp32"),
               pytest.param("cuda", torch.float32, id="cuda-fp32", marks=CUDA)]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_inputs(*, batch: int = 2, dim: int = 8, seqlen: int = 33, dstate: int = 8,
                dtype: torch.dtype = torch.float32, device="cpu",
                B_form: str = "var", C_form: str = "var", B_groups: int = 2, C_groups: int = 2,
                B_dtype: Optional[torch.dtype] = None, C_dtype: Optional[torch.dtype] = None,
                D: bool = True, z: bool = True, delta_bias: bool = True, delta_softplus: bool = True,
                initial_state: bool = False, seed: int = 0, delta_scale: Optional[float] = None,
                A_range=(-1.0, 2.5)) -> Dict:
    """Keyword arguments of the op with fresh seeded random values (no zeros), Mamba-like ranges.

    Values are drawn in float64 on the CPU and rounded once to their dtype, then moved: the same
    seed gives the same rounded inputs on every device. `B_form`/`C_form` pick the form ("const",
    "var", "group"); `*_groups` the n_groups of the "group" form; `*_dtype` default to u's dtype
    for variable forms and to the compute dtype for the time-invariant form. `delta_scale`, when
    given, draws the effective timestep d uniformly in [delta_scale/2, delta_scale] (no softplus,
    no bias) for precision stress cases. `A_range` bounds log(-A).
    """
    g = torch.Generator().manual_seed(seed)
    ct = compute_dtype(dtype)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    def rand(*shape, lo=0.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=torch.float64)

    u = randn(batch, dim, seqlen)
    bias = None
    if delta_scale is not None:
        delta_softplus, delta_bias = False, False
        delta = rand(batch, dim, seqlen, lo=delta_scale / 2, hi=delta_scale)
    elif delta_softplus:
        delta = 0.5 * randn(batch, dim, seqlen)
        if delta_bias:
            dt0 = torch.exp(rand(dim, lo=math.log(1e-3), hi=math.log(1e-1)))
            bias = torch.log(torch.expm1(dt0))  # softplus(bias) = dt0, as Mamba initialises it
        else:
            delta = delta - 3.0
    else:
        delta = rand(batch, dim, seqlen, lo=1e-3, hi=0.1)
        if delta_bias:
            bias = rand(dim, lo=1e-3, hi=0.05)
    A = -torch.exp(rand(dim, dstate, lo=A_range[0], hi=A_range[1]))

    def bc(form, groups, bc_dtype):
        if form == "const":
            return randn(dim, dstate).to(bc_dtype or ct)
        if form == "var":
            return randn(batch, dstate, seqlen).to(bc_dtype or dtype)
        assert form == "group", form
        return randn(batch, groups, dstate, seqlen).to(bc_dtype or dtype)

    kw = {
        "u": u.to(dtype),
        "delta": delta.to(dtype),
        "A": A.to(ct),
        "B": bc(B_form, B_groups, B_dtype),
        "C": bc(C_form, C_groups, C_dtype),
        "D": randn(dim).to(ct) if D else None,
        "z": randn(batch, dim, seqlen).to(dtype) if z else None,
        "delta_bias": bias.to(ct) if bias is not None else None,
        "delta_softplus": delta_softplus,
        "initial_state": randn(batch, dim, dstate).to(ct) if initial_state else None,
    }
    return to_device(kw, device)


def to_device(kw: Dict, device) -> Dict:
    """The same keyword arguments with every tensor moved to `device` (None and flags unchanged)."""
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


def upstream_grads(kw: Dict, seed: int = 1):
    """Random (never all-zero) incoming gradients for out (u's dtype) and last_state (compute dtype)."""
    g = torch.Generator().manual_seed(seed)
    u, A = kw["u"], kw["A"]
    dout = torch.randn(u.shape, generator=g, dtype=torch.float64).to(u.dtype).to(u.device)
    dlast = torch.randn(u.shape[0], u.shape[1], A.shape[1], generator=g, dtype=torch.float64)
    return dout, dlast.to(A.dtype).to(u.device)


def upcast(kw: Dict, dtype=torch.float64) -> Dict:
    """The same inputs converted to `dtype` (detached copies; None and flags unchanged)."""
    return {k: (v.detach().to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


def run_op(kw: Dict, return_last_state: bool = True):
    return selective_scan(kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw["D"], kw["z"],
                          kw["delta_bias"], kw["delta_softplus"], return_last_state,
                          initial_state=kw["initial_state"])


def run_ref(kw: Dict, return_last_state: bool = True, compute_dtype=None):
    return selective_scan_ref(kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw["D"], kw["z"],
                              kw["delta_bias"], kw["delta_softplus"], return_last_state,
                              initial_state=kw["initial_state"], compute_dtype=compute_dtype)


def grads_of(fn, kw: Dict, dout=None, dlast=None):
    """(out, last_state, {name: grad}) of fn(kw) w.r.t. every tensor input, for the given
    upstream gradients (either may be None: that output is then not used)."""
    # detach() keeps each input's strides (clone() would make expanded or sliced ones contiguous)
    leaves = {k: (v.detach().requires_grad_(True) if isinstance(v, torch.Tensor) else v)
              for k, v in kw.items()}
    names = [k for k in TENSOR_ARGS if leaves[k] is not None]
    out, last = fn(leaves)
    outputs, grads_in = [], []
    if dout is not None:
        outputs.append(out)
        grads_in.append(dout.to(out.dtype))
    if dlast is not None:
        outputs.append(last)
        grads_in.append(dlast.to(last.dtype))
    grads = torch.autograd.grad(outputs, [leaves[k] for k in names], grads_in, allow_unused=True)
    return out.detach(), last.detach(), dict(zip(names, grads))


def rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64 (0 when both are empty or equal)."""
    x = x.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    assert x.shape == ref.shape, (x.shape, ref.shape)
    num = torch.linalg.vector_norm(x - ref).item()
    den = torch.linalg.vector_norm(ref).item()
    if num == 0.0:
        return 0.0
    return num / den if den > 0 else math.inf


def check_close(name: str, x: torch.Tensor, ref: torch.Tensor, tol: float):
    assert x is not None, f"{name}: no gradient"
    assert torch.isfinite(x).all(), f"{name}: non-finite values"
    err = rel_l2(x, ref)
    assert err <= tol, f"{name}: relative L2 error {err:.3e} > {tol:.1e}"


def check_lowp(name: str, x: torch.Tensor, ref64: torch.Tensor, ref_lowp: torch.Tensor,
               dtype: torch.dtype, cap: float):
    """The fp16/bf16 rule: error vs the float64 reference at most LOWP_FACTOR times the error of
    the reference computed in `dtype`, and at most `cap`."""
    assert x is not None, f"{name}: no gradient"
    assert torch.isfinite(x).all(), f"{name}: non-finite values"
    err = rel_l2(x, ref64)
    err_lowp = rel_l2(ref_lowp, ref64)
    assert err <= LOWP_FACTOR * err_lowp, (
        f"{name}: error {err:.3e} > {LOWP_FACTOR} x the {dtype} reference's error {err_lowp:.3e}")
    assert err <= cap, f"{name}: relative L2 error {err:.3e} > {cap:.1e}"


def check_forward(kw: Dict, device: str, dtype: torch.dtype, return_last_state: bool = True):
    """Runs the op and compares out (and last_state) with the float64 reference on the same inputs."""
    res = run_op(kw, return_last_state)
    out, last = res if return_last_state else (res, None)
    assert out.dtype == kw["u"].dtype and out.shape == kw["u"].shape and out.device == kw["u"].device
    if return_last_state:
        assert last.dtype == compute_dtype(dtype)
        assert last.shape == (kw["u"].shape[0], kw["u"].shape[1], kw["A"].shape[1])
    out64, last64 = run_ref(upcast(kw), True)
    if dtype in LOW_PRECISION:
        out_lp, last_lp = run_ref(kw, True, compute_dtype=dtype)
        check_lowp("out", out, out64, out_lp, dtype, LOWP_FWD_CAP[dtype])
        if return_last_state:
            check_lowp("last_state", last, last64, last_lp, dtype, LOWP_FWD_CAP[dtype])
    else:
        tol = FWD_TOL[(device, dtype)]
        check_close("out", out, out64, tol)
        if return_last_state:
            check_close("last_state", last, last64, tol)
    return out, last


def check_backward(kw: Dict, device: str, dtype: torch.dtype, use_out: bool = True,
                   use_last: bool = True, seed: int = 1):
    """Gradients of the op for random upstream gradients vs autograd through the float64 reference."""
    dout, dlast = upstream_grads(kw, seed)
    dout = dout if use_out else None
    dlast = dlast if use_last else None
    _, _, g = grads_of(lambda k: run_op(k, True), kw, dout, dlast)
    _, _, g64 = grads_of(lambda k: run_ref(k, True), upcast(kw),
                         None if dout is None else dout.double(), None if dlast is None else dlast.double())
    if dtype in LOW_PRECISION:
        _, _, glp = grads_of(lambda k: run_ref(k, True, compute_dtype=dtype), kw, dout, dlast)
    for name, ref in g64.items():
        got = g[name]
        assert got is not None, f"{name}: no gradient"
        assert got.shape == kw[name].shape and got.dtype == kw[name].dtype, (
            f"{name}: gradient {tuple(got.shape)} {got.dtype} vs input {tuple(kw[name].shape)} {kw[name].dtype}")
        if ref is None:  # the used outputs do not depend on this input
            assert torch.count_nonzero(got) == 0, f"{name}: expected a zero gradient"
            continue
        if dtype in LOW_PRECISION:
            check_lowp(f"d{name}", got, ref, glp[name], dtype, LOWP_GRAD_CAP[dtype])
        else:
            check_close(f"d{name}", got, ref, GRAD_TOL[(device, dtype)])
    return g


# Option sets for the one-axis-at-a-time cases (make_inputs keyword overrides).
OPTION_SETS = {
    "all_on": {},
    "no_D": {"D": False},
    "no_z": {"z": False},
    "no_delta_bias": {"delta_bias": False},
    "no_softplus": {"delta_softplus": False},
    "no_softplus_no_bias": {"delta_softplus": False, "delta_bias": False},
    "all_off": {"D": False, "z": False, "delta_bias": False, "delta_softplus": False},
    "initial_state": {"initial_state": True},
    "initial_state_all_off": {"initial_state": True, "D": False, "z": False, "delta_bias": False,
                              "delta_softplus": False},
}


def random_case(seed: int, device: str):
    """A seeded random configuration drawn over every axis at once."""
    r = random.Random(seed)
    dtypes = [torch.float32, torch.float16, torch.bfloat16] + ([torch.float64] if device == "cpu" else [])
    dtype = r.choice(dtypes)
    dim = r.choice([1, 2, 3, 6, 8, 12, 24])
    groups = [g for g in (1, 2, 3, 4, 6) if dim % g == 0]
    cfg = dict(dtype=dtype, device=device, batch=r.choice([1, 2, 3]), dim=dim,
               seqlen=r.choice([1, 5, 31, 64, 97, 200, 333]), dstate=r.choice([1, 3, 8, 16, 33]),
               B_form=r.choice(BC_FORMS), C_form=r.choice(BC_FORMS),
               B_groups=r.choice(groups), C_groups=r.choice(groups),
               D=r.random() < 0.5, z=r.random() < 0.5, delta_bias=r.random() < 0.5,
               delta_softplus=r.random() < 0.5, initial_state=r.random() < 0.5, seed=seed)
    if dtype in (torch.float16, torch.bfloat16):
        cfg["B_dtype"] = r.choice([None, torch.float32])
        cfg["C_dtype"] = r.choice([None, torch.float32])
    return cfg
