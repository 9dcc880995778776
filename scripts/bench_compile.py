"""Compile time of the trainer's step by depth, on abstract shapes (nothing is allocated).

    python scripts/bench_compile.py --model llama-3-8b --layers 4,32,80 --seq-len 256
    python scripts/bench_compile.py --smollm2   # the real model: first train step and first generation

For each depth it lowers and compiles ``make_train_step`` (remat full, chunked attention,
fp32 AdamW, LoRA r=32 on all projections) for the preset's shapes with ``num_hidden_layers``
set, and prints seconds for trace + lower and for XLA's compile (building the abstract
variables is left out). ``--smollm2`` loads SmolLM2-135M-Instruct (the default model) and times
what a user waits for: the first train step (compile + run, batch 1 x ``--seq-len``) against a
later one, and ``generate``'s first 8 tokens from a 16-token prompt (two compiles) against the
next 8. It uses only APIs that
exist before and after the layer scan, so running it from a checkout of an older commit
(``PYTHONPATH=<worktree> python scripts/bench_compile.py ...``) measures the unrolled model
on the same machine (docs/benchmarks.md, "Compile time").
"""

from __future__ import annotations

import argparse
import dataclasses
import time


def compile_seconds(config, seq_len: int, rank: int) -> tuple[float, float]:
    import jax
    import jax.numpy as jnp

    from qlora_jax.layers import QuantConfig, split_trainable
    from qlora_jax.memory import abstract_variables
    from qlora_jax.models import LlamaForCausalLM, LoraConfig
    from qlora_jax.optim import OptimizerConfig, make_optimizer
    from qlora_jax.train.step import make_train_step

    lora = LoraConfig(rank=rank, alpha=2.0 * rank)
    model = LlamaForCausalLM(config, lora, QuantConfig(), dtype=jnp.bfloat16, remat="full", attention="chunked")
    params, frozen = split_trainable(abstract_variables(config, lora, QuantConfig()))  # the loader, abstractly: untimed
    tx = make_optimizer(OptimizerConfig(), 10)
    t0 = time.perf_counter()
    ints = jax.ShapeDtypeStruct((1, 1, seq_len), jnp.int32)
    batch = {"tokens": ints, "positions": ints, "segment_ids": ints, "targets": ints,
             "loss_mask": jax.ShapeDtypeStruct(ints.shape, jnp.float32)}
    step = jax.jit(make_train_step(model, tx), donate_argnums=(0, 1))
    lowered = step.lower(params, jax.eval_shape(tx.init, params), frozen, batch, jax.random.key(0))
    t1 = time.perf_counter()
    lowered.compile()
    return t1 - t0, time.perf_counter() - t1


def smollm2_seconds(seq_len: int) -> dict[str, float]:
    """Seconds of the first and a later train step, and of the first and next 8 generated tokens."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from qlora_jax.layers import QuantConfig, split_trainable
    from qlora_jax.models import LoraConfig
    from qlora_jax.models.generate import generate
    from qlora_jax.models.loaders import from_pretrained
    from qlora_jax.optim import OptimizerConfig, make_optimizer
    from qlora_jax.train.loop import default_model_path
    from qlora_jax.train.step import make_train_step

    model, variables, _ = from_pretrained(default_model_path(), QuantConfig(), LoraConfig(rank=16, dropout=0.0),
                                          dtype=jnp.float32, key=jax.random.key(0), remat="full")
    params, frozen = split_trainable(variables)
    tx = make_optimizer(OptimizerConfig(), 10)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (1, 1, seq_len), dtype=np.int32)
    batch = {"tokens": ids, "targets": ids, "loss_mask": np.ones(ids.shape, np.float32), "segment_ids": np.ones_like(ids),
             "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), ids.shape).copy()}
    step = jax.jit(make_train_step(model, tx), donate_argnums=(0, 1))
    state, times = tx.init(params), []
    for i in range(2):
        t0 = time.perf_counter()
        params, state, metrics = step(params, state, frozen, batch, jax.random.key(i))
        float(metrics.loss)
        times.append(time.perf_counter() - t0)
    gen_model = model.clone(remat="none")
    prompt = [int(x) for x in ids[0, 0, :16]]
    gens = []
    for _ in range(2):
        t0 = time.perf_counter()
        generate(gen_model, {"params": params, **frozen}, prompt, 8)  # the step donated the first params
        gens.append(time.perf_counter() - t0)
    return {"first step": times[0], "next step": times[1], "first 8 tokens": gens[0], "next 8 tokens": gens[1]}


def main(argv=None) -> int:
    from qlora_jax.memory import resolve_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-3-8b", help="a qlora_jax.memory preset or an HF config folder")
    ap.add_argument("--layers", default="4,32", help="comma-separated depths")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--smollm2", action="store_true", help="time the real default model's first step and generation")
    args = ap.parse_args(argv)
    if args.smollm2:
        print("| SmolLM2-135M-Instruct (30 layers), float32, remat full | seconds |\n|---|---:|")
        for name, seconds in smollm2_seconds(args.seq_len).items():
            print(f"| {name} | {seconds:.1f} |", flush=True)
        return 0
    config = resolve_model(args.model)
    depths = [int(x) for x in args.layers.split(",") if x]
    if not depths or min(depths) < 1:
        ap.error(f"--layers {args.layers!r} must list positive depths")
    print(f"| {args.model} layers | trace + lower s | compile s | total s |")
    print("|---|---|---|---|")
    for depth in depths:
        lower_s, compile_s = compile_seconds(dataclasses.replace(config, num_hidden_layers=depth), args.seq_len,
                                             args.rank)
        print(f"| {depth} | {lower_s:.1f} | {compile_s:.1f} | {lower_s + compile_s:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
