"""Readable references of the selective scan: the oracle of every test.

`selective_scan_ref` runs the recurrence one timestep at a time, exactly as the contract in
docs/api.md states it, and is differentiable through autograd. With float64 inputs it is exact to
float64 rounding. `selective_scan_parallel_ref` is the parallel-scan formulation that pure-PyTorch
Mamba ports use: it materialises (batch, seqlen, dim, dstate) tensors, and serves as a baseline in
the benchmarks.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F


def _expand_bc(X: torch.Tensor, batch: int, dim: int, seqlen: int) -> torch.Tensor:
    """B or C in any of its three forms as a (batch, dim, dstate, seqlen) view."""
    if X.dim() == 2:  # (dim, dstate): time-invariant
        return X[None, :, :, None].expand(batch, dim, X.shape[1], seqlen)
    if X.dim() == 3:  # (batch, dstate, seqlen): one group
        return X[:, None].expand(batch, dim, X.shape[1], seqlen)
    groups = X.shape[1]  # (batch, n_groups, dstate, seqlen)
    return X.repeat_interleave(dim // groups, dim=1)


def _compute_dtype(u: torch.Tensor, compute_dtype):
    if compute_dtype is not None:
        return compute_dtype
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _per_sequence(scan, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                  initial_state, cu_seqlens, **kwargs):
    """Packed sequences (batch 1, offsets cu_seqlens) scanned one at a time by `scan`: the
    definition of the varlen op, written as plainly as it reads."""
    offsets = [int(v) for v in cu_seqlens.tolist()]
    outs, lasts = [], []
    for i in range(len(offsets) - 1):
        s, e = offsets[i], offsets[i + 1]

        def piece(x):
            return x[..., s:e] if x is not None and x.dim() >= 3 else x
        h0 = initial_state[i:i + 1] if initial_state is not None else None
        out, last = scan(piece(u), piece(delta), A, piece(B), piece(C), D, piece(z), delta_bias, delta_softplus,
                         True, initial_state=h0, **kwargs)
        outs.append(out)
        lasts.append(last)
    out = torch.cat(outs, dim=-1) if outs else u[..., :0].clone()
    if not return_last_state:
        return out
    ct = _compute_dtype(u, kwargs.get("compute_dtype"))
    last = torch.cat(lasts) if lasts else u.new_zeros((0, u.shape[1], A.shape[1]), dtype=ct)
    return out, last


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, *, initial_state=None, compute_dtype=None, cu_seqlens=None):
    """Sequential selective scan.

    h_t = exp(d_t A) h_{t-1} + d_t B_t u_t,  y_t = C_t . h_t + D u_t,  out = y * silu(z),
    with d_t = softplus(delta_t + delta_bias) when delta_softplus else delta_t + delta_bias.
    Computes in `compute_dtype` (default float32, float64 for float64 inputs); returns out in u's
    dtype, and with return_last_state also h at the last step in the compute dtype. With
    cu_seqlens, each packed sequence is scanned on its own (as selective_scan).
    """
    if cu_seqlens is not None:
        return _per_sequence(selective_scan_ref, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                             return_last_state, initial_state, cu_seqlens, compute_dtype=compute_dtype)
    dtype_in = u.dtype
    ct = _compute_dtype(u, compute_dtype)
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    u, delta, A = u.to(ct), delta.to(ct), A.to(ct)
    if delta_bias is not None:
        delta = delta + delta_bias.to(ct)[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)  # threshold 20, as torch's
    Bx = _expand_bc(B.to(ct), batch, dim, seqlen)
    Cx = _expand_bc(C.to(ct), batch, dim, seqlen)
    if initial_state is not None:
        h = initial_state.to(ct)
    else:
        h = u.new_zeros(batch, dim, dstate)
    ys = []
    # Per-step slices taken once: indexing the expanded views inside the loop would make autograd
    # allocate a full (batch, dim, dstate, seqlen) gradient at every step.
    B_steps, C_steps = Bx.unbind(-1), Cx.unbind(-1)
    for t in range(seqlen):
        d_t = delta[:, :, t, None]
        h = torch.exp(d_t * A) * h + d_t * B_steps[t] * u[:, :, t, None]
        ys.append((h * C_steps[t]).sum(-1))
    y = torch.stack(ys, dim=2) if seqlen > 0 else u.new_zeros(batch, dim, 0)
    if D is not None:
        y = y + D.to(ct)[None, :, None] * u
    if z is not None:
        y = y * F.silu(z.to(ct))
    out = y.to(dtype_in)
    return (out, h) if return_last_state else out


def selective_scan_parallel_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                                delta_softplus=False, return_last_state=False, *,
                                initial_state=None, cu_seqlens=None):
    """The same function by a Hillis-Steele scan over materialised (batch, seqlen, dim, dstate) tensors.

    Each of the log2(seqlen) rounds combines pairs with the associative operator
    (a1, b1) o (a0, b0) = (a1 a0, a1 b0 + b1). Memory is O(batch * seqlen * dim * dstate): this is
    the formulation the kernels avoid, kept as a baseline.
    """
    if cu_seqlens is not None:
        return _per_sequence(selective_scan_parallel_ref, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                             return_last_state, initial_state, cu_seqlens)
    dtype_in = u.dtype
    ct = _compute_dtype(u, None)
    batch, dim, seqlen = u.shape
    u, delta, A = u.to(ct), delta.to(ct), A.to(ct)
    if delta_bias is not None:
        delta = delta + delta_bias.to(ct)[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    Bx = _expand_bc(B.to(ct), batch, dim, seqlen)  # (b, d, n, l)
    Cx = _expand_bc(C.to(ct), batch, dim, seqlen)
    dt = delta.transpose(1, 2)[..., None]                    # (b, l, d, 1)
    a = torch.exp(dt * A)                                    # (b, l, d, n)
    x = dt * Bx.permute(0, 3, 1, 2) * u.transpose(1, 2)[..., None]
    if initial_state is not None and seqlen > 0:
        x = torch.cat([x[:, :1] + a[:, :1] * initial_state.to(ct)[:, None], x[:, 1:]], dim=1)
    offset = 1
    while offset < seqlen:
        a_prev = F.pad(a[:, :-offset], (0, 0, 0, 0, offset, 0), value=1.0)
        x_prev = F.pad(x[:, :-offset], (0, 0, 0, 0, offset, 0), value=0.0)
        x = a * x_prev + x
        a = a * a_prev
        offset *= 2
    y = (x * Cx.permute(0, 3, 1, 2)).sum(-1).transpose(1, 2)  # (b, d, l)
    if D is not None:
        y = y + D.to(ct)[None, :, None] * u
    if z is not None:
        y = y * F.silu(z.to(ct))
    out = y.to(dtype_in)
    if not return_last_state:
        return out
    if seqlen > 0:
        last = x[:, -1]
    elif initial_state is not None:
        last = initial_state.to(ct)
    else:
        last = u.new_zeros(batch, dim, A.shape[1])
    return out, last


__all__ = ["selective_scan_ref", "selective_scan_parallel_ref"]
