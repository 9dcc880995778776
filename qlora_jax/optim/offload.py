"""Optimizer state in host memory: the JAX analogue of bitsandbytes' paged optimizers.

JAX has no CUDA unified memory to page through. Instead ``offload_to_host(tx)``
keeps every array of ``tx``'s state in host memory (memory kind
``pinned_host``) between steps. Inside the jitted train step the update

    state_dev  = device_put(state_host, device)      # host -> device
    u, state'  = tx.update(grads, state_dev, params)
    state_host = device_put(state', pinned_host)      # device -> host

so the device holds the state only while it is being updated. With
``group_by`` the state is split into groups that are brought over, updated and
sent back one after another; ``split_layers=True`` also cuts every leaf under
``layers`` (the models' layer-stacked leaves, ``(L, ...)``) into its ``L`` layer
slices, so ``group_by=top_level_group, split_layers=True`` gives one group per
decoder layer (each group's state holds that layer's ``(...)`` slices), so a group's state is the most the *update* needs on
the device at once; whether XLA overlaps a group's transfer with the previous
group's arithmetic is its scheduler's choice.

Use it inside ``jax.jit`` with explicit shardings for the state when donating
(``host_shardings(state)`` gives them): donating host buffers without explicit
``in_shardings`` aborts the process (SIGABRT, on jaxlib 0.10.2's CPU). Transforms whose
update couples leaves (``clip_by_global_norm``) must stay outside a grouped
wrapper: each group sees only its own leaves.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Hashable, NamedTuple

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec

MEMORY_KINDS = ("pinned_host", "device")


class OffloadState(NamedTuple):
    """One inner optax state per group (a tuple; one entry when ungrouped), living in host memory."""

    groups: tuple


STACKED = "layers"  # the top-level key of layer-stacked leaves (qlora_jax.models.stacking.LAYERS)


def top_level_group(path: tuple) -> Hashable:
    """Groups parameters by their first key (``layers``, ...); with ``split_layers``, one group per layer."""
    return _key_name(path[0]) if path else ""


def _is_stacked(path: tuple) -> bool:
    return bool(path) and _key_name(path[0]) == STACKED


def _key_name(key) -> Hashable:
    return getattr(key, "key", getattr(key, "name", getattr(key, "idx", str(key))))


def available_memory_kinds() -> tuple[str, ...]:
    return tuple(m.kind for m in jax.devices()[0].addressable_memories())


def resolve_memory_kind(memory_kind: str) -> str:
    """``memory_kind`` if this platform has it; ``"device"`` (no offload) with a warning if not."""
    if memory_kind not in MEMORY_KINDS:
        raise ValueError(f"memory_kind={memory_kind!r} is not one of {MEMORY_KINDS}")
    if memory_kind != "device" and memory_kind not in available_memory_kinds():
        warnings.warn(
            f"this platform ({jax.default_backend()}) has no {memory_kind!r} memory "
            f"(it has {available_memory_kinds()}); optimizer state stays in device memory",
            stacklevel=3,
        )
        return "device"
    return memory_kind


def to_memory(tree, memory_kind: str):
    """``tree``'s arrays moved to ``memory_kind`` (keeps their sharding); works eagerly and under jit."""
    space = jax.memory.Space.Device if memory_kind == "device" else jax.memory.Space.Host
    return jax.tree.map(lambda x: jax.device_put(x, space), tree)


def place_like(state, params, memory_kind: str):
    """``state`` moved to ``memory_kind``, each leaf sharded like the parameter of its shape.

    A leaf with the shape of a parameter (Adam's moments) takes that parameter's
    sharding; any other leaf (step counts, 8-bit codes) is replicated over the
    parameters' mesh. Under jit (tracers) it only moves memory kinds.
    """
    shardings = [p.sharding for p in jax.tree.leaves(params) if isinstance(p, jax.Array) and not isinstance(p, jax.core.Tracer)]
    if not shardings:
        return to_memory(state, memory_kind)
    by_shape = {}
    for path, p in jax.tree_util.tree_flatten_with_path(params)[0]:
        by_shape.setdefault(p.shape, p.sharding)
        if _is_stacked(path) and isinstance(p.sharding, NamedSharding):  # a layer's slice (split_layers groups)
            spec = tuple(p.sharding.spec) + (None,) * (p.ndim - len(p.sharding.spec))
            by_shape.setdefault(p.shape[1:], NamedSharding(p.sharding.mesh, PartitionSpec(*spec[1:])))
    first = shardings[0]
    replicated = NamedSharding(first.mesh, PartitionSpec()) if isinstance(first, NamedSharding) else first
    kind = "device" if memory_kind == "device" else memory_kind

    def place(leaf):
        return jax.device_put(leaf, by_shape.get(leaf.shape, replicated).with_memory_kind(kind))

    return jax.tree.map(place, state)


