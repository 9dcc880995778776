"""DoRA (weight-decomposed LoRA, arXiv 2402.09353) as peft computes it (``LoraConfig(use_dora=True)``).

A DoRA projection keeps LoRA's ``A`` ``(in, r)`` and ``B`` ``(r, out)`` and adds a trainable
magnitude ``m`` ``(out,)``. With the frozen base ``W`` ``(out, in)`` and LoRA's scale ``s``:

    W' = (m / n)[:, None] * (W + s (A B)^T),     n_o = || W[o, :] + s (A B)^T[o, :] ||_2

``n`` is the norm of each output row over the input dimension (peft's ``get_weight_norm``:
``torch.linalg.norm(W + s B_peft A_peft, dim=1)``, the paper's column norm of its
``(in, out)`` layout). As in peft (and the paper's section 4.3) ``n`` is a constant for
autodiff: ``B A`` enters it detached and the norm itself is detached, so no gradient flows
through ``n`` to ``A``, ``B`` or anything else. ``m`` is initialised as peft does, to ``n`` with
``B = 0``: the row norms of the dequantized base (``weight_norm(W)``), so ``W' = W`` at init.

The layer's output, for ``x`` ``(..., in)``, ``y_0 = x W^T`` (no bias) and ``g = m / n``
``(out,)``, exactly as peft's ``DoraLinearVariant`` / ``DoraLinearLayer.forward`` build it on
top of the base output ``y_0 + bias``:

    no dropout, or not training:   y = (y_0 + bias) + [(g - 1) * y_0       + g * s (x A) B]
    dropout while training:        y = (y_0 + bias) + [(g - 1) * (h W^T)   + g * s (h A) B],  h = dropout(x)

so with dropout the base matmul runs a second time, on the dropped input (``dora_delta``).

``weight_norm`` computes ``n`` from the 4-bit base in chunks of rows: ``lax.map`` over chunks
of ``R`` rows dequantizes one ``(R, in)`` float32 block of ``W`` at a time, adds
``s B[:, rows]^T A^T`` and reduces it, so no dequantized copy of ``W`` exists at once (only the
``(ceil(out * in / blocksize),)`` float32 block scales, 1/blocksize of ``W``'s size). ``R`` is a
multiple of ``blocksize / gcd(in, blocksize)``, so a chunk's codes and block scales are
contiguous slices of the packed arrays; rows after the last full chunk form one shorter chunk.
The norm is computed in float32 whatever the compute dtype (peft computes it in the compute
dtype; the two are the same computation at float32).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from qlora_jax.quant import QuantizedArray
from qlora_jax.quant.blockwise import dequantize_4bit

NORM_CHUNK_ELEMENTS = 2**20  # weights dequantized per chunk of the norm: 4 MiB of float32


def chunk_rows(out_features: int, in_features: int, blocksize: int | None = None,
               elements: int = NORM_CHUNK_ELEMENTS) -> int:
    """Rows per chunk: about ``elements / in`` rows, a multiple of ``blocksize / gcd(in, blocksize)``, at most ``out``.

    The multiple makes ``rows * in`` a whole number of quantization blocks (``blocksize``
    ``None``: a float base, any row count).
    """
    if out_features < 1 or in_features < 1 or elements < 1:
        raise ValueError(f"chunk_rows: out={out_features}, in={in_features}, elements={elements} must be >= 1")
    granule = 1 if blocksize is None else blocksize // math.gcd(in_features, blocksize)
    rows = max(granule, elements // in_features // granule * granule)
    return min(rows, out_features)


def _rows(kernel, scales, start, count: int) -> jax.Array:
    """Rows ``start .. start + count`` of the base as ``(count, in)`` float32 (``start`` may be traced)."""
    in_features = kernel.shape[1]
    if not isinstance(kernel, QuantizedArray):
        return jax.lax.dynamic_slice_in_dim(kernel, start, count, axis=0).astype(jnp.float32)
    n, first = count * in_features, start * in_features  # first: a multiple of blocksize (chunk_rows)
    codes = jax.lax.dynamic_slice_in_dim(kernel.codes, first // 2, -(-n // 2))
    block = jax.lax.dynamic_slice_in_dim(scales, first // kernel.blocksize, -(-n // kernel.blocksize))
    return dequantize_4bit(codes, block, kernel.quant_type, kernel.blocksize, n).reshape(count, in_features)


def weight_norm(kernel, a: jax.Array | None = None, b: jax.Array | None = None, scaling: float = 0.0,
                rows: int | None = None) -> jax.Array:
    """``n`` ``(out,)`` float32: ``||W + s (A B)^T||_2`` over each output row, chunked, without gradient.

    ``kernel``: the base ``(out, in)``, a (one-layer) ``QuantizedArray`` or a float array;
    ``a`` ``(in, r)`` and ``b`` ``(r, out)``, or both ``None`` for ``||W||`` (the magnitude's
    init); ``rows``: rows per chunk (default ``chunk_rows``).
    """
    quantized = isinstance(kernel, QuantizedArray)
    if kernel.ndim != 2 or (quantized and kernel.codes.ndim != 1):
        codes = f" with stacked codes {tuple(kernel.codes.shape)}" if quantized else ""
        raise ValueError(f"weight_norm: the base must be one (out, in) matrix, got shape {tuple(kernel.shape)}{codes}")
    out_features, in_features = kernel.shape
    if (a is None) != (b is None):
        raise ValueError("weight_norm: pass both LoRA factors a (in, r) and b (r, out), or neither")
    if a is not None and (a.shape[0] != in_features or b.shape != (a.shape[1], out_features)):
        raise ValueError(f"weight_norm: a {tuple(a.shape)} and b {tuple(b.shape)} do not fit the base "
                         f"(out, in)={tuple(kernel.shape)} as (in, r) and (r, out)")
    rows = min(rows or chunk_rows(out_features, in_features, kernel.blocksize if quantized else None), out_features)
    if quantized and rows < out_features and (rows * in_features) % kernel.blocksize:
        raise ValueError(f"weight_norm: rows={rows} x in={in_features} is not a whole number of "
                         f"{kernel.blocksize}-weight blocks")
    kernel = jax.lax.stop_gradient(kernel)
    scales = kernel.block_scales() if quantized else None
    if a is not None:
        a, b = jax.lax.stop_gradient(a).astype(jnp.float32), jax.lax.stop_gradient(b).astype(jnp.float32)

    def chunk(start, count: int) -> jax.Array:
        w = _rows(kernel, scales, start, count)
        if a is not None:
            b_rows = jax.lax.dynamic_slice_in_dim(b, start, count, axis=1)  # (r, count)
            w = w + scaling * jnp.matmul(b_rows.T, a.T, precision=jax.lax.Precision.HIGHEST)
        return jnp.sqrt(jnp.sum(w * w, axis=1))

    full, tail = divmod(out_features, rows)
    parts = []
    if full:
        parts.append(jax.lax.map(lambda i: chunk(i * rows, rows), jnp.arange(full)).reshape(-1))
    if tail:
        parts.append(chunk(full * rows, tail))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts)


@jax.jit
def stacked_weight_norms(kernel) -> jax.Array:
    """``weight_norm`` of each layer of a layer-stacked base (leaves ``(L, ...)``): ``(L, out)``, a layer at a time."""
    return jax.lax.map(weight_norm, kernel)


def dora_delta(y0: jax.Array, dropped_base: jax.Array | None, lora: jax.Array, magnitude: jax.Array,
               norm: jax.Array) -> jax.Array:
    """DoRA's addition to the base output: ``(g - 1) * base + g * lora`` with ``g = m / stop_gradient(n)``.

    ``y0`` ``(..., out)``: ``x W^T``; ``dropped_base``: ``dropout(x) W^T`` when dropout is active
    (peft's ``base_result = None`` branch), else ``None``; ``lora``: ``s (h A) B``. ``g`` is
    formed in float32 and ``g - 1`` is rounded from it (it is small), then both go to the wider of
    ``y0``'s and ``lora``'s dtypes (float32 with ``fp32_output``), in which the result comes out.
    """
    dt = jnp.promote_types(y0.dtype, lora.dtype)
    g = magnitude.astype(jnp.float32) / jax.lax.stop_gradient(norm).astype(jnp.float32)
    base = y0 if dropped_base is None else dropped_base
    return (g - 1.0).astype(dt) * base.astype(dt) + g.astype(dt) * lora.astype(dt)
