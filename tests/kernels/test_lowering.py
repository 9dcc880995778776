"""Every Pallas kernel lowers for an abstract H200 through Triton, on the CPU.

An op that Triton cannot compile (a gather from a loaded vector, say) fails
here in CI instead of in the rare session that has a GPU.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import pytest

import qlora_jax as qj
from qlora_jax.kernels import DequantBlockSizes, MatmulBlockSizes
from qlora_jax.kernels.compat import lower_for_device
from qlora_jax.kernels.dequantize import _dequantize
from qlora_jax.kernels.flash_attention import flash_attention
from qlora_jax.kernels.fused_matmul import fused_matmul_2d
from qlora_jax.kernels.operands import operands

S = jax.ShapeDtypeStruct


def _abstract_q(shape, double_quant=True, quant_type="nf4"):
    return jax.eval_shape(lambda w: qj.quantize(w, quant_type, 64, double_quant=double_quant), S(shape, jnp.float32))


def _triton_calls(lowered) -> int:
    return len(re.findall(r"xla\.gpu\.triton", lowered.as_text()))


@pytest.mark.parametrize("lookup", ["select", "gather"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_dequantize_lowers(lookup, double_quant):
    q = _abstract_q((14336, 4096), double_quant)  # 3584 nested scales: not a power of two
    for dtype in (jnp.bfloat16, jnp.float32):
        f = lambda q: _dequantize(q, jnp.dtype(dtype), DequantBlockSizes(lookup=lookup), False)
        assert _triton_calls(lower_for_device(f, q)) == 1


@pytest.mark.parametrize("lookup", ["select", "gather"])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("m", [1, 16, 512])
@pytest.mark.parametrize(("k", "n"), [(4096, 14336), (14336, 4096)])
def test_fused_matmul_lowers(k, n, m, transpose, lookup):
    q = _abstract_q((n, k))
    bs = dataclasses.replace(MatmulBlockSizes.get_default(m, n, k, 64, transpose), lookup=lookup)

    def f(lhs, q):
        return fused_matmul_2d(lhs, operands(q, n), shape_nk=(n, k), quant=("nf4", 64, 256), block_sizes=bs,
                               interpret=False, transpose=transpose)

    assert _triton_calls(lower_for_device(f, S((m, n if transpose else k), jnp.bfloat16), q)) == 1


@pytest.mark.parametrize("quant_type", ["fp4", "int4"])
def test_other_quant_types_lower(quant_type):
    q = _abstract_q((1024, 4096), double_quant=False, quant_type=quant_type)
    bs = MatmulBlockSizes.get_default(32, 1024, 4096, 64)
    f = lambda x, q: fused_matmul_2d(x, operands(q, 1024), shape_nk=(1024, 4096), quant=(quant_type, 64, None),
                                     block_sizes=bs, interpret=False, transpose=False)
    assert _triton_calls(lower_for_device(f, S((32, 4096), jnp.float16), q)) == 1


# Flash attention at the real models' shapes: (query heads, KV heads, head dim, T, batch), bf16.
ATTENTION_SHAPES = {"llama3-8b": (32, 8, 128, 4096, 1), "smollm2": (9, 3, 64, 2048, 2)}
FLASH_FWD, FLASH_BWD = {"flash_attention_fwd"}, {"flash_attention_dkv", "flash_attention_dq"}


def _flash_kernels(lowered) -> list[str]:
    """Names of the Pallas kernels in the lowered module, one entry per Triton custom call."""
    text = lowered.as_text()
    names = re.findall(r'name\s*=\s*"(flash_attention_\w+)"', text)
    assert len(names) == _triton_calls(lowered), "every Triton call should be one named flash kernel"
    return sorted(names)


@pytest.mark.parametrize("mask", ["causal_segments", "causal_window"])
@pytest.mark.parametrize("preset", sorted(ATTENTION_SHAPES))
@pytest.mark.parametrize("grad", [False, True])
def test_flash_attention_lowers(preset, mask, grad):
    """Forward: one Triton call; value and gradient: forward + the dk/dv and dq kernels (FA2 backward)."""
    h, kv, d, t, b = ATTENTION_SHAPES[preset]
    kw = dict(window=512) if mask == "causal_window" else {}

    def attend(q, k, v, pos, seg):
        segs = dict(q_segment_ids=seg, kv_segment_ids=seg) if mask == "causal_segments" else {}
        return flash_attention(q, k, v, q_positions=pos, kv_positions=pos, causal=True, interpret=False, **segs, **kw)

    def loss(q, k, v, pos, seg):
        return jnp.sum(attend(q, k, v, pos, seg).astype(jnp.float32) ** 2)

    f = jax.grad(loss, argnums=(0, 1, 2)) if grad else attend
    args = (S((b, t, h, d), jnp.bfloat16), S((b, t, kv, d), jnp.bfloat16), S((b, t, kv, d), jnp.bfloat16),
            S((b, t), jnp.int32), S((b, t), jnp.int32))
    names = _flash_kernels(lower_for_device(f, *args))
    assert names == sorted(FLASH_FWD | FLASH_BWD if grad else FLASH_FWD)
