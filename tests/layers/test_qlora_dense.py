"""QLoRADense: structure, PEFT-style init, forward math, gradients, validation."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qlora_jax as qj
from qlora_jax.layers import QLoRADense, QuantConfig, merge, split_trainable, trainable_summary
from qlora_jax.quant import QuantizedArray


def _x(rng, shape):
    return jnp.asarray(rng.standard_normal(shape).astype(np.float32))


def test_variables_structure_and_fresh_adapter_is_identity(rng):
    m = QLoRADense(features=96, rank=8, dtype=jnp.float32)
    x = _x(rng, (2, 5, 128))
    v = m.init(jax.random.key(1), x)
    assert set(v) == {"params", "frozen"}
    assert set(v["params"]) == {"lora_a", "lora_b"}
    assert v["params"]["lora_a"].shape == (128, 8) and v["params"]["lora_b"].shape == (8, 96)
    assert v["params"]["lora_a"].dtype == jnp.float32
    kernel = v["frozen"]["kernel"]
    assert isinstance(kernel, QuantizedArray) and kernel.shape == (96, 128) and kernel.quant_type == "nf4"
    a = np.asarray(v["params"]["lora_a"])
    bound = 1 / math.sqrt(128)
    assert np.all(np.abs(a) <= bound) and a.std() > 0.4 * bound  # U(-1/sqrt(in), 1/sqrt(in)), not zeros
    assert np.all(np.asarray(v["params"]["lora_b"]) == 0)
    y = m.apply(v, x)
    ref = np.asarray(x) @ np.asarray(qj.dequantize(kernel, jnp.float32)).T
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_delta_and_scaling(rng, use_rslora):
    m = QLoRADense(features=32, rank=4, alpha=8.0, use_rslora=use_rslora, dtype=jnp.float32)
    x = _x(rng, (6, 64))
    v = m.init(jax.random.key(0), x)
    b = _x(rng, (4, 32))
    v = {**v, "params": {**v["params"], "lora_b": b}}
    scale = 8.0 / (2.0 if use_rslora else 4.0)
    assert m.scaling == scale
    base = np.asarray(x) @ np.asarray(qj.dequantize(v["frozen"]["kernel"], jnp.float32)).T
    expect = base + scale * (np.asarray(x) @ np.asarray(v["params"]["lora_a"]) @ np.asarray(b))
    np.testing.assert_allclose(np.asarray(m.apply(v, x)), expect, rtol=1e-5, atol=1e-5)


def test_grads_over_params_match_dense_reference(rng):
    m = QLoRADense(features=24, rank=4, alpha=16.0, dtype=jnp.float32)
    x = _x(rng, (3, 7, 64))
    v = m.init(jax.random.key(2), x)
    v = {**v, "params": {**v["params"], "lora_b": _x(rng, (4, 24)) * 0.1}}
    params, rest = split_trainable(v)
    w = qj.dequantize(rest["frozen"]["kernel"], jnp.float32)

    def loss(p):
        return jnp.mean(jnp.tanh(m.apply(merge(p, rest), x)))

    def ref_loss(p):
        y = x @ w.T + m.scaling * (x @ p["lora_a"] @ p["lora_b"])
        return jnp.mean(jnp.tanh(y))

    g, g_ref = jax.grad(loss)(params), jax.grad(ref_loss)(params)
    for k in ("lora_a", "lora_b"):
        np.testing.assert_allclose(np.asarray(g[k]), np.asarray(g_ref[k]), rtol=1e-5, atol=1e-7)
    gx = jax.grad(lambda x: jnp.sum(jnp.tanh(m.apply(v, x))))(x)
    gx_ref = jax.grad(lambda x: jnp.sum(jnp.tanh(x @ w.T + m.scaling * (x @ params["lora_a"] @ params["lora_b"]))))(x)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(gx_ref), rtol=1e-5, atol=1e-6)


def test_dropout_only_when_not_deterministic(rng):
    m = QLoRADense(features=16, rank=4, dropout=0.5, dtype=jnp.float32)
    x = _x(rng, (8, 32))
    v = m.init(jax.random.key(0), x)
    v = {**v, "params": {**v["params"], "lora_b": _x(rng, (4, 16))}}
    det = m.apply(v, x)
    np.testing.assert_array_equal(np.asarray(det), np.asarray(m.apply(v, x, deterministic=True)))
    drop = m.apply(v, x, deterministic=False, rngs={"dropout": jax.random.key(3)})
    assert not np.allclose(np.asarray(drop), np.asarray(det))
    # the base path is never dropped: with B = 0 both agree
    v0 = {**v, "params": {**v["params"], "lora_b": jnp.zeros((4, 16))}}
    np.testing.assert_allclose(np.asarray(m.apply(v0, x, deterministic=False, rngs={"dropout": jax.random.key(3)})),
                               np.asarray(m.apply(v0, x)), rtol=1e-6)


def test_float_base_bias_and_rank_zero(rng):
    m = QLoRADense(features=16, rank=0, quant=None, use_bias=True, dtype=jnp.float32, base_dtype=jnp.float32)
    x = _x(rng, (4, 32))
    v = m.init(jax.random.key(0), x)
    assert "params" not in v or not v["params"]
    bias = _x(rng, (16,))
    v = {"frozen": {**v["frozen"], "bias": bias}}
    expect = np.asarray(x) @ np.asarray(v["frozen"]["kernel"]).T + np.asarray(bias)
    np.testing.assert_allclose(np.asarray(m.apply(v, x)), expect, rtol=1e-5, atol=1e-6)


def test_bf16_compute_default(rng):
    m = QLoRADense(features=16, rank=4)
    x = _x(rng, (4, 64))
    v = m.init(jax.random.key(0), x)
    assert m.apply(v, x).dtype == jnp.bfloat16 and v["params"]["lora_a"].dtype == jnp.float32


def test_trainable_summary_and_split_merge(rng):
    m = QLoRADense(features=96, rank=8)
    v = m.init(jax.random.key(0), _x(rng, (1, 128)))
    s = trainable_summary(v)
    assert s == {"trainable": 8 * (128 + 96), "frozen": 96 * 128, "total": 8 * 224 + 96 * 128,
                 "fraction": pytest.approx(8 * 224 / (8 * 224 + 96 * 128))}
    p, rest = split_trainable(v)
    assert merge(p, rest).keys() == v.keys()
    with pytest.raises(ValueError, match="no 'params' collection"):
        split_trainable(rest)


def test_validation(rng):
    with pytest.raises(ValueError, match="rank=-1"):
        QLoRADense(features=4, rank=-1)
    with pytest.raises(ValueError, match="dropout=1.0"):
        QLoRADense(features=4, dropout=1.0)
    with pytest.raises(ValueError, match="features=0"):
        QLoRADense(features=0)
    with pytest.raises(ValueError, match="blocksize=48"):
        QuantConfig(blocksize=48)
    with pytest.raises(ValueError, match="quant_type='q8'"):
        QuantConfig(quant_type="q8")
    m = QLoRADense(features=16, rank=2)
    v = m.init(jax.random.key(0), _x(rng, (1, 64)))
    with pytest.raises(ValueError, match=r"expected \(out, in\)=\(16, 32\)"):
        m.apply(v, _x(rng, (1, 32)))


def test_fp32_output_keeps_an_update_bf16_rounds_away(rng):
    """A LoRA term far below half a bf16 ulp of the base output vanishes from a bf16 layer's output;
    with ``fp32_output`` the layer returns ``float32(base) + lora`` with the term intact."""
    x = _x(rng, (6, 64)).astype(jnp.bfloat16)
    plain = QLoRADense(features=32, rank=4)
    v = plain.init(jax.random.key(0), x)
    base = np.asarray(plain.apply(v, x).astype(jnp.float32))
    scale = 2.0 ** -14 * float(np.min(np.abs(base)[np.abs(base) > 0]))  # lora term < 2^-9 of every output
    b = jnp.full((4, 32), 1.0, jnp.float32)
    u = np.asarray(x.astype(jnp.float32)) @ np.asarray(v["params"]["lora_a"].astype(jnp.bfloat16).astype(jnp.float32))
    lora = plain.scaling * u @ np.asarray(b)
    b = b * scale / float(np.max(np.abs(lora)))
    lora = lora * scale / float(np.max(np.abs(lora)))
    v = {**v, "params": {**v["params"], "lora_b": b}}
    rounded = plain.apply(v, x)
    assert rounded.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(rounded.astype(jnp.float32)), base)  # the update is lost
    kept = QLoRADense(features=32, rank=4, fp32_output=True).apply(v, x)
    assert kept.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(kept) - base, lora, rtol=1e-3, atol=2.0 ** -23 * float(np.max(np.abs(base))))
    zero = QLoRADense(features=32, rank=0, fp32_output=True)  # no LoRA term: the compute dtype, as before
    assert zero.apply(zero.init(jax.random.key(0), x), x).dtype == jnp.bfloat16
