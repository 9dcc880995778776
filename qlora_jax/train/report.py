"""What a run shows and leaves behind: progress line, metrics JSONL, loss-curve PNG, memory figures."""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time

import jax


def device_memory() -> str:
    """Device bytes in use / peak when the backend reports them (GPUs), else the process's peak RSS."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_in_use" in stats:
        peak = stats.get("peak_bytes_in_use", stats["bytes_in_use"])
        return f"dev {stats['bytes_in_use'] / 2**30:.2f}/{peak / 2**30:.2f} GiB"
    return f"rss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """One line per logged step: step/total, loss, tokens/s, ETA, memory (``\\r``-refreshed on a terminal)."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.total, self.start, self.enabled = total, start, enabled
        self.t0 = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        if not self.enabled:
            return
        done = step - self.start
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(done, 1) * (self.total - step)
        line = (f"step {step}/{self.total} | loss {loss:.4f} | {tokens_per_s:,.0f} tok/s | "
                f"ETA {_fmt_time(eta)} | {device_memory()}")
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            print(file=sys.stderr)


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


def plot_losses(metrics_path: str, png_path: str) -> None:
    """Training loss per step and eval loss at its steps, on one axis; written with matplotlib (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r and math.isfinite(r["loss"])]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)


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
