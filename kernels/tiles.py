"""In-kernel building blocks: turn a tile of packed 4-bit codes into floats.

Shared by the dequantize and the fused matmul kernels, and written only with
ops the Pallas Triton lowering compiles: shifts, masks, ``where`` over constants,
``broadcast``+``reshape``, and gathers from a *ref* (pointer loads); never a gather
from (indexing) a loaded vector, which does not lower to Triton
(``tests/kernels`` lower every kernel for an abstract H200 on the CPU, which checks it).

Math, per tile of ``r`` rows and ``c`` weights per row (``c`` a multiple of the
quantization block ``B``):

    codes  (r, c/2) uint8, element 2j in the high nibble, 2j+1 in the low one
    raw    (r, c/B) float32 block scales, or uint8 codes of the 8-bit dynamic map
    scale  = raw                                         (plain)
    scale  = round_f32(map[raw] * nested[b // B2]) + offset   (double quant; b is
             the block's index in the flat tensor, two roundings as bitsandbytes)
    w[i,k] = table[nibble[i,k]] * scale[i, k // B]       (float32, then one
             rounding to the output dtype: bit-equal to ``QuantizedArray.dequantize``)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.quant.codebooks import select_lookup

LOOKUPS = ("select", "gather")


def unpack_nibbles(codes: jax.Array) -> jax.Array:
    """``(r, c/2)`` uint8 -> ``(r, c)`` int32 nibbles, high nibble first."""
    wide = codes.astype(jnp.int32)
    r, half = wide.shape
    return jnp.stack([wide >> 4, wide & 0xF], axis=-1).reshape(r, 2 * half)


def code_values(nibbles: jax.Array, quant_type: str, lookup: str, table_ref) -> jax.Array:
    """Float32 code values of ``nibbles``: by select tree, or by a gather from the 16-entry ``table_ref``."""
    if lookup == "gather":
        return table_ref[nibbles]
    return select_lookup(nibbles, quant_type)


def expand_scales(scales: jax.Array, blocksize: int) -> jax.Array:
    """``(r, c/B)`` -> ``(r, c)``: each block scale repeated over its ``B`` weights."""
    r, nblocks = scales.shape
    return jnp.broadcast_to(scales[:, :, None], (r, nblocks, blocksize)).reshape(r, nblocks * blocksize)


def double_dequant_scales(raw, block_index, nested_ref, offset_ref, dmap_ref, nested_blocksize: int):
    """Block scales from their 8-bit codes: ``round(map[raw] * nested[b // B2]) + offset``.

    ``block_index`` holds each block's index in the flat tensor (same shape as
    ``raw``). The select on ``p == p`` keeps the compiler from fusing the
    multiply and add into one FMA (one rounding instead of bitsandbytes' two).
    """
    code = dmap_ref[raw.astype(jnp.int32)]
    product = code * nested_ref[block_index // nested_blocksize]
    product = jnp.where(product == product, product, jnp.zeros_like(product))
    return product + offset_ref[0]


def dequant_tile(codes, scales, *, quant_type: str, blocksize: int, lookup: str, table_ref, dtype):
    """``(r, c/2)`` codes and ``(r, c/B)`` float32 scales -> ``(r, c)`` weights in ``dtype``."""
    values = code_values(unpack_nibbles(codes), quant_type, lookup, table_ref)
    return (values * expand_scales(scales, blocksize)).astype(dtype)
