"""Orbax checkpoints of a training run: LoRA params, optimizer state, step, RNG key and data position.

One ``CheckpointManager`` in ``<output>/checkpoints`` keeps the last ``keep``
steps. Each checkpoint is a composite of

* ``params``: the LoRA tree (``StandardSave``: arrays, bit for bit);
* ``opt_state``: the optimizer state, host-offloaded or not;
* ``meta``: JSON ``{"step", "data", "rng"}``: the next step to run, the data
  position (``streams.global_state``: every stream's, gathered from all processes), and
  the run's base key as integers.

With several processes (``distributed.py``) every process calls ``save`` and ``restore``
with its global arrays; Orbax writes each process's shards and process 0 finalizes, so the
folder must be shared by all hosts.

Orbax writes a checkpoint into a temporary folder and renames it once every
part is on disk; a run killed mid-save leaves an unfinalized folder that
``latest_step`` does not list (and the manager cleans up), so a half-written
checkpoint is never restored. Restoring takes a target tree: the arrays come
back with the target's shardings and memory kinds (a run saved on one device
restores onto a mesh of several, offloaded state back into host memory).
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

_UNROLLED_KEY = re.compile(r"\blayers_\d+\b")


class RunCheckpointer:
    """Saves and restores the state of a training run; see the module docstring."""

    def __init__(self, directory: str | os.PathLike, every: int, keep: int):
        if every < 0 or keep < 1:
            raise ValueError(f"checkpoint every={every} must be >= 0 and keep={keep} >= 1")
        self.every = every
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def due(self, step: int) -> bool:
        """True after ``step`` steps have run if a checkpoint falls there."""
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, params, opt_state, data_state: dict[str, Any], rng: jax.Array) -> None:
        """Starts writing the state *after* ``step`` steps (asynchronously; ``wait`` joins it)."""
        meta = {"step": int(step), "data": data_state, "rng": np.asarray(jax.random.key_data(rng)).tolist()}
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta),
        ))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, step: int, params_like, opt_state_like) -> tuple[Any, Any, dict[str, Any], jax.Array]:
        """``(params, opt_state, data_state, rng)`` of ``step``, placed like the ``*_like`` trees."""
        self._check_layout(step)
        target = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)  # noqa: E731
        out = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(target(params_like)),
            opt_state=ocp.args.StandardRestore(target(opt_state_like)),
            meta=ocp.args.JsonRestore(),
        ))
        meta = out["meta"]
        if meta["step"] != step:
            raise ValueError(f"checkpoint {step} in {self.directory} says it holds step {meta['step']}")
        rng = jax.random.wrap_key_data(np.asarray(meta["rng"], np.uint32))
        return out["params"], out["opt_state"], meta["data"], rng

    def _check_layout(self, step: int) -> None:
        """A clear error for a checkpoint of the unrolled layout (``layers_0/...``), before Orbax's own."""
        metadata = os.path.join(self.directory, str(step), "params", "_METADATA")
        if os.path.exists(metadata):
            with open(metadata, encoding="utf-8") as f:
                text = f.read()
            if _UNROLLED_KEY.search(text):
                raise ValueError(
                    f"checkpoint {step} in {self.directory} holds LoRA params in the unrolled layout (layers_0, "
                    "layers_1, ...) of qlora-jax before the layer scan; this version stacks layers along one axis "
                    "and cannot resume it. The checkpoint is left as it is: finish or export that run with the "
                    "version that wrote it (its PEFT export loads here), or start this run in a new output.dir")

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
