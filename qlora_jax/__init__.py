"""qlora-jax: QLoRA fine-tuning in JAX (4-bit NF4 base weights, LoRA adapters)."""

from qlora_jax.quant import (
    QUANT_TYPES,
    QuantizedArray,
    dequantize,
    from_bnb_state_dict,
    quantize,
    to_bnb_state_dict,
)

__version__ = "0.1.0"

__all__ = [
    "QUANT_TYPES",
    "QuantizedArray",
    "dequantize",
    "from_bnb_state_dict",
    "quantize",
    "to_bnb_state_dict",
]
