"""Greedy / sampled generation with the KV cache.

The prompt is run once to fill the cache (prefill), then one token at a time;
both steps are jitted, so a whole generation compiles twice.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.models.decoder import CausalLM, init_cache


@functools.partial(jax.jit, static_argnums=0)  # compiles twice: the prompt's length, then one token
def _step(model: CausalLM, variables, tokens, cache):
    logits, cache = model.apply(variables, tokens, cache=cache)
    return logits[:, -1], cache


def generate(
    model: CausalLM,
    variables: dict[str, Any],
    prompt: Sequence[int],
    max_new_tokens: int,
    eos_id: int | Sequence[int] | None = None,
    temperature: float = 0.0,
    key: jax.Array | None = None,
) -> list[int]:
    """New token ids after ``prompt`` (greedy when ``temperature == 0``), stopping at ``eos_id``."""
    if not len(prompt):
        raise ValueError("prompt must hold at least one token")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be positive")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    stops = set() if eos_id is None else {eos_id} if isinstance(eos_id, int) else set(eos_id)
    cache = init_cache(model.config, 1, len(prompt) + max_new_tokens, model.dtype)
    key = jax.random.key(0) if key is None else key
    logits, cache = _step(model, variables, jnp.asarray([list(prompt)], jnp.int32), cache)
    out: list[int] = []
    for _ in range(max_new_tokens):
        if temperature == 0:
            token = int(jnp.argmax(logits[0]))
        else:
            key, sub = jax.random.split(key)
            token = int(jax.random.categorical(sub, logits[0] / temperature))
        out.append(token)
        if token in stops:
            break
        logits, cache = _step(model, variables, jnp.asarray([[token]], jnp.int32), cache)
    return out


def greedy_reference(model: CausalLM, variables, prompt: Sequence[int], steps: int) -> list[int]:
    """Greedy tokens by re-running the whole sequence each step (no cache); for tests.

    Every step runs the same ``(1, len(prompt) + steps)`` row, the tokens not yet chosen held
    at 0 and read nowhere: a causal model's logits at a position do not depend on the tokens
    after it, so this is the plain loop over growing sequences, compiled once instead of once
    per length (a model that let later tokens reach earlier positions would read the zeros and
    disagree with ``generate``).
    """
    n = len(prompt)
    seq = np.zeros((1, n + steps), np.int32)
    seq[0, :n] = prompt
    forward = jax.jit(model.apply)
    for i in range(steps):
        logits = forward(variables, jnp.asarray(seq))
        seq[0, n + i] = int(np.argmax(np.asarray(logits[0, n + i - 1])))
    return seq[0, n:].tolist()
