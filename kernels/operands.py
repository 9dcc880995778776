"""The arrays a kernel reads, as free reshapes of a ``QuantizedArray``'s leaves.

The kernels keep bitsandbytes' byte layout: no conversion at load time, so the
same leaves serve the jnp reference, the kernels and bnb / PEFT export. For a
weight ``(N, K)`` with ``K % B == 0`` each row of ``K`` weights is ``K/2``
contiguous bytes and ``K/B`` scales, so a ``(bn, bk)`` tile is ``bn`` runs of
``bk/2`` contiguous bytes (128 bytes, one cache line, at ``bk = 256``).

Double-quantized scales stay 8-bit in memory; the kernels decode them per tile
(``tiles.double_dequant_scales``), so a weight costs 4.127 bits of reads, not
4.5 (float32 scales) or more.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.quant import QuantizedArray
from qlora_jax.quant.codebooks import code_table, dynamic_map

# The largest quantization block a kernel tile holds (bk is a multiple of it).
MAX_KERNEL_BLOCKSIZE = 256


@dataclasses.dataclass(frozen=True)
class Operands:
    """Kernel inputs: ``codes (rows, cols/2) u8``, ``scales (rows, cols/B)``, and the decode tables.

    ``nested`` ``(nb2,)`` f32, ``offset`` ``(1,)`` f32 and ``dmap`` ``(256,)`` f32
    are placeholders of one element when the scales are plain float32; ``table``
    is the ``(16,)`` float32 code table (read by the "gather" lookup).
    """

    codes: jax.Array
    scales: jax.Array
    nested: jax.Array
    offset: jax.Array
    dmap: jax.Array
    table: jax.Array

    def arrays(self) -> tuple[jax.Array, ...]:
        return (self.codes, self.scales, self.nested, self.offset, self.dmap, self.table)


jax.tree_util.register_dataclass(Operands, data_fields=[f.name for f in dataclasses.fields(Operands)], meta_fields=[])


def matrix_unsupported_reason(q: QuantizedArray) -> str | None:
    """Why the tiled kernels cannot take ``q`` as an ``(N, K)`` matrix, or None if they can."""
    if q.ndim != 2:
        return f"the kernels need a 2-D (out, in) weight, got shape {q.shape}"
    n, k = q.shape
    if q.blocksize > MAX_KERNEL_BLOCKSIZE:
        return f"blocksize={q.blocksize} is larger than the kernels' {MAX_KERNEL_BLOCKSIZE}"
    if k % q.blocksize:
        return f"in_features={k} is not a multiple of blocksize={q.blocksize} (blocks would straddle rows)"
    if n % 16:
        return f"out_features={n} is not a multiple of 16 (the smallest kernel tile)"
    return None


def flat_unsupported_reason(q: QuantizedArray) -> str | None:
    """Why the dequantize kernel cannot take ``q`` (viewed as rows of one block), or None."""
    if q.size % q.blocksize:
        return f"size={q.size} is not a multiple of blocksize={q.blocksize} (a short last block)"
    if q.blocksize > MAX_KERNEL_BLOCKSIZE:
        return f"blocksize={q.blocksize} is larger than the kernels' {MAX_KERNEL_BLOCKSIZE}"
    return None


def operands(q: QuantizedArray, rows: int) -> Operands:
    """``q``'s leaves viewed as ``rows`` rows (``rows = N`` for a matrix, ``num_blocks`` for flat)."""
    cols = q.size // rows
    one = jnp.zeros((1,), jnp.float32)
    if q.double_quant:
        nested, offset = q.nested_scale, jnp.reshape(q.offset, (1,)).astype(jnp.float32)
        dmap = jnp.asarray(dynamic_map(signed=True), jnp.float32)
    else:
        nested, offset, dmap = one, one, one
    return Operands(
        codes=q.codes.reshape(rows, cols // 2),
        scales=q.absmax.reshape(rows, cols // q.blocksize),
        nested=nested,
        offset=offset,
        dmap=dmap,
        table=jnp.asarray(np.asarray(code_table(q.quant_type)), jnp.float32),
    )
