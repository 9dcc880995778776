"""Memory planner: the bytes a QLoRA training step needs, on the device and on the host, before running it.

``plan(config, batch=, seq_len=, lora=, quant=, optimizer=, offload=, remat=)`` -> ``MemoryPlan``;
``python -m qlora_jax.memory --model llama-3-8b --batch 1 --seq-len 512 --rank 64 --device-gib 80``.

Weights, LoRA and optimizer state are exact (equal to the live arrays' ``nbytes``; tests check it):

* 4-bit projection ``(out, in)``, ``n = out * in``, block ``b`` (``QuantizedArray``): ``ceil(n / 2)``
  code bytes; ``nb = ceil(n / b)`` block scales, uint8 with double quantization (else float32); with
  double quantization also ``ceil(nb / 256)`` float32 nested scales and one float32 offset.
* Unquantized: embeddings, ``lm_head`` (untied) and q/k/v biases in ``base_dtype``; RMSNorm
  weights in float32 (as the loaders keep them); projections in ``base_dtype`` when ``quant=None``.
* LoRA on a targeted ``(out, in)``: ``r * (in + out)`` float32 weights, as many float32 gradients.
* AdamW state of a LoRA tensor of ``n`` elements: ``"fp32"`` 8n; ``"8bit"`` ``2 * (n + 4 * ceil(n / 256))``
  if ``n >= 4096``, else 8n (``qlora_jax.optim.adamw8bit``); plus ``STEP_COUNTER_BYTES`` for the
  trainer's chain. ``offload``: the state lives on the host between steps.

Activations are an estimate of one micro-batch of ``n = B * T`` tokens: ``c`` compute-dtype bytes,
``d`` hidden, ``F`` intermediate, ``H``/``KV`` heads, ``h`` head dim, ``V`` vocab, ``L`` layers,
``R = r * (number of targeted projections)``, ``[x] = 1`` if projection ``x`` has LoRA. What JAX's
autodiff saves per decoder layer (read off the model's code residual by residual, ``remat="none"``):

    layer = n * (8d + 16 + 16h + 8H + c * ((H + 2KV)h + 5F + R + d[qkv] + d[gate|up] + Hh[o] + F[down]))
            + B * H * T^2 * (9 + c)

float32 inputs and statistics of both RMSNorms; the rope tables; rope'd q, k and v; gate, up and
silu's internals; each LoRA's ``x @ A``; a projection's input only if it has LoRA; softmax sums;
per attention score: mask 1 + masked score 4 + exp 4 + probability c bytes. Layer 0 saves
``n * (4d + 8)`` less (its first norm's input is the frozen embedding). LoRA dropout adds
``n * in * (c + 1)`` per targeted projection; ``c != 4`` adds the compute-dtype copies of the LoRA
weights. ``remat="full"`` / ``"nothing_saveable"`` keep each layer's input, ``n * d * c``, and
``8n`` for positions and segment ids; ``"dots_saveable"`` keeps the input and every matmul's output,
``n * (c * (d + Hh + sum(r + out)) + 4 * (2d + 2F)) + 4BHT^2`` per layer (the 4-bit matmuls of
o/gate/up/down and the scores in float32), and ``8n``. The head adds ``n * (4V + 4d + 20)``
(log-softmax, final norm, targets).

    saved     = sum over the layers + head
    transient = max(3 * n * V * 4 [+ V * d * c],         logits, d log-softmax, d logits (float32),
                                                         the head in the compute dtype when the
                                                         table is stored in another
                    layer_bwd [+ layer if remat])        one layer's backward (and its recompute)
    layer_bwd = 8 * B * H * T^2 + 8 * n * F + c * max(out * in)   score and MLP gradients, one
                                                                  dequantized weight
    activations = saved + transient

``device_bytes = weights + LoRA + gradients + device optimizer state + max(activations, update)``,
``update`` = the float32 updates plus, when offloaded, the state brought over for the update.
``tests/test_memory.py`` checks ``saved`` against the residuals ``jax.vjp`` keeps (exact with LoRA
on all projections and remat none / full; within 3% for a subset of targets, 10% for dots_saveable)
and ``activations`` against XLA's compiled temp memory of the train step, which needed 0.58 to 1.10
of the plan (an upper-side estimate; ratios in the test's docstring). jax 0.10.2's CPU backend
schedules every rematerialized layer's recompute before the backward, so remat saves little there
(jax 0.11.2's does not).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re

import jax.numpy as jnp

from qlora_jax.layers import QuantConfig
from qlora_jax.models.config import LlamaConfig, config_from_gguf, from_hf_config
from qlora_jax.models.llama import ALL_TARGETS, REMAT_POLICIES, LoraConfig
from qlora_jax.models.weights import expected_shapes

OPTIMIZERS = ("fp32", "8bit")
ADAM8_BLOCK, ADAM8_MIN_SIZE, NESTED_BLOCK = 256, 4096, 256
# the trainer's chain (make_optimizer(skip_nonfinite=True)): Adam's and the schedule's counts,
# apply_if_finite's two counts and its flag
STEP_COUNTER_BYTES = 17
GIB, MIB = 2**30, 2**20
_PROJ = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.weight$")

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
    lora_grads: int
    optimizer_state: int
    optimizer_on_host: bool
    saved_activations: int  # kept from the forward for the backward
    transient: int  # peak working set of the forward/backward on top of the saved activations
    update: int  # working set of the optimizer update, after the activations are freed
    lora_count: int  # trainable weights
    base_count: int  # frozen weights

    @property
    def base_weights(self) -> int:
        return self.quant_codes + self.quant_scales + self.quant_nested + self.unquantized

    @property
    def activations(self) -> int:
        return self.saved_activations + self.transient

    @property
    def device_bytes(self) -> int:
        state = 0 if self.optimizer_on_host else self.optimizer_state
        return self.base_weights + self.lora_params + self.lora_grads + state + max(self.activations, self.update)

    @property
    def host_bytes(self) -> int:
        return self.optimizer_state if self.optimizer_on_host else 0

    def fits(self, device_bytes: int) -> bool:
        """True when the step's device total is at most ``device_bytes``."""
        return self.device_bytes <= device_bytes


