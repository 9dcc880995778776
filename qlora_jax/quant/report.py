"""Reconstruction-error report: what NF4 keeps that 4-bit integers lose, measured.

For a set of weight matrices and each (quant_type, double_quant) pair, quantize,
dequantize in float32, and pool the errors over all matrices:

    RMSE        = sqrt(sum (W - Q(W))^2 / N)
    max |err|   = max |W - Q(W)|
    rel. Frob.  = ||W - Q(W)||_F / ||W||_F
    bits/weight = 8 * stored bytes / N       (codes + scales + nested scales)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.quant.api import quantize

CONFIGS: tuple[tuple[str, bool], ...] = tuple((t, dq) for t in ("nf4", "fp4", "int4") for dq in (True, False))


@dataclasses.dataclass(frozen=True)
class ErrorRow:
    quant_type: str
    double_quant: bool
    rmse: float
    max_abs: float
    rel_frobenius: float
    bits_per_weight: float


@jax.jit
def _error_sums(w: jax.Array, back: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    err = back - w
    return jnp.sum(err * err), jnp.max(jnp.abs(err)), jnp.sum(w * w)


def error_rows(
    weights: Sequence[np.ndarray], blocksize: int = 64, configs: Iterable[tuple[str, bool]] = CONFIGS
) -> list[ErrorRow]:
    """One ``ErrorRow`` per config, pooled over ``weights`` (float arrays of any shape)."""
    rows = []
    for quant_type, double_quant in configs:
        sse = ssw = max_abs = 0.0
        nbytes = count = 0
        for w in weights:
            wj = jnp.asarray(w, jnp.float32)
            q = quantize(wj, quant_type, blocksize, double_quant=double_quant)
            e2, emax, w2 = _error_sums(wj, q.dequantize(jnp.float32))
            sse, ssw, max_abs = sse + float(e2), ssw + float(w2), max(max_abs, float(emax))
            nbytes, count = nbytes + q.nbytes, count + q.size
        rows.append(ErrorRow(quant_type, double_quant, math.sqrt(sse / count), max_abs,
                             math.sqrt(sse / ssw), 8.0 * nbytes / count))
    return rows


def format_table(rows: Sequence[ErrorRow], title: str) -> str:
    """A Markdown table of ``rows``, with RMSE also as a ratio to NF4 + double quant."""
    base = next((r.rmse for r in rows if r.quant_type == "nf4" and r.double_quant), rows[0].rmse)
    lines = [
        f"**{title}**",
        "",
        "| format | double quant | RMSE | RMSE / nf4+dq | max abs err | rel. Frobenius | bits/weight |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.quant_type} | {'yes' if r.double_quant else 'no'} | {r.rmse:.4e} | {r.rmse / base:.3f} | "
            f"{r.max_abs:.4e} | {r.rel_frobenius:.4f} | {r.bits_per_weight:.3f} |"
        )
    return "\n".join(lines)
