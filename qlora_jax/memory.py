"""Memory planner: the bytes a QLoRA training step needs, on the device and on the host, before running it.

``plan(config, batch=, seq_len=, lora=, quant=, optimizer=, offload=, remat=, attention=)`` -> ``MemoryPlan``;
``max_context(config, device_bytes, ...)`` -> the longest sequence that fits;
``python -m qlora_jax.memory --model llama-3-8b --seq-len 8192 --rank 32`` (``--max-context 8,24,80``).

Weights, LoRA and optimizer state are exact (equal to the live arrays' ``nbytes``; tests check it
against ``jax.eval_shape`` of the loader and the optimizer):

* 4-bit projection ``(out, in)``, ``n = out * in``, block ``b`` (``QuantizedArray``): ``ceil(n / 2)``
  code bytes; ``nb = ceil(n / b)`` block scales, uint8 with double quantization (else float32); with
  double quantization also ``ceil(nb / 256)`` float32 nested scales and one float32 offset.
* Unquantized: embeddings, ``lm_head`` (untied) and q/k/v biases in ``base_dtype``; RMSNorm
  weights in float32 (as the loaders keep them); projections in ``base_dtype`` when ``quant=None``.
* LoRA on a targeted ``(out, in)``: ``r * (in + out)`` float32 weights, plus ``out`` for DoRA's
  magnitude (``lora.use_dora``).
* AdamW state of a LoRA tensor of ``n`` elements: ``"fp32"`` 8n; ``"8bit"`` ``2 * (n + 4 * ceil(n / 256))``
  if ``n >= 4096``, else 8n (``qlora_jax.optim.adamw8bit``); plus ``STEP_COUNTER_BYTES`` for the
  trainer's chain. ``offload``: the state lives on the host between steps.

Everything else the step needs (activations saved for the backward, the recomputation's and the
backward's working set, the dequantized weight tiles, the chunked loss, the LoRA gradients and the
optimizer update) is read from XLA: the trainer's jitted step (``make_train_step``, parameters and
optimizer state donated) is lowered on abstract shapes (``jax.ShapeDtypeStruct``: nothing is
allocated) and compiled, and ``compiled.memory_analysis().temp_size_in_bytes`` is the plan's
``step_temp``. Two approximations, where compiling the real thing is impossible or too slow:

* **Depth.** The layers are one scan, so a deep model compiles about as fast as a shallow one, but
  every probe of ``max_context`` is a compile; to keep them cheap a model of more than ``max(EXTRAPOLATION_DEPTHS)`` layers is compiled at 2 and 3 layers and
  extrapolated linearly, ``temp(L) = temp(2) + (L - 2) * (temp(3) - temp(2))``: every layer after the
  first adds its saved input and nothing else at remat full (``tests/test_memory.py`` checks the
  extrapolation against a direct compile).
* **The platform.** XLA compiles the step for the default backend. On a CPU, attention ``"auto"``
  for a GPU is the fused Pallas kernel, which cannot be lowered there; it is planned as ``"chunked"``,
  which keeps the same residuals (q, k, v, the output and the row log-sum-exp, O(T)). The CPU
  compiler also upcasts bf16 matmuls to float32 around the dots, so bf16 plans made on a CPU run high
  against a GPU's. One CPU-only buffer is left out: the float32 copy the CPU keeps of the layer scan's
  bf16 stack of saved inputs (``cpu_stack_upcast_bytes``). Run on a GPU (``scripts/gpu_check.sh``'s
  plan stage), the planner compiles the fused kernel and XLA's GPU buffer assignment is the plan.

``remat="offload"`` (each layer's saved input on the host): on a GPU the compiled step places those
inputs in host memory and reports them as host temporaries (``host_temp_size_in_bytes``), which are
the plan's host column. XLA's CPU compiler drops the offload (host and device are one RAM there), so
the step compiles to remat full's; the plan then moves the saved inputs,
``L * batch * seq_len * hidden * itemsize(compute dtype)``, from the step's device temporaries to the
host column (``offloaded_activations``). ``tests/models/test_scan.py`` checks, on the CUDA lowering,
that exactly those ``(batch, seq_len, hidden)`` inputs are what goes to pinned_host.

``offload`` (the optimizer state on the host): the step is compiled with the state on the device and
the state is then left out of the device total, except while it is updated:
``device = weights + LoRA + max(step_temp, update)``, ``update = 8 * lora_count + 2 * optimizer_state``
(the gradients and updates, the state brought over and its new value before it goes back).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp

from qlora_jax.layers import QuantConfig, split_trainable
from qlora_jax.models.attention import resolve_implementation
from qlora_jax.models.blocks import LLAMA_TARGETS, LoraConfig, lora_targets
from qlora_jax.models.config import LlamaConfig, config_from_gguf, from_hf_config
from qlora_jax.models.decoder import REMAT_POLICIES, CausalLM
from qlora_jax.models.weights import expected_shapes, expected_tensors, tree_path, variables_from_tensors

OPTIMIZERS = ("fp32", "8bit")
ADAM8_BLOCK, ADAM8_MIN_SIZE, NESTED_BLOCK = 256, 4096, 256
# the trainer's chain (make_optimizer(skip_nonfinite=True)): Adam's and the schedule's counts,
# apply_if_finite's two counts and its flag
STEP_COUNTER_BYTES = 17
# a batch's arrays: tokens, positions, segment ids, targets (int32) and the loss mask (float32)
BATCH_BYTES_PER_TOKEN = 20
EXTRAPOLATION_DEPTHS = (2, 3)
PLATFORMS = ("gpu", "cpu")
OBJECTIVES = ("sft", "dpo", "orpo")  # the trainer's loop.objective (qlora_jax.train.config imports it)
GIB, MIB = 2**30, 2**20

PRESETS = {
    "llama-3-8b": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                              num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                              max_position_embeddings=8192, rope_theta=500000.0),
    "llama-3-70b": LlamaConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                               num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                               max_position_embeddings=8192, rope_theta=500000.0),
    "llama-2-7b": LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                              num_attention_heads=32, num_key_value_heads=32, head_dim=128),
    "smollm2-135m": LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                                max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True),
}


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Byte counts of one training step (module docstring); ``device_bytes`` / ``host_bytes`` sum them."""

    quant_codes: int  # packed 4-bit codes
    quant_scales: int  # first-level block scales (uint8 when double-quantized, else float32)
    quant_nested: int  # double quantization's float32 nested scales + offsets
    unquantized: int  # embeddings, lm_head, norms, biases (and the projections when quant is None)
    lora_params: int
    optimizer_state: int
    optimizer_on_host: bool
    batch_bytes: int  # the step's input arrays
    step_temp: int  # XLA's temporaries of the compiled step: activations, gradients, update
    update: int  # with offload: the update's working set on the device (module docstring); else 0
    lora_count: int  # trainable weights
    base_count: int  # frozen weights
    attention: str  # the attention implementation the step was compiled with
    extrapolated: bool  # step_temp extrapolated from EXTRAPOLATION_DEPTHS layers
    offloaded_activations: int = 0  # remat offload: the layers' saved inputs, in host memory

    @property
    def base_weights(self) -> int:
        return self.quant_codes + self.quant_scales + self.quant_nested + self.unquantized

    @property
    def device_bytes(self) -> int:
        state = 0 if self.optimizer_on_host else self.optimizer_state
        return self.base_weights + self.lora_params + state + self.batch_bytes + max(self.step_temp, self.update)

    @property
    def host_bytes(self) -> int:
        return (self.optimizer_state if self.optimizer_on_host else 0) + self.offloaded_activations

    def fits(self, device_bytes: int) -> bool:
        """True when the step's device total is at most ``device_bytes``."""
        return self.device_bytes <= device_bytes


