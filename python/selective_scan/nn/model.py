"""The Mamba language model: `MambaConfig`, the `MixerModel` backbone and `MambaLMHeadModel` with
mamba-ssm's parameter names (a mamba-ssm state_dict loads with load_state_dict), its initialisation,
and `generate`: prefill with the scan, then one fused decode step per token from the cache."""
from __future__ import annotations

import math
from collections import namedtuple
from dataclasses import dataclass, field
from functools import partial
from typing import Optional

import torch
import torch.nn as nn

from .block import Block, RMSNorm
from .cache import InferenceParams
from .mamba import Mamba

CausalLMOutput = namedtuple("CausalLMOutput", ["logits"])


@dataclass
class MambaConfig:
    """mamba-ssm's config fields (same names and defaults), plus norm_epsilon. Only the Mamba-1 mixer
    with no MLP and no attention layers is supported: d_intermediate == 0, attn_layer_idx empty,
    ssm_cfg["layer"] absent or "Mamba1"."""

    d_model: int = 2560
    d_intermediate: int = 0
    n_layer: int = 64
    vocab_size: int = 50277
    ssm_cfg: dict = field(default_factory=dict)
    attn_layer_idx: list = field(default_factory=list)
    attn_cfg: dict = field(default_factory=dict)
    rms_norm: bool = True
    residual_in_fp32: bool = True
    fused_add_norm: bool = True
    pad_vocab_size_multiple: int = 8
    tie_embeddings: bool = True
    norm_epsilon: float = 1e-5

    def padded_vocab_size(self) -> int:
        m = max(1, int(self.pad_vocab_size_multiple))
        return (self.vocab_size + m - 1) // m * m

    def validate(self) -> None:
        if self.d_intermediate != 0:
            raise NotImplementedError(
                f"MambaConfig: d_intermediate = {self.d_intermediate}: only d_intermediate = 0 (no MLP) is supported")
        if self.attn_layer_idx:
            raise NotImplementedError(
                f"MambaConfig: attn_layer_idx = {self.attn_layer_idx}: attention layers are not supported")
        layer = (self.ssm_cfg or {}).get("layer", "Mamba1")
        if layer != "Mamba1":
            raise NotImplementedError(f"MambaConfig: ssm_cfg layer = {layer!r}: only 'Mamba1' is supported")


def create_block(d_model: int, ssm_cfg: Optional[dict] = None, norm_epsilon: float = 1e-5,
                 rms_norm: bool = True, residual_in_fp32: bool = True, fused_add_norm: bool = True,
                 layer_idx: Optional[int] = None, device=None, dtype=None) -> Block:
    factory = {"device": device, "dtype": dtype}
    cfg = dict(ssm_cfg or {})
    cfg.pop("layer", None)
    mixer_cls = partial(Mamba, layer_idx=layer_idx, **cfg, **factory)
    norm_cls = partial(RMSNorm if rms_norm else nn.LayerNorm, eps=norm_epsilon, **factory)
    block = Block(d_model, mixer_cls, None, norm_cls=norm_cls, fused_add_norm=fused_add_norm,
                  residual_in_fp32=residual_in_fp32)
    block.layer_idx = layer_idx
    return block


def _init_weights(module: nn.Module, n_layer: int, initializer_range: float = 0.02,
                  rescale_prenorm_residual: bool = True, n_residuals_per_layer: int = 1) -> None:
    """Linear biases to zero (except those marked _no_reinit), embeddings N(0, initializer_range),
    and out_proj weights rescaled by 1/sqrt(n_residuals_per_layer * n_layer) (GPT-2 style)."""
    if isinstance(module, nn.Linear):
        if module.bias is not None and not getattr(module.bias, "_no_reinit", False):
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=initializer_range)
    if rescale_prenorm_residual:
        for name, p in module.named_parameters(recurse=False):
            if name == "weight" and isinstance(module, nn.Linear) and getattr(module, "_is_out_proj", False):
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
                with torch.no_grad():
                    p /= math.sqrt(n_residuals_per_layer * n_layer)


