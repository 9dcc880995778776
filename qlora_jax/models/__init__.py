"""Llama-family models: config, decoder, weight loading, generation."""

from qlora_jax.models.config import LlamaConfig, RopeScaling, config_from_gguf, from_gguf_metadata, from_hf_config
from qlora_jax.models.export import load_peft_adapter, save_merged, save_peft_adapter
from qlora_jax.models.generate import generate
from qlora_jax.models.loaders import from_pretrained
from qlora_jax.models.llama import LlamaForCausalLM, LoraConfig, init_cache
from qlora_jax.models.weights import variables_from_tensors

__all__ = [
    "LlamaConfig",
    "LlamaForCausalLM",
    "LoraConfig",
    "RopeScaling",
    "config_from_gguf",
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
