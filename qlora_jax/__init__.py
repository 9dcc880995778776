"""qlora-jax: QLoRA fine-tuning in JAX (4-bit NF4 base weights, LoRA adapters)."""

from qlora_jax.quant import (
    QUANT_TYPES,
    QuantizedArray,
    dequantize,
    from_bnb_state_dict,
    quantize,
    to_bnb_state_dict,
)

from qlora_jax.models.loaders import from_pretrained

__version__ = "0.1.0"

__all__ = [
    "QUANT_TYPES",
    "QuantizedArray",
    "dequantize",
    "from_pretrained",
    "from_bnb_state_dict",
    "quantize",
    "to_bnb_state_dict",
]
