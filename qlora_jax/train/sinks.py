"""Where each metrics row goes besides ``metrics.jsonl``: TensorBoard event files, Weights & Biases.

A row is what the loop hands ``MetricsLog.write``: ``step`` plus numbers, e.g.
``{"step": 4, "loss": 2.1, "grad_norm": 0.8, "lr": 1e-3, "tokens_per_s": 950.0, ...}``
or ``{"step": 4, "eval_loss": 2.3, "eval_ppl": 9.97}``. Every other numeric field
(bools as 0/1) becomes the scalar ``scalar_tag(name)`` at ``step``: ``eval_<x>`` is
``eval/<x>``, anything else ``train/<x>``.

Only process 0 writes (``make_sinks``); the others get no sinks.
"""

from __future__ import annotations

import os
from typing import Any

import jax

from qlora_jax.train.tfevents import EventFileWriter


def scalar_tag(name: str) -> str:
    """``eval_loss`` -> ``eval/loss``, ``grad_norm`` -> ``train/grad_norm``."""
    return f"eval/{name.removeprefix('eval_')}" if name.startswith("eval_") else f"train/{name}"


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The row's numeric fields but ``step``, by ``scalar_tag``, as floats (``True`` -> 1.0)."""
    return {scalar_tag(k): float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))}


class TensorBoardLog:
    """Scalars into ``<directory>/events.out.tfevents.*`` (``tfevents.EventFileWriter``), one event per row, flushed.

    ``purge_step``: TensorBoard's own rewind. The writer first records a restart
    at that step, and readers (TensorBoard, ``EventAccumulator``) then drop the
    events at steps ``>= purge_step`` written before it, in any file of the folder.
    The loop passes ``start + 1`` on resume (steps after the checkpoint are written
    again, as ``metrics.jsonl`` keeps rows up to ``start``) and 0 on a fresh run (an
    earlier run's events in the folder are dropped, as its metrics rows are).
    """

    def __init__(self, directory: str, purge_step: int | None = None):
        self.writer = EventFileWriter(directory)
        if purge_step is not None:
            self.writer.restart(purge_step)

    def write(self, **row) -> None:
        values = scalars(row)
        if values:
            self.writer.scalars(int(row["step"]), values)

    def close(self) -> None:
        self.writer.close()


class WandbLog:
    """One Weights & Biases run: ``wandb.init(mode=...)`` at start, ``wandb.log(scalars, step=)`` per row.

    ``mode``: ``WANDB_MODE`` from the environment when set (``online``, ``offline``,
    ``disabled``), else ``offline``: the run is written under ``<dir>/wandb/`` with no
    network and no login, and ``wandb sync <dir>/wandb/offline-run-*`` uploads it later.
    wandb is imported here, only when ``output.wandb`` is on: it is no dependency of
    the package (``pip install 'qlora-jax[wandb]'``).
    """

    def __init__(self, directory: str, project: str, config: dict[str, Any], name: str | None = None):
        try:
            import wandb
        except ImportError as e:
            raise ImportError("output.wandb needs the wandb package: `pip install wandb` "
                              "(or `pip install 'qlora-jax[wandb]'`), or pass --output.wandb false") from e
        self.mode = os.environ.get("WANDB_MODE") or "offline"
        self.run = wandb.init(project=project, dir=directory, config=config, name=name, mode=self.mode)

    def write(self, **row) -> None:
        self.run.log(scalars(row), step=int(row["step"]))

    def close(self) -> None:
        self.run.finish()


class Fanout:
    """Hands each row to every sink in order (``MetricsLog`` first), and closes them all."""

    def __init__(self, *sinks):
        self.sinks = sinks

    def write(self, **row) -> None:
        for sink in self.sinks:
            sink.write(**row)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def make_sinks(output, out_dir: str, start: int, config: dict[str, Any]) -> list:
    """The sinks ``output`` (an ``OutputSection``) asks for, on process 0 only; ``start``: the first step run."""
    if jax.process_index() != 0:
        return []
    sinks: list = []
    if output.tensorboard:
        sinks.append(TensorBoardLog(os.path.join(out_dir, "tensorboard"), purge_step=start + 1 if start else 0))
    if output.wandb:
        sinks.append(WandbLog(out_dir, output.wandb_project, config, name=os.path.basename(out_dir)))
    return sinks
