"""scripts/bench.py on a tiny model: both stacks train on the same weights and batch, and the table holds the ratios."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest
from tinymodel import write_tiny_model

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.oracle
def test_tiny_bench_runs_both_stacks(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    folder = write_tiny_model(str(tmp_path / "model"))
    bench.main(["--model", folder, "--batch", "2", "--seq-len", "32", "--rank", "4", "--steps", "1",
                "--variants", "ours-qlora,torch-qlora,ours-lora,ours-qlora-offload", "--json", str(tmp_path / "b.json")])
    results = json.loads((tmp_path / "b.json").read_text())["results"]
    assert all("error" not in r for r in results.values()), results
    # same weights, same batch, one identical update: the two stacks' losses agree closely
    assert abs(results["ours-qlora"]["loss"] - results["torch-qlora"]["loss"]) < 1e-3
    # remat offload is the program of remat full on a CPU: the same loss to the bit
    assert results["ours-qlora-offload"]["loss"] == results["ours-qlora"]["loss"]
    printed = capsys.readouterr().out
    assert "| ours-qlora / torch-qlora |" in printed and "| ours-qlora / ours-lora |" in printed
    assert "| ours-qlora-offload / ours-qlora |" in printed


@pytest.mark.oracle
def test_random_model_and_quantization_speed(tmp_path, capsys):
    """random:PRESET writes one seeded folder both stacks load; quant-* time ours and bnb on the same matrices."""
    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--model", "random:smollm2-135m", "--layers", "1", "--batch", "1", "--seq-len", "16", "--rank", "4",
                "--steps", "1", "--variants", "ours-qlora,torch-qlora,quant-ours,quant-bnb", "--quant-model",
                "smollm2-135m", "--cache", str(tmp_path / "cache"), "--json", str(tmp_path / "b.json")])
    results = json.loads((tmp_path / "b.json").read_text())["results"]
    assert all("error" not in r for r in results.values()), results
    assert abs(results["ours-qlora"]["loss"] - results["torch-qlora"]["loss"]) < 1e-2
    assert results["ours-qlora"]["load_s"] > 0 and results["torch-qlora"]["load_s"] > 0
    for name in ("quant-ours", "quant-bnb"):
        assert results[name]["device"] == "cpu" and results[name]["model_s"] == pytest.approx(30 * results[name]["layer_s"])
    assert (tmp_path / "cache" / "random-smollm2-135m-L1-seed0" / "model.safetensors.index.json").exists()
    printed = capsys.readouterr().out
    assert "| quant-ours / quant-bnb |" in printed and "| ours-qlora / torch-qlora |" in printed


@pytest.mark.oracle
def test_torch_reference_recomputes_each_layer(tmp_path):
    """The PyTorch step checkpoints as ours does: each layer's projections run forward twice per step."""
    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    folder = write_tiny_model(str(tmp_path / "model"))
    args = bench.argparse.Namespace(batch=2, seq_len=16, rank=4, dtype="auto")
    step = bench.torch_step(folder, False, args)
    layers = step.model.base_model.model.model.layers
    calls = []
    for layer in layers:  # a projection inside the layer: the recompute may stop before the layer's own hooks
        layer.self_attn.q_proj.register_forward_pre_hook(lambda *_: calls.append(1))
    loss = step()
    assert loss > 0 and len(calls) == 2 * len(layers), (len(calls), len(layers))


def test_layers_needs_a_random_model():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with pytest.raises(SystemExit, match="random:PRESET"):
        bench.main(["--layers", "2", "--variants", "ours-qlora"])
    with pytest.raises(SystemExit, match="unknown preset"):
        bench.main(["--model", "random:llama-9", "--variants", "ours-qlora"])


def test_profile_step_groups_the_trace_by_source_op(tmp_path, capsys):
    """scripts/profile_step.py on the tiny model: a wall time, op kinds, and rows named by source op."""
    spec = importlib.util.spec_from_file_location("profile_step", ROOT / "scripts" / "profile_step.py")
    prof = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prof)
    folder = write_tiny_model(str(tmp_path / "model"))
    prof.main(["--model", folder, "--batch", "2", "--seq-len", "16", "--rank", "4", "--top", "8"])
    out = capsys.readouterr().out
    assert "s per call (wall)" in out and "by kind:" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and " ms |" in line]
    assert len(rows) == 8 and any("layers" in r for r in rows)  # the scanned layers' ops, once for all layers


def test_cpu_parts_compare_each_fix_with_what_it_replaced(capsys):
    """scripts/bench_cpu_parts.py: four rows, old and new formulations agree numerically."""
    spec = importlib.util.spec_from_file_location("bench_cpu_parts", ROOT / "scripts" / "bench_cpu_parts.py")
    parts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(parts)
    parts.main(["--runs", "1"])
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and " ms |" in line]
    assert len(rows) == 4
    assert all(float(r[-2]) < 1e-5 for r in rows), rows  # max relative difference, new against old
