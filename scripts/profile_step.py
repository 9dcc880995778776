"""Where a training step's time goes: XLA's own per-op trace of the jitted gradient, grouped by source op.

    python scripts/profile_step.py [--model smollm2|PATH] [--batch 4] [--seq-len 256] [--rank 16]
                                   [--remat none|full] [--float] [--top 30] [--torch]
                                   [--dtype auto|float32|bfloat16]

Compiles ``jax.grad`` of the masked next-token loss (``qlora_jax.train.step``) for
the same model, batch and LoRA recipe as ``scripts/bench.py``, runs it twice under
``jax.profiler``, and reads the trace back (``jax.profiler.ProfileData``). Each
executed XLA op (a fusion, a dot) is named by the JAX source op it came from (its
HLO ``op_name`` metadata; the layers are one scan, so each op sums over them) and its output
shape; the table sums their time per step, largest first, with the kind of fusion
(``ynn`` = a YNNPACK dot on the CPU, ``copy``/``transpose`` = a layout change).

``--torch`` profiles the PyTorch reference step instead (transformers + peft +
bitsandbytes QLoRA, checkpointing on, as ``bench.py``'s torch-qlora) with
``torch.profiler`` and prints its operator table.

Op times are per thread: when XLA runs two ops at once, both count in full, so
the column can add up to more than the wall time printed above it.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import TARGETS, _batch, compute_dtype, model_folder  # noqa: E402  (the same model and batch as the benchmark)

from qlora_jax.layers import QuantConfig, merge, split_trainable  # noqa: E402
from qlora_jax.models import LoraConfig  # noqa: E402
from qlora_jax.models.loaders import from_pretrained  # noqa: E402
from qlora_jax.train.step import token_losses  # noqa: E402

_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+) ")


def op_sources(hlo_text: str) -> dict[str, tuple[str, str]]:
    """HLO instruction name -> (source op_name, output shape)."""
    out = {}
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        src = re.search(r'op_name="([^"]+)"', line)
        name = src.group(1) if src else "?"
        out[m.group(1)] = (re.sub(r"^jit\([^)]*\)/", "", name), m.group(2).split("{")[0])
    return out


def profile(fn, args, trace_dir: str, runs: int = 2) -> tuple[float, collections.Counter]:
    """Wall seconds per call and op time per call, keyed by (kind, source, shape)."""
    compiled = fn.lower(*args).compile()  # called directly below: one compile, and its HLO names the trace
    jax.block_until_ready(compiled(*args))
    sources = op_sources(compiled.as_text())
    temp = compiled.memory_analysis().temp_size_in_bytes
    print(f"XLA temporaries of the compiled gradient: {temp / 2**30:.2f} GiB", flush=True)
    jax.profiler.start_trace(trace_dir)
    t0 = time.perf_counter()
    for _ in range(runs):
        jax.block_until_ready(compiled(*args))
    wall = (time.perf_counter() - t0) / runs
    jax.profiler.stop_trace()
    data = jax.profiler.ProfileData.from_file(sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1])
    ops = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            for ev in line.events:
                if ev.name in sources:
                    kind = re.sub(r"(_fusion)?\.\d+$", "", ev.name)
                    ops[(kind,) + sources[ev.name]] += ev.duration_ns / 1e9 / runs
    return wall, ops


def profile_torch(args) -> None:
    """``torch.profiler``'s operator table for one PyTorch QLoRA step after a warm-up step."""
    import torch
    from torch.profiler import ProfilerActivity

    import bench

    step = bench.torch_step(model_folder(args), True, args)
    step()
    with torch.profiler.profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        step()
        print(f"PyTorch QLoRA step under the profiler: {time.perf_counter() - t0:.3f} s")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--layers", type=int, default=0)
    ap.add_argument("--cache", default=".cache/bench")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--remat", default="none", choices=("none", "full"))
    ap.add_argument("--float", action="store_true", help="unquantized (bf16-stored) base instead of NF4")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                    help="compute dtype (auto: bfloat16 on a GPU, float32 on a CPU), as bench.py")
    ap.add_argument("--torch", action="store_true", help="profile the PyTorch QLoRA step instead")
    args = ap.parse_args(argv)
    if args.torch:
        return profile_torch(args)
    dtype = jnp.dtype(compute_dtype(args, jax.default_backend() != "cpu"))
    lora = LoraConfig(rank=args.rank, alpha=2.0 * args.rank, targets=TARGETS)
    model, variables, _ = from_pretrained(model_folder(args), quantization=None if args.float else QuantConfig(),
                                          lora=lora, dtype=dtype, key=jax.random.key(0), remat=args.remat)
    params, frozen = split_trainable(variables)
    ids = _batch(model.config.vocab_size, args.batch, args.seq_len)
    t = args.seq_len
    batch = {"tokens": ids[:, :-1].astype(np.int32), "targets": ids[:, 1:].astype(np.int32),
             "loss_mask": np.ones((args.batch, t), np.float32), "segment_ids": np.ones((args.batch, t), np.int32),
             "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (args.batch, t)).copy()}
    loss = lambda p, fr, b: token_losses(model, merge(p, fr), b, None, True)[0]  # noqa: E731
    grad = jax.jit(jax.grad(loss))
    with tempfile.TemporaryDirectory() as trace_dir:
        wall, ops = profile(grad, (params, frozen, batch), trace_dir)
    kinds = collections.Counter()
    for (kind, _, _), s in ops.items():
        kinds[kind] += s
    print(f"grad of the loss ({args.model}, batch {args.batch} x {t}, r={args.rank}, remat {args.remat}): "
          f"{wall:.3f} s per call (wall); op time {sum(ops.values()):.3f} s")
    print("by kind: " + ", ".join(f"{k} {s:.3f} s" for k, s in kinds.most_common(8)))
    print("\n| op time / step | kind | source op | output |\n|---:|---|---|---|")
    for (kind, src, shape), s in ops.most_common(args.top):
        print(f"| {s * 1e3:.1f} ms | {kind} | {src[-90:]} | {shape} |")


if __name__ == "__main__":
    main()
