"""Forward accuracy: out and last_state of the op against the float64 sequential reference, one
axis at a time (dtype, B/C forms and dtypes, groups, options, seqlen, dstate, sizes) with the
others at their defaults, plus seeded random mixed cases. Also checks the reference itself."""
import math

import pytest
import torch
import torch.nn.functional as F

import selective_scan
from scan_utils import (BC_FORMS, CUDA, DEVICE_DTYPES, DEVICE_FP32, DEVICES, OPTION_SETS,
                        check_forward, make_inputs, random_case, rel_l2, run_ref, upcast)

LOWP_AND_FP32 = [
    pytest.param("cpu", torch.float32, id="cpu-fp32"),
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param("cuda", torch.float32, id="cuda-fp32", marks=CUDA),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=CUDA),
]


def test_public_names():
    assert selective_scan.selective_scan_fn is selective_scan.selective_scan
    info = selective_scan.build_info()
    assert set(info) >= {"version", "with_cuda", "cuda_archs"}
    assert info["version"] == selective_scan.__version__
    assert isinstance(info["with_cuda"], bool)
    assert info["with_cuda"] == bool(info["cuda_archs"])
    assert callable(torch.ops.selective_scan.fwd) and callable(torch.ops.selective_scan.bwd)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_dtypes(device, dtype):
    kw = make_inputs(dtype=dtype, device=device, seqlen=100, initial_state=True, seed=1)
    check_forward(kw, device, dtype)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_dtypes_long(device, dtype):
    kw = make_inputs(dtype=dtype, device=device, batch=1, dim=4, seqlen=1000, seed=2)
    check_forward(kw, device, dtype)


@pytest.mark.parametrize("device,dtype", LOWP_AND_FP32)
@pytest.mark.parametrize("which", ["B", "C"])
@pytest.mark.parametrize("form", BC_FORMS)
def test_bc_forms(device, dtype, which, form):
    """Each form for B with C at its default (variable), and for C with B at its default."""
    kw = make_inputs(dtype=dtype, device=device, seqlen=70, seed=3, **{f"{which}_form": form})
    check_forward(kw, device, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B_dtype,C_dtype", [(torch.float32, torch.bfloat16),
                                             (torch.bfloat16, torch.float32),
                                             (torch.float32, torch.float32)])
