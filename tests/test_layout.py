"""Memory layouts and edge sizes: non-contiguous, strided, transposed, expanded (stride 0) and
offset inputs give bitwise what their contiguous copies give (outputs and gradients); seqlen 0,
batch 0 and dim 0 give empty results with the documented last state and gradients; and the
package imports on its own."""
import subprocess
import sys

import pytest
import torch

import selective_scan
from scan_utils import DEVICES, TENSOR_ARGS, grads_of, make_inputs, run_op, upstream_grads


def _filled_like(x, shape):
    """A buffer of `shape` filled with NaN (so that reading a wrong element shows in the result)."""
    return torch.full(shape, float("nan"), dtype=x.dtype, device=x.device)


def noncontig(x: torch.Tensor, kind: str) -> torch.Tensor:
    """A non-contiguous tensor with x's shape: the values of x, or (expanded kinds) values
    repeated along a zero-stride dimension."""
    outer = 1 if x.dim() >= 3 else 0
    if kind == "strided_outer":  # every other row of a buffer twice as large
        shape = list(x.shape)
        shape[outer] *= 2
        buf = _filled_like(x, shape)
        idx = [slice(None)] * x.dim()
        idx[outer] = slice(None, None, 2)
        buf[tuple(idx)] = x
        return buf[tuple(idx)]
    if kind == "strided_last":  # step 2 along the last (seqlen or dstate) dimension
        buf = _filled_like(x, list(x.shape[:-1]) + [2 * x.shape[-1]])
        buf[..., ::2] = x
        return buf[..., ::2]
    if kind == "transposed":  # last two dims stored swapped
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "offset":  # rows padded and the data one element off the allocation's start
        buf = _filled_like(x, list(x.shape[:-1]) + [x.shape[-1] + 3])
        view = buf[..., 1:x.shape[-1] + 1]
        view.copy_(x)
        return view
    if kind == "expanded_outer":  # stride 0 along the outer dimension
        return x.narrow(outer, 0, 1).expand(x.shape)
    if kind == "expanded_last":  # stride 0 along the last dimension
        return x.narrow(-1, 0, 1).expand(x.shape)
    if kind == "permuted_batch":  # (batch, dim, seqlen) stored as (dim, batch, seqlen)
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    raise ValueError(kind)


KINDS_3D = ["strided_outer", "strided_last", "transposed", "offset", "expanded_outer",
            "expanded_last", "permuted_batch"]
KINDS_2D = ["strided_outer", "strided_last", "transposed", "offset", "expanded_outer", "expanded_last"]
KINDS_1D = ["strided_outer", "offset", "expanded_outer"]

TARGETS = [
    ("u", "var"), ("delta", "var"), ("z", "var"),
    ("B", "const"), ("B", "var"), ("B", "group"), ("C", "const"), ("C", "var"), ("C", "group"),
    ("A", "var"), ("D", "var"), ("delta_bias", "var"), ("initial_state", "var"),
]


def _cases():
    for arg, form in TARGETS:
        if arg in ("D", "delta_bias"):
            kinds = KINDS_1D
        elif arg == "A" or (arg in ("B", "C") and form == "const"):
            kinds = KINDS_2D
        else:
            kinds = KINDS_3D
        for kind in kinds:
            yield pytest.param(arg, form, kind, id=f"{arg}-{form}-{kind}")


def _outputs_and_grads(kw, dout, dlast):
    return grads_of(lambda k: run_op(k, True), kw, dout, dlast)


def _assert_bitwise(a, b):
    out_a, last_a, g_a = a
    out_b, last_b, g_b = b
    assert torch.equal(out_a, out_b), "out differs"
    assert torch.equal(last_a, last_b), "last_state differs"
    assert set(g_a) == set(g_b)
    for name in g_a:
        assert torch.equal(g_a[name], g_b[name]), f"d{name} differs"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arg,form,kind", list(_cases()))
