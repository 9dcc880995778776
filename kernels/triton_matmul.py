"""Optional jax-triton backend of the fused 4-bit matmul (GPU only, imported lazily).

jax-triton is not a dependency: ``check_available`` raises a ``ValueError`` that
says what is missing, and nothing else in the package imports this module
unless ``backend="triton"`` is asked for.
"""

from __future__ import annotations

import importlib.util

from qlora_jax.kernels import compat


def check_available() -> None:
    """Raises ``ValueError`` unless jax-triton imports and a GPU backend is active."""
    if importlib.util.find_spec("jax_triton") is None:
        raise ValueError("backend='triton' needs the optional jax-triton package (pip install 'qlora-jax[gpu]')")
    if not compat.on_gpu():
        raise ValueError("backend='triton' runs only on a GPU backend; use 'pallas' (interpret mode on CPU) or 'xla'")
    try:
        import jax_triton  # noqa: F401
    except Exception as e:  # jax-triton refuses to import without a CUDA jaxlib, for one
        raise ValueError(f"backend='triton': jax-triton failed to import: {e}") from e


def matmul_2d(lhs, q, *, transpose: bool, block_sizes=None):
    raise NotImplementedError("the jax-triton fused matmul is not written yet; use backend='pallas'")
