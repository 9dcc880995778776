"""Decoder models of every registered family: config, decoder, weight loading, generation."""

from qlora_jax.models.blocks import LoraConfig
from qlora_jax.models.config import (LlamaConfig, ModelConfig, RopeScaling, config_from_gguf, from_gguf_metadata,
                                     from_hf_config)
from qlora_jax.models.decoder import CausalLM, init_cache
from qlora_jax.models.decoder import CausalLM as LlamaForCausalLM
from qlora_jax.models.export import load_peft_adapter, save_merged, save_peft_adapter
from qlora_jax.models.family import Family, families, family_of
from qlora_jax.models.gguf_export import save_gguf
from qlora_jax.models.generate import complete, generate, generate_batch, stream, stream_text
from qlora_jax.models.loaders import from_pretrained
from qlora_jax.models.sampling import SamplingConfig
from qlora_jax.models.weights import variables_from_tensors

__all__ = [
    "CausalLM",
    "Family",
    "LlamaConfig",
    "LlamaForCausalLM",
    "LoraConfig",
    "ModelConfig",
    "RopeScaling",
    "SamplingConfig",
    "complete",
    "config_from_gguf",
    "families",
    "family_of",
    "from_gguf_metadata",
    "from_hf_config",
    "from_pretrained",
    "generate",
    "generate_batch",
    "init_cache",
    "load_peft_adapter",
    "save_gguf",
    "save_merged",
    "save_peft_adapter",
    "stream",
    "stream_text",
    "variables_from_tensors",
]
