"""Variable-length sequences (`cu_seqlens`): the op, the scan module, the Mamba block and the
language model on sequences packed along seqlen, against each sequence run alone (float64
references), with and without initial states, plus the padding plan, the argument checks,
empty sequences and determinism."""
import pytest
import torch

from selective_scan import selective_scan, selective_scan_ref
from selective_scan.nn import (Mamba, MambaConfig, MambaLMHeadModel, SelectiveScan, causal_conv1d_varlen,
                               last_inputs_varlen)
from selective_scan.reference import selective_scan_parallel_ref
from selective_scan.varlen import padding_plan

from scan_utils import (CUDA, DEVICE_DTYPES, DEVICES, FWD_TOL, GRAD_TOL, LOW_PRECISION, LOWP_FWD_CAP, LOWP_GRAD_CAP,
                        check_close, check_lowp, compute_dtype, make_inputs, upcast)

# Sequence lengths per case: empty sequences, one step, several batches of the padding plan, a
# sequence longer than a checkpoint chunk (64 steps) beside short ones.
LENGTHS = {
    "mixed": [5, 0, 17, 3, 64, 130, 1],
    "one": [41],
    "long_and_short": [2, 150, 7, 7, 0, 66],
}
ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def packed_case(lengths, dtype, device, B_form="var", C_form="var", initial_state=False, seed=0, **options):
    """make_inputs for one packed row of sum(lengths) steps, cu_seqlens, and (optionally) one
    initial state per sequence."""
    kw = make_inputs(batch=1, dim=6, seqlen=sum(lengths), dstate=5, dtype=dtype, device=device,
                     B_form=B_form, C_form=C_form, seed=seed, **options)
    if initial_state:
        g = torch.Generator().manual_seed(seed + 7)
        h0 = torch.randn(len(lengths), 6, 5, generator=g, dtype=torch.float64)
        kw["initial_state"] = h0.to(compute_dtype(dtype)).to(device)
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return kw, torch.tensor(offsets, dtype=torch.int64, device=device)


def run(fn, kw, cu_seqlens, **extra):
    return fn(kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw["D"], kw["z"], kw["delta_bias"],
              kw["delta_softplus"], True, initial_state=kw["initial_state"], cu_seqlens=cu_seqlens, **extra)


