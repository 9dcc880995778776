"""Code tables of the 4-bit and 8-bit formats, as float32 numpy arrays.

A 4-bit format is a table ``code`` of 16 float32 values in [-1, 1]; a weight
``w`` in a block with scale ``absmax`` is stored as the index ``q`` whose
``code[q]`` is nearest to ``w / absmax`` and read back as ``code[q] * absmax``.

* ``nf4``: the NormalFloat table of the QLoRA paper, in bitsandbytes' order
  (index 7 is exactly 0.0, index 15 is 1.0).
* ``fp4``: bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bit, bias 2), in
  bit-pattern order, normalised by its largest magnitude (12).
* ``int4``: symmetric integers, ``code[q] = (q - 8) / 7``: the explainer's
  ``scale = absmax / 7``, ``round``, clip to [-8, 7] scheme, stored with an offset
  of 8 so that it shares the unsigned nibble machinery.

The 8-bit dynamic maps (used for double quantization and 8-bit optimizer
state) come from ``_dynamic_maps``.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from qlora_jax.quant._dynamic_maps import DYNAMIC_SIGNED, DYNAMIC_UNSIGNED

QUANT_TYPES = ("nf4", "fp4", "int4")

_NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# FP4 magnitudes in bit-pattern order (sign bit is bit 3); normalised by 12 below.
# Pattern 0b1000 ("-0") holds +0.0, as bnb's table does (its literal is the int -0).
# bnb's C dequantization kernels decode it as -0.0 on some paths and +0.0 on others;
# the two compare equal, and every comparison with bnb is by value.
_FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
            0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)


def check_quant_type(quant_type: str) -> str:
    """Returns ``quant_type`` or raises ``ValueError`` naming the valid ones."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type={quant_type!r} is not one of {QUANT_TYPES}")
    return quant_type


@functools.cache
def code_table(quant_type: str) -> np.ndarray:
    """The 16 float32 code values of a 4-bit format, indexed by the stored nibble."""
    check_quant_type(quant_type)
    if quant_type == "nf4":
        table = np.asarray(_NF4, np.float32)
    elif quant_type == "fp4":
        raw = np.asarray(_FP4_RAW, np.float32)
        table = raw / np.float32(12.0)  # float32 division, as bnb does it
    else:
        table = (np.arange(16, dtype=np.float32) - np.float32(8.0)) / np.float32(7.0)
    table.setflags(write=False)
    return table


@functools.cache
def sorted_bounds(quant_type: str) -> tuple[np.ndarray, np.ndarray]:
    """Decision thresholds for nearest-code rounding, and the sort order.

    Returns ``(bounds, order)``: ``order`` sorts the table ascending (stable, so
    FP4's +0 comes before -0), and ``bounds[i]`` is the float32 midpoint of sorted
    entries ``i`` and ``i + 1``. A normalised value ``s`` goes to sorted position
    ``count(s > bounds)``, i.e. a value exactly on a midpoint takes the lower code,
    and the stored nibble is ``order[position]``.
    """
    table = code_table(quant_type)
    order = np.argsort(table, kind="stable").astype(np.uint8)
    ordered = table[order]
    bounds = (ordered[:-1] + ordered[1:]) / np.float32(2.0)
    bounds.setflags(write=False)
    order.setflags(write=False)
    return bounds, order


@functools.cache
def dynamic_map(signed: bool = True) -> np.ndarray:
    """bitsandbytes' 256-entry dynamic 8-bit map (sorted ascending), float32."""
    table = np.asarray(DYNAMIC_SIGNED if signed else DYNAMIC_UNSIGNED, np.float32)
    table.setflags(write=False)
    return table


def select_lookup(nibbles, quant_type: str, anchor=None):
    """``code_table(quant_type)[nibbles]`` in float32 as a 4-level tree of 15 selects over constants.

    No table read: inside a Pallas kernel a gather from a loaded vector does not
    lower at all, and on the CPU it is as fast as XLA's gather or slightly faster
    (``scripts/bench_cpu_parts.py``), so the reference and the kernels share it.

    ``anchor`` (a float array, outside kernels): the 16 code values are made scalars that
    depend on it. Constant operands of the first selects are broadcasts of constants, which
    inside the layer scan are hoisted out of the loop as 16 weight-sized float32 buffers
    (4.3 GiB for Llama-3-8B's MLP); scalars computed from the data are not.
    """
    level = [np.float32(v) for v in code_table(quant_type)]
    if anchor is not None:
        a = jnp.ravel(anchor)[0]
        keep = (a == a) | (a != a)  # always true; XLA cannot fold it for a float (NaN)
        level = [jnp.where(keep, v, np.float32(0)) for v in level]
    for bit in range(4):
        odd = ((nibbles >> bit) & 1) == 1
        level = [jnp.where(odd, level[2 * i + 1], level[2 * i]) for i in range(len(level) // 2)]
    return level[0].astype(jnp.float32)

