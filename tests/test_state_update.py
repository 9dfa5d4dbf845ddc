"""Tests of the decode-step op selective_state_update (torch.ops.selective_scan.state_update):
output and in-place state against a float64 plain-PyTorch step across dtypes, groups, options,
strides and devices; input checks; opcheck."""
import re

import pytest
import torch
import torch.nn.functional as F

from selective_scan import selective_state_update, selective_state_update_ref

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=[CUDA, pytest.mark.cuda])]
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1e-2, 1e-2)}


def make_inputs(batch, dim, dstate, itype, device, groups=None, bc_fp32=False, seed=0):
    """Fresh random inputs; groups=None gives B, C of shape (batch, dstate)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, dtype=torch.float32, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)

    bc_shape = (batch, dstate) if groups is None else (batch, groups, dstate)
    bc_type = torch.float32 if bc_fp32 else itype
    return dict(
        state=r(batch, dim, dstate),
        x=r(batch, dim, dtype=itype),
        dt=r(batch, dim, dtype=itype, scale=0.5),
        A=(-torch.rand(dim, dstate, generator=g) * 2 - 0.1).to(device),
        B=r(*bc_shape, dtype=bc_type),
        C=r(*bc_shape, dtype=bc_type),
        D=r(dim),
        z=r(batch, dim, dtype=itype),
        dt_bias=r(dim, scale=0.5),
    )


def check_against_ref(inp, dt_softplus=True, use=("D", "z", "dt_bias")):
    kw = {k: (inp[k] if k in use else None) for k in ("D", "z", "dt_bias")}
    state = inp["state"]
    ref_state = state.detach().double().clone()
    out = selective_state_update(state, inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"],
                                 dt_softplus=dt_softplus, **kw)
    ref = selective_state_update_ref(ref_state, inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"],
                                     dt_softplus=dt_softplus, compute_dtype=torch.float64, **kw)
    assert out.dtype == inp["x"].dtype and out.shape == inp["x"].shape
    rtol, atol = TOL[inp["x"].dtype]
    torch.testing.assert_close(out.double(), ref.double(), rtol=rtol, atol=atol)
    # The state is fp32 whatever the input dtype: compared at fp32 accuracy.
    torch.testing.assert_close(state.double(), ref_state, rtol=2e-5, atol=2e-5)
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("itype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("groups", [None, 1, 4])
def test_matches_reference(device, itype, groups):
    inp = make_inputs(3, 32, 16, itype, device, groups=groups, seed=[torch.float32, torch.float16, torch.bfloat16].index(itype) * 7 + (groups or 0))
    before = inp["state"].clone()
    check_against_ref(inp)
    assert not torch.equal(before, inp["state"])  # updated in place


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dstate", [1, 3, 4, 8, 16, 20, 64, 100, 256])
def test_dstate_sizes(device, dstate):
    check_against_ref(make_inputs(2, 24, dstate, torch.float32, device, seed=dstate))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("use", [(), ("D",), ("z",), ("dt_bias",), ("D", "z", "dt_bias")])
@pytest.mark.parametrize("dt_softplus", [False, True])
def test_optional_inputs(device, use, dt_softplus):
    inp = make_inputs(2, 16, 8, torch.float32, device, groups=2, seed=len(use) + 10 * dt_softplus)
    if not dt_softplus:
        inp["dt"] = inp["dt"].abs()
    check_against_ref(inp, dt_softplus=dt_softplus, use=use)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("itype", [torch.float16, torch.bfloat16])
def test_fp32_bc_with_low_precision_inputs(device, itype):
    check_against_ref(make_inputs(4, 16, 16, itype, device, groups=2, bc_fp32=True, seed=5))


def strided_inputs(batch, dim, dstate, itype, device, seed=7, aligned=False):
    """Slices of larger tensors: state a batch slice of a cache (updated through the view), x/dt/z
    with a non-unit dim stride, B/C with padded rows, A with a padded row stride. Unaligned
    (scalar loads in the CUDA kernels) unless `aligned` (offsets and paddings of 4 elements, so
    that the 16-byte vector paths run). Returns the inputs and the cache the state is a view of."""
    inp = make_inputs(batch, dim, dstate, itype, device, groups=2, seed=seed)
    pad = 4 if aligned else 1
    big_state = torch.randn(batch + 2, dim, dstate + 8, device=device)
    offset = 4 if aligned else 2
    state = big_state[1:1 + batch, :, offset:offset + dstate]  # strided along batch and dim
    state.copy_(inp["state"])
    inp["state"] = state
    for k in ("x", "dt", "z"):
        wide = torch.randn(batch, 2 * dim, device=device, dtype=inp[k].dtype)
        wide[:, ::2] = inp[k]
        inp[k] = wide[:, ::2]
    for k in ("B", "C"):
        padded = torch.randn(batch, 2, dstate + (4 if aligned else 3), device=device, dtype=inp[k].dtype)
        padded[..., :dstate] = inp[k]
        inp[k] = padded[..., :dstate]
    A_pad = torch.randn(dim, dstate + pad, device=device)
    A_pad[:, :dstate] = inp["A"]
    inp["A"] = A_pad[:, :dstate]
    return inp, big_state


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs(device):
    """Strided views of every input (see strided_inputs); the cache outside the view is untouched."""
    inp, big_state = strided_inputs(3, 16, 16, torch.float32, device)
    untouched = big_state[0].clone()
    check_against_ref(inp)
    torch.testing.assert_close(big_state[0], untouched, rtol=0, atol=0)  # outside the view


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("itype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dstate", [16, 64])
@pytest.mark.parametrize("aligned", [False, True])
def test_cuda_batch_slabs(monkeypatch, itype, dstate, aligned):
    """The CUDA kernels launch batch slabs of fewer than 2^31 rows (32-bit row indices);
    SELECTIVE_SCAN_DECODE_SLAB_ROWS lowers that bound so that a small problem spans several slabs
    (here 2 batches of 16 channels per slab, 4 slabs), each with its own pointer offsets, on the
    strided inputs (aligned at dstate 16: the warp-rows kernel)."""
    monkeypatch.setenv("SELECTIVE_SCAN_DECODE_SLAB_ROWS", "40")
    inp, big_state = strided_inputs(7, 16, dstate, itype, "cuda", seed=11, aligned=aligned)
    untouched = big_state[0].clone()
    check_against_ref(inp)
    torch.testing.assert_close(big_state[0], untouched, rtol=0, atol=0)


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("name,value,accepts", [
    ("SELECTIVE_SCAN_DECODE_SLAB_ROWS", "0", "a number of rows from 1 to 2147483647"),
    ("SELECTIVE_SCAN_DECODE_SLAB_ROWS", "2147483648", "a number of rows from 1 to 2147483647"),
    ("SELECTIVE_SCAN_DECODE_SLAB_ROWS", "4e3", "a number of rows from 1 to 2147483647"),
    ("SELECTIVE_SCAN_DECODE_WARP_ROWS", "2", "0 or 1"),
    ("SELECTIVE_SCAN_DECODE_WARP_ROWS", "off", "0 or 1"),
])
def test_cuda_tuning_variables_checked(monkeypatch, name, value, accepts):
    """The decode step's tuning variables refuse values they do not accept, naming the variable,
    what it accepts and what it got, and leave the state untouched."""
    monkeypatch.setenv(name, value)
    inp = make_inputs(2, 32, 16, torch.bfloat16, "cuda", seed=5)
    before = inp["state"].clone()
    with pytest.raises(RuntimeError, match=re.escape(f"{name}: expected {accepts}, got '{value}'")):
        selective_state_update(inp["state"], inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"],
                               D=inp["D"], z=inp["z"], dt_bias=inp["dt_bias"], dt_softplus=True)
    assert torch.equal(inp["state"], before)


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("dstate", [4, 8, 12, 16])
@pytest.mark.parametrize("itype, groups", [(torch.float32, None), (torch.bfloat16, 3), (torch.float16, 1)])
@pytest.mark.parametrize("layout", ["contiguous", "aligned-strided"])
def test_cuda_warp_rows_and_lanes_per_row_kernels(monkeypatch, dstate, itype, groups, layout):
    """Up to 16 aligned states the CUDA op runs the warp-rows kernel (32 rows a warp, per-row work
    once per row); SELECTIVE_SCAN_DECODE_WARP_ROWS=0 selects the lanes-per-row kernel. Both match
    the float64 step, on a row count that is not a multiple of 32 and warps whose rows cross batch
    (and group) boundaries (dim 33 * 3 groups, 5 batches), and agree with each other."""
    outs, states = [], []
    for env in ("1", "0"):
        monkeypatch.setenv("SELECTIVE_SCAN_DECODE_WARP_ROWS", env)
        if layout == "contiguous":
            inp = make_inputs(5, 99, dstate, itype, "cuda", groups=groups, seed=dstate)
        else:
            inp, _ = strided_inputs(5, 98, dstate, itype, "cuda", seed=dstate, aligned=True)
        outs.append(check_against_ref(inp))
        states.append(inp["state"].clone())
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=TOL[itype][1])
    torch.testing.assert_close(states[0], states[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_many_steps_follow_the_recurrence(device):
    """Twenty steps of the op track twenty float64 reference steps (errors do not grow)."""
    inp = make_inputs(2, 8, 16, torch.float32, device, groups=1, seed=11)
    ref_state = inp["state"].double().clone()
    g = torch.Generator().manual_seed(12)
    for _ in range(20):
        x, dt, z = (torch.randn(2, 8, generator=g).to(device) for _ in range(3))
        B, C = (torch.randn(2, 1, 16, generator=g).to(device) for _ in range(2))
        out = selective_state_update(inp["state"], x, dt, inp["A"], B, C, inp["D"], z, inp["dt_bias"], True)
        ref = selective_state_update_ref(ref_state, x, dt, inp["A"], B, C, inp["D"], z, inp["dt_bias"], True,
                                         compute_dtype=torch.float64)
        torch.testing.assert_close(out.double(), ref.double(), rtol=5e-5, atol=5e-5)
    torch.testing.assert_close(inp["state"].double(), ref_state, rtol=5e-5, atol=5e-5)


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("itype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch, dim, dstate", [(64, 1024, 64), (67, 1000, 16), (3, 70001, 16)])
def test_cuda_large_batch(itype, batch, dim, dstate):
    """More rows than one pass of the persistent grid covers (each block walks several), a row count
    that divides into nothing, and the decode shapes of the benchmark, smaller."""
    check_against_ref(make_inputs(batch, dim, dstate, itype, "cuda", groups=1, seed=3))


def test_zero_batch():
    inp = make_inputs(0, 8, 4, torch.float32, "cpu")
    out = selective_state_update(inp["state"], inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"])
    assert out.shape == (0, 8)


@pytest.mark.parametrize("mutate, match", [
    (lambda i: i.update(state=i["state"].double()), r"state: expected dtype Float, got Double"),
    (lambda i: i.update(state=i["state"][..., 0]), r"state: expected 3 dims"),
    (lambda i: i.update(x=i["x"][:, :4]), r"x: expected shape \[2, 8\], got \[2, 4\]"),
    (lambda i: i.update(dt=i["dt"].half()), r"dt: expected dtype Float, got Half"),
    (lambda i: i.update(z=i["z"][None]), r"z: expected shape \[2, 8\], got \[1, 2, 8\]"),
    (lambda i: i.update(A=i["A"][:, :2]), r"A: expected shape \[8, 4\], got \[8, 2\]"),
    (lambda i: i.update(A=i["A"].double()), r"A: expected dtype Float, got Double"),
    (lambda i: i.update(B=i["B"][:, :3]), r"B: expected shape \[2, 4\], got \[2, 3\]"),
    (lambda i: i.update(B=torch.randn(2, 3, 4)), r"B: expected n_groups dividing dim = 8, got n_groups = 3"),
    (lambda i: i.update(C=i["C"].double()), r"C: expected dtype Float, got Double"),
    (lambda i: i.update(C=torch.randn(2, 2, 4)), r"C: expected n_groups = 1 \(B's\), got 2"),
    (lambda i: i.update(D=i["D"][:3]), r"D: expected shape \[8\], got \[3\]"),
    (lambda i: i.update(dt_bias=i["dt_bias"].half()), r"dt_bias: expected dtype Float, got Half"),
    (lambda i: i.update(x=i["x"].long(), dt=i["dt"].long(), z=None), r"x: expected dtype float32, float16 or bfloat16"),
])
def test_input_checks_name_the_argument(mutate, match):
    inp = make_inputs(2, 8, 4, torch.float32, "cpu")
    mutate(inp)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        selective_state_update(inp["state"], inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], inp["D"],
                               inp["z"], inp["dt_bias"], True)


def test_state_with_strided_dstate_is_rejected():
    inp = make_inputs(2, 8, 4, torch.float32, "cpu")
    state = torch.randn(2, 8, 8)[..., ::2]
    with pytest.raises(ValueError, match="state: expected unit stride along dstate"):
        selective_state_update(state, inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"])


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    inp = make_inputs(2, 8, 4, torch.float32, device, groups=2, seed=4)
    args = (inp["state"], inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], inp["D"], inp["z"],
            inp["dt_bias"], True)
    torch.library.opcheck(torch.ops.selective_scan.state_update.default, args)
    args_no_opt = (inp["state"], inp["x"], inp["dt"], inp["A"], inp["B"][:, 0], inp["C"][:, 0], None, None,
                   None, False)
    torch.library.opcheck(torch.ops.selective_scan.state_update.default, args_no_opt)


def test_compiles_without_graph_breaks():
    inp = make_inputs(2, 8, 4, torch.float32, "cpu", seed=9)
    ref_state = inp["state"].clone()

    def step(state, x, dt, A, B, C, D, z, bias):
        return selective_state_update(state, x, dt, A, B, C, D, z, bias, True) * 2

    args = [inp[k] for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")]
    out = torch.compile(step, fullgraph=True, backend="aot_eager")(inp["state"], *args)
    ref = selective_state_update(ref_state, *args[:5], args[5], args[6], args[7], True) * 2
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(inp["state"], ref_state)


@pytest.mark.parametrize("device", DEVICES)
def test_softplus_and_silu_over_a_wide_range(device):
    """With A = 0, B = C = x = 1 and a zero state, the new state is softplus(dt) and the output
    silu(z) times it: both checked against float64 from dt, z = -80 to 30 (and the threshold 20)."""
    v = torch.cat([torch.linspace(-80, 30, 20001), torch.tensor([-1e-3, 0.0, 1e-5, 19.999, 20.001, 88.0])])
    n = v.numel()
    state = torch.zeros(n, 1, 1, device=device)
    ones = torch.ones(n, 1, device=device)
    out = selective_state_update(state, ones, v[:, None].to(device), torch.zeros(1, 1, device=device), ones, ones,
                                 z=v[:, None].to(device), dt_softplus=True)
    sp = F.softplus(v.double())
    torch.testing.assert_close(state[:, 0, 0].double().cpu(), sp, rtol=1e-6, atol=0)
    torch.testing.assert_close(out[:, 0].double().cpu(), sp * F.silu(v.double()), rtol=3e-6, atol=1e-30)
