"""The decode-step op: `selective_state_update` (one recurrent step of the selective SSM with the
fp32 state updated in place, torch.ops.selective_scan.state_update), its fake implementation for
tracing, and `selective_state_update_ref`, the same step in plain PyTorch."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import _C  # noqa: F401  (loads the library that registers torch.ops.selective_scan)


@torch.library.register_fake("selective_scan::state_update")
def _state_update_fake(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    return x.new_empty((state.shape[0], state.shape[1]))


def selective_state_update(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                           B: torch.Tensor, C: torch.Tensor, D: Optional[torch.Tensor] = None,
                           z: Optional[torch.Tensor] = None, dt_bias: Optional[torch.Tensor] = None,
                           dt_softplus: bool = False) -> torch.Tensor:
    """One step of the selective SSM; `state` is updated in place.

    state (batch, dim, dstate) fp32; x, dt, z (batch, dim) in fp32, fp16 or bf16 (one dtype);
    A (dim, dstate) fp32; B, C (batch, dstate) or (batch, n_groups, dstate) in x's dtype or fp32;
    D, dt_bias (dim,) fp32. With dt' = dt + dt_bias (then softplus when dt_softplus):

        state = exp(dt' A) * state + dt' * B * x
        out   = sum_n C * state + D * x,  times silu(z) when z is given

    Returns out (batch, dim) in x's dtype. Not differentiable (an inference op).
    """
    return torch.ops.selective_scan.state_update(state, x, dt, A, B, C, D, z, dt_bias, bool(dt_softplus))


def selective_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                               *, compute_dtype=torch.float32):
    """The same step in plain PyTorch, computed in `compute_dtype`; updates `state` in place
    (cast back to its dtype) and returns out in x's dtype."""
    ct = compute_dtype
    batch, dim, dstate = state.shape
    dt = dt.to(ct)
    if dt_bias is not None:
        dt = dt + dt_bias.to(ct)
    if dt_softplus:
        dt = F.softplus(dt)
    if B.dim() == 2:
        B, C = B[:, None], C[:, None]
    groups = B.shape[1]
    Bx = B.to(ct).repeat_interleave(dim // groups, dim=1)  # (batch, dim, dstate)
    Cx = C.to(ct).repeat_interleave(dim // groups, dim=1)
    xc = x.to(ct)
    s = torch.exp(dt[..., None] * A.to(ct)) * state.to(ct) + (dt * xc)[..., None] * Bx
    state.copy_(s)
    y = (s * Cx).sum(-1)
    if D is not None:
        y = y + D.to(ct) * xc
    if z is not None:
        y = y * F.silu(z.to(ct))
    return y.to(x.dtype)


__all__ = ["selective_state_update", "selective_state_update_ref"]
