"""The registered ops torch.ops.selective_scan.fwd / .bwd: torch.library.opcheck (schema, fake
implementation, autograd registration, AOT dispatch) over several argument sets, and the fake
implementations' output metadata against the real outputs."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import selective_scan
from scan_utils import CUDA, DEVICES, make_inputs, upstream_grads

ARGSETS = {
    "all_options": dict(B_form="var", C_form="group", initial_state=True),
    "no_options": dict(D=False, z=False, delta_bias=False, delta_softplus=False),
    "const_bc": dict(B_form="const", C_form="const", initial_state=True),
    "bf16_fp32_B": dict(dtype=torch.bfloat16, B_form="group", B_dtype=torch.float32),
    "fp16": dict(dtype=torch.float16, C_form="const"),
    "fp64": dict(dtype=torch.float64, initial_state=True),
    "seqlen_1": dict(seqlen=1, initial_state=True),
}


def _inputs(device, name):
    cfg = dict(batch=2, dim=6, seqlen=70, dstate=4, B_groups=3, C_groups=2, seed=71)
    cfg.update(ARGSETS[name])
    return make_inputs(device=device, **cfg)


def _fwd_args(kw):
    return (kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw["D"], kw["z"], kw["delta_bias"],
            kw["initial_state"], kw["delta_softplus"])


def _bwd_args(kw, with_dlast=True):
    _, _, ckpt = torch.ops.selective_scan.fwd(*_fwd_args(kw))
    dout, dlast = upstream_grads(kw)
    return (dout, dlast if with_dlast else None, kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"],
            kw["D"], kw["z"], kw["delta_bias"], kw["initial_state"], ckpt, kw["delta_softplus"])


def _argsets(device):
    names = list(ARGSETS)
    if device == "cuda":
        names.remove("fp64")
    return names


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_fwd(device):
    for name in _argsets(device):
        kw = _inputs(device, name)
        torch.library.opcheck(torch.ops.selective_scan.fwd.default, _fwd_args(kw))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_bwd(device):
    for name in _argsets(device):
        kw = _inputs(device, name)
        torch.library.opcheck(torch.ops.selective_scan.bwd.default, _bwd_args(kw))
        torch.library.opcheck(torch.ops.selective_scan.bwd.default, _bwd_args(kw, with_dlast=False))


def _meta(t):
    return None if t is None else (tuple(t.shape), t.dtype, t.device.type)


FAKE_CASES = [pytest.param("cpu", name, id=f"cpu-{name}") for name in ARGSETS] + [
    pytest.param("cuda", name, id=f"cuda-{name}", marks=CUDA) for name in ARGSETS if name != "fp64"]


@pytest.mark.parametrize("device,name", FAKE_CASES)
def test_fake_matches_real(device, name):
    kw = _inputs(device, name)
    real_f = torch.ops.selective_scan.fwd(*_fwd_args(kw))
    real_b = torch.ops.selective_scan.bwd(*_bwd_args(kw))
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fkw = {k: (mode.from_tensor(v) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        fake_f = torch.ops.selective_scan.fwd(*_fwd_args(fkw))
        fake_b = torch.ops.selective_scan.bwd(*_bwd_args(fkw))
        meta_f = [_meta(t) for t in fake_f]
        meta_b = [_meta(t) for t in fake_b]
    assert meta_f == [_meta(t) for t in real_f]
    assert meta_b == [_meta(t) for t in real_b]


def test_checkpoint_layout():
    """The forward's saved states: (batch, dim, ceil(seqlen / chunk), dstate) in the compute dtype;
    the first one is the initial state."""
    chunk = selective_scan.CHECKPOINT_CHUNK
    assert chunk >= 1
    kw = make_inputs(batch=2, dim=3, seqlen=2 * chunk + 5, dstate=4, initial_state=True, seed=72)
    out, last, ckpt = torch.ops.selective_scan.fwd(*_fwd_args(kw))
    assert ckpt.shape == (2, 3, 3, 4) and ckpt.dtype == torch.float32
    assert torch.equal(ckpt[:, :, 0], kw["initial_state"])
    assert out.shape == kw["u"].shape and last.shape == (2, 3, 4)
