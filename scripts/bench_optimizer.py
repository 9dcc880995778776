"""Optimizer-state memory and step time: fp32 / 8-bit AdamW, on the device or offloaded to host memory.

    python scripts/bench_optimizer.py [--tiny] [--layers 32] [--json PATH] [--markdown PATH]

The parameter tree is the LoRA of Llama-3-8B at r = 64 on all seven linear
layers of each of 32 decoder layers (167.8M trainable weights, fp32). For each
optimizer it reports the state's bytes, how many of them sit in device memory
between steps (by each array's memory kind), the compiled step's device memory
(XLA's memory analysis: arguments + temporaries), and the step time, median of
``--runs`` jitted steps with donation, as a ratio to plain fp32 AdamW measured in
the same run. On a CPU "device" and "pinned_host" are the same RAM, so the
offload's time cost there is the copies alone; scripts/gpu_check.sh runs it on the H200.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from qlora_jax.optim import OptimizerConfig, host_shardings, make_optimizer
from qlora_jax.train.report import publish_table

# (in, out) of q, k, v, o, gate, up, down in Llama-3-8B
LLAMA3_8B_LINEAR = {"q_proj": (4096, 4096), "k_proj": (4096, 1024), "v_proj": (4096, 1024), "o_proj": (4096, 4096),
                    "gate_proj": (4096, 14336), "up_proj": (4096, 14336), "down_proj": (14336, 4096)}


def lora_tree(layers: int, rank: int, shapes=LLAMA3_8B_LINEAR, scale: int = 1):
    """``{"layers": {proj: {"lora_a": (L, in, r), "lora_b": (L, r, out)}}}`` of random fp32 (the models' stacked
    layout; sizes divided by ``scale``)."""
    key = jax.random.key(0)
    layer = {}
    for name, (fan_in, fan_out) in shapes.items():
        key, ka, kb = jax.random.split(key, 3)
        layer[name] = {"lora_a": jax.random.normal(ka, (layers, fan_in // scale, rank), jnp.float32) * 0.01,
                       "lora_b": jax.random.normal(kb, (layers, rank, fan_out // scale), jnp.float32) * 0.01}
    return {"layers": layer}


def _bytes(tree, kind=None) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree) if kind is None or x.sharding.memory_kind == kind)


VARIANTS = {
    "adamw fp32": OptimizerConfig(),
    "adamw fp32, offloaded": OptimizerConfig(offload=True),
    "adamw fp32, offloaded per layer": OptimizerConfig(offload=True, offload_per_layer=True),
    "adamw 8-bit": OptimizerConfig(state_bits=8),
    "adamw 8-bit, offloaded": OptimizerConfig(state_bits=8, offload=True),
}


def transfer_report(hlo: str) -> str:
    """What XLA did with the host <-> device transfers in a compiled step.

    Counts async copies (``copy-start`` / ``copy-done``) in the scheduled entry
    computation and, for each pair, how many fusions XLA scheduled between its
    start and its done: more than zero means the transfer overlaps compute.
    """
    entry = hlo[hlo.find("ENTRY"):]
    lines = [line.strip() for line in entry.splitlines()]
    starts = {}
    between = []
    fusions_seen = 0
    for line in lines:
        name = line.split(" = ")[0].lstrip("ROOT ").strip() if " = " in line else ""
        if " copy-start(" in line:
            starts[name] = fusions_seen
        elif " copy-done(" in line:
            operand = line.split("copy-done(")[1].split(")")[0].strip().lstrip("%")
            key = next((k for k in starts if k.lstrip("%") == operand), None)
            if key is not None:
                between.append(fusions_seen - starts.pop(key))
        elif " fusion(" in line or " custom-call(" in line or " dot(" in line:
            fusions_seen += 1
    if not between:
        return "no async copies (transfers elided: host and device memory are one on this backend)"
    overlapped = sum(b > 0 for b in between)
    return f"{len(between)} async copies, {overlapped} overlap compute (mean {sum(between) / len(between):.1f} ops in flight)"


def bench(params, runs: int):
    rows = []
    grads = jax.tree.map(lambda p: p * 0.5 + 0.001, params)
    for name, config in VARIANTS.items():
        tx = make_optimizer(config, total_steps=1000)
        state = tx.init(params)
        p_sh, s_sh = host_shardings(params), host_shardings(state)

        def step(p, s, g, tx=tx):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        f = jax.jit(step, in_shardings=(p_sh, s_sh, p_sh), out_shardings=(p_sh, s_sh), donate_argnums=(0, 1))
        p = jax.tree.map(jnp.copy, params)
        compiled = f.lower(p, state, grads).compile()
        mem = compiled.memory_analysis()
        p, state = jax.block_until_ready(f(p, state, grads))  # warm up
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            p, state = jax.block_until_ready(f(p, state, grads))
            times.append(time.perf_counter() - t0)
        rows.append(dict(
            optimizer=name, state_bytes=_bytes(state), state_device_bytes=_bytes(state, "device"),
            state_host_bytes=_bytes(state, "pinned_host"),
            step_device_bytes=None if mem is None else mem.argument_size_in_bytes + mem.temp_size_in_bytes,
            step_host_bytes=None if mem is None else mem.host_argument_size_in_bytes + mem.host_temp_size_in_bytes,
            step_ms=statistics.median(times) * 1e3,
            transfers=transfer_report(compiled.as_text()) if config.offload else "",
        ))
        del state, p
    base = rows[0]["step_ms"]
    for r in rows:
        r["step_vs_fp32"] = r["step_ms"] / base
    return rows


def _size(b) -> str:
    if b is None:
        return "n/a"
    return f"{b / 2**20:.0f} MiB" if b >= 2**20 else f"{b / 2**10:.1f} KiB"


def table(rows, n_params: int) -> str:
    out = [f"| optimizer ({n_params / 1e6:.1f}M trainable) | state | state in device memory between steps "
           "| step: device args + temp / host args + temp (XLA) | step time | vs fp32 AdamW |",
           "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['optimizer']} | {_size(r['state_bytes'])} | {_size(r['state_device_bytes'])} "
                   f"| {_size(r['step_device_bytes'])} / {_size(r['step_host_bytes'])} "
                   f"| {r['step_ms']:.1f} ms | {r['step_vs_fp32']:.2f}x |")
    notes = [f"- {r['optimizer']}: {r['transfers']}" for r in rows if r["transfers"]]
    return "\n".join(out + [""] + notes)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a small tree (smoke test)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    args = ap.parse_args(argv)
    params = lora_tree(2, 8, scale=64) if args.tiny else lora_tree(args.layers, 64)
    n = sum(x.size for x in jax.tree.leaves(params))
    dev = jax.devices()[0]
    rows = bench(params, 2 if args.tiny else args.runs)
    header = f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}, {time.strftime('%Y-%m-%d')}"
    text = table(rows, n)
    publish_table(header, text, dict(device=dev.device_kind, trainable=n, rows=rows), args.json, args.markdown)


if __name__ == "__main__":
    main()
