"""The training loop as a ``Trainer`` with hooks: steps, metrics, the bad-step rule; all else hooks.

``TrainState`` is the run's state after ``step`` optimizer steps: ``(step, params, opt_state, key)``,
a pytree (checkpoints save it). ``Trainer.train(state)`` runs steps ``state.step .. total - 1``:

1. ``batch = next(batches)`` and ``params, opt_state, m = step_fn(params, opt_state, batch,
   fold_in(key, step))``: ``m`` maps names to scalars and has at least ``loss``, ``grad_norm``,
   ``tokens`` (the loss targets) and ``finite`` (False: the optimizer skipped the update).
2. Every ``log_every`` steps, the last and any non-finite one: a metrics row (``step``, every
   scalar of ``m``, ``lr``, ``tokens_per_s``, ``seconds``) and the progress line.
3. After ``max_bad_steps`` non-finite steps in a row: ``RuntimeError``.
4. Each hook whose ``due(done, total)`` holds.

A ``Hook`` runs ``fn(trainer, state)`` after every ``every`` steps (``every = 0``: never on a
count), after the last step when ``at_end``, and before the first step of a fresh run (step 0)
when ``at_start``. A run resumed at its last step runs no step: its ``at_end`` hooks run once at
once. Evaluation, samples, checkpoints and exports are hooks (``loop.py`` registers them); a user
adds one without editing the loop: ``run(config, hooks=[Hook("name", fn, every=100)])``, where
``fn(trainer, state)`` finds the model, the frozen base, the tokenizer, the config and the output
folder in ``trainer.context``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import numpy as np

log = logging.getLogger("qlora_jax.train")
PROGRESS_EXTRAS = (("rewards/accuracies", "acc"), ("rewards/margins", "margin"))  # a preference run's, shown


class TrainState(NamedTuple):
    """The run after ``step`` optimizer steps."""

    step: int
    params: Any
    opt_state: Any
    key: jax.Array  # the run's base key; step s uses fold_in(key, s)


@dataclasses.dataclass
class Hook:
    """``fn(trainer, state)`` after every ``every`` steps, after the last (``at_end``), before a fresh run's first."""

    name: str
    fn: Callable[[Trainer, TrainState], None]
    every: int = 0
    at_start: bool = False
    at_end: bool = True

    def due(self, done: int, total: int) -> bool:
        return (self.every > 0 and done % self.every == 0) or (self.at_end and done == total)


def _scalars(m) -> dict[str, float | bool | int]:
    items = m._asdict() if hasattr(m, "_asdict") else dict(m)
    row = {}
    for name, value in items.items():
        value = np.asarray(value)
        row[name] = bool(value) if value.dtype == bool else float(value)
    return row


class Trainer:
    """Runs ``step_fn`` over ``batches`` to ``total`` steps, reporting to ``metrics`` and ``progress``, with hooks."""

    def __init__(self, step_fn: Callable, batches: Iterator[dict], total: int, *, metrics, progress,
                 lr_at: Callable[[int], float], log_every: int = 1, max_bad_steps: int = 5, checkpoint_dir: str = "",
                 context: dict[str, Any] | None = None):
        self.step_fn, self.batches, self.total = step_fn, batches, total
        self.context = dict(context or {})  # what hooks may need: loop.py puts model, frozen, tokenizer, config, out
        self.metrics, self.progress, self.lr_at = metrics, progress, lr_at
        self.log_every, self.max_bad_steps, self.checkpoint_dir = log_every, max_bad_steps, checkpoint_dir
        self.hooks: list[Hook] = []
        self.tokens_seen, self.train_seconds = 0, 0.0

    def add_hook(self, name: str, fn: Callable[[Trainer, TrainState], None], every: int = 0, *,
                 at_start: bool = False, at_end: bool = True) -> Hook:
        hook = Hook(name, fn, every, at_start, at_end)
        self.hooks.append(hook)
        return hook

    def _run_hooks(self, state: TrainState, hooks) -> None:
        for hook in hooks:
            hook.fn(self, state)

    def train(self, state: TrainState) -> TrainState:
        """Steps from ``state.step`` to ``total``; returns the final state."""
        start, bad = state.step, 0
        if start == 0:
            self._run_hooks(state, [h for h in self.hooks if h.at_start])
        for step in range(start, self.total):
            batch = next(self.batches)
            t0 = time.perf_counter()
            params, opt_state, m = self.step_fn(state.params, state.opt_state, batch, jax.random.fold_in(state.key, step))
            row = _scalars(m)  # reading the scalars waits for the step
            dt = time.perf_counter() - t0
            state = TrainState(step + 1, params, opt_state, state.key)
            done, n_tokens = step + 1, int(np.prod(batch["tokens"].shape))
            if step > start:  # the first step compiles
                self.tokens_seen, self.train_seconds = self.tokens_seen + n_tokens, self.train_seconds + dt
            finite, loss = bool(row.pop("finite")), row.pop("loss")
            grad_norm, tokens = row.pop("grad_norm"), int(row.pop("tokens"))
            bad = 0 if finite else bad + 1
            if done % self.log_every == 0 or not finite or done == self.total:
                self.metrics.write(step=done, loss=loss, grad_norm=grad_norm, lr=float(self.lr_at(step)),
                                   target_tokens=tokens, tokens_per_s=n_tokens / dt, seconds=dt, finite=finite, **row)
                extra = " | ".join(f"{short} {row[name]:.3f}" for name, short in PROGRESS_EXTRAS if name in row)
                self.progress.update(done, loss, n_tokens / dt, extra)
            if not finite:
                log.warning("step %d: non-finite loss or gradient (loss=%s); update skipped (%d in a row)", done,
                            loss, bad)
                if bad >= self.max_bad_steps:
                    raise RuntimeError(f"stopped at step {done}: {bad} consecutive steps with a non-finite loss or "
                                       f"gradient (loop.max_bad_steps={self.max_bad_steps}); lower "
                                       f"optim.learning_rate or check the data; the last good checkpoint is in "
                                       f"{self.checkpoint_dir}")
            self._run_hooks(state, [h for h in self.hooks if h.due(done, self.total)])
        if start == self.total:
            self._run_hooks(state, [h for h in self.hooks if h.at_end])
        return state

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_seen / max(self.train_seconds, 1e-9)
