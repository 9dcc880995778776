"""GPU kernels for qlora-jax, installed as ``qlora_jax.kernels``.

This folder is mapped to ``qlora_jax.kernels`` by pyproject's package-dir, so it
never shadows the Hugging Face ``kernels`` package that transformers imports.
The Pallas dequantize and fused dequantize-matmul kernels land here; until
then the plain jnp reference in ``qlora_jax.quant`` is the only backend.
"""
