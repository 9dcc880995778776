"""Decoder models of every registered family: config, decoder, weight loading, generation."""

from qlora_jax.models.blocks import LoraConfig
from qlora_jax.models.config import (LlamaConfig, ModelConfig, RopeScaling, config_from_gguf, from_gguf_metadata,
                                     from_hf_config)
from qlora_jax.models.decoder import CausalLM, init_cache
from qlora_jax.models.decoder import CausalLM as LlamaForCausalLM
from qlora_jax.models.export import load_peft_adapter, save_merged, save_peft_adapter
from qlora_jax.models.family import Family, families, family_of
from qlora_jax.models.generate import generate
from qlora_jax.models.loaders import from_pretrained
from qlora_jax.models.weights import variables_from_tensors

__all__ = [
    "CausalLM",
    "Family",
    "LlamaConfig",
    "LlamaForCausalLM",
    "LoraConfig",
    "ModelConfig",
    "RopeScaling",
    "config_from_gguf",
    "families",
    "family_of",
    "from_gguf_metadata",
    "from_hf_config",
    "from_pretrained",
    "generate",
    "init_cache",
    "load_peft_adapter",
    "save_merged",
    "save_peft_adapter",
    "variables_from_tensors",
]
