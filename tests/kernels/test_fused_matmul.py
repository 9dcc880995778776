"""Fused Pallas matmul and the backend dispatch (interpret mode on the CPU) against the jnp reference."""

from __future__ import annotations

import dataclasses
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals
from testlib import TOL, overhanging_pallas_blocks, rel_err

import qlora_jax as qj
from qlora_jax.kernels import AUTO_FUSED_MAX_M, MatmulBlockSizes, quantized_matmul, resolve_backend
from qlora_jax.kernels.compat import on_gpu
from qlora_jax.layers import QLoRADense


def _reference(x, q):
    return jnp.einsum("...i,oi->...o", x, q.dequantize(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)


def _case(rng, m, n, k, quant_type="nf4", blocksize=64, double_quant=True, dtype=jnp.float32):
    w = jnp.asarray((rng.standard_normal((n, k)) * rng.uniform(0.02, 1.0)).astype(np.float32))
    q = qj.quantize(w, quant_type, blocksize, double_quant=double_quant)
    x = jnp.asarray(rng.standard_normal((m, k)).astype(np.float32)).astype(dtype)
    dy = jnp.asarray(rng.standard_normal((m, n)).astype(np.float32)).astype(dtype)
    return q, x, dy


def _value_and_dx(f, x, dy):
    y, vjp = jax.vjp(f, x)
    return y, vjp(dy)[0]


def _check(backend, q, x, dy, **kw):
    tol = TOL["matmul_rel_bf16"] if x.dtype != jnp.float32 else TOL["matmul_rel_tf32" if on_gpu() else "matmul_rel_f32"]
    y, dx = _value_and_dx(jax.jit(lambda x: quantized_matmul(x, q, backend, **kw)), x, dy)
    y_ref, dx_ref = _value_and_dx(lambda x: _reference(x, q), x, dy)
    assert y.dtype == x.dtype and dx.dtype == x.dtype and y.shape == y_ref.shape
    assert rel_err(y, y_ref) < tol and rel_err(dx, dx_ref) < tol, (rel_err(y, y_ref), rel_err(dx, dx_ref))


@pytest.mark.parametrize("m", [1, 7, 16, 128])
@pytest.mark.parametrize(("n", "k"), [(64, 256), (48, 192), (128, 320)])  # 192, 320: K not a multiple of 128
def test_fused_forward_and_dx(rng, m, n, k):
    _check("pallas", *_case(rng, m, n, k))


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_quant_types(rng, quant_type, double_quant):
    _check("pallas", *_case(rng, 9, 32, 128, quant_type, double_quant=double_quant))


@pytest.mark.parametrize("blocksize", [32, 128, 256])
def test_blocksizes(rng, blocksize):
    _check("pallas", *_case(rng, 5, 32, 512, blocksize=blocksize))


def test_bf16(rng):
    _check("pallas", *_case(rng, 24, 64, 256, dtype=jnp.bfloat16))


@pytest.mark.parametrize("m", [1, 7, 20, 130])
def test_every_tile_lies_inside_its_array(rng, m):
    """Ragged M (decode's M = 1, a partial last tile) is padded to whole tiles in both kernels, split-K included:
    Pallas' Triton lowering masks no tile access, so an overhanging tile corrupts memory on a GPU."""
    q, x, dy = _case(rng, m, 128, 512)
    split = MatmulBlockSizes(block_m=16, block_n=32, block_k=64, split=2)
    for kw in ({}, {"block_sizes": split, "bwd_block_sizes": split}):
        f = lambda x, dy: jax.vjp(lambda x: quantized_matmul(x, q, "pallas", **kw), x)[1](dy)  # noqa: E731
        assert overhanging_pallas_blocks(f, x, dy) == []


@pytest.mark.parametrize("lookup", ["select", "gather"])
def test_split_k_and_multi_step_tiles(rng, lookup):
    """Explicit tiles: several contraction steps per program and split-K partial sums (both kernels)."""
    q, x, dy = _case(rng, 20, 128, 512)
    fwd = MatmulBlockSizes(block_m=16, block_n=32, block_k=64, split=2, lookup=lookup)  # 8 k-steps, 4 per split
    bwd = MatmulBlockSizes(block_m=16, block_n=16, block_k=128, split=4, lookup=lookup)  # 8 n-steps, 2 per split
    _check("pallas", q, x, dy, block_sizes=fwd, bwd_block_sizes=bwd)


def test_unfused_backend_and_leading_dims(rng):
    q, x, dy = _case(rng, 12, 64, 256)
    _check("pallas_unfused", q, x.reshape(2, 6, 256), dy.reshape(2, 6, 64))
    _check("pallas", q, x.reshape(3, 4, 256), dy.reshape(3, 4, 64))


def test_reference_backward_mode(rng):
    q, x, dy = _case(rng, 8, 32, 128)
    _check("pallas", q, x, dy, bwd="reference")


def test_backward_saves_only_packed_weight(rng):
    q, x, _ = _case(rng, 4, 256, 512)
    shapes = [(tuple(r[0].shape), r[0].dtype) for r in saved_residuals(lambda x: quantized_matmul(x, q, "pallas"), x)]
    assert all(not (len(s) == 2 and jnp.issubdtype(d, jnp.floating)) for s, d in shapes), shapes
    assert ((256 * 512 // 2,), jnp.uint8) in shapes


def test_qlora_dense_gradients_match_across_backends(rng):
    """A whole QLoRADense layer: LoRA gradients from the Pallas kernels equal those from the reference."""
    x = jnp.asarray(rng.standard_normal((2, 5, 128)).astype(np.float32))
    grads = {}
    for backend in ("xla", "pallas", "pallas_unfused"):
        layer = QLoRADense(64, rank=8, dtype=jnp.float32, backend=backend)
        variables = layer.init(jax.random.key(0), x)
        params = jax.tree.map(lambda p: p + 0.01, variables["params"])  # lora_b != 0: both factors get gradients
        loss = lambda p: jnp.sum(jnp.sin(layer.apply({"params": p, "frozen": variables["frozen"]}, x)))
        grads[backend] = jax.jit(jax.grad(loss))(params)
    for backend in ("pallas", "pallas_unfused"):
        for a, b in zip(jax.tree.leaves(grads[backend]), jax.tree.leaves(grads["xla"])):
            assert rel_err(a, b) < TOL["matmul_rel_tf32" if on_gpu() else "matmul_rel_f32"]


def test_auto_dispatch(rng):
    q = qj.quantize(jnp.asarray(rng.standard_normal((64, 256)).astype(np.float32)))
    if on_gpu():
        assert resolve_backend("auto", 1, q) == "pallas"
        assert resolve_backend("auto", AUTO_FUSED_MAX_M + 1, q) == "pallas_unfused"
    else:
        assert resolve_backend("auto", 1, q) == "xla"  # a CPU backend always takes the reference
    odd = qj.quantize(jnp.asarray(rng.standard_normal((8, 96)).astype(np.float32)))  # K=96 straddles blocks
    with pytest.raises(ValueError, match="in_features=96 is not a multiple of blocksize=64"):
        quantized_matmul(jnp.ones((2, 96)), odd, "pallas")
    y = quantized_matmul(jnp.ones((2, 96)), odd, "auto")  # auto falls back to the reference
    np.testing.assert_allclose(np.asarray(y), np.asarray(_reference(jnp.ones((2, 96)), odd)), rtol=1e-6)
    with pytest.raises(ValueError, match="out_features=20 is not a multiple of 16"):
        resolve_backend("pallas", 4, qj.quantize(jnp.ones((20, 64))))
    if not on_gpu():
        with pytest.raises(ValueError, match="backend='triton'"):
            quantized_matmul(jnp.ones((2, 256)), q, "triton")  # no GPU (and no jax-triton) here
    with pytest.raises(ValueError, match="bwd='fast'"):
        quantized_matmul(jnp.ones((2, 256)), q, "pallas", bwd="fast")


def test_block_sizes_defaults_and_validation():
    for m, n, k in [(1, 4096, 4096), (1, 14336, 4096), (16, 4096, 14336), (512, 1024, 4096), (4096, 4096, 4096), (7, 48, 192)]:
        for transpose in (False, True):
            bs = MatmulBlockSizes.get_default(m, n, k, 64, transpose)
            bs.check(m, n, k, 64, transpose)  # tiles divide the shape, split divides the steps
            if m > 64:
                assert bs.split == 1
    decode = MatmulBlockSizes.get_default(1, 4096, 4096, 64)
    assert decode.block_m == 16 and decode.split > 1  # a decode step is split over K to fill the GPU
    with pytest.raises(ValueError, match="block_m=24 must be a power of two"):
        MatmulBlockSizes(24, 64, 64)
    with pytest.raises(ValueError, match="block_k=32 must be a multiple of blocksize=64"):
        MatmulBlockSizes(16, 16, 32).check(1, 64, 128, 64, False)
    with pytest.raises(ValueError, match="split=3 must divide"):
        dataclasses.replace(MatmulBlockSizes(16, 16, 64), split=3).check(1, 64, 256, 64, False)


@pytest.mark.skipif(not on_gpu() or importlib.util.find_spec("jax_triton") is None,
                    reason="the jax-triton backend runs on a GPU with jax-triton (scripts/gpu_check.sh); "
                    "its kernels are proven on the CPU by test_triton_backend.py")
@pytest.mark.parametrize("m", [1, 7, 128])
def test_triton_backend_on_gpu(rng, m):
    _check("triton", *_case(rng, m, 128, 512, dtype=jnp.bfloat16))
    _check("triton", *_case(rng, m, 64, 256), block_sizes=MatmulBlockSizes(16, 32, 64, split=2))
