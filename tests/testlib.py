"""Shared test helpers and the one tolerance table of the suite (``pythonpath = tests``)."""

from __future__ import annotations

import importlib.util
import pathlib

import jax
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


ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_script(name: str):
    """``scripts/<name>.py`` imported as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# float32 unit roundoff: one rounding moves a value by at most this fraction of it
F32_U = 2.0**-24


def reorder_rtol(n_terms: int) -> float:
    """Tolerance between two float32 evaluations of one expression that differ only in summation order.

    A float32 sum of ``n`` terms is within ``n * F32_U`` of the exact sum, relative to the sum of
    the terms' magnitudes (the classical worst-case bound, first order); two evaluations that sum in
    different orders (micro-batches against one batch, a recomputation, another CPU's vector width)
    are therefore within ``2 * n * F32_U`` of each other. ``n_terms`` is the total length of the
    chain of sums a value goes through (forward and backward); independent roundings add up like
    a random walk, so real differences sit far below this bound, while any wrong factor or term is
    far above it.
    """
    return 2 * n_terms * F32_U


def assert_trees_close(actual, desired, rtol: float) -> None:
    """Leaf by leaf: ``|actual - desired| <= rtol * max|desired|``, and no leaf of ``desired`` is all zeros.

    The error of a float32 reduction is proportional to the magnitude of what is summed, not to
    the result, so it is measured against the leaf's scale (its largest element): an element near
    zero carries the absolute error of its neighbours. An all-zero ``desired`` leaf would make the
    comparison empty, so it is refused.
    """
    pairs = list(zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(desired), strict=True))
    for (path, a), d in pairs:
        a, d = np.asarray(a, np.float64), np.asarray(d, np.float64)
        name = jax.tree_util.keystr(path)
        scale = float(np.max(np.abs(d)))
        assert a.shape == d.shape and scale > 0, f"{name}: shapes {a.shape} / {d.shape}, scale {scale}"
        err = float(np.max(np.abs(a - d)))
        assert err <= rtol * scale, f"{name}: max |difference| {err:.3g} > {rtol:.3g} x leaf scale {scale:.3g}"


def random_llama_tensors(rng: np.random.Generator, config) -> dict[str, np.ndarray]:
    """Every HF tensor ``config`` needs, float32 N(0, 0.1^2), norm weights around 1 (never zeros)."""
    from qlora_jax.models.weights import expected_shapes

    return {n: (rng.standard_normal(s) * 0.1 + (1.0 if "norm" in n else 0.0)).astype(np.float32)
            for n, s in expected_shapes(config).items()}



def random_llama_variables(rng: np.random.Generator, config, lora):
    """NF4 variables of ``random_llama_tensors`` (float32 base), LoRA ``A`` and ``B`` made non-zero (N(0, 0.05^2) added)."""
    import jax
    import jax.numpy as jnp

    from qlora_jax.layers import QuantConfig
    from qlora_jax.models import variables_from_tensors

    v = variables_from_tensors(config, random_llama_tensors(rng, config).items(), quant=QuantConfig(), lora=lora,
                               base_dtype=jnp.float32)
    v["params"] = jax.tree.map(lambda p: p + jnp.asarray(rng.standard_normal(p.shape) * 0.05, p.dtype), v["params"])
    return v

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


def overhanging_pallas_blocks(fn, *args) -> list[str]:
    """Every block of every ``pallas_call`` in ``fn(*args)``'s jaxpr that does not tile its array exactly.

    Pallas' Triton lowering masks no block access: a block hanging past an array's end reads and
    writes out of bounds on a GPU (it corrupted the fused matmul's split-K sums on the H200), while
    interpret mode pads it silently. So the kernels' wrappers pad to whole blocks, and this checks it.
    """
    import jax

    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                name = eqn.params.get("name_and_src_info", eqn.params.get("name", "pallas_call"))
                for bm in eqn.params["grid_mapping"].block_mappings:
                    shape = bm.array_aval.shape
                    blocks = [getattr(d, "block_size", d) for d in bm.block_shape]
                    for dim, blk in zip(shape, blocks):
                        if isinstance(blk, int) and blk > 1 and dim % blk:
                            found.append(f"{name}: block {tuple(blocks)} over array {tuple(shape)}")
                            break
            for value in eqn.params.values():
                for sub in value if isinstance(value, (list, tuple)) else (value,):
                    inner = getattr(sub, "jaxpr", None)
                    if inner is not None:
                        walk(inner if hasattr(inner, "eqns") else inner.jaxpr)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def fixed_mask(seed: int, shape, rate: float):
    """A known inverted-dropout multiplier (0 or ``1 / (1 - rate)``), to stand in for a random mask."""
    keep = jax.random.bernoulli(jax.random.key(seed), 1.0 - rate, shape)
    return keep.astype(jnp.float32) / (1.0 - rate)


def fixed_mask_layer(layer, seed: int):
    """``layer`` (a ``QLoRADense``) whose dropout multiplies by ``fixed_mask(seed, x.shape, layer.dropout)``."""
    import dataclasses

    from qlora_jax.layers import QLoRADense

    class FixedMask(QLoRADense):
        def _dropout(self, x):
            return x * fixed_mask(seed, x.shape, self.dropout)

    fields = {f.name: getattr(layer, f.name) for f in dataclasses.fields(QLoRADense)
              if f.init and f.name not in ("parent", "name")}
    return FixedMask(**fields)
