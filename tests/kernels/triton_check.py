"""Runs the jax-triton backend's Triton kernels without a GPU (a helper script, not a test module).

``python triton_check.py interpret``: every case through Triton's CPU
interpreter (set ``TRITON_INTERPRET=1`` first) on torch tensors, printing one
JSON line per case with the relative error against the jnp reference.
``python triton_check.py compile``: compiles both kernels for sm_90 (H100/H200)
down to a cubin and prints their shared memory and register use.
``python triton_check.py pallas``: the same for the *Pallas* kernels, from the
Triton IR that Pallas emits for an abstract H200 (``compat.triton_ir``).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import numpy as np


def interpret_cases():
    import jax.numpy as jnp
    import torch

    import qlora_jax as qj
    from qlora_jax.kernels.fused_matmul import MatmulBlockSizes
    from qlora_jax.kernels.operands import operands
    from qlora_jax.kernels.triton_matmul import build_kernels, launch_config, table_scalars

    forward, transposed = build_kernels()
    rng = np.random.default_rng(20261128)
    cases = [(qt, dq, t, "float32", 7, MatmulBlockSizes(16, 16, 64, split=2)) for qt in ("nf4", "fp4", "int4")
             for dq in (True, False) for t in (False, True)]
    cases += [("nf4", True, t, "float16", 20, MatmulBlockSizes(16, 32, 128)) for t in (False, True)]
    for quant_type, dq, transpose, dtype, m, bs in cases:
        n, k = 64, 256
        w = (rng.standard_normal((n, k)) * rng.uniform(0.02, 1.0)).astype(np.float32)
        q = qj.quantize(jnp.asarray(w), quant_type, 64, double_quant=dq)
        lhs = rng.standard_normal((m, n if transpose else k)).astype(np.float32).astype(dtype)
        bs, grid, meta = launch_config(m, q, transpose, bs)
        ops = [torch.from_numpy(np.array(a)) for a in operands(q, n).arrays()[:-1]]  # all but the table
        out = torch.zeros((bs.split, m, k if transpose else n), dtype=torch.float32)
        kernel = transposed if transpose else forward
        table = [float(v) for v in table_scalars(quant_type)]  # the interpreter takes Python floats as fp32
        kernel[grid](torch.from_numpy(lhs), *ops, m, n, k, *table, out, PRECISION="ieee", **meta)
        wq = np.asarray(q.dequantize(jnp.dtype(dtype))).astype(np.float64)
        ref = lhs.astype(np.float64) @ (wq if transpose else wq.T)
        got = out.sum(0).numpy().astype(np.float64)
        err = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
        print(json.dumps(dict(case=[quant_type, dq, transpose, dtype, m], rel_err=err)))


def _compile(src, num_warps: int, num_stages: int = 3) -> dict:
    """Compiles Triton source (an ``ASTSource`` or a ``.ttir`` path) for sm_90; shared memory, registers, spills."""
    import triton
    from triton.backends.compiler import GPUTarget

    out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages))
    ptxas = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        ptx = pathlib.Path(tmp) / "k.ptx"
        ptx.write_text(out.asm["ptx"])
        report = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(ptx), "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr
    number = lambda pattern: int(m.group(1)) if (m := re.search(pattern, report)) else -1
    return dict(cubin_bytes=len(out.asm["cubin"]), shared=out.metadata.shared, registers=number(r"Used (\d+) registers"),
                spill_stores=number(r"(\d+) bytes spill stores"), spill_loads=number(r"(\d+) bytes spill loads"))


def pallas_cases():
    import dataclasses

    import jax
    import jax.numpy as jnp

    import qlora_jax as qj
    from qlora_jax.kernels import DequantBlockSizes, MatmulBlockSizes
    from qlora_jax.kernels.compat import triton_ir
    from qlora_jax.kernels.dequantize import _dequantize
    from qlora_jax.kernels.fused_matmul import fused_matmul_2d
    from qlora_jax.kernels.operands import operands

    S = jax.ShapeDtypeStruct
    n, k = 14336, 4096
    q = jax.eval_shape(lambda w: qj.quantize(w, "nf4", 64, double_quant=True), S((n, k), jnp.float32))
    dq = DequantBlockSizes()
    cases = [("dequantize", dq.num_warps, dq.num_stages, lambda q: _dequantize(q, jnp.dtype(jnp.bfloat16), dq, False), (q,))]
    for m in (1, 512):
        for transpose in (False, True):
            for lookup in ("select", "gather"):
                bs = dataclasses.replace(MatmulBlockSizes.get_default(m, n, k, 64, transpose), lookup=lookup)
                f = (lambda bs, t: lambda x, q: fused_matmul_2d(x, operands(q, n), shape_nk=(n, k), quant=("nf4", 64, 256),
                                                                 block_sizes=bs, interpret=False, transpose=t))(bs, transpose)
                name = f"{'transposed' if transpose else 'forward'} M={m} {lookup} {bs.block_m}x{bs.block_n}x{bs.block_k}"
                cases.append((name, bs.num_warps, bs.num_stages, f, (S((m, n if transpose else k), jnp.bfloat16), q)))
    with tempfile.TemporaryDirectory() as tmp:
        for name, warps, stages, fn, args in cases:
            (module,) = triton_ir(fn, *args)
            path = pathlib.Path(tmp) / "kernel.ttir"
            path.write_text(module)
            print(json.dumps(dict(kernel=name, warps=warps, **_compile(str(path), warps, stages))))


def compile_cases():
    from triton.compiler import ASTSource

    from qlora_jax.kernels import triton_src

    ptr = {"x": "*bf16", "codes": "*u8", "scales": "*u8", "nested": "*fp32", "offset": "*fp32", "dmap": "*fp32",
           "out": "*bf16"}
    for name, fn, lhs in (("forward", triton_src.forward, "x_ptr"), ("transposed", triton_src.transposed, "dy_ptr")):
        for bm, bn, bk, warps in ((16, 64, 256, 8), (128, 128, 64, 8)):
            sig = {lhs: "*bf16"} | {f"{k}_ptr": v for k, v in ptr.items() if k not in ("x", "out")}
            sig |= {"M": "i32", "N": "i32", "K": "i32"} | {f"T{i}": "fp32" for i in range(16)} | {"out_ptr": ptr["out"]}
            consts = dict(STEPS=4, BM=bm, BN=bn, BK=bk, B=64, B2=256, DOUBLE=True, PRECISION="tf32")
            src = ASTSource(fn=fn, signature=sig | {c: "constexpr" for c in consts}, constexprs=consts)
            print(json.dumps(dict(kernel=f"{name} {bm}x{bn}x{bk}", warps=warps, **_compile(src, warps))))


if __name__ == "__main__":
    {"interpret": interpret_cases, "compile": compile_cases, "pallas": pallas_cases}[sys.argv[1]]()
