"""Choosing the next token from the logits: greedy, or sampled after the usual filters.

For each row of ``logits`` ``(B, V)``, in this order (transformers' order of its logits
processors and warpers, so the same settings filter the same tokens):

1. repetition penalty ``p``: every token already in the row's sequence (prompt and output,
   ``seen`` ``(B, V)``) has its logit ``l`` replaced by ``l / p`` if ``l > 0``, else ``l * p``;
2. greedy (``temperature == 0``): the arg-max, and nothing below applies;
3. temperature ``tau``: ``l / tau``;
4. top-k: logits below the row's ``k``-th largest are removed (``-inf``); ties at the
   ``k``-th value are kept;
5. top-p (nucleus): with tokens sorted by probability, descending, a token is removed when
   the probability mass strictly before it already reaches ``top_p``; the most likely token
   always stays;
6. one draw from the softmax of what is left (``jax.random.categorical``).

A filtered token has probability exactly 0, so it is never drawn.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen; the defaults are greedy decoding."""

    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1: no nucleus filter
    repetition_penalty: float = 1.0  # 1: none

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0: greedy)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r} must be an int >= 0 (0: off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1: off)")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty} must be > 0 (1: off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def penalize_repeats(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """Step 1: ``l / p`` where ``l > 0`` and ``l * p`` elsewhere, for the ``seen`` tokens only."""
    if penalty == 1.0:
        return logits
    return jnp.where(seen, jnp.where(logits > 0, logits / penalty, logits * penalty), logits)


def filter_logits(logits: jax.Array, config: SamplingConfig) -> jax.Array:
    """Steps 3 to 5: the tempered logits ``(B, V)`` float32 with the filtered tokens at ``-inf``."""
    logits = logits.astype(jnp.float32) / config.temperature
    if config.top_k and config.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, config.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if config.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # the mass strictly ahead of each sorted token
        drop_sorted = before >= config.top_p
        drop_sorted = drop_sorted.at[..., 0].set(False)
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, -jnp.inf, logits)
    return logits


def next_tokens(logits: jax.Array, seen: jax.Array, key: jax.Array, config: SamplingConfig) -> jax.Array:
    """``(B,)`` int32: each row's next token from ``logits`` ``(B, V)`` (module docstring's steps)."""
    logits = penalize_repeats(logits.astype(jnp.float32), seen, config.repetition_penalty)
    if config.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, config), axis=-1).astype(jnp.int32)
