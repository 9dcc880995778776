"""Optional jax-triton backend of the fused 4-bit matmul (GPU only, imported lazily).

The same math as ``fused_matmul`` (see ``tiles`` for the decode), written
directly in Triton and launched with ``jax_triton.triton_call``. It addresses
whole tiles with ``tl.join`` / ``tl.reshape`` and takes the code table as 16
scalar arguments (``triton_src`` says why).

    forward     y[s] = sum_{k in split s} x[:, k] * W[:, k].T      grid (cdiv(M, BM), N / BN, split)
    transposed dx[s] = sum_{n in split s} dy[:, n] * W[n, :]       grid (cdiv(M, BM), K / BK, split)

jax-triton is not a dependency: ``check_available`` raises a ``ValueError`` that
says what is missing, and nothing imports this module's Triton half unless
``backend="triton"`` is asked for. CPU tests run the same kernels in Triton's
interpreter (``TRITON_INTERPRET=1``) on torch tensors (tests/kernels/test_triton_interpret.py).
"""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.kernels import compat
from qlora_jax.kernels.fused_matmul import MatmulBlockSizes
from qlora_jax.kernels.operands import operands
from qlora_jax.quant.codebooks import code_table


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


def build_kernels():
    """The two ``triton.jit`` kernels ``(forward, transposed)``; imports triton on first use."""
    from qlora_jax.kernels import triton_src

    return triton_src.forward, triton_src.transposed


def launch_config(m: int, q, transpose: bool, block_sizes: MatmulBlockSizes | None):
    """Grid, tiles and constexpr meta-parameters shared by the jax-triton and interpreter launches."""
    n, k = q.shape
    bs = block_sizes or MatmulBlockSizes.get_default(m, n, k, q.blocksize, transpose)
    bs.check(m, n, k, q.blocksize, transpose)
    steps = (n // bs.block_n if transpose else k // bs.block_k) // bs.split
    grid = (-(-m // bs.block_m), k // bs.block_k if transpose else n // bs.block_n, bs.split)
    meta = dict(STEPS=steps, BM=bs.block_m, BN=bs.block_n, BK=bs.block_k, B=q.blocksize,
                B2=q.nested_blocksize or 1, DOUBLE=q.double_quant)
    return bs, grid, meta


def table_scalars(quant_type: str) -> list[np.float32]:
    """The 16 code values, passed to the kernels as scalars ``T0..T15`` (their select tree)."""
    return [np.float32(v) for v in code_table(quant_type)]


def call_inputs(lhs, q) -> tuple:
    """The kernels' inputs in parameter order: ``lhs``, the weight's arrays, ``M, N, K`` and ``T0..T15``."""
    n, k = q.shape
    codes, scales, nested, offset, dmap, _ = operands(q, n).arrays()
    return (lhs, codes, scales, nested, offset, dmap, lhs.shape[0], n, k, *table_scalars(q.quant_type))


def matmul_2d(lhs, q, *, transpose: bool, block_sizes: MatmulBlockSizes | None = None):
    """``lhs @ W.T`` (``lhs (M, K)``) or, with ``transpose``, ``lhs @ W`` (``lhs (M, N)``) via jax-triton."""
    import jax_triton as jt

    n, k = q.shape
    m = lhs.shape[0]
    bs, grid, meta = launch_config(m, q, transpose, block_sizes)
    out_cols = k if transpose else n
    out_dtype = jnp.float32 if bs.split > 1 else lhs.dtype
    kernel = build_kernels()[1 if transpose else 0]
    out = jt.triton_call(
        *call_inputs(lhs, q),  # jax-triton passes the output pointer after these (triton_src)
        kernel=kernel,
        out_shape=jax.ShapeDtypeStruct((bs.split, m, out_cols), out_dtype),
        grid=grid, num_warps=bs.num_warps, num_stages=bs.num_stages,
        PRECISION="ieee" if lhs.dtype == jnp.float32 else "tf32",
        **meta,
    )
    return out[0] if bs.split == 1 else jnp.sum(out, axis=0).astype(lhs.dtype)
