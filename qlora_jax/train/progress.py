"""The trainer's progress display: a tqdm bar on a terminal, plain lines elsewhere.

``output.progress_bar`` is resolved here, in one place:

- ``auto``: the bar when stderr (where it draws) is a terminal, else ``lines``;
- ``always``: the bar even into a pipe or file (tqdm's ``\\r`` refreshes land there as is);
- ``never``: one plain line per logged step, ``step s/N | loss | tok/s | ETA | memory``,
  as CI logs and ``> file`` redirects read best.

Only process 0 shows anything (``jax.process_index() == 0``); ``output.progress false``
shows nothing. While the bar is up, the ``qlora_jax`` logger's console lines are printed
above it (tqdm's ``logging_redirect_tqdm``) instead of through it.

The bar's ETA is tqdm's: remaining steps over its smoothed step rate (an EMA of the
recent rates, so the first step's compilation fades out of it); the lines' ETA is the
mean time per step since the start times the steps left.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time

import jax

from qlora_jax.train.report import device_memory

PROGRESS_BARS = ("auto", "always", "never")


def resolve_progress(enabled: bool, bar: str, is_tty: bool, process_index: int) -> str:
    """``"bar"``, ``"lines"`` or ``"off"`` for ``output.progress`` / ``output.progress_bar`` on this process."""
    if bar not in PROGRESS_BARS:
        raise ValueError(f"output.progress_bar={bar!r} is not one of {PROGRESS_BARS}")
    if not enabled or process_index != 0:
        return "off"
    if bar == "always" or (bar == "auto" and is_tty):
        return "bar"
    return "lines"


def _terminal_size(stream) -> tuple[int, int]:
    """``(columns, lines)`` of the terminal behind ``stream``; zeros when it has none or reports none."""
    try:
        return tuple(os.get_terminal_size(stream.fileno()))
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return 0, 0


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """Shows steps ``start .. total`` by ``mode`` (``resolve_progress``); ``update`` at each logged step.

    ``close`` ends the bar and undoes the log redirection.
    """

    def __init__(self, total: int, start: int, mode: str, stream=None):
        if mode not in ("bar", "lines", "off"):
            raise ValueError(f"{mode=} must be bar, lines or off")
        self.total, self.start, self.mode = total, start, mode
        self.stream = stream if stream is not None else sys.stderr
        self.t0 = time.perf_counter()
        self.bar = None
        self._stack = contextlib.ExitStack()
        if mode == "bar":
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            # tqdm hides a bar below the terminal's last row: one that reports 0 rows (a bare pty) would show
            # nothing, so there the size is fixed (its width, or 100) instead of followed
            cols, rows = _terminal_size(self.stream)
            sized = cols > 0 and rows > 0
            self.bar = self._stack.enter_context(tqdm(total=total, initial=start, unit="step", file=self.stream,
                                                      dynamic_ncols=sized, ncols=None if sized else (cols or 100),
                                                      nrows=None if sized else 20))
            self._stack.enter_context(logging_redirect_tqdm([logging.getLogger("qlora_jax")], tqdm_class=tqdm))

    @classmethod
    def for_run(cls, total: int, start: int, enabled: bool, bar: str) -> "Progress":
        mode = resolve_progress(enabled, bar, sys.stderr.isatty(), jax.process_index())
        return cls(total, start, mode)

    def update(self, step: int, loss: float, tokens_per_s: float, extra: str = "") -> None:
        """Moves to ``step`` (the number of steps done) showing ``loss``, ``extra`` (e.g. "acc 0.75") and ``tokens_per_s``."""
        more = f" | {extra}" if extra else ""
        if self.mode == "bar":
            self.bar.set_postfix_str(f"loss {loss:.4f}{more} | {tokens_per_s:,.0f} tok/s | {device_memory()}",
                                     refresh=False)
            self.bar.update(step - self.bar.n)
        elif self.mode == "lines":
            done = step - self.start
            eta = (time.perf_counter() - self.t0) / max(done, 1) * (self.total - step)
            print(f"step {step}/{self.total} | loss {loss:.4f}{more} | {tokens_per_s:,.0f} tok/s | "
                  f"ETA {_fmt_time(eta)} | {device_memory()}", file=self.stream, flush=True)

    def close(self) -> None:
        self._stack.close()