def grads(fn, kw, cu_seqlens, dout, dlast, **extra):
    leaves = {k: (v.detach().requires_grad_(True) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    names = [k for k in ARGS if leaves[k] is not None]
    out, last = run(fn, leaves, cu_seqlens, **extra)
    outputs = [o for o, g in ((out, dout), (last, dlast)) if g is not None]
    upstream = [g.to(o.dtype) for o, g in ((out, dout), (last, dlast)) if g is not None]
    got = torch.autograd.grad(outputs, [leaves[k] for k in names], upstream, allow_unused=True)
    return out.detach(), last.detach(), dict(zip(names, got))


def compare(device, dtype, kw, cu_seqlens, use_out=True, use_last=True):
    """Outputs and gradients of the op against the float64 per-sequence reference (the low-precision
    rule where the reference is computed in the input dtype too)."""
    g = torch.Generator().manual_seed(3)
    num_seqs = cu_seqlens.numel() - 1
    dout = torch.randn(kw["u"].shape, generator=g, dtype=torch.float64).to(device) if use_out else None
    dlast = torch.randn(num_seqs, 6, 5, generator=g, dtype=torch.float64).to(device) if use_last else None
    out, last, gr = grads(selective_scan, kw, cu_seqlens, dout, dlast)
    assert out.shape == kw["u"].shape and out.dtype == kw["u"].dtype
    assert last.shape == (num_seqs, 6, 5) and last.dtype == compute_dtype(dtype)
    out64, last64, g64 = grads(selective_scan_ref, upcast(kw), cu_seqlens, dout, dlast)
    for name, ref in list(g64.items()):
        if ref is None:  # the used outputs do not depend on this input (z, with last_state alone)
            assert gr[name] is None or torch.count_nonzero(gr[name]) == 0, f"{name}: expected a zero gradient"
            del g64[name]
    if dtype in LOW_PRECISION:
        out_lp, last_lp, glp = grads(selective_scan_ref, kw, cu_seqlens, dout, dlast, compute_dtype=dtype)
        check_lowp("out", out, out64, out_lp, dtype, LOWP_FWD_CAP[dtype])
        check_lowp("last_state", last, last64, last_lp, dtype, LOWP_FWD_CAP[dtype])
        for name, ref in g64.items():
            assert gr[name].shape == kw[name].shape and gr[name].dtype == kw[name].dtype, name
            check_lowp(f"d{name}", gr[name], ref, glp[name], dtype, LOWP_GRAD_CAP[dtype])
    else:
        check_close("out", out, out64, FWD_TOL[(device, dtype)])
        check_close("last_state", last, last64, FWD_TOL[(device, dtype)])
        for name, ref in g64.items():
            assert gr[name].shape == kw[name].shape and gr[name].dtype == kw[name].dtype, name
            check_close(f"d{name}", gr[name], ref, GRAD_TOL[(device, dtype)])
    return gr


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("initial_state", [False, True], ids=["zero_start", "initial_state"])
@pytest.mark.parametrize("case,B_form,C_form", [("mixed", "var", "var"), ("one", "group", "var"),
                                                ("long_and_short", "const", "group")])
def test_varlen_matches_each_sequence_alone(device, dtype, initial_state, case, B_form, C_form):
    kw, cu = packed_case(LENGTHS[case], dtype, device, B_form, C_form, initial_state)
    compare(device, dtype, kw, cu)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("options", [{}, {"D": False, "z": False, "delta_bias": False, "delta_softplus": False},
                                     {"delta_softplus": False}], ids=["all_on", "all_off", "no_softplus"])
@pytest.mark.parametrize("initial_state", [False, True], ids=["zero_start", "initial_state"])
@pytest.mark.parametrize("upstream", ["out", "last"])
def test_varlen_options_and_upstream(device, options, initial_state, upstream):
    kw, cu = packed_case(LENGTHS["mixed"], torch.float32, device, initial_state=initial_state, seed=5, **options)
    compare(device, torch.float32, kw, cu, use_out=upstream == "out", use_last=upstream == "last")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("initial_state", [False, True], ids=["zero_start", "initial_state"])
def test_varlen_out_alone_and_int32_offsets(device, initial_state):
    kw, cu = packed_case(LENGTHS["long_and_short"], torch.float32, device, initial_state=initial_state, seed=2)
    out = selective_scan(kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw["D"], kw["z"], kw["delta_bias"],
                         True, initial_state=kw["initial_state"], cu_seqlens=cu.to(torch.int32))
    assert isinstance(out, torch.Tensor)
    out64, _ = run(selective_scan_ref, upcast(kw), cu)
    check_close("out", out, out64, FWD_TOL[(device, torch.float32)])


def test_padding_plan():
    lengths = [5, 0, 17, 3, 64, 130, 1, 64, 65, 2, 0]
    plan = padding_plan(lengths)
    placed = [i for batch in plan for i in batch]
    assert sorted(placed) == [i for i, n in enumerate(lengths) if n > 0]
    for batch in plan:
        longest = lengths[batch[0]]
        assert all(lengths[i] <= longest and 2 * lengths[i] > longest for i in batch)
        assert [lengths[i] for i in batch] == sorted((lengths[i] for i in batch), reverse=True)
    padded = sum(len(batch) * lengths[batch[0]] for batch in plan)
    assert padded < 2 * sum(lengths)
    assert padding_plan([0, 0]) == []


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_empty_sequences(device):
    # every sequence empty: no steps; last_state is the initial state (zeros without one), and
    # d(initial_state) is d(last_state)
    kw, cu = packed_case([0, 0, 0], torch.float32, device, initial_state=True)
    h0 = kw["initial_state"].detach().requires_grad_(True)
    out, last = selective_scan(kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw["D"], kw["z"], kw["delta_bias"],
                               True, True, initial_state=h0, cu_seqlens=cu)
    assert out.shape == (1, 6, 0)
    assert torch.equal(last, h0.detach())
    dlast = torch.randn_like(last)
    (dh0,) = torch.autograd.grad(last, h0, dlast)
    assert torch.equal(dh0, dlast)
    _, last0 = selective_scan(kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], return_last_state=True, cu_seqlens=cu)
    assert last0.shape == (3, 6, 5) and torch.count_nonzero(last0) == 0
    # no sequences at all
    kw, cu = packed_case([], torch.float32, device)
    out, last = selective_scan(kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], return_last_state=True, cu_seqlens=cu)
    assert out.shape == (1, 6, 0) and last.shape == (0, 6, 5)


