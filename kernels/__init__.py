"""Matmul with 4-bit weights, installed as ``qlora_jax.kernels``.

This folder is mapped to ``qlora_jax.kernels`` by pyproject's package-dir, so it
never shadows the Hugging Face ``kernels`` package that transformers imports.
Today the one backend is the plain jnp reference (``"xla"``); the Pallas
dequantize and fused dequantize-matmul kernels plug into the same entry point.
"""

from qlora_jax.kernels.matmul import BACKENDS, quantized_matmul

__all__ = ["BACKENDS", "quantized_matmul"]
