"""One attention interface for every decoder: ``attention(q, k, v, ...)``, implementation chosen by name.

Shapes: ``q`` is ``(B, T, H, D)``; ``k`` and ``v`` are ``(B, S, KV, D)`` with ``H`` a
multiple of ``KV`` (grouped-query attention: query head ``h`` reads key/value head
``h // (H / KV)``). The result is ``(B, T, H, D)`` in ``q.dtype``.

Which keys a query sees is defined by positions and segment ids, never by a mask
the caller builds. Key ``s`` is visible to query ``t`` of row ``b`` iff all of

    kv_positions[b, s] <= q_positions[b, t]                 (causal; with causal=True)
    q_positions[b, t] - kv_positions[b, s] < window          (sliding window, Mistral)
    kv_segment_ids[b, s] == q_segment_ids[b, t]              (packed rows: no leaks across examples)
    kv_valid[b, s]                                           (filled KV-cache slots)

hold. With ``l = scale * q . k`` (``scale`` defaults to ``1 / sqrt(D)``), optionally
soft-capped as ``l = softcap * tanh(l / softcap)`` (Gemma 2), the output is
``sum_s softmax_s(l) v_s`` over the visible keys, with the logits and the softmax
in float32 and the probabilities cast to ``v.dtype`` before the product with ``v``.
A query that sees no key at all gets zeros.

Implementations (``IMPLEMENTATIONS``):

* ``"reference"``: XLA einsums over the whole ``(B, KV, G, T, S)`` score array; the
  only one that builds a dense mask. Fastest for short sequences on a CPU, memory
  ``O(T * S)`` per head.
* ``"chunked"``: blockwise attention with an online softmax, in jnp and lax loops,
  on every backend (``qlora_jax.models.chunked_attention``). A custom VJP recomputes
  each block in the backward pass, so memory is ``O((T + S) * D)``; blocks with no
  visible key are skipped.
* ``"pallas"``: the fused GPU kernel (``qlora_jax.kernels.flash_attention``), same
  math and skipping; interpret mode on a CPU (tests only: slow there).
* ``"auto"``: ``resolve_implementation`` picks by backend and size, and says why.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "reference", "chunked", "pallas")
# "auto" on a CPU keeps the dense reference up to 256 x 256 scores per row: at SmolLM2's
# 4 x 256 bench step it is the faster one, and from 512 tokens on the chunked one is
# (docs/kernels.md, "Benchmark: scripts/bench_attention.py", has the crossover measured).
AUTO_REFERENCE_MAX_SCORES = 256 * 256


def resolve_implementation(implementation: str, q_len: int, kv_len: int, head_dim: int,
                           platform: str | None = None) -> tuple[str, str]:
    """``(implementation, reason)``: ``implementation`` itself unless it is ``"auto"``."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation={implementation!r} is not one of {IMPLEMENTATIONS}")
    if implementation != "auto":
        return implementation, "chosen explicitly"
    platform = platform or jax.default_backend()
    if platform in ("gpu", "cuda", "rocm"):
        from qlora_jax.kernels.flash_attention import unsupported_reason

        why = unsupported_reason(head_dim)
        if why is None:
            return "pallas", "the fused kernel on a GPU"
        return "chunked", f"the fused kernel cannot run it ({why})"
    if q_len * kv_len <= AUTO_REFERENCE_MAX_SCORES:
        return "reference", f"{q_len} x {kv_len} scores are at most {AUTO_REFERENCE_MAX_SCORES} on {platform}"
    return "chunked", f"{q_len} x {kv_len} scores exceed {AUTO_REFERENCE_MAX_SCORES} on {platform}"


def check_inputs(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, kv_valid, window, softcap):
    """Raises ``ValueError`` naming the first argument whose shape or value is wrong."""
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"attention wants q (B, T, H, D) and k, v (B, S, KV, D); got {q.shape=}, {k.shape=}, {v.shape=}")
    b, t, h, d = q.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"{k.shape=} must share batch and head dim with {q.shape=}")
    if h % k.shape[2]:
        raise ValueError(f"query heads {h} must be a multiple of key/value heads {k.shape[2]}")
    s = k.shape[1]
    for name, x, want in (("q_positions", q_positions, (b, t)), ("kv_positions", kv_positions, (b, s)),
                          ("q_segment_ids", q_segment_ids, (b, t)), ("kv_segment_ids", kv_segment_ids, (b, s)),
                          ("kv_valid", kv_valid, (b, s))):
        if x is not None and tuple(x.shape) != want:
            raise ValueError(f"{name}.shape={tuple(x.shape)} must be {want}")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("pass q_segment_ids and kv_segment_ids together (or neither)")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window={window!r} must be a positive int or None")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap={softcap!r} must be > 0 or None")


