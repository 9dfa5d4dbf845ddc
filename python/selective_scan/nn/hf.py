"""Conversion of HuggingFace transformers MambaForCausalLM checkpoints: its config (an object or a
dict) to a `MambaConfig`, and its state_dict names to ours. transformers is not needed: only the
config's field values and the state_dict's tensors are read."""
from __future__ import annotations

import math
import re
from typing import Any, Dict, Mapping

import torch

from .model import MambaConfig, MambaLMHeadModel

_LAYER_KEY = re.compile(
    r"^backbone\.layers\.(\d+)\.(mixer\.(in_proj\.weight|in_proj\.bias|conv1d\.weight|conv1d\.bias|"
    r"x_proj\.weight|dt_proj\.weight|dt_proj\.bias|out_proj\.weight|out_proj\.bias|A_log|D)|norm\.weight)$")


def _get(cfg: Any, name: str, default=None):
    if isinstance(cfg, Mapping):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def mamba_config_from_hf(hf_config: Any) -> MambaConfig:
    """MambaConfig from a transformers MambaConfig (or its to_dict()).

    hidden_size -> d_model, num_hidden_layers -> n_layer, vocab_size -> vocab_size (not padded
    further: pad_vocab_size_multiple = 1), state_size -> d_state, conv_kernel -> d_conv, expand,
    time_step_rank -> dt_rank ("auto" -> ceil(hidden_size / 16)), use_bias -> bias,
    use_conv_bias -> conv_bias, layer_norm_epsilon -> norm_epsilon, residual_in_fp32,
    tie_word_embeddings -> tie_embeddings. The norms are RMSNorm.
    """
    d_model = int(_get(hf_config, "hidden_size"))
    dt_rank = _get(hf_config, "time_step_rank", "auto")
    dt_rank = math.ceil(d_model / 16) if dt_rank in (None, "auto") else int(dt_rank)
    expand = _get(hf_config, "expand", 2)
    intermediate = _get(hf_config, "intermediate_size", None)
    if intermediate is not None and int(intermediate) != int(expand * d_model):
        raise ValueError(f"hf config: intermediate_size = {intermediate} differs from expand * hidden_size = "
                         f"{int(expand * d_model)}; not supported")
    ssm_cfg = {
        "d_state": int(_get(hf_config, "state_size", 16)),
        "d_conv": int(_get(hf_config, "conv_kernel", 4)),
        "expand": expand,
        "dt_rank": dt_rank,
        "bias": bool(_get(hf_config, "use_bias", False)),
        "conv_bias": bool(_get(hf_config, "use_conv_bias", True)),
    }
    return MambaConfig(
        d_model=d_model, d_intermediate=0, n_layer=int(_get(hf_config, "num_hidden_layers")),
        vocab_size=int(_get(hf_config, "vocab_size")), ssm_cfg=ssm_cfg, rms_norm=True,
        residual_in_fp32=bool(_get(hf_config, "residual_in_fp32", True)), fused_add_norm=True,
        pad_vocab_size_multiple=1, tie_embeddings=bool(_get(hf_config, "tie_word_embeddings", True)),
        norm_epsilon=float(_get(hf_config, "layer_norm_epsilon", 1e-5)))


def load_hf_mamba_state_dict(state_dict: Mapping[str, torch.Tensor],
                             config: MambaConfig | None = None) -> Dict[str, torch.Tensor]:
    """A MambaForCausalLM state_dict renamed to ours (a new dict; tensors are not copied).

    backbone.embeddings.weight -> backbone.embedding.weight; backbone.layers.{i}.mixer.* and
    backbone.layers.{i}.norm.weight, backbone.norm_f.weight and lm_head.weight keep their names.
    A missing lm_head.weight (tied checkpoints often omit it) is the embedding when the config ties
    them. Unknown keys raise a KeyError naming them.
    """
    out: Dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        if key == "backbone.embeddings.weight":
            out["backbone.embedding.weight"] = value
        elif key in ("backbone.norm_f.weight", "lm_head.weight") or _LAYER_KEY.match(key):
            out[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(f"load_hf_mamba_state_dict: unexpected keys {unknown[:8]}"
                       f"{' ...' if len(unknown) > 8 else ''}")
    if "backbone.embedding.weight" not in out:
        raise KeyError("load_hf_mamba_state_dict: missing backbone.embeddings.weight")
    if "lm_head.weight" not in out:
        if config is not None and not config.tie_embeddings:
            raise KeyError("load_hf_mamba_state_dict: missing lm_head.weight and the config does not tie it")
        out["lm_head.weight"] = out["backbone.embedding.weight"]
    return out


def from_hf_state_dict(state_dict: Mapping[str, torch.Tensor], hf_config: Any, device=None,
                       dtype=None) -> MambaLMHeadModel:
    """A MambaLMHeadModel holding a MambaForCausalLM checkpoint: config converted by
    mamba_config_from_hf, weights renamed by load_hf_mamba_state_dict and loaded strictly."""
    return MambaLMHeadModel.from_hf_state_dict(state_dict, hf_config, device=device, dtype=dtype)


__all__ = ["mamba_config_from_hf", "load_hf_mamba_state_dict", "from_hf_state_dict"]
