"""Kernels compiled and run by Triton itself, without a GPU.

* the jax-triton backend's kernels in Triton's CPU interpreter, against the reference;
* those kernels, and the Triton IR the *Pallas* kernels lower to, compiled for
  sm_90 (H100/H200) down to a cubin with triton 3.6 (the GPU machine's version),
  with ``ptxas -v``'s register and spill report: a kernel that needs more shared
  memory than a Hopper block has, or spills registers, fails here.

They need the ``triton`` package (the ``oracle`` extra installs it; CI requires
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


HOPPER_SHARED_PER_BLOCK = 227 * 1024


def test_triton_kernels_compile_for_sm90():
    rows = _run("compile")
    assert len(rows) == 4
    for row in rows:
        assert row["cubin_bytes"] > 0 and row["shared"] <= HOPPER_SHARED_PER_BLOCK, row
        assert 0 < row["registers"] <= 255 and row["spill_stores"] == 0, row


def test_pallas_kernels_compile_for_sm90():
    rows = _run("pallas")
    assert len(rows) == 9  # dequantize + forward / transposed x decode / training tile x two lookups
    for row in rows:
        assert row["cubin_bytes"] > 0 and row["shared"] <= HOPPER_SHARED_PER_BLOCK, row
        if "gather" not in row["kernel"]:  # the default lookup must not spill ("gather" at decode tiles does)
            assert row["spill_stores"] == 0 and row["spill_loads"] == 0, row


def test_kernel_parameters_follow_jax_triton_calling_convention(rng):
    """``jt.triton_call(*inputs, ...)`` passes the inputs in order and then the output pointer: the kernels'
    runtime parameters must be exactly that (the H200 run caught ``out_ptr`` placed before the scalars)."""
    pytest.importorskip("triton")
    import inspect

    import jax.numpy as jnp

    import qlora_jax as qj
    from qlora_jax.kernels import triton_src
    from qlora_jax.kernels.triton_matmul import call_inputs

    q = qj.quantize(jnp.asarray(rng.standard_normal((64, 256)).astype("float32")))
    inputs = call_inputs(jnp.ones((3, 256), jnp.bfloat16), q)
    for kernel in (triton_src.forward, triton_src.transposed):
        params = inspect.signature(kernel.fn).parameters.values()
        runtime = [p.name for p in params if "constexpr" not in str(p.annotation)]
        assert len(runtime) == len(inputs) + 1 and runtime[-1] == "out_ptr", runtime
        scalars = [p for p, x in zip(runtime, inputs) if not hasattr(x, "shape") or x.ndim == 0]
        assert scalars == ["M", "N", "K", *[f"T{i}" for i in range(16)]]
