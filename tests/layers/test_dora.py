"""DoRA: the chunked row norm from the 4-bit base, the layer's forward and gradients, init, the model path.

References are dense and independent of the layer's arithmetic: the merged weight
``W' = g[:, None] * (W + s (A B)^T)``, ``g = m / stop_gradient(||W + s (A B)^T||_row)``, applied as
one matmul (``y = x W'^T + bias``), which is peft's forward without dropout. Tolerances are
``reorder_rtol`` of the longest chain of float32 sums (the two evaluations round in other orders).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.layers import QLoRADense, QuantConfig, merge, split_trainable
from qlora_jax.layers.dora import chunk_rows, weight_norm
from qlora_jax.quant import QuantizedArray, quantize
from testlib import assert_trees_close, fixed_mask, fixed_mask_layer, reorder_rtol


def _x(rng, shape, scale=1.0):
    return jnp.asarray((rng.standard_normal(shape) * scale).astype(np.float32))


def _dense(kernel) -> np.ndarray:
    return np.asarray(kernel.dequantize(jnp.float32) if isinstance(kernel, QuantizedArray) else kernel, np.float64)


@pytest.mark.parametrize("quant_type,shape", [("nf4", (96, 80)), ("nf4", (33, 50)), ("fp4", (5, 7)), (None, (130, 64))])
def test_weight_norm_in_chunks_equals_the_dense_norm(rng, shape, quant_type):
    w = _x(rng, shape, 0.05)
    kernel = w if quant_type is None else quantize(w, quant_type, 64, double_quant=True)
    a, b = _x(rng, (shape[1], 4)), _x(rng, (4, shape[0]), 0.1)
    dense = _dense(kernel)
    merged = dense + 1.5 * (np.asarray(a, np.float64) @ np.asarray(b, np.float64)).T
    granule = 1 if quant_type is None else 64 // np.gcd(shape[1], 64)
    norms = jax.jit(weight_norm, static_argnames=("scaling", "rows"))
    for rows in sorted({granule, 3 * granule, chunk_rows(*shape, None if quant_type is None else 64), shape[0]}):
        # a sum of `in` squares, plus the rank-r product inside each term
        assert_trees_close(norms(kernel, a, b, 1.5, rows=rows), np.linalg.norm(merged, axis=1),
                           reorder_rtol(shape[1] + 4))
        assert_trees_close(norms(kernel, rows=rows), np.linalg.norm(dense, axis=1), reorder_rtol(shape[1]))


def test_weight_norm_validates(rng):
    q = quantize(_x(rng, (32, 80)), "nf4", 64)
    with pytest.raises(ValueError, match="rows=2 x in=80 is not a whole number of 64-weight blocks"):
        weight_norm(q, rows=2)
    with pytest.raises(ValueError, match="both LoRA factors"):
        weight_norm(q, _x(rng, (80, 4)), None)
    with pytest.raises(ValueError, match=r"do not fit the base \(out, in\)=\(32, 80\)"):
        weight_norm(q, _x(rng, (80, 4)), _x(rng, (4, 31)))
    stacked = jax.tree.map(lambda leaf: jnp.stack([leaf, leaf]), q)
    with pytest.raises(ValueError, match="one \\(out, in\\) matrix"):
        weight_norm(stacked)


def test_weight_norm_gets_no_gradient(rng):
    q = quantize(_x(rng, (48, 64)), "nf4", 64)
    a, b = _x(rng, (64, 4)), _x(rng, (4, 48))
    ga, gb = jax.grad(lambda a, b: jnp.sum(weight_norm(q, a, b, 2.0)), argnums=(0, 1))(a, b)
    assert not np.any(np.asarray(ga)) and not np.any(np.asarray(gb))


def test_weight_norm_dequantizes_one_chunk_at_a_time(rng):
    """XLA's temporaries hold about one chunk, far below the float32 copy of W a dense norm needs."""
    out, inp, rows = 2048, 1024, 64
    q = jax.eval_shape(lambda: quantize(jnp.zeros((out, inp), jnp.bfloat16), "nf4", 64, double_quant=True))
    ab = (jax.ShapeDtypeStruct((inp, 8), jnp.float32), jax.ShapeDtypeStruct((8, out), jnp.float32))

    def temp(r):
        fn = jax.jit(lambda q, a, b: weight_norm(q, a, b, 2.0, rows=r))
        return fn.lower(q, *ab).compile().memory_analysis().temp_size_in_bytes

    full = 4 * out * inp
    assert temp(out) >= full  # one chunk of every row: the dense copy, so the measure sees it
    # a chunk's float32 rows, their nibbles and codes, the (out * in / 64) block scales: a small multiple
    assert temp(rows) < full / 4


