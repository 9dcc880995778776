"""The layer-stacked variable layout: every decoder-layer leaf has a leading ``(L, ...)`` axis.

``LlamaForCausalLM`` scans its layers, so ``variables[c]["layers"]`` holds one pytree
per variable whose array leaves are stacked over the layers (a ``QuantizedArray``'s
codes, scales and nested scales each get the axis; its static ``shape`` stays the
one layer's ``(out, in)``). These helpers move between that layout and one layer:

* ``layer_slice(tree, i)``: layer ``i``'s pytree (``x[i]`` of every leaf);
* ``StackedWriter``: fills stacked arrays one layer's tensor at a time, as the
  loaders stream a checkpoint, without ever holding a second copy of the stack;
* ``check_stacked(tree, where)``: the clear error for a tree in the old unrolled
  layout (``layers_0``, ``layers_1``, ...).
"""

from __future__ import annotations

import functools
import re
from typing import Any

import jax
import jax.numpy as jnp

LAYERS = "layers"
_UNROLLED = re.compile(r"^layers_\d+$")


def layer_slice(tree, i: int):
    """Layer ``i`` of a stacked pytree: ``x[i]`` of every array leaf (``QuantizedArray`` metadata kept)."""
    return jax.tree.map(lambda x: x[i], tree)


def num_stacked(tree) -> int:
    """The length of the leading layer axis shared by every leaf of ``tree``."""
    sizes = {x.shape[0] for x in jax.tree.leaves(tree)}
    if len(sizes) != 1:
        raise ValueError(f"stacked leaves disagree on the layer axis: lengths {sorted(sizes)}")
    return sizes.pop()


def stack_layers(trees: list):
    """The stacked pytree of per-layer pytrees of one structure (``jnp.stack`` of every leaf)."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


@functools.partial(jax.jit, donate_argnums=0)
def _write(stack, value, index):
    def put(s, v):
        v = v.astype(s.dtype).reshape((1,) * len(index) + v.shape)
        return jax.lax.dynamic_update_slice(s, v, (*index, *(0,) * (s.ndim - len(index))))

    return jax.tree.map(put, stack, value)


class StackedWriter:
    """Builds ``{path: stacked pytree}`` from ``(path, index, value)`` writes, in any order.

    ``index`` is the layer, or ``(layer, expert)`` for a leaf stacked over experts too
    (``sizes`` then gives the number of experts: ``(L, E)``). The first write of a path
    allocates its ``(L, ...)`` (or ``(L, E, ...)``) arrays (zeros, the value's dtypes) on the
    value's device; every write then updates one slot in place (the stack is donated), so
    the peak is the stack plus one slot's value.
    """

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self._stacks: dict[tuple[str, ...], Any] = {}
        self._filled: dict[tuple[str, ...], set[tuple[int, ...]]] = {}
        self._structure: dict[tuple[str, ...], Any] = {}
        self._sizes: dict[tuple[str, ...], tuple[int, ...]] = {}

    def write(self, path: tuple[str, ...], index: int | tuple[int, ...], value,
              sizes: tuple[int, ...] | None = None) -> None:
        index = (index,) if isinstance(index, int) else tuple(index)
        sizes = (self.num_layers,) if sizes is None else tuple(sizes)
        where = f"layer {index[0]}" + "".join(f", expert {i}" for i in index[1:]) + f" of {'/'.join(path)}"
        if len(index) != len(sizes) or not all(0 <= i < n for i, n in zip(index, sizes)):
            raise ValueError(f"{where} is outside the model's {' x '.join(map(str, sizes))} (layers, experts)")
        structure = jax.tree.structure(value)
        if path not in self._stacks:
            self._structure[path], self._sizes[path], self._filled[path] = structure, sizes, set()
            self._stacks[path] = jax.tree.map(lambda v: jnp.zeros((*sizes, *v.shape), v.dtype), value)
        elif structure != self._structure[path]:
            raise ValueError(f"{where} is stored as {structure}, earlier ones as {self._structure[path]}")
        elif index in self._filled[path]:
            raise ValueError(f"{where} was given twice")
        k = len(sizes)
        mismatched = [(s.shape[k:], v.shape) for s, v in zip(jax.tree.leaves(self._stacks[path]), jax.tree.leaves(value))
                      if s.shape[k:] != v.shape]
        if mismatched:
            raise ValueError(f"{where} has leaf shapes {mismatched[0][1]}, earlier ones {mismatched[0][0]}")
        self._stacks[path] = jax.block_until_ready(_write(self._stacks[path], value, index))
        self._filled[path].add(index)

    def missing(self) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
        """``(path, index)`` of every slot not yet written, for the paths seen."""
        import itertools

        return [(p, i) for p, done in self._filled.items()
                for i in itertools.product(*map(range, self._sizes[p])) if i not in done]

    def items(self):
        return self._stacks.items()


def check_stacked(tree, where: str) -> None:
    """Raises if ``tree`` (a variables or params dict) uses the unrolled ``layers_{i}`` layout."""
    if not isinstance(tree, dict):
        return
    for key, sub in tree.items():
        if isinstance(key, str) and _UNROLLED.match(key):
            raise ValueError(
                f"{where} uses the unrolled layout ('{key}', ...), written before qlora-jax stacked the decoder "
                f"layers along one axis ('{LAYERS}/...', leaves (L, ...)); it cannot be loaded into this model. "
                "Export its adapter with the qlora-jax version that wrote it (PEFT folders load in every version)")
        check_stacked(sub, where)