def visible(q_pos, kv_pos, q_seg=None, kv_seg=None, kv_valid=None, *, causal=True, window=None) -> jax.Array:
    """``(B, T, S)`` boolean: which keys each query sees (the module docstring's rule)."""
    mask = jnp.ones((q_pos.shape[0], q_pos.shape[1], kv_pos.shape[1]), bool)
    if causal:
        mask &= kv_pos[:, None, :] <= q_pos[:, :, None]
    if window is not None:
        mask &= q_pos[:, :, None] - kv_pos[:, None, :] < window
    if q_seg is not None:
        mask &= q_seg[:, :, None] == kv_seg[:, None, :]
    if kv_valid is not None:
        mask &= kv_valid[:, None, :]
    return mask


def soft_cap(logits: jax.Array, softcap: float | None) -> jax.Array:
    """``softcap * tanh(logits / softcap)``, or ``logits`` when ``softcap`` is None."""
    return logits if softcap is None else softcap * jnp.tanh(logits / softcap)


def reference_attention(q, k, v, *, q_positions, kv_positions, q_segment_ids=None, kv_segment_ids=None,
                        kv_valid=None, causal=True, window=None, scale=None, softcap=None) -> jax.Array:
    """The dense XLA implementation: ``(B, KV, G, T, S)`` float32 scores and a dense mask.

    Heads go first and each KV head's ``G * T`` query rows form one matrix, so both
    products are plain batched GEMMs over ``(B, KV)`` whose contraction runs along the
    stored minor dimension (a ``(B, T, KV, G, D)`` einsum made XLA transpose the scores;
    ``scripts/bench_cpu_parts.py``).
    """
    b, t, h, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    g = h // kv
    scale = d ** -0.5 if scale is None else scale
    mask = visible(q_positions, kv_positions, q_segment_ids, kv_segment_ids, kv_valid, causal=causal,
                   window=window)[:, None, None]
    qh = q.transpose(0, 2, 1, 3).reshape(b, kv, g * t, d)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    logits = jnp.einsum("bkrd,bksd->bkrs", qh, kh, preferred_element_type=jnp.float32).reshape(b, kv, g, t, s)
    logits = soft_cap(logits * scale, softcap)
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(jnp.any(mask, axis=-1, keepdims=True), probs, 0.0)  # a query with no key gets zeros
    out = jnp.einsum("bkrs,bksd->bkrd", probs.astype(v.dtype).reshape(b, kv, g * t, s), vh,
                     preferred_element_type=jnp.float32).reshape(b, kv, g, t, d)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q.dtype)


def attention(q, k, v, *, q_positions, kv_positions=None, q_segment_ids=None, kv_segment_ids=None,
              kv_valid=None, causal: bool = True, window: int | None = None, scale: float | None = None,
              softcap: float | None = None, implementation: str = "auto", block_sizes=None) -> jax.Array:
    """Attention of ``q`` over ``k, v`` (module docstring): ``(B, T, H, D)`` in ``q.dtype``.

    ``kv_positions`` defaults to ``q_positions`` (self-attention, ``S == T``).
    ``block_sizes`` goes to the chunked or fused implementation (their defaults
    otherwise) and is ignored by the reference.
    """
    kv_positions = q_positions if kv_positions is None else kv_positions
    check_inputs(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, kv_valid, window, softcap)
    name, _ = resolve_implementation(implementation, q.shape[1], k.shape[1], q.shape[3])
    kw = dict(q_positions=q_positions, kv_positions=kv_positions, q_segment_ids=q_segment_ids,
              kv_segment_ids=kv_segment_ids, kv_valid=kv_valid, causal=causal, window=window, scale=scale,
              softcap=softcap)
    if name == "reference":
        return reference_attention(q, k, v, **kw)
    if name == "chunked":
        from qlora_jax.models.chunked_attention import chunked_attention

        return chunked_attention(q, k, v, block_sizes=block_sizes, **kw)
    from qlora_jax.kernels.flash_attention import flash_attention

    return flash_attention(q, k, v, block_sizes=block_sizes, **kw)
