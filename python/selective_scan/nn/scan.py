"""`SelectiveScan`, the selective scan op as an nn.Module, and the causal-conv1d state step used
in decoding (shift the new column into the conv state, dot with the depthwise weight, bias, silu)."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..functional import selective_scan


class SelectiveScan(nn.Module):
    """The scan as a module: holds `delta_softplus` and calls the public op.

    forward(u, delta, A, B, C, D=None, z=None, delta_bias=None, initial_state=None,
    return_last_state=False) takes the op's shapes: u, delta, z (batch, dim, seqlen); A (dim, dstate)
    fp32; B, C (dim, dstate), (batch, dstate, seqlen) or (batch, n_groups, dstate, seqlen); D and
    delta_bias (dim,) fp32. `scan_fn` swaps the implementation (default: the native op); the
    references in selective_scan.reference have the same signature.
    """

    def __init__(self, delta_softplus: bool = True, scan_fn: Optional[Callable] = None):
        super().__init__()
        self.delta_softplus = delta_softplus
        self.scan_fn = scan_fn

    def forward(self, u, delta, A, B, C, D=None, z=None, delta_bias=None, initial_state=None,
                return_last_state: bool = False):
        fn = self.scan_fn if self.scan_fn is not None else selective_scan
        return fn(u, delta, A, B, C, D, z, delta_bias, self.delta_softplus, return_last_state,
                  initial_state=initial_state)

    def extra_repr(self) -> str:
        return f"delta_softplus={self.delta_softplus}"


def causal_conv1d_step(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                       bias: Optional[torch.Tensor] = None, activation: bool = True) -> torch.Tensor:
    """One step of a depthwise causal conv1d from its state.

    x (batch, dim) is the new input column; conv_state (batch, dim, width) holds the last `width`
    inputs, oldest first, and is updated in place (shifted left, x appended). weight is
    (dim, width) or the Conv1d weight (dim, 1, width). Returns silu(sum(state * weight) + bias)
    (no silu with activation=False), computed in fp32 and returned in x's dtype.
    """
    if weight.dim() == 3:
        weight = weight[:, 0]
    conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
    conv_state[:, :, -1] = x.to(conv_state.dtype)
    y = (conv_state.float() * weight.float()).sum(-1)
    if bias is not None:
        y = y + bias.float()
    if activation:
        y = F.silu(y)
    return y.to(x.dtype)


__all__ = ["SelectiveScan", "causal_conv1d_step"]
