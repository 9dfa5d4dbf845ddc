"""`SelectiveScan`, the selective scan op as an nn.Module; the causal-conv1d state step used in
decoding (shift the new column into the conv state, dot with the depthwise weight, bias, silu) and
the causal conv1d of packed variable-length sequences."""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..functional import selective_scan
from ..varlen import check_cu_seqlens


class SelectiveScan(nn.Module):
    """The scan as a module: holds `delta_softplus` and calls the public op.

    forward(u, delta, A, B, C, D=None, z=None, delta_bias=None, initial_state=None,
    return_last_state=False, cu_seqlens=None) takes the op's shapes: u, delta, z (batch, dim, seqlen); A (dim, dstate)
    fp32; B, C (dim, dstate), (batch, dstate, seqlen) or (batch, n_groups, dstate, seqlen); D and
    delta_bias (dim,) fp32; cu_seqlens for sequences packed along seqlen (see selective_scan).
    `scan_fn` swaps the implementation (default: the native op); the references in
    selective_scan.reference have the same signature.
    """

    def __init__(self, delta_softplus: bool = True, scan_fn: Optional[Callable] = None):
        super().__init__()
        self.delta_softplus = delta_softplus
        self.scan_fn = scan_fn

    def forward(self, u, delta, A, B, C, D=None, z=None, delta_bias=None, initial_state=None,
                return_last_state: bool = False, cu_seqlens=None):
        fn = self.scan_fn if self.scan_fn is not None else selective_scan
        if cu_seqlens is None:  # (scan_fn need not know cu_seqlens)
            return fn(u, delta, A, B, C, D, z, delta_bias, self.delta_softplus, return_last_state,
                      initial_state=initial_state)
        return fn(u, delta, A, B, C, D, z, delta_bias, self.delta_softplus, return_last_state,
                  initial_state=initial_state, cu_seqlens=cu_seqlens)

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


@functools.lru_cache(maxsize=4)
def _steps_back(offsets, width: int, device: torch.device):
    """Per shift s = 1 .. width - 1, for the packed steps of offsets: which have the step s back in
    their own sequence ((total,) bool), and for the others where it is among the sequence's previous
    inputs (the sequence of each step, and the column width + position - s, clamped into range for
    the steps that do not need it). Built once per offsets, on the device (a model's layers share
    them; no host-to-device copy per call)."""
    starts = torch.tensor(offsets[:-1], dtype=torch.int64)
    lengths = torch.tensor([offsets[i + 1] - offsets[i] for i in range(len(offsets) - 1)], dtype=torch.int64)
    seq = torch.arange(len(lengths), dtype=torch.int64).repeat_interleave(lengths).to(device)
    pos = torch.arange(offsets[-1], dtype=torch.int64) - starts.repeat_interleave(lengths)
    return [((pos >= shift).to(device), seq, (width + pos - shift).clamp(0, width - 1).to(device))
            for shift in range(1, width)]


def causal_conv1d_varlen(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         cu_seqlens: torch.Tensor, initial_inputs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The depthwise causal conv1d (no activation) of sequences packed along x's last axis
    (x (1, dim, total), offsets cu_seqlens): each output sees only its own sequence's inputs; the
    steps before a sequence's start read zeros, as the causal padding of one sequence alone, or,
    with initial_inputs (num_seqs, dim, width), that sequence's previous inputs, oldest first (the
    conv states of a cache). weight is (dim, width) or the Conv1d weight (dim, 1, width).
    Computed in x's dtype."""
    if weight.dim() == 3:
        weight = weight[:, 0]
    total = x.shape[-1]
    offsets = check_cu_seqlens(cu_seqlens, total)
    width = weight.shape[-1]
    y = x * weight[:, width - 1, None]
    for shift, (inside, seqs, cols) in enumerate(_steps_back(tuple(offsets), width, x.device), start=1):
        # the input `shift` steps back: in the same sequence, else zero or the previous inputs
        back = F.pad(x, (shift, 0))[..., :total]
        if initial_inputs is None:
            back = torch.where(inside, back, 0.0)
        else:
            back = torch.where(inside, back, initial_inputs[seqs, :, cols].t()[None].to(back.dtype))
        y = y + back * weight[:, width - 1 - shift, None]
    if bias is not None:
        y = y + bias[:, None]
    return y


def last_inputs_varlen(x: torch.Tensor, cu_seqlens: torch.Tensor, width: int,
                       initial_inputs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The conv state each packed sequence leaves: its last `width` inputs, oldest first (x
    (1, dim, total) -> (num_seqs, dim, width)), as causal_conv1d_step keeps it; before a sequence's
    start, zeros, or with initial_inputs (num_seqs, dim, width) the inputs it continues."""
    total = x.shape[-1]
    offsets = check_cu_seqlens(cu_seqlens, total)
    ends = torch.tensor(offsets[1:], dtype=torch.int64)[:, None]
    starts = torch.tensor(offsets[:-1], dtype=torch.int64)[:, None]
    pos = ends - width + torch.arange(width, dtype=torch.int64)[None, :]  # (num_seqs, width)
    index = torch.where(pos >= starts, pos, total).flatten().to(x.device)
    taken = F.pad(x[0], (0, 1)).index_select(-1, index)  # (dim, num_seqs * width)
    last = taken.view(x.shape[1], len(offsets) - 1, width).transpose(0, 1)
    if initial_inputs is None:
        return last
    before = (pos < starts).to(x.device)
    cols = (width + pos - starts).clamp(0, width - 1).to(x.device)  # (where before the start)
    earlier = initial_inputs.gather(2, cols[:, None, :].expand(-1, x.shape[1], -1)).to(last.dtype)
    return torch.where(before[:, None, :], earlier, last)


__all__ = ["SelectiveScan", "causal_conv1d_step", "causal_conv1d_varlen", "last_inputs_varlen"]
