"""Variable-length sequences: several sequences packed one after another along seqlen (batch 1),
their boundaries given by `cu_seqlens`, each scanned from its own initial state (or zero) to its
own last state, as if it were scanned alone.

The scan runs as padded batches of sequences of similar length through the fixed-length op. Every
sequence of a batch is longer than half the batch's longest, so padding at most doubles the work
(rows are also rounded up to a multiple of 8 steps); `padding_plan` says how it falls. A sequence is placed at the end of its row, after zeros: with
u = 0 the padded steps leave a zero state at zero exactly (h = a * 0 + d * B * 0), so its outputs,
its last state and every gradient are those of the sequence scanned alone. An initial state would
decay through those steps, so with initial states the sequences start their rows instead (padding
after them cannot reach their outputs), and the last state, where asked for, is that of a second,
end-aligned scan from zero plus the initial state carried by the sequence's whole decay:

    last = last(from zero) + exp(A * sum_t d_t) * initial_state.

The data moves into and out of the padded batches are one launch each of the column-move op
(torch.ops.selective_scan._move_columns, csrc/column_moves.h); each element moves once, so the
backward of a move is the opposite move: no atomics, and the gradients stay deterministic. The
states (initial and last, one row per sequence) are gathered with torch's indexing. docs/api.md
has the contract, docs/design.md the moves and their timings.
"""
from __future__ import annotations

import functools
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F


