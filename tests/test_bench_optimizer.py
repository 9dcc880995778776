"""scripts/bench_optimizer.py runs end to end on a small tree and accounts the state's memory kinds."""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib

import jax

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_tiny_run(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_optimizer", ROOT / "scripts" / "bench_optimizer.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    full = jax.eval_shape(lambda: bench.lora_tree(32, 64))  # the real-size tree, shapes only
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(full)) == 167_772_160  # Llama-3-8B, r = 64
    bench.main(["--tiny", "--json", str(tmp_path / "o.json")])
    rows = {r["optimizer"]: r for r in json.loads((tmp_path / "o.json").read_text())["rows"]}
    plain, off = rows["adamw fp32"], rows["adamw fp32, offloaded"]
    assert plain["state_device_bytes"] == plain["state_bytes"] > 0 and plain["state_host_bytes"] == 0
    assert off["state_device_bytes"] == 0 and off["state_host_bytes"] == off["state_bytes"] == plain["state_bytes"]
    assert rows["adamw fp32, offloaded per layer"]["state_device_bytes"] == 0
    assert rows["adamw 8-bit, offloaded"]["state_device_bytes"] == 0
    assert all(r["step_ms"] > 0 for r in rows.values())
