"""Mixtral's experts: the grouped matmul against every-expert-on-every-token, and the 4-bit expert stacks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from testlib import reorder_rtol

from qlora_jax.models.blocks import activation
from qlora_jax.models.mixtral import expert_weights, experts_mlp, route
from qlora_jax.models.stacking import layer_slice, stack_layers
from qlora_jax.quant import quantize


def _inputs(rng, n=37, h=32, i=48, e=5):
    x = jnp.asarray(rng.standard_normal((n, h)), jnp.float32)
    router = jnp.asarray(rng.standard_normal((e, h)), jnp.float32)
    ws = [jnp.asarray(rng.standard_normal(s) * 0.2, jnp.float32) for s in ((e, i, h), (e, h, i), (e, i, h))]
    return x, router, ws


def test_grouped_experts_equal_dense_ones_and_their_gradients(rng):
    x, router, (w1, w2, w3) = _inputs(rng)
    weights, chosen = route(x, router, 2)
    assert chosen.shape == (37, 2) and np.allclose(np.asarray(weights.sum(-1)), 1.0, rtol=1e-6)
    assert (np.asarray(weights[:, 0]) >= np.asarray(weights[:, 1])).all()
    act = activation("silu")
    g = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

    def run(impl):
        y, vjp = jax.vjp(lambda x: experts_mlp(x, weights, chosen, w1, w2, w3, act, impl), x)
        return y, vjp(g)[0]

    (yg, dg), (yd, dd) = run("grouped"), run("dense")
    rtol = reorder_rtol(2 * 48 + 32)  # each output is a chain of the two products and the weighted sum
    np.testing.assert_allclose(np.asarray(yg), np.asarray(yd), rtol=rtol, atol=rtol * float(np.abs(yd).max()))
    np.testing.assert_allclose(np.asarray(dg), np.asarray(dd), rtol=rtol, atol=rtol * float(np.abs(dd).max()))
    # and each token got exactly its two experts: a one-expert reference for token 0
    e0, e1 = (int(v) for v in chosen[0])
    one = lambda e: w2[e] @ (act(w1[e] @ x[0]) * (w3[e] @ x[0]))  # noqa: E731
    np.testing.assert_allclose(np.asarray(yd[0]), np.asarray(weights[0, 0] * one(e0) + weights[0, 1] * one(e1)),
                               rtol=1e-5, atol=1e-6)


def test_stacked_4bit_experts_dequantize_one_by_one(rng):
    ws = [jnp.asarray(rng.standard_normal((48, 32)), jnp.float32) for _ in range(3)]
    stack = stack_layers([quantize(w, "nf4", 64, double_quant=True) for w in ws])
    assert stack.codes.shape == (3, 48 * 32 // 2) and stack.shape == (48, 32)
    got = expert_weights(stack, jnp.float32)
    for e in range(3):
        np.testing.assert_array_equal(np.asarray(got[e]), np.asarray(layer_slice(stack, e).dequantize(jnp.float32)))