def check_cu_seqlens(cu_seqlens, total: int) -> List[int]:
    """The offsets of cu_seqlens as a list, after checking them against a packed length `total`."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens: expected a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens: expected a 1-D tensor of num_seqs + 1 offsets, got shape "
                         f"{tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens: expected dtype int32 or int64, got {cu_seqlens.dtype}")
    offsets = [int(v) for v in cu_seqlens.tolist()]
    if offsets[0] != 0:
        raise ValueError(f"cu_seqlens: expected cu_seqlens[0] == 0, got {offsets[0]}")
    for i in range(1, len(offsets)):
        if offsets[i] < offsets[i - 1]:
            raise ValueError(f"cu_seqlens: expected non-decreasing offsets, got {offsets[i - 1]} then "
                             f"{offsets[i]} at index {i}")
    if offsets[-1] != total:
        raise ValueError(f"cu_seqlens: expected the last offset to equal u's seqlen {total}, got {offsets[-1]}")
    return offsets


def padding_plan(lengths: Sequence[int]) -> List[List[int]]:
    """The padded batches: lists of sequence indices, longest first; each sequence is longer than
    half the longest of its batch. Empty sequences are in none."""
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: -lengths[i])
    batches: List[List[int]] = []
    for i in order:
        if batches and 2 * lengths[i] > lengths[batches[-1][0]]:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def _take(x: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """x.index_select(dim, index), where index x.shape[dim] reads zeros (small tensors: states)."""
    dim %= x.dim()
    pad = [0, 0] * (x.dim() - 1 - dim) + [0, 1]
    return F.pad(x, pad).index_select(dim, index)


class _Gather(torch.autograd.Function):
    """y = _take(x, dim, index) for a one-to-one map (each position of x read at most once); the
    backward gathers the gradient back with `inverse` (y's position of each of x's, or y's size
    for a position not read)."""

    @staticmethod
    def forward(ctx, x, dim, index, inverse):
        ctx.dim = dim
        ctx.save_for_backward(inverse)
        return _take(x, dim, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return _take(grad, ctx.dim, inverse), None, None, None


def _gather(x: torch.Tensor, dim: int, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        return _Gather.apply(x, dim, index, inverse)
    return _take(x, dim, index)


@torch.library.register_fake("selective_scan::_move_columns")
def _move_columns_fake(src, src_offset, src_stride, dst_offset, dst_stride, rows, dst_numel):
    return src.new_empty((dst_numel,))


class _Moves:
    """One column move of torch.ops.selective_scan._move_columns (csrc/column_moves.h): column k
    copies `rows` elements from src_offset[k] + m * src_stride[k] to dst_offset[k] + m *
    dst_stride[k], for m < rows; a negative src_offset writes zeros. Each of the four is a
    (columns,) int64 tensor on the device, or an int: one value for every column."""

    def __init__(self, columns: int, dst_columns: int, device, *arrays):
        def as_tensor(a):
            if isinstance(a, torch.Tensor):
                return a
            return torch.full((1,), int(a), dtype=torch.int64, device=device).expand(columns)
        self.tensors = [as_tensor(a) for a in arrays]
        self.dst_columns = dst_columns

    def __call__(self, src: torch.Tensor, rows: int) -> torch.Tensor:
        return torch.ops.selective_scan._move_columns(src, *self.tensors, rows, rows * self.dst_columns)


class _Layout:
    """Where each packed step goes in the padded batches, sequences aligned to the end of their rows
    or to the start. A packed tensor (1, M..., total) becomes one contiguous (rows, M..., row length)
    tensor per batch, all of them parts of one flat buffer; the moves both ways are single launches
    of _move_columns, each column a step of a row. Built once per (offsets, alignment, device) and
    kept for the next calls (a model's layers all scan the same sequences)."""

    def __init__(self, offsets: Tuple[int, ...], end_aligned: bool, device):
        self.total = total = offsets[-1]
        starts = np.asarray(offsets[:-1], dtype=np.int64)
        lengths = np.diff(np.asarray(offsets, dtype=np.int64))
        self.batches = padding_plan(lengths.tolist())
        self.device = device
        step_parts, row_parts = [], []
        self.shapes = []  # (rows, row length) per batch
        slots = 0
        for seqs in self.batches:
            # rows a multiple of 8 steps long: 16-byte aligned rows, which the CUDA kernels load
            # 16 bytes at a time (docs/design.md)
            longest = -(-int(lengths[seqs[0]]) // 8) * 8
            lens = lengths[seqs][:, None]
            col = np.arange(longest, dtype=np.int64)[None, :]
            first = longest - lens if end_aligned else np.zeros_like(lens)
            valid = (col >= first) & (col < first + lens)
            step_parts.append(np.where(valid, starts[seqs][:, None] + col - first, -1).ravel())
            row_parts.append(np.repeat(slots + longest * np.arange(len(seqs), dtype=np.int64), longest))
            self.shapes.append((len(seqs), longest))
            slots += len(seqs) * longest
        self.slots = slots
        empty = np.zeros(0, dtype=np.int64)
        self.step_of_slot = np.concatenate(step_parts) if step_parts else empty  # -1: a padded step
        self.row_of_slot = np.concatenate(row_parts) if row_parts else empty     # its row's first slot
        self.len_of_slot = np.repeat(np.asarray([longest for _, longest in self.shapes], dtype=np.int64),
                                     [n * longest for n, longest in self.shapes])  # its row's length
        taken = self.step_of_slot >= 0
        self.slot_of_step = np.full(total, -1, dtype=np.int64)
        self.slot_of_step[self.step_of_slot[taken]] = np.flatnonzero(taken)
        if not (self.slot_of_step >= 0).all():
            raise AssertionError("varlen: a packed step without a padded slot")
        # The batches' rows in sequence order: their count, each sequence's row (the count for an
        # empty sequence), each row's sequence, and which sequences are empty.
        order = np.asarray([i for seqs in self.batches for i in seqs], dtype=np.int64)
        row_of = np.full(len(lengths), order.size, dtype=np.int64)
        row_of[order] = np.arange(order.size, dtype=np.int64)
        self.rows_of_sequences = (order.size, torch.from_numpy(row_of).to(device), torch.from_numpy(order).to(device),
                                  torch.from_numpy(lengths == 0).to(device))

        def on_device(a):
            return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device)
        # the per-column arrays that do not depend on the rows moved
        self._step_of_slot = on_device(self.step_of_slot)
        self._len_of_slot = on_device(self.len_of_slot)
        self._len_of_step = on_device(self.len_of_slot[self.slot_of_step])
        self._steps = torch.arange(total, dtype=torch.int64, device=device)
        self._on_device = on_device
        self._moves = {}

    @staticmethod
    @functools.lru_cache(maxsize=4)
    def of(offsets: Tuple[int, ...], end_aligned: bool, device: torch.device) -> "_Layout":
        return _Layout(offsets, end_aligned, device)

    def moves(self, m: int, row_stride: Optional[int] = None, step_stride: int = 1):
        """(to the batches, from the batches) for tensors of m rows (the product of the middle
        dimensions), the packed tensor read with those strides (default: contiguous (m, total));
        the move back writes a contiguous one. Slot k of a batch of row length L, row r and column j
        holds, per row i < m, element m_base + i * L + j of the flat buffer, m_base = m * (first slot
        of row r)."""
        row_stride = self.total if row_stride is None else row_stride
        key = (m, row_stride, step_stride)
        if key not in self._moves:
            if m not in self._moves:
                cat_offset = m * self.row_of_slot + (np.arange(self.slots, dtype=np.int64) - self.row_of_slot)
                self._moves[m] = (self._on_device(cat_offset), _Moves(
                    self.total, self.total, self.device,
                    self._on_device(cat_offset[self.slot_of_step]), self._len_of_step, self._steps, self.total))
            cat_offset, back = self._moves[m]
            src = self._step_of_slot if step_stride == 1 else torch.where(
                self._step_of_slot >= 0, self._step_of_slot * step_stride, -1)
            self._moves[key] = (_Moves(self.slots, self.slots, self.device, src, row_stride, cat_offset,
                                       self._len_of_slot), back)
        return self._moves[key]

    def strided_moves(self, x: torch.Tensor):
        """x (1, *mid, total) -> (rows m, moves reading x in place): a (1, rows, steps) view with
        positive strides as it is, anything else (several middle dimensions) from its layout
        contiguous."""
        m = x[0].numel() // self.total
        if x.dim() == 3 and x.stride(1) > 0 and x.stride(2) > 0:
            return x, m, self.moves(m, x.stride(1) if x.shape[1] > 1 else self.total, x.stride(2))
        return x.contiguous(), m, self.moves(m)

    def split(self, flat: torch.Tensor, mid) -> List[torch.Tensor]:
        """The flat buffer's batches as (rows, *mid, row length) views."""
        m = flat.numel() // max(1, self.slots)
        sizes = [n * m * longest for n, longest in self.shapes]
        return [part.view(n, *mid, longest) for part, (n, longest) in zip(flat.split(sizes), self.shapes)]

    def pad(self, x: torch.Tensor) -> List[torch.Tensor]:
        """x (1, *mid, total) -> per batch (rows, *mid, row length), zeros on padded steps."""
        if torch.is_grad_enabled() and x.requires_grad:
            return list(_Pad.apply(x, self))
        src, m, (to_batches, _) = self.strided_moves(x)
        return self.split(to_batches(src, m), x.shape[1:-1])

    def unpad(self, parts: List[torch.Tensor]) -> torch.Tensor:
        """Per batch (rows, *mid, row length) -> (1, *mid, total), the padded steps dropped."""
        if torch.is_grad_enabled() and any(p.requires_grad for p in parts):
            return _Unpad.apply(self, *parts)
        return _unpad(self, parts)


def _unpad(layout: _Layout, parts) -> torch.Tensor:
    mid = parts[0].shape[1:-1]
    m = parts[0][0].numel() // parts[0].shape[-1]
    flat = torch.cat([p.reshape(-1) for p in parts])
    return layout.moves(m)[1](flat, m).view(1, *mid, layout.total)


class _Pad(torch.autograd.Function):
    """Layout.pad; the backward is the move from the batches (each element is moved once, so no
    sums: exact and deterministic)."""

    @staticmethod
    def forward(ctx, x, layout):
        ctx.layout, ctx.shape, ctx.dtype = layout, x.shape, x.dtype
        src, m, (to_batches, _) = layout.strided_moves(x)
        return tuple(layout.split(to_batches(src, m), x.shape[1:-1]))

    @staticmethod
    def backward(ctx, *grads):
        layout, shape = ctx.layout, ctx.shape
        mid = shape[1:-1]
        parts = [g if g is not None else torch.zeros((n, *mid, longest), dtype=ctx.dtype, device=layout.device)
                 for g, (n, longest) in zip(grads, layout.shapes)]
        return _unpad(layout, parts).view(shape), None


class _Unpad(torch.autograd.Function):
    """Layout.unpad; the backward is the move to the batches."""

    @staticmethod
    def forward(ctx, layout, *parts):
        ctx.layout = layout
        return _unpad(layout, parts)

    @staticmethod
    def backward(ctx, grad):
        layout = ctx.layout
        src, m, (to_batches, _) = layout.strided_moves(grad)
        return (None, *layout.split(to_batches(src, m), grad.shape[1:-1]))


def selective_scan_varlen(scan: Callable, u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool,
                          return_last_state: bool, initial_state: Optional[torch.Tensor],
                          cu_seqlens: torch.Tensor):
    """The scan of each sequence packed in u (1, dim, total) by cu_seqlens (num_seqs + 1,), through
    `scan` (the fixed-length op, called as selective_scan). Returns out (1, dim, total), and with
    return_last_state also last_state (num_seqs, dim, dstate)."""
    if not isinstance(u, torch.Tensor) or u.dim() != 3 or u.shape[0] != 1:
        shape = tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__
        raise ValueError(f"u: expected shape (1, dim, total) with cu_seqlens (sequences packed along seqlen), "
                         f"got {shape}")
    dim, total = u.shape[1], u.shape[2]
    offsets = check_cu_seqlens(cu_seqlens, total)
    num_seqs = len(offsets) - 1
    dstate = A.shape[-1] if isinstance(A, torch.Tensor) and A.dim() == 2 else None
    for name, t in (("delta", delta), ("z", z)):
        if isinstance(t, torch.Tensor) and tuple(t.shape) != tuple(u.shape):
            raise ValueError(f"{name}: expected u's shape {tuple(u.shape)}, got {tuple(t.shape)}")
    for name, t in (("B", B), ("C", C)):
        if isinstance(t, torch.Tensor) and t.dim() in (3, 4) and (t.shape[0] != 1 or t.shape[-1] != total):
            raise ValueError(f"{name}: expected (1, dstate, {total}) or (1, n_groups, dstate, {total}) with "
                             f"cu_seqlens, got {tuple(t.shape)}")
    if initial_state is not None and dstate is not None and (
            not isinstance(initial_state, torch.Tensor) or tuple(initial_state.shape) != (num_seqs, dim, dstate)):
        got = tuple(initial_state.shape) if isinstance(initial_state, torch.Tensor) else type(initial_state).__name__
        raise ValueError(f"initial_state: expected (num_seqs, dim, dstate) = {(num_seqs, dim, dstate)} with "
                         f"cu_seqlens, got {got}")
    with_initial = initial_state is not None
    # End-aligned rows without initial states; start-aligned with them (the batches are the same).
    first_layout = _Layout.of(tuple(offsets), not with_initial, u.device)
    batches = first_layout.batches
    if not batches:  # no steps at all: the op itself, for its checks and its empty outputs
        out = scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, False)
        if not return_last_state:
            return out
        ct = torch.float64 if u.dtype == torch.float64 else torch.float32
        last = u.new_zeros((num_seqs, dim, A.shape[-1]), dtype=ct) if initial_state is None else initial_state + 0
        return out, last

    rows, row_of, seq_of, empty = first_layout.rows_of_sequences
    h0_rows = None
    if initial_state is not None:
        h0_all = _gather(initial_state, 0, seq_of, row_of)
        h0_rows, at = [], 0
        for seqs in batches:
            h0_rows.append(h0_all.narrow(0, at, len(seqs)))
            at += len(seqs)

    def run(end_aligned: bool, with_initial: bool, want_last: bool, last_only: bool = False):
        """The scans of the batches, with their layout; last_only: for their last states, which D and
        z do not change."""
        layout = _Layout.of(tuple(offsets), end_aligned, u.device)

        def per_batch(x):
            return layout.pad(x) if x is not None and x.dim() >= 3 else [x] * len(batches)
        us, deltas, zs, Bs, Cs = (per_batch(x) for x in (u, delta, None if last_only else z, B, C))
        outs, lasts = [], []
        for k in range(len(batches)):
            h0 = h0_rows[k] if with_initial else None
            r = scan(us[k], deltas[k], A, Bs[k], Cs[k], None if last_only else D, zs[k], delta_bias, delta_softplus,
                     want_last, initial_state=h0)
            out, last = r if want_last else (r, None)
            outs.append(out)
            lasts.append(last)
        return layout, outs, lasts, deltas

    layout, outs, lasts, deltas = run(not with_initial, with_initial, return_last_state and not with_initial)
    out = layout.unpad(outs)
    if not return_last_state:
        return out
    if with_initial:
        # the start-aligned batches' real steps, per batch (rows, row length)
        valid = layout.split(layout._step_of_slot >= 0, ())
        _, _, lasts, _ = run(True, False, True, last_only=True)
        ct = lasts[0].dtype
        for k in range(len(batches)):
            d = deltas[k].to(ct)
            if delta_bias is not None:
                d = d + delta_bias.to(ct)[None, :, None]
            if delta_softplus:
                d = F.softplus(d)
            d_sum = (d * valid[k][:, None, :]).sum(-1)  # (rows, dim)
            lasts[k] = lasts[k] + torch.exp(A.to(ct)[None] * d_sum[..., None]) * h0_rows[k]
    # Rows of the batches back into sequence order; empty sequences keep their initial state.
    last = _gather(torch.cat(lasts), 0, row_of, seq_of)
    if with_initial and rows < num_seqs:
        last = torch.where(empty[:, None, None], initial_state.to(last.dtype), last)
    return out, last


__all__ = ["selective_scan_varlen", "padding_plan", "check_cu_seqlens"]
