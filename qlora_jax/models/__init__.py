"""Llama-family model configuration (the decoder and loaders follow)."""

from qlora_jax.models.config import LlamaConfig, RopeScaling, config_from_gguf, from_gguf_metadata, from_hf_config

__all__ = ["LlamaConfig", "RopeScaling", "config_from_gguf", "from_gguf_metadata", "from_hf_config"]
