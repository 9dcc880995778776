"""Kernel benchmark: dequantize bandwidth, 4-bit matmuls and a QLoRA layer, each against its bf16 baseline.

    python scripts/bench_kernels.py [--tiny] [--budget-s 330] [--json PATH] [--markdown PATH]

Every figure is measured side by side in one run and printed as a time and a
ratio to its baseline (a device-to-device copy for dequantize bandwidth, the
bf16 XLA dot for matmuls, a bf16 dense layer with the same LoRA for the layer).
``--tiny`` is the CPU dry run: small shapes, Pallas in interpret mode, so the
script is exercised end to end without a GPU (its times mean nothing).

Timing: each measured executable runs ``R`` independent calls on ``R``
different weight/input sets (R >= 4, and large enough that the bf16 weights
cycle through 3x the 60 MB L2; no call can be merged with another), after a
warm-up; the figure is the median of 10 runs divided by ``R``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import qlora_jax as qj
from qlora_jax.kernels import dequantize, quantized_matmul, resolve_backend, transposed_matmul
from qlora_jax.layers import QLoRADense, QuantConfig
from qlora_jax.train.report import publish_table

LLAMA3_8B = [(4096, 4096), (4096, 14336), (14336, 4096), (4096, 1024)]  # (K, N): in, out features
MATMUL_BACKENDS = ("xla", "pallas", "pallas_unfused", "triton")


def _time(fn, args_sets, runs: int) -> float:
    """Median seconds per call of ``fn`` over ``len(args_sets)`` independent calls in one executable."""
    many = jax.jit(lambda sets: [fn(*a) for a in sets])
    jax.block_until_ready(many(args_sets))  # compile + warm up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(many(args_sets))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / len(args_sets)


L2_BYTES = 60 * 2**20  # the H200's L2


def _reps(k: int, n: int, reps: int) -> int:
    """Enough weight sets that the bf16 baseline's weights cycle through 3x the L2 (small shapes need more)."""
    return 2 if reps <= 2 else min(32, max(reps, -(-3 * L2_BYTES // (2 * k * n))))


def _weights(key, k: int, n: int, reps: int):
    keys = jax.random.split(key, _reps(k, n, reps))
    w16 = [jax.random.normal(kk, (n, k), jnp.bfloat16) * 0.02 for kk in keys]
    return w16, [jax.jit(qj.quantize)(w) for w in w16]


def bench_dequantize(shapes, reps, runs):
    rows = []
    copy_elems = 512 * 1024 * 1024 // 2 if jax.default_backend() != "cpu" else 1 << 16
    src = [jax.random.normal(jax.random.key(i), (copy_elems,), jnp.bfloat16) for i in range(2)]
    t_copy = _time(lambda a: a + jnp.bfloat16(1), [(s,) for s in src], runs)
    copy_bw = 2 * copy_elems * 2 / t_copy
    rows.append(dict(kind="copy", shape=f"{copy_elems} bf16", ms=t_copy * 1e3, gbps=copy_bw / 1e9))
    for k, n in shapes:
        _, qs = _weights(jax.random.key(k + n), k, n, reps)
        q = qs[0]
        moved = q.nbytes + 2 * q.size  # packed codes and scales read, bf16 written
        for backend in ("xla", "pallas"):
            try:
                t = _time(lambda q: dequantize(q, jnp.bfloat16, backend), [(qq,) for qq in qs], runs)
            except Exception as e:  # report and keep going
                rows.append(dict(kind="dequantize", shape=f"{n}x{k}", backend=backend, error=_short(e)))
                continue
            bw = moved / t
            rows.append(dict(kind="dequantize", shape=f"{n}x{k}", backend=backend, ms=t * 1e3, gbps=bw / 1e9,
                             vs_copy=bw / copy_bw))
    return rows


def bench_matmul(shapes, ms, reps, runs, deadline):
    rows = []
    weights = {(k, n): _weights(jax.random.key(7 * k + n), k, n, reps) for k, n in shapes}
    for m in ms:  # M outer: if the budget runs out, every shape has its small-M rows
        for k, n in shapes:
            w16, qs = weights[(k, n)]
            if time.perf_counter() > deadline:
                rows.append(dict(kind="matmul", shape=f"M={m} {k}x{n}", error="skipped: time budget spent"))
                continue
            xs = [jax.random.normal(jax.random.key(i), (m, k), jnp.bfloat16) for i in range(len(qs))]
            dys = [jax.random.normal(jax.random.key(100 + i), (m, n), jnp.bfloat16) for i in range(len(qs))]
            base_f = _time(lambda x, w: x @ w.T, list(zip(xs, w16)), runs)
            base_b = _time(lambda dy, w: dy @ w, list(zip(dys, w16)), runs)
            auto = resolve_backend("auto", m, qs[0])
            row = dict(kind="matmul", shape=f"M={m} {k}x{n}", auto=auto, bf16_fwd_ms=base_f * 1e3, bf16_bwd_ms=base_b * 1e3)
            ref = np.asarray((xs[0] @ qs[0].dequantize(jnp.bfloat16).T).astype(jnp.float32))
            for backend in MATMUL_BACKENDS:
                try:
                    y = np.asarray(quantized_matmul(xs[0], qs[0], backend).astype(jnp.float32))
                    err = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
                    t_f = _time(lambda x, q: quantized_matmul(x, q, backend), list(zip(xs, qs)), runs)
                    t_b = _time(lambda dy, q: transposed_matmul(dy, q, backend), list(zip(dys, qs)), runs)
                except Exception as e:
                    row[backend] = dict(error=_short(e))
                    continue
                row[backend] = dict(fwd_ms=t_f * 1e3, bwd_ms=t_b * 1e3, fwd_x=base_f / t_f, bwd_x=base_b / t_b, rel_err=err)
            rows.append(row)
    return rows


def bench_layer(shapes, ms, reps, runs, rank=64):
    rows = []
    for k, n in shapes:
        for m in ms:
            xs = [jax.random.normal(jax.random.key(i), (m, k), jnp.bfloat16) for i in range(reps)]
            times = {}
            for name, quant in (("bf16", None), ("qlora", QuantConfig())):
                layer = QLoRADense(n, rank=rank, alpha=16.0, quant=quant)
                vs = [layer.init(jax.random.key(10 + i), xs[0]) for i in range(reps)]

                def step(x, v, layer=layer):
                    loss = lambda p, x: jnp.sum(layer.apply({"params": p, "frozen": v["frozen"]}, x).astype(jnp.float32))
                    return jax.grad(loss, argnums=(0, 1))(v["params"], x)

                times[name] = _time(step, list(zip(xs, vs)), runs)
            auto = resolve_backend("auto", m, jax.eval_shape(qj.quantize, jax.ShapeDtypeStruct((n, k), jnp.bfloat16)))
            rows.append(dict(kind="layer", shape=f"M={m} {k}x{n} r={rank}", auto=auto, bf16_ms=times["bf16"] * 1e3,
                             qlora_ms=times["qlora"] * 1e3, qlora_over_bf16=times["qlora"] / times["bf16"]))
    return rows


def _short(e: Exception) -> str:
    """The error's type and first non-empty lines (Triton's CompilationError puts the cause after "at L:C:")."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return f"{type(e).__name__}: {' / '.join(lines[:4])[:300]}".replace("|", "/") if lines else type(e).__name__


def table(rows) -> str:
    """The results as one markdown table (the last thing printed)."""
    out = ["| what | shape | figure | vs baseline |", "|---|---|---|---:|"]
    for r in rows:
        if r["kind"] == "copy":
            out.append(f"| d2d copy | {r['shape']} | {r['gbps']:.0f} GB/s | 1.00 |")
        elif r["kind"] == "dequantize":
            fig = r.get("error") or f"{r['gbps']:.0f} GB/s ({r['ms']:.3f} ms)"
            out.append(f"| dequantize {r['backend']} | {r['shape']} | {fig} | {r.get('vs_copy', float('nan')):.2f} of copy |")
        elif r["kind"] == "matmul":
            if "error" in r:
                out.append(f"| matmul | {r['shape']} | {r['error']} | |")
                continue
            out.append(f"| matmul bf16 dot fwd / bwd | {r['shape']} | {r['bf16_fwd_ms']:.3f} / {r['bf16_bwd_ms']:.3f} ms | 1.00 |")
            for b in MATMUL_BACKENDS:
                v = r[b]
                tag = f"{b} (auto)" if b == r["auto"] else b
                if "error" in v:
                    out.append(f"| {tag} | {r['shape']} | {v['error']} | |")
                else:
                    out.append(f"| {tag} fwd / bwd | {r['shape']} | {v['fwd_ms']:.3f} / {v['bwd_ms']:.3f} ms (err {v['rel_err']:.1e}) "
                               f"| {v['fwd_x']:.2f}x / {v['bwd_x']:.2f}x |")
        elif r["kind"] == "layer":
            out.append(f"| layer fwd+bwd bf16 / QLoRA ({r['auto']}) | {r['shape']} | {r['bf16_ms']:.3f} / {r['qlora_ms']:.3f} ms "
                       f"| {r['qlora_over_bf16']:.2f}x time |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="CPU dry run: small shapes, Pallas interpret mode")
    ap.add_argument("--budget-s", type=float, default=330.0, help="stop starting new matmul rows after this long")
    ap.add_argument("--json", help="write every figure here")
    ap.add_argument("--markdown", help="write the table here")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    if args.tiny:
        shapes, ms, layer_shapes, layer_ms, reps, runs = [(256, 128)], [1, 16], [(256, 128)], [16], 2, 2
    else:
        shapes, ms, layer_shapes, layer_ms, reps, runs = LLAMA3_8B, [1, 16, 512, 4096], [(4096, 4096)], [512, 4096], 4, 10
    dev = jax.devices()[0]
    print(f"[bench] {dev.platform} {dev.device_kind}, jax {jax.__version__}", flush=True)
    rows = bench_dequantize(shapes, reps, runs)
    print("[bench] dequantize done", flush=True)
    rows += bench_matmul(shapes, ms, reps, runs, deadline=start + args.budget_s)
    print("[bench] matmul done", flush=True)
    rows += bench_layer(layer_shapes, layer_ms, reps, runs)
    text = table(rows)
    header = f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}, {time.strftime('%Y-%m-%d')}, {time.perf_counter() - start:.0f} s"
    publish_table(header, text, dict(device=dev.device_kind, jax=jax.__version__, rows=rows), args.json, args.markdown)


if __name__ == "__main__":
    main()
