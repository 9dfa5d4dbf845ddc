"""The public op: `selective_scan` (alias `selective_scan_fn`), a thin torch.autograd.Function over
the native ops torch.ops.selective_scan.fwd / .bwd, and their fake (meta) implementations so the op
traces under torch.compile(fullgraph=True)."""
from __future__ import annotations

from typing import Optional

import torch

from . import _C  # noqa: F401  (loads the library that registers torch.ops.selective_scan)
from .varlen import selective_scan_varlen

CHECKPOINT_CHUNK = _C.checkpoint_chunk


def _compute_dtype(u: torch.Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32


@torch.library.register_fake("selective_scan::fwd")
def _fwd_fake(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus):
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    ct = _compute_dtype(u)
    n_chunks = (seqlen + CHECKPOINT_CHUNK - 1) // CHECKPOINT_CHUNK
    out = u.new_empty((batch, dim, seqlen))
    last_state = u.new_empty((batch, dim, dstate), dtype=ct)
    checkpoints = u.new_empty((batch, dim, n_chunks, dstate), dtype=ct)
    return out, last_state, checkpoints


@torch.library.register_fake("selective_scan::bwd")
def _bwd_fake(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state, checkpoints,
              delta_softplus):
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    ct = _compute_dtype(u)
    du = u.new_empty((batch, dim, seqlen))
    ddelta = u.new_empty((batch, dim, seqlen))
    dA = u.new_empty((dim, dstate), dtype=ct)
    dB = B.new_empty(B.shape)
    dC = C.new_empty(C.shape)
    dD = u.new_empty((dim,), dtype=ct)
    dz = u.new_empty((batch, dim, seqlen)) if z is not None else u.new_empty((0,))
    ddelta_bias = u.new_empty((dim,), dtype=ct)
    dinitial_state = u.new_empty((batch, dim, dstate), dtype=ct)
    return du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state


class SelectiveScanFn(torch.autograd.Function):
    """Forward and backward each call one registered op; the forward saves its inputs and the
    states at chunk boundaries, from which the backward recomputes the rest."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state):
        out, last_state, checkpoints = torch.ops.selective_scan.fwd(
            u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, checkpoints)
        ctx.delta_softplus = delta_softplus
        ctx.set_materialize_grads(False)
        return out, last_state

    @staticmethod
    def backward(ctx, dout, dlast_state):
        u, delta, A, B, C, D, z, delta_bias, initial_state, checkpoints = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(u)
        du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state = torch.ops.selective_scan.bwd(
            dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state, checkpoints,
            ctx.delta_softplus)
        return (du, ddelta, dA, dB, dC,
                dD if D is not None else None,
                dz if z is not None else None,
                ddelta_bias if delta_bias is not None else None,
                None,
                dinitial_state if initial_state is not None else None)


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                   C: torch.Tensor, D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
                   delta_bias: Optional[torch.Tensor] = None, delta_softplus: bool = False,
                   return_last_state: bool = False, *, initial_state: Optional[torch.Tensor] = None,
                   cu_seqlens: Optional[torch.Tensor] = None):
    """Selective scan (S6). See docs/api.md for shapes, dtypes and the math.

    Returns out (batch, dim, seqlen) in u's dtype, or (out, last_state) with return_last_state,
    last_state being the fp32 state (batch, dim, dstate) after the last step. Differentiable with
    respect to every tensor input, from both outputs.

    With cu_seqlens (num_seqs + 1 offsets, int32 or int64), u, delta, z and variable B / C hold
    num_seqs sequences packed along seqlen (batch 1); each is scanned on its own, from its row of
    initial_state (num_seqs, dim, dstate) or zero, and last_state has one row per sequence
    (selective_scan.varlen).
    """
    if cu_seqlens is not None:
        return selective_scan_varlen(selective_scan, u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus),
                                     return_last_state, initial_state, cu_seqlens)
    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (u, delta, A, B, C, D, z, delta_bias, initial_state)):
        out, last_state = SelectiveScanFn.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus),
                                                initial_state)
    else:
        # Nothing to differentiate: the op alone, without the autograd.Function's per-call cost
        # (about 9 us of host time on a CPU core, which short calls feel).
        out, last_state, _ = torch.ops.selective_scan.fwd(u, delta, A, B, C, D, z, delta_bias, initial_state,
                                                          bool(delta_softplus))
    return (out, last_state) if return_last_state else out


selective_scan_fn = selective_scan

__all__ = ["selective_scan", "selective_scan_fn", "SelectiveScanFn", "CHECKPOINT_CHUNK"]
