"""Optimizers for QLoRA: host-offloaded optax state, 8-bit blockwise AdamW, the default chain."""

from qlora_jax.optim.adamw8bit import QuantizedMoment, ScaleByAdam8bitState, adamw_8bit, scale_by_adam_8bit
from qlora_jax.optim.chain import SCHEDULES, OptimizerConfig, make_optimizer, make_schedule
from qlora_jax.optim.offload import OffloadState, host_shardings, offload_to_host, to_memory, top_level_group

__all__ = [
    "SCHEDULES",
    "QuantizedMoment",
    "ScaleByAdam8bitState",
    "adamw_8bit",
    "scale_by_adam_8bit",
    "OffloadState",
    "OptimizerConfig",
    "host_shardings",
    "make_optimizer",
    "make_schedule",
    "offload_to_host",
    "to_memory",
    "top_level_group",
]
