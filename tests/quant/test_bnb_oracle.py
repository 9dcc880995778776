"""Byte equality with bitsandbytes 0.50.x on the CPU (the oracle).

What is compared, for nf4 / fp4, float32 / bfloat16 / float16 and many shapes:
* packed codes and float32 block scales: bit for bit;
* double quantization: the 8-bit scale codes and second-level scales bit for bit
  given bnb's offset; the offset itself within float32 summation-order error;
* dequantized values: ``code[q] * absmax`` in float32 on bnb's table, codes and
  scales, rounded once to the original dtype; and bnb's own dequantize_4bit
  output by value (its fp4 zero sign varies by kernel path) on every shape where
  that CPU kernel is correct (``_bnb_kernel_trusted``);
* the serialized state dict: same keys, dtypes, shapes and values.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

import qlora_jax as qj
from qlora_jax.quant.blockwise import quantize_4bit
from qlora_jax.quant.blockwise8 import quantize_8bit
from qlora_jax.quant.codebooks import dynamic_map
from qlora_jax.quant.double_quant import double_quantize
from qlora_jax.quant.qarray import QuantizedArray
from testlib import TOL, TORCH_DTYPES, bnb_state_dict, random_weights, torch_and_bnb

pytestmark = pytest.mark.oracle

SHAPES = [(1,), (7,), (64,), (129,), (4096,), (5000,), (3, 5), (64, 64), (33, 130), (128, 96), (17, 3, 11), (2, 300, 70)]
BLOCKS = [32, 64, 128, 256, 1024, 4096]


def _cases():
    """Every shape x dtype x quant type, with the block size rotating through BLOCKS."""
    cases = []
    for i, shape in enumerate(SHAPES):
        for j, dtype in enumerate(TORCH_DTYPES):
            for k, qt in enumerate(("nf4", "fp4")):
                cases.append((shape, dtype, qt, BLOCKS[(i + j + k) % len(BLOCKS)]))
    return cases


def _np(x):
    return np.asarray(x)


@pytest.mark.parametrize("shape,dtype,quant_type,blocksize", _cases())
def test_codes_scales_and_dequant_equal_bnb(rng, shape, dtype, quant_type, blocksize):
    torch, F = torch_and_bnb()
    wt, wj = random_weights(rng, shape, dtype)
    packed, state = F.quantize_4bit(wt, blocksize=blocksize, quant_type=quant_type, compress_statistics=False)

    q = qj.quantize(wj, quant_type, blocksize, double_quant=False)
    np.testing.assert_array_equal(_np(q.codes), packed.numpy().reshape(-1))
    np.testing.assert_array_equal(_np(q.absmax).view(np.uint32), state.absmax.numpy().view(np.uint32))

    # Dequantization is code[q] * absmax in float32, rounded once to the dtype. The reference is
    # that formula in torch on bnb's own table, codes and scales; bnb's CPU kernel itself agrees
    # wherever its blocks do not straddle rows (see _bnb_kernel_trusted).
    table = F.get_4bit_type(quant_type, device="cpu")
    nibbles = torch.stack([packed.reshape(-1) >> 4, packed.reshape(-1) & 15], 1).reshape(-1)[: wt.numel()]
    ref32 = table[nibbles.long()] * state.absmax.repeat_interleave(blocksize)[: wt.numel()]
    ours32 = _np(qj.dequantize(q, jnp.float32)).reshape(-1)
    np.testing.assert_array_equal(ours32, ref32.numpy())
    ours = _np(qj.dequantize(q, wj.dtype).astype(jnp.float32)).reshape(-1)
    np.testing.assert_array_equal(ours, ref32.to(getattr(torch, dtype)).float().numpy())
    if _bnb_kernel_trusted(shape, blocksize):
        theirs = F.dequantize_4bit(packed, state).reshape(-1).float().numpy()
        np.testing.assert_array_equal(ours, theirs)  # by value: bnb's fp4 zero sign varies by path


def _bnb_kernel_trusted(shape, blocksize) -> bool:
    """bnb 0.50.2's CPU dequantize_4bit kernel misplaces block scales when a block straddles
    two rows and the row length is a multiple of 8 (e.g. (64, 64) at blocksize 128): it returns
    values that disagree with its own codes and scales. Compare with it only elsewhere."""
    last = shape[-1] if len(shape) > 1 else None
    return last is None or last % blocksize == 0 or last % 8 != 0


@pytest.mark.parametrize("shape,dtype,quant_type,blocksize", _cases()[::3])
def test_double_quant_equals_bnb(rng, shape, dtype, quant_type, blocksize):
    torch, F = torch_and_bnb()
    wt, wj = random_weights(rng, shape, dtype)
    packed, state = F.quantize_4bit(wt, blocksize=blocksize, quant_type=quant_type, compress_statistics=True)
    _, plain = F.quantize_4bit(wt, blocksize=blocksize, quant_type=quant_type, compress_statistics=False)

    # Given bnb's offset, the 8-bit scale codes and second-level scales are bit-identical.
    q2, scale2, _ = double_quantize(jnp.asarray(plain.absmax.numpy()), 256, offset=state.offset.numpy())
    np.testing.assert_array_equal(_np(q2), state.absmax.numpy())
    np.testing.assert_array_equal(_np(scale2).view(np.uint32), state.state2.absmax.numpy().view(np.uint32))

    # Our own offset (a float32 mean in XLA's summation order) agrees to float32 rounding.
    q = qj.quantize(wj, quant_type, blocksize)
    np.testing.assert_allclose(float(q.offset), float(state.offset), rtol=TOL["offset_rel"], atol=0)
    np.testing.assert_array_equal(_np(q.codes), packed.numpy().reshape(-1))

    # Dequantizing bnb's own double-quantized state: its scales bit for bit, its values by value.
    loaded = qj.from_bnb_state_dict(bnb_state_dict(packed, state))
    their_scales = (F.dequantize_blockwise(state.absmax, state.state2) + state.offset).numpy()
    np.testing.assert_array_equal(_np(loaded.block_scales()).view(np.uint32), their_scales.view(np.uint32))
    if _bnb_kernel_trusted(shape, blocksize):
        state.dtype = torch.float32
        ref32 = F.dequantize_4bit(packed, state).reshape(-1).numpy()
        np.testing.assert_array_equal(_np(qj.dequantize(loaded, jnp.float32)).reshape(-1), ref32)


@pytest.mark.parametrize("n,blocksize", [(256, 256), (1000, 256), (70000, 256), (4096 * 3 + 5, 4096), (300, 64)])
def test_8bit_blockwise_equals_bnb(rng, n, blocksize):
    torch, F = torch_and_bnb()
    x = (rng.standard_normal(n) * rng.uniform(0.1, 10)).astype(np.float32)
    ref_q, ref_state = F.quantize_blockwise(torch.from_numpy(x), blocksize=blocksize)
    q, absmax = quantize_8bit(jnp.asarray(x), dynamic_map(signed=True), blocksize)
    np.testing.assert_array_equal(_np(q), ref_q.numpy())
    np.testing.assert_array_equal(_np(absmax), ref_state.absmax.numpy())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", TORCH_DTYPES)
def test_state_dict_matches_bnb_as_dict(rng, quant_type, double_quant, dtype):
    torch, F = torch_and_bnb()
    wt, wj = random_weights(rng, (96, 200), dtype)
    packed, state = F.quantize_4bit(wt, blocksize=64, quant_type=quant_type, compress_statistics=double_quant)
    theirs = bnb_state_dict(packed, state, prefix="model.layers.0.mlp.up_proj.weight")

    q = qj.quantize(wj, quant_type, 64, double_quant=double_quant)
    if double_quant:  # pin bnb's offset (a summation-order detail) to compare every byte
        _, plain = F.quantize_4bit(wt, blocksize=64, quant_type=quant_type)
        q2, scale2, offset = double_quantize(jnp.asarray(plain.absmax.numpy()), 256, offset=state.offset.numpy())
        q = QuantizedArray(q.codes, q2, scale2, offset, q.shape, q.dtype, q.blocksize, q.quant_type, 256)
    ours = qj.to_bnb_state_dict(q, prefix="model.layers.0.mlp.up_proj.weight")

    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype, key
        assert ours[key].shape == theirs[key].shape, key
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
    meta_key = [k for k in ours if "quant_state" in k][0]
    assert json.loads(bytes(ours[meta_key]))["dtype"] == dtype


def test_bnb_reads_our_state_dict(rng):
    """bnb's own QuantState.from_dict accepts what we write and dequantizes to our values."""
    torch, F = torch_and_bnb()
    w = (rng.standard_normal((64, 320)) * 0.7).astype(np.float32)
    q = qj.quantize(jnp.asarray(w), "nf4", 64)
    sd = qj.to_bnb_state_dict(q, prefix="lin.weight")
    tensors = {k: torch.from_numpy(v) for k, v in sd.items()}
    packed = tensors.pop("lin.weight")
    state = F.QuantState.from_dict({k[len("lin.weight.") :]: v for k, v in tensors.items()}, device=torch.device("cpu"))
    theirs = F.dequantize_4bit(packed, state).numpy()
    np.testing.assert_array_equal(theirs, np.asarray(qj.dequantize(q, jnp.float32)))


def test_all_zero_block_matches_bnb_cpu_path():
    """An all-zero block stores the code of 0.0: NF4 0b0111 (bnb's CPU path), FP4 0b0000."""
    torch, F = torch_and_bnb()
    w = np.zeros(192, np.float32)
    w[128:] = np.linspace(-1, 1, 64, dtype=np.float32)
    for quant_type, zero_byte in (("nf4", 0x77), ("fp4", 0x00)):
        packed, state = F.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type=quant_type)
        q = qj.quantize(jnp.asarray(w), quant_type, 64, double_quant=False)
        np.testing.assert_array_equal(np.asarray(q.codes), packed.numpy().reshape(-1))
        assert np.all(np.asarray(q.codes)[:64] == zero_byte)
        np.testing.assert_array_equal(np.asarray(qj.dequantize(q, jnp.float32))[:128], 0.0)
