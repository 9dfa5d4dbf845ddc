"""`RMSNorm` and the pre-norm residual `Block` of the Mamba stack (Add -> Norm -> Mixer, with the
residual optionally kept in fp32), with mamba-ssm's parameter names."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32, returned in x's dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's rms_norm, fused where torch fuses it, in place of the formula written out in
        # element-wise operations: the decode step runs n_layer + 1 norms per token, and a small
        # batch pays for each of their kernels (docs/modules.md, "CUDA graphs")
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class Block(nn.Module):
    """Pre-norm mixer block: residual = hidden_states + residual; hidden_states =
    mixer(norm(residual)). Returns (hidden_states, residual); the caller adds the last residual.

    `fused_add_norm` is accepted for compatibility: the add and the norm run as separate ops with the
    same math. Only mixer blocks are supported (no MLP: mlp_cls must be None or nn.Identity).
    """

    def __init__(self, dim: int, mixer_cls: Callable[[int], nn.Module], mlp_cls=None,
                 norm_cls: Callable[[int], nn.Module] = nn.LayerNorm, fused_add_norm: bool = False,
                 residual_in_fp32: bool = False):
        super().__init__()
        if mlp_cls is not None and mlp_cls is not nn.Identity:
            raise NotImplementedError("Block: an MLP after the mixer (d_intermediate > 0) is not supported")
        self.residual_in_fp32 = residual_in_fp32
        self.fused_add_norm = fused_add_norm
        self.norm = norm_cls(dim)
        self.mixer = mixer_cls(dim)

    def forward(self, hidden_states: torch.Tensor, residual: Optional[torch.Tensor] = None,
                inference_params=None, **mixer_kwargs):
        residual = hidden_states + residual if residual is not None else hidden_states
        hidden_states = self.norm(residual.to(dtype=self.norm.weight.dtype))
        if self.residual_in_fp32:
            residual = residual.to(torch.float32)
        hidden_states = self.mixer(hidden_states, inference_params=inference_params, **mixer_kwargs)
        return hidden_states, residual

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int = 0, dtype=None, **kwargs):
        return self.mixer.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, **kwargs)


__all__ = ["RMSNorm", "Block"]
