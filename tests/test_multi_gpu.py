"""Inputs on a second GPU while the first is the current device (marker `cuda`; needs two GPUs, as a
model split over devices has): every op runs on its inputs' device, after its kernels ran on the
first GPU (kernel and device attributes are kept per device), and gives there the bits it gives on
the first GPU, checked against the float64 references as well."""
import pytest
import torch

from scan_utils import check_backward, check_forward, grads_of, make_inputs, run_op, to_device, upstream_grads
from selective_scan import selective_scan, selective_state_update, selective_state_update_ref
from selective_scan.nn import MambaConfig, MambaLMHeadModel

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")]


def _assert_same_bits(first, second):
    """Tensors, or tuples / lists / dicts of them, compared on the CPU."""
    if isinstance(first, torch.Tensor):
        assert torch.equal(first.cpu(), second.cpu())
    elif isinstance(first, dict):
        assert first.keys() == second.keys()
        for k in first:
            _assert_same_bits(first[k], second[k])
    else:
        assert len(first) == len(second)
        for a, b in zip(first, second):
            _assert_same_bits(a, b)


@pytest.mark.parametrize("case", ["bf16", "fp32-split", "fp32-slices"])
def test_scan_on_second_gpu(case):
    """Forward and backward (a backward block needs more than 48 KB of shared memory, which each
    device grants per kernel) in one pass, with the sequence split, and in state slices."""
    shape = {"bf16": dict(dtype=torch.bfloat16, batch=2, dim=64, seqlen=300, dstate=16, initial_state=True),
             "fp32-split": dict(batch=1, dim=32, seqlen=1000, dstate=16),
             "fp32-slices": dict(batch=2, dim=16, seqlen=200, dstate=128, B_form="group", C_form="var")}[case]
    kw0 = make_inputs(device="cuda:0", seed=130, **shape)
    kw1 = to_device(kw0, "cuda:1")
    dout, dlast = upstream_grads(kw0)
    with torch.cuda.device(0):
        first = grads_of(lambda k: run_op(k, True), kw0, dout, dlast)
        second = grads_of(lambda k: run_op(k, True), kw1, dout.to("cuda:1"), dlast.to("cuda:1"))
        assert second[0].device == torch.device("cuda:1") and second[2]["u"].device == torch.device("cuda:1")
        _assert_same_bits(first, second)
        dtype = shape.get("dtype", torch.float32)
        check_forward(kw1, "cuda", dtype)
        check_backward(kw1, "cuda", dtype)


def test_varlen_on_second_gpu():
    """Packed sequences (cu_seqlens): the column moves run on the inputs' device too."""
    kw0 = make_inputs(device="cuda:0", batch=1, dim=24, seqlen=150, dstate=16, seed=131)
    cu = torch.tensor([0, 40, 41, 150], dtype=torch.int32)
    outs = []
    for device in ("cuda:0", "cuda:1"):
        kw = to_device(kw0, device)
        with torch.cuda.device(0):
            out, last = selective_scan(kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw["D"], kw["z"],
                                       kw["delta_bias"], True, True, cu_seqlens=cu.to(device))
        assert out.device == torch.device(device)
        outs.append((out, last))
    _assert_same_bits(outs[0], outs[1])


def test_state_update_on_second_gpu():
    """The decode step updates the state in place on its device."""
    g = torch.Generator().manual_seed(132)
    batch, dim, dstate = 3, 64, 16
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g) * scale
    inp = dict(state=r(batch, dim, dstate), x=r(batch, dim).bfloat16(), dt=r(batch, dim, scale=0.5).bfloat16(),
               A=-torch.rand(dim, dstate, generator=g) * 2 - 0.1, B=r(batch, dstate).bfloat16(),
               C=r(batch, dstate).bfloat16(), D=r(dim), z=r(batch, dim).bfloat16(), dt_bias=r(dim, scale=0.5))
    results = []
    for device in ("cuda:0", "cuda:1"):
        t = {k: v.to(device, copy=True) for k, v in inp.items()}
        with torch.cuda.device(0):
            out = selective_state_update(t["state"], t["x"], t["dt"], t["A"], t["B"], t["C"], D=t["D"], z=t["z"],
                                         dt_bias=t["dt_bias"], dt_softplus=True)
        assert out.device == torch.device(device)
        results.append((out, t["state"]))
    _assert_same_bits(results[0], results[1])
    ref_state = inp["state"].double()
    ref = selective_state_update_ref(ref_state, inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], D=inp["D"],
                                     z=inp["z"], dt_bias=inp["dt_bias"], dt_softplus=True,
                                     compute_dtype=torch.float64)
    torch.testing.assert_close(results[1][0].cpu().double(), ref.double(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(results[1][1].cpu().double(), ref_state, rtol=2e-5, atol=2e-5)


def test_generation_on_second_gpu():
    """The language model on the second GPU generates there, eagerly and with the decode step as a
    CUDA graph (captured on the model's GPU), the same tokens as on the first."""
    torch.manual_seed(133)
    model = MambaLMHeadModel(MambaConfig(d_model=32, n_layer=2, vocab_size=61, ssm_cfg=dict(d_state=8))).eval()
    ids = torch.randint(0, 61, (2, 6), generator=torch.Generator().manual_seed(133))
    with torch.cuda.device(0):
        first = model.to("cuda:0").generate(ids.to("cuda:0"), 10, temperature=0)
        model.to("cuda:1")
        eager = model.generate(ids.to("cuda:1"), 10, temperature=0)
        graph = model.generate(ids.to("cuda:1"), 10, temperature=0, cuda_graph=True)
    assert eager.device == graph.device == torch.device("cuda:1")
    _assert_same_bits(first, eager)
    _assert_same_bits(first, graph)