@dataclasses.dataclass(frozen=True)
class StepShape:
    """What the compiled step depends on besides the model config (hashable: compiles are cached)."""

    batch: int
    seq_len: int
    lora: LoraConfig
    quant: QuantConfig | None
    optimizer: str
    remat: str
    compute_dtype: str
    base_dtype: str
    attention: str  # an explicit implementation, never "auto"
    loss_chunk: int
    mlp_tile: int = 0  # tokens per MLP sequence tile (LlamaForCausalLM.mlp_tile)
    residual_dtype: str = ""  # the residual stream's dtype (CausalLM.residual_dtype); "": compute_dtype
    objective: str = "sft"  # dpo / orpo: batch counts pairs, two rows each, and DPO adds a reference forward

    @property
    def rows(self) -> int:
        """Sequences per micro-batch: ``batch``, or two per pair for a preference objective."""
        return self.batch if self.objective == "sft" else 2 * self.batch

    @property
    def residual(self) -> str:
        return self.residual_dtype or self.compute_dtype


def _check_int(name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} must be an int >= {low}")
    return value


def _bytes(name: str, dtype) -> int:
    try:
        return jnp.dtype(dtype).itemsize
    except TypeError as err:
        raise ValueError(f"{name}={dtype!r} is not a dtype") from err


