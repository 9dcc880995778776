"""What the flash-attention kernels share: the static call description and one tile's mask and logits.

A tile is ``bq`` query rows against ``bk`` key columns. Its mask is rebuilt from the
rows' and columns' own vectors (index, position, segment id, validity) each time the
tile is visited, so no ``T x S`` array ever exists:

    visible[r, c] = kv_pos[c] <= q_pos[r]                 (causal)
                  & q_pos[r] - kv_pos[c] < window          (window)
                  & q_seg[r] == kv_seg[c]                  (segments)
                  & kv_valid[c]                            (KV-cache slots)
                  & q_index[r] < T & kv_index[c] < S       (padding; only when T or S was padded)

A term is left out statically when its input is absent, and ``mask`` is ``None`` when no
term remains (then no tile is ever skipped). The logits are ``cap(scale * q k^T)`` in
float32 with ``cap(x) = c tanh(x / c)`` (identity without a soft cap).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


class FlashConfig(NamedTuple):
    """The hashable, non-array part of one call (the custom VJP's non-differentiable argument).

    ``q_len`` / ``kv_len`` are the lengths before padding to whole blocks; ``groups`` is
    ``G = H / KV``; ``segments`` / ``valid`` say whether those inputs are passed.
    """

    causal: bool
    window: int | None
    scale: float
    softcap: float | None
    groups: int
    segments: bool
    valid: bool
    q_len: int
    kv_len: int
    block_sizes: Any  # FlashBlockSizes (kernels.flash_attention)
    interpret: bool


class Rows(NamedTuple):
    """One side of a tile: ``(n,)`` int32 vectors; ``seg`` / ``valid`` are ``None`` when not passed."""

    index: jax.Array
    pos: jax.Array
    seg: jax.Array | None = None
    valid: jax.Array | None = None


def padded(n: int, *blocks: int) -> int:
    """``n`` rounded up to a whole number of the largest block (blocks are powers of two)."""
    b = max(blocks)
    return -(-n // b) * b


def meta_counts(cfg: FlashConfig) -> tuple[int, int]:
    """How many refs the query side (positions [, segments]) and key side ([+ valid]) pass."""
    return 1 + cfg.segments, 1 + cfg.segments + cfg.valid


def split_refs(cfg: FlashConfig, refs):
    """``(query meta refs, key meta refs, the remaining refs)`` from a kernel's trailing refs."""
    nq, nk = meta_counts(cfg)
    return refs[:nq], refs[nq:nq + nk], refs[nq + nk:]


def load_rows(cfg: FlashConfig, refs, start, size: int, whole: bool) -> Rows:
    """The vectors of ``size`` rows from ``start`` (the whole ref when it is one block: ``whole``).

    ``refs`` are one side's meta refs in kernel order: positions [, segments] [, validity].
    """
    load = (lambda r: r[...]) if whole else (lambda r: r[pl.ds(start, size)])
    index = start + jax.lax.broadcasted_iota(jnp.int32, (size,), 0)
    seg = load(refs[1]) if cfg.segments else None
    valid = load(refs[1 + cfg.segments]) if len(refs) > 1 + cfg.segments else None
    return Rows(index, load(refs[0]), seg, valid)


def tile_mask(cfg: FlashConfig, q: Rows, kv: Rows) -> jax.Array | None:
    """``(bq, bk)`` bool: which keys each query of the tile sees (module docstring); ``None``: all."""
    terms = []
    if cfg.causal:
        terms.append(kv.pos[None, :] <= q.pos[:, None])
    if cfg.window is not None:
        terms.append(q.pos[:, None] - kv.pos[None, :] < cfg.window)
    if cfg.segments:
        terms.append(q.seg[:, None] == kv.seg[None, :])
    if cfg.valid:
        terms.append(kv.valid[None, :] != 0)
    bs = cfg.block_sizes
    if cfg.q_len != padded(cfg.q_len, bs.block_q, bs.block_q_bwd):
        terms.append(q.index[:, None] < cfg.q_len)
    if cfg.kv_len != padded(cfg.kv_len, bs.block_k, bs.block_k_bwd):
        terms.append(kv.index[None, :] < cfg.kv_len)
    if not terms:
        return None
    mask = terms[0]
    for term in terms[1:]:
        mask = mask & term
    return jnp.broadcast_to(mask, (q.pos.shape[0], kv.pos.shape[0]))


def if_visible(mask, visit, carry):
    """``visit(carry)`` unless the tile's mask is all false (then ``carry`` as is: no loads, no dots).

    Triton has no boolean reduction, hence the int32 max, one axis at a time: jax
    0.11.2's Triton lowering of a two-axis reduction fails under a device mesh.
    """
    if mask is None:
        return visit(carry)
    seen = jnp.max(jnp.max(jnp.where(mask, 1, 0).astype(jnp.int32), axis=1), axis=0) > 0
    return jax.lax.cond(seen, visit, lambda c: c, carry)


def dot_nt(a, b):
    """``a @ b.T`` accumulated in float32: ``(m, d) x (n, d) -> (m, n)``."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def dot_nn(a, b):
    """``a @ b`` accumulated in float32: ``(m, k) x (k, n) -> (m, n)``."""
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def dot_tn(a, b):
    """``a.T @ b`` accumulated in float32: ``(k, m) x (k, n) -> (m, n)``."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def logits(cfg: FlashConfig, q, k):
    """``(capped logits, d capped / d raw)`` of one tile, float32 ``(bq, bk)``; the factor is 1 without a cap."""
    raw = dot_nt(q, k) * cfg.scale
    if cfg.softcap is None:
        return raw, None
    t = jnp.tanh(raw / cfg.softcap)
    return cfg.softcap * t, 1.0 - t * t
