"""``lora_product``'s custom backward against autodiff of the plain formula ``s * (x @ A) @ B``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.layers.lora_product import lora_product


def _inputs(seed, lead, n_in, r, n_out, dtype):
    k = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(k[0], lead + (n_in,), jnp.float32).astype(dtype)
    a = jax.random.normal(k[1], (n_in, r), jnp.float32) * 0.3
    b = jax.random.normal(k[2], (r, n_out), jnp.float32) * 0.3
    w = jax.random.normal(k[3], lead + (n_out,), jnp.float32)  # a random cotangent, via the loss below
    return x, a, b, w


def _plain(x, a, b, s):
    return s * (x.astype(jnp.float32) @ a) @ b


@pytest.mark.parametrize("lead,n_in,r,n_out,s", [((7,), 24, 4, 40, 2.0), ((2, 5), 64, 16, 48, 0.37), ((3, 1, 4), 8, 1, 8, 1.0)])
def test_forward_and_grads_match_autodiff_fp32(lead, n_in, r, n_out, s):
    x, a, b, w = _inputs(len(lead) + n_in, lead, n_in, r, n_out, jnp.float32)
    ours = lambda x, a, b: jnp.sum(jnp.sin(lora_product(x, a, b, s)) * w)  # noqa: E731
    ref = lambda x, a, b: jnp.sum(jnp.sin(_plain(x, a, b, s)) * w)  # noqa: E731
    np.testing.assert_allclose(lora_product(x, a, b, s), _plain(x, a, b, s), rtol=1e-5, atol=1e-5)
    got = jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(x, a, b)
    want = jax.grad(ref, argnums=(0, 1, 2))(x, a, b)
    for g, e, name in zip(got, want, "x a b".split()):
        assert g.shape == e.shape and g.dtype == e.dtype, name
        np.testing.assert_allclose(g, e, rtol=2e-5, atol=2e-5 * float(jnp.max(jnp.abs(e))), err_msg=name)


def test_bf16_compute_keeps_dtypes_and_tracks_fp32():
    x, a, b, w = _inputs(3, (4, 32), 64, 8, 96, jnp.bfloat16)
    f = lambda x, a, b: jnp.sum(lora_product(x, a.astype(x.dtype), b.astype(x.dtype), 2.0).astype(jnp.float32) * w)  # noqa: E731
    gx, ga, gb = jax.grad(f, argnums=(0, 1, 2))(x, a, b)
    assert (gx.dtype, ga.dtype, gb.dtype) == (jnp.bfloat16, jnp.float32, jnp.float32)
    ref = jax.grad(lambda x, a, b: jnp.sum(_plain(x, a, b, 2.0) * w), argnums=(0, 1, 2))(x.astype(jnp.float32), a, b)
    for g, e in zip((gx, ga, gb), ref):
        err = float(jnp.max(jnp.abs(g.astype(jnp.float32) - e)) / jnp.max(jnp.abs(e)))
        assert err < 3e-2, err  # bf16 operands: ~3 significant digits


def test_shape_mismatch_is_named():
    x, a, b, _ = _inputs(0, (3,), 8, 2, 4, jnp.float32)
    with pytest.raises(ValueError, match="do not chain"):
        lora_product(x, a[:5], b, 1.0)


def test_float32_output_keeps_small_terms_and_its_grads_track_fp32():
    """``out_dtype=float32`` over bf16 ``x``: ``u = x @ A`` and ``u @ B`` in float32, so the result is the
    float32 product of the bf16 operands (rounded once per sum, not to bf16), and ``dB`` is that exact."""
    x, a, b, w = _inputs(5, (3, 16), 64, 8, 48, jnp.bfloat16)
    a16 = a.astype(jnp.bfloat16)
    got = lora_product(x, a16, b, 0.5, jnp.float32)
    assert got.dtype == jnp.float32
    want = _plain(x, a16.astype(jnp.float32), b, 0.5)
    # float32 sums of 64 and 8 terms: a few ulps of the largest partial products
    np.testing.assert_allclose(got, want, rtol=0, atol=64 * 2.0 ** -23 * float(jnp.max(jnp.abs(want))) * 8)
    f = lambda x, a, b: jnp.sum(lora_product(x, a.astype(x.dtype), b, 0.5, jnp.float32) * w)  # noqa: E731
    gx, ga, gb = jax.grad(f, argnums=(0, 1, 2))(x, a, b)
    assert (gx.dtype, ga.dtype, gb.dtype) == (jnp.bfloat16, jnp.float32, jnp.float32)
    ref = jax.grad(lambda x, a, b: jnp.sum(_plain(x, a, b, 0.5) * w), argnums=(0, 1, 2))(
        x.astype(jnp.float32), a16.astype(jnp.float32), b)
    err_b = float(jnp.max(jnp.abs(gb - ref[2])) / jnp.max(jnp.abs(ref[2])))
    assert err_b < 1e-5, err_b  # dB = s u^T dy: float32 throughout
    for g, e in zip((gx, ga), ref[:2]):  # through g = s dy B^T, rounded to bf16 for the bf16 GEMMs
        err = float(jnp.max(jnp.abs(g.astype(jnp.float32) - e)) / jnp.max(jnp.abs(e)))
        assert err < 3e-2, err