def host_shardings(state):
    """The shardings of a (concrete) state: pass them as ``in_shardings`` / ``out_shardings`` of the train step."""
    return jax.tree.map(lambda x: x.sharding, state)


def _check_arrays(state) -> None:
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        if not isinstance(leaf, jax.Array):
            raise ValueError(
                f"offload_to_host: the wrapped transform's state must be a pytree of jax arrays, "
                f"but {jax.tree_util.keystr(path)} is {type(leaf).__name__}"
            )


def _partition(tree, group_by, split_layers: bool):
    """``(keys, piece_lists)``: per group, its pieces ``(leaf index, layer or None)`` of ``tree``, groups in first-seen order.

    A piece with a layer is slice ``layer`` of a stacked leaf (``split_layers``); groups of
    slices are keyed ``(group key, layer)``.
    """
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    groups: dict[Hashable, list[tuple[int, int | None]]] = {}
    for i, (path, leaf) in enumerate(leaves):
        key = group_by(path) if group_by else None
        if split_layers and _is_stacked(path):
            for layer in range(leaf.shape[0]):
                groups.setdefault((key, layer), []).append((i, layer))
        else:
            groups.setdefault(key, []).append((i, None))
    return list(groups), list(groups.values())


def _pick(tree, pieces):
    leaves = jax.tree.leaves(tree)
    return [leaves[i] if layer is None else leaves[i][layer] for i, layer in pieces]


def _assemble(structure, pieces_values, num_leaves: int):
    """The tree of ``structure`` from ``[(leaf index, layer or None, value)]``; layer slices are stacked in order."""
    whole: list[Any] = [None] * num_leaves
    slices: dict[int, dict[int, Any]] = {}
    for i, layer, value in pieces_values:
        if layer is None:
            whole[i] = value
        else:
            slices.setdefault(i, {})[layer] = value
    for i, by_layer in slices.items():
        whole[i] = jax.numpy.stack([by_layer[layer] for layer in sorted(by_layer)])
    return jax.tree.unflatten(structure, whole)


def offload_to_host(
    tx: optax.GradientTransformation,
    memory_kind: str = "pinned_host",
    group_by: Callable[[tuple], Hashable] | None = None,
    split_layers: bool = False,
) -> optax.GradientTransformation:
    """Wraps ``tx`` so that its state lives in ``memory_kind`` memory between steps (module docstring).

    ``group_by(path) -> key`` splits the parameters into groups updated one after
    another; None keeps one group. ``split_layers`` cuts the stacked leaves under
    ``layers`` into per-layer slices first (with ``top_level_group``: one group per layer).
    ``memory_kind="device"`` turns offloading off (same code path, for comparisons).
    """
    if not (hasattr(tx, "init") and hasattr(tx, "update")):
        raise ValueError(f"offload_to_host expects an optax GradientTransformation, got {type(tx).__name__}")
    kind = resolve_memory_kind(memory_kind)

    def init_fn(params):
        _, piece_lists = _partition(params, group_by, split_layers)
        states = tuple(tx.init(_pick(params, pieces)) for pieces in piece_lists)
        _check_arrays(states)
        return OffloadState(groups=place_like(states, params, kind))

    def update_fn(updates, state, params=None):
        _, piece_lists = _partition(updates, group_by, split_layers)
        if len(piece_lists) != len(state.groups):
            raise ValueError(f"the state has {len(state.groups)} groups but the updates make {len(piece_lists)}")
        new_pieces = []
        new_states = []
        for pieces, group_state in zip(piece_lists, state.groups):
            group_params = None if params is None else _pick(params, pieces)
            group_updates, group_state = tx.update(_pick(updates, pieces), to_memory(group_state, "device"), group_params)
            new_pieces += [(i, layer, u) for (i, layer), u in zip(pieces, group_updates)]
            new_states.append(to_memory(group_state, kind))
        new_updates = _assemble(jax.tree.structure(updates), new_pieces, len(jax.tree.leaves(updates)))
        return new_updates, OffloadState(groups=tuple(new_states))

    return optax.GradientTransformation(init_fn, update_fn)
