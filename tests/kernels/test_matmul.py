"""quantized_matmul (jnp reference backend): values and gradients against dequantize-then-dot."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals

import qlora_jax as qj
from qlora_jax.kernels import quantized_matmul


def _reference(x, q):
    return jnp.einsum("...i,oi->...o", x, qj.dequantize(q, x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)


@pytest.mark.parametrize("m", [1, 7, 128])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_forward_and_dx_match_reference(rng, m, quant_type):
    q = qj.quantize(jnp.asarray(rng.standard_normal((48, 192)).astype(np.float32) * 0.05), quant_type, 64)
    x = jnp.asarray(rng.standard_normal((2, m, 192)).astype(np.float32))
    np.testing.assert_allclose(np.asarray(quantized_matmul(x, q)), np.asarray(_reference(x, q)), rtol=1e-6, atol=1e-6)
    dy = jnp.asarray(rng.standard_normal((2, m, 48)).astype(np.float32))
    ours = jax.vjp(lambda x: quantized_matmul(x, q), x)[1](dy)[0]
    theirs = jax.vjp(lambda x: _reference(x, q), x)[1](dy)[0]
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-6, atol=1e-6)


def test_backward_saves_only_packed_weight(rng):
    q = qj.quantize(jnp.asarray(rng.standard_normal((256, 512)).astype(np.float32)))
    x = jnp.asarray(rng.standard_normal((4, 512)).astype(np.float32))
    shapes = [(tuple(r[0].shape), r[0].dtype) for r in saved_residuals(lambda x: quantized_matmul(x, q), x)]
    assert all(not (s == (256, 512) and jnp.issubdtype(d, jnp.floating)) for s, d in shapes), shapes
    assert ((256 * 512 // 2,), jnp.uint8) in [(s, d) for s, d in shapes]


def test_frozen_weight_gets_zero_cotangent(rng):
    q = qj.quantize(jnp.asarray(rng.standard_normal((8, 64)).astype(np.float32)))
    x = jnp.asarray(rng.standard_normal((3, 64)).astype(np.float32))
    gq = jax.grad(lambda q: jnp.sum(quantized_matmul(x, q)), allow_int=True)(q)
    assert float(jnp.abs(gq.nested_scale).sum()) == 0.0 and float(jnp.abs(gq.offset)) == 0.0


def test_bf16_inputs(rng):
    q = qj.quantize(jnp.asarray(rng.standard_normal((32, 128)).astype(np.float32)))
    x = jnp.asarray(rng.standard_normal((5, 128)).astype(np.float32)).astype(jnp.bfloat16)
    y = jax.jit(quantized_matmul)(x, q)
    assert y.dtype == jnp.bfloat16
    ref = np.asarray(x, np.float32) @ np.asarray(qj.dequantize(q, jnp.bfloat16), np.float32).T
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=1e-2, atol=1e-2)


def test_bad_input(rng):
    q = qj.quantize(jnp.ones((8, 64)))
    with pytest.raises(ValueError, match="last dim must be 64"):
        quantized_matmul(jnp.ones((2, 32)), q)
    with pytest.raises(ValueError, match="backend='cuda'"):
        quantized_matmul(jnp.ones((2, 64)), q, backend="cuda")
    with pytest.raises(ValueError, match="2-D"):
        quantized_matmul(jnp.ones((2, 64)), qj.quantize(jnp.ones((2, 4, 64))))
    with pytest.raises(ValueError, match="QuantizedArray"):
        quantized_matmul(jnp.ones((2, 64)), jnp.ones((8, 64)))
