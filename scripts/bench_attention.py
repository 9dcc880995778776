"""Attention forward + backward, every implementation side by side: time, XLA temporaries, error.

    python scripts/bench_attention.py [--preset smollm2|llama3-8b] [--batch 4] [--seq-lens 256,1024]
        [--dtype auto|float32|bfloat16] [--packed N] [--repeats 5] [--implementations ...]
        [--interpret] [--tiny] [--budget-s S] [--json PATH] [--markdown PATH]

One causal self-attention of the preset's shape (``q`` ``(B, T, H, D)``, ``k``/``v``
``(B, T, KV, D)``; SmolLM2: 9 / 3 heads, D = 64; Llama-3-8B: 32 / 8, D = 128), with
``--packed N`` cutting every row into N segments (positions restart in each, segment
ids keep them apart). For each sequence length and implementation:

* the median wall time of one jitted ``out, (dq, dk, dv) = vjp(attention)(q, k, v)(ct)``
  (block_until_ready, one warm-up call, ``--repeats`` timed calls), and its ratio to
  the first implementation measured at that length;
* XLA's temporaries of that executable (``compile().memory_analysis().temp_size_in_bytes``:
  what the backward keeps and the scores it builds, beyond inputs and outputs);
* the largest ``|x - x_ref|`` over ``out, dq, dk, dv`` against ``reference_attention`` in
  float32 ("highest" matmul precision) on the same inputs, where the reference runs.

Implementations: ``reference`` (dense XLA scores), ``chunked`` (blockwise online
softmax in lax loops), ``pallas`` (the fused Triton kernel: on a CPU only with
``--interpret`` and short sequences), ``cudnn`` (``jax.nn.dot_product_attention(
implementation="cudnn")`` in bfloat16; GPU only, no segment ids). The reference is
skipped where its float32 scores ``B * H * T^2 * 4`` bytes exceed ``--reference-cap-gib``.
A row that cannot run says why and the run goes on. ``--tiny`` is the CPU dry run
(scripts/gpu_check.sh --dry-run): its times mean nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.models.attention import attention, reference_attention
from qlora_jax.train.report import publish_table

PRESETS = {"smollm2": dict(heads=9, kv_heads=3, head_dim=64), "llama3-8b": dict(heads=32, kv_heads=8, head_dim=128)}
INTERPRET_MAX_T = 512  # Pallas interpret mode runs every program in Python-driven loops: short sequences only


def _short(e: Exception) -> str:
    text = f"{type(e).__name__}: {e}".splitlines()[0]
    return text[:160]


def inputs(preset: str, batch: int, t: int, dtype, packed: int, seed: int = 0):
    """``q, k, v, ct`` of the preset's shape and the int32 ``positions, segment ids`` (``None`` unpacked)."""
    p = PRESETS[preset]
    keys = jax.random.split(jax.random.key(seed + t), 4)
    shapes = [(batch, t, p["heads"], p["head_dim"]), *[(batch, t, p["kv_heads"], p["head_dim"])] * 2,
              (batch, t, p["heads"], p["head_dim"])]
    q, k, v, ct = (jax.random.normal(key, s, jnp.float32).astype(dtype) for key, s in zip(keys, shapes))
    index = np.arange(t)
    if packed > 1:
        length = -(-t // packed)
        pos, seg = index % length, index // length + 1
        seg = jnp.asarray(np.broadcast_to(seg, (batch, t)), jnp.int32)
    else:
        pos, seg = index, None
    return (q, k, v, ct), jnp.asarray(np.broadcast_to(pos, (batch, t)), jnp.int32), seg


def attend_fn(name: str, interpret: bool):
    """``f(q, k, v, pos, seg) -> out`` of one implementation (causal self-attention)."""
    if name in ("reference", "chunked"):
        def f(q, k, v, pos, seg):
            return attention(q, k, v, q_positions=pos, q_segment_ids=seg, kv_segment_ids=seg, implementation=name)
    elif name == "pallas":
        from qlora_jax.kernels.flash_attention import flash_attention

        def f(q, k, v, pos, seg):
            return flash_attention(q, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=seg,
                                   kv_segment_ids=seg, interpret=interpret)
    elif name == "cudnn":
        def f(q, k, v, pos, seg):
            if seg is not None:
                raise ValueError("no segment ids in jax.nn.dot_product_attention's cuDNN path (only a dense mask)")
            bf = jnp.bfloat16
            out = jax.nn.dot_product_attention(q.astype(bf), k.astype(bf), v.astype(bf), is_causal=True,
                                               implementation="cudnn")
            return out.astype(q.dtype)
    else:
        raise ValueError(f"unknown implementation {name!r}")
    return f


def fwd_bwd(attend):
    """``(out, dq, dk, dv)`` of ``attend`` at ``q, k, v`` for the cotangent ``ct``."""
    def step(q, k, v, ct, pos, seg):
        out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, pos, seg), q, k, v)
        return (out, *vjp(ct))
    return step


