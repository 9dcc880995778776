"""scripts/long_context.py end to end on a one-layer tiny2: folder, one trainer run, table and JSON with a peak RSS."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from testlib import load_script

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "long_context.py"


@pytest.mark.e2e
@pytest.mark.slow
def test_one_run_reports_peak_rss(tmp_path):
    out = tmp_path / "r.json"
    cmd = [sys.executable, str(SCRIPT), "--preset", "tiny2", "--layers", "1", "--seq-len", "64",
           "--work-dir", str(tmp_path / "work"), "--json", str(out), "--", "--data.max_train_records", "100"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| tiny2 | 64 |" in proc.stdout, proc.stdout
    result = json.loads(out.read_text())
    run = result["runs"][0]
    assert result["preset"] == "tiny2" and result["config"]["num_hidden_layers"] == 1
    assert run["seq_len"] == 64 and run["peak_rss_kib"] > 100 * 1024  # python + jax alone exceed 100 MiB
    assert run["wall_s"] > 0 and run["loss"] > 0
    assert result["extra_args"] == ["--data.max_train_records", "100"]
    folder = tmp_path / "work" / "tiny2-L1-V49152-seed0"
    assert {"config.json", "tokenizer.json", "tokenizer_config.json",
            "model.safetensors.index.json"} <= set(os.listdir(folder))


@pytest.mark.e2e
def test_failed_run_names_the_seq_len(tmp_path):
    """A trainer that fails (here: a bad flag) stops the script with the seq_len and the child's stderr."""
    cmd = [sys.executable, str(SCRIPT), "--preset", "tiny2", "--layers", "1", "--seq-len", "32",
           "--work-dir", str(tmp_path / "work"), "--", "--loop.batch_size", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 1
    assert "seq_len=32: the trainer exited with status 2" in proc.stderr, proc.stderr
    assert "loop.batch_size=0 must be >= 1" in proc.stderr, proc.stderr


def test_bad_arguments_are_named():
    lc = load_script("long_context")
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        lc.preset_config("nope")
    with pytest.raises(ValueError, match="--vocab 1000 must be >= 49152"):
        lc.preset_config("tiny2", vocab=1000)
    assert lc.preset_config("llama3-8b-2l").num_hidden_layers == 2
    assert lc.preset_config("smollm2", layers=3).num_hidden_layers == 3
    args, extra = lc.parse_args(["--seq-len", "8", "16", "--", "--model.attention", "chunked"])
    assert args.seq_len == [8, 16] and extra == ["--model.attention", "chunked"]
