"""Compile time of the trainer's step by depth, on abstract shapes (nothing is allocated).

    python scripts/bench_compile.py --model llama-3-8b --layers 4,32,80 --seq-len 256

For each depth it lowers and compiles ``make_train_step`` (remat full, chunked attention,
fp32 AdamW, LoRA r=32 on all projections) for the preset's shapes with ``num_hidden_layers``
set, and prints seconds for trace + lower and for XLA's compile. It uses only APIs that
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
    t0 = time.perf_counter()
    model = LlamaForCausalLM(config, lora, QuantConfig(), dtype=jnp.bfloat16, remat="full", attention="chunked")
    params, frozen = split_trainable(abstract_variables(config, lora, QuantConfig()))
    tx = make_optimizer(OptimizerConfig(), 10)
    ints = jax.ShapeDtypeStruct((1, 1, seq_len), jnp.int32)
    batch = {"tokens": ints, "positions": ints, "segment_ids": ints, "targets": ints,
             "loss_mask": jax.ShapeDtypeStruct(ints.shape, jnp.float32)}
    step = jax.jit(make_train_step(model, tx), donate_argnums=(0, 1))
    lowered = step.lower(params, jax.eval_shape(tx.init, params), frozen, batch, jax.random.key(0))
    t1 = time.perf_counter()
    lowered.compile()
    return t1 - t0, time.perf_counter() - t1


def main(argv=None) -> int:
    from qlora_jax.memory import resolve_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-3-8b", help="a qlora_jax.memory preset or an HF config folder")
    ap.add_argument("--layers", default="4,32", help="comma-separated depths")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rank", type=int, default=32)
    args = ap.parse_args(argv)
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
