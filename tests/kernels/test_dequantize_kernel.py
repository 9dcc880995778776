"""Pallas dequantize kernel (interpret mode on the CPU): bit-equal to the jnp reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from testlib import overhanging_pallas_blocks

import qlora_jax as qj
from qlora_jax.kernels import DequantBlockSizes, dequantize, pallas_dequantize


def _weights(rng, shape, scale=None):
    scale = rng.uniform(0.01, 2.0) if scale is None else scale
    return jnp.asarray((rng.standard_normal(shape) * scale).astype(np.float32))


def _assert_equal(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_bit_equal_to_reference(rng, quant_type, double_quant):
    q = qj.quantize(_weights(rng, (96, 320)), quant_type, 64, double_quant=double_quant)
    _assert_equal(pallas_dequantize(q, jnp.bfloat16, block_sizes=DequantBlockSizes(rows=64)), q.dequantize(jnp.bfloat16))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("lookup", ["select", "gather"])
def test_dtypes_and_lookups(rng, dtype, lookup):
    q = qj.quantize(_weights(rng, (48, 256)), "nf4", 64, double_quant=True)
    _assert_equal(pallas_dequantize(q, dtype, block_sizes=DequantBlockSizes(rows=32, lookup=lookup)), q.dequantize(dtype))


@pytest.mark.parametrize(
    ("shape", "blocksize", "rows"),
    [
        ((3, 7, 64), 64, 16),  # 21 blocks: the last program's tile hangs past the end
        ((1, 64), 64, 256),  # one block, default-sized tile
        ((40, 96), 32, 16),
        ((8, 1024), 256, 4),
        ((300, 128), 128, 64),  # more blocks than one nested block of 256: several nested scales
    ],
)
def test_shapes_and_blocksizes(rng, shape, blocksize, rows):
    q = qj.quantize(_weights(rng, shape), "nf4", blocksize, double_quant=True)
    bs = DequantBlockSizes(rows=rows)
    _assert_equal(pallas_dequantize(q, jnp.bfloat16, block_sizes=bs), q.dequantize(jnp.bfloat16))
    # whole tiles only (the wrapper pads): Pallas' Triton lowering masks no tile access
    assert overhanging_pallas_blocks(lambda q: pallas_dequantize(q, jnp.bfloat16, block_sizes=bs), q) == []


def test_all_zero_block_and_jit(rng):
    w = np.array(_weights(rng, (32, 128)))
    w[5] = 0.0  # two all-zero blocks
    q = qj.quantize(jnp.asarray(w), "nf4", 64)
    out = jax.jit(lambda q: pallas_dequantize(q, jnp.float32))(q)
    _assert_equal(out, q.dequantize(jnp.float32))
    assert not np.any(np.asarray(out[5]))


def test_dequantize_dispatch(rng):
    q = qj.quantize(_weights(rng, (16, 128)))
    _assert_equal(dequantize(q, jnp.bfloat16, "pallas"), dequantize(q, jnp.bfloat16, "xla"))
    _assert_equal(dequantize(q, jnp.bfloat16), q.dequantize(jnp.bfloat16))  # "auto" on the CPU: the reference
    odd = qj.quantize(_weights(rng, (5, 13)))  # 65 weights: a short last block
    _assert_equal(dequantize(odd, jnp.float32), odd.dequantize(jnp.float32))


def test_bad_input(rng):
    odd = qj.quantize(_weights(rng, (5, 13)))
    with pytest.raises(ValueError, match="not a multiple of blocksize=64"):
        pallas_dequantize(odd)
    q = qj.quantize(_weights(rng, (4, 64)))
    with pytest.raises(ValueError, match="dtype=int32"):
        pallas_dequantize(q, jnp.int32)
    with pytest.raises(ValueError, match="rows=48 must be a power of two"):
        DequantBlockSizes(rows=48)
    with pytest.raises(ValueError, match="lookup='table'"):
        DequantBlockSizes(lookup="table")
    with pytest.raises(ValueError, match="backend='triton'"):
        dequantize(q, jnp.float32, "triton")
    with pytest.raises(ValueError, match="QuantizedArray"):
        pallas_dequantize(jnp.ones((4, 64)))
    big = qj.quantize(_weights(rng, (2, 1024)), "nf4", 512)
    with pytest.raises(ValueError, match="blocksize=512 is larger"):
        pallas_dequantize(big)
