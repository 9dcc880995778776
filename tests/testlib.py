"""Shared test helpers and the one tolerance table of the suite (``pythonpath = tests``)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from qlora_jax.quant.codebooks import code_table

# Tolerances, named by what they compare. Exact comparisons use array_equal, not these.
TOL = {
    # relative difference of an offset (mean of block scales) between two float32 summation orders
    "offset_rel": 4e-7,
    # double quantization moves each block scale by at most this fraction of it
    "dq_scale_rel": 0.02,
    # float32 slack on top of an exact error bound, relative to the block scale
    "f32_slack": 1e-6,
    # ||kernel - reference|| / ||reference|| of a matmul: float32 (summation order only), bf16 (output rounding)
    "matmul_rel_f32": 2e-6,
    "matmul_rel_bf16": 8e-3,
    # float32 matmuls on a GPU, where dots take TF32 inputs by default (reference and kernel alike)
    "matmul_rel_tf32": 3e-3,
}


def random_llama_tensors(rng: np.random.Generator, config) -> dict[str, np.ndarray]:
    """Every HF tensor ``config`` needs, float32 N(0, 0.1^2), norm weights around 1 (never zeros)."""
    from qlora_jax.models.weights import expected_shapes

    return {n: (rng.standard_normal(s) * 0.1 + (1.0 if "norm" in n else 0.0)).astype(np.float32)
            for n, s in expected_shapes(config).items()}


def rel_err(a, b) -> float:
    """``||a - b|| / ||b||`` in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))

TORCH_DTYPES = ("float32", "bfloat16", "float16")


def max_abs_frac(quant_type: str) -> float:
    """Worst-case 4-bit round-trip error as a fraction of the block absmax: half the widest code gap."""
    table = np.sort(code_table(quant_type).astype(np.float64))
    return 0.5 * float(np.max(np.diff(table))) + TOL["f32_slack"]


def torch_and_bnb():
    import bitsandbytes.functional as bnb_f
    import torch

    return torch, bnb_f


def random_weights(rng: np.random.Generator, shape, dtype: str):
    """The same random weights as a torch tensor and a jax array (identical values)."""
    torch, _ = torch_and_bnb()
    scale = rng.uniform(0.02, 3.0)
    base = (rng.standard_normal(shape) * scale).astype(np.float32)
    t = torch.from_numpy(base).to(getattr(torch, dtype))
    j = jnp.asarray(t.float().numpy()).astype(jnp.dtype(dtype))
    return t, j


def bnb_state_dict(packed, state, prefix: str = "weight") -> dict[str, np.ndarray]:
    """What bnb / transformers serialize for one Linear4bit weight, as numpy arrays."""
    out = {prefix: packed.numpy()}
    for key, value in state.as_dict(packed=True).items():
        out[f"{prefix}.{key}"] = value.numpy()
    return out
