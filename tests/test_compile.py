"""torch.compile(fullgraph=True) of a function and of an nn.Module (a small Mamba-style mixer)
that call the op: forward and backward results equal eager ones; dynamic shapes too."""
import pytest
import torch
import torch.nn as nn

from selective_scan import selective_scan
from scan_utils import DEVICES, TENSOR_ARGS, make_inputs, upstream_grads

pytestmark = pytest.mark.slow


def scan_fn(u, delta, A, B, C, D, z, delta_bias, initial_state):
    return selective_scan(u, delta, A, B, C, D, z, delta_bias, True, True, initial_state=initial_state)


def scan_fn_plain(u, delta, A, B, C):
    return selective_scan(u, delta, A, B, C)


def _fwd_bwd(fn, kw, names, dout, dlast):
    leaves = [kw[k].detach().clone().requires_grad_(True) for k in names]
    res = fn(*leaves)
    if isinstance(res, tuple):
        out, last = res
        grads = torch.autograd.grad([out, last], leaves, [dout, dlast])
        return [out.detach(), last.detach()], list(grads)
    grads = torch.autograd.grad([res], leaves, [dout])
    return [res.detach()], list(grads)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("forms", [("var", "group"), ("const", "var")], ids=["var_group", "const_var"])
def test_compiled_function_equals_eager(device, forms):
    torch._dynamo.reset()
    kw = make_inputs(device=device, seqlen=100, B_form=forms[0], C_form=forms[1],
                     initial_state=True, seed=81)
    dout, dlast = upstream_grads(kw)
    compiled = torch.compile(scan_fn, fullgraph=True)
    eager = _fwd_bwd(scan_fn, kw, TENSOR_ARGS, dout, dlast)
    comp = _fwd_bwd(compiled, kw, TENSOR_ARGS, dout, dlast)
    for a, b in zip(eager[0] + eager[1], comp[0] + comp[1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_plain_call_and_dynamic_shapes(device):
    torch._dynamo.reset()
    compiled = torch.compile(scan_fn_plain, fullgraph=True, dynamic=True)
    names = ("u", "delta", "A", "B", "C")
    for seqlen in (50, 130, 7):
        kw = make_inputs(device=device, seqlen=seqlen, D=False, z=False, delta_bias=False,
                         delta_softplus=False, seed=82 + seqlen)
        dout, _ = upstream_grads(kw)
        eager = _fwd_bwd(scan_fn_plain, kw, names, dout, None)
        comp = _fwd_bwd(compiled, kw, names, dout, None)
        for a, b in zip(eager[0] + eager[1], comp[0] + comp[1]):
            assert torch.equal(a, b)


class TinyMixer(nn.Module):
    """A small Mamba-style mixer: input projection, data-dependent delta/B/C, the scan gated by z,
    output projection."""

    def __init__(self, d_model=16, d_inner=32, dstate=8, dt_rank=4):
        super().__init__()
        self.dstate, self.dt_rank = dstate, dt_rank
        self.in_proj = nn.Linear(d_model, 2 * d_inner)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * dstate, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, dstate + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model)

    def forward(self, x, state=None):
        xz = self.in_proj(x).transpose(1, 2)  # (batch, 2 * d_inner, seqlen)
        u, z = xz.chunk(2, dim=1)
        dbc = self.x_proj(u.transpose(1, 2))  # (batch, seqlen, dt_rank + 2 * dstate)
        dt, B, C = torch.split(dbc, [self.dt_rank, self.dstate, self.dstate], dim=-1)
        delta = (dt @ self.dt_proj.weight.t()).transpose(1, 2)
        y, last = selective_scan(u, delta, -torch.exp(self.A_log), B.transpose(1, 2),
                                 C.transpose(1, 2), self.D, z, self.dt_proj.bias,
                                 delta_softplus=True, return_last_state=True, initial_state=state)
        return self.out_proj(y.transpose(1, 2)), last


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_module_equals_eager(device):
    torch._dynamo.reset()
    torch.manual_seed(83)
    model = TinyMixer().to(device)
    x = torch.randn(2, 90, 16, device=device)
    state = torch.randn(2, 32, 8, device=device)
    g = torch.Generator().manual_seed(84)
    dy = torch.randn(2, 90, 16, generator=g).to(device)
    dlast = torch.randn(2, 32, 8, generator=g).to(device)

    def run(m):
        m.zero_grad(set_to_none=True)
        xs = x.clone().requires_grad_(True)
        st = state.clone().requires_grad_(True)
        y, last = m(xs, st)
        ((y * dy).sum() + (last * dlast).sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        return y.detach(), last.detach(), xs.grad, st.grad, grads

    eager = run(model)
    compiled = run(torch.compile(model, fullgraph=True))
    for a, b in zip(eager[:4], compiled[:4]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for n in eager[4]:
        torch.testing.assert_close(compiled[4][n], eager[4][n], rtol=1e-5, atol=1e-5, msg=n)
    assert all(torch.count_nonzero(v) > 0 for v in eager[4].values())
