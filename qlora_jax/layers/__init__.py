"""Flax QLoRA layers and LoRA tree helpers."""

from qlora_jax.layers.lora import count_weights, merge, split_trainable, trainable_summary
from qlora_jax.layers.qlora_dense import FROZEN, QLoRADense, QuantConfig

__all__ = ["FROZEN", "QLoRADense", "QuantConfig", "count_weights", "merge", "split_trainable", "trainable_summary"]