def quantized_bytes(n: int, quant: QuantConfig) -> tuple[int, int, int]:
    """``(codes, scales, nested)`` bytes of an ``n``-weight 4-bit tensor, exactly as ``QuantizedArray`` stores it."""
    nb = -(-n // quant.blocksize)
    if not quant.double_quant:
        return -(-n // 2), 4 * nb, 0
    return -(-n // 2), nb, 4 * -(-nb // NESTED_BLOCK) + 4


def adam_state_bytes(n: int, optimizer: str) -> int:
    """AdamW's ``m`` and ``v`` of one ``n``-element tensor (step counters not included)."""
    if optimizer == "8bit" and n >= ADAM8_MIN_SIZE:
        return 2 * (n + 4 * -(-n // ADAM8_BLOCK))
    return 8 * n


def abstract_variables(config: LlamaConfig, lora: LoraConfig, quant: QuantConfig | None = QuantConfig(),
                       base_dtype="bfloat16"):
    """The loader's ``{"params", "frozen"}`` as ``ShapeDtypeStruct`` leaves: nothing is materialized."""
    tensors = lambda: ((k, jnp.zeros(s, jnp.float32)) for k, s in expected_shapes(config).items())  # noqa: E731
    return jax.eval_shape(lambda: variables_from_tensors(config, tensors(), quant, lora, base_dtype=jnp.dtype(base_dtype)))


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """What XLA's ``memory_analysis()`` of the compiled step reports: device and host temporaries."""

    temp: int  # device temporaries, less the CPU-only float32 stack (``cpu_stack_upcast_bytes``)
    host_temp: int  # temporaries XLA placed in host memory (remat offload on a GPU; 0 on a CPU)


@functools.lru_cache(maxsize=128)
def compiled_step_memory(config: LlamaConfig, shape: StepShape) -> StepMemory:
    """The trainer's train step for ``config``, compiled on abstract shapes: its temporaries by memory space."""
    from qlora_jax.optim import OptimizerConfig, make_optimizer
    from qlora_jax.train.preference import make_dpo_step, make_orpo_step
    from qlora_jax.train.step import make_train_step

    model = CausalLM(config, shape.lora, shape.quant, dtype=jnp.dtype(shape.compute_dtype), remat=shape.remat,
                             attention=shape.attention, mlp_tile=shape.mlp_tile,
                             residual_dtype=jnp.dtype(shape.residual))
    params, frozen = split_trainable(abstract_variables(config, shape.lora, shape.quant, shape.base_dtype))
    tx = make_optimizer(OptimizerConfig(state_bits=8 if shape.optimizer == "8bit" else 32), 10, skip_nonfinite=True)
    ints = jax.ShapeDtypeStruct((1, shape.rows, shape.seq_len), jnp.int32)
    batch = {"tokens": ints, "positions": ints, "segment_ids": ints, "targets": ints,
             "loss_mask": jax.ShapeDtypeStruct(ints.shape, jnp.float32)}
    make = {"sft": make_train_step, "dpo": make_dpo_step, "orpo": make_orpo_step}[shape.objective]
    if shape.objective != "sft":
        batch["target_mask"] = batch["loss_mask"]
    step = jax.jit(make(model, tx, loss_chunk=shape.loss_chunk), donate_argnums=(0, 1))
    lowered = step.lower(params, jax.eval_shape(tx.init, params), frozen, batch, jax.random.key(0))
    compiled = lowered.compile()
    stats = compiled.memory_analysis()
    temp = int(stats.temp_size_in_bytes) - cpu_stack_upcast_bytes(config, shape, compiled)
    return StepMemory(temp, int(getattr(stats, "host_temp_size_in_bytes", 0) or 0))


def compiled_step_temp(config: LlamaConfig, shape: StepShape) -> int:
    """``temp_size_in_bytes`` of the trainer's train step for ``config``, compiled on abstract shapes."""
    return compiled_step_memory(config, shape).temp


def cpu_stack_upcast_bytes(config: LlamaConfig, shape: StepShape, compiled) -> int:
    """What XLA's CPU backend adds to a bf16 (or f16) step by keeping the layer scan's saved inputs in float32.

    The CPU has no bf16 dynamic-update-slice: its float normalization rewrites the scan's write of
    each layer's bf16 input into the ``(L, B, T, hidden)`` stack as a float32 one, so the compiled
    step holds an ``f32[L, B, T, hidden]`` stack where a GPU holds the bf16 one. When that buffer
    is in the compiled HLO, the difference, ``L * B * T * hidden * (4 - itemsize)``, is returned.
    Only at remat full and offload, where that input is the one stacked residual (other policies
    stack float32 intermediates of the same shape that a GPU keeps too).
    """
    itemsize = jnp.dtype(shape.residual).itemsize
    if itemsize >= 4 or jax.default_backend() != "cpu" or shape.remat not in ("full", "offload"):
        return 0
    dims = (config.num_hidden_layers, shape.batch, shape.seq_len, config.hidden_size)
    if f"f32[{','.join(map(str, dims))}]" not in compiled.as_text():
        return 0
    return math.prod(dims) * (4 - itemsize)


def step_memory(config: LlamaConfig, shape: StepShape) -> tuple[StepMemory, bool]:
    """``(temporaries, extrapolated)`` of the step at ``config``'s depth (module docstring: "Depth")."""
    depth = config.num_hidden_layers
    low, high = EXTRAPOLATION_DEPTHS
    if depth <= high:
        return compiled_step_memory(config, shape), False
    m_low = compiled_step_memory(dataclasses.replace(config, num_hidden_layers=low), shape)
    m_high = compiled_step_memory(dataclasses.replace(config, num_hidden_layers=high), shape)
    line = lambda a, b: a + (depth - low) * (b - a)  # noqa: E731
    return StepMemory(line(m_low.temp, m_high.temp), line(m_low.host_temp, m_high.host_temp)), True


def step_temp_bytes(config: LlamaConfig, shape: StepShape) -> tuple[int, bool]:
    """``(temp bytes, extrapolated)`` of the step at ``config``'s depth (module docstring: "Depth")."""
    m, extrapolated = step_memory(config, shape)
    return m.temp, extrapolated


@dataclasses.dataclass(frozen=True)
class StateBytes:
    """The exact part of a plan: what lives between steps (module docstring's formulas)."""

    quant_codes: int
    quant_scales: int
    quant_nested: int
    unquantized: int
    lora_params: int
    optimizer_state: int
    lora_count: int
    base_count: int

    @property
    def base_weights(self) -> int:
        return self.quant_codes + self.quant_scales + self.quant_nested + self.unquantized


def state_bytes(config: LlamaConfig, *, lora: LoraConfig = LoraConfig(), quant: QuantConfig | None = QuantConfig(),
                optimizer: str = "fp32", base_dtype="bfloat16") -> StateBytes:
    """Weights, LoRA and optimizer bytes of ``config``, exactly as the loader and ``make_optimizer`` allocate them."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} is not one of {OPTIMIZERS}")
    if quant is not None and not isinstance(quant, QuantConfig):
        raise ValueError(f"quant must be a QuantConfig or None, got {type(quant).__name__}")
    base = _bytes("base_dtype", base_dtype)
    codes = scales = nested = unquantized = base_count = 0
    lora_sizes: dict[tuple[str, str, str], int] = {}  # one stacked (L, ...) leaf per projection and factor
    targets = lora_targets(config, lora)
    for name, tensor in expected_tensors(config).items():
        shape = tensor.shape
        size = math.prod(shape)
        base_count += size
        proj = tensor.kind == "proj"
        path = tree_path(name, tensor.kind)[0]
        if proj and path[-2] in targets:
            factors = (("a", shape[1] * lora.rank), ("b", lora.rank * shape[0]))  # A (in, r), B (r, out)
            for factor, n in factors + ((("m", shape[0]),) if lora.use_dora else ()):  # DoRA's magnitude (out,)
                key = (*path[:-1], factor)
                lora_sizes[key] = lora_sizes.get(key, 0) + n
        if proj and quant is not None:
            parts = quantized_bytes(size, quant)
            codes, scales, nested = codes + parts[0], scales + parts[1], nested + parts[2]
        else:
            unquantized += size * (4 if tensor.kind in ("norm", "float") else base)
    count = sum(lora_sizes.values())
    state = sum(adam_state_bytes(s, optimizer) for s in lora_sizes.values()) + STEP_COUNTER_BYTES
    return StateBytes(codes, scales, nested, unquantized, 4 * count, state, count, base_count)


def planned_attention(attention: str, seq_len: int, head_dim: int, platform: str) -> str:
    """The implementation the step is compiled with: ``attention`` resolved for ``platform``; pallas is planned
    as chunked unless XLA compiles for a GPU here (the fused kernel lowers only there)."""
    if platform not in PLATFORMS:
        raise ValueError(f"platform={platform!r} is not one of {PLATFORMS}")
    impl, _ = resolve_implementation(attention, seq_len, seq_len, head_dim, platform)
    return "chunked" if impl == "pallas" and jax.default_backend() != "gpu" else impl


def plan(config: LlamaConfig, *, batch: int, seq_len: int, lora: LoraConfig = LoraConfig(),
         quant: QuantConfig | None = QuantConfig(), optimizer: str = "fp32", offload: bool = False,
         remat: str = "full", compute_dtype="bfloat16", base_dtype="bfloat16", attention: str = "auto",
         loss_chunk: int = 0, platform: str = "gpu", mlp_tile: int = 0, residual_dtype=None,
         objective: str = "sft") -> MemoryPlan:
    """The ``MemoryPlan`` of one training step on ``batch`` x ``seq_len`` tokens (module docstring).

    ``objective`` ``dpo`` / ``orpo`` (the trainer's ``loop.objective``): ``batch`` counts preference
    pairs, each two sequences (chosen, rejected), and the compiled step is the preference step.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r} is not one of {OBJECTIVES}")
    if not isinstance(config, LlamaConfig):
        raise ValueError(f"config must be a LlamaConfig, got {type(config).__name__}")
    _check_int("batch", batch)
    _check_int("seq_len", seq_len)
    _check_int("loss_chunk", loss_chunk, low=0)
    _check_int("mlp_tile", mlp_tile, low=0)
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r} is not one of {REMAT_POLICIES}")
    _bytes("compute_dtype", compute_dtype)
    residual_dtype = compute_dtype if residual_dtype is None else residual_dtype
    _bytes("residual_dtype", residual_dtype)
    s = state_bytes(config, lora=lora, quant=quant, optimizer=optimizer, base_dtype=base_dtype)
    impl = planned_attention(attention, seq_len, config.head_dim, platform)
    shape = StepShape(batch, seq_len, lora, quant, optimizer, remat, jnp.dtype(compute_dtype).name,
                      jnp.dtype(base_dtype).name, impl, loss_chunk, mlp_tile, jnp.dtype(residual_dtype).name, objective)
    m, extrapolated = step_memory(config, shape)
    temp, on_host = m.temp, m.host_temp
    if remat == "offload" and jax.default_backend() == "cpu":  # XLA's CPU drops the offload (module docstring)
        on_host = config.num_hidden_layers * shape.rows * seq_len * config.hidden_size * _bytes("residual_dtype",
                                                                                           residual_dtype)
        temp -= on_host
    update = 8 * s.lora_count + 2 * s.optimizer_state if offload else 0
    return MemoryPlan(s.quant_codes, s.quant_scales, s.quant_nested, s.unquantized, s.lora_params, s.optimizer_state,
                      bool(offload), BATCH_BYTES_PER_TOKEN * shape.rows * seq_len, temp, update, s.lora_count,
                      s.base_count, impl, extrapolated, on_host)


@dataclasses.dataclass(frozen=True)
class ContextFit:
    """The longest sequence of one micro-batch whose step fits ``device_bytes`` (``max_context``)."""

    device_bytes: int
    seq_len: int  # 0 when not even ``multiple`` tokens fit
    plan: MemoryPlan | None  # the plan compiled at ``seq_len``
    bytes_per_token: float  # the local slope of device_bytes in seq_len at the answer


def _interpolate(points: dict[int, int], budget: int) -> tuple[float, float]:
    """``(T, slope)`` where the piecewise-linear curve through ``points`` reaches ``budget``."""
    ts = sorted(points)
    pairs = list(zip(ts, ts[1:]))
    lo, hi = next(((a, b) for a, b in pairs if points[b] >= budget), pairs[-1])
    slope = (points[hi] - points[lo]) / (hi - lo)
    return (lo + (budget - points[lo]) / slope if slope > 0 else math.inf), slope


def max_context(config: LlamaConfig, device_bytes: list[int] | tuple[int, ...], *,
                probe_lengths: tuple[int, ...] = (4096, 16384), multiple: int = 256, tries: int = 3,
                **plan_kw) -> list[ContextFit]:
    """For each budget, the longest ``seq_len`` (a multiple of ``multiple``) whose plan fits.

    Once attention and the loss are chunked, every array of the step is O(T) except fixed-size
    tiles, so ``device_bytes(T)`` is close to linear (its slope creeps up with T as XLA's buffer
    sharing changes). The answer is searched on the piecewise-linear curve through the plans at
    ``probe_lengths``; each estimate is compiled and added to the curve, up to ``tries`` times per
    budget, until it fits within two ``multiple`` steps of the budget. The longest fitting length
    compiled is returned, so every answer's plan was compiled, not interpolated.
    """
    if len(probe_lengths) < 2 or list(probe_lengths) != sorted(set(probe_lengths)) or probe_lengths[0] < 1:
        raise ValueError(f"probe_lengths={probe_lengths!r} must be two or more increasing lengths")
    _check_int("multiple", multiple)
    plans = {t: plan(config, seq_len=t, **plan_kw) for t in probe_lengths}
    fits = []
    for budget in device_bytes:
        points = {t: p.device_bytes for t, p in plans.items()}
        for _ in range(tries):
            estimate, slope = _interpolate(points, budget)
            # at most 4x the longest length compiled: a nearly flat stretch of the curve (MLP tiles)
            # would otherwise extrapolate past what the int32 indices of a step can address
            t = max(multiple, int(min(estimate, 4 * max(plans))) // multiple * multiple)
            if t in plans:
                break
            plans[t] = plan(config, seq_len=t, **plan_kw)
            points[t] = plans[t].device_bytes
            if plans[t].fits(budget) and budget - plans[t].device_bytes < 2 * multiple * slope:
                break
        good = [t for t, p in plans.items() if p.fits(budget) and t % multiple == 0]
        best = max(good, default=0)
        fits.append(ContextFit(budget, best, plans.get(best), _interpolate(points, budget)[1]))
    return fits


def resolve_model(model: str) -> LlamaConfig:
    """A preset (``PRESETS``), a Hugging Face folder / ``config.json``, or a ``.gguf`` file (metadata only)."""
    if model in PRESETS:
        return PRESETS[model]
    if os.path.isfile(model) and model.endswith(".gguf"):
        return config_from_gguf(model)
    if os.path.isdir(model) or (os.path.isfile(model) and model.endswith(".json")):
        return from_hf_config(model)
    raise ValueError(f"unknown model {model!r}: not a preset {tuple(PRESETS)}, a .gguf file, "
                     "or a folder with config.json")


def format_bytes(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"


def table(p: MemoryPlan, title: str = "", device_gib: float | None = None) -> str:
    """The plan as text: a line per part with device and host columns, the totals and the fit verdict."""
    state_dev, state_host = (0, p.optimizer_state) if p.optimizer_on_host else (p.optimizer_state, 0)
    how = "extrapolated" if p.extrapolated else "compiled"
    rows = [("base weights: 4-bit codes", p.quant_codes), ("  block scales", p.quant_scales),
            ("  nested scales + offsets", p.quant_nested), ("  unquantized (embeddings, head, norms)", p.unquantized),
            (f"LoRA params (fp32, {p.lora_count / 1e6:.1f}M)", p.lora_params),
            ("optimizer state", state_dev, state_host), ("batch", p.batch_bytes),
            (f"step temporaries (XLA, {how})", p.step_temp)]
    if p.offloaded_activations:
        rows.append(("layer inputs saved for the backward (remat offload)", 0, p.offloaded_activations))
    if p.update > p.step_temp:
        rows.append(("offloaded update (peak instead of the step's)", p.update))
    lines = [title] if title else []
    lines.append(f"{'part':<52}{'device':>12}{'host':>12}")
    for name, dev, *host in rows:
        host_b = host[0] if host else 0
        lines.append(f"{name:<52}{format_bytes(dev) if dev else '-':>12}{format_bytes(host_b) if host_b else '-':>12}")
    lines.append(f"{'total':<52}{format_bytes(p.device_bytes):>12}{format_bytes(p.host_bytes) if p.host_bytes else '-':>12}")
    if device_gib is not None:
        margin = int(device_gib * GIB) - p.device_bytes
        sign = "" if margin >= 0 else "-"
        verdict = "yes" if margin >= 0 else "no"
        lines.append(f"fits in {device_gib:g} GiB: {verdict} (margin {sign}{format_bytes(abs(margin))})")
    return "\n".join(lines)


def context_table(fits: list[ContextFit]) -> str:
    """``max_context``'s answers as a Markdown table."""
    lines = ["| device memory | longest sequence | planned at it |", "|---|---:|---:|"]
    for f in fits:
        at = format_bytes(f.plan.device_bytes) if f.plan else "-"
        lines.append(f"| {f.device_bytes / GIB:g} GiB | {f.seq_len:,} | {at} |")
    return "\n".join(lines)


def _targets(text: str) -> tuple[str, ...]:
    if text == "all":
        return LLAMA_TARGETS
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _gib_list(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        raise ValueError(f"--max-context {text!r} must be comma-separated positive GiB, e.g. 8,24,80")
    return values


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qlora_jax.memory", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="llama-3-8b", help=f"a preset {tuple(PRESETS)}, a Hugging Face folder or a .gguf file")
    ap.add_argument("--batch", type=int, default=1, help="sequences per micro-batch (pairs with --objective dpo/orpo)")
    ap.add_argument("--objective", default="sft", help=f"the training objective, one of {OBJECTIVES}")
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    ap.add_argument("--rank", type=int, default=64, help="LoRA rank (0: no LoRA)")
    ap.add_argument("--targets", default="all", help="'all' or comma-separated projections, e.g. q_proj,v_proj")
    ap.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (> 0 also saves the dropped inputs)")
    ap.add_argument("--dora", action="store_true", help="DoRA: a trainable magnitude per adapted output")
    ap.add_argument("--lora-fp32-output", action="store_true", help="LoRA terms computed and added in float32")
    ap.add_argument("--quant", default="nf4", help="nf4, fp4, int4, or none (a float base in --base-dtype)")
    ap.add_argument("--blocksize", type=int, default=64, help="weights per 4-bit block scale")
    ap.add_argument("--no-double-quant", action="store_true", help="float32 block scales instead of 8-bit ones")
    ap.add_argument("--optimizer", default="8bit", help=f"AdamW state, one of {OPTIMIZERS}")
    ap.add_argument("--offload", action="store_true", help="optimizer state in host memory between steps")
    ap.add_argument("--remat", default="full", help=f"one of {REMAT_POLICIES}")
    ap.add_argument("--attention", default="auto", help="attention implementation (qlora_jax.models.attention)")
    ap.add_argument("--loss-chunk", type=int, default=0, help="tokens per chunk of the loss (0: by vocabulary)")
    ap.add_argument("--mlp-tile", type=int, default=0, help="tokens per MLP sequence tile (0: untiled)")
    ap.add_argument("--platform", default="gpu", help=f"what 'auto' attention resolves for, one of {PLATFORMS}")
    ap.add_argument("--compute-dtype", default="bfloat16", help="activation dtype")
    ap.add_argument("--residual-dtype", default=None, help="the residual stream's dtype (default: --compute-dtype)")
    ap.add_argument("--base-dtype", default="bfloat16", help="dtype of embeddings, head and unquantized weights")
    ap.add_argument("--device-gib", type=float, default=80.0, help="device memory to check the plan against")
    ap.add_argument("--max-context", default="", help="comma-separated GiB: print the longest sequence for each "
                                                      "instead of one plan")
    ap.add_argument("--probe-lengths", default="4096,16384", help="--max-context: the lengths compiled first")
    ap.add_argument("--multiple", type=int, default=256, help="--max-context: answers are multiples of this")
    args = ap.parse_args(argv)
    try:
        config = resolve_model(args.model)
        quant = None if args.quant == "none" else QuantConfig(args.quant, args.blocksize, not args.no_double_quant)
        lora = LoraConfig(rank=args.rank, dropout=args.dropout, targets=_targets(args.targets), use_dora=args.dora,
                          fp32_output=args.lora_fp32_output)
        kw = dict(batch=args.batch, lora=lora, quant=quant, optimizer=args.optimizer, offload=args.offload,
                  remat=args.remat, compute_dtype=args.compute_dtype, base_dtype=args.base_dtype,
                  attention=args.attention, loss_chunk=args.loss_chunk, platform=args.platform,
                  mlp_tile=args.mlp_tile, residual_dtype=args.residual_dtype, objective=args.objective)
        budgets = _gib_list(args.max_context) if args.max_context else None
        if budgets is None:
            p = plan(config, seq_len=args.seq_len, **kw)
        else:
            probes = tuple(int(x) for x in args.probe_lengths.split(",") if x.strip().isdigit())
            fits = max_context(config, [int(g * GIB) for g in budgets], probe_lengths=probes,
                               multiple=args.multiple, **kw)
    except (ValueError, FileNotFoundError) as err:
        ap.error(str(err))
    c = config
    fmt = "float base" if quant is None else quant.quant_type + (" + double quant" if quant.double_quant else "")
    shape = f"batch {args.batch}" + (f" {args.objective} pairs" if args.objective != "sft" else "")
    shape += "" if budgets else f" x {args.seq_len} tokens"
    title = (f"{args.model}: {c.num_hidden_layers} layers, hidden {c.hidden_size}, vocab {c.vocab_size}; "
             f"{shape}; {'DoRA' if args.dora else 'LoRA'} r={args.rank} on {len(lora_targets(c, lora))} projections; "
             f"{fmt}; {args.optimizer} AdamW{' (offloaded)' if args.offload else ''}; remat {args.remat}; "
             f"{f'MLP tiles of {args.mlp_tile}; ' if args.mlp_tile else ''}"
             f"{args.compute_dtype} compute; attention {args.attention} for {args.platform}; planned by XLA on "
             f"{jax.default_backend()}")
    if budgets is None:
        print(table(p, title, args.device_gib))
    else:
        print(title)
        print(context_table(fits))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
