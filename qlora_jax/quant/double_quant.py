"""Double quantization: the float32 block scales themselves stored in 8 bits.

As bitsandbytes' ``compress_statistics=True``: with ``absmax`` the ``(nb,)``
float32 block scales of a 4-bit tensor,

    offset           = mean(absmax)                                  (float32)
    q2, scale2       = quantize_8bit(absmax - offset, DYNAMIC_SIGNED, B2)
    absmax'          = DYNAMIC_SIGNED[q2] * scale2[b // B2] + offset

with ``B2 = 256`` by default: 8 bits per block plus 32 bits per ``B2`` blocks,
so an NF4 weight at block 64 costs ``4 + 8/64 + 32/(64*256) = 4.127`` bits.

The mean is a float32 sum divided by the count, as ``torch.mean``; the order of
that sum is the backend's. bnb's own offset comes from torch's float32 cascade
sum, whose order depends on the CPU's vector width and thread count (and is
different again on CUDA), so the two offsets can differ in the last bits. Any
offset is a valid one: it is stored, not re-derived. Given the same offset the
stored bytes are identical to bnb's (tests/quant/test_bnb_oracle.py).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from qlora_jax.quant._fp import rounded
from qlora_jax.quant.blockwise8 import dequantize_8bit, quantize_8bit
from qlora_jax.quant.codebooks import dynamic_map


def scale_offset(absmax: jnp.ndarray) -> jnp.ndarray:
    """``mean(absmax)``: a float32 sum divided by the count, as ``torch.mean`` does."""
    return jnp.sum(absmax, dtype=jnp.float32) / np.float32(absmax.shape[0])


def double_quantize(
    absmax: jnp.ndarray, nested_blocksize: int, offset: jnp.ndarray | None = None
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """``(nb,)`` float32 scales -> ``(q2 uint8 (nb,), scale2 f32 (ceil(nb/B2),), offset f32 ())``.

    ``offset`` defaults to ``scale_offset(absmax)``; passing one (e.g. bnb's) pins it.
    """
    offset = scale_offset(absmax) if offset is None else jnp.asarray(offset, jnp.float32)
    q2, scale2 = quantize_8bit(absmax - offset, dynamic_map(signed=True), nested_blocksize)
    return q2, scale2, offset


def double_dequantize(
    q2: jnp.ndarray, scale2: jnp.ndarray, offset: jnp.ndarray, nested_blocksize: int
) -> jnp.ndarray:
    """Inverse of ``double_quantize``: the ``(nb,)`` float32 block scales.

    The product is rounded before the offset is added (two roundings, as bnb):
    ``rounded`` stops XLA from contracting the two into one FMA.
    """
    scaled = dequantize_8bit(q2, scale2, dynamic_map(signed=True), nested_blocksize)
    return rounded(scaled) + offset
