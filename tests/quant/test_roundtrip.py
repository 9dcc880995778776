"""Round trips, error bounds, storage accounting, jit / vmap / pytree behaviour (no torch)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qlora_jax as qj
from qlora_jax.quant.blockwise import num_blocks
from qlora_jax.quant.codebooks import code_table
from testlib import TOL, max_abs_frac


def _blockwise_absmax(w: np.ndarray, blocksize: int) -> np.ndarray:
    flat = np.abs(w.astype(np.float32).reshape(-1))
    pad = num_blocks(flat.size, blocksize) * blocksize - flat.size
    return np.pad(flat, (0, pad)).reshape(-1, blocksize).max(axis=1)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("shape,blocksize", [((1000,), 64), ((37, 129), 32), ((8, 64, 3), 128), ((5,), 4096)])
def test_round_trip_error_within_half_code_gap(rng, quant_type, shape, blocksize):
    w = (rng.standard_normal(shape) * rng.uniform(0.1, 5)).astype(np.float32)
    q = qj.quantize(jnp.asarray(w), quant_type, blocksize, double_quant=False)
    back = np.asarray(qj.dequantize(q, jnp.float32))
    assert back.shape == w.shape
    scale = np.repeat(_blockwise_absmax(w, blocksize), blocksize)[: w.size].reshape(shape)
    err = np.abs(back - w)
    assert np.all(err <= max_abs_frac(quant_type) * scale)
    # every dequantized value is a code value times its block scale
    table = code_table(quant_type)
    ratios = back.reshape(-1) / np.maximum(scale.reshape(-1), 1e-30)
    assert np.all(np.min(np.abs(ratios[:, None] - table[None, :]), axis=1) < 1e-6)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_nearest_code_is_chosen(rng, quant_type):
    """Each stored code is the nearest to w / absmax (ties aside)."""
    w = rng.standard_normal((256, 64)).astype(np.float32)
    q = qj.quantize(jnp.asarray(w), quant_type, 64, double_quant=False)
    back = np.asarray(qj.dequantize(q, jnp.float32))
    absmax = np.abs(w).max(axis=1, keepdims=True)
    table = code_table(quant_type)
    dist = np.abs(w[..., None] / absmax[..., None] - table)
    best = np.sort(dist, axis=-1)
    chosen = np.abs(back / absmax - w / absmax)
    clear = best[..., 1] - best[..., 0] > 1e-5  # not within rounding of a tie
    np.testing.assert_allclose(chosen[clear], best[..., 0][clear], atol=2e-6)


def test_nf4_beats_int4_on_gaussian_weights(rng):
    w = jnp.asarray(rng.standard_normal((512, 512)).astype(np.float32))
    errs = {t: float(jnp.sqrt(jnp.mean((qj.dequantize(qj.quantize(w, t), jnp.float32) - w) ** 2))) for t in ("nf4", "int4")}
    assert errs["nf4"] < 0.9 * errs["int4"], errs


def test_double_quant_error_small_and_storage_exact(rng):
    w = jnp.asarray(rng.standard_normal((1024, 4096)).astype(np.float32) * 0.02)
    plain = qj.quantize(w, "nf4", 64, double_quant=False)
    dq = qj.quantize(w, "nf4", 64, double_quant=True)
    s_plain = np.asarray(plain.block_scales())
    s_dq = np.asarray(dq.block_scales())
    assert np.max(np.abs(s_dq - s_plain) / s_plain) < TOL["dq_scale_rel"]
    n = 1024 * 4096
    assert plain.nbytes == n // 2 + 4 * (n // 64)
    assert dq.nbytes == n // 2 + n // 64 + 4 * (n // 64 // 256) + 4
    assert plain.bits_per_weight == pytest.approx(4.5)
    assert dq.bits_per_weight == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-4)
    assert round(dq.bits_per_weight, 3) == 4.127


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_dequantize_dtype_and_default_bf16(rng, dtype):
    w = jnp.asarray(rng.standard_normal((64, 96)).astype(np.float32)).astype(dtype)
    q = qj.quantize(w)
    assert q.dtype == dtype
    assert qj.dequantize(q).dtype == jnp.bfloat16
    out = qj.dequantize(q, dtype)
    assert out.dtype == jnp.dtype(dtype) and out.shape == (64, 96)
    # the one rounding to dtype of the float32 result
    np.testing.assert_array_equal(np.asarray(out), np.asarray(qj.dequantize(q, jnp.float32).astype(dtype)))


def test_jit_vmap_and_pytree(rng):
    ws = jnp.asarray(rng.standard_normal((3, 32, 128)).astype(np.float32))
    qs = jax.vmap(lambda w: qj.quantize(w, "nf4", 64))(ws)
    assert qs.codes.shape == (3, 32 * 128 // 2) and qs.absmax.shape == (3, 64) and qs.offset.shape == (3,)
    for i in range(3):
        single = qj.quantize(ws[i], "nf4", 64)
        np.testing.assert_array_equal(np.asarray(qs.codes[i]), np.asarray(single.codes))
        np.testing.assert_array_equal(np.asarray(qs.absmax[i]), np.asarray(single.absmax))

    @jax.jit
    def matmul(q, x):
        return x @ q.dequantize(jnp.float32)

    q = qj.quantize(ws[0], "nf4", 64)
    x = jnp.asarray(rng.standard_normal((4, 32)).astype(np.float32))
    np.testing.assert_allclose(np.asarray(matmul(q, x)), np.asarray(x @ qj.dequantize(q, jnp.float32)), rtol=1e-6)

    leaves, treedef = jax.tree_util.tree_flatten(q)
    assert [leaf.dtype for leaf in leaves] == [jnp.uint8, jnp.uint8, jnp.float32, jnp.float32]
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert rebuilt.shape == q.shape and rebuilt.quant_type == "nf4" and rebuilt.nested_blocksize == 256
    plain = qj.quantize(ws[0], "fp4", 32, double_quant=False)
    assert len(jax.tree_util.tree_leaves(plain)) == 2


def test_quantize_under_jit_matches_eager(rng):
    w = jnp.asarray(rng.standard_normal((100, 70)).astype(np.float32))
    eager = qj.quantize(w, "nf4", 128)
    jitted = jax.jit(lambda w: qj.quantize(w, "nf4", 128))(w)
    for a, b in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 3000),
    blocksize=st.sampled_from([32, 64, 256]),
    quant_type=st.sampled_from(["nf4", "fp4", "int4"]),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_property(n, blocksize, quant_type, scale, seed):
    w = (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)
    q = qj.quantize(jnp.asarray(w), quant_type, blocksize)
    assert q.codes.shape == ((n + 1) // 2,) and q.absmax.shape == (num_blocks(n, blocksize),)
    back = np.asarray(qj.dequantize(q, jnp.float32))
    scale_b = np.repeat(np.asarray(q.block_scales()), blocksize)[:n]
    true_b = np.repeat(_blockwise_absmax(w, blocksize), blocksize)[:n]
    # the dequantized block scale may differ from the true absmax by the 8-bit double-quant error
    bound = max_abs_frac(quant_type) * true_b + np.abs(scale_b - true_b) + 1e-6 * true_b
    assert np.all(np.abs(back - w) <= bound)


def test_repr_and_properties(rng):
    q = qj.quantize(jnp.asarray(rng.standard_normal((10, 64)).astype(np.float32)))
    assert q.size == 640 and q.ndim == 2 and q.double_quant and q.num_blocks == 10
    assert "nf4" in repr(q) and "bits_per_weight" in repr(q)