def _layer(rng, use_bias=False, dropout=0.0, features=48, inp=64):
    m = QLoRADense(features=features, rank=4, alpha=8.0, dropout=dropout, use_dora=True, use_bias=use_bias,
                   dtype=jnp.float32, quant=QuantConfig("nf4", 64, True))
    x = _x(rng, (2, 5, inp))
    v = m.init(jax.random.key(int(rng.integers(2**31))), x)
    return m, v, x


def test_init_magnitude_is_the_row_norm_and_a_fresh_adapter_changes_nothing(rng):
    m, v, x = _layer(rng)
    assert set(v["params"]) == {"lora_a", "lora_b", "lora_magnitude"}
    w = _dense(v["frozen"]["kernel"])
    assert_trees_close(v["params"]["lora_magnitude"], np.linalg.norm(w, axis=1), reorder_rtol(64))
    plain = dataclasses.replace(m, use_dora=False)
    params = {k: p for k, p in v["params"].items() if k != "lora_magnitude"}
    assert_trees_close(m.apply(v, x), plain.apply({"params": params, "frozen": v["frozen"]}, x), reorder_rtol(64))


def _perturbed(rng, v):
    params = jax.tree.map(lambda p: p + _x(rng, p.shape, 0.1), v["params"])
    frozen = dict(v["frozen"])
    if "bias" in frozen:
        frozen["bias"] = _x(rng, frozen["bias"].shape)
    return params, frozen


def _merged_reference(params, frozen, x, scaling, h=None):
    """peft's DoRA as one merged matmul (no dropout), or its dropout form when ``h`` (the dropped x) is given."""
    w = jnp.asarray(_dense(frozen["kernel"]), jnp.float32)
    adapted = w + scaling * (params["lora_a"] @ params["lora_b"]).T
    g = params["lora_magnitude"] / jax.lax.stop_gradient(jnp.linalg.norm(adapted, axis=1))
    bias = frozen.get("bias", 0.0)
    if h is None:
        return x @ (g[:, None] * adapted).T + bias
    return x @ w.T + bias + (g - 1.0) * (h @ w.T) + g * scaling * (h @ params["lora_a"] @ params["lora_b"])


@pytest.mark.parametrize("use_bias", [False, True])
def test_forward_and_gradients_match_the_merged_weight(rng, use_bias):
    m, v, x = _layer(rng, use_bias=use_bias)
    params, frozen = _perturbed(rng, v)
    cot = _x(rng, (2, 5, 48))

    def loss(fn, p):
        return jnp.sum(fn(p) * cot)

    ours = lambda p: m.apply(merge(p, {"frozen": frozen}), x)  # noqa: E731
    ref = lambda p: _merged_reference(p, frozen, x, m.scaling)  # noqa: E731
    n = 64 + 4 + 64  # the norm's squares, the rank-r product, the matmul over in
    assert_trees_close(ours(params), ref(params), reorder_rtol(n))
    grads, expect = jax.grad(lambda p: loss(ours, p))(params), jax.grad(lambda p: loss(ref, p))(params)
    assert_trees_close(grads, expect, reorder_rtol(2 * n + 10))  # + the 10 tokens each weight gradient sums


def test_dropout_runs_the_base_on_the_dropped_input_as_peft(rng):
    base, v, x = _layer(rng, use_bias=True, dropout=0.25)
    m = fixed_mask_layer(base, seed=3)
    params, frozen = _perturbed(rng, v)
    h = x * fixed_mask(3, x.shape, 0.25)
    got = m.apply(merge(params, {"frozen": frozen}), x, deterministic=False, rngs={"dropout": jax.random.key(0)})
    expect = _merged_reference(params, frozen, x, m.scaling, h=h)
    assert_trees_close(got, expect, reorder_rtol(2 * 64 + 4))
    # and it is not the no-dropout output: the mask matters
    assert np.abs(np.asarray(got) - np.asarray(m.apply(merge(params, {"frozen": frozen}), x))).max() > 1e-2


def test_train_step_gradients_reach_the_magnitude(rng):
    m, v, x = _layer(rng)
    params, rest = split_trainable(v)
    params = {**params, "lora_b": _x(rng, params["lora_b"].shape, 0.1)}
    grads = jax.grad(lambda p: jnp.sum(m.apply(merge(p, rest), x) ** 2))(params)
    assert all(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grads))