def _time(compiled, args, warmup: int, repeats: int) -> tuple[float, tuple]:
    for _ in range(warmup):
        result = jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def _errors(got, want) -> tuple[float, float]:
    """``(max |got - want|, max over arrays of that / max |want|)`` over ``out, dq, dk, dv`` in float32."""
    abs_err, rel_err = 0.0, 0.0
    for a, b in zip(got, want):
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
        e = float(jnp.max(jnp.abs(a - b)))
        abs_err, rel_err = max(abs_err, e), max(rel_err, e / max(float(jnp.max(jnp.abs(b))), 1e-30))
    return abs_err, rel_err


def _on_gpu() -> bool:
    return jax.default_backend() in ("gpu", "cuda", "rocm")


def skip_reason(name: str, t: int, scores_bytes: int, args) -> str | None:
    """Why ``name`` does not run at length ``t`` (``None``: it runs)."""
    if name == "reference" and scores_bytes > args.reference_cap_gib * 2**30:
        return f"skipped: {scores_bytes / 2**30:.1f} GiB of float32 scores > --reference-cap-gib {args.reference_cap_gib:g}"
    if name == "pallas" and not _on_gpu():
        if not args.interpret:
            return f"skipped: needs a GPU (or --interpret, at T <= {INTERPRET_MAX_T})"
        if t > INTERPRET_MAX_T:
            return f"skipped: interpret mode only up to T = {INTERPRET_MAX_T}"
    if name == "pallas":
        from qlora_jax.kernels.flash_attention import unsupported_reason

        if (why := unsupported_reason(PRESETS[args.preset]["head_dim"])) is not None:
            return f"skipped: {why}"
    return None


def bench(args, dtype) -> list[dict]:
    """One row per (length, implementation): ``ms``, ``vs_first``, ``temp_bytes``, errors, or ``error``: why not."""
    rows = []
    deadline = time.perf_counter() + args.budget_s
    p = PRESETS[args.preset]
    new_row = lambda t, name: dict(seq_len=t, implementation=name,  # noqa: E731
                                   dtype="bfloat16" if name == "cudnn" else jnp.dtype(dtype).name)
    for t in args.seq_lens:
        if time.perf_counter() > deadline:  # not even the oracle: every row of this length says so
            rows += [new_row(t, name) | dict(error="skipped: time budget spent") for name in args.implementations]
            continue
        tensors, pos, seg = inputs(args.preset, args.batch, t, dtype, args.packed)
        scores_bytes = args.batch * p["heads"] * t * t * 4
        want = None
        if scores_bytes <= args.reference_cap_gib * 2**30:
            with jax.default_matmul_precision("highest"):
                oracle = jax.jit(fwd_bwd(lambda q, k, v, pos, seg: reference_attention(
                    q, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg)))
                want = jax.block_until_ready(oracle(*(x.astype(jnp.float32) for x in tensors), pos, seg))
        first = None
        for name in args.implementations:
            row = new_row(t, name)
            rows.append(row)
            if (why := skip_reason(name, t, scores_bytes, args)) is not None:
                row["error"] = why
                continue
            if time.perf_counter() > deadline:
                row["error"] = "skipped: time budget spent"
                continue
            try:
                t0 = time.perf_counter()
                compiled = jax.jit(fwd_bwd(attend_fn(name, args.interpret))).lower(*tensors, pos, seg).compile()
                row["compile_s"] = time.perf_counter() - t0
                mem = compiled.memory_analysis()
                row["temp_bytes"] = None if mem is None else int(mem.temp_size_in_bytes)
                seconds, got = _time(compiled, (*tensors, pos, seg), 1, args.repeats)
            except Exception as e:  # report and keep going (cuDNN absent, an unsupported shape, ...)
                row["error"] = ("unavailable: " if name == "cudnn" else "failed: ") + _short(e)
                continue
            row["ms"] = seconds * 1e3
            first = first or row
            row["vs_first"] = row["ms"] / first["ms"]
            row["vs"] = first["implementation"]
            if want is not None:
                row["max_abs_err"], row["max_rel_err"] = _errors(got, want)
            del compiled, got
        print(f"[bench_attention] T={t} done", flush=True)
    return rows


