"""``QuantizedArray``: a 4-bit tensor as a JAX pytree.

Leaves (arrays, live on any device, shard and donate like any pytree leaf):

* ``codes``: ``(ceil(n / 2),)`` uint8, two 4-bit codes per byte over the
  row-major flattened tensor, element ``2j`` in the high nibble.
* ``absmax``: ``(nb,)`` block scales, ``nb = ceil(n / blocksize)``; float32, or
  uint8 codes of the dynamic 8-bit map when double-quantized.
* ``nested_scale``: ``(ceil(nb / nested_blocksize),)`` float32, or ``None``.
* ``offset``: ``()`` float32 mean of the block scales, or ``None``.

Static metadata (part of the treedef, so ``jit`` specialises on it):
``shape``, ``dtype`` (name of the original float dtype), ``blocksize``,
``quant_type`` and ``nested_blocksize`` (``None`` without double quantization).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from qlora_jax.quant.blockwise import dequantize_4bit
from qlora_jax.quant.double_quant import double_dequantize


@dataclasses.dataclass(frozen=True)
class QuantizedArray:
    """A blockwise 4-bit (NF4 / FP4 / INT4) tensor; see the module docstring."""

    codes: jax.Array
    absmax: jax.Array
    nested_scale: jax.Array | None
    offset: jax.Array | None
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    dtype: str = dataclasses.field(metadata=dict(static=True))
    blocksize: int = dataclasses.field(metadata=dict(static=True))
    quant_type: str = dataclasses.field(metadata=dict(static=True))
    nested_blocksize: int | None = dataclasses.field(metadata=dict(static=True))

    @property
    def size(self) -> int:
        """Number of quantized weights, ``prod(shape)``."""
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def double_quant(self) -> bool:
        """True when the block scales are themselves 8-bit quantized."""
        return self.nested_blocksize is not None

    @property
    def num_blocks(self) -> int:
        return self.absmax.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of every stored leaf (codes, scales, nested scales, offset)."""
        leaves = jax.tree_util.tree_leaves(self)
        return sum(leaf.size * jnp.dtype(leaf.dtype).itemsize for leaf in leaves)

    @property
    def stacked(self) -> int:
        """How many tensors of ``shape`` the leaves hold: 1, or ``L`` for a layer-stacked array (leaves ``(L, ...)``)."""
        return math.prod(self.codes.shape[:-1])

    @property
    def bits_per_weight(self) -> float:
        """Storage cost per weight: ``8 * nbytes / (stacked * size)`` (4.127 for nf4 + double quant, block 64)."""
        return 8.0 * self.nbytes / (self.stacked * self.size)

    def block_scales(self) -> jax.Array:
        """The ``(nb,)`` float32 block scales, undoing double quantization if present."""
        if not self.double_quant:
            return self.absmax
        return double_dequantize(self.absmax, self.nested_scale, self.offset, self.nested_blocksize)

    def dequantize(self, dtype=jnp.bfloat16) -> jax.Array:
        """The tensor in ``dtype``: ``code[q] * absmax`` in float32, rounded once."""
        flat = dequantize_4bit(self.codes, self.block_scales(), self.quant_type, self.blocksize, self.size)
        return flat.reshape(self.shape).astype(dtype)

    def __repr__(self) -> str:
        nested = f", nested_blocksize={self.nested_blocksize}" if self.double_quant else ""
        arrays = all(hasattr(leaf, "dtype") and hasattr(leaf, "size") for leaf in jax.tree_util.tree_leaves(self))
        bits = f", bits_per_weight={self.bits_per_weight:.3f}" if arrays else ""  # leaves may be mapped objects
        return (
            f"QuantizedArray(shape={self.shape}, dtype={self.dtype}, quant_type={self.quant_type!r}, "
            f"blocksize={self.blocksize}{nested}{bits})"
        )


jax.tree_util.register_dataclass(
    QuantizedArray,
    data_fields=["codes", "absmax", "nested_scale", "offset"],
    meta_fields=["shape", "dtype", "blocksize", "quant_type", "nested_blocksize"],
)
