"""The trainer's preference data: a file's pairs, the held-out split, resumable fixed-shape pair batches.

``load_pairs`` reads every record of a data file (any format of ``sources.py``), encodes each
with ``preference_data.encode_preference_record`` (cut to ``max_len`` tokens) and keeps the pairs
in memory (preference sets are small next to pretraining text); bad records are skipped, counted
and named by line, row or element, and a file with none usable is an error naming the first.

``PairBatches`` yields ``preference_batch`` es of ``num_pairs`` pairs (``2 num_pairs`` rows),
epoch ``e`` in the order ``default_rng([seed, e]).permutation(ids)``, running on into the next
epoch; its position ``[epoch, cursor, num_records]`` is ``streams.py``'s one-stream data position,
so checkpoints save and restore it as they do for supervised batches.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np

from qlora_jax.train.data import in_eval_split
from qlora_jax.train.preference_data import PreferencePair, encode_preference_record, preference_batch
from qlora_jax.train.records import RecordError
from qlora_jax.train.sources import open_source

log = logging.getLogger(__name__)
MAX_REPORTED = 5


@dataclasses.dataclass
class PairSet:
    """The usable pairs of ``path`` and each one's position in it (line, row or element)."""

    path: str
    pairs: list[PreferencePair]
    positions: np.ndarray

    def __len__(self) -> int:
        return len(self.pairs)


def load_pairs(path: str | os.PathLike, tokenizer, *, max_len: int | None = None) -> PairSet:
    """Every usable ``{"prompt", "chosen", "rejected"}`` record of ``path`` (module docstring)."""
    path = os.fspath(path)
    source = open_source(path)
    pairs, positions, bad, num_bad = [], [], [], 0
    try:
        for position, key, value in source.scan():
            try:
                if isinstance(value, RecordError):
                    raise value
                pairs.append(encode_preference_record(value, tokenizer, max_len=max_len))
                positions.append(position)
            except RecordError as err:
                num_bad += 1
                if len(bad) < MAX_REPORTED:
                    bad.append(f"{source.where(position, key)}: {err}")
    finally:
        source.close()
    if num_bad:
        log.warning("%s: skipped %d bad preference record(s) of %d; %s", path, num_bad, num_bad + len(pairs),
                    "; ".join(bad))
    if not pairs:
        raise ValueError(f"no usable preference records in {path}: "
                         + (f"{num_bad} bad record(s); {'; '.join(bad)}" if num_bad else "it is empty"))
    log.info("%s: %d preference pairs", path, len(pairs))
    return PairSet(path, pairs, np.asarray(positions, np.int64))


def split_pairs(pairs: PairSet, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train_ids, eval_ids)``: the pairs held out by ``data.in_eval_split`` of their positions, and the rest."""
    held = in_eval_split(pairs.positions, eval_fraction, seed)
    train_ids, eval_ids = np.flatnonzero(~held), np.flatnonzero(held)
    if not len(train_ids):
        raise ValueError(f"{eval_fraction=} held out all {len(pairs)} preference pairs of {pairs.path}")
    if eval_fraction and not len(eval_ids):
        raise ValueError(f"{eval_fraction=} held out none of the {len(pairs)} preference pairs of {pairs.path}")
    return train_ids, eval_ids


class PairBatches:
    """Endless batches of ``num_pairs`` pairs of ``pairs.pairs[ids]``, shuffled per epoch (module docstring)."""

    def __init__(self, pairs: PairSet, ids: np.ndarray, num_pairs: int, seq_len: int, *, seed: int = 0,
                 pad_id: int = 0, shuffle: bool = True):
        self.pairs, self.ids = pairs, np.asarray(ids, np.int64)
        if not len(self.ids):
            raise ValueError(f"no preference pairs to batch from {pairs.path}")
        self.num_pairs, self.seq_len, self.seed, self.pad_id, self.shuffle = num_pairs, seq_len, seed, pad_id, shuffle
        self.epoch, self.cursor = 0, 0
        self._order_epoch, self._order = -1, self.ids

    def order(self, epoch: int) -> np.ndarray:
        """The pair indices of epoch ``epoch``, in visiting order (computed once per epoch)."""
        if epoch != self._order_epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.ids) if self.shuffle else self.ids
            self._order_epoch = epoch
        return self._order

    def __iter__(self) -> PairBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        chosen = []
        while len(chosen) < self.num_pairs:
            if self.cursor == len(self.ids):
                self.epoch, self.cursor = self.epoch + 1, 0
            chosen.append(self.pairs.pairs[int(self.order(self.epoch)[self.cursor])])
            self.cursor += 1
        return preference_batch(chosen, self.num_pairs, self.seq_len, pad_id=self.pad_id)

    def local_state(self) -> np.ndarray:
        """``(1, 3)``: ``[[epoch, cursor, num_records]]``, the one-stream position of ``streams.global_state``."""
        return np.asarray([[self.epoch, self.cursor, len(self.ids)]], np.int64)

    def restore(self, state: dict) -> None:
        """Continues from ``streams.global_state(local_state())`` of the same pairs."""
        streams = state.get("streams")
        if not streams or len(streams) != 1:
            raise ValueError(f"the checkpoint's data position {state!r} is not one of preference pairs")
        epoch, cursor, num = (int(v) for v in streams[0])
        if num != len(self.ids) or not 0 <= cursor <= num or epoch < 0:
            raise ValueError(f"the checkpoint's data position (epoch {epoch}, cursor {cursor} of {num} pairs) does "
                             f"not fit the {len(self.ids)} training pairs of {self.pairs.path}")
        self.epoch, self.cursor = epoch, cursor


def eval_pair_batches(pairs: PairSet, ids: np.ndarray, n: int, num_pairs: int, seq_len: int,
                      pad_id: int = 0) -> list[dict[str, np.ndarray]]:
    """The held-out pairs in file order, ``num_pairs`` per batch, at most ``n`` batches (the last may be part padding)."""
    chunks = [ids[i:i + num_pairs] for i in range(0, len(ids), num_pairs)][:n]
    return [preference_batch([pairs.pairs[int(i)] for i in chunk], num_pairs, seq_len, pad_id=pad_id)
            for chunk in chunks]
