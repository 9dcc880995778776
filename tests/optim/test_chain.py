"""The default QLoRA optimizer chain: schedules, defaults, composition, validation."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qlora_jax.optim import OptimizerConfig, make_optimizer, make_schedule


def test_defaults_are_qlora_paper():
    c = OptimizerConfig()
    assert (c.learning_rate, c.max_grad_norm, c.weight_decay, c.warmup_ratio, c.schedule, c.state_bits) == (
        2e-4, 0.3, 0.0, 0.03, "constant", 32)


def test_schedules():
    const = make_schedule(OptimizerConfig(), total_steps=1000)  # 30 warmup steps, then 2e-4
    assert float(const(0)) == 0.0 and float(const(15)) == pytest.approx(1e-4) and float(const(30)) == pytest.approx(2e-4)
    assert float(const(999)) == pytest.approx(2e-4)
    cos = make_schedule(OptimizerConfig(schedule="cosine", final_lr_ratio=0.1), total_steps=1000)
    assert float(cos(30)) == pytest.approx(2e-4) and float(cos(1000)) == pytest.approx(2e-5)
    assert float(cos(515)) == pytest.approx(1.1e-4, rel=1e-3)  # halfway through the decay: (1 + 0.1) / 2
    lin = make_schedule(OptimizerConfig(schedule="linear", warmup_ratio=0.0), total_steps=100)
    assert float(lin(0)) == pytest.approx(2e-4) and float(lin(50)) == pytest.approx(1e-4) and float(lin(100)) == 0.0


def test_default_chain_equals_hand_built_optax(rng):
    params = {"a": jnp.asarray(rng.standard_normal((64, 8)), jnp.float32), "b": jnp.asarray(rng.standard_normal((8,)), jnp.float32)}
    ours = make_optimizer(OptimizerConfig(learning_rate=1e-2), total_steps=100)
    sched = optax.join_schedules([optax.linear_schedule(0.0, 1e-2, 3), optax.constant_schedule(1e-2)], [3])
    theirs = optax.chain(optax.clip_by_global_norm(0.3), optax.adamw(sched, weight_decay=0.0))
    s1, s2, p1, p2 = ours.init(params), theirs.init(params), params, params
    step = lambda tx: jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p)))
    f1, f2 = step(ours), step(theirs)
    for _ in range(10):
        g = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params)
        p1, s1 = f1(p1, s1, g)
        p2, s2 = f2(p2, s2, g)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(p1["a"]), np.asarray(params["a"]))


@pytest.mark.parametrize("config", [OptimizerConfig(state_bits=8), OptimizerConfig(offload=True, offload_per_layer=True),
                                    OptimizerConfig(state_bits=8, offload=True, max_grad_norm=None)])
def test_variants_train_a_toy_regression(rng, config):
    """Every variant fits y = X w (8-bit state on a 64 x 128 = 8192-element weight)."""
    x = jnp.asarray(rng.standard_normal((256, 64)), jnp.float32)
    w_true = jnp.asarray(rng.standard_normal((64, 128)), jnp.float32)
    y = x @ w_true
    params = {"layers": {"w": jnp.zeros((2, 64, 128), jnp.float32) + 0.01}, "head": {"b": jnp.zeros((128,), jnp.float32)}}
    loss = lambda p: jnp.mean((x @ (p["layers"]["w"][0] + p["layers"]["w"][1]) + p["head"]["b"] - y) ** 2)
    tx = make_optimizer(dataclasses.replace(config, learning_rate=5e-2, warmup_ratio=0.0), total_steps=200)
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        l, g = jax.value_and_grad(loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, l

    first = None
    for _ in range(200):
        params, state, l = step(params, state)
        first = float(l) if first is None else first
    assert float(loss(params)) < 0.02 * first


def test_bad_config():
    with pytest.raises(ValueError, match="schedule='step'"):
        OptimizerConfig(schedule="step")
    with pytest.raises(ValueError, match="state_bits=4"):
        OptimizerConfig(state_bits=4)
    with pytest.raises(ValueError, match="warmup_ratio=1.5"):
        OptimizerConfig(warmup_ratio=1.5)
    with pytest.raises(ValueError, match="max_grad_norm=0"):
        OptimizerConfig(max_grad_norm=0)
    with pytest.raises(ValueError, match="offload_per_layer=True needs offload=True"):
        OptimizerConfig(offload_per_layer=True)
    with pytest.raises(ValueError, match="total_steps=0"):
        make_schedule(OptimizerConfig(), 0)
    with pytest.raises(ValueError, match="learning_rate=0"):
        OptimizerConfig(learning_rate=0)
    with pytest.raises(ValueError, match="lora_plus_ratio=0"):
        OptimizerConfig(lora_plus_ratio=0)


@pytest.mark.parametrize("offload", [False, True])
def test_lora_plus_is_adamw_with_a_larger_learning_rate_for_b(rng, offload):
    """AdamW's update is linear in lr (weight decay included), so LoRA+ must give B exactly ratio x the
    update of ratio 1 and leave A and the DoRA magnitude alone, step after step (ratio 16: a power of
    two, so the product is exact)."""
    leaf = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    params = {"layers": {"q_proj": {"lora_a": leaf(2, 32, 4), "lora_b": leaf(2, 4, 16), "lora_magnitude": leaf(2, 16)}}}
    config = OptimizerConfig(learning_rate=1e-2, warmup_ratio=0.0, weight_decay=0.1, offload=offload)
    one, plus = (make_optimizer(dataclasses.replace(config, lora_plus_ratio=r), 10) for r in (1.0, 16.0))
    s1, s16 = one.init(params), plus.init(params)
    for _ in range(3):
        g = jax.tree.map(lambda x: leaf(*x.shape), params)
        u1, s1 = jax.jit(one.update)(g, s1, params)
        u16, s16 = jax.jit(plus.update)(g, s16, params)
        for k, u in u16["layers"]["q_proj"].items():
            expect = u1["layers"]["q_proj"][k] * (16.0 if k == "lora_b" else 1.0)
            np.testing.assert_array_equal(np.asarray(u), np.asarray(expect), err_msg=k)
        params = optax.apply_updates(params, u16)  # B runs ahead; both see the same params
