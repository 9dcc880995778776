"""scripts/bench_compile.py compiles the trainer's step at each depth and prints a row per depth."""

from __future__ import annotations

import pytest

from testlib import load_script
from tinymodel import write_tiny_model


def test_prints_a_row_per_depth(tmp_path, capsys):
    folder = write_tiny_model(str(tmp_path / "model"))
    assert load_script("bench_compile").main(["--model", folder, "--layers", "1,3", "--seq-len", "32", "--rank", "4"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["1", "3"]
    assert all(float(r.split("|")[4]) > 0 for r in rows[1:])


def test_bad_depths_are_refused(tmp_path):
    folder = write_tiny_model(str(tmp_path / "model"))
    with pytest.raises(SystemExit):
        load_script("bench_compile").main(["--model", folder, "--layers", "0"])