@pytest.mark.parametrize("form", ["var", "group"])
def test_bc_dtype_fp32_with_bf16_inputs(device, B_dtype, C_dtype, form):
    """Variable B and C may each be in u's dtype or in fp32."""
    dtype = torch.bfloat16
    kw = make_inputs(dtype=dtype, device=device, seqlen=70, B_form=form, C_form=form,
                     B_dtype=B_dtype, C_dtype=C_dtype, seed=4)
    assert kw["B"].dtype == B_dtype and kw["C"].dtype == C_dtype
    check_forward(kw, device, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", ["var", "group"])
def test_bc_fp32_with_fp32_inputs_and_const_in_u_dtype(device, form):
    """fp32 inputs with variable B/C in fp32 (u's dtype = compute dtype); time-invariant B/C in
    bf16 (u's dtype) with bf16 inputs."""
    kw = make_inputs(device=device, B_form=form, C_form=form, seqlen=40, seed=5)
    check_forward(kw, device, torch.float32)
    kw = make_inputs(dtype=torch.bfloat16, device=device, B_form="const", C_form="const",
                     B_dtype=torch.bfloat16, C_dtype=torch.bfloat16, seqlen=40, seed=5)
    check_forward(kw, device, torch.bfloat16)


@pytest.mark.parametrize("device,dtype", DEVICE_FP32)
@pytest.mark.parametrize("which", ["B", "C", "both"])
@pytest.mark.parametrize("groups", [1, 2, 4, 12])
def test_groups(device, dtype, which, groups):
    """Channel d reads group d // (dim // n_groups): dim 12 with 1, 2, 4 and 12 groups."""
    forms = {"B_form": "var", "C_form": "var"}
    if which in ("B", "both"):
        forms.update(B_form="group", B_groups=groups)
    if which in ("C", "both"):
        forms.update(C_form="group", C_groups=groups)
    kw = make_inputs(device=device, dim=12, seqlen=50, seed=6 + groups, **forms)
    check_forward(kw, device, dtype)


def test_group_mapping_is_contiguous_blocks():
    """With groups, channel d follows group d // (dim // n_groups), not d % n_groups: the op
    matches a (batch, dstate, seqlen) call per group on the channels of that group."""
    kw = make_inputs(dim=6, seqlen=20, B_form="group", C_form="group", B_groups=3, C_groups=3,
                     seed=7, initial_state=True)
    out, last = selective_scan.selective_scan(
        kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw["D"], kw["z"], kw["delta_bias"],
        kw["delta_softplus"], True, initial_state=kw["initial_state"])
    for g in range(3):
        sl = slice(2 * g, 2 * g + 2)
        part = {k: v for k, v in kw.items()}
        for k in ("u", "delta", "z", "initial_state"):
            part[k] = kw[k][:, sl].contiguous()
        for k in ("A", "D", "delta_bias"):
            part[k] = kw[k][sl].contiguous()
        part["B"] = kw["B"][:, g].contiguous()
        part["C"] = kw["C"][:, g].contiguous()
        o, l = run_ref(upcast(part), True)
        assert rel_l2(out[:, sl], o) <= 1e-6
        assert rel_l2(last[:, sl], l) <= 1e-6


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("options", list(OPTION_SETS), ids=list(OPTION_SETS))
def test_options(device, dtype, options):
    kw = make_inputs(dtype=dtype, device=device, seqlen=80, seed=8, **OPTION_SETS[options])
    check_forward(kw, device, dtype)


@pytest.mark.parametrize("device,dtype", DEVICE_FP32)
@pytest.mark.parametrize("return_last_state", [False, True])
def test_return_last_state(device, dtype, return_last_state):
    kw = make_inputs(device=device, seqlen=65, seed=9)
    res = check_forward(kw, device, dtype, return_last_state=return_last_state)
    plain = selective_scan.selective_scan(kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw["D"],
                                          kw["z"], kw["delta_bias"], kw["delta_softplus"],
                                          return_last_state)
    if return_last_state:
        assert isinstance(plain, tuple) and len(plain) == 2
        assert torch.equal(plain[0], res[0]) and torch.equal(plain[1], res[1])
    else:
        assert isinstance(plain, torch.Tensor)
        assert torch.equal(plain, res[0])


@pytest.mark.parametrize("device", DEVICES)
def test_initial_state_chains_sequences(device):
    """Scanning [0, t) then [t, L) from the first part's last state equals one scan over [0, L)."""
    kw = make_inputs(device=device, seqlen=150, B_form="var", C_form="group", initial_state=True,
                     seed=10)
    out, last = selective_scan.selective_scan(
        kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw["D"], kw["z"], kw["delta_bias"],
        kw["delta_softplus"], True, initial_state=kw["initial_state"])
    state = kw["initial_state"]
    outs = []
    for lo, hi in ((0, 37), (37, 100), (100, 150)):
        part = dict(kw)
        for k in ("u", "delta", "z"):
            part[k] = kw[k][..., lo:hi]
        for k in ("B", "C"):
            part[k] = kw[k][..., lo:hi]
        o, state = selective_scan.selective_scan(
            part["u"], part["delta"], part["A"], part["B"], part["C"], part["D"], part["z"],
            part["delta_bias"], part["delta_softplus"], True, initial_state=state)
        outs.append(o)
    assert rel_l2(torch.cat(outs, dim=-1), out) <= 1e-6
    assert rel_l2(state, last) <= 1e-6


SEQLENS = [1, 2, 7, 63, 64, 65, 1000, pytest.param(2049, marks=pytest.mark.slow),
           pytest.param(4100, marks=pytest.mark.slow)]


@pytest.mark.parametrize("device,dtype", DEVICE_FP32 + [pytest.param("cpu", torch.float64, id="cpu-fp64")])
@pytest.mark.parametrize("seqlen", SEQLENS)
def test_seqlen(device, dtype, seqlen):
    kw = make_inputs(dtype=dtype, device=device, batch=2, dim=4, seqlen=seqlen,
                     initial_state=True, seed=11 + seqlen)
    check_forward(kw, device, dtype)


@pytest.mark.parametrize("device,dtype", DEVICE_FP32 + [pytest.param("cpu", torch.float64, id="cpu-fp64")])
@pytest.mark.parametrize("dstate", [1, 16, 64, 256])
def test_dstate(device, dtype, dstate):
    kw = make_inputs(dtype=dtype, device=device, dim=4, seqlen=130, dstate=dstate,
                     initial_state=True, seed=12 + dstate)
    check_forward(kw, device, dtype)


@pytest.mark.parametrize("device,dtype", DEVICE_FP32)
@pytest.mark.parametrize("batch,dim", [(1, 1), (3, 5), (5, 37), (1, 130)])
def test_batch_dim(device, dtype, batch, dim):
    kw = make_inputs(dtype=dtype, device=device, batch=batch, dim=dim, seqlen=45,
                     B_form="group" if dim % 5 == 0 else "var", B_groups=5 if dim % 5 == 0 else 1,
                     seed=13 + dim)
    check_forward(kw, device, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(100, 112))
def test_random_mixed(device, seed):
    cfg = random_case(seed, device)
    kw = make_inputs(**cfg)
    check_forward(kw, device, cfg["dtype"], return_last_state=bool(seed % 2))


@pytest.mark.parametrize("device,dtype", DEVICE_FP32 + [pytest.param("cpu", torch.float64, id="cpu-fp64")])
def test_softplus_threshold(device, dtype):
    """softplus with torch's threshold 20: delta + bias around and above 20 (and very negative)."""
    kw = make_inputs(dtype=dtype, device=device, seqlen=50, delta_softplus=True, delta_bias=True,
                     A_range=(-6.0, -4.0), seed=14)
    g = torch.Generator().manual_seed(15)
    raw = torch.empty(kw["u"].shape, dtype=torch.float64).uniform_(-40.0, 30.0, generator=g)
    raw[:, :, ::3] = torch.empty(raw[:, :, ::3].shape, dtype=torch.float64).uniform_(18.0, 22.0, generator=g)
    kw["delta"] = raw.to(dtype).to(device)
    kw["delta_bias"] = torch.full_like(kw["delta_bias"], 0.25)
    check_forward(kw, device, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_out_does_not_alias_inputs(device):
    kw = make_inputs(device=device, seqlen=20, seed=16)
    before = {k: v.clone() for k, v in kw.items() if isinstance(v, torch.Tensor)}
    out, last = selective_scan.selective_scan(
        kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw["D"], kw["z"], kw["delta_bias"],
        kw["delta_softplus"], True)
    for k, v in before.items():
        assert torch.equal(kw[k], v), f"{k} was modified"
        assert out.data_ptr() != kw[k].data_ptr()


# The oracle itself: the sequential reference against an independent O(L^2) evaluation of the
# contract's formula, and the parallel-scan reference (a benchmark baseline) against it.

def closed_form(kw):
    """y_t = sum_{s<=t} C_t . (prod_{s<r<=t} exp(d_r A)) d_s B_s u_s + C_t . (prod_{r<=t} exp(d_r A)) h0
    + D u_t, gated by silu(z); float64, written independently of the reference."""
    u, delta, A = kw["u"].double(), kw["delta"].double(), kw["A"].double()
    batch, dim, L = u.shape
    if kw["delta_bias"] is not None:
        delta = delta + kw["delta_bias"].double()[:, None]
    if kw["delta_softplus"]:
        delta = torch.where(delta > 20, delta, torch.log1p(torch.exp(delta)))

    def full(X):
        X = X.double()
        if X.dim() == 2:
            return X[None, :, :, None].expand(batch, dim, X.shape[1], L)
        if X.dim() == 3:
            return X[:, None].expand(batch, dim, X.shape[1], L)
        return torch.stack([X[:, d * X.shape[1] // dim] for d in range(dim)], dim=1)

    Bf, Cf = full(kw["B"]), full(kw["C"])
    logdecay = torch.einsum("bdl,dn->bdnl", delta, A)
    cum = torch.cumsum(logdecay, dim=-1)  # sum_{r<=t}
    y = torch.zeros(batch, dim, L, dtype=torch.float64)
    h0 = kw["initial_state"].double() if kw["initial_state"] is not None else None
    for t in range(L):
        decay = torch.exp(cum[..., t:t + 1] - cum[..., : t + 1])  # prod_{s<r<=t}, s = 0..t
        h = (decay * delta[:, :, None, : t + 1] * Bf[..., : t + 1] * u[:, :, None, : t + 1]).sum(-1)
        if h0 is not None:
            h = h + torch.exp(cum[..., t]) * h0
        y[:, :, t] = (h * Cf[..., t]).sum(-1)
    if kw["D"] is not None:
        y = y + kw["D"].double()[:, None] * u
    if kw["z"] is not None:
        y = y * kw["z"].double() * torch.sigmoid(kw["z"].double())
    return y, h


@pytest.mark.parametrize("B_form,C_form", [("const", "group"), ("var", "const"), ("group", "var")])
@pytest.mark.parametrize("softplus", [False, True])
def test_reference_matches_closed_form(B_form, C_form, softplus):
    kw = make_inputs(dtype=torch.float64, dim=4, seqlen=24, dstate=3, B_form=B_form, C_form=C_form,
                     delta_softplus=softplus, initial_state=True, seed=17)
    y, h = closed_form(kw)
    out, last = run_ref(kw, True)
    assert rel_l2(out, y) <= 1e-12
    assert rel_l2(last, h) <= 1e-12


@pytest.mark.parametrize("B_form,C_form", [("const", "group"), ("var", "const"), ("group", "var")])
def test_parallel_reference_matches_sequential(B_form, C_form):
    kw = make_inputs(dtype=torch.float64, dim=6, seqlen=77, dstate=5, B_form=B_form, C_form=C_form,
                     B_groups=3, C_groups=3, initial_state=True, seed=18)
    out, last = run_ref(kw, True)
    pkw = {k: v for k, v in kw.items()}
    pout, plast = selective_scan.selective_scan_parallel_ref(
        pkw["u"], pkw["delta"], pkw["A"], pkw["B"], pkw["C"], pkw["D"], pkw["z"], pkw["delta_bias"],
        pkw["delta_softplus"], True, initial_state=pkw["initial_state"])
    assert rel_l2(pout, out) <= 1e-12
    assert rel_l2(plast, last) <= 1e-12


def test_reference_softplus_is_torch_softplus():
    x = torch.linspace(-30, 30, 601, dtype=torch.float64)
    assert torch.equal(F.softplus(x)[x > 20], x[x > 20])
    assert math.isclose(F.softplus(torch.tensor(19.0, dtype=torch.float64)).item(),
                        math.log1p(math.exp(19.0)), rel_tol=1e-15)


@pytest.mark.parametrize("device", DEVICES)
def test_calls_without_gradients_skip_autograd(device):
    """When no input requires grad (or grad mode is off) the op runs without the autograd.Function
    (no grad_fn) and gives bitwise the same out and last_state as the differentiable call; any one
    input requiring grad keeps the gradient path."""
    kw = make_inputs(device=device, initial_state=True, seed=91)
    out_plain, last_plain = selective_scan.selective_scan(**kw, return_last_state=True)
    assert out_plain.grad_fn is None and last_plain.grad_fn is None
    for name in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"):
        leaf = dict(kw, **{name: kw[name].detach().clone().requires_grad_(True)})
        out, last = selective_scan.selective_scan(**leaf, return_last_state=True)
        assert out.grad_fn is not None, name
        assert torch.equal(out.detach(), out_plain) and torch.equal(last.detach(), last_plain), name
        (out.sum() + last.sum()).backward()
        assert leaf[name].grad is not None and torch.isfinite(leaf[name].grad).all(), name
        with torch.no_grad():
            out_ng = selective_scan.selective_scan(**leaf)
        assert out_ng.grad_fn is None and torch.equal(out_ng, out_plain), name
