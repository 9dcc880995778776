"""Generation with the KV cache: one prompt or a batch of different lengths, streamed token by token.

Prompts of a batch are left-padded to the longest (``init_cache``'s ``start``: each row's
padding is never attended to and its positions count from its first token), run once to
fill the cache (prefill), then one token per step for every row; a row that has emitted an
end token keeps stepping (its output is dropped) until every row is done or the budget is
spent. The forward steps are jitted, so a generation compiles twice (the padded prompt,
then one token); ``qlora_jax.models.sampling`` chooses each token.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.models.decoder import CausalLM, init_cache
from qlora_jax.models.sampling import SamplingConfig, next_tokens


@functools.partial(jax.jit, static_argnums=0)  # compiles twice: the prompt's length, then one token
def _step(model: CausalLM, variables, tokens, cache):
    logits, cache = model.apply(variables, tokens, cache=cache)
    return logits[:, -1], cache


@functools.partial(jax.jit, static_argnums=3)
def _choose(logits, seen, key, config: SamplingConfig):
    token = next_tokens(logits, seen, key, config)
    return token, seen.at[jnp.arange(token.shape[0]), token].set(True)


def stream(
    model: CausalLM,
    variables: dict[str, Any],
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_id: int | Sequence[int] | None = None,
    sampling: SamplingConfig = SamplingConfig(),
    key: jax.Array | None = None,
) -> Iterator[list[int | None]]:
    """Yields, once per step, each prompt's new token (``None`` for a row already finished).

    A row finishes after emitting a token in ``eos_id`` (that token is yielded) or after
    ``max_new_tokens``; the iterator stops when every row has finished.
    """
    prompts = [list(p) for p in prompts]
    if not prompts or any(not p for p in prompts):
        raise ValueError("every prompt must hold at least one token")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be positive")
    vocab = model.config.vocab_size
    bad = [(i, t) for i, p in enumerate(prompts) for t in p if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"prompt {bad[0][0]} holds token {bad[0][1]}, outside the vocabulary [0, {vocab})")
    stops = set() if eos_id is None else {eos_id} if isinstance(eos_id, int) else set(eos_id)
    n, longest = len(prompts), max(map(len, prompts))
    padded = np.zeros((n, longest), np.int32)
    seen = np.zeros((n, vocab), bool)
    for i, p in enumerate(prompts):
        padded[i, longest - len(p):] = p
        seen[i, p] = True
    start = np.asarray([longest - len(p) for p in prompts], np.int32)
    cache = init_cache(model.config, n, longest + max_new_tokens, model.dtype, start=start)
    key = jax.random.key(0) if key is None else key
    logits, cache = _step(model, variables, jnp.asarray(padded), cache)
    seen = jnp.asarray(seen)
    done = [False] * n
    for i in range(max_new_tokens):
        token, seen = _choose(logits, seen, jax.random.fold_in(key, i), sampling)
        chosen = [int(t) for t in np.asarray(token)]
        yield [None if d else t for d, t in zip(done, chosen)]
        done = [d or t in stops for d, t in zip(done, chosen)]
        if all(done) or i + 1 == max_new_tokens:
            return
        logits, cache = _step(model, variables, token[:, None], cache)


def generate_batch(model: CausalLM, variables: dict[str, Any], prompts: Sequence[Sequence[int]],
                   max_new_tokens: int, eos_id: int | Sequence[int] | None = None,
                   sampling: SamplingConfig = SamplingConfig(), key: jax.Array | None = None) -> list[list[int]]:
    """Each prompt's new token ids (``stream``'s, collected), an end token included when one came."""
    out: list[list[int]] = [[] for _ in prompts]
    for tokens in stream(model, variables, prompts, max_new_tokens, eos_id, sampling, key):
        for row, t in zip(out, tokens):
            if t is not None:
                row.append(t)
    return out


def generate(
    model: CausalLM,
    variables: dict[str, Any],
    prompt: Sequence[int],
    max_new_tokens: int,
    eos_id: int | Sequence[int] | None = None,
    temperature: float = 0.0,
    key: jax.Array | None = None,
    sampling: SamplingConfig | None = None,
) -> list[int]:
    """New token ids after one ``prompt`` (greedy when ``temperature == 0``), stopping at ``eos_id``.

    ``sampling`` (when given) replaces ``temperature`` with every filter of ``SamplingConfig``.
    """
    if not len(prompt):
        raise ValueError("prompt must hold at least one token")
    sampling = SamplingConfig(temperature=temperature) if sampling is None else sampling
    return generate_batch(model, variables, [prompt], max_new_tokens, eos_id, sampling, key)[0]


def stream_text(model: CausalLM, variables: dict[str, Any], tokenizer, prompts: Sequence[str], max_new_tokens: int,
                sampling: SamplingConfig = SamplingConfig(), stop: Sequence[str] = (),
                key: jax.Array | None = None) -> Iterator[list[str]]:
    """Yields each prompt's newly decoded text once per step (``""`` when a row adds none).

    Prompts are encoded as given (apply a chat template first for a chat model). A row ends at
    the tokenizer's end token or when its text contains a ``stop`` string; the stop string and
    everything after it are never yielded: text that may begin a stop string is held back until
    it cannot. Text is decoded from the whole row each step, so a character split over several
    tokens comes out once it is complete.
    """
    stop = [s for s in stop if s]
    ids: list[list[int]] = [[] for _ in prompts]
    shown = [""] * len(prompts)
    ended = [False] * len(prompts)
    eos = tokenizer.eos_id
    steps = stream(model, variables, [tokenizer.encode(p) for p in prompts], max_new_tokens, eos_id=eos,
                   sampling=sampling, key=key)
    for step, tokens in enumerate(steps):
        delta = [""] * len(prompts)
        for i, t in enumerate(tokens):
            if t is None or ended[i]:
                continue
            if t == eos:
                ended[i] = True
            else:
                ids[i].append(t)
            text = tokenizer.decode(ids[i])
            hits = [text.find(s) for s in stop if s in text]
            if hits:
                text, ended[i] = text[:min(hits)], True
            # hold back an incomplete character, and what may be the start of a stop string
            if not ended[i] and step + 1 < max_new_tokens:
                text = text[:len(text) - _held_back(text, stop)]
            delta[i], shown[i] = text[len(shown[i]):], text
        yield delta
        if all(ended):
            return


def _held_back(text: str, stop: Sequence[str]) -> int:
    """How many trailing characters of ``text`` may not be shown yet: a partly decoded character
    (U+FFFD at the end), or the longest tail that begins some stop string."""
    tail = max((n for s in stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
    return max(tail, 1 if text.endswith("\ufffd") else 0)


def complete(model: CausalLM, variables: dict[str, Any], tokenizer, prompts: Sequence[str], max_new_tokens: int,
             sampling: SamplingConfig = SamplingConfig(), stop: Sequence[str] = (),
             key: jax.Array | None = None) -> list[str]:
    """Each prompt's completion text (``stream_text``'s, joined)."""
    out = [""] * len(prompts)
    for delta in stream_text(model, variables, tokenizer, prompts, max_new_tokens, sampling, stop, key):
        out = [a + b for a, b in zip(out, delta)]
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
