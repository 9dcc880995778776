"""Reads a run's TensorBoard scalars back with tensorboard's own ``EventAccumulator`` and compares them with
``metrics.jsonl``; shared by the unit tests and the end-to-end trainer tests."""

from __future__ import annotations

import json
import os

import numpy as np

from qlora_jax.train.sinks import scalars


def read_tensorboard(directory: str) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` for every scalar in the event files under ``directory``, purges applied."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(directory, size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        assert len(steps) == len(set(steps)), f"{tag}: a step twice in {steps}"
        out[tag] = {e.step: e.value for e in events}
    return out


def expected_scalars(metrics_path: str) -> dict[str, dict[int, float]]:
    """``metrics.jsonl``'s rows as ``{tag: {step: value}}``, rounded to float32 as event files store them."""
    out: dict[str, dict[int, float]] = {}
    for line in open(metrics_path, encoding="utf-8"):
        row = json.loads(line)
        for tag, value in scalars(row).items():
            out.setdefault(tag, {})[row["step"]] = float(np.float32(value))
    return out


def assert_tensorboard_matches_metrics(out_dir: str) -> dict[str, dict[int, float]]:
    ours = read_tensorboard(os.path.join(out_dir, "tensorboard"))
    assert ours == expected_scalars(os.path.join(out_dir, "metrics.jsonl"))
    return ours