def test_noncontiguous_input_bitwise(device, dtype, arg, form, kind):
    kw = make_inputs(dtype=dtype, device=device, batch=3, dim=6, seqlen=67, dstate=5,
                     B_form=form if arg == "B" else "var", C_form=form if arg == "C" else "group",
                     B_groups=3, C_groups=3, initial_state=True, seed=41)
    x = noncontig(kw[arg], kind)
    assert x.shape == kw[arg].shape
    assert not x.is_contiguous() or x.storage_offset() != 0
    nc = dict(kw, **{arg: x})
    c = dict(kw, **{arg: x.contiguous()})
    dout, dlast = upstream_grads(kw)
    res_nc = _outputs_and_grads(nc, dout, dlast)
    res_c = _outputs_and_grads(c, dout, dlast)
    assert torch.isfinite(res_c[0]).all()
    _assert_bitwise(res_nc, res_c)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["strided_outer", "strided_last", "transposed", "offset"])
def test_all_inputs_noncontiguous_bitwise(device, kind):
    kw = make_inputs(device=device, batch=2, dim=8, seqlen=130, dstate=16, B_form="group",
                     C_form="var", B_groups=4, initial_state=True, seed=42)
    nc = dict(kw)
    for name in TENSOR_ARGS:
        k = kind if (kw[name].dim() >= 2 or kind in KINDS_1D) else "strided_outer"
        nc[name] = noncontig(kw[name], k)
        assert not nc[name].is_contiguous() or nc[name].storage_offset() != 0
    c = {k: (v.contiguous() if isinstance(v, torch.Tensor) else v) for k, v in nc.items()}
    dout, dlast = upstream_grads(kw)
    _assert_bitwise(_outputs_and_grads(nc, dout, dlast), _outputs_and_grads(c, dout, dlast))


@pytest.mark.parametrize("device", DEVICES)
def test_noncontiguous_upstream_gradients_bitwise(device):
    kw = make_inputs(device=device, seqlen=70, initial_state=True, seed=43)
    dout, dlast = upstream_grads(kw)
    a = _outputs_and_grads(kw, noncontig(dout, "transposed"), noncontig(dlast, "strided_last"))
    b = _outputs_and_grads(kw, dout, dlast)
    _assert_bitwise(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_initial_state", [False, True])
@pytest.mark.parametrize("B_form", ["const", "var", "group"])
def test_seqlen_zero(device, with_initial_state, B_form):
    kw = make_inputs(device=device, batch=2, dim=4, seqlen=0, dstate=3, B_form=B_form,
                     C_form="group", initial_state=with_initial_state, seed=44)
    dout, dlast = upstream_grads(kw)
    out, last, g = grads_of(lambda k: run_op(k, True), kw, dout, dlast)
    assert out.shape == (2, 4, 0) and out.dtype == kw["u"].dtype
    assert last.shape == (2, 4, 3) and last.dtype == torch.float32
    if with_initial_state:
        assert torch.equal(last, kw["initial_state"])
        assert torch.equal(g["initial_state"], dlast)
    else:
        assert torch.count_nonzero(last) == 0
    for name in ("A", "B", "C", "D", "delta_bias"):
        assert g[name].shape == kw[name].shape
        assert torch.count_nonzero(g[name]) == 0, name
    for name in ("u", "delta", "z"):
        assert g[name].shape == (2, 4, 0)
    plain = selective_scan.selective_scan(kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"])
    assert plain.shape == (2, 4, 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch,dim", [(0, 4), (2, 0), (0, 0)])
def test_empty_batch_or_dim(device, batch, dim):
    kw = make_inputs(device=device, batch=batch, dim=dim, seqlen=9, dstate=3, B_form="var",
                     C_form="const", initial_state=True, seed=45)
    dout, dlast = upstream_grads(kw)
    out, last, g = grads_of(lambda k: run_op(k, True), kw, dout, dlast)
    assert out.shape == (batch, dim, 9)
    assert last.shape == (batch, dim, 3)
    for name, grad in g.items():
        assert grad.shape == kw[name].shape, name
    for name in ("A", "B", "C", "D", "delta_bias"):
        assert torch.count_nonzero(g[name]) == 0, name


def test_import_without_importing_torch_first():
    """`import selective_scan` works in a fresh interpreter that has not imported torch."""
    code = ("import selective_scan, sys; "
            "assert hasattr(selective_scan, 'selective_scan_fn'); "
            "print(selective_scan.build_info()['version'])")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd="/", env=_env_with_package_path())
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == selective_scan.__version__


def _env_with_package_path():
    import os

    env = dict(os.environ)
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(selective_scan.__file__)))
    env["PYTHONPATH"] = pkg_parent + os.pathsep + env.get("PYTHONPATH", "")
    return env
