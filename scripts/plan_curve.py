"""The memory planner's device bytes against sequence length, many plans compiled in parallel processes.

    python scripts/plan_curve.py --model llama-3-8b --rank 32 --optimizer fp32 \
        --variant full:16384,65536 --variant offload+tile4096:65536,262144 --budgets 24,80,141 --jobs 4

Each ``--variant REMAT[+tileN]:T1,T2,...`` names a remat policy (``qlora_jax.models.decoder.REMAT_POLICIES``),
optionally MLP sequence tiles of N tokens, and the sequence lengths to plan it at. Every
(variant, length) is one ``qlora_jax.memory.plan`` in its own process (``--jobs`` at a time, with
XLA's GPU preallocation off: nothing runs, each process only compiles), so on a machine with many
cores the compiles overlap. Printed last: a table of each plan's device total, step temporaries
and host bytes, and for each ``--budgets`` GiB the longest sequence on the piecewise-linear curve
through the compiled lengths (``qlora_jax.memory.max_context`` compiles its answers; this script
interpolates them, and says "beyond" when the budget lies past the longest length compiled).

On a GPU this is the planner's GPU answer (the fused attention kernel, XLA's GPU buffer
assignment, remat offload's host placement), which the CPU can only approximate.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import subprocess
import sys
import time

GIB = 2**30


def parse_variant(text: str) -> tuple[str, int, tuple[int, ...]]:
    """``"offload+tile4096:65536,262144"`` -> ``("offload", 4096, (65536, 262144))``."""
    from qlora_jax.models.decoder import REMAT_POLICIES

    name, _, lengths = text.partition(":")
    remat, _, tile = name.partition("+tile")
    try:
        seqs = tuple(int(x) for x in lengths.split(",") if x.strip())
        tile_n = int(tile) if tile else 0
    except ValueError:
        seqs, tile_n = (), -1
    if remat not in REMAT_POLICIES or tile_n < 0 or not seqs or min(seqs) < 1:
        raise ValueError(f"--variant {text!r} must be REMAT[+tileN]:T1,T2,... with REMAT one of {REMAT_POLICIES}")
    return remat, tile_n, seqs


def plan_one(args, remat: str, tile: int, seq_len: int) -> dict:
    """One plan in this process: its byte counts and how long it took."""
    import jax

    from qlora_jax.layers import QuantConfig
    from qlora_jax.memory import plan, resolve_model
    from qlora_jax.models.blocks import LoraConfig

    config = resolve_model(args.model)
    if args.layers:
        config = dataclasses.replace(config, num_hidden_layers=args.layers)
    t0 = time.perf_counter()
    p = plan(config, batch=args.batch, seq_len=seq_len, lora=LoraConfig(rank=args.rank),
             quant=QuantConfig(), optimizer=args.optimizer, remat=remat, mlp_tile=tile)
    return dict(device_bytes=p.device_bytes, host_bytes=p.host_bytes, step_temp=p.step_temp, attention=p.attention,
                backend=jax.default_backend(), seconds=time.perf_counter() - t0)


def run_one(argv: list[str], remat: str, tile: int, seq_len: int, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--one", f"{remat}:{tile}:{seq_len}"]
    # nothing runs, so no preallocated pool; and no autotuning, which would allocate real (T, ...) buffers for
    # every candidate kernel in each parallel process (the plan wants the step's buffers, not its fastest kernels)
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_gpu_autotune_level=0".strip()
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false", "XLA_FLAGS": flags}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        return {"error": f"failed: {(proc.stderr.strip().splitlines() or ['?'])[-1][:200]}"}
    return json.loads(line[len("RESULT "):])


def longest_fitting(points: dict[int, int], budget: int) -> tuple[int, bool]:
    """``(T, beyond)``: where the piecewise-linear curve through ``points`` (T -> bytes) reaches ``budget``.

    ``beyond`` is True when the answer lies past the longest length compiled (the last segment
    extrapolated); 0 when not even the shortest compiled length fits.
    """
    ts = sorted(points)
    if points[ts[0]] > budget:
        return 0, False
    if len(ts) == 1:
        return ts[0], True
    for a, b in zip(ts, ts[1:]):
        if points[b] >= budget:
            return int(a + (budget - points[a]) * (b - a) / max(points[b] - points[a], 1)), False
    a, b = ts[-2], ts[-1]
    slope = (points[b] - points[a]) / (b - a)
    return (int(b + (budget - points[b]) / slope) if slope > 0 else b), True


def table(results: dict, budgets: list[float], header: str) -> str:
    lines = [header, "", "| variant | tokens | device total | step temporaries | host | attention | compile |",
             "|---|---:|---:|---:|---:|---|---:|"]
    for (variant, t), r in sorted(results.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        if "error" in r:
            lines.append(f"| {variant} | {t:,} | {r['error']} | | | | |")
        else:
            lines.append(f"| {variant} | {t:,} | {r['device_bytes'] / GIB:.2f} GiB | {r['step_temp'] / GIB:.2f} GiB | "
                         f"{r['host_bytes'] / GIB:.2f} GiB | {r['attention']} | {r['seconds']:.0f} s |")
    if budgets:
        variants = list(dict.fromkeys(v for v, _ in results))
        lines += ["", "| longest sequence (interpolated) | " + " | ".join(f"{g:g} GiB" for g in budgets) + " |",
                  "|---|" + "---:|" * len(budgets)]
        for variant in variants:
            points = {t: r["device_bytes"] for (v, t), r in results.items() if v == variant and "error" not in r}
            cells = []
            for g in budgets:
                if not points:
                    cells.append("-")
                    continue
                t, beyond = longest_fitting(points, int(g * GIB))
                cells.append(f"{t:,}" + (" (beyond)" if beyond else ""))
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def measured_table(bench_json: str, plan_json: str) -> str:
    """scripts/bench.py's measured peaks (``ours-qlora`` = remat full, ``ours-qlora-offload``) over this script's plans."""
    with open(bench_json) as f:
        bench = json.load(f)
    with open(plan_json) as f:
        plans = {r["variant"]: r for r in json.load(f)["results"]}
    lines = ["| step | measured peak (device) | planned device | measured / planned | planned host |",
             "|---|---:|---:|---:|---:|"]
    for name, variant in (("ours-qlora", "full"), ("ours-qlora-offload", "offload")):
        r, p = bench["results"].get(name, {}), plans.get(variant, {})
        if "peak_bytes" not in r or "device_bytes" not in p:
            why = r.get("error") or p.get("error") or "missing"
            lines.append(f"| {name} (remat {variant}) | {why} | | | |")
            continue
        kind = "" if r.get("peak_kind") == "device" else f" ({r.get('peak_kind')})"
        lines.append(f"| {name} (remat {variant}) | {r['peak_bytes'] / GIB:.2f} GiB{kind} | {p['device_bytes'] / GIB:.2f} GiB"
                     f" | {r['peak_bytes'] / p['device_bytes']:.2f}x | {p['host_bytes'] / GIB:.2f} GiB |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3-8b", help="a qlora_jax.memory preset, HF folder or .gguf")
    ap.add_argument("--layers", type=int, default=0, help="keep the first N decoder layers (0: all)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--optimizer", default="fp32", help="AdamW state: fp32 or 8bit")
    ap.add_argument("--variant", action="append", default=[], help="REMAT[+tileN]:T1,T2,... (repeatable)")
    ap.add_argument("--budgets", default="", help="comma-separated GiB to interpolate the longest sequence for")
    ap.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    ap.add_argument("--timeout-s", type=float, default=600.0, help="per plan")
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    ap.add_argument("--measured", nargs=2, metavar=("BENCH_JSON", "PLAN_JSON"),
                    help="print scripts/bench.py's measured peaks over this script's plans, and exit")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: REMAT:TILE:T, print one plan's JSON
    args = ap.parse_args(argv)
    if args.measured:
        print(measured_table(*args.measured))
        return 0
    if args.one:
        remat, tile, t = args.one.split(":")
        print("RESULT " + json.dumps(plan_one(args, remat, int(tile), int(t))))
        return 0
    try:
        variants = [parse_variant(v) for v in args.variant]
        budgets = [float(x) for x in args.budgets.split(",") if x.strip()]
    except ValueError as err:
        ap.error(str(err))
    if not variants:
        ap.error("give at least one --variant")
    if args.jobs < 1:
        ap.error(f"--jobs {args.jobs} must be at least 1")
    work = [(f"{r}{f'+tile{n}' if n else ''}", r, n, t) for r, n, ts in variants for t in ts]
    results = {}
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(run_one, argv, r, n, t, args.timeout_s): (name, t) for name, r, n, t in work}
        for fut in concurrent.futures.as_completed(futures):
            results[futures[fut]] = fut.result()
            print(f"[plan_curve] {futures[fut]}: {results[futures[fut]]}", flush=True)
    header = (f"{time.strftime('%Y-%m-%d')}, command: python scripts/plan_curve.py {' '.join(argv)}; "
              f"{args.model}{f' ({args.layers} layers)' if args.layers else ''}, batch {args.batch}, LoRA r={args.rank} on all projections, nf4 + double quant, "
              f"{args.optimizer} AdamW, bf16 compute")
    text = table(results, budgets, header)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": [dict(variant=v, seq_len=t, **r) for (v, t), r in results.items()]},
                      f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
