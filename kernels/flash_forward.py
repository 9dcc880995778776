"""The flash-attention forward kernel: ``out`` and the float32 log-sum-exp of every query row.

Grid ``(T / bq, B, H)``; program ``(i, b, h)`` holds query rows ``i*bq .. (i+1)*bq`` of
head ``h`` and walks the ``S / bk`` key blocks of KV head ``h // G`` (GQA through the
index map: K and V are never repeated). With ``l_j = cap(scale * q k_j^T)`` masked to
``-inf`` (``flash_tiles``), running max ``m``, sum ``l`` and accumulator ``a``::

    m' = max(m, rowmax l_j);   p = exp(l_j - m');   alpha = exp(m - m')
    l  = alpha l + rowsum p;   a = alpha a + p.astype(v.dtype) @ v_j;   m = m'
    out = a / l;   lse = m + log l          (out = 0, lse = +inf: a row that sees no key)

(``m'`` is replaced by 0 in the exponents while it is still ``-inf``, so a row with no
key yet keeps ``p = alpha = 0``.) A key block whose mask is all false is skipped: its
K/V tiles are not loaded and no dot runs.

Shapes: ``q`` ``(B, Tp, H, Dp)``, ``k``/``v`` ``(B, Sp, KV, Dp)`` (padded to whole blocks),
positions / segments / validity ``(B, Tp)`` / ``(B, Sp)`` int32; ``out`` like ``q``,
``lse`` ``(B, H, Tp)`` float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from qlora_jax.kernels import compat
from qlora_jax.kernels.flash_tiles import FlashConfig, dot_nn, if_visible, load_rows, logits, split_refs, tile_mask


def _kernel(q_ref, k_ref, v_ref, *refs, cfg: FlashConfig):
    q_refs, kv_refs, (o_ref, lse_ref) = split_refs(cfg, refs)
    bq, bk = cfg.block_sizes.block_q, cfg.block_sizes.block_k
    q = q_ref[...]
    rows = load_rows(cfg, q_refs, pl.program_id(0) * bq, bq, whole=True)

    def body(j, carry):
        start = pl.multiple_of(j * bk, bk)
        mask = tile_mask(cfg, rows, load_rows(cfg, kv_refs, start, bk, whole=False))

        def visit(carry):
            m, l, acc = carry
            s, _ = logits(cfg, q, k_ref[pl.ds(start, bk), :])
            if mask is not None:
                s = jnp.where(mask, s, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=1))
            shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            p = jnp.exp(s - shift[:, None])
            alpha = jnp.exp(m - shift)
            v = v_ref[pl.ds(start, bk), :]
            return m_new, alpha * l + jnp.sum(p, axis=1), alpha[:, None] * acc + dot_nn(p.astype(v.dtype), v)

        return if_visible(mask, visit, carry)

    init = (jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32),
            jnp.zeros((bq, q.shape[-1]), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, k_ref.shape[0] // bk, body, init)
    seen = l > 0
    safe_l = jnp.where(seen, l, 1.0)
    o_ref[...] = jnp.where(seen[:, None], acc / safe_l[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(safe_l), jnp.inf)


def forward(cfg: FlashConfig, q, k, v, q_meta, kv_meta):
    """``(out, lse)`` of padded inputs (module docstring); ``*_meta`` are the int32 meta arrays in kernel order."""
    b, tp, h, d = q.shape
    sp = k.shape[1]
    bs = cfg.block_sizes
    bq, g = bs.block_q, cfg.groups
    in_specs = [
        pl.BlockSpec((None, bq, None, d), lambda i, b, h: (b, i, h, 0)),
        pl.BlockSpec((None, sp, None, d), lambda i, b, h: (b, 0, jax.lax.div(h, g), 0)),
        pl.BlockSpec((None, sp, None, d), lambda i, b, h: (b, 0, jax.lax.div(h, g), 0)),
        *(pl.BlockSpec((None, bq), lambda i, b, h: (b, i)) for _ in q_meta),
        *(pl.BlockSpec((None, sp), lambda i, b, h: (b, 0)) for _ in kv_meta),
    ]
    return pl.pallas_call(
        functools.partial(_kernel, cfg=cfg),
        out_shape=(jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, tp), jnp.float32)),
        grid=(tp // bq, b, h),
        in_specs=in_specs,
        out_specs=(pl.BlockSpec((None, bq, None, d), lambda i, b, h: (b, i, h, 0)),
                   pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))),
        compiler_params=compat.triton_params(bs.num_warps, bs.num_stages),
        interpret=cfg.interpret,
        debug=compat.pallas_debug(),
        name="flash_attention_fwd",
    )(q, k, v, *q_meta, *kv_meta)
