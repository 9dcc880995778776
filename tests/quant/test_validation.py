"""Bad input gets a ValueError that names the problem."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qlora_jax as qj


def test_integer_dtype_rejected():
    with pytest.raises(ValueError, match="int32"):
        qj.quantize(jnp.arange(64, dtype=jnp.int32))


def test_bool_and_uint8_rejected():
    with pytest.raises(ValueError, match="bool"):
        qj.quantize(np.ones(64, bool))
    with pytest.raises(ValueError, match="uint8"):
        qj.quantize(np.ones(64, np.uint8))


def test_nan_and_inf_reported_with_count_and_position(rng):
    w = rng.standard_normal((8, 16)).astype(np.float32)
    w[2, 3] = np.nan
    w[5, 0] = np.inf
    w[7, 15] = -np.inf
    with pytest.raises(ValueError, match=r"3 of 128 values .* not finite \(first at \(2, 3\)=nan, \(5, 0\)=inf"):
        qj.quantize(jnp.asarray(w))


@pytest.mark.parametrize("blocksize", [0, 16, 48, 100, 8192, -64, 64.0, True])
def test_bad_blocksize(blocksize):
    with pytest.raises(ValueError, match="blocksize"):
        qj.quantize(jnp.ones(256), blocksize=blocksize)


def test_bad_nested_blocksize():
    with pytest.raises(ValueError, match="nested_blocksize=32"):
        qj.quantize(jnp.ones(256), nested_blocksize=32)


def test_unknown_quant_type():
    with pytest.raises(ValueError, match=r"quant_type='nf3' is not one of \('nf4', 'fp4', 'int4'\)"):
        qj.quantize(jnp.ones(64), quant_type="nf3")


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 64)])
def test_empty_array(shape):
    with pytest.raises(ValueError, match="empty array"):
        qj.quantize(jnp.ones(shape))


def test_float64_numpy_input_rejected_with_supported_list():
    with pytest.raises(ValueError, match="float64.*float32"):
        qj.quantize(np.ones(64, np.float64))


def test_python_list_input_is_accepted_when_float32_like():
    q = qj.quantize(np.asarray([[0.5, -1.0] * 32], np.float32))
    assert q.shape == (1, 64)


def test_dequantize_rejects_non_quantized_and_int_dtype():
    with pytest.raises(ValueError, match="QuantizedArray"):
        qj.dequantize(jnp.ones(4))
    q = qj.quantize(jnp.ones(64))
    with pytest.raises(ValueError, match="float dtype"):
        qj.dequantize(q, jnp.int8)


def test_nonfinite_check_is_skipped_under_jit_only():
    """Under jit the values are unknown; the static checks still run."""
    f = jax.jit(lambda w: qj.quantize(w).codes)
    assert f(jnp.ones(64)).shape == (32,)
    with pytest.raises(ValueError, match="blocksize"):
        jax.jit(lambda w: qj.quantize(w, blocksize=3).codes)(jnp.ones(64))


def test_bnb_state_dict_errors(rng):
    q = qj.quantize(jnp.asarray(rng.standard_normal((4, 64)).astype(np.float32)))
    with pytest.raises(ValueError, match="int4.*no bitsandbytes"):
        qj.to_bnb_state_dict(qj.quantize(jnp.ones(64), "int4"))
    sd = qj.to_bnb_state_dict(q, prefix="a.weight")
    with pytest.raises(ValueError, match="missing key 'a.weight.nested_absmax'"):
        qj.from_bnb_state_dict({k: v for k, v in sd.items() if k != "a.weight.nested_absmax"})
    bad = dict(sd)
    bad["a.weight"] = sd["a.weight"][:-1]
    with pytest.raises(ValueError, match="code bytes"):
        qj.from_bnb_state_dict(bad)
    bad = dict(sd)
    bad["a.weight.quant_map"] = sd["a.weight.quant_map"] * 2
    with pytest.raises(ValueError, match="not the standard bitsandbytes table"):
        qj.from_bnb_state_dict(bad)
    two = dict(sd) | {k.replace("a.weight", "b.weight"): v for k, v in sd.items()}
    with pytest.raises(ValueError, match=r"found \['a.weight', 'b.weight'\]"):
        qj.from_bnb_state_dict(two)
    assert qj.from_bnb_state_dict(two, prefix="b.weight").shape == (4, 64)
    with pytest.raises(ValueError, match="no bnb quant state"):
        qj.from_bnb_state_dict(sd, prefix="c.weight")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_bnb_state_dict_round_trip(rng, quant_type, double_quant):
    w = jnp.asarray(rng.standard_normal((33, 70)).astype(np.float32)).astype(jnp.bfloat16)
    q = qj.quantize(w, quant_type, 64, double_quant=double_quant)
    back = qj.from_bnb_state_dict(qj.to_bnb_state_dict(q))
    assert (back.shape, back.dtype, back.blocksize, back.quant_type, back.nested_blocksize) == (
        q.shape, q.dtype, q.blocksize, q.quant_type, q.nested_blocksize)
    for a, b in zip(jax.tree_util.tree_leaves(q), jax.tree_util.tree_leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
