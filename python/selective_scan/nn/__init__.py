"""selective_scan.nn: the scan as a module, the Mamba-1 block, the Mamba language model with
mamba-ssm's parameter names, its O(1)-per-token inference cache and generation, and the
HuggingFace checkpoint converter. See docs/modules.md."""
from .block import Block, RMSNorm
from .cache import InferenceParams
from .hf import from_hf_state_dict, load_hf_mamba_state_dict, mamba_config_from_hf
from .mamba import Mamba, dt_bias_init
from .model import (CausalLMOutput, DecodeStepGraph, MambaConfig, MambaLMHeadModel, MixerModel, create_block,
                    sample_logits)
from .scan import SelectiveScan, causal_conv1d_step, causal_conv1d_varlen, last_inputs_varlen

__all__ = ["SelectiveScan", "causal_conv1d_step", "causal_conv1d_varlen", "last_inputs_varlen", "Mamba",
           "dt_bias_init", "Block", "RMSNorm", "InferenceParams", "MambaConfig", "MixerModel", "MambaLMHeadModel", "CausalLMOutput",
           "DecodeStepGraph", "create_block", "sample_logits", "load_hf_mamba_state_dict", "from_hf_state_dict",
           "mamba_config_from_hf"]