def _size(b) -> str:
    if b is None:
        return "n/a"
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB" if b >= 2**20 else f"{b / 2**10:.1f} KiB"


def table(rows) -> str:
    out = ["| T | implementation | dtype | fwd+bwd | vs first | XLA temp | max abs err vs f32 reference |",
           "|---:|---|---|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['seq_len']} | {r['implementation']} | {r['dtype']} | {r['error']} | | | |")
            continue
        err = f"{r['max_abs_err']:.1e}" if "max_abs_err" in r else "n/a (no reference)"
        out.append(f"| {r['seq_len']} | {r['implementation']} | {r['dtype']} | {r['ms']:.2f} ms "
                   f"| {r['vs_first']:.2f}x {r['vs']} | {_size(r['temp_bytes'])} | {err} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="smollm2", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=None, help="default 4 (1 with --tiny)")
    ap.add_argument("--seq-lens", default=None, help="comma-separated T values (default 256,1024; --tiny: 64,96)")
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                    help="auto: bfloat16 on a GPU, float32 on a CPU (cuDNN always runs in bfloat16)")
    ap.add_argument("--packed", type=int, default=1, help="segments per row (1: one sequence per row)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls after one warm-up (default 5; --tiny: 2)")
    ap.add_argument("--implementations", default=None, help="comma-separated; default reference,chunked,pallas "
                    "on a CPU, pallas,chunked,reference,cudnn on a GPU (the first is every ratio's base)")
    ap.add_argument("--interpret", action="store_true", help="run pallas in interpret mode on a CPU (short T only)")
    ap.add_argument("--reference-cap-gib", type=float, default=8.0, help="skip the reference above this many GiB of scores")
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop starting new rows after this long")
    ap.add_argument("--tiny", action="store_true", help="CPU dry run: batch 1, T = 64, 96, float32, 2 repeats")
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    args = ap.parse_args(argv)
    gpu = _on_gpu()
    args.batch = args.batch or (1 if args.tiny else 4)
    args.repeats = args.repeats or (2 if args.tiny else 5)
    args.seq_lens = [int(x) for x in (args.seq_lens or ("64,96" if args.tiny else "256,1024")).split(",")]
    dtype = args.dtype if args.dtype != "auto" else ("float32" if args.tiny or not gpu else "bfloat16")
    default_impls = "pallas,chunked,reference,cudnn" if gpu else "reference,chunked,pallas"
    args.implementations = (args.implementations or default_impls).split(",")
    for name in args.implementations:
        attend_fn(name, args.interpret)  # unknown names fail before any work
    start = time.perf_counter()
    rows = bench(args, jnp.dtype(dtype))
    dev = jax.devices()[0]
    p = PRESETS[args.preset]
    header = (f"attention fwd+bwd, {args.preset} ({p['heads']} q / {p['kv_heads']} KV heads, D = {p['head_dim']}), "
              f"batch {args.batch}, causal{f', {args.packed} segments per row' if args.packed > 1 else ''}; "
              f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}, {time.strftime('%Y-%m-%d')}, "
              f"{time.perf_counter() - start:.0f} s")
    payload = dict(device=dev.device_kind, jax=jax.__version__, preset=args.preset, shape=p, batch=args.batch,
                   dtype=dtype, packed=args.packed, repeats=args.repeats, rows=rows)
    publish_table(header, table(rows), payload, args.json, args.markdown)


if __name__ == "__main__":
    main()
