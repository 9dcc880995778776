"""scripts/plan_curve.py: variant parsing, the interpolated longest sequence, the measured / planned table."""

from __future__ import annotations

import json

import pytest
from testlib import load_script

pc = load_script("plan_curve")
GIB = 2**30


def test_parse_variant():
    assert pc.parse_variant("offload+tile4096:65536,262144") == ("offload", 4096, (65536, 262144))
    assert pc.parse_variant("full:8192") == ("full", 0, (8192,))
    for bad in ("fast:1024", "full", "full:", "full:0", "offload+tileX:1024", "full:a,b"):
        with pytest.raises(ValueError, match="REMAT"):
            pc.parse_variant(bad)


def test_longest_fitting_interpolates_and_marks_extrapolation(rng):
    base, slope = int(rng.integers(1, 5)) * GIB, float(rng.uniform(1e5, 1e6))  # bytes per token
    points = {t: int(base + slope * t) for t in (1000, 4000, 16000)}
    for t_true in (1500, 9000):  # inside the compiled range: exact on a line, to the token
        t, beyond = pc.longest_fitting(points, int(base + slope * t_true))
        assert not beyond and abs(t - t_true) <= 1
    t, beyond = pc.longest_fitting(points, int(base + slope * 40000))  # past 16000: the last segment extended
    assert beyond and abs(t - 40000) <= 1
    assert pc.longest_fitting(points, base) == (0, False)  # not even 1000 tokens fit


def test_measured_table(tmp_path):
    bench = {"results": {"ours-qlora": {"peak_bytes": 6 * GIB, "peak_kind": "device"},
                         "ours-qlora-offload": {"error": "failed: boom"}}}
    plans = {"results": [{"variant": "full", "seq_len": 8192, "device_bytes": 5 * GIB, "host_bytes": 0},
                         {"variant": "offload", "seq_len": 8192, "device_bytes": 4 * GIB, "host_bytes": GIB}]}
    (tmp_path / "b.json").write_text(json.dumps(bench))
    (tmp_path / "p.json").write_text(json.dumps(plans))
    text = pc.measured_table(str(tmp_path / "b.json"), str(tmp_path / "p.json"))
    assert "| ours-qlora (remat full) | 6.00 GiB | 5.00 GiB | 1.20x | 0.00 GiB |" in text
    assert "| ours-qlora-offload (remat offload) | failed: boom |" in text


def test_cli_rejects_bad_input(capsys):
    with pytest.raises(SystemExit):
        pc.main(["--variant", "full:100", "--jobs", "0"])
    assert "--jobs 0 must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pc.main([])
    assert "give at least one --variant" in capsys.readouterr().err
