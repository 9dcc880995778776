"""Sampling filters (against transformers' logits processors), determinism, and batched / streamed generation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.layers import QuantConfig
from qlora_jax.models import LlamaConfig, LlamaForCausalLM, LoraConfig, SamplingConfig, variables_from_tensors
from qlora_jax.models.generate import complete, generate, generate_batch, greedy_reference, stream_text
from qlora_jax.models.sampling import filter_logits, next_tokens, penalize_repeats
from testlib import random_llama_tensors

V = 64


def _logits(rng, b=4):
    return jnp.asarray(rng.standard_normal((b, V)).astype(np.float32) * 3)


@pytest.mark.oracle
@pytest.mark.parametrize("temperature,top_k,top_p,penalty", [(0.7, 5, 1.0, 1.3), (1.3, 0, 0.8, 1.0),
                                                             (1.0, 12, 0.5, 0.8), (0.5, 0, 0.95, 1.1)])
def test_filters_match_transformers(rng, temperature, top_k, top_p, penalty):
    """The same settings keep the same tokens with the same tempered logits as transformers' processors."""
    import torch
    from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    logits = _logits(rng)
    ids = rng.integers(0, V, (4, 9))
    seen = np.zeros((4, V), bool)
    np.put_along_axis(seen, ids, True, axis=1)
    cfg = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty)
    ours = np.asarray(filter_logits(penalize_repeats(logits, jnp.asarray(seen), penalty), cfg))
    theirs = torch.from_numpy(np.asarray(logits).copy())
    input_ids = torch.from_numpy(ids)
    processors = [TemperatureLogitsWarper(temperature)]
    if penalty != 1.0:
        processors.insert(0, RepetitionPenaltyLogitsProcessor(penalty))
    if top_k:
        processors.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p))
    for p in processors:
        theirs = p(input_ids, theirs)
    theirs = theirs.numpy()
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(theirs))
    kept = ~np.isinf(ours)
    np.testing.assert_allclose(ours[kept], theirs[kept], rtol=1e-6, atol=1e-6)
    assert kept.sum(axis=1).min() >= 1


def test_filtered_tokens_are_never_drawn(rng):
    """Over many keys, every draw is among the tokens top-k / top-p keep, and the kept ones all occur."""
    logits = _logits(rng, 2)
    for cfg in (SamplingConfig(temperature=1.0, top_k=4), SamplingConfig(temperature=2.0, top_p=0.6)):
        kept = ~np.isinf(np.asarray(filter_logits(logits, cfg)))
        draws = jax.vmap(lambda k: next_tokens(logits, jnp.zeros((2, V), bool), k, cfg))(
            jax.random.split(jax.random.key(1), 3000))
        draws = np.asarray(draws)
        for row in range(2):
            got = set(draws[:, row].tolist())
            assert got <= set(np.flatnonzero(kept[row]).tolist())
            assert len(got) == kept[row].sum()  # each kept token has probability >= 1/V here


def test_same_key_same_tokens_and_greedy_is_argmax(rng):
    logits = _logits(rng)
    seen = jnp.zeros((4, V), bool)
    cfg = SamplingConfig(temperature=0.9, top_p=0.9)
    a = next_tokens(logits, seen, jax.random.key(3), cfg)
    np.testing.assert_array_equal(a, next_tokens(logits, seen, jax.random.key(3), cfg))
    many = {tuple(np.asarray(next_tokens(logits, seen, jax.random.key(k), cfg))) for k in range(20)}
    assert len(many) > 1  # the key matters
    np.testing.assert_array_equal(next_tokens(logits, seen, jax.random.key(3), SamplingConfig()),
                                  np.argmax(np.asarray(logits), axis=1))


def test_bad_settings_are_named():
    for kw, name in (({"temperature": -1.0}, "temperature"), ({"top_k": -2}, "top_k"), ({"top_p": 0.0}, "top_p"),
                     ({"top_p": 1.5}, "top_p"), ({"repetition_penalty": 0.0}, "repetition_penalty")):
        with pytest.raises(ValueError, match=name):
            SamplingConfig(**kw)


CFG = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)


@pytest.fixture(scope="module")
def tiny():
    rng = np.random.default_rng(7)
    v = variables_from_tensors(CFG, random_llama_tensors(rng, CFG).items(), quant=QuantConfig(), lora=LoraConfig(rank=4),
                               base_dtype=jnp.float32)
    return LlamaForCausalLM(CFG, LoraConfig(rank=4), quant=QuantConfig(), dtype=jnp.float32), v


def test_batched_prompts_of_different_lengths_equal_each_alone(tiny):
    """Left-padded rows generate exactly what each prompt generates alone (greedy, and sampled with the
    same key per step), and greedy equals the no-cache reference."""
    model, v = tiny
    prompts = [[5, 9, 2, 33, 7, 1, 60], [11], [3, 3, 40, 8]]
    batch = generate_batch(model, v, prompts, 6)
    for p, got in zip(prompts, batch):
        assert got == generate(model, v, p, 6) == greedy_reference(model, v, p, 6)
    cfg = SamplingConfig(temperature=1.5, top_k=20)
    a = generate_batch(model, v, prompts, 5, sampling=cfg, key=jax.random.key(4))
    assert a == generate_batch(model, v, prompts, 5, sampling=cfg, key=jax.random.key(4))
    assert a != generate_batch(model, v, prompts, 5, sampling=cfg, key=jax.random.key(5))


def test_end_token_stops_its_row_only(tiny):
    model, v = tiny
    prompts = [[5, 9, 2], [11, 12]]
    free = generate_batch(model, v, prompts, 6)
    eos = free[0][2]
    stopped = generate_batch(model, v, prompts, 6, eos_id=eos)
    assert stopped[0] == free[0][:free[0].index(eos) + 1]
    cut = free[1].index(eos) + 1 if eos in free[1] else 6
    assert stopped[1] == free[1][:cut]


class _CharTokenizer:
    """Token i is the character chr(ord('a') + i % 26); 63 is the end token."""

    eos_id = 63

    def encode(self, text):
        return [ord(c) - ord("a") for c in text]

    def decode(self, ids):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def test_stop_strings_and_streamed_text(tiny):
    model, v = tiny
    tok = _CharTokenizer()
    prompts = ["hello", "abc"]
    full = complete(model, v, tok, prompts, 8)
    deltas = list(stream_text(model, v, tok, prompts, 8))
    assert ["".join(d[i] for d in deltas) for i in range(2)] == full
    stop = full[0][2:4]  # a two-character stop string inside the first completion
    cut = complete(model, v, tok, prompts, 8, stop=[stop])
    assert cut[0] == full[0][:full[0].index(stop)]
    assert cut[1] == (full[1][:full[1].index(stop)] if stop in full[1] else full[1])
    for d in stream_text(model, v, tok, prompts, 8, stop=[stop]):  # never shows any of the stop string
        assert stop not in "".join(d)
