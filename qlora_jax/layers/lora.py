"""Splitting a variable tree into trainable and frozen parts, and counting them.

A model's variables are ``{"params": <LoRA A/B only>, "frozen": <base weights>, ...}``.
``split_trainable`` separates the two so an optimizer sees only ``params``;
``merge`` puts them back for ``model.apply``. Counts are in weights, not bytes:
a ``QuantizedArray`` counts ``prod(shape)`` weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from qlora_jax.quant import QuantizedArray

TRAINABLE = "params"


def split_trainable(variables: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """``(params, rest)``: the trainable ``"params"`` collection and every other collection."""
    if TRAINABLE not in variables:
        raise ValueError(f"variables have no {TRAINABLE!r} collection (found {sorted(variables)})")
    rest = {k: v for k, v in variables.items() if k != TRAINABLE}
    return variables[TRAINABLE], rest


def merge(params: Any, rest: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of ``split_trainable``."""
    if TRAINABLE in rest:
        raise ValueError(f"the frozen part already holds a {TRAINABLE!r} collection")
    return {TRAINABLE: params, **rest}


def count_weights(tree: Any) -> int:
    """Number of weights in a tree; a ``QuantizedArray`` counts its logical size."""
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, QuantizedArray))
    return sum(leaf.size for leaf in leaves)


def trainable_summary(variables: Mapping[str, Any]) -> dict[str, float]:
    """``{"trainable", "frozen", "total", "fraction"}`` weight counts of a variable tree."""
    params, rest = split_trainable(variables)
    trainable, frozen = count_weights(params), count_weights(rest)
    total = trainable + frozen
    return {"trainable": trainable, "frozen": frozen, "total": total, "fraction": trainable / total if total else 0.0}
