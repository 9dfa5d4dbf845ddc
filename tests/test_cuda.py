"""CUDA-only cases (marker `cuda`): fp16/bf16 over longer sequences, stress cases against float64
(very long sequences, tiny timesteps, dstate 256, dim 70000, odd sizes, large batch*dim grids),
the padded tail of the last chunk, and the current CUDA stream. Where the sequential reference
would be too slow, the reference is the CPU op in float64 (itself checked against the sequential
reference by the CPU tests); a stress case passes when the GPU's error is at most
max(tolerance, 2 x the CPU op's own fp32 error) on the same inputs."""
import re

import pytest
import torch

from scan_utils import (FWD_TOL, GRAD_TOL, check_backward, check_forward, grads_of, make_inputs,
                        rel_l2, run_op, to_device, upcast, upstream_grads)

pytestmark = pytest.mark.cuda


def _check_against_cpu_op(kw_gpu, use_out=True, use_last=True):
    """GPU fp32 op vs the CPU op in float64; bound: max(tolerance, 2 x CPU fp32 op's error)."""
    dout, dlast = upstream_grads(kw_gpu)
    dout = dout if use_out else None
    dlast = dlast if use_last else None
    kw_cpu = to_device(kw_gpu, "cpu")
    d_cpu = (None if dout is None else dout.cpu(), None if dlast is None else dlast.cpu())
    gpu = grads_of(lambda k: run_op(k, True), kw_gpu, dout, dlast)
    cpu32 = grads_of(lambda k: run_op(k, True), kw_cpu, *d_cpu)
    cpu64 = grads_of(lambda k: run_op(k, True), upcast(kw_cpu),
                     *[None if t is None else t.double() for t in d_cpu])

    def check(name, got, ref32, ref64, base_tol):
        err = rel_l2(got, ref64)
        tol = max(base_tol, 2 * rel_l2(ref32, ref64))
        assert torch.isfinite(got).all(), f"{name}: non-finite values"
        assert err <= tol, f"{name}: relative L2 error {err:.3e} > {tol:.2e}"

    check("out", gpu[0], cpu32[0], cpu64[0], FWD_TOL[("cuda", torch.float32)])
    check("last_state", gpu[1], cpu32[1], cpu64[1], FWD_TOL[("cuda", torch.float32)])
    for name, ref in cpu64[2].items():
        if ref is None or torch.count_nonzero(ref) == 0:
            continue
        check(f"d{name}", gpu[2][name], cpu32[2][name], ref, GRAD_TOL[("cuda", torch.float32)])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("forms", [("var", "var"), ("group", "const"), ("const", "group")],
                         ids=["var", "group_const", "const_group"])
