"""Fused flash attention for GPUs in Pallas (Triton backend), with GQA, positions, segments and windows.

``flash_attention(q, k, v, ...)`` computes exactly ``qlora_jax.models.attention``'s
``reference_attention``: ``q`` ``(B, T, H, D)``, ``k``/``v`` ``(B, S, KV, D)``, ``H = G * KV``,
query head ``h`` reads KV head ``h // G``. Key ``s`` is visible to query ``t`` of row ``b`` iff

    kv_positions[b, s] <= q_positions[b, t]            (causal=True)
    q_positions[b, t] - kv_positions[b, s] < window     (window)
    kv_segment_ids[b, s] == q_segment_ids[b, t]         (segment ids, both or neither)
    kv_valid[b, s]                                      (kv_valid)

Positions, not indices, decide causality: they restart inside a packed row and sit
anywhere in a KV cache. With ``l = cap(scale * q . k)`` (``scale = 1/sqrt(D)`` by
default, ``cap(x) = softcap * tanh(x / softcap)`` or the identity) the output is
``softmax(l) @ v`` over the visible keys, logits, softmax and accumulation in float32,
probabilities cast to ``v.dtype`` before the product with ``v``; a query that sees no
key gets zeros. The result is ``(B, T, H, D)`` in ``q.dtype``.

Three kernels (``flash_forward``, ``flash_backward``; the tile mask in ``flash_tiles``):

* forward, grid ``(T / block_q, B, H)``: online softmax over the key blocks; writes
  ``out`` and the float32 ``lse`` ``(B, H, T)``;
* ``dk, dv``, grid ``(S / block_k_bwd, B, KV)``: one key block against every query
  block of its ``G`` query heads (the GQA sum in registers);
* ``dq``, grid ``(T / block_q_bwd, B, H)``.

Each kernel builds a tile's mask from the rows' position / segment / validity vectors
(loaded per block; never a dense ``T x S`` mask) and skips a tile whose mask is all
false with a ``lax.cond``: no K/V load, no dot. The custom VJP saves ``q, k, v, out, lse``
and the int32 vectors: ``O((T + S) D)``.

The wrapper pads ``T`` and ``S`` to whole blocks (padded keys are masked out, padded
query rows dropped) and ``D`` to the next power of two with zeros (Triton's tiles are
powers of two; zero columns change no dot product).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from qlora_jax.kernels import compat
from qlora_jax.kernels.flash_backward import backward
from qlora_jax.kernels.flash_forward import forward
from qlora_jax.kernels.flash_tiles import FlashConfig, padded

MAX_HEAD_DIM = 256


def _pow2_at_least(n: int, low: int = 16) -> int:
    p = low
    while p < n:
        p *= 2
    return p


def unsupported_reason(head_dim: int) -> str | None:
    """``None`` when the kernel runs this head dim (multiples of 16 up to 256), else why not."""
    if head_dim % 16 or not 16 <= head_dim <= MAX_HEAD_DIM:
        return f"head_dim={head_dim} is not a multiple of 16 in [16, {MAX_HEAD_DIM}]"
    return None


@dataclasses.dataclass(frozen=True)
class FlashBlockSizes:
    """Tiles (powers of two >= 16) and Triton launch settings of the forward and backward kernels.

    Forward: ``block_q`` query rows per program against ``block_k`` keys per step.
    Backward: ``block_q_bwd x block_k_bwd`` tiles in both the ``dk, dv`` and the ``dq`` kernel.
    """

    block_q: int = 128
    block_k: int = 64
    block_q_bwd: int = 64
    block_k_bwd: int = 64
    num_warps: int = 4
    num_stages: int = 2
    num_warps_bwd: int = 4
    num_stages_bwd: int = 2

    def __post_init__(self):
        for name in ("block_q", "block_k", "block_q_bwd", "block_k_bwd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 16 or value & (value - 1):
                raise ValueError(f"FlashBlockSizes.{name}={value!r} must be a power of two >= 16")
        for name in ("num_warps", "num_warps_bwd"):
            if getattr(self, name) not in (1, 2, 4, 8, 16):
                raise ValueError(f"FlashBlockSizes.{name}={getattr(self, name)!r} must be 1, 2, 4, 8 or 16")
        for name in ("num_stages", "num_stages_bwd"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"FlashBlockSizes.{name}={getattr(self, name)!r} must be a positive int")

    @classmethod
    def get_default(cls, q_len: int, kv_len: int, head_dim: int) -> FlashBlockSizes:
        """Tiles by head dim, shrunk to short sequences (a 16-row floor: Triton's smallest dot).

        The float32 accumulators live in registers: ``block_q x D`` in the forward and
        ``dq`` kernels, two ``block_k_bwd x D`` in the ``dk, dv`` kernel. These are the
        largest tiles that compiled for sm_90 without register spills (with segments and
        a window, the most mask work; ``tests/kernels/triton_check.py pallas``,
        docs/kernels.md); 4 forward warps at ``D = 64`` and 64 x 64 backward tiles at
        ``D = 128`` spilled.
        """
        d = _pow2_at_least(head_dim)
        if d <= 64:
            sizes = dict(block_q=128, block_k=64, block_q_bwd=64, block_k_bwd=64, num_warps=8, num_stages=3,
                         num_warps_bwd=4, num_stages_bwd=2)
        elif d <= 128:
            sizes = dict(block_q=128, block_k=64, block_q_bwd=32, block_k_bwd=64, num_warps=8, num_stages=2,
                         num_warps_bwd=8, num_stages_bwd=2)
        else:
            sizes = dict(block_q=64, block_k=16, block_q_bwd=32, block_k_bwd=32, num_warps=8, num_stages=2,
                         num_warps_bwd=8, num_stages_bwd=2)
        fit_q, fit_k = _pow2_at_least(q_len), _pow2_at_least(kv_len)
        for name in ("block_q", "block_q_bwd"):
            sizes[name] = min(sizes[name], fit_q)
        for name in ("block_k", "block_k_bwd"):
            sizes[name] = min(sizes[name], fit_k)
        return cls(**sizes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: FlashConfig, q, k, v, q_meta, kv_meta):
    return forward(cfg, q, k, v, q_meta, kv_meta)[0]


def _flash_fwd(cfg, q, k, v, q_meta, kv_meta):
    out, lse = forward(cfg, q, k, v, q_meta, kv_meta)
    return out, (q, k, v, out, lse, q_meta, kv_meta)


def _flash_bwd(cfg, residuals, dout):
    q, k, v, out, lse, q_meta, kv_meta = residuals
    return (*backward(cfg, q, k, v, out, lse, dout, q_meta, kv_meta), None, None)  # integer inputs: no cotangent


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pad(x, axis: int, length: int):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return x if length == x.shape[axis] else jnp.pad(x, widths)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _padded_call(q, k, v, q_meta, kv_meta, *, cfg: FlashConfig):
    b, t, h, d = q.shape
    bs = cfg.block_sizes
    tp, sp, dp = padded(t, bs.block_q, bs.block_q_bwd), padded(k.shape[1], bs.block_k, bs.block_k_bwd), _pow2_at_least(d)
    q = _pad(_pad(q, 1, tp), 3, dp)
    k, v = (_pad(_pad(x, 1, sp), 3, dp) for x in (k, v))
    q_meta = tuple(_pad(x.astype(jnp.int32), 1, tp) for x in q_meta)
    kv_meta = tuple(_pad(x.astype(jnp.int32), 1, sp) for x in kv_meta)
    return _flash(cfg, q, k, v, q_meta, kv_meta)[:, :t, :, :d]


def _check(q, k, v, named, window, softcap, block_sizes):
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"flash_attention wants q (B, T, H, D), k and v (B, S, KV, D); got {q.shape=}, {k.shape=}, {v.shape=}")
    b, t, h, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or h % k.shape[2]:
        raise ValueError(f"{k.shape=} must share B and D with {q.shape=}, and its KV heads must divide H={h}")
    if not q.dtype == k.dtype == v.dtype or not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if (why := unsupported_reason(d)) is not None:
        raise ValueError(f"flash_attention cannot run {q.shape=}: {why}")
    for name, x, want in named:
        if x is not None and (tuple(x.shape) != want or not jnp.issubdtype(x.dtype, jnp.integer) and x.dtype != bool):
            raise ValueError(f"{name} must be an integer {want} array, got shape {tuple(x.shape)} dtype {x.dtype}")
    if (named[2][1] is None) != (named[3][1] is None):
        raise ValueError("pass q_segment_ids and kv_segment_ids together (or neither)")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window={window!r} must be a positive int or None")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap={softcap!r} must be > 0 or None")
    if block_sizes is not None and not isinstance(block_sizes, FlashBlockSizes):
        raise ValueError(f"block_sizes={block_sizes!r} must be a FlashBlockSizes for the fused kernel")


def flash_attention(q, k, v, *, q_positions, kv_positions, q_segment_ids=None, kv_segment_ids=None,
                    kv_valid=None, causal=True, window=None, scale=None, softcap=None,
                    block_sizes: FlashBlockSizes | None = None, interpret: bool | None = None) -> jax.Array:
    """Attention of ``q`` over ``k, v`` (module docstring): ``(B, T, H, D)`` in ``q.dtype``.

    ``block_sizes`` defaults to ``FlashBlockSizes.get_default(T, S, D)``; ``interpret=None``
    runs the kernels in Pallas interpret mode on a CPU backend. Differentiable in
    ``q``, ``k``, ``v`` (a custom VJP running the two backward kernels).
    """
    b, t = q.shape[:2]
    s = k.shape[1] if k.ndim == 4 else -1
    named = (("q_positions", q_positions, (b, t)), ("kv_positions", kv_positions, (b, s)),
             ("q_segment_ids", q_segment_ids, (b, t)), ("kv_segment_ids", kv_segment_ids, (b, s)),
             ("kv_valid", kv_valid, (b, s)))
    if q_positions is None or kv_positions is None:
        raise ValueError("q_positions and kv_positions are required")
    _check(q, k, v, named, window, softcap, block_sizes)
    d = q.shape[3]
    cfg = FlashConfig(
        causal=bool(causal), window=window, scale=float(d ** -0.5 if scale is None else scale),
        softcap=None if softcap is None else float(softcap), groups=q.shape[2] // k.shape[2],
        segments=q_segment_ids is not None, valid=kv_valid is not None, q_len=t, kv_len=s,
        block_sizes=block_sizes or FlashBlockSizes.get_default(t, s, d),
        interpret=compat.default_interpret() if interpret is None else bool(interpret))
    q_meta = (q_positions,) + ((q_segment_ids,) if cfg.segments else ())
    kv_meta = (kv_positions,) + ((kv_segment_ids,) if cfg.segments else ()) + ((kv_valid,) if cfg.valid else ())
    return _padded_call(q, k, v, q_meta, kv_meta, cfg=cfg)
