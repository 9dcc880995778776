"""Chunked cross-entropy through the output head: per-token losses without a ``(B, T, V)`` array.

For hidden states ``h`` ``(..., d)`` (after the final norm), the frozen head ``W``
``(V, d)`` and targets ``y``, each token's loss is

    nll = logsumexp(z) - z[y],    z = cap(h W^T)  (float32)

with ``cap(x) = c tanh(x / c)`` under a final-logit soft-cap ``c`` (Gemma 2), else the
identity; ``cap'(x) = 1 - tanh^2(x / c)`` scales the softmax gradient below.

computed over chunks of ``C`` tokens, so at most ``C x V`` logits exist at a time.
Its gradient with respect to ``h`` is ``dh = g * (softmax(z) - onehot(y)) W``, for
the per-token cotangent ``g`` (times ``cap'`` elementwise on the logits). That factor does not depend on ``g``, so the forward
pass of a differentiated call computes it chunk by chunk right after the chunk's
logits (as Liger's fused linear cross-entropy does) and keeps only ``(softmax - onehot) W``,
``(..., d)`` in ``h.dtype``; the backward pass scales it by ``g``. No logits are
saved or recomputed: the differentiated step does the head's two products once each,
as autodiff of the whole logits would, in ``O(C * V + T * d)`` memory.

The head is frozen (as the 4-bit weights are): it gets no gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

CHUNK_LOGIT_BYTES = 2**28  # float32 logits per chunk in auto mode: 256 MiB


def default_chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk: the largest power of two whose float32 logits fit ``CHUNK_LOGIT_BYTES``, in [128, 8192]."""
    tokens = 128
    while tokens < 8192 and 2 * tokens * vocab_size * 4 <= CHUNK_LOGIT_BYTES:
        tokens *= 2
    return tokens


def _chunk_logits(h, head, softcap):
    """``(capped logits, cap')`` of one chunk ``(C, d)``; ``cap'`` is None without a soft-cap."""
    raw = jnp.einsum("cd,vd->cv", h, head.astype(h.dtype), preferred_element_type=jnp.float32)
    if softcap is None:
        return raw, None
    t = jnp.tanh(raw / softcap)
    return softcap * t, 1.0 - t * t


def _chunk_nll(h, head, y, softcap):
    logits, _ = _chunk_logits(h, head, softcap)
    target = jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
    return jax.nn.logsumexp(logits, axis=-1) - target


def _chunk_nll_and_dh(h, head, y, softcap):
    """``(nll, (cap' * (softmax - onehot)) @ head)`` of one chunk ``(C, d)``."""
    logits, slope = _chunk_logits(h, head, softcap)
    lse = jax.nn.logsumexp(logits, axis=-1)
    nll = lse - jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
    dlogits = jnp.exp(logits - lse[:, None])
    dlogits = dlogits.at[jnp.arange(y.shape[0]), y].add(-1.0)
    if slope is not None:
        dlogits = dlogits * slope
    dh = jnp.einsum("cv,vd->cd", dlogits.astype(h.dtype), head.astype(h.dtype), preferred_element_type=jnp.float32)
    return nll, dh.astype(h.dtype)


def _chunks(h, y, chunk: int):
    """``(N, d)``, ``(N,)`` -> ``(n, C, d)``, ``(n, C)``, padding the last chunk (targets 0)."""
    n = -(-h.shape[0] // chunk)
    pad = n * chunk - h.shape[0]
    if pad:
        h, y = jnp.pad(h, ((0, pad), (0, 0))), jnp.pad(y, (0, pad))
    return h.reshape(n, chunk, h.shape[1]), y.reshape(n, chunk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _nll(h, head, y, chunk, softcap):
    hc, yc = _chunks(h, y, chunk)
    return jax.lax.map(lambda xs: _chunk_nll(xs[0], head, xs[1], softcap), (hc, yc)).reshape(-1)[: h.shape[0]]


def _nll_fwd(h, head, y, chunk, softcap):
    hc, yc = _chunks(h, y, chunk)
    nll, dh = jax.lax.map(lambda xs: _chunk_nll_and_dh(xs[0], head, xs[1], softcap), (hc, yc))
    n = h.shape[0]
    return nll.reshape(-1)[:n], dh.reshape(-1, h.shape[1])[:n]


def _nll_bwd(chunk, softcap, dh, g):
    return (g[:, None] * dh.astype(jnp.float32)).astype(dh.dtype), None, None


_nll.defvjp(_nll_fwd, _nll_bwd)


def token_nll(hidden: jax.Array, head: jax.Array, targets: jax.Array, chunk_tokens: int = 0,
              softcap: float | None = None) -> jax.Array:
    """Per-token ``logsumexp(z) - z[y]`` (module docstring; ``z`` the capped logits), float32, shaped like ``targets``.

    ``hidden`` is ``targets.shape + (d,)``, ``head`` ``(V, d)``. ``chunk_tokens``:
    tokens per chunk, 0 for ``default_chunk_tokens(V)``; a sequence shorter than a
    chunk is one chunk. ``softcap``: the final-logit soft-cap ``c`` (None: none).
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden.shape={hidden.shape} must be targets.shape={targets.shape} + (hidden,)")
    if head.ndim != 2 or head.shape[1] != hidden.shape[-1]:
        raise ValueError(f"head.shape={head.shape} must be (vocab, {hidden.shape[-1]})")
    if chunk_tokens < 0:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be >= 0 (0: auto)")
    n = targets.size
    chunk = min(chunk_tokens or default_chunk_tokens(head.shape[0]), n)
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap={softcap!r} must be > 0 or None")
    flat = _nll(hidden.reshape(n, hidden.shape[-1]), head, targets.reshape(n).astype(jnp.int32), chunk,
                None if softcap is None else float(softcap))
    return flat.reshape(targets.shape)


def reference_token_nll(hidden: jax.Array, head: jax.Array, targets: jax.Array,
                        softcap: float | None = None) -> jax.Array:
    """``token_nll`` through the whole ``(..., V)`` logits, by plain autodiff (tests and comparisons)."""
    logits = jnp.einsum("...d,vd->...v", hidden, head.astype(hidden.dtype), preferred_element_type=jnp.float32)
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    target = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target
