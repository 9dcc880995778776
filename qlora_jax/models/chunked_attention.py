"""Blockwise attention with an online softmax (FlashAttention's algorithm) in jnp and lax loops.

The semantics are ``qlora_jax.models.attention``'s; memory is ``O((T + S) * D)``: no
``T x S`` array exists, only one ``(block_q, block_k)`` tile of logits per head at a time.

Layout: the ``T`` queries are cut into ``nq`` blocks of ``bq`` and the ``S`` keys into
``nk`` blocks of ``bk`` (both padded up; padded keys are invisible, padded queries
dropped). A query block of one KV head holds its ``G`` query heads' rows together,
``(B, KV, G * bq, D)``, so every product is a batched GEMM over ``(B, KV)``.

Forward, for each query block ``i`` and key block ``j`` (running max ``m``, sum ``l``,
accumulator ``a``; ``l_ij = cap(scale * q_i k_j^T)``, ``-inf`` where invisible)::

    m' = max(m, rowmax l_ij);   p = exp(l_ij - m')
    l  = exp(m - m') l + rowsum p;   a = exp(m - m') a + p v_j;   m = m'
    out_i = a / l,   lse_i = m + log l        (out_i = 0, lse_i = +inf for a query seeing no key)

Backward (FlashAttention-2), with ``delta_i = rowsum(dout_i * out_i)``, recomputing each
block from the saved ``lse``::

    p = exp(l_ij - lse_i);   dv_j += p^T dout_i;   ds = p * (dout_i v_j^T - delta_i)
    ds *= cap'(.) * scale;   dk_j += ds^T q_i;   dq_i += ds k_j

(``cap(x) = c tanh(x / c)``, ``cap' = 1 - tanh^2``; identity without a softcap.) A block
pair whose visibility mask is all false is skipped in both passes (``lax.cond`` on
``any(mask)``), which halves causal attention's work and skips whole foreign segments
of packed rows. The mask of a tile is built from positions and segment ids as it is
used, never for the whole ``T x S``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from qlora_jax.kernels.schedule import tie_to, zeros_after

# Called as ``hook("forward" | "backward")`` each time a tile is computed, not skipped, when set
# before tracing (tests count the tiles this way; ``jax.debug.callback`` runs on the host).
tile_hook: Callable[[str], None] | None = None


def _count(kind: str) -> None:
    if tile_hook is not None:
        jax.debug.callback(lambda: tile_hook(kind))


@dataclasses.dataclass(frozen=True)
class ChunkBlockSizes:
    """Query and key rows per tile. Larger tiles are faster GEMMs; memory grows as ``bq * bk``."""

    block_q: int = 512
    block_k: int = 512

    def __post_init__(self):
        for name in ("block_q", "block_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ChunkBlockSizes.{name}={value!r} must be a positive int")

    @classmethod
    def get_default(cls, q_len: int, kv_len: int) -> ChunkBlockSizes:
        """512 x 512 tiles, shrunk to the sequence when it is shorter (one tile, no padding)."""
        return cls(min(512, q_len), min(512, kv_len))


class _Static(NamedTuple):
    """The hashable, non-array part of a call (``custom_vjp``'s non-differentiable argument)."""

    causal: bool
    window: int | None
    scale: float
    softcap: float | None
    groups: int
    segments: bool


class _Meta(NamedTuple):
    """Blocked integer inputs: ``(n, B, block)`` positions, segment ids and key validity."""

    q_pos: jax.Array
    q_seg: jax.Array
    kv_pos: jax.Array
    kv_seg: jax.Array
    kv_valid: jax.Array


def _tile_mask(st: _Static, meta: _Meta, i, j) -> jax.Array:
    """``(B, bq, bk)``: which keys of block ``j`` the queries of block ``i`` see."""
    qp, kp = meta.q_pos[i][:, :, None], meta.kv_pos[j][:, None, :]
    mask = jnp.broadcast_to(meta.kv_valid[j][:, None, :], (qp.shape[0], qp.shape[1], kp.shape[2]))
    if st.causal:
        mask &= kp <= qp
    if st.window is not None:
        mask &= qp - kp < st.window
    if st.segments:
        mask &= meta.q_seg[i][:, :, None] == meta.kv_seg[j][:, None, :]
    return mask


def _logits(st: _Static, qb, kb):
    """``(raw scaled logits, capped logits)`` of one tile, ``(B, KV, G * bq, bk)`` float32."""
    raw = jnp.einsum("bkrd,bksd->bkrs", qb, kb, preferred_element_type=jnp.float32) * st.scale
    return raw, raw if st.softcap is None else st.softcap * jnp.tanh(raw / st.softcap)


def _masked(st: _Static, x, mask, fill):
    """``x`` ``(B, KV, G * bq, bk)`` with ``fill`` where the ``(B, bq, bk)`` mask is false."""
    b, kv, r, s = x.shape
    x = x.reshape(b, kv, st.groups, r // st.groups, s)
    return jnp.where(mask[:, None, None], x, fill).reshape(b, kv, r, s)


def _forward(st: _Static, q, k, v, meta: _Meta):
    """``(out, lse)``: ``(nq, B, KV, G * bq, D)`` in ``q.dtype`` and ``(nq, B, KV, G * bq)`` float32.

    Every loop buffer starts as ``zeros_after`` its input (``qlora_jax.kernels.schedule``):
    plain zeros would be one constant shared by all layers, whose copies XLA allocates at
    the start of the step.
    """
    nq, nk = q.shape[0], k.shape[0]

    def query_block(i, outs):
        qb = q[i]
        init = (zeros_after(qb, qb.shape[:-1], jnp.float32) - jnp.inf, zeros_after(qb, qb.shape[:-1], jnp.float32),
                zeros_after(qb, qb.shape, jnp.float32))

        def key_block(j, carry):
            mask = _tile_mask(st, meta, i, j)

            def update(carry):
                _count("forward")
                m, l, acc = carry
                logits = _masked(st, _logits(st, qb, k[j])[1], mask, -jnp.inf)
                m_new = jnp.maximum(m, logits.max(-1))
                shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # no key seen yet: exp(-inf) = 0 stays 0
                p = jnp.exp(logits - shift[..., None])
                alpha = jnp.exp(m - shift)
                pv = jnp.einsum("bkrs,bksd->bkrd", p.astype(v.dtype), v[j], preferred_element_type=jnp.float32)
                return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

            return jax.lax.cond(jnp.any(mask), update, lambda c: c, carry)

        m, l, acc = jax.lax.fori_loop(0, nk, key_block, init)
        seen = l > 0
        out = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)
        return outs[0].at[i].set(out.astype(q.dtype)), outs[1].at[i].set(lse)

    outs = (zeros_after(q, q.shape, q.dtype), zeros_after(q, q.shape[:-1], jnp.float32))
    return jax.lax.fori_loop(0, nq, query_block, outs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(st: _Static, q, k, v, meta: _Meta):
    return _forward(st, q, k, v, meta)[0]


def _attend_fwd(st, q, k, v, meta):
    out, lse = _forward(st, q, k, v, meta)
    return out, (q, k, v, meta, out, lse)


def _attend_bwd(st, residuals, dout):
    q, k, v, meta, out, lse = residuals
    nq, nk = q.shape[0], k.shape[0]
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)

    def key_block(j, grads):
        kb, vb = k[j], v[j]

        def query_block(i, carry):
            mask = _tile_mask(st, meta, i, j)

            def update(carry):
                _count("backward")
                dk, dv, dq = carry
                qb, dob = q[i], dout[i]
                raw, capped = _logits(st, qb, kb)
                p = _masked(st, jnp.exp(capped - lse[i][..., None]), mask, 0.0)
                dv += jnp.einsum("bkrs,bkrd->bksd", p.astype(dob.dtype), dob, preferred_element_type=jnp.float32)
                dp = jnp.einsum("bkrd,bksd->bkrs", dob, vb, preferred_element_type=jnp.float32)
                ds = p * (dp - delta[i][..., None])
                if st.softcap is not None:
                    ds *= 1.0 - jnp.square(capped / st.softcap)
                ds = (ds * st.scale).astype(q.dtype)
                dk += jnp.einsum("bkrs,bkrd->bksd", ds, qb, preferred_element_type=jnp.float32)
                dq_i = jnp.einsum("bkrs,bksd->bkrd", ds, kb, preferred_element_type=jnp.float32)
                return dk, dv, dq.at[i].add(dq_i)

            return jax.lax.cond(jnp.any(mask), update, lambda c: c, carry)

        dq, dk_all, dv_all = grads
        zeros = zeros_after(kb, kb.shape, jnp.float32)
        dk, dv, dq = jax.lax.fori_loop(0, nq, query_block, (zeros, zeros, dq))
        return dq, dk_all.at[j].set(dk.astype(k.dtype)), dv_all.at[j].set(dv.astype(v.dtype))

    grads = (zeros_after(dout, q.shape, jnp.float32), zeros_after(dout, k.shape, k.dtype),
             zeros_after(dout, v.shape, v.dtype))  # tied to dout, as in _forward
    dq, dk, dv = jax.lax.fori_loop(0, nk, key_block, grads)
    return dq.astype(q.dtype), dk, dv, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def _pad_to(x, length: int, axis: int, value=0):
    extra = length - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _blocks(x, n: int, block: int):
    """``(B, n * block, ...)`` -> ``(n, B, block, ...)``."""
    return jnp.moveaxis(x.reshape(x.shape[0], n, block, *x.shape[2:]), 1, 0)


def chunked_attention(q, k, v, *, q_positions, kv_positions, q_segment_ids=None, kv_segment_ids=None,
                      kv_valid=None, causal=True, window=None, scale=None, softcap=None,
                      block_sizes: ChunkBlockSizes | None = None) -> jax.Array:
    """``qlora_jax.models.attention.attention`` computed blockwise (module docstring): ``(B, T, H, D)``."""
    b, t, h, d = q.shape
    s, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    bs = block_sizes or ChunkBlockSizes.get_default(t, s)
    if not isinstance(bs, ChunkBlockSizes):
        raise ValueError(f"block_sizes={bs!r} must be a ChunkBlockSizes for the chunked implementation")
    bq, bk = min(bs.block_q, t), min(bs.block_k, s)
    nq, nk = -(-t // bq), -(-s // bk)
    st = _Static(bool(causal), window, float(d ** -0.5 if scale is None else scale),
                 None if softcap is None else float(softcap), g, q_segment_ids is not None)

    valid = jnp.ones((b, s), bool) if kv_valid is None else kv_valid.astype(bool)
    q_seg = jnp.zeros((b, t), jnp.int32) if q_segment_ids is None else q_segment_ids.astype(jnp.int32)
    kv_seg = jnp.zeros((b, s), jnp.int32) if kv_segment_ids is None else kv_segment_ids.astype(jnp.int32)
    meta = _Meta(*(_blocks(_pad_to(x, n * blk, 1, fill), n, blk) for x, n, blk, fill in (
        (q_positions.astype(jnp.int32), nq, bq, 0), (q_seg, nq, bq, 0), (kv_positions.astype(jnp.int32), nk, bk, 0),
        (kv_seg, nk, bk, 0), (valid, nk, bk, False))))

    # (B, T, KV * G, D) -> (nq, B, KV, G * bq, D): a KV head's G query heads stacked row-wise per block
    qb = _blocks(_pad_to(q, nq * bq, 1), nq, bq).reshape(nq, b, bq, kvh, g, d)
    qb = qb.transpose(0, 1, 3, 4, 2, 5).reshape(nq, b, kvh, g * bq, d)
    kb, vb = (_blocks(_pad_to(x, nk * bk, 1), nk, bk).transpose(0, 1, 3, 2, 4) for x in (k, v))

    # Positions and segment ids are often the same for every layer: inside a layer scan JAX would
    # hoist everything that depends on them alone, each tile's mask stacked over all tiles.
    meta = tie_to(meta, qb)
    out = _attend(st, qb, kb, vb, meta)  # (nq, B, KV, G * bq, D)
    out = out.reshape(nq, b, kvh, g, bq, d).transpose(1, 0, 4, 2, 3, 5).reshape(b, nq * bq, h, d)
    return out[:, :t]
