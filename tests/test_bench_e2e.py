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
                "--variants", "ours-qlora,torch-qlora,ours-lora", "--json", str(tmp_path / "b.json")])
    results = json.loads((tmp_path / "b.json").read_text())["results"]
    assert all("error" not in r for r in results.values()), results
    # same weights, same batch, one identical update: the two stacks' losses agree closely
    assert abs(results["ours-qlora"]["loss"] - results["torch-qlora"]["loss"]) < 1e-3
    printed = capsys.readouterr().out
    assert "| ours-qlora / torch-qlora |" in printed and "| ours-qlora / ours-lora |" in printed
