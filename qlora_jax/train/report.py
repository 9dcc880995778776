"""What a run leaves behind: the metrics JSONL, memory figures, benchmark tables.

The progress bar is in ``progress``, the loss-curve PNG in ``plot``, TensorBoard and
Weights & Biases in ``sinks``.
"""

from __future__ import annotations

import json
import os
import resource

import jax


def device_memory() -> str:
    """Device bytes in use / peak when the backend reports them (GPUs), else the process's peak RSS."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_in_use" in stats:
        peak = stats.get("peak_bytes_in_use", stats["bytes_in_use"])
        return f"dev {stats['bytes_in_use'] / 2**30:.2f}/{peak / 2**30:.2f} GiB"
    return f"rss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"


class MetricsLog:
    """Appends one JSON object per line to ``path`` (flushed, so a killed run keeps what it wrote)."""

    def __init__(self, path: str, truncate_after_step: int | None = None):
        self.path = path
        if truncate_after_step is not None and os.path.exists(path):  # a resumed run rewrites what follows its checkpoint
            kept = [line for line in open(path, encoding="utf-8") if json.loads(line).get("step", 0) <= truncate_after_step]
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(kept)
        self.file = open(path, "a", encoding="utf-8")

    def write(self, **record) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def read_metrics(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def publish_table(header: str, text: str, payload: dict, json_path: str | None = None,
                  markdown_path: str | None = None) -> None:
    """A benchmark's ending: ``payload`` to ``json_path``, header + table to ``markdown_path``, both printed."""
    if json_path:
        with open(json_path, "w") as f:
            json.dump(payload, f, indent=1)
    if markdown_path:
        with open(markdown_path, "w") as f:
            f.write(header + "\n\n" + text + "\n")
    print(header)
    print(text)