def _check_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int")
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


def _layer0_projections(config: LlamaConfig) -> dict[str, tuple[int, int]]:
    """``{"q_proj": (out, in), ...}`` of one decoder layer."""
    return {m.group(3): s for k, s in expected_shapes(config).items() if (m := _PROJ.match(k)) and m.group(1) == "0"}


def activation_bytes(config: LlamaConfig, batch: int, seq_len: int, lora: LoraConfig, remat: str,
                     compute_dtype="bfloat16", base_dtype="bfloat16") -> tuple[int, int]:
    """``(saved, transient)`` activation bytes of one micro-batch; the formulas are the module docstring's."""
    c, cb, n = config, _bytes("compute_dtype", compute_dtype), batch * seq_len
    head_copy = c.vocab_size * c.hidden_size * cb if jnp.dtype(compute_dtype) != jnp.dtype(base_dtype) else 0
    d, f, h, heads, kv = c.hidden_size, c.intermediate_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads
    shapes = _layer0_projections(c)
    targets = [t for t in ALL_TARGETS if lora.rank > 0 and t in lora.targets]
    has = lambda *names: int(any(t in targets for t in names))  # noqa: E731
    scores = batch * heads * seq_len * seq_len
    layer = n * (8 * d + 16 + 16 * h + 8 * heads
                 + cb * ((heads + 2 * kv) * h + 5 * f + lora.rank * len(targets) + d * has("q_proj", "k_proj", "v_proj")
                         + d * has("gate_proj", "up_proj") + heads * h * has("o_proj") + f * has("down_proj")))
    layer += scores * (9 + cb)
    if lora.dropout > 0:
        layer += n * (cb + 1) * sum(shapes[t][1] for t in targets)
    if cb != 4:
        layer += cb * lora.rank * sum(sum(shapes[t]) for t in targets)
    head = n * (4 * c.vocab_size + 4 * d + 20)
    if remat == "none":
        saved = c.num_hidden_layers * layer - n * (4 * d + 8) + head
    elif remat in ("full", "nothing_saveable"):
        saved = c.num_hidden_layers * n * d * cb + 8 * n + head
    else:  # dots_saveable
        lora_out = sum(lora.rank + shapes[t][0] for t in targets)
        per = n * (cb * (d + heads * h + lora_out) + 4 * (2 * d + 2 * f)) + 4 * scores
        saved = c.num_hidden_layers * per + 8 * n + head
    layer_bwd = 8 * scores + 8 * n * f + cb * max(o * i for o, i in shapes.values())
    transient = max(3 * n * c.vocab_size * 4 + head_copy, layer_bwd + (0 if remat == "none" else layer))
    return saved, transient