class MixerModel(nn.Module):
    """embedding -> layers (Block) -> final add and norm_f."""

    def __init__(self, d_model: int, n_layer: int, vocab_size: int, ssm_cfg: Optional[dict] = None,
                 norm_epsilon: float = 1e-5, rms_norm: bool = True, initializer_cfg: Optional[dict] = None,
                 fused_add_norm: bool = True, residual_in_fp32: bool = True, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.residual_in_fp32 = residual_in_fp32
        self.fused_add_norm = fused_add_norm
        self.embedding = nn.Embedding(vocab_size, d_model, **factory)
        self.layers = nn.ModuleList([
            create_block(d_model, ssm_cfg=ssm_cfg, norm_epsilon=norm_epsilon, rms_norm=rms_norm,
                         residual_in_fp32=residual_in_fp32, fused_add_norm=fused_add_norm, layer_idx=i,
                         **factory)
            for i in range(n_layer)])
        self.norm_f = (RMSNorm if rms_norm else nn.LayerNorm)(d_model, eps=norm_epsilon, **factory)
        for layer in self.layers:
            layer.mixer.out_proj._is_out_proj = True
        self.apply(partial(_init_weights, n_layer=n_layer, **(initializer_cfg or {})))

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int = 0, dtype=None, **kwargs):
        return {i: layer.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, **kwargs)
                for i, layer in enumerate(self.layers)}

    def forward(self, input_ids: torch.Tensor, inference_params: Optional[InferenceParams] = None,
                cu_seqlens: Optional[torch.Tensor] = None):
        """input_ids (batch, seqlen) -> hidden states; with cu_seqlens, input_ids (1, total) holds
        sequences packed along seqlen, each run as if alone (Mamba.forward)."""
        hidden_states = self.embedding(input_ids)
        residual = None
        # (the layers read the offsets on the host: copied from the device once, not once per layer)
        mixer_kwargs = {} if cu_seqlens is None else {
            "cu_seqlens": cu_seqlens.cpu() if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens}
        for layer in self.layers:
            hidden_states, residual = layer(hidden_states, residual, inference_params=inference_params,
                                            **mixer_kwargs)
        residual = hidden_states + residual if residual is not None else hidden_states
        return self.norm_f(residual.to(dtype=self.norm_f.weight.dtype))


