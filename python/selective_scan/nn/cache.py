"""The inference cache of the Mamba stack: per layer a conv state (batch, d_inner, d_conv) and an
fp32 ssm state (batch, d_inner, d_state), both of fixed size, so decoding costs O(1) per token."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch


@dataclass
class InferenceParams:
    """What a forward with a cache needs (the fields of mamba-ssm's class of the same name).

    key_value_memory_dict maps layer_idx to (conv_state, ssm_state), filled by each layer on first
    use; seqlen_offset counts the tokens already consumed: 0 means the next forward is a prefill,
    > 0 with one new token takes the fused single-step path.
    """

    max_seqlen: int
    max_batch_size: int
    seqlen_offset: int = 0
    batch_size_offset: int = 0
    key_value_memory_dict: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    lengths_per_sample: Optional[torch.Tensor] = None

    def reset(self, max_seqlen: int, max_batch_size: int) -> None:
        """Start over: zero every state and the offset."""
        self.max_seqlen = max_seqlen
        self.max_batch_size = max_batch_size
        self.seqlen_offset = 0
        for conv_state, ssm_state in self.key_value_memory_dict.values():
            conv_state.zero_()
            ssm_state.zero_()

    def cache_numel(self) -> int:
        """Elements held by the cache, all layers: constant while decoding."""
        return sum(c.numel() + s.numel() for c, s in self.key_value_memory_dict.values())


__all__ = ["InferenceParams"]
