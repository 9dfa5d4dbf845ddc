"""torch.autograd.gradcheck in float64 on CPU with every option on (z, D, delta_bias, softplus,
initial_state, last_state as a second output), for each form of B and of C, across a checkpoint
chunk boundary; and with every option off."""
import pytest
import torch

import selective_scan
from scan_utils import TENSOR_ARGS, make_inputs

# Each form appears once for B and once for C.
FORMS = [("const", "group"), ("var", "const"), ("group", "var")]


def _gradcheck(kw):
    names = [k for k in TENSOR_ARGS if kw[k] is not None]
    leaves = [kw[k].detach().clone().requires_grad_(True) for k in names]

    def fn(*tensors):
        args = dict(kw, **dict(zip(names, tensors)))
        return selective_scan.selective_scan(
            args["u"], args["delta"], args["A"], args["B"], args["C"], args["D"], args["z"],
            args["delta_bias"], args["delta_softplus"], True, initial_state=args["initial_state"])

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-8, rtol=1e-6,
                                    check_undefined_grad=True)


@pytest.mark.slow
@pytest.mark.parametrize("B_form,C_form", FORMS)
def test_gradcheck_all_options(B_form, C_form):
    kw = make_inputs(dtype=torch.float64, batch=2, dim=4, seqlen=67, dstate=3, B_form=B_form,
                     C_form=C_form, B_groups=2, C_groups=2, D=True, z=True, delta_bias=True,
                     delta_softplus=True, initial_state=True, seed=61)
    _gradcheck(kw)


@pytest.mark.parametrize("B_form,C_form", FORMS)
def test_gradcheck_short(B_form, C_form):
    kw = make_inputs(dtype=torch.float64, batch=2, dim=4, seqlen=9, dstate=2, B_form=B_form,
                     C_form=C_form, B_groups=4, C_groups=2, initial_state=True, seed=62)
    _gradcheck(kw)


def test_gradcheck_no_options():
    kw = make_inputs(dtype=torch.float64, batch=1, dim=3, seqlen=13, dstate=2, D=False, z=False,
                     delta_bias=False, delta_softplus=False, initial_state=False, seed=63)
    _gradcheck(kw)