def plan(config: LlamaConfig, *, batch: int, seq_len: int, lora: LoraConfig = LoraConfig(),
         quant: QuantConfig | None = QuantConfig(), optimizer: str = "fp32", offload: bool = False,
         remat: str = "none", compute_dtype="bfloat16", base_dtype="bfloat16") -> MemoryPlan:
    """The ``MemoryPlan`` of one training step on ``batch`` x ``seq_len`` tokens (module docstring)."""
    if not isinstance(config, LlamaConfig):
        raise ValueError(f"config must be a LlamaConfig, got {type(config).__name__}")
    _check_int("batch", batch)
    _check_int("seq_len", seq_len)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} is not one of {OPTIMIZERS}")
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r} is not one of {REMAT_POLICIES}")
    if quant is not None and not isinstance(quant, QuantConfig):
        raise ValueError(f"quant must be a QuantConfig or None, got {type(quant).__name__}")
    base = _bytes("base_dtype", base_dtype)
    codes = scales = nested = unquantized = base_count = 0
    lora_sizes = []
    for name, shape in expected_shapes(config).items():
        size = math.prod(shape)
        base_count += size
        m = _PROJ.match(name)
        if m and lora.rank > 0 and m.group(3) in lora.targets:
            lora_sizes += [shape[1] * lora.rank, lora.rank * shape[0]]  # A (in, r), B (r, out)
        if m and quant is not None:
            parts = quantized_bytes(size, quant)
            codes, scales, nested = codes + parts[0], scales + parts[1], nested + parts[2]
        else:
            unquantized += size * (4 if name.endswith("norm.weight") else base)
    count = sum(lora_sizes)
    state = sum(adam_state_bytes(s, optimizer) for s in lora_sizes) + STEP_COUNTER_BYTES
    saved, transient = activation_bytes(config, batch, seq_len, lora, remat, compute_dtype, base_dtype)
    return MemoryPlan(codes, scales, nested, unquantized, 4 * count, 4 * count, state, bool(offload), saved, transient,
                      4 * count + (state if offload else 0), count, base_count)


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
    rows = [("base weights: 4-bit codes", p.quant_codes), ("  block scales", p.quant_scales),
            ("  nested scales + offsets", p.quant_nested), ("  unquantized (embeddings, head, norms)", p.unquantized),
            (f"LoRA params (fp32, {p.lora_count / 1e6:.1f}M)", p.lora_params), ("LoRA gradients (fp32)", p.lora_grads),
            ("optimizer state", state_dev, state_host), ("activations: saved", p.saved_activations),
            ("  + transient peak", p.transient)]
    if p.update > p.activations:
        rows.append(("optimizer update (peak instead of activations)", p.update))
    lines = [title] if title else []
    lines.append(f"{'part':<46}{'device':>12}{'host':>12}")
    for name, dev, *host in rows:
        host_b = host[0] if host else 0
        lines.append(f"{name:<46}{format_bytes(dev) if dev else '-':>12}{format_bytes(host_b) if host_b else '-':>12}")
    lines.append(f"{'total':<46}{format_bytes(p.device_bytes):>12}{format_bytes(p.host_bytes) if p.host_bytes else '-':>12}")
    if device_gib is not None:
        margin = int(device_gib * GIB) - p.device_bytes
        sign = "" if margin >= 0 else "-"
        verdict = "yes" if margin >= 0 else "no"
        lines.append(f"fits in {device_gib:g} GiB: {verdict} (margin {sign}{format_bytes(abs(margin))})")
    return "\n".join(lines)


def _targets(text: str) -> tuple[str, ...]:
    if text == "all":
        return ALL_TARGETS
    return tuple(t.strip() for t in text.split(",") if t.strip())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qlora_jax.memory", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="llama-3-8b", help=f"a preset {tuple(PRESETS)}, a Hugging Face folder or a .gguf file")
    ap.add_argument("--batch", type=int, default=1, help="sequences per micro-batch")
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    ap.add_argument("--rank", type=int, default=64, help="LoRA rank (0: no LoRA)")
    ap.add_argument("--targets", default="all", help="'all' or comma-separated projections, e.g. q_proj,v_proj")
    ap.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (> 0 also saves the dropped inputs)")
    ap.add_argument("--quant", default="nf4", help="nf4, fp4, int4, or none (a float base in --base-dtype)")
    ap.add_argument("--blocksize", type=int, default=64, help="weights per 4-bit block scale")
    ap.add_argument("--no-double-quant", action="store_true", help="float32 block scales instead of 8-bit ones")
    ap.add_argument("--optimizer", default="8bit", help=f"AdamW state, one of {OPTIMIZERS}")
    ap.add_argument("--offload", action="store_true", help="optimizer state in host memory between steps")
    ap.add_argument("--remat", default="full", help=f"one of {REMAT_POLICIES}")
    ap.add_argument("--compute-dtype", default="bfloat16", help="activation dtype")
    ap.add_argument("--base-dtype", default="bfloat16", help="dtype of embeddings, head and unquantized weights")
    ap.add_argument("--device-gib", type=float, default=80.0, help="device memory to check the plan against")
    args = ap.parse_args(argv)
    try:
        config = resolve_model(args.model)
        quant = None if args.quant == "none" else QuantConfig(args.quant, args.blocksize, not args.no_double_quant)
        lora = LoraConfig(rank=args.rank, dropout=args.dropout, targets=_targets(args.targets))
        p = plan(config, batch=args.batch, seq_len=args.seq_len, lora=lora, quant=quant, optimizer=args.optimizer,
                 offload=args.offload, remat=args.remat, compute_dtype=args.compute_dtype, base_dtype=args.base_dtype)
    except (ValueError, FileNotFoundError) as err:
        ap.error(str(err))
    c = config
    fmt = "float base" if quant is None else quant.quant_type + (" + double quant" if quant.double_quant else "")
    title = (f"{args.model}: {c.num_hidden_layers} layers, hidden {c.hidden_size}, vocab {c.vocab_size}; "
             f"batch {args.batch} x {args.seq_len} tokens; LoRA r={args.rank} on {len(lora.targets)} projections; "
             f"{fmt}; {args.optimizer} AdamW{' (offloaded)' if args.offload else ''}; remat {args.remat}; "
             f"{args.compute_dtype} compute")
    print(table(p, title, args.device_gib))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
