"""Public quantization API: ``quantize`` and ``dequantize`` with input validation.

Validation happens here, in Python, before any tracing; the array math lives in
``blockwise``, ``blockwise8`` and ``double_quant``. Both functions are jit-able:
called on a tracer they skip only the NaN / Inf scan, which needs values.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.quant.blockwise import quantize_4bit
from qlora_jax.quant.codebooks import check_quant_type
from qlora_jax.quant.double_quant import double_quantize
from qlora_jax.quant.qarray import QuantizedArray

SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
_MAX_REPORTED = 5


def check_blocksize(blocksize: int, name: str = "blocksize", low: int = 32, high: int = 4096) -> int:
    """Returns ``blocksize`` if it is a power of two in ``[low, high]``, else raises ``ValueError``."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, (int, np.integer)):
        raise ValueError(f"{name}={blocksize!r} must be an int, a power of two in [{low}, {high}]")
    b = int(blocksize)
    if b < low or b > high or b & (b - 1):
        raise ValueError(f"{name}={b} must be a power of two in [{low}, {high}]")
    return b


def check_weights(w) -> None:
    """Raises ``ValueError`` for empty, non-float or non-finite weights.

    The non-finite scan needs values, so it is skipped for tracers (inside jit).
    """
    dtype = jnp.dtype(w.dtype)
    if dtype.name not in SUPPORTED_DTYPES:
        raise ValueError(f"cannot quantize dtype {dtype}: supported float dtypes are {SUPPORTED_DTYPES}")
    if w.size == 0:
        raise ValueError(f"cannot quantize an empty array (shape {tuple(w.shape)})")
    if isinstance(w, jax.core.Tracer):
        return
    bad = ~jnp.isfinite(w)
    count = int(jnp.sum(bad))
    if count:
        where = np.argwhere(np.asarray(bad))[:_MAX_REPORTED]
        values = np.asarray(w)[tuple(where.T)]
        first = ", ".join(f"{tuple(int(i) for i in idx)}={v}" for idx, v in zip(where, values))
        raise ValueError(
            f"cannot quantize weights with NaN or Inf: {count} of {w.size} values in shape "
            f"{tuple(w.shape)} are not finite (first at {first})"
        )


def quantize(
    w,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    nested_blocksize: int = 256,
) -> QuantizedArray:
    """Blockwise 4-bit quantization of a float array, byte-compatible with bitsandbytes.

    Args:
      w: float32 / bfloat16 / float16 array of any non-empty shape; blocks of
        ``blocksize`` run over its row-major flattening (as bnb's).
      quant_type: "nf4", "fp4" or "int4".
      blocksize: weights per float32 scale, a power of two in [32, 4096].
      double_quant: quantize the block scales to 8 bits, in blocks of
        ``nested_blocksize`` (a power of two in [64, 4096]).

    Returns a ``QuantizedArray`` on the device ``w`` lives on.
    """
    check_quant_type(quant_type)
    blocksize = check_blocksize(blocksize)
    if double_quant:
        nested_blocksize = check_blocksize(nested_blocksize, "nested_blocksize", low=64)
    if not hasattr(w, "dtype") or not hasattr(w, "shape"):
        w = np.asarray(w)
    check_weights(w)
    return _quantize_jit(w, quant_type, blocksize, nested_blocksize if double_quant else None)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _quantize_jit(w, quant_type: str, blocksize: int, nested_blocksize: int | None) -> QuantizedArray:
    codes, absmax = quantize_4bit(w, quant_type, blocksize)
    nested_scale = offset = None
    if nested_blocksize is not None:
        absmax, nested_scale, offset = double_quantize(absmax, nested_blocksize)
    return QuantizedArray(
        codes=codes,
        absmax=absmax,
        nested_scale=nested_scale,
        offset=offset,
        shape=tuple(int(d) for d in w.shape),
        dtype=jnp.dtype(w.dtype).name,
        blocksize=blocksize,
        quant_type=quant_type,
        nested_blocksize=nested_blocksize,
    )


def dequantize(q: QuantizedArray, dtype=jnp.bfloat16) -> jax.Array:
    """``q`` back to a dense array of ``q.shape`` in ``dtype`` (bf16 by default)."""
    if not isinstance(q, QuantizedArray):
        raise ValueError(f"dequantize expects a QuantizedArray, got {type(q).__name__}")
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dequantize dtype must be a float dtype, got {dtype}")
    return _dequantize_jit(q, dtype)


@functools.partial(jax.jit, static_argnums=(1,))
def _dequantize_jit(q: QuantizedArray, dtype) -> jax.Array:
    return q.dequantize(dtype)
