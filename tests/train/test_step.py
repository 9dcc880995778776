"""The train step: exact gradient accumulation, and the non-finite guard that skips a step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qlora_jax.layers import QuantConfig, split_trainable
from qlora_jax.models import LlamaConfig, LlamaForCausalLM, LoraConfig, variables_from_tensors
from qlora_jax.optim import OptimizerConfig, make_optimizer
from qlora_jax.train.step import make_eval_step, make_train_step
from testlib import assert_trees_close, random_llama_tensors, reorder_rtol

CFG = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)


@pytest.fixture
def setup(rng):
    lora = LoraConfig(rank=4)
    v = variables_from_tensors(CFG, random_llama_tensors(rng, CFG).items(), quant=QuantConfig(), lora=lora, base_dtype=jnp.float32)
    model = LlamaForCausalLM(CFG, lora, quant=QuantConfig(), dtype=jnp.float32)
    params, frozen = split_trainable(v)
    params = jax.tree.map(lambda p: p + 0.01, params)
    return model, params, frozen


def _batch(rng, a, b, t):
    return {"tokens": rng.integers(0, 64, (a, b, t)).astype(np.int32), "targets": rng.integers(0, 64, (a, b, t)).astype(np.int32),
            "loss_mask": (rng.random((a, b, t)) < 0.6).astype(np.float32), "segment_ids": np.ones((a, b, t), np.int32),
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (a, b, t)).copy()}


def gradient_capture() -> optax.GradientTransformation:
    """An "optimizer" whose new state is the gradient it was given and whose update is zero.

    The step's gradient is what the math says must match between two ways of computing it; the
    parameters after an Adam step are not: Adam's first step is ``lr * g / (|g| + eps)``, which
    turns a last-bit difference in a gradient near ``eps`` into a difference of up to ``lr``.
    """
    return optax.GradientTransformation(lambda params: jax.tree.map(jnp.zeros_like, params),
                                        lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def _reorder_rtol(b: int, t: int) -> float:
    """Float32 summation-order tolerance of this one-layer model's loss and LoRA gradients.

    The longest chain of sums: over the step's ``b * t`` tokens (the parameter gradient and the
    loss), and forward and backward through the layer and head over hidden (norm, projections),
    intermediate (down_proj), the sequence (attention) and the vocabulary (log-sum-exp).
    """
    n = b * t + 2 * (CFG.hidden_size + CFG.intermediate_size + t + CFG.vocab_size)
    return reorder_rtol(n)


def test_accumulation_equals_one_big_batch(setup, rng):
    """4 micro-batches of 2 rows give the gradient of one batch of 8 rows (token-weighted mean)."""
    model, params, frozen = setup
    tx = gradient_capture()
    big = _batch(rng, 1, 8, 16)
    micro = {k: v.reshape(4, 2, 16) for k, v in big.items()}
    step = jax.jit(make_train_step(model, tx))
    _, g1, m1 = step(params, tx.init(params), frozen, big, jax.random.key(0))
    _, g2, m2 = step(params, tx.init(params), frozen, micro, jax.random.key(0))
    rtol = _reorder_rtol(8, 16)
    np.testing.assert_allclose(float(m2.loss), float(m1.loss), rtol=rtol)
    np.testing.assert_allclose(float(m2.grad_norm), float(m1.grad_norm), rtol=rtol)
    assert float(m1.tokens) == float(m2.tokens) == big["loss_mask"].sum()
    assert_trees_close(g2, g1, rtol)
    total, count = jax.jit(make_eval_step(model))(params, frozen, micro)
    np.testing.assert_allclose(float(total / count), float(m1.loss), rtol=rtol)  # eval = train loss before the update


def test_remat_full_inside_accumulation_gives_the_same_gradient(setup, rng):
    """Remat inside the layer scan, inside the micro-batch loop: the gradient of remat none."""
    model, params, frozen = setup
    rematted = LlamaForCausalLM(CFG, model.lora, quant=QuantConfig(), dtype=jnp.float32, remat="full")
    tx = gradient_capture()
    micro = _batch(rng, 3, 2, 16)
    _, g1, m1 = jax.jit(make_train_step(model, tx))(params, tx.init(params), frozen, micro, jax.random.key(0))
    _, g2, m2 = jax.jit(make_train_step(rematted, tx))(params, tx.init(params), frozen, micro, jax.random.key(0))
    rtol = _reorder_rtol(3 * 2, 16)
    np.testing.assert_allclose(float(m2.loss), float(m1.loss), rtol=rtol)
    assert_trees_close(g2, g1, rtol)


@pytest.mark.parametrize("offload", [False, True])
def test_non_finite_step_is_skipped(setup, rng, offload):
    model, params, frozen = setup
    tx = make_optimizer(OptimizerConfig(learning_rate=1e-2, offload=offload), 10, skip_nonfinite=True)
    step = jax.jit(make_train_step(model, tx))
    state = tx.init(params)
    bad = _batch(rng, 1, 2, 16)
    bad["loss_mask"][0, 0, 3] = np.nan
    p_bad, s_bad, m = step(params, state, frozen, bad, jax.random.key(0))
    assert not bool(m.finite)
    for a, b in zip(jax.tree.leaves(p_bad), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    inner_counts = [np.asarray(x) for x in jax.tree.leaves(s_bad) if np.asarray(x).dtype == np.int32]
    assert any(int(c) == 1 for c in inner_counts)  # apply_if_finite counted the bad step
    p_good, _, m = step(p_bad, s_bad, frozen, _batch(rng, 1, 2, 16), jax.random.key(1))
    assert bool(m.finite)
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(p_good), jax.tree.leaves(params)))