def test_low_precision_long(dtype, forms):
    kw = make_inputs(device="cuda", dtype=dtype, batch=2, dim=64, seqlen=4100, dstate=16,
                     B_form=forms[0], C_form=forms[1], B_groups=4, C_groups=2, initial_state=True,
                     seed=91)
    check_forward(kw, "cuda", dtype)
    check_backward(kw, "cuda", dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_fp32_bc(dtype):
    kw = make_inputs(device="cuda", dtype=dtype, batch=3, dim=96, seqlen=1500, dstate=32,
                     B_form="group", C_form="var", B_groups=3, B_dtype=torch.float32,
                     C_dtype=torch.float32, seed=92)
    check_forward(kw, "cuda", dtype)
    check_backward(kw, "cuda", dtype)


@pytest.mark.parametrize("seqlen", [65536, 200000])
def test_very_long_sequences(seqlen):
    kw = make_inputs(device="cuda", batch=1, dim=4, seqlen=seqlen, dstate=16, B_form="var",
                     C_form="const", initial_state=True, seed=93)
    _check_against_cpu_op(kw)


@pytest.mark.parametrize("pieces", ["auto", "1"], ids=["split", "one_pass"])
@pytest.mark.parametrize("seqlen", [16384, 65536])
def test_tiny_delta_long(monkeypatch, seqlen, pieces):
    """|d * A| <= 1e-4: exp(d * A) is within 1e-4 of 1 and the state integrates over the whole
    sequence, so any bias of the per-step decays would compound over all steps (the kernels correct
    what each chunk carries over). With the sequence split (these 8 rows take it) and in one pass."""
    if pieces == "auto":
        monkeypatch.delenv("SELECTIVE_SCAN_SEQ_SPLITS", raising=False)
    else:
        monkeypatch.setenv("SELECTIVE_SCAN_SEQ_SPLITS", pieces)
    kw = make_inputs(device="cuda", batch=1, dim=8, seqlen=seqlen, dstate=16, B_form="var",
                     C_form="var", delta_scale=2e-5, A_range=(-1.0, 1.6), initial_state=True,
                     seed=94)
    d_a = (kw["delta"].abs().max() * kw["A"].abs().max()).item()
    assert 1e-5 < d_a <= 1e-4
    _check_against_cpu_op(kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dstate_256(dtype):
    kw = make_inputs(device="cuda", dtype=dtype, batch=2, dim=16, seqlen=2049, dstate=256,
                     B_form="var", C_form="group", C_groups=4, initial_state=True, seed=95)
    check_forward(kw, "cuda", dtype)
    check_backward(kw, "cuda", dtype)


def test_dim_70000():
    kw = make_inputs(device="cuda", batch=1, dim=70000, seqlen=33, dstate=16, B_form="group",
                     C_form="var", B_groups=7, initial_state=True, seed=96)
    check_forward(kw, "cuda", torch.float32)
    check_backward(kw, "cuda", torch.float32)


ODD = [(3, 37, 1023, 5, 1), (1, 17, 1025, 17, 17), (2, 33, 4097, 33, 3), (5, 3, 129, 255, 3),
       (7, 129, 63, 7, 43), (2, 10, 1, 64, 5), (1, 4100, 20, 100, 4)]


@pytest.mark.parametrize("batch,dim,seqlen,dstate,groups", ODD,
                         ids=["x".join(map(str, o)) for o in ODD])
def test_odd_sizes(batch, dim, seqlen, dstate, groups):
    kw = make_inputs(device="cuda", batch=batch, dim=dim, seqlen=seqlen, dstate=dstate,
                     B_form="group", C_form="var", B_groups=groups, initial_state=True,
                     seed=97 + seqlen)
    check_forward(kw, "cuda", torch.float32)
    check_backward(kw, "cuda", torch.float32)


@pytest.mark.parametrize("seqlen", [1, 100, 130, 2047])
@pytest.mark.parametrize("forms", [("const", "const"), ("var", "group")], ids=["const", "var_group"])
@pytest.mark.parametrize("upstream", ["out", "last_state", "both"])
def test_padded_tail(seqlen, forms, upstream):
    """seqlen not a multiple of the chunk with delta_bias + softplus, so every timestep has a
    nonzero delta: steps past the end must not touch last_state or any gradient."""
    kw = make_inputs(device="cuda", batch=2, dim=24, seqlen=seqlen, dstate=16, B_form=forms[0],
                     C_form=forms[1], C_groups=3, delta_softplus=True, delta_bias=True,
                     initial_state=True, seed=98 + seqlen)
    assert seqlen % 64 != 0
    d = torch.nn.functional.softplus(kw["delta"].double() + kw["delta_bias"].double()[:, None])
    assert (d > 0).all()
    check_forward(kw, "cuda", torch.float32)
    check_backward(kw, "cuda", torch.float32, use_out=upstream in ("out", "both"),
                   use_last=upstream in ("last_state", "both"))


@pytest.mark.parametrize("batch,dim,seqlen", [(128, 1024, 16), (512, 160, 9), (4, 16384, 40)])
def test_large_grids(batch, dim, seqlen):
    kw = make_inputs(device="cuda", batch=batch, dim=dim, seqlen=seqlen, dstate=16, B_form="var",
                     C_form="group", C_groups=8, initial_state=True, seed=99)
    check_forward(kw, "cuda", torch.float32)
    check_backward(kw, "cuda", torch.float32)


def test_large_batch_dim_long_rows():
    kw = make_inputs(device="cuda", batch=8, dim=1536, seqlen=2048, dstate=16, B_form="var",
                     C_form="var", seed=100)
    _check_against_cpu_op(kw)


def test_runs_on_current_stream():
    kw = make_inputs(device="cuda", batch=4, dim=256, seqlen=1000, dstate=16, initial_state=True,
                     seed=101)
    dout, dlast = upstream_grads(kw)
    expected = grads_of(lambda k: run_op(k, True), kw, dout, dlast)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()  # a non-blocking stream: no implicit sync with the default stream
    with torch.cuda.stream(side):
        # The inputs are produced on the side stream after a delay: an op that ran on another
        # stream would read them before they are written.
        torch.cuda._sleep(50_000_000)
        kw2 = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        got = grads_of(lambda k: run_op(k, True), kw2, dout.clone(), dlast.clone())
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    for name in expected[2]:
        assert torch.equal(got[2][name], expected[2][name]), name


@pytest.mark.parametrize("case", ["bf16", "fp32-split", "fp32-slices"])
def test_cuda_graph_capture(case):
    """Forward and backward captured in a CUDA graph (how a training step avoids the host time of
    short calls: docs/design.md, item 62) and replayed on new input values give the same bits as
    eager calls on those values: nothing the op passes to its kernels is fixed at capture but the
    buffers. Cases: one pass in bf16; few rows, whose sequence split adds passes and combines; dstate
    128, which runs in state slices with copies and sums between them."""
    shape = {"bf16": dict(dtype=torch.bfloat16, batch=2, dim=64, seqlen=300, dstate=16),
             "fp32-split": dict(batch=1, dim=32, seqlen=1000, dstate=16, initial_state=True),
             "fp32-slices": dict(batch=2, dim=16, seqlen=200, dstate=128, B_form="group", C_form="var")}[case]
    kw = make_inputs(device="cuda", seed=120, **shape)
    dout, dlast = upstream_grads(kw)
    static = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    step = lambda: grads_of(lambda k: run_op(k, True), static, dout, dlast)
    side = torch.cuda.Stream()  # warm-up before capture, on a side stream (torch.cuda.graphs)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for seed in (121, 122):
        fresh = make_inputs(device="cuda", seed=seed, **shape)
        fresh = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in fresh.items()}
        fresh_dout, fresh_dlast = upstream_grads(fresh, seed=seed)
        for k, v in fresh.items():
            if isinstance(v, torch.Tensor):
                static[k].copy_(v)
        dout.copy_(fresh_dout)
        dlast.copy_(fresh_dlast)
        graph.replay()
        expected = grads_of(lambda k: run_op(k, True), fresh, fresh_dout, fresh_dlast)
        torch.cuda.synchronize()
        assert torch.equal(captured[0], expected[0]), "out"
        assert torch.equal(captured[1], expected[1]), "last_state"
        for name, grad in expected[2].items():
            assert torch.equal(captured[2][name], grad), f"d{name}"


def test_cuda_matches_cpu_op():
    """The two implementations agree (both against float64) on a mid-size mixed case."""
    kw = make_inputs(device="cuda", batch=3, dim=48, seqlen=777, dstate=24, B_form="group",
                     C_form="const", B_groups=6, initial_state=True, seed=102)
    _check_against_cpu_op(kw)


@pytest.mark.parametrize("pieces", ["1", "2", "3", "7", "auto"])
@pytest.mark.parametrize("dtype,dstate", [(torch.float32, 16), (torch.bfloat16, 16), (torch.float32, 5),
                                          (torch.float32, 200)], ids=["fp32", "bf16", "fp32-n5", "fp32-n200"])
def test_sequence_split(monkeypatch, pieces, dtype, dstate):
    """The sequence split (forward: state-only pass, combine, full pass; backward: adjoint-only
    pass, combine from the right, full pass; docs/design.md), forced to 1..7 pieces by
    SELECTIVE_SCAN_SEQ_SPLITS or chosen for these few rows (auto): out, last_state and every
    gradient match float64, with a partial last chunk, an initial state, groups of B and variable C."""
    if pieces == "auto":
        monkeypatch.delenv("SELECTIVE_SCAN_SEQ_SPLITS", raising=False)
    else:
        monkeypatch.setenv("SELECTIVE_SCAN_SEQ_SPLITS", pieces)
    kw = make_inputs(device="cuda", dtype=dtype, batch=2, dim=12, seqlen=1000, dstate=dstate,
                     B_form="group", C_form="var", B_groups=3, delta_softplus=True, delta_bias=True,
                     initial_state=True, seed=103 + dstate)
    check_forward(kw, "cuda", dtype)
    check_backward(kw, "cuda", dtype)


SLICE_CASES = {
    # 8400 rows (no sequence split), groups of B, variable C, z and D, an initial state, 16-byte
    # aligned rows (16-bit inputs: slices of 20 states take the fixed layout's fp32-output build)
    "rows_group_var": dict(batch=3, dim=2800, seqlen=320, B_form="group", C_form="var", B_groups=4),
    # 24 rows: each slice splits its sequence; time-invariant B, groups of C, no z
    "split_const_group_noz": dict(batch=2, dim=12, seqlen=1000, B_form="const", C_form="group",
                                  C_groups=3, z=False),
    # no D, no bias, no softplus, variable B and C, an odd sequence length
    "var_noD_plain": dict(batch=2, dim=40, seqlen=777, D=False, delta_bias=False, delta_softplus=False),
}


@pytest.mark.parametrize("dstate,width", [(40, "16"), (40, "24"), (72, "40")], ids=["40in16", "40in24", "72in40"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", list(SLICE_CASES))
def test_state_slices(monkeypatch, dstate, width, dtype, case):
    """A dstate above SELECTIVE_SCAN_STATE_SLICE (default 64) runs as slices of at most that many
    states, one launch each, whose fp32 partial outputs are summed (docs/design.md, "State
    slices"): dstate 40 in slices of 14, 13 and 13 states (16-bit inputs: the fp32 kernels on
    widened inputs) or of 20 and 20 (with aligned rows and variable B and C, the 16-bit forward's
    fp32-output build at 8 threads per channel), dstate 72 in slices of 36 and 36 (16 threads per
    channel: the 16-bit backward's fp32-gradient build, and the forward's with aligned rows and
    variable B and C). out, last_state and every gradient match float64, and a second run is
    bitwise equal (the slices are added in a fixed order)."""
    monkeypatch.setenv("SELECTIVE_SCAN_STATE_SLICE", width)
    kw = make_inputs(device="cuda", dtype=dtype, dstate=dstate, initial_state=True,
                     seed=301 + int(width) + len(case), **SLICE_CASES[case])
    check_forward(kw, "cuda", dtype)
    g = check_backward(kw, "cuda", dtype)
    dout, dlast = upstream_grads(kw)
    again = grads_of(lambda k: run_op(k, True), kw, dout, dlast)[2]
    for name, grad in g.items():
        assert torch.equal(grad, again[name]), f"d{name} differs between runs"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("dstate", [100, 101, 256])
def test_state_slices_default_width(monkeypatch, dtype, dstate):
    """The default slices (at most 64 states: 50 and 50, 51 and 50, or four of 64) with 16-bit
    inputs, aligned rows and variable B and C, where the forward's slices run its fp32-output build
    at 16 threads per channel and the backward's its fp32-gradient build, which read and write
    their columns of the checkpoints in place (at 101 the second slice's columns start at an odd
    state, so its backward reads them without the 8-byte copies): out, last_state and every
    gradient against float64."""
    monkeypatch.delenv("SELECTIVE_SCAN_STATE_SLICE", raising=False)
    kw = make_inputs(device="cuda", dtype=dtype, batch=2, dim=64, seqlen=1024, dstate=dstate, B_form="var",
                     C_form="group", C_groups=2, initial_state=True, seed=341 + dstate)
    check_forward(kw, "cuda", dtype)
    check_backward(kw, "cuda", dtype)


@pytest.mark.parametrize("dstate,width,other", [(128, "64", "32"), (100, "64", "25"), (40, "16", "64")],
                         ids=["128in64vs32", "100in64vs25", "40in16vs1"])
def test_state_slices_match_other_slicing(monkeypatch, dstate, width, other):
    """dstate 128 in two slices of 64 (the default) against four of 32, 100 in 50 and 50 against
    four of 25, and 40 in 14, 13 and 13 against one launch of all states: the same results up to the
    order of the sums over states (fp32), and the same checkpoints, which each slice writes into its
    columns in place (16-byte stores where its columns are 16-byte aligned, 4-byte stores
    otherwise)."""
    kw = make_inputs(device="cuda", batch=2, dim=64, seqlen=1000, dstate=dstate, B_form="var",
                     C_form="group", C_groups=2, initial_state=True, seed=331 + dstate)
    dout, dlast = upstream_grads(kw)
    args = (kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw["D"], kw["z"], kw["delta_bias"],
            kw["initial_state"], kw["delta_softplus"])
    runs, ckpts = {}, {}
    for w in (width, other):
        monkeypatch.setenv("SELECTIVE_SCAN_STATE_SLICE", w)
        runs[w] = grads_of(lambda k: run_op(k, True), kw, dout, dlast)
        ckpts[w] = torch.ops.selective_scan.fwd(*args)[2]
    for i, name in ((0, "out"), (1, "last_state")):
        assert rel_l2(runs[width][i], runs[other][i]) < 1e-6, name
    assert ckpts[width].shape == ckpts[other].shape
    assert rel_l2(ckpts[width], ckpts[other]) < 1e-6, "checkpoints"
    for name, grad in runs[width][2].items():
        assert rel_l2(grad, runs[other][2][name]) < 1e-5, f"d{name}"


# Each tuning variable of the scan, a value it refuses, and what its error says it accepts.
BAD_TUNING_VALUES = [
    ("SELECTIVE_SCAN_STATE_SLICE", "65", "a number of states from 1 to 64"),
    ("SELECTIVE_SCAN_STATE_SLICE", "0", "a number of states from 1 to 64"),
    ("SELECTIVE_SCAN_STATE_SLICE", "x", "a number of states from 1 to 64"),
    ("SELECTIVE_SCAN_STATE_SLICE", "16x", "a number of states from 1 to 64"),
    ("SELECTIVE_SCAN_SEQ_SPLITS", "0", "a number of pieces from 1 to 65535"),
    ("SELECTIVE_SCAN_SEQ_SPLITS", "65536", "a number of pieces from 1 to 65535"),
    ("SELECTIVE_SCAN_SEQ_SPLITS", "", "a number of pieces from 1 to 65535"),
    ("SELECTIVE_SCAN_SPT", "2", "1 or 4"),
    ("SELECTIVE_SCAN_SPT", "four", "1 or 4"),
    ("SELECTIVE_SCAN_FWD_REGS", "64", "102 or 128"),
    ("SELECTIVE_SCAN_FWD_REGS", "128 ", "102 or 128"),
]


@pytest.mark.parametrize("name,value,accepts", BAD_TUNING_VALUES)
def test_tuning_variables_checked(monkeypatch, name, value, accepts):
    """A tuning variable set to a value it does not accept is refused with the variable's name,
    what it accepts and what it got, not run with the default (SELECTIVE_SCAN_STATE_SLICE: 1 to
    64 states, the most the kernels hold per launch)."""
    monkeypatch.setenv(name, value)
    kw = make_inputs(device="cuda", batch=1, dim=8, seqlen=64, dstate=16, seed=7)
    with pytest.raises(RuntimeError, match=re.escape(f"{name}: expected {accepts}, got '{value}'")):
        run_op(kw, True)


@pytest.mark.parametrize("spt", ["1", "4"])
@pytest.mark.parametrize("dstate", [6, 16, 32])
def test_forced_states_per_thread(monkeypatch, spt, dstate):
    """SELECTIVE_SCAN_SPT forces one or four states per thread (one only up to dstate 32; at
    dstate 6 either keeps the states unpadded) on a problem whose rows would choose the other
    (dim 64: one state per thread; dim 8192: four): out, last_state and every gradient against
    float64, in one piece."""
    monkeypatch.setenv("SELECTIVE_SCAN_SPT", spt)
    monkeypatch.setenv("SELECTIVE_SCAN_SEQ_SPLITS", "1")
    kw = make_inputs(device="cuda", dtype=torch.bfloat16, batch=1, dim=64 if spt == "4" else 8192,
                     seqlen=200, dstate=dstate, B_form="group", C_form="var", B_groups=2,
                     delta_softplus=True, delta_bias=True, initial_state=True, seed=401 + dstate)
    check_forward(kw, "cuda", torch.bfloat16)
    check_backward(kw, "cuda", torch.bfloat16)


@pytest.mark.parametrize("pieces", ["1", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dstate,seqlen", [(24, 1000), (32, 1024), (40, 1024), (64, 1000)])
def test_fixed_layouts(monkeypatch, pieces, dtype, dstate, seqlen):
    """The forward's fixed layouts (8 and 16 threads per channel of four states: dstate 17-64,
    taken with 16-byte aligned rows and variable B and C; B and C staged by whole 16-byte vectors,
    padded states zeroed when staged): whole chunks only and a partial last chunk, with and
    without the sequence split, against float64."""
    if pieces == "auto":
        monkeypatch.delenv("SELECTIVE_SCAN_SEQ_SPLITS", raising=False)
    else:
        monkeypatch.setenv("SELECTIVE_SCAN_SEQ_SPLITS", pieces)
    kw = make_inputs(device="cuda", dtype=dtype, batch=2, dim=40, seqlen=seqlen, dstate=dstate,
                     B_form="group", C_form="var", B_groups=2, delta_softplus=True, delta_bias=True,
                     initial_state=True, seed=211 + dstate + seqlen)
    for name in ("u", "delta", "B", "C"):
        assert kw[name].data_ptr() % 16 == 0 and (kw[name].stride(-2) * kw[name].element_size()) % 16 == 0
    check_forward(kw, "cuda", dtype)
    check_backward(kw, "cuda", dtype)


@pytest.mark.parametrize("pieces", ["1", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("forms", [("var", "var"), ("const", "group")], ids=["var_var", "const_group"])
@pytest.mark.parametrize("z", [True, False], ids=["z", "no_z"])
def test_backward_rows_loaded_ahead(monkeypatch, pieces, dtype, forms, z):
    """The backward at 16 threads per channel (dstate 33-64) with 16-bit inputs loads the next
    chunk's rows of u, delta, dout and z into registers during the previous chunk's stores (aligned
    rows, every chunk but the first walked; fp32 stages them without): with and without z,
    both-variable and time-invariant B, one pass and pieces of the sequence split (each piece's
    first chunk walked loads when staged), a partial last chunk; against float64."""
    if pieces == "auto":
        monkeypatch.delenv("SELECTIVE_SCAN_SEQ_SPLITS", raising=False)
    else:
        monkeypatch.setenv("SELECTIVE_SCAN_SEQ_SPLITS", pieces)
    kw = make_inputs(device="cuda", dtype=dtype, batch=2, dim=40, seqlen=600, dstate=64,
                     B_form=forms[0], C_form=forms[1], C_groups=2, z=z, delta_softplus=True,
                     delta_bias=True, initial_state=True, seed=307 + len(pieces) + int(z))
    for name in ("u", "delta") + (("z",) if z else ()):
        assert kw[name].data_ptr() % 16 == 0 and (kw[name].stride(-2) * kw[name].element_size()) % 16 == 0
    check_forward(kw, "cuda", dtype)
    check_backward(kw, "cuda", dtype)


SMALL_DSTATE_LAYOUTS = {
    # 80 rows, three chunks (no sequence split): the forward pads to four threads per channel of
    # four states, the backward runs one state per thread at dstate 2-4
    "few_rows": dict(batch=2, dim=40, seqlen=130),
    # 32768 rows: the forward runs one state per thread at dstate 2-4 as well
    "many_rows": dict(batch=4, dim=8192, seqlen=130),
    # few rows over 16 chunks: the sequence split, padded in both directions
    "split": dict(batch=2, dim=12, seqlen=1000),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", list(SMALL_DSTATE_LAYOUTS))
@pytest.mark.parametrize("dstate", [1, 2, 3, 4, 6])
def test_small_dstate(monkeypatch, dstate, layout, dtype):
    """dstate 1-8 runs either one state per thread or four threads per channel of four states
    padded to 16, chosen by direction, dstate, rows and the sequence split (block_shape,
    docs/design.md): every choice against float64, with groups of B, variable C and an initial
    state."""
    monkeypatch.delenv("SELECTIVE_SCAN_SEQ_SPLITS", raising=False)
    kw = make_inputs(device="cuda", dtype=dtype, dstate=dstate, B_form="group", C_form="var", B_groups=2,
                     delta_softplus=True, delta_bias=True, initial_state=True, seed=307 + dstate,
                     **SMALL_DSTATE_LAYOUTS[layout])
    check_forward(kw, "cuda", dtype)
    check_backward(kw, "cuda", dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_forward_builds_by_grid_size(monkeypatch, dtype):
    """The 16-bit forward at four threads per channel has two builds, chosen by grid size: 128
    registers per thread where the grid needs no more waves at four blocks per SM than at five, 102
    otherwise. A grid of two more blocks than four per SM (two waves at four, one at five: the
    second build) gives bitwise the outputs of 8192 of its rows run on their own (the first build:
    256 blocks, one wave; 8192 rows are the fewest that keep four states per thread), and those
    match float64."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    if 4 * sms * 32 < 8192:
        pytest.skip("fewer than 64 SMs: 8192 rows are not resident at four blocks per SM")
    monkeypatch.setenv("SELECTIVE_SCAN_SEQ_SPLITS", "1")
    dim = 4 * sms * 32 + 64  # blocks of 32 channels: two more than four per SM
    few_rows = 8192
    kw = make_inputs(device="cuda", dtype=dtype, batch=1, dim=dim, seqlen=200, dstate=16, B_form="var",
                     C_form="var", delta_softplus=True, delta_bias=True, initial_state=True, seed=331)
    few = dict(kw)
    for name in ("u", "delta", "z", "initial_state"):
        few[name] = kw[name][:, :few_rows].contiguous()
    for name in ("A", "D", "delta_bias"):
        few[name] = kw[name][:few_rows].contiguous()
    out, last = run_op(kw)
    out_few, last_few = run_op(few)
    assert torch.equal(out[:, :few_rows], out_few)
    assert torch.equal(last[:, :few_rows], last_few)
    check_forward(few, "cuda", dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_forward_register_builds_agree(monkeypatch, dtype):
    """SELECTIVE_SCAN_FWD_REGS forces either build of the 16-bit four-threads-per-channel forward:
    on the same inputs (the sequence split in three pieces, which keeps four states per thread at
    few rows; a partial last chunk) both give bitwise the same outputs and last state, and match
    float64."""
    monkeypatch.setenv("SELECTIVE_SCAN_SEQ_SPLITS", "3")
    kw = make_inputs(device="cuda", dtype=dtype, batch=2, dim=96, seqlen=1000, dstate=16, B_form="var",
                     C_form="var", delta_softplus=True, delta_bias=True, initial_state=True, seed=337)
    runs = {}
    for regs in ("128", "102"):
        monkeypatch.setenv("SELECTIVE_SCAN_FWD_REGS", regs)
        runs[regs] = run_op(kw)
    assert torch.equal(runs["128"][0], runs["102"][0])
    assert torch.equal(runs["128"][1], runs["102"][1])
    check_forward(kw, "cuda", dtype)


def test_backward_piece_count_of_its_own(monkeypatch):
    """With few rows the backward chooses its own piece count to fill its last wave of blocks
    (bwd_chunks_per_piece: on an H200, (1, 1536, 4096, 16) runs its forward in 22 pieces and its
    backward in 16): out, last_state and every gradient against float64, and within fp32 rounding
    of the runs with either count forced for both passes."""
    kw = make_inputs(device="cuda", batch=1, dim=1536, seqlen=4096, dstate=16, B_form="var", C_form="var",
                     delta_softplus=True, delta_bias=True, initial_state=True, seed=419)
    monkeypatch.delenv("SELECTIVE_SCAN_SEQ_SPLITS", raising=False)
    check_forward(kw, "cuda", torch.float32)
    check_backward(kw, "cuda", torch.float32)
    dout, dlast = upstream_grads(kw)
    auto = grads_of(lambda k: run_op(k, True), kw, dout, dlast)
    for pieces in ("22", "16"):
        monkeypatch.setenv("SELECTIVE_SCAN_SEQ_SPLITS", pieces)
        forced = grads_of(lambda k: run_op(k, True), kw, dout, dlast)
        for name, ref in forced[2].items():
            if ref is not None:
                assert rel_l2(auto[2][name], ref) < 2e-5, (pieces, name)


@pytest.mark.parametrize("forms", [("var", "var"), ("const", "const")], ids=["var", "const"])
def test_sequence_split_matches_one_pass(monkeypatch, forms):
    """Split (7 pieces) and unsplit runs agree to fp32 rounding in the outputs and every gradient
    (time-invariant B/C: per-piece partial rows summed), and the split is bitwise deterministic."""
    kw = make_inputs(device="cuda", batch=1, dim=32, seqlen=3000, dstate=16, B_form=forms[0], C_form=forms[1],
                     delta_softplus=True, delta_bias=True, initial_state=True, seed=104)
    dout, dlast = upstream_grads(kw)
    runs = {}
    for pieces in ("1", "7", "7"):
        monkeypatch.setenv("SELECTIVE_SCAN_SEQ_SPLITS", pieces)
        runs.setdefault(pieces, []).append(grads_of(lambda k: run_op(k, True), kw, dout, dlast))
    (one,), (a, b) = runs["1"], runs["7"]
    for i in (0, 1):
        assert torch.equal(a[i], b[i])
        assert rel_l2(a[i], one[i]) < 2e-5
    for name, ref in one[2].items():
        if ref is None:
            continue
        assert torch.equal(a[2][name], b[2][name]), name
        assert rel_l2(a[2][name], ref) < 2e-5, name