@pytest.mark.parametrize("bad,match", [
    (lambda kw, cu: dict(cu_seqlens=cu.tolist()), "cu_seqlens: expected a torch.Tensor, got list"),
    (lambda kw, cu: dict(cu_seqlens=cu.float()), "cu_seqlens: expected dtype int32 or int64"),
    (lambda kw, cu: dict(cu_seqlens=cu[None]), r"cu_seqlens: expected a 1-D tensor .* got shape \(1, 8\)"),
    (lambda kw, cu: dict(cu_seqlens=cu + 1), "cu_seqlens: expected cu_seqlens\\[0\\] == 0, got 1"),
    (lambda kw, cu: dict(cu_seqlens=torch.tensor([0, 9, 5, 220])), "expected non-decreasing offsets, got 9 then 5"),
    (lambda kw, cu: dict(cu_seqlens=cu[:-1]), "expected the last offset to equal u's seqlen 220, got 219"),
    (lambda kw, cu: dict(u=torch.cat([kw["u"]] * 2)), r"u: expected shape \(1, dim, total\) with cu_seqlens"),
    (lambda kw, cu: dict(z=kw["z"][..., :-1]), r"z: expected u's shape \(1, 6, 220\), got \(1, 6, 219\)"),
    (lambda kw, cu: dict(B=kw["B"][..., :-1]), r"B: expected \(1, dstate, 220\) .* got \(1, 5, 219\)"),
    (lambda kw, cu: dict(initial_state=torch.zeros(1, 6, 5)),
     r"initial_state: expected \(num_seqs, dim, dstate\) = \(7, 6, 5\) with cu_seqlens, got \(1, 6, 5\)"),
])
def test_varlen_bad_arguments(bad, match):
    kw, cu = packed_case(LENGTHS["mixed"], torch.float32, "cpu")
    args = dict(kw, cu_seqlens=cu)
    args.update(bad(kw, cu))
    with pytest.raises((TypeError, ValueError), match=match):
        selective_scan(args["u"], args["delta"], args["A"], args["B"], args["C"], args["D"], args["z"],
                       args["delta_bias"], True, True, initial_state=args["initial_state"],
                       cu_seqlens=args["cu_seqlens"])


@CUDA
@pytest.mark.parametrize("initial_state", [False, True], ids=["zero_start", "initial_state"])
def test_varlen_backward_deterministic_cuda(initial_state):
    kw, cu = packed_case([300, 7, 129, 64, 1000], torch.bfloat16, "cuda", initial_state=initial_state)
    g = torch.Generator().manual_seed(4)
    dout = torch.randn(kw["u"].shape, generator=g).to("cuda")
    dlast = torch.randn(5, 6, 5, generator=g).to("cuda")
    first = grads(selective_scan, kw, cu, dout, dlast)[2]
    for _ in range(2):
        again = grads(selective_scan, kw, cu, dout, dlast)[2]
        for name in first:
            assert torch.equal(first[name], again[name]), name


