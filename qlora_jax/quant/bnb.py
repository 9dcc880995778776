"""Conversion to and from bitsandbytes' serialized 4-bit state dict.

bitsandbytes (``QuantState.as_dict(packed=True)``, what transformers saves in a
4-bit checkpoint) stores a ``Linear4bit`` weight under ``<prefix>`` =
``<module>.weight`` as:

==========================================  =====================================
key                                         value
==========================================  =====================================
``<prefix>``                                uint8 ``(ceil(n/2), 1)`` packed codes
``<prefix>.absmax``                         ``(nb,)`` uint8 if nested else float32
``<prefix>.quant_map``                      ``(16,)`` float32 code table
``<prefix>.nested_absmax``                  ``(nb2,)`` float32 (nested only)
``<prefix>.nested_quant_map``               ``(256,)`` float32 dynamic map (nested)
``<prefix>.quant_state.bitsandbytes__nf4``  uint8 bytes of a UTF-8 JSON object:
                                            quant_type, blocksize, dtype, shape
                                            (+ nested_blocksize, nested_dtype,
                                            nested_offset); ``__fp4`` for fp4
==========================================  =====================================

``int4`` has no bitsandbytes form and is refused by ``to_bnb_state_dict``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from qlora_jax.quant.blockwise import num_blocks
from qlora_jax.quant.codebooks import code_table, dynamic_map
from qlora_jax.quant.qarray import QuantizedArray

_STATE_KEY = "quant_state.bitsandbytes__"
_BNB_TYPES = ("nf4", "fp4")


def to_bnb_state_dict(q: QuantizedArray, prefix: str = "weight") -> dict[str, np.ndarray]:
    """The flat dict of (writable) numpy arrays that bnb writes for ``q`` under ``prefix``."""
    if not isinstance(q, QuantizedArray):
        raise ValueError(f"to_bnb_state_dict expects a QuantizedArray, got {type(q).__name__}")
    if q.quant_type not in _BNB_TYPES:
        raise ValueError(f"quant_type={q.quant_type!r} has no bitsandbytes format (only {_BNB_TYPES})")
    meta = {"quant_type": q.quant_type, "blocksize": q.blocksize, "dtype": q.dtype, "shape": list(q.shape)}
    out = {
        prefix: np.array(q.codes).reshape(-1, 1),
        f"{prefix}.absmax": np.array(q.absmax),
        f"{prefix}.quant_map": np.array(code_table(q.quant_type)),
    }
    if q.double_quant:
        out[f"{prefix}.nested_absmax"] = np.array(q.nested_scale)
        out[f"{prefix}.nested_quant_map"] = np.array(dynamic_map(signed=True))
        meta.update(
            nested_blocksize=q.nested_blocksize,
            nested_dtype="float32",
            nested_offset=float(np.float32(q.offset)),
        )
    out[f"{prefix}.{_STATE_KEY}{q.quant_type}"] = np.frombuffer(json.dumps(meta).encode("utf-8"), np.uint8).copy()
    return out


def find_bnb_prefixes(state: Mapping[str, object]) -> list[str]:
    """Every ``<prefix>`` in ``state`` that carries a bnb 4-bit quant state."""
    prefixes = []
    for key in state:
        head, sep, tail = key.rpartition("." + _STATE_KEY)
        if sep and tail in _BNB_TYPES:
            prefixes.append(head)
    return sorted(prefixes)


def from_bnb_state_dict(state: Mapping[str, object], prefix: str | None = None) -> QuantizedArray:
    """Reads one bnb-serialized 4-bit weight (numpy or torch CPU tensors) without re-quantizing.

    ``prefix`` defaults to the only one present; with several, name it.
    """
    if prefix is None:
        found = find_bnb_prefixes(state)
        if len(found) != 1:
            raise ValueError(f"expected exactly one bnb 4-bit weight in the dict, found {found}: pass prefix=")
        prefix = found[0]
    state_keys = [f"{prefix}.{_STATE_KEY}{t}" for t in _BNB_TYPES if f"{prefix}.{_STATE_KEY}{t}" in state]
    if len(state_keys) != 1:
        raise ValueError(f"no bnb quant state for {prefix!r}: expected key {prefix}.{_STATE_KEY}nf4 or ...fp4")
    meta = json.loads(bytes(_numpy(state[state_keys[0]]).astype(np.uint8)).decode("utf-8"))
    quant_type, blocksize = meta["quant_type"], int(meta["blocksize"])
    if quant_type not in _BNB_TYPES:
        raise ValueError(f"{state_keys[0]}: unknown quant_type {quant_type!r}")
    shape = tuple(int(d) for d in meta["shape"])
    n = int(np.prod(shape))
    nb = num_blocks(n, blocksize)
    codes = _get(state, prefix, np.uint8).reshape(-1)
    absmax = _get(state, f"{prefix}.absmax")
    _expect(codes.shape[0] == (n + 1) // 2, f"{prefix}: {codes.shape[0]} code bytes, shape {shape} needs {(n + 1) // 2}")
    _expect(absmax.shape == (nb,), f"{prefix}.absmax has shape {absmax.shape}, blocksize {blocksize} needs ({nb},)")
    _check_table(state, f"{prefix}.quant_map", code_table(quant_type))
    nested_scale = offset = nested_blocksize = None
    if "nested_offset" in meta:
        nested_blocksize = int(meta["nested_blocksize"])
        _expect(absmax.dtype == np.uint8, f"{prefix}.absmax must be uint8 when nested, got {absmax.dtype}")
        nested_scale = _get(state, f"{prefix}.nested_absmax", np.float32)
        nb2 = num_blocks(nb, nested_blocksize)
        _expect(nested_scale.shape == (nb2,), f"{prefix}.nested_absmax has shape {nested_scale.shape}, needs ({nb2},)")
        _check_table(state, f"{prefix}.nested_quant_map", dynamic_map(signed=True))
        offset = jnp.asarray(np.float32(meta["nested_offset"]))
        nested_scale = jnp.asarray(nested_scale)
    else:
        absmax = absmax.astype(np.float32)
    return QuantizedArray(
        codes=jnp.asarray(codes),
        absmax=jnp.asarray(absmax),
        nested_scale=nested_scale,
        offset=offset,
        shape=shape,
        dtype=str(meta["dtype"]),
        blocksize=blocksize,
        quant_type=quant_type,
        nested_blocksize=nested_blocksize,
    )


def _numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; bf16 has no numpy view, but bnb never stores it
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _get(state: Mapping[str, object], key: str, dtype=None) -> np.ndarray:
    if key not in state:
        raise ValueError(f"bnb state dict is missing key {key!r}")
    arr = _numpy(state[key])
    if dtype is not None and arr.dtype != dtype:
        raise ValueError(f"{key} has dtype {arr.dtype}, expected {np.dtype(dtype)}")
    return arr


def _check_table(state: Mapping[str, object], key: str, expected: np.ndarray) -> None:
    table = _get(state, key, np.float32).reshape(-1)
    if table.shape != expected.shape or not np.array_equal(table.view(np.uint32), expected.view(np.uint32)):
        raise ValueError(f"{key} is not the standard bitsandbytes table; custom code maps are not supported")


def _expect(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
