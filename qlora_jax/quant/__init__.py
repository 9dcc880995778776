"""Blockwise 4-bit quantization (NF4 / FP4 / INT4) with double quantization."""

from qlora_jax.quant.api import dequantize, quantize
from qlora_jax.quant.bnb import from_bnb_state_dict, to_bnb_state_dict
from qlora_jax.quant.codebooks import QUANT_TYPES, code_table, dynamic_map
from qlora_jax.quant.qarray import QuantizedArray

__all__ = [
    "QUANT_TYPES",
    "QuantizedArray",
    "code_table",
    "dequantize",
    "dynamic_map",
    "from_bnb_state_dict",
    "quantize",
    "to_bnb_state_dict",
]
