"""The train step: exact gradient accumulation, and the non-finite guard that skips a step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.layers import QuantConfig, split_trainable
from qlora_jax.models import LlamaConfig, LlamaForCausalLM, LoraConfig, variables_from_tensors
from qlora_jax.optim import OptimizerConfig, make_optimizer
from qlora_jax.train.step import make_eval_step, make_train_step
from testlib import random_llama_tensors

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


def test_accumulation_equals_one_big_batch(setup, rng):
    """4 micro-batches of 2 rows give the same update as one batch of 8 rows (token-weighted mean)."""
    model, params, frozen = setup
    tx = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_ratio=0.0), 10)
    big = _batch(rng, 1, 8, 16)
    micro = {k: v.reshape(4, 2, 16) for k, v in big.items()}
    step = jax.jit(make_train_step(model, tx))
    p1, _, m1 = step(params, tx.init(params), frozen, big, jax.random.key(0))
    p2, _, m2 = step(params, tx.init(params), frozen, micro, jax.random.key(0))
    np.testing.assert_allclose(float(m1.loss), float(m2.loss), rtol=1e-6)
    assert float(m1.tokens) == float(m2.tokens) == big["loss_mask"].sum()
    # atol = 1e-4 of the step size: Adam's first step is lr * g / (|g| + eps), so a weight whose
    # gradient is near eps moves by an amount that the summation order of g can change
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    total, count = jax.jit(make_eval_step(model))(params, frozen, micro)
    np.testing.assert_allclose(float(total / count), float(m1.loss), rtol=1e-5)  # eval = train loss before the update


def test_remat_full_inside_accumulation_gives_the_same_update(setup, rng):
    """``remat_layer``'s custom VJP inside the micro-batch loop: the update of remat none."""
    model, params, frozen = setup
    rematted = LlamaForCausalLM(CFG, model.lora, quant=QuantConfig(), dtype=jnp.float32, remat="full")
    tx = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_ratio=0.0), 10)
    micro = _batch(rng, 3, 2, 16)
    p1, _, m1 = jax.jit(make_train_step(model, tx))(params, tx.init(params), frozen, micro, jax.random.key(0))
    p2, _, m2 = jax.jit(make_train_step(rematted, tx))(params, tx.init(params), frozen, micro, jax.random.key(0))
    np.testing.assert_allclose(float(m2.loss), float(m1.loss), rtol=1e-6)
    # atol = 5e-4 of the 0.02 step: as in the accumulation test, a weight whose gradient is near
    # Adam's eps moves by an amount the recomputation's summation order can change (seen: 2.7e-4)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)


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
