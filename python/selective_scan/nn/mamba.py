"""The Mamba (Mamba-1) mixer block: constructor arguments, parameter names, shapes and initialisation
of mamba-ssm's `Mamba`, so its checkpoints load with load_state_dict; forward through our scan op
(training and prefill) and through the fused decode-step op (one token from the inference cache)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..decode import selective_state_update
from .cache import InferenceParams
from .scan import SelectiveScan, causal_conv1d_step, causal_conv1d_varlen, last_inputs_varlen


def dt_bias_init(d_inner: int, dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4,
                 generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """The dt_proj bias: softplus^{-1}(dt) for dt log-uniform in [dt_min, dt_max], clamped below at
    dt_init_floor, so that softplus(bias) = dt at initialisation."""
    u = torch.rand(d_inner, generator=generator, device=device, dtype=torch.float32)
    dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))  # inverse softplus: log(exp(dt) - 1), stable


class Mamba(nn.Module):
    """Mamba-1 mixer: in_proj -> (x, z); x -> causal depthwise conv -> silu -> x_proj -> (dt, B, C);
    y = selective_scan(x, dt_proj.weight @ dt, A, B, C, D, z, delta_bias=dt_proj.bias,
    delta_softplus=True); out_proj(y). Input and output (batch, seqlen, d_model).

    A = -exp(A_log) (S4D-real init: A[d] = -(1..d_state)). A, D and the dt bias reach the op in fp32
    whatever the parameter dtype, so the block runs in fp32, under bf16 autocast, or with bf16
    weights. `use_fast_path` is accepted for compatibility and ignored.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank="auto", dt_min: float = 0.001, dt_max: float = 0.1, dt_init: str = "random",
                 dt_scale: float = 1.0, dt_init_floor: float = 1e-4, conv_bias: bool = True,
                 bias: bool = False, use_fast_path: bool = True, layer_idx: Optional[int] = None,
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.use_fast_path = use_fast_path
        self.layer_idx = layer_idx

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **factory)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=conv_bias, **factory)
        self.activation = "silu"
        self.act = nn.SiLU()
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)

        dt_init_std = self.dt_rank ** -0.5 * dt_scale
        with torch.no_grad():
            if dt_init == "constant":
                nn.init.constant_(self.dt_proj.weight, dt_init_std)
            elif dt_init == "random":
                nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
            else:
                raise ValueError(f"dt_init: expected 'random' or 'constant', got {dt_init!r}")
            self.dt_proj.bias.copy_(dt_bias_init(self.d_inner, dt_min, dt_max, dt_init_floor,
                                                 device=self.dt_proj.bias.device))
        self.dt_proj.bias._no_reinit = True  # the LM's init leaves it alone

        A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))  # fp32 whatever `dtype`, as D
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device, dtype=torch.float32))
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)
        self.scan = SelectiveScan(delta_softplus=True)

    # --- the continuous parameters in the op's dtypes ---
    def _A(self) -> torch.Tensor:
        return -torch.exp(self.A_log.float())

    def _dt_bias(self) -> Optional[torch.Tensor]:
        return self.dt_proj.bias.float() if self.dt_proj.bias is not None else None

    def forward(self, hidden_states: torch.Tensor, inference_params: Optional[InferenceParams] = None,
                cu_seqlens: Optional[torch.Tensor] = None):
        """hidden_states (batch, seqlen, d_model) -> (batch, seqlen, d_model). With cu_seqlens
        (num_seqs + 1 offsets), hidden_states (1, total, d_model) holds sequences packed along seqlen,
        each run as if alone: the conv and the scan stop at their boundaries. With an inference cache
        the cache has num_seqs rows, one per sequence: a prefill at seqlen_offset 0, and later
        forwards continue each row (chunked prefill; a sequence may be empty there)."""
        batch, seqlen, _ = hidden_states.shape
        cache_batch = batch
        if isinstance(cu_seqlens, torch.Tensor):
            # The conv, the cache's conv state and the scan each read the offsets on the host: one
            # copy from the device here (a no-op on the CPU) instead of one wait in each of them.
            cu_seqlens = cu_seqlens.cpu()
        if cu_seqlens is not None:
            if batch != 1:
                raise ValueError(f"hidden_states: expected batch 1 with cu_seqlens (sequences packed along "
                                 f"seqlen), got shape {tuple(hidden_states.shape)}")
            cache_batch = cu_seqlens.numel() - 1
        conv_state = ssm_state = None
        if inference_params is not None:
            conv_state, ssm_state = self._states_from_cache(inference_params, cache_batch, hidden_states)
            if inference_params.seqlen_offset > 0 and seqlen == 1 and cu_seqlens is None:
                out = self.step(hidden_states[:, 0], conv_state, ssm_state)
                return out.unsqueeze(1)

        # Channels by tokens throughout, each channel's steps contiguous (as the scan reads them), so
        # that no operand of the scan is a transposed view it would have to copy: the projections
        # are weight @ activations.
        xz = self.in_proj.weight @ hidden_states.reshape(batch * seqlen, -1).t()  # (2 d_inner, tokens)
        if self.in_proj.bias is not None:
            xz = xz + self.in_proj.bias[:, None].to(xz.dtype)
        xz = xz.view(-1, batch, seqlen).transpose(0, 1)  # (batch, 2 * d_inner, seqlen)
        x, z = xz.chunk(2, dim=1)
        if cu_seqlens is not None:
            # A prefill, or with seqlen_offset > 0 each sequence continuing its cache row.
            previous = conv_state if conv_state is not None and inference_params.seqlen_offset > 0 else None
            x_in = x
            x = causal_conv1d_varlen(x, self.conv1d.weight, self.conv1d.bias, cu_seqlens, previous)
            if conv_state is not None:  # (after the conv, which reads the previous inputs from it)
                conv_state.copy_(last_inputs_varlen(x_in, cu_seqlens, self.d_conv, previous))
        elif conv_state is not None:
            # Continue from the last d_conv inputs (zeros at the start: the causal padding).
            x_ext = torch.cat([conv_state[..., 1:].to(x.dtype), x], dim=-1)
            conv_state.copy_(x_ext[..., -self.d_conv:])
            x = F.conv1d(x_ext, self.conv1d.weight, self.conv1d.bias, groups=self.d_inner)
        else:
            x = self.conv1d(x)[..., :seqlen]
        x = self.act(x)

        x_dbl = self.x_proj.weight @ x  # (batch, dt_rank + 2 * d_state, seqlen)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=1)
        dt = self.dt_proj.weight @ dt  # (batch, d_inner, seqlen); the bias is added in the op
        initial_state = ssm_state if (ssm_state is not None and inference_params.seqlen_offset > 0) else None
        y = self.scan(x, dt.to(x.dtype), self._A(), B.to(x.dtype), C.to(x.dtype), self.D.float(), z=z.to(x.dtype),
                      delta_bias=self._dt_bias(), initial_state=initial_state,
                      return_last_state=ssm_state is not None, cu_seqlens=cu_seqlens)
        if ssm_state is not None:
            y, last_state = y
            ssm_state.copy_(last_state)
        return self.out_proj(y.transpose(1, 2))

    @torch.no_grad()
    def step(self, hidden_states: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor):
        """One token: hidden_states (batch, d_model) -> (batch, d_model); conv_state
        (batch, d_inner, d_conv) and the fp32 ssm_state (batch, d_inner, d_state) advance in place."""
        xz = self.in_proj(hidden_states)
        x, z = xz.chunk(2, dim=-1)  # (batch, d_inner) each
        x = causal_conv1d_step(x, conv_state, self.conv1d.weight, self.conv1d.bias)
        x_dbl = self.x_proj(x)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight)
        dtype = x.dtype
        y = selective_state_update(ssm_state, x, dt.to(dtype), self._A(), B.to(dtype), C.to(dtype),
                                   self.D.float(), z=z.to(dtype), dt_bias=self._dt_bias(), dt_softplus=True)
        return self.out_proj(y)

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int = 0, dtype=None, **kwargs):
        """Zeroed (conv_state, ssm_state): (batch, d_inner, d_conv) in `dtype` (default: the conv
        weight's) and (batch, d_inner, d_state) in fp32. Their size does not depend on max_seqlen."""
        device = self.out_proj.weight.device
        conv_dtype = dtype if dtype is not None else self.conv1d.weight.dtype
        conv_state = torch.zeros(batch_size, self.d_inner, self.d_conv, device=device, dtype=conv_dtype)
        ssm_state = torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=torch.float32)
        return conv_state, ssm_state

    def _states_from_cache(self, inference_params: InferenceParams, batch_size: int, like: torch.Tensor):
        if self.layer_idx is None:
            raise ValueError("Mamba: layer_idx must be set to use an inference cache")
        cache = inference_params.key_value_memory_dict
        if self.layer_idx not in cache:
            dtype = torch.get_autocast_dtype(like.device.type) if torch.is_autocast_enabled(like.device.type) \
                else like.dtype
            cache[self.layer_idx] = self.allocate_inference_cache(batch_size, inference_params.max_seqlen,
                                                                  dtype=dtype)
        conv_state, ssm_state = cache[self.layer_idx]
        if conv_state.shape[0] != batch_size:
            raise ValueError(f"Mamba: inference cache holds batch {conv_state.shape[0]}, got batch {batch_size}")
        return conv_state, ssm_state


__all__ = ["Mamba", "dt_bias_init"]
