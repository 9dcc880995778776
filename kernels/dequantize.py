"""Pallas blockwise dequantize: packed 4-bit codes + scales -> bf16 / fp16 / fp32.

The tensor is viewed as ``nb`` rows of one quantization block each (codes
``(nb, B/2)``, scales ``(nb, 1)``, output ``(nb, B)``: free reshapes of the flat
bitsandbytes layout). Each program dequantizes ``rows`` consecutive blocks:

    out[b, k] = table[nibble(codes[b, k // 2], k % 2)] * scale[b]   (float32, one rounding)

with ``scale[b]`` the float32 absmax, or ``round(map[q2[b]] * nested[b // B2]) +
offset`` when double-quantized (decoded in the kernel, so reads stay at 4.127
bits per weight). Output is bit-equal to ``QuantizedArray.dequantize``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from qlora_jax.kernels import compat, tiles
from qlora_jax.kernels.operands import flat_unsupported_reason, operands
from qlora_jax.quant import QuantizedArray

OUT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


@dataclasses.dataclass(frozen=True)
class DequantBlockSizes:
    """Tile of the dequantize kernel: ``rows`` quantization blocks per program (a power of two)."""

    rows: int = 256
    num_warps: int = 4
    num_stages: int = 2
    lookup: str = "select"

    def __post_init__(self):
        if self.rows < 1 or self.rows & (self.rows - 1):
            raise ValueError(f"rows={self.rows} must be a power of two")
        if self.lookup not in tiles.LOOKUPS:
            raise ValueError(f"lookup={self.lookup!r} is not one of {tiles.LOOKUPS}")

    @classmethod
    def get_default(cls, num_blocks: int) -> "DequantBlockSizes":
        """256 blocks (16K weights at B = 64) per program, fewer for small tensors."""
        rows = 256
        while rows > 16 and rows >= 2 * num_blocks:
            rows //= 2
        return cls(rows=rows)


def _kernel(codes_ref, scales_ref, nested_ref, offset_ref, dmap_ref, table_ref, out_ref, *,
            quant_type, blocksize, nested_blocksize, num_blocks, rows, lookup):
    raw = scales_ref[...]  # (rows, 1)
    if nested_blocksize is not None:
        block = pl.program_id(0) * rows + jax.lax.broadcasted_iota(jnp.int32, raw.shape, 0)
        block = jnp.minimum(block, num_blocks - 1)  # rows past the end are padding: keep the gather in bounds
        raw = tiles.double_dequant_scales(raw, block, nested_ref, offset_ref, dmap_ref, nested_blocksize)
    out_ref[...] = tiles.dequant_tile(
        codes_ref[...], raw, quant_type=quant_type, blocksize=blocksize, lookup=lookup,
        table_ref=table_ref, dtype=out_ref.dtype,
    )


def _whole(shape):
    return pl.BlockSpec(shape, lambda i: (0,) * len(shape))


@functools.partial(jax.jit, static_argnames=("dtype", "block_sizes", "interpret"))
def _dequantize(q: QuantizedArray, dtype, block_sizes: DequantBlockSizes, interpret: bool) -> jax.Array:
    nb, b = q.num_blocks, q.blocksize
    ops = operands(q, nb)
    rows = block_sizes.rows
    # whole tiles only: Pallas' Triton lowering masks no tile access (a tile past the end reads and writes
    # out of bounds), so the codes and scales get zero rows up to a multiple of ``rows``, dropped after
    padded = pl.cdiv(nb, rows) * rows
    if padded != nb:
        pad = lambda a: jnp.pad(a, ((0, padded - nb), (0, 0)))  # noqa: E731
        ops = dataclasses.replace(ops, codes=pad(ops.codes), scales=pad(ops.scales))
    kernel = functools.partial(
        _kernel, quant_type=q.quant_type, blocksize=b, nested_blocksize=q.nested_blocksize,
        num_blocks=nb, rows=rows, lookup=block_sizes.lookup,
    )
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((padded, b), dtype),
        grid=(padded // rows,),
        in_specs=[
            pl.BlockSpec((rows, b // 2), lambda i: (i, 0)),
            pl.BlockSpec((rows, 1), lambda i: (i, 0)),
            _whole(ops.nested.shape), _whole(ops.offset.shape), _whole(ops.dmap.shape), _whole(ops.table.shape),
        ],
        out_specs=pl.BlockSpec((rows, b), lambda i: (i, 0)),
        compiler_params=compat.triton_params(block_sizes.num_warps, block_sizes.num_stages),
        interpret=interpret,
        debug=compat.pallas_debug(),
        name="qlora_dequantize",
    )(*ops.arrays())
    return out[:nb].reshape(q.shape)


def pallas_dequantize(q: QuantizedArray, dtype=jnp.bfloat16, *, block_sizes: DequantBlockSizes | None = None,
                      interpret: bool | None = None) -> jax.Array:
    """``q`` dequantized to ``dtype`` by the Pallas kernel; same values as ``q.dequantize(dtype)``.

    ``interpret=None`` runs the kernel in Pallas interpret mode on a CPU backend.
    Raises ``ValueError`` if ``q``'s size is not a whole number of blocks (the
    jnp reference handles that case).
    """
    if not isinstance(q, QuantizedArray):
        raise ValueError(f"pallas_dequantize expects a QuantizedArray, got {type(q).__name__}")
    dtype = jnp.dtype(dtype)
    if dtype not in [jnp.dtype(d) for d in OUT_DTYPES]:
        raise ValueError(f"dtype={dtype} must be one of bfloat16, float16, float32")
    reason = flat_unsupported_reason(q)
    if reason is not None:
        raise ValueError(f"pallas_dequantize cannot take this tensor: {reason}")
    block_sizes = block_sizes or DequantBlockSizes.get_default(q.num_blocks)
    interpret = compat.default_interpret() if interpret is None else bool(interpret)
    return _dequantize(q, dtype, block_sizes, interpret)


def dequantize(q: QuantizedArray, dtype=jnp.bfloat16, backend: str = "auto", *, interpret: bool | None = None) -> jax.Array:
    """``q`` in ``dtype`` on a backend: ``"xla"`` (jnp reference), ``"pallas"``, or ``"auto"``.

    ``"auto"`` runs the Pallas kernel on a GPU when ``q`` is a whole number of
    blocks, and the jnp reference otherwise (always on CPUs). Values are the
    same on every backend, bit for bit.
    """
    if backend not in ("auto", "xla", "pallas"):
        raise ValueError(f"backend={backend!r} is not one of ('auto', 'xla', 'pallas')")
    if not isinstance(q, QuantizedArray):
        raise ValueError(f"dequantize expects a QuantizedArray, got {type(q).__name__}")
    if backend == "auto":
        backend = "pallas" if compat.on_gpu() and flat_unsupported_reason(q) is None else "xla"
    if backend == "xla":
        return q.dequantize(dtype)
    return pallas_dequantize(q, dtype, interpret=interpret)
