"""Blockwise 8-bit quantization with a 256-entry map (bitsandbytes' ``quantize_blockwise``).

Used for double quantization (the 4-bit block scales) and for 8-bit optimizer
state. For a flat float32 vector cut into blocks of ``B`` (last may be short):

    absmax[b] = max_i |x_i|
    s_i       = clip(x_i * (1 / absmax[b]), -1, 1)           (float32)
    t_i       = floor(((s_i + 1) * 0.5) * 65535 + 0.5)        (float32, no FMA)
    q_i       = LUT[t_i]

where ``LUT[k]`` is the index of the map entry nearest the grid point
``-1 + 2k / 65535``: the count of float32 midpoints ``(c[j] + c[j+1]) / 2``
strictly below it. This is bitsandbytes' CPU kernel (>= 0.50): it rounds to the
nearest entry of a 65536-point grid first, so near a midpoint it can pick the
second-nearest code (about 0.1% of uniformly drawn values); matching it is what
byte compatibility means. A block whose absmax is 0 stores code 0.

Shapes: ``q`` is ``(n,)`` uint8, ``absmax`` is ``(nb,)`` float32.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from qlora_jax.quant._fp import rounded
from qlora_jax.quant.blockwise import normalize_blocks, scale_blocks, to_blocks

_GRID = 65536


@functools.cache
def grid_lut(code_bytes: bytes) -> np.ndarray:
    """``(65536,)`` uint8: index of the sorted map entry nearest each grid point (float32 math)."""
    code = np.frombuffer(code_bytes, np.float32)
    mids = np.float32(0.5) * (code[:-1] + code[1:])
    k = np.arange(_GRID, dtype=np.float32)
    grid = np.float32(-1.0) + (np.float32(2.0) * k) / np.float32(_GRID - 1)
    lut = np.searchsorted(mids, grid, side="left").astype(np.uint8)  # count of mids < grid
    lut.setflags(write=False)
    return lut


def grid_index(s: jnp.ndarray) -> jnp.ndarray:
    """``floor(((s + 1) * 0.5) * 65535 + 0.5)`` with each float32 op rounded on its own.

    ``rounded`` keeps the product and the sum apart, so no backend fuses them
    into one FMA (which would round once and move grid boundaries).
    """
    u = (jnp.clip(s, -1.0, 1.0) + np.float32(1.0)) * np.float32(0.5)
    p = rounded(u * np.float32(_GRID - 1))
    return jnp.floor(p + np.float32(0.5)).astype(jnp.int32)


def nearest_code_8bit(s: jnp.ndarray, code: np.ndarray) -> jnp.ndarray:
    """Code index (uint8) of each normalised value ``s`` in [-1, 1], via the grid LUT."""
    lut = jnp.asarray(grid_lut(np.ascontiguousarray(code, np.float32).tobytes()))
    return lut[grid_index(s)]


def quantize_8bit(x: jnp.ndarray, code: np.ndarray, blocksize: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Quantizes ``x`` (any shape) to ``(codes uint8 (n,), absmax f32 (nb,))``."""
    n = x.size
    absmax, s = normalize_blocks(to_blocks(x, blocksize), n, divide_short_block=False)
    q = jnp.where(absmax[:, None] > 0, nearest_code_8bit(s, code), jnp.uint8(0))
    return q.reshape(-1)[:n], absmax


def dequantize_8bit(q: jnp.ndarray, absmax: jnp.ndarray, code: np.ndarray, blocksize: int) -> jnp.ndarray:
    """Inverse of ``quantize_8bit``: float32 ``(n,)`` values ``code[q] * absmax[block]``."""
    values = jnp.asarray(code, jnp.float32)[q.astype(jnp.int32)]
    return scale_blocks(values, absmax, blocksize, q.shape[0])
