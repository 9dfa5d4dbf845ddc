"""Backward accuracy: gradients of every tensor input (initial_state included) for random upstream
gradients of out, of last_state, and of both, against autograd through the float64 reference;
one axis at a time plus seeded random mixed cases."""
import pytest
import torch

from scan_utils import (BC_FORMS, DEVICE_DTYPES, DEVICE_FP32, DEVICES, OPTION_SETS, check_backward,
                        grads_of, make_inputs, random_case, run_op, upstream_grads)

UPSTREAM = {"out": (True, False), "last_state": (False, True), "both": (True, True)}
FP32_FP64 = DEVICE_FP32 + [pytest.param("cpu", torch.float64, id="cpu-fp64")]


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("upstream", list(UPSTREAM))
def test_dtypes_and_upstream(device, dtype, upstream):
    use_out, use_last = UPSTREAM[upstream]
    kw = make_inputs(dtype=dtype, device=device, seqlen=100, initial_state=True, seed=21)
    check_backward(kw, device, dtype, use_out=use_out, use_last=use_last)


@pytest.mark.parametrize("device,dtype", DEVICE_FP32)
@pytest.mark.parametrize("C_form", BC_FORMS)
@pytest.mark.parametrize("B_form", BC_FORMS)
def test_bc_forms(device, dtype, B_form, C_form):
    kw = make_inputs(device=device, seqlen=70, B_form=B_form, C_form=C_form, initial_state=True,
                     seed=22)
    check_backward(kw, device, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B_dtype,C_dtype", [(torch.float32, torch.bfloat16),
                                             (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("form", ["var", "group"])
def test_bc_dtype_fp32_with_bf16_inputs(device, B_dtype, C_dtype, form):
    kw = make_inputs(dtype=torch.bfloat16, device=device, seqlen=70, B_form=form, C_form=form,
                     B_dtype=B_dtype, C_dtype=C_dtype, seed=23)
    g = check_backward(kw, device, torch.bfloat16)
    assert g["B"].dtype == B_dtype and g["C"].dtype == C_dtype


@pytest.mark.parametrize("device,dtype", DEVICE_FP32)
@pytest.mark.parametrize("groups", [1, 2, 4, 12])
def test_groups(device, dtype, groups):
    kw = make_inputs(device=device, dim=12, seqlen=50, B_form="group", C_form="group",
                     B_groups=groups, C_groups=12 // groups, seed=24 + groups)
    check_backward(kw, device, dtype)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("options", list(OPTION_SETS), ids=list(OPTION_SETS))
def test_options(device, dtype, options):
    kw = make_inputs(dtype=dtype, device=device, seqlen=80, seed=25, **OPTION_SETS[options])
    check_backward(kw, device, dtype)


SEQLENS = [1, 2, 7, 63, 64, 65, 129, 1000, pytest.param(2049, marks=pytest.mark.slow),
           pytest.param(4100, marks=pytest.mark.slow)]


@pytest.mark.parametrize("device,dtype", FP32_FP64)
@pytest.mark.parametrize("seqlen", SEQLENS)
def test_seqlen(device, dtype, seqlen):
    kw = make_inputs(dtype=dtype, device=device, batch=2, dim=3, dstate=4, seqlen=seqlen,
                     B_form="const", C_form="var", initial_state=True, seed=26 + seqlen)
    check_backward(kw, device, dtype)


@pytest.mark.parametrize("device,dtype", FP32_FP64)
@pytest.mark.parametrize("dstate", [1, 8, 16, 32, 64, 100, 256])
def test_dstate(device, dtype, dstate):
    kw = make_inputs(dtype=dtype, device=device, dim=4, seqlen=130, dstate=dstate,
                     initial_state=True, seed=27 + dstate)
    check_backward(kw, device, dtype)


@pytest.mark.parametrize("device,dtype", DEVICE_FP32)
@pytest.mark.parametrize("batch,dim", [(1, 1), (3, 5), (5, 37)])
def test_batch_dim(device, dtype, batch, dim):
    kw = make_inputs(device=device, batch=batch, dim=dim, seqlen=45, B_form="const",
                     C_form="group", C_groups=dim, initial_state=True, seed=28 + dim)
    check_backward(kw, device, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(200, 212))
def test_random_mixed(device, seed):
    cfg = random_case(seed, device)
    kw = make_inputs(**cfg)
    use_out, use_last = list(UPSTREAM.values())[seed % 3]
    check_backward(kw, device, cfg["dtype"], use_out=use_out, use_last=use_last, seed=seed)


@pytest.mark.parametrize("device", DEVICES)
def test_initial_state_gradient_is_chained_last_state_gradient(device):
    """d(initial_state) of the second half equals d(last_state) of the first half: splitting a
    scan at t with last_state -> initial_state gives the gradients of the unsplit scan."""
    kw = make_inputs(device=device, seqlen=140, B_form="var", C_form="const", initial_state=True,
                     seed=29)
    dout, dlast = upstream_grads(kw)
    _, _, g_full = grads_of(lambda k: run_op(k, True), kw, dout, dlast)

    leaves = {k: (v.detach().clone().requires_grad_(True) if isinstance(v, torch.Tensor) else v)
              for k, v in kw.items()}
    t = 77
    first = dict(leaves, u=leaves["u"][..., :t], delta=leaves["delta"][..., :t],
                 z=leaves["z"][..., :t], B=leaves["B"][..., :t])
    out1, mid = run_op(first, True)
    second = dict(leaves, u=leaves["u"][..., t:], delta=leaves["delta"][..., t:],
                  z=leaves["z"][..., t:], B=leaves["B"][..., t:], initial_state=mid)
    out2, last = run_op(second, True)
    loss = (torch.cat([out1, out2], -1) * dout).sum() + (last * dlast).sum()
    loss.backward()
    for name, g in g_full.items():
        got = leaves[name].grad
        err = torch.linalg.vector_norm(got.double() - g.double()) / torch.linalg.vector_norm(g.double())
        assert err <= 1e-5, f"{name}: {err:.2e}"