def sample_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 0.0,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next tokens (batch,) from logits (batch, vocab): greedy when temperature == 0 or top_k == 1;
    else softmax(logits / temperature) restricted to the top_k tokens (top_k > 0) and to the smallest
    set whose probability reaches top_p (0 < top_p < 1), sampled."""
    if temperature == 0 or top_k == 1:
        return logits.argmax(dim=-1)
    if temperature < 0:
        raise ValueError(f"temperature: expected >= 0, got {temperature}")
    logits = logits.float() / temperature
    if top_k > 0:
        k = min(int(top_k), logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(dim=-1) - probs > top_p  # the tokens past the nucleus; the first stays
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


class DecodeStepGraph:
    """One decode step of a model (one token per cache row through every layer's fused step, to the
    last position's logits) captured in a CUDA graph over the cache of `params`: step(tokens)
    copies the tokens (rows, 1) into the graph's input and replays it, which advances the cache in
    place as the eager step does and leaves the logits (rows, padded vocab) in the graph's output
    buffer, overwritten by the next step. Replaying skips the host's per-kernel launch work, which
    bounds a small batch's eager step (docs/modules.md, "Generation and the decode step")."""

    def __init__(self, model: nn.Module, params: InferenceParams, tokens: torch.Tensor):
        self.device = tokens.device
        self.tokens = tokens.clone()
        states = [t for pair in params.key_value_memory_dict.values() for t in pair]
        saved = [t.clone() for t in states]
        # Captured with the model's GPU current.
        with torch.cuda.device(self.device):
            # The warm-up that capture needs (on a side stream, torch.cuda.graphs) runs the step,
            # which advances the cache: it is put back before the capture, which runs nothing.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    model(self.tokens, inference_params=params, num_last_tokens=1)
            torch.cuda.current_stream().wait_stream(side)
            for state, copy in zip(states, saved):
                state.copy_(copy)
            # A capture stream of this device: torch.cuda.graph's default one is made once, on the
            # device current at its first use, and a capture on another device would record nothing.
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, stream=torch.cuda.Stream()):
                self.logits = model(self.tokens, inference_params=params, num_last_tokens=1).logits[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch.cuda.device(self.device):
            self.tokens.copy_(tokens)
            self.graph.replay()
        return self.logits


class MambaLMHeadModel(nn.Module):
    """backbone (MixerModel) and lm_head (tied to backbone.embedding when config.tie_embeddings), the
    vocabulary padded to a multiple of config.pad_vocab_size_multiple.

    forward(input_ids, position_ids=None, inference_params=None, num_last_tokens=0) returns
    CausalLMOutput(logits) with logits (batch, seqlen or num_last_tokens, padded vocab).
    """

    def __init__(self, config: MambaConfig, initializer_cfg: Optional[dict] = None, device=None, dtype=None):
        super().__init__()
        config.validate()
        self.config = config
        factory = {"device": device, "dtype": dtype}
        vocab_size = config.padded_vocab_size()
        self.backbone = MixerModel(
            d_model=config.d_model, n_layer=config.n_layer, vocab_size=vocab_size, ssm_cfg=config.ssm_cfg,
            norm_epsilon=config.norm_epsilon, rms_norm=config.rms_norm, initializer_cfg=initializer_cfg,
            fused_add_norm=config.fused_add_norm, residual_in_fp32=config.residual_in_fp32, **factory)
        self.lm_head = nn.Linear(config.d_model, vocab_size, bias=False, **factory)
        self.apply(partial(_init_weights, n_layer=config.n_layer, **(initializer_cfg or {})))
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int = 0, dtype=None, **kwargs):
        return self.backbone.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, **kwargs)

    def forward(self, input_ids: torch.Tensor, position_ids=None,
                inference_params: Optional[InferenceParams] = None, num_last_tokens: int = 0,
                cu_seqlens: Optional[torch.Tensor] = None):
        hidden_states = self.backbone(input_ids, inference_params=inference_params, cu_seqlens=cu_seqlens)
        if num_last_tokens > 0:
            hidden_states = hidden_states[:, -num_last_tokens:]
        return CausalLMOutput(logits=self.lm_head(hidden_states))

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 0.0, eos_token_id: Optional[int] = None, *,
                 use_cache: bool = True, generator: Optional[torch.Generator] = None,
                 output_logits: bool = False, cuda_graph: bool = False):
        """Extend input_ids (batch, prompt_len) by up to max_new_tokens tokens; input_ids may also be a
        list of prompts (1-D, any lengths >= 1), prefilled together as packed sequences (cu_seqlens)
        and returned as a list of 1-D tensors (prompt + generated).

        With use_cache (default), the prompt is prefilled by the scan and every further token costs
        one fused step per layer from a fixed-size cache: O(1) time and memory per token. With
        use_cache=False the whole sequence is re-run at every step (the reference). Greedy when
        temperature == 0 or top_k == 1. A sequence that emits eos_token_id keeps emitting it; the
        loop ends early once all have. Returns the ids (batch, prompt_len + generated), and with
        output_logits also the logits of each generated position (batch, generated, vocab_size).
        cuda_graph (CUDA, with the cache, not under autocast) captures the decode step once after
        the prefill and replays it for every further token (DecodeStepGraph): the same tokens
        and logits, without the host's launch work per kernel.
        """
        if cuda_graph:
            self._check_cuda_graph(input_ids, use_cache)
        if isinstance(input_ids, (list, tuple)):
            return self._generate_prompts(list(input_ids), max_new_tokens, temperature, top_k, top_p, eos_token_id,
                                          use_cache=use_cache, generator=generator, output_logits=output_logits,
                                          cuda_graph=cuda_graph)
        if input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids: expected shape (batch, prompt_len >= 1), got {tuple(input_ids.shape)}")
        batch, prompt_len = input_ids.shape
        vocab = self.config.vocab_size
        params = InferenceParams(max_seqlen=prompt_len + max_new_tokens, max_batch_size=batch) if use_cache else None
        ids = input_ids
        step_input = input_ids
        finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        all_logits = []
        graph = None
        for _ in range(max_new_tokens):
            if use_cache:
                if cuda_graph and params.seqlen_offset > 0:
                    graph, logits = self._replayed_step(graph, params, step_input, output_logits)
                else:
                    logits = self(step_input, inference_params=params, num_last_tokens=1).logits[:, -1]
                params.seqlen_offset += step_input.shape[1]
            else:
                logits = self(ids, num_last_tokens=1).logits[:, -1]
            token = self._next_token(logits, temperature, top_k, top_p, eos_token_id, generator, finished,
                                     all_logits if output_logits else None)
            ids = torch.cat([ids, token[:, None].to(ids.dtype)], dim=1)
            step_input = ids[:, -1:]
            if eos_token_id is not None and bool(finished.all()):
                break
        if output_logits:
            stacked = torch.stack(all_logits, dim=1) if all_logits else ids.new_zeros((batch, 0, vocab)).float()
            return ids, stacked
        return ids

    @staticmethod
    def _check_cuda_graph(input_ids, use_cache):
        """generate's conditions for cuda_graph=True (input_ids that are not tensors, or an empty
        list, are left to its input checks)."""
        first = input_ids[0] if isinstance(input_ids, (list, tuple)) and input_ids else input_ids
        device = getattr(first, "device", None)
        if device is None:
            return
        if not use_cache or device.type != "cuda":
            raise ValueError(f"cuda_graph: expected use_cache=True and input_ids on a CUDA device, got "
                             f"use_cache={use_cache} and device {device}")
        if torch.is_autocast_enabled("cuda"):
            raise ValueError("cuda_graph: expected no autocast (a captured step would keep autocast's cast "
                             "weights); convert the model instead, e.g. model.to(torch.bfloat16)")

    def _replayed_step(self, graph, params, tokens, output_logits):
        """generate's decode step with cuda_graph: the graph (captured from `tokens` on the first
        step, graph None) and the logits of its replay, copied where they are kept (output_logits),
        since the next replay overwrites them."""
        if graph is None:
            graph = DecodeStepGraph(self, params, tokens)
        logits = graph.step(tokens)
        return graph, (logits.clone() if output_logits else logits)

    def _next_token(self, logits, temperature, top_k, top_p, eos_token_id, generator, finished, all_logits):
        """The next token of each row from its logits (padded vocabulary cut off, kept in all_logits
        when given); rows already finished repeat eos_token_id, and `finished` is updated in place."""
        logits = logits[:, :self.config.vocab_size]
        if all_logits is not None:
            all_logits.append(logits.float())
        token = sample_logits(logits, temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            token = torch.where(finished, torch.full_like(token, eos_token_id), token)
            finished |= token == eos_token_id
        return token

    def _generate_prompts(self, prompts, max_new_tokens, temperature, top_k, top_p, eos_token_id, *, use_cache,
                          generator, output_logits, cuda_graph=False):
        """generate() for a list of prompts of any lengths: with the cache, one packed prefill
        (cu_seqlens) fills one cache row per prompt, then every token is one fused step for all;
        without it, every sequence is re-run whole at every step (the reference). Both sample all
        sequences' next tokens in one call, so they draw the same random numbers."""
        for i, p in enumerate(prompts):
            if not isinstance(p, torch.Tensor) or p.dim() != 1 or p.numel() < 1:
                got = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
                raise ValueError(f"input_ids[{i}]: expected a 1-D tensor of at least one token, got {got}")
        if not prompts:
            raise ValueError("input_ids: expected at least one prompt, got an empty list")
        num = len(prompts)
        lengths = [p.numel() for p in prompts]
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        cu_seqlens = torch.tensor(offsets)
        vocab = self.config.vocab_size
        device = prompts[0].device
        params = InferenceParams(max_seqlen=max(lengths) + max_new_tokens, max_batch_size=num)
        packed = torch.cat(prompts)[None]
        last = torch.tensor(offsets[1:], device=device) - 1
        finished = torch.zeros(num, dtype=torch.bool, device=device)
        tokens, all_logits = [], []
        graph = None
        for step in range(max_new_tokens):
            if not use_cache:  # every sequence re-run whole, alone
                logits = torch.cat([self(torch.cat([p] + [t[i:i + 1] for t in tokens])[None],
                                         num_last_tokens=1).logits[:, -1] for i, p in enumerate(prompts)])
            elif step == 0:
                logits = self(packed, inference_params=params, cu_seqlens=cu_seqlens).logits[0, last]
                params.seqlen_offset += max(lengths)
            elif cuda_graph:
                graph, logits = self._replayed_step(graph, params, tokens[-1][:, None], output_logits)
                params.seqlen_offset += 1
            else:
                logits = self(tokens[-1][:, None], inference_params=params, num_last_tokens=1).logits[:, -1]
                params.seqlen_offset += 1
            token = self._next_token(logits, temperature, top_k, top_p, eos_token_id, generator, finished,
                                     all_logits if output_logits else None)
            tokens.append(token.to(packed.dtype))
            if eos_token_id is not None and bool(finished.all()):
                break
        new = torch.stack(tokens, dim=1) if tokens else packed.new_zeros((num, 0))
        ids = [torch.cat([p, new[i]]) for i, p in enumerate(prompts)]
        if output_logits:
            stacked = torch.stack(all_logits, dim=1) if all_logits else new.new_zeros((num, 0, vocab)).float()
            return ids, stacked
        return ids

    @classmethod
    def from_hf_state_dict(cls, state_dict, hf_config, device=None, dtype=None) -> "MambaLMHeadModel":
        """A model built from a HuggingFace transformers MambaForCausalLM config (an object or dict)
        and state_dict; see selective_scan.nn.hf."""
        from .hf import mamba_config_from_hf, load_hf_mamba_state_dict
        config = mamba_config_from_hf(hf_config)
        model = cls(config, device=device, dtype=dtype)
        model.load_state_dict(load_hf_mamba_state_dict(state_dict, config))
        return model


__all__ = ["MambaConfig", "MixerModel", "MambaLMHeadModel", "CausalLMOutput", "DecodeStepGraph", "create_block",
           "sample_logits"]
