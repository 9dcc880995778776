"""The flash-attention backward kernels (FlashAttention-2): ``dk, dv`` per key block, ``dq`` per query block.

Both recompute a tile's probabilities from ``q``, ``k`` and the forward's float32
``lse`` instead of storing them. With ``delta = rowsum(dout * out)`` (float32, computed
outside) and ``cap'`` the soft cap's derivative (1 without one)::

    p  = exp(cap(scale q k^T) - lse)            (0 where the tile's mask is false)
    dv = p^T dout;   dp = dout v^T;   ds = p (dp - delta) cap' scale   (cast to q.dtype)
    dk = ds^T q;     dq = ds k

``dk_dv``: grid ``(S / bk, B, KV)``; program ``(j, b, kh)`` keeps key block ``j`` of KV
head ``kh`` and its float32 ``dk``, ``dv`` accumulators, and walks every query block
``i`` of the ``G`` query heads ``kh*G .. kh*G+G-1`` that read it, so the sum over a
group happens in registers (no atomics, no repeated K/V). The tile mask depends on
``i`` alone, so it is built once per query block and shared by the ``G`` heads.

``dq``: grid ``(T / bq, B, H)``; program ``(i, b, h)`` keeps query block ``i`` of head
``h`` and walks the key blocks of KV head ``h // G``.

Shapes as in ``flash_forward``; ``lse`` and ``delta`` are ``(B, H, Tp)`` float32.
Tiles are ``FlashBlockSizes.block_q_bwd x block_k_bwd``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from qlora_jax.kernels import compat
from qlora_jax.kernels.flash_tiles import (FlashConfig, dot_nn, dot_nt, dot_tn, if_visible, load_rows, logits,
                                           split_refs, tile_mask)


def _ds(cfg: FlashConfig, q, k, v, do, lse, delta, mask):
    """``(p in do.dtype, ds in q.dtype)`` of one ``(bq, bk)`` tile (module docstring)."""
    s, cap_grad = logits(cfg, q, k)
    p = jnp.exp(s - lse[:, None])
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    ds = p * (dot_nt(do, v) - delta[:, None])
    if cap_grad is not None:
        ds = ds * cap_grad
    return p.astype(do.dtype), (ds * cfg.scale).astype(q.dtype)


def _dk_dv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg: FlashConfig):
    q_refs, kv_refs, (dk_ref, dv_ref) = split_refs(cfg, refs)
    bq, bk = cfg.block_sizes.block_q_bwd, cfg.block_sizes.block_k_bwd
    k, v = k_ref[...], v_ref[...]
    cols = load_rows(cfg, kv_refs, pl.program_id(0) * bk, bk, whole=True)

    def query_block(i, carry):
        start = pl.multiple_of(i * bq, bq)
        mask = tile_mask(cfg, load_rows(cfg, q_refs, start, bq, whole=False), cols)

        def visit(carry):
            def head(g, carry):
                dk, dv = carry
                q, do = q_ref[pl.ds(start, bq), g, :], do_ref[pl.ds(start, bq), g, :]
                p, ds = _ds(cfg, q, k, v, do, lse_ref[g, pl.ds(start, bq)], delta_ref[g, pl.ds(start, bq)], mask)
                return dk + dot_tn(ds, q), dv + dot_tn(p, do)

            return jax.lax.fori_loop(0, cfg.groups, head, carry)

        return if_visible(mask, visit, carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(0, q_ref.shape[0] // bq, query_block, (zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg: FlashConfig):
    q_refs, kv_refs, (dq_ref,) = split_refs(cfg, refs)
    bq, bk = cfg.block_sizes.block_q_bwd, cfg.block_sizes.block_k_bwd
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    rows = load_rows(cfg, q_refs, pl.program_id(0) * bq, bq, whole=True)

    def key_block(j, dq):
        start = pl.multiple_of(j * bk, bk)
        mask = tile_mask(cfg, rows, load_rows(cfg, kv_refs, start, bk, whole=False))

        def visit(dq):
            k = k_ref[pl.ds(start, bk), :]
            _, ds = _ds(cfg, q, k, v_ref[pl.ds(start, bk), :], do, lse, delta, mask)
            return dq + dot_nn(ds, k)

        return if_visible(mask, visit, dq)

    dq = jax.lax.fori_loop(0, k_ref.shape[0] // bk, key_block, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _call(kernel, name, cfg: FlashConfig, grid, in_specs, out_shape, out_specs, args):
    bs = cfg.block_sizes
    return pl.pallas_call(
        functools.partial(kernel, cfg=cfg), out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
        compiler_params=compat.triton_params(bs.num_warps_bwd, bs.num_stages_bwd),
        interpret=cfg.interpret, debug=compat.pallas_debug(), name=name,
    )(*args)


def backward(cfg: FlashConfig, q, k, v, out, lse, dout, q_meta, kv_meta):
    """``(dq, dk, dv)`` of padded inputs, in the dtypes of ``q``, ``k``, ``v``."""
    b, tp, h, d = q.shape
    sp, kvh = k.shape[1], k.shape[2]
    g, bq, bk = cfg.groups, cfg.block_sizes.block_q_bwd, cfg.block_sizes.block_k_bwd
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1).transpose(0, 2, 1)
    args = (q, k, v, dout, lse, delta, *q_meta, *kv_meta)

    group = pl.BlockSpec((None, tp, g, d), lambda j, b, kh: (b, 0, kh, 0))
    group_rows = pl.BlockSpec((None, g, tp), lambda j, b, kh: (b, kh, 0))
    key_tile = pl.BlockSpec((None, bk, None, d), lambda j, b, kh: (b, j, kh, 0))
    dk, dv = _call(
        _dk_dv_kernel, "flash_attention_dkv", cfg, (sp // bk, b, kvh),
        [group, key_tile, key_tile, group, group_rows, group_rows,
         *(pl.BlockSpec((None, tp), lambda j, b, kh: (b, 0)) for _ in q_meta),
         *(pl.BlockSpec((None, bk), lambda j, b, kh: (b, j)) for _ in kv_meta)],
        (jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
        (key_tile, key_tile), args)

    query_tile = pl.BlockSpec((None, bq, None, d), lambda i, b, h: (b, i, h, 0))
    keys = pl.BlockSpec((None, sp, None, d), lambda i, b, h: (b, 0, jax.lax.div(h, g), 0))
    rows = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
    dq = _call(
        _dq_kernel, "flash_attention_dq", cfg, (tp // bq, b, h),
        [query_tile, keys, keys, query_tile, rows, rows,
         *(pl.BlockSpec((None, bq), lambda i, b, h: (b, i)) for _ in q_meta),
         *(pl.BlockSpec((None, sp), lambda i, b, h: (b, 0)) for _ in kv_meta)],
        jax.ShapeDtypeStruct(q.shape, q.dtype), query_tile, args)
    return dq, dk, dv
