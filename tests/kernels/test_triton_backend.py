"""The jax-triton backend's kernels, proven without a GPU: Triton's CPU interpreter and an sm_90 compile.

Both need the ``triton`` package (the ``oracle`` extra installs it; CI requires
it) and run in subprocesses because Triton fixes interpreter mode when a kernel
is decorated.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
from testlib import TOL

pytestmark = pytest.mark.oracle
SCRIPT = pathlib.Path(__file__).with_name("triton_check.py")


def _run(mode: str, **env) -> list[dict]:
    pytest.importorskip("triton")
    pytest.importorskip("torch")
    proc = subprocess.run([sys.executable, str(SCRIPT), mode], capture_output=True, text=True, timeout=600,
                          env=os.environ | env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_triton_kernels_match_reference_in_interpreter():
    rows = _run("interpret", TRITON_INTERPRET="1")
    assert len(rows) == 14
    for row in rows:
        tol = TOL["matmul_rel_f32"] if row["case"][3] == "float32" else TOL["matmul_rel_bf16"]
        assert row["rel_err"] < tol, row


def test_triton_kernels_compile_for_sm90():
    rows = _run("compile")
    assert len(rows) == 4
    for row in rows:
        assert row["cubin_bytes"] > 0 and row["shared"] <= 227 * 1024, row  # fits an H100/H200 block
