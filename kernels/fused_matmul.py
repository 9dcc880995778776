"""Pallas fused dequantize-matmul: ``y = x @ dequant(W).T`` and ``dx = dy @ dequant(W)``.

``W`` is ``(N, K)`` in bitsandbytes' layout (``tiles`` states the decode). No
dequantized copy of ``W`` exists outside registers: each program decodes a
``(bn, bk)`` tile of ``W`` per step, rounds it to the compute dtype (as the
reference does) and accumulates the dot in float32.

Forward, grid ``(cdiv(M, bm), N / bn, split)``; program ``(i, j, s)`` computes

    y[s][i*bm:(i+1)*bm, j*bn:(j+1)*bn] = sum over k-tiles t of split s:
        x[i-rows, t*bk:(t+1)*bk] @ W[j-rows, t*bk:(t+1)*bk].T

Transposed (the backward's ``dx``), grid ``(cdiv(M, bm), K / bk, split)``:

    dx[s][i-rows, j*bk:(j+1)*bk] = sum over n-tiles t of split s: dy[i-rows, t*bn:(t+1)*bn] @ W[t-rows, j-cols]

With ``split > 1`` (split-K for small ``M``, so that a decode step fills the
GPU) the partial sums are float32 and added outside the kernel. Ragged ``M`` is
fine (padding rows are computed and discarded); ``N % bn == 0`` and
``K % bk == 0`` are required because both are contracted in one of the two
kernels (``MatmulBlockSizes.for_shape`` picks tiles that divide them).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from qlora_jax.kernels import compat, tiles
from qlora_jax.kernels.operands import Operands

_TARGET_PROGRAMS = 264  # two waves of the H200's 132 SMs: below this, split the contraction


def _pow2_at_least(m: int, low: int) -> int:
    p = low
    while p < m:
        p *= 2
    return p


def _largest_dividing(n: int, candidates) -> int | None:
    return next((c for c in candidates if n % c == 0), None)


@dataclasses.dataclass(frozen=True)
class MatmulBlockSizes:
    """Tiles of the fused kernels (powers of two; ``block_k`` a multiple of the quant block).

    ``split``: how many programs share one output tile's contraction (split-K),
    ``lookup``: "select" (15 selects over constants) or "gather" (a 16-entry table in memory).
    """

    block_m: int
    block_n: int
    block_k: int
    split: int = 1
    num_warps: int = 4
    num_stages: int = 3
    lookup: str = "select"

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name}={v} must be a power of two >= 16")
        if self.split < 1:
            raise ValueError(f"split={self.split} must be >= 1")
        if self.lookup not in tiles.LOOKUPS:
            raise ValueError(f"lookup={self.lookup!r} is not one of {tiles.LOOKUPS}")

    @classmethod
    def get_default(cls, m: int, n: int, k: int, blocksize: int, transpose: bool = False) -> "MatmulBlockSizes":
        """Defaults per shape class: decode-sized ``M <= 16`` and training-sized ``M``.

        Decode reads the weight once and is bound by memory: small ``bm``, narrow
        tiles and split-K so that at least ``_TARGET_PROGRAMS`` programs stream
        the codes. Training-sized ``M`` is bound by the tensor cores: 128-wide tiles.
        """
        if m <= 16:
            bm, bn, bk, warps, stages = 16, 64, 256, 8, 3
        elif m <= 64:
            bm, bn, bk, warps, stages = _pow2_at_least(m, 16), 64, 128, 4, 3
        else:
            bm, bn, bk, warps, stages = 128 if m >= 128 else 64, 128, 64, 8, 3
        bn = _largest_dividing(n, [c for c in (128, 64, 32, 16) if c <= bn]) or 16
        bk = _largest_dividing(k, [c for c in (256, 128, 64, 32) if blocksize <= c <= max(bk, blocksize) and c % blocksize == 0])
        out_tiles = -(-m // bm) * (k // bk if transpose else n // bn)
        steps = n // bn if transpose else k // bk
        split = 1  # split-K only where M is small: its float32 partial sums cost M * N * 4 bytes each
        while m <= 64 and out_tiles * split < _TARGET_PROGRAMS and steps % (split * 2) == 0 and steps // (split * 2) >= 2:
            split *= 2
        return cls(bm, bn, bk, split, warps, stages)

    def check(self, m: int, n: int, k: int, blocksize: int, transpose: bool) -> None:
        if self.block_k % blocksize:
            raise ValueError(f"block_k={self.block_k} must be a multiple of blocksize={blocksize}")
        if n % self.block_n or k % self.block_k:
            raise ValueError(f"(N, K)=({n}, {k}) must be multiples of (block_n, block_k)=({self.block_n}, {self.block_k})")
        steps = n // self.block_n if transpose else k // self.block_k
        if steps % self.split:
            raise ValueError(f"split={self.split} must divide the {steps} contraction steps")


def _w_tile(w_refs, rows, byte_cols, block_cols, row0, block0, *, quant_type, blocksize, nested_blocksize,
            blocks_per_row, dtype, lookup):
    """The dequantized tile ``W[rows, cols]`` in ``dtype``.

    ``w_refs`` are the kernel's weight refs (codes, scales, nested, offset, dmap,
    table); ``rows`` / ``byte_cols`` / ``block_cols`` index the codes and scales
    refs' local blocks; ``row0`` / ``block0`` are the tile's first row and first
    scale column in the whole weight (for the nested-scale index).
    """
    codes_ref, scales_ref, nested_ref, offset_ref, dmap_ref, table_ref = w_refs
    codes, raw = codes_ref[rows, byte_cols], scales_ref[rows, block_cols]
    if nested_blocksize is not None:
        r = jax.lax.broadcasted_iota(jnp.int32, raw.shape, 0)
        c = jax.lax.broadcasted_iota(jnp.int32, raw.shape, 1)
        block = (row0 + r) * blocks_per_row + block0 + c
        raw = tiles.double_dequant_scales(raw, block, nested_ref, offset_ref, dmap_ref, nested_blocksize)
    return tiles.dequant_tile(codes, raw, quant_type=quant_type, blocksize=blocksize, lookup=lookup,
                              table_ref=table_ref, dtype=dtype)


def _forward_kernel(x_ref, *refs, bs, steps, **dq):
    *w_refs, o_ref = refs
    bm, bn, bk, b = bs.block_m, bs.block_n, bs.block_k, dq["blocksize"]
    row0 = pl.program_id(1) * bn
    first = pl.program_id(2) * steps

    def body(t, acc):
        kt = first + t
        x = x_ref[:, pl.ds(kt * bk, bk)]
        w = _w_tile(w_refs, slice(None), pl.ds(kt * (bk // 2), bk // 2), pl.ds(kt * (bk // b), bk // b),
                    row0, kt * (bk // b), dtype=x.dtype, lookup=bs.lookup, **dq)
        return acc + jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((bm, bn), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _transpose_kernel(dy_ref, *refs, bs, steps, **dq):
    *w_refs, o_ref = refs
    bm, bn, bk, b = bs.block_m, bs.block_n, bs.block_k, dq["blocksize"]
    block0 = pl.program_id(1) * (bk // b)
    first = pl.program_id(2) * steps

    def body(t, acc):
        nt = first + t
        dy = dy_ref[:, pl.ds(nt * bn, bn)]
        w = _w_tile(w_refs, pl.ds(nt * bn, bn), slice(None), slice(None), nt * bn, block0,
                    dtype=dy.dtype, lookup=bs.lookup, **dq)
        return acc + jax.lax.dot_general(dy, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((bm, bk), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _whole(shape):
    return pl.BlockSpec(shape, lambda i, j, s: (0,) * len(shape))


def _call(lhs, ops: Operands, shape_nk, quant, bs: MatmulBlockSizes, interpret: bool, transpose: bool):
    """Runs one of the two kernels on 2-D ``lhs`` (``x`` or ``dy``); returns ``(M, K or N)`` in ``lhs.dtype``."""
    n, k = shape_nk
    quant_type, b, b2 = quant
    m = lhs.shape[0]
    bm, bn, bk, split = bs.block_m, bs.block_n, bs.block_k, bs.split
    # Every tile must lie inside its array: Pallas' Triton lowering masks no block access, so a tile hanging
    # past the last row reads and writes out of bounds (on the H200 it overwrote the next split's partial sums).
    lhs = _pad_rows(lhs, pl.cdiv(m, bm) * bm)
    out_cols, tile_cols = (k, bk) if transpose else (n, bn)
    steps = (n // bn if transpose else k // bk) // split
    out_dtype = jnp.float32 if split > 1 else lhs.dtype
    if transpose:
        kernel = _transpose_kernel
        lhs_spec = pl.BlockSpec((bm, n), lambda i, j, s: (i, 0))
        w_specs = [pl.BlockSpec((n, bk // 2), lambda i, j, s: (0, j)), pl.BlockSpec((n, bk // b), lambda i, j, s: (0, j))]
    else:
        kernel = _forward_kernel
        lhs_spec = pl.BlockSpec((bm, k), lambda i, j, s: (i, 0))
        w_specs = [pl.BlockSpec((bn, k // 2), lambda i, j, s: (j, 0)), pl.BlockSpec((bn, k // b), lambda i, j, s: (j, 0))]
    kernel = functools.partial(kernel, bs=bs, steps=steps, quant_type=quant_type, blocksize=b,
                               nested_blocksize=b2, blocks_per_row=k // b)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((split, lhs.shape[0], out_cols), out_dtype),
        grid=(lhs.shape[0] // bm, out_cols // tile_cols, split),
        in_specs=[lhs_spec, *w_specs, *(_whole(a.shape) for a in ops.arrays()[2:])],
        out_specs=pl.BlockSpec((None, bm, tile_cols), lambda i, j, s: (s, i, j)),
        compiler_params=compat.triton_params(bs.num_warps, bs.num_stages),
        interpret=interpret,
        debug=compat.pallas_debug(),
        name="qlora_matmul_t" if transpose else "qlora_matmul",
    )(lhs, *ops.arrays())
    if split == 1:
        return out[0, :m]
    return jnp.sum(out[:, :m], axis=0).astype(lhs.dtype)


def _pad_rows(x: jax.Array, rows: int) -> jax.Array:
    """``x`` with zero rows appended up to ``rows`` (``x`` itself when it has them)."""
    return x if x.shape[0] == rows else jnp.pad(x, ((0, rows - x.shape[0]),) + ((0, 0),) * (x.ndim - 1))


@functools.partial(jax.jit, static_argnames=("shape_nk", "quant", "block_sizes", "interpret", "transpose"))
def fused_matmul_2d(lhs, ops: Operands, *, shape_nk, quant, block_sizes, interpret, transpose):
    """``lhs @ W.T`` (``transpose=False``, lhs ``(M, K)``) or ``lhs @ W`` (``transpose=True``, lhs ``(M, N)``).

    ``quant = (quant_type, blocksize, nested_blocksize)``; shapes and tiles are
    checked by the caller (``kernels.matmul``).
    """
    return _call(lhs, ops, shape_nk, quant, block_sizes, interpret, transpose)
