"""4-bit kernels, installed as ``qlora_jax.kernels`` (never as a top-level ``kernels``).

This folder is mapped to ``qlora_jax.kernels`` by pyproject's package-dir, so it
never shadows the Hugging Face ``kernels`` package that transformers imports.

* ``quantized_matmul``: the one entry point ``QLoRADense`` calls, with backends
  ``auto | xla | pallas | pallas_unfused | triton`` (``kernels.matmul``).
* ``dequantize``: 4-bit -> bf16/fp16/fp32 on any backend (``pallas_dequantize`` is the kernel).
* Tile dataclasses ``MatmulBlockSizes`` and ``DequantBlockSizes`` with ``get_default``.
"""

from qlora_jax.kernels.dequantize import DequantBlockSizes, dequantize, pallas_dequantize
from qlora_jax.kernels.fused_matmul import MatmulBlockSizes
from qlora_jax.kernels.matmul import (AUTO_FUSED_MAX_M, BACKENDS, check_backend, quantized_matmul, resolve_backend,
                                      transposed_matmul)

__all__ = [
    "AUTO_FUSED_MAX_M",
    "BACKENDS",
    "DequantBlockSizes",
    "MatmulBlockSizes",
    "check_backend",
    "dequantize",
    "pallas_dequantize",
    "quantized_matmul",
    "resolve_backend",
    "transposed_matmul",
]
