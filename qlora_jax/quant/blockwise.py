"""Blockwise 4-bit quantization in plain jnp: the reference every kernel matches.

Layout (bitsandbytes-compatible). A tensor of ``n`` elements is flattened in
row-major order and cut into ``nb = ceil(n / B)`` blocks of ``B`` elements
(the last one may be short). Per block ``b``:

    absmax[b] = max_i |w_i|                              (float32)
    s_i       = clip(w_i * (1 / absmax[b]), -1, 1)      (full blocks)
    s_i       = clip(w_i / absmax[b], -1, 1)            (the short last block)
    q_i       = nearest code index to s_i

where an all-zero block stores the code of 0.0 (NF4 index 7, bitsandbytes' CPU
path; its CUDA path writes 0, which dequantizes to the same zeros). For "nf4" and
"fp4", ties go to the lower code; "int4" rounds ``7 * s`` half to even. Codes
are packed two per byte, element ``2j`` in the high nibble and ``2j + 1`` in the
low one; an odd count is padded with the code of 0.0. Dequantization is ``code[q_i] * absmax[b]`` in
float32, then one rounding to the output dtype.

Shapes: ``packed`` is ``(ceil(n / 2),)`` uint8, ``absmax`` is ``(nb,)`` float32.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from qlora_jax.quant._fp import true_divide
from qlora_jax.quant.codebooks import select_lookup, sorted_bounds


def num_blocks(n: int, blocksize: int) -> int:
    """Number of scale blocks for ``n`` elements: ``ceil(n / blocksize)``."""
    return -(-n // blocksize)


def to_blocks(x: jnp.ndarray, blocksize: int) -> jnp.ndarray:
    """Flattens ``x`` to float32 and zero-pads it into ``(nb, blocksize)`` rows."""
    flat = jnp.ravel(x).astype(jnp.float32)
    n = flat.shape[0]
    pad = num_blocks(n, blocksize) * blocksize - n
    return jnp.pad(flat, (0, pad)).reshape(-1, blocksize)


def normalize_blocks(blocks: jnp.ndarray, n: int, divide_short_block: bool) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Per-block absmax and values scaled into [-1, 1], with bnb's exact arithmetic.

    Blocks multiply by the float32 reciprocal of their absmax. With
    ``divide_short_block`` a short last block divides by it instead (bnb's 4-bit
    path does the two differently, and the last bit of ``s`` decides ties; its
    8-bit path multiplies everywhere). An all-zero block scales to zeros: bnb
    clamps its absmax to 1e-38, a subnormal that XLA flushes to zero, so it is
    special-cased. Zero padding never changes an absmax.
    """
    blocksize = blocks.shape[1]
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    nonzero = absmax > 0
    safe = jnp.where(nonzero, absmax, np.float32(1.0))
    scaled = blocks * (np.float32(1.0) / safe)[:, None]
    if divide_short_block and n % blocksize:
        scaled = scaled.at[-1].set(true_divide(blocks[-1], safe[-1]))
    scaled = jnp.where(nonzero[:, None], scaled, np.float32(0.0))
    return absmax, jnp.clip(scaled, -1.0, 1.0)


def scale_blocks(values: jnp.ndarray, absmax: jnp.ndarray, blocksize: int, n: int) -> jnp.ndarray:
    """``values[i] * absmax[i // blocksize]`` in float32 for the first ``n`` values, shape ``(n,)``."""
    nb = absmax.shape[0]
    values = jnp.pad(values[:n], (0, nb * blocksize - n)).reshape(nb, blocksize)
    return (values * absmax[:, None]).reshape(-1)[:n]


def nearest_code_4bit(scaled: jnp.ndarray, quant_type: str) -> jnp.ndarray:
    """Nibble (uint8, 0..15) of the code nearest to each value of ``scaled``.

    ``int4`` rounds ``7 * s`` half-to-even and clips to [-8, 7] (stored + 8);
    ``nf4`` / ``fp4`` count the float32 midpoints strictly below ``s``, so a value
    on a midpoint takes the lower code, exactly as ``torch.bucketize`` in bnb.
    """
    if quant_type == "int4":
        q = jnp.clip(jnp.round(scaled * np.float32(7.0)), -8.0, 7.0) + 8.0
        return q.astype(jnp.uint8)
    bounds, order = sorted_bounds(quant_type)
    pos = jnp.zeros(scaled.shape, jnp.int32)
    for b in bounds:  # 15 compares that XLA fuses into one elementwise loop
        pos = pos + (scaled > b).astype(jnp.int32)
    if quant_type == "nf4":  # the NF4 table is already sorted
        return pos.astype(jnp.uint8)
    return jnp.asarray(order)[pos]


def pack_nibbles(codes: jnp.ndarray) -> jnp.ndarray:
    """``(2m,)`` nibbles -> ``(m,)`` bytes, the first element in the high nibble."""
    pairs = codes.reshape(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_nibbles(packed: jnp.ndarray) -> jnp.ndarray:
    """``(m,)`` bytes -> ``(2m,)`` nibbles (uint8), high nibble first."""
    return jnp.stack([packed >> 4, packed & 0xF], axis=-1).reshape(-1)


def quantize_4bit(x: jnp.ndarray, quant_type: str, blocksize: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Quantizes ``x`` (any shape, float) to ``(packed uint8 (ceil(n/2),), absmax f32 (nb,))``."""
    n = x.size
    absmax, scaled = normalize_blocks(to_blocks(x, blocksize), n, divide_short_block=True)
    codes = nearest_code_4bit(scaled, quant_type).reshape(-1)
    codes = codes[: n + (n % 2)]  # keep one padding code when n is odd, as bnb
    return pack_nibbles(codes), absmax


def dequantize_4bit(
    packed: jnp.ndarray, absmax: jnp.ndarray, quant_type: str, blocksize: int, n: int
) -> jnp.ndarray:
    """Inverse of ``quantize_4bit``: float32 ``(n,)`` values ``code[q] * absmax``."""
    values = select_lookup(unpack_nibbles(packed), quant_type, anchor=absmax)
    return scale_blocks(values, absmax, blocksize, n)
