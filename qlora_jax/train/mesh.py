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
* ``initialize_distributed()`` calls ``jax.distributed.initialize()`` when the
  usual multi-host variables are set (``JAX_COORDINATOR_ADDRESS``, or a
  cluster JAX detects itself: SLURM, Open MPI), and does nothing on one host.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qlora_jax.models.stacking import LAYERS

MIN_SHARDED = 2**14
_MULTI_HOST_VARS = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")
log = logging.getLogger(__name__)


def initialize_distributed() -> bool:
    """``jax.distributed.initialize()`` if a multi-host environment is set; True when it ran."""
    if not any(v in os.environ for v in _MULTI_HOST_VARS):
        return False
    jax.distributed.initialize()
    log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
    return True


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
