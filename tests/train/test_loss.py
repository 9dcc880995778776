"""The chunked cross-entropy: today's loss and gradients, tied and untied heads, no (B, T, V) array.

Tolerance: the chunked loss does the same float32 products as the whole-logits one, so
values agree to summation order; the gradient ``(softmax - onehot) W`` is a sum over V
terms of size |W|: a few float32 ulps times sqrt(V), 1e-5 relative to the largest entry.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.layers import QuantConfig, split_trainable
from qlora_jax.models import LlamaConfig, LlamaForCausalLM, LoraConfig, variables_from_tensors
from qlora_jax.train.loss import default_chunk_tokens, reference_token_nll, token_nll
from qlora_jax.train.step import make_eval_step, token_losses
from testlib import random_llama_tensors

REL = 1e-5


def _rel_max(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.mark.parametrize("chunk", [0, 1, 7, 64, 1000])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_token_nll_matches_whole_logits(rng, chunk, dtype):
    b, t, d, vocab = 3, 29, 32, 203  # 87 tokens: ragged for every chunk size above
    h = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32).astype(dtype)
    head = jnp.asarray(rng.standard_normal((vocab, d)) * 0.3, jnp.bfloat16)
    y = jnp.asarray(rng.integers(0, vocab, (b, t)), jnp.int32)
    g = jnp.asarray(rng.standard_normal((b, t)), jnp.float32)
    got, vjp = jax.vjp(lambda h: token_nll(h, head, y, chunk), h)
    want, vjp_ref = jax.vjp(lambda h: reference_token_nll(h, head, y), h)
    tol = REL if dtype == "float32" else 2.0**-7  # bf16: dlogits and dh rounded to 8 bits
    assert got.shape == (b, t) and got.dtype == jnp.float32
    assert _rel_max(got, want) <= REL  # same float32 logits either way
    assert _rel_max(vjp(g)[0], vjp_ref(g)[0]) <= tol
    assert vjp(g)[0].dtype == h.dtype


@pytest.mark.parametrize("chunk", [0, 7])
def test_soft_capped_token_nll_matches_whole_logits(rng, chunk):
    """Gemma 2's final cap ``c tanh(z / c)``: values and the gradient (through ``cap'``) as autodiff gives them,
    and the cap changes both (the logits here reach well past c = 2)."""
    b, t, d, vocab = 2, 13, 32, 97
    h = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
    head = jnp.asarray(rng.standard_normal((vocab, d)) * 0.5, jnp.float32)
    y = jnp.asarray(rng.integers(0, vocab, (b, t)), jnp.int32)
    g = jnp.asarray(rng.standard_normal((b, t)), jnp.float32)
    got, vjp = jax.vjp(lambda h: token_nll(h, head, y, chunk, softcap=2.0), h)
    want, vjp_ref = jax.vjp(lambda h: reference_token_nll(h, head, y, softcap=2.0), h)
    assert _rel_max(got, want) <= REL and _rel_max(vjp(g)[0], vjp_ref(g)[0]) <= REL
    uncapped, vjp_plain = jax.vjp(lambda h: reference_token_nll(h, head, y), h)
    assert _rel_max(uncapped, want) > 0.1 and _rel_max(vjp_plain(g)[0], vjp_ref(g)[0]) > 0.1
    with pytest.raises(ValueError, match="softcap=0.0 must be > 0"):
        token_nll(h, head, y, chunk, softcap=0.0)


def _tiny(rng, tied: bool):
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, tie_word_embeddings=tied)
    lora = LoraConfig(rank=4)
    v = variables_from_tensors(cfg, random_llama_tensors(rng, cfg).items(), quant=QuantConfig(), lora=lora,
                               base_dtype=jnp.float32)
    v["params"] = jax.tree.map(lambda p: p + 0.02, v["params"])
    return LlamaForCausalLM(cfg, lora, quant=QuantConfig(), dtype=jnp.float32), v


def _whole_logits_losses(model, variables, batch):
    """The trainer's loss before chunking: whole logits, logsumexp - target logit."""
    logits = model.apply(variables, batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"])
    target = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
    mask = batch["loss_mask"]
    return jnp.sum((jax.nn.logsumexp(logits, axis=-1) - target) * mask), jnp.sum(mask)


@pytest.mark.parametrize("tied", [True, False])
def test_train_and_eval_losses_equal_whole_logits(rng, tied):
    model, v = _tiny(rng, tied)
    b, t = 2, 24
    batch = {"tokens": jnp.asarray(rng.integers(0, 96, (b, t)), jnp.int32),
             "targets": jnp.asarray(rng.integers(0, 96, (b, t)), jnp.int32),
             "loss_mask": jnp.asarray(rng.random((b, t)) < 0.7, jnp.float32),
             "segment_ids": jnp.ones((b, t), jnp.int32), "positions": jnp.broadcast_to(jnp.arange(t), (b, t))}
    params, frozen = split_trainable(v)
    chunked = lambda p: token_losses(model, {**frozen, "params": p}, batch, None, True, loss_chunk=5)[0]  # noqa: E731
    whole = lambda p: _whole_logits_losses(model, {**frozen, "params": p}, batch)[0]  # noqa: E731
    (a, ga), (w, gw) = jax.value_and_grad(chunked)(params), jax.value_and_grad(whole)(params)
    assert abs(float(a) / float(w) - 1) <= REL
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gw)):
        assert _rel_max(x, y) <= 1e-4  # through the layer: LoRA gradients of a few float32 GEMMs
    total, count = make_eval_step(model, loss_chunk=5)(params, frozen, jax.tree.map(lambda x: x[None], batch))
    assert abs(float(total) / float(w) - 1) <= REL and float(count) == float(batch["loss_mask"].sum())


def test_no_vocab_sized_array_in_the_gradient():
    """XLA's temporaries for the loss gradient at 8192 tokens x 32768 vocab: the whole-logits loss needs
    several (T, V) float32 arrays (1 GiB each); the chunked one a few (C, V) chunks."""
    t, d, vocab = 8192, 64, 32768
    h = jax.ShapeDtypeStruct((1, t, d), jnp.float32)
    head = jax.ShapeDtypeStruct((vocab, d), jnp.bfloat16)
    y = jax.ShapeDtypeStruct((1, t), jnp.int32)

    def temp(loss):
        f = jax.jit(jax.grad(lambda h, w, y: loss(h, w, y).sum()))
        return f.lower(h, head, y).compile().memory_analysis().temp_size_in_bytes

    chunk = default_chunk_tokens(vocab)
    whole_logits = t * vocab * 4
    assert temp(reference_token_nll) > 2 * whole_logits
    assert temp(lambda h, w, y: token_nll(h, w, y)) < 4 * chunk * vocab * 4 + 4 * t * d * 4 + vocab * d * 4


def test_default_chunk_and_bad_input():
    assert default_chunk_tokens(49152) == 1024 and default_chunk_tokens(128256) == 512
    assert default_chunk_tokens(258) == 8192 and default_chunk_tokens(10**7) == 128
    h, head, y = jnp.zeros((2, 3, 8)), jnp.zeros((10, 8)), jnp.zeros((2, 3), jnp.int32)
    with pytest.raises(ValueError, match="targets.shape"):
        token_nll(h, head, y[:, :2])
    with pytest.raises(ValueError, match="head.shape"):
        token_nll(h, head[:, :4], y)
    with pytest.raises(ValueError, match="chunk_tokens=-1"):
        token_nll(h, head, y, -1)