@pytest.mark.parametrize("scan_fn", [None, selective_scan_ref, selective_scan_parallel_ref],
                         ids=["op", "ref", "parallel_ref"])
def test_scan_module_varlen(scan_fn):
    kw, cu = packed_case(LENGTHS["mixed"], torch.float64, "cpu", initial_state=True)
    module = SelectiveScan(delta_softplus=True, scan_fn=scan_fn)
    out, last = module(kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw["D"], kw["z"], kw["delta_bias"],
                       kw["initial_state"], return_last_state=True, cu_seqlens=cu)
    out64, last64 = run(selective_scan_ref, kw, cu)
    check_close("out", out, out64, 1e-12)
    check_close("last_state", last, last64, 1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_causal_conv1d_varlen(device):
    lengths = [3, 0, 1, 9, 4]
    total = sum(lengths)
    x = torch.randn(1, 5, total, dtype=torch.float64, device=device)
    conv = torch.nn.Conv1d(5, 5, 4, groups=5, padding=3, dtype=torch.float64, device=device)
    cu = torch.tensor([0, 3, 3, 4, 13, 17], device=device)
    y = causal_conv1d_varlen(x, conv.weight, conv.bias, cu)
    alone = [conv(x[..., cu[i]:cu[i + 1]])[..., :lengths[i]] for i in range(len(lengths)) if lengths[i] > 0]
    torch.testing.assert_close(y, torch.cat(alone, dim=-1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_mamba_block_and_lm_varlen(device):
    torch.manual_seed(0)
    lengths = [5, 1, 0, 70, 3]
    cu = torch.tensor([0, 5, 6, 6, 76, 79], device=device)
    # (fp32: the block hands the op fp32 A, D and dt bias)
    block = Mamba(16, d_state=8, device=device)
    x = torch.randn(1, sum(lengths), 16, device=device, requires_grad=True)
    y = block(x, cu_seqlens=cu)
    alone = torch.cat([block(x[:, cu[i]:cu[i + 1]]) for i in range(len(lengths)) if lengths[i] > 0], dim=1)
    torch.testing.assert_close(y, alone, rtol=1e-5, atol=1e-6)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy, retain_graph=True)
    (dx_alone,) = torch.autograd.grad(alone, x, dy)
    torch.testing.assert_close(dx, dx_alone, rtol=1e-5, atol=1e-6)
    # a sequence's outputs do not depend on the other sequences' inputs
    (dx_first,) = torch.autograd.grad(y[:, :5].sum(), x)
    assert torch.count_nonzero(dx_first[:, 5:]) == 0 and torch.count_nonzero(dx_first[:, :5]) > 0
    with pytest.raises(ValueError, match="hidden_states: expected batch 1 with cu_seqlens"):
        block(torch.cat([x, x]), cu_seqlens=cu)

    lm = MambaLMHeadModel(MambaConfig(d_model=16, n_layer=2, vocab_size=40), device=device)
    ids = torch.randint(0, 40, (1, sum(lengths)), device=device)
    logits = lm(ids, cu_seqlens=cu).logits
    logits_alone = torch.cat([lm(ids[:, cu[i]:cu[i + 1]]).logits for i in range(len(lengths)) if lengths[i] > 0],
                             dim=1)
    torch.testing.assert_close(logits, logits_alone, rtol=1e-5, atol=1e-5)


def test_varlen_compiled():
    # the offsets' values set the padded shapes: the varlen path breaks the graph, and each list of
    # offsets gives the eager results
    torch._dynamo.reset()
    kw, _ = packed_case([17, 0, 23, 4], torch.float32, "cpu", initial_state=True)

    def scan(u, h0, cu_seqlens):
        return selective_scan(u, kw["delta"], kw["A"], kw["B"], kw["C"], kw["D"], kw["z"], kw["delta_bias"], True,
                              True, initial_state=h0, cu_seqlens=cu_seqlens)
    compiled = torch.compile(scan, backend="aot_eager")
    for offsets in ([0, 17, 17, 40, 44], [0, 1, 30, 31, 44]):
        cu = torch.tensor(offsets)
        out, last = compiled(kw["u"], kw["initial_state"], cu)
        out_eager, last_eager = scan(kw["u"], kw["initial_state"], cu)
        assert torch.equal(out, out_eager) and torch.equal(last, last_eager)


def _moves_reference(src, src_offset, src_stride, dst_offset, dst_stride, rows, dst_numel, fill):
    flat = src.reshape(-1).cpu()
    dst = torch.full((dst_numel,), fill, dtype=src.dtype)
    for k in range(src_offset.numel()):
        so, ss, do, ds = (int(v[k]) for v in (src_offset, src_stride, dst_offset, dst_stride))
        for m in range(rows):
            s, d = so + m * ss, do + m * ds
            if 0 <= d < dst_numel:
                dst[d] = flat[s] if so >= 0 and 0 <= s < flat.numel() else 0
    return dst


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_move_columns(device, dtype):
    # the data movement op of the padded layout: every column's elements land where the offsets
    # and strides say, negative source offsets write zeros, and indices outside either tensor are
    # neither read nor written
    if device == "cuda" and dtype == torch.float64:
        dtype = torch.float16
    g = torch.Generator().manual_seed(0)
    src = torch.randn(3, 50, generator=g).to(dtype).to(device)
    dst_numel, rows = 120, 3
    k = torch.arange(40)
    src_offset = torch.randint(-1, 50, (40,), generator=g)
    src_offset[5] = 200                      # outside src: reads zeros
    src_stride = torch.full((40,), 50)
    dst_offset, dst_stride = k, torch.full((40,), 40)
    dst_offset = dst_offset.clone()
    dst_offset[7] = 500                      # outside dst: not written
    args = [t.to(device) for t in (src_offset, src_stride, dst_offset, dst_stride)]
    got = torch.ops.selective_scan._move_columns(src, *args, rows, dst_numel)
    want = _moves_reference(src, src_offset, src_stride, dst_offset, dst_stride, rows, dst_numel, float("nan"))
    written = ~torch.isnan(want.float())
    assert written.sum() == 3 * 39
    assert torch.equal(got.cpu()[written], want[written])
    # one value for every column, expanded (stride 0), is read as that value
    expanded = [args[0], torch.full((1,), 50, device=device).expand(40), args[2],
                torch.full((1,), 40, device=device).expand(40)]
    again = torch.ops.selective_scan._move_columns(src, *expanded, rows, dst_numel)
    assert torch.equal(again.cpu()[written], want[written])
    # opcheck with columns that write every element (the op leaves unwritten elements uninitialised)
    full = [t.to(device) for t in (src_offset.clamp(max=49), src_stride, k, torch.full((40,), 40))]
    torch.library.opcheck(torch.ops.selective_scan._move_columns.default, (src, *full, rows, rows * 40))


def test_move_columns_bad_arguments():
    src = torch.randn(10)
    idx = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(TypeError, match="_move_columns: src_stride: expected dtype Long, got Int"):
        torch.ops.selective_scan._move_columns(src, idx, idx.int(), idx, idx, 1, 4)
    with pytest.raises(ValueError, match=r"_move_columns: dst_offset: expected shape \[4\], got \[3\]"):
        torch.ops.selective_scan._move_columns(src, idx, idx, idx[:3], idx, 1, 4)
    with pytest.raises(ValueError, match="_move_columns: rows: expected >= 0, got -1"):
        torch.ops.selective_scan._move_columns(src, idx, idx, idx, idx, -1, 4)


def test_mamba_varlen_prefill_fills_one_cache_row_per_sequence():
    from selective_scan.nn import InferenceParams
    torch.manual_seed(0)
    lengths = [5, 1, 2, 9]
    cu = torch.tensor([0, 5, 6, 8, 17])
    block = Mamba(16, d_state=8, d_conv=4, layer_idx=0)
    x = torch.randn(1, sum(lengths), 16)
    params = InferenceParams(max_seqlen=32, max_batch_size=len(lengths))
    y = block(x, inference_params=params, cu_seqlens=cu)
    conv_state, ssm_state = params.key_value_memory_dict[0]
    assert conv_state.shape == (4, block.d_inner, 4) and ssm_state.shape == (4, block.d_inner, 8)
    for i in range(len(lengths)):
        alone = InferenceParams(max_seqlen=32, max_batch_size=1)
        y_alone = block(x[:, cu[i]:cu[i + 1]], inference_params=alone)
        conv_alone, ssm_alone = alone.key_value_memory_dict[0]
        torch.testing.assert_close(y[:, cu[i]:cu[i + 1]], y_alone, rtol=1e-5, atol=1e-6)
        # (the in_proj outputs of a packed row and of one sequence may differ by rounding)
        torch.testing.assert_close(conv_state[i], conv_alone[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ssm_state[i], ssm_alone[0], rtol=1e-5, atol=1e-6)
    # a sequence shorter than d_conv: zeros before its first input
    assert torch.count_nonzero(conv_state[1, :, :3]) == 0 and torch.count_nonzero(conv_state[1, :, 3]) > 0


@pytest.mark.parametrize("device", DEVICES)
def test_mamba_varlen_chunked_prefill(device):
    # each sequence prefilled in two packed calls (the second continuing the cache rows; some
    # sequences empty in one of them, some shorter than d_conv) equals one packed prefill
    from selective_scan.nn import InferenceParams
    torch.manual_seed(0)
    first, second = [5, 1, 0, 9, 2], [3, 6, 4, 0, 1]
    full = [a + b for a, b in zip(first, second)]

    def offsets(lengths):
        out = [0]
        for n in lengths:
            out.append(out[-1] + n)
        return out
    block = Mamba(16, d_state=8, d_conv=4, layer_idx=0, device=device)
    seqs = [torch.randn(n, 16, device=device) for n in full]
    packed = torch.cat(seqs)[None]
    one = InferenceParams(max_seqlen=32, max_batch_size=5)
    y_one = block(packed, inference_params=one, cu_seqlens=torch.tensor(offsets(full)))
    two = InferenceParams(max_seqlen=32, max_batch_size=5)
    y_a = block(torch.cat([t[:a] for t, a in zip(seqs, first)])[None], inference_params=two,
                cu_seqlens=torch.tensor(offsets(first)))
    two.seqlen_offset += max(first)
    y_b = block(torch.cat([t[a:] for t, a in zip(seqs, first)])[None], inference_params=two,
                cu_seqlens=torch.tensor(offsets(second)))
    fo, so, fu = offsets(first), offsets(second), offsets(full)
    for i in range(5):
        torch.testing.assert_close(y_a[:, fo[i]:fo[i + 1]], y_one[:, fu[i]:fu[i] + first[i]], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y_b[:, so[i]:so[i + 1]], y_one[:, fu[i] + first[i]:fu[i + 1]], rtol=1e-5,
                                   atol=1e-5)
    for a, b in zip(one.key_value_memory_dict[0], two.key_value_memory_dict[0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_causal_conv1d_varlen_continues_previous_inputs(device):
    # with each sequence's previous inputs, the packed conv equals the conv of the previous inputs
    # and the sequence together, and the conv state it leaves is the last inputs of that whole
    lengths, width = [3, 0, 1, 9, 2], 4
    cu = torch.tensor([0, 3, 3, 4, 13, 15])
    x = torch.randn(1, 5, 15, dtype=torch.float64, device=device)
    previous = torch.randn(5, 5, width, dtype=torch.float64, device=device)
    conv = torch.nn.Conv1d(5, 5, width, groups=5, dtype=torch.float64, device=device)
    y = causal_conv1d_varlen(x, conv.weight, conv.bias, cu, previous)
    state = last_inputs_varlen(x, cu, width, previous)
    for i, n in enumerate(lengths):
        whole = torch.cat([previous[i:i + 1, :, 1:], x[..., cu[i]:cu[i + 1]]], dim=-1)
        if n:
            torch.testing.assert_close(y[..., cu[i]:cu[i + 1]], conv(whole), rtol=1e-12, atol=1e-12)
        ext = torch.cat([previous[i:i + 1], x[..., cu[i]:cu[i + 1]]], dim=-1)
        torch.testing.assert_close(state[i], ext[0, :, -width:], rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_generate_prompts_of_different_lengths(device):
    torch.manual_seed(0)
    lm = MambaLMHeadModel(MambaConfig(d_model=32, n_layer=2, vocab_size=50), device=device)
    prompts = [torch.randint(0, 50, (n,), device=device) for n in (5, 1, 12, 3)]
    ids = lm.generate(prompts, 6, temperature=0)
    assert [t.numel() for t in ids] == [11, 7, 18, 9]
    reference = lm.generate(prompts, 6, temperature=0, use_cache=False)
    alone = [lm.generate(p[None], 6, temperature=0)[0] for p in prompts]
    for got, ref, one in zip(ids, reference, alone):
        assert torch.equal(got, ref) and torch.equal(got, one)
    # sampling: the cached and the re-run paths draw the same numbers
    g1, g2 = (torch.Generator(device=device).manual_seed(3) for _ in range(2))
    a, logits_a = lm.generate(prompts, 5, temperature=1.0, top_k=10, generator=g1, output_logits=True)
    b, logits_b = lm.generate(prompts, 5, temperature=1.0, top_k=10, generator=g2, output_logits=True,
                              use_cache=False)
    assert logits_a.shape == (4, 5, 50)
    torch.testing.assert_close(logits_a, logits_b, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match=r"input_ids\[1\]: expected a 1-D tensor of at least one token"):
        lm.generate([prompts[0], prompts[0][:0]], 2)


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_strided_inputs_bitwise(device):
    # packed inputs as the Mamba block makes them (steps-major memory seen through a transpose,
    # z a slice of a wider tensor) give bitwise the results and gradients of contiguous copies
    kw, cu = packed_case(LENGTHS["mixed"], torch.bfloat16, device, initial_state=True)

    def steps_major(t):  # same values, memory (1, total, channels)
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    strided = dict(kw, u=steps_major(kw["u"]), delta=steps_major(kw["delta"]), B=steps_major(kw["B"]),
                   C=steps_major(kw["C"]), z=torch.cat([kw["z"], kw["z"]], dim=2)[..., :kw["z"].shape[2]])
    assert not strided["u"].is_contiguous() and not strided["z"].is_contiguous()
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(kw["u"].shape, generator=g, dtype=torch.float64).to(device)
    dlast = torch.randn(7, 6, 5, generator=g, dtype=torch.float64).to(device)
    out, last, gr = grads(selective_scan, kw, cu, dout, dlast)
    out_s, last_s, gr_s = grads(selective_scan, strided, cu, dout, dlast)
    assert torch.equal(out, out_s) and torch.equal(last, last_s)
    for name in gr:
        assert torch.equal(gr[name], gr_s[name]), name


@pytest.mark.parametrize("device", DEVICES)
def test_move_columns_reads_strided_src_in_place(device):
    x = torch.randn(5, 7, device=device)
    view = x.t()  # (7, 5), strides (1, 7): element (i, j) at memory i + 7 j
    cols = torch.arange(5, device=device)
    got = torch.ops.selective_scan._move_columns(view, cols * 7, torch.ones(5, dtype=torch.int64, device=device),
                                                 cols, torch.full((5,), 5, device=device), 7, 35)
    assert torch.equal(got.view(7, 5), view)
