"""Devices for training: a ``(data, fsdp)`` mesh, sharding rules, multi-host start-up.

* Batches ``(A, B, T)`` are split over ``data`` (and ``fsdp``: every device
  takes a share of the rows), ``P(None, ("data", "fsdp"))``.
* Parameters, the frozen base (the 4-bit codes and scales included) and the
  optimizer state are sharded over ``fsdp`` along their largest axis that
  ``fsdp`` divides, when they hold at least ``MIN_SHARDED`` elements; smaller
  leaves are replicated. The layer axis of the layer-stacked leaves (``layers/...``,
  ``(L, ...)``) is never sharded: the layer scan slices it, and a sharded layer axis
  would make every step of the scan fetch its slice from one device. Under jit XLA gathers a weight where a layer needs it
  (FSDP), so no device holds every layer's weights at once.
* Several processes (``distributed.py``): the mesh spans every process's devices, in
  ``jax.devices()`` order; ``process_rows`` says which rows of a batch this process's
  devices hold, and ``global_batch`` assembles the global batch from each process's rows.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qlora_jax.models.stacking import LAYERS

MIN_SHARDED = 2**14


def make_mesh(data: int, fsdp: int) -> Mesh:
    """A ``(data, fsdp)`` mesh over the first ``data * fsdp`` devices (see ``MeshSection.mesh_shape``)."""
    n = data * fsdp
    if data < 1 or fsdp < 1 or n > jax.device_count():
        raise ValueError(f"mesh (data={data}, fsdp={fsdp}) needs {n} devices, {jax.device_count()} exist")
    auto = (jax.sharding.AxisType.Auto,) * 2
    return jax.make_mesh((data, fsdp), ("data", "fsdp"), axis_types=auto, devices=jax.devices()[:n])


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """``(A, B, T)`` batches: rows over every device."""
    return NamedSharding(mesh, P(None, ("data", "fsdp")))


def process_rows(sharding: NamedSharding, batch_size: int) -> tuple[int, int]:
    """``[start, stop)``: the rows of a ``(A, batch_size, T)`` batch that this process's devices hold."""
    spans = {(idx[1].start or 0, batch_size if idx[1].stop is None else idx[1].stop)
             for idx in sharding.addressable_devices_indices_map((1, batch_size, 1)).values()}
    spans = sorted(spans)
    start, stop = spans[0]
    for a, b in spans[1:]:
        if a > stop:
            raise ValueError(f"this process's devices hold rows {spans} of the batch, not one block: the mesh must "
                             "list each process's devices together")
        stop = max(stop, b)
    return start, stop


def global_batch(sharding: NamedSharding, local: dict[str, np.ndarray], batch_size: int) -> dict[str, jax.Array]:
    """The ``(A, batch_size, T)`` arrays whose rows ``process_rows`` are ``local``'s ``(A, rows, T)`` arrays."""
    return {k: jax.make_array_from_process_local_data(sharding, v, (v.shape[0], batch_size, *v.shape[2:]))
            for k, v in local.items()}


def leaf_sharding(mesh: Mesh, shape: tuple[int, ...], stacked: bool = False) -> NamedSharding:
    """FSDP rule for one array: its largest axis divisible by ``fsdp`` when large, else replicated.

    ``stacked``: axis 0 is the layer axis, which is never sharded.
    """
    fsdp = mesh.shape["fsdp"]
    if fsdp == 1 or int(np.prod(shape)) < MIN_SHARDED:
        return NamedSharding(mesh, P())
    axes = sorted(range(1 if stacked else 0, len(shape)), key=lambda a: -shape[a])
    for a in axes:
        if shape[a] % fsdp == 0:
            spec = [None] * len(shape)
            spec[a] = "fsdp"
            return NamedSharding(mesh, P(*spec))
    return NamedSharding(mesh, P())


def shard_tree(mesh: Mesh, tree):
    """``tree``'s arrays placed by ``leaf_sharding`` (keeping each array's memory kind)."""
    def place(path, x):
        kind = getattr(getattr(x, "sharding", None), "memory_kind", None)
        sharding = leaf_sharding(mesh, x.shape, stacked=is_stacked_path(path))
        return jax.device_put(x, sharding.with_memory_kind(kind) if kind else sharding)

    return jax.tree_util.tree_map_with_path(place, tree)


def is_stacked_path(path) -> bool:
    """True for a leaf under ``layers`` (``qlora_jax.models.stacking.LAYERS``): its axis 0 is the layer axis."""
    return bool(path) and getattr(path[0], "key", None) == LAYERS
