"""The trainer's data: fixed-shape batches, packing, the held-out split, a resumable shuffled iterator.

Records (three shapes) and their masking rule are in ``records.py``, the file formats read
in ``sources.py`` (JSON Lines, JSON arrays, Parquet, Arrow, ``datasets`` folders) and the record
formats mapped onto the shapes in ``formats.py`` (ShareGPT, Alpaca, renamed columns). A ``Batch``
holds five ``(B, T)`` arrays, the same shape every step so the train step compiles once:

- ``tokens`` int32: the input ids; ``pad_id`` where no example is.
- ``targets`` int32: ``targets[b, t] = tokens[b, t + 1]`` when both are in the same example,
  else ``pad_id`` (the last token of an example predicts nothing; targets never cross examples).
- ``loss_mask`` float32: 1 where ``targets[b, t]`` is a trainable token of that example, else 0.
- ``segment_ids`` int32: 1, 2, ... for the examples of a row, left to right; 0 for padding.
- ``positions`` int32: 0, 1, ... restarting at each example; 0 for padding.

Layout: examples are taken in order and truncated to ``T`` tokens (their first ``T``).
With packing, each goes whole into the first row of the batch with room for it (first
fit), else the batch is complete and the example opens the next one; an example is never
split across rows. Without packing, one example per row. A batch is therefore a function
of the position (epoch, cursor) in the shuffled order alone, which makes resume exact.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np

from qlora_jax.train.index import RecordIndex
from qlora_jax.train.records import Example

logger = logging.getLogger(__name__)


class Batch(NamedTuple):
    """``(B, T)`` arrays; see the module docstring for the rule of each."""

    tokens: np.ndarray  # int32
    targets: np.ndarray  # int32
    loss_mask: np.ndarray  # float32
    segment_ids: np.ndarray  # int32
    positions: np.ndarray  # int32


def _check_shape(batch_size: int, seq_len: int, pad_id: int) -> None:
    if batch_size < 1:
        raise ValueError(f"{batch_size=} must be >= 1")
    if seq_len < 2:
        raise ValueError(f"{seq_len=} must be >= 2")
    if pad_id < 0:
        raise ValueError(f"{pad_id=} must be >= 0")


class _Rows:
    """Where the next example goes: ``(row, start)``, or None when the batch is full for it."""

    def __init__(self, batch_size: int, seq_len: int, pack: bool):
        self.fill, self.seq_len, self.pack = [0] * batch_size, seq_len, pack

    def place(self, n: int) -> tuple[int, int] | None:
        n = min(n, self.seq_len)
        for row, used in enumerate(self.fill):
            if used + n <= self.seq_len and (self.pack or used == 0):
                self.fill[row] += n
                return row, used
        return None


def _assemble(placed: Sequence[tuple[Example, int, int]], batch_size: int, seq_len: int, pad_id: int) -> Batch:
    shape = (batch_size, seq_len)
    tokens, targets = np.full(shape, pad_id, np.int32), np.full(shape, pad_id, np.int32)
    loss_mask = np.zeros(shape, np.float32)
    segment_ids, positions = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    for ex, row, start in placed:
        ex = ex.truncate(seq_len)
        n, end = len(ex), start + len(ex)
        tokens[row, start:end] = ex.tokens
        targets[row, start:end - 1] = ex.tokens[1:]
        loss_mask[row, start:end - 1] = ex.trainable[1:]
        segment_ids[row, start:end] = segment_ids[row].max() + 1
        positions[row, start:end] = np.arange(n)
    return Batch(tokens, targets, loss_mask, segment_ids, positions)


def make_batch(examples: Sequence[Example], batch_size: int, seq_len: int, *, pack: bool = True,
               pad_id: int = 0) -> tuple[Batch, int]:
    """Lays out the longest prefix of ``examples`` that fits one batch; returns it and that prefix's length."""
    _check_shape(batch_size, seq_len, pad_id)
    rows, placed = _Rows(batch_size, seq_len, pack), []
    for ex in examples:
        spot = rows.place(len(ex))
        if spot is None:
            break
        placed.append((ex, *spot))
    return _assemble(placed, batch_size, seq_len, pad_id), len(placed)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, elementwise on uint64 (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def in_eval_split(positions: np.ndarray | int, eval_fraction: float, seed: int) -> np.ndarray:
    """Whether the record at ``positions`` is held out: ``hash(seed, position) < eval_fraction``.

    A position is a record's 0-based line in JSON Lines, its row in a table, its element in
    a JSON array (``RecordIndex.positions``). A record's membership depends on its position
    and the seed only, so it is stable across runs, independent of the file's length and of
    other records being fixed or broken.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"{eval_fraction=} must be in [0, 1)")
    key = np.atleast_1d(np.asarray(positions, np.int64)).astype(np.uint64)
    salt = _mix64(np.asarray([seed & 0xFFFFFFFFFFFFFFFF], np.uint64) + np.uint64(0x9E3779B97F4A7C15))
    unit = (_mix64(key ^ salt) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return unit < eval_fraction


class BatchIterator:
    """Endless (or ``num_epochs``) fixed-shape batches over records ``ids`` of ``records``.

    Epoch ``e`` visits ``ids`` in the order ``np.random.default_rng([seed, e]).permutation(ids)``
    (``[seed, e, stream]`` for one of several streams, ``streams.py``; ``ids`` as given when
    ``shuffle=False``); a batch may run on into the next epoch. With
    ``num_epochs``, iteration stops after that many epochs (the last batch may be partly
    padding). ``state()`` is ``{"epoch", "cursor", "num_records"}``: ``cursor`` is the position
    in epoch ``epoch``'s order of the next example; an iterator given it through ``restore``
    yields exactly the batches this one would have yielded next.
    """

    def __init__(self, records: RecordIndex, ids: np.ndarray, batch_size: int, seq_len: int, *, seed: int = 0,
                 pack: bool = True, pad_id: int = 0, shuffle: bool = True, num_epochs: int | None = None,
                 stream: int | None = None):
        _check_shape(batch_size, seq_len, pad_id)
        self.ids = np.asarray(ids, np.int64)
        if self.ids.ndim != 1 or not len(self.ids):
            raise ValueError(f"ids must be a non-empty 1-D array of record indices, got shape {self.ids.shape}")
        if self.ids.min() < 0 or self.ids.max() >= len(records):
            raise ValueError(f"ids must be in [0, {len(records)}), got [{self.ids.min()}, {self.ids.max()}]")
        if seed < 0:
            raise ValueError(f"{seed=} must be >= 0")
        if records.max_len is not None and seq_len > records.max_len:
            raise ValueError(f"{seq_len=} is longer than the {records.max_len} tokens the records were cut to (max_len)")
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"{num_epochs=} must be >= 1 or None")
        self.records, self.batch_size, self.seq_len = records, batch_size, seq_len
        self.seed, self.pack, self.pad_id, self.shuffle, self.num_epochs = seed, pack, pad_id, shuffle, num_epochs
        self.stream = stream
        self.epoch, self.cursor = 0, 0
        self._order_epoch, self._order = -1, self.ids

    def order(self, epoch: int) -> np.ndarray:
        """The record indices of epoch ``epoch``, in visiting order."""
        if epoch != self._order_epoch:
            rng = np.random.default_rng([self.seed, epoch] + ([] if self.stream is None else [self.stream]))
            self._order = rng.permutation(self.ids) if self.shuffle else self.ids
            self._order_epoch = epoch
        return self._order

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "num_records": len(self.ids)}

    def restore(self, state: dict) -> None:
        """Continues from ``state()`` of an iterator over the same records and settings."""
        epoch, cursor = int(state["epoch"]), int(state["cursor"])
        if "num_records" in state and int(state["num_records"]) != len(self.ids):
            raise ValueError(f"state is of {state['num_records']} records, this iterator has {len(self.ids)}")
        if epoch < 0 or not 0 <= cursor <= len(self.ids):
            raise ValueError(f"state {epoch=}, {cursor=} out of range (cursor in [0, {len(self.ids)}])")
        self.epoch, self.cursor = epoch, cursor

    def _finished(self, epoch: int) -> bool:
        return self.num_epochs is not None and epoch >= self.num_epochs

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Batch:
        epoch, cursor, n = self.epoch, self.cursor, len(self.ids)
        rows, placed = _Rows(self.batch_size, self.seq_len, self.pack), []
        while not self._finished(epoch):
            if cursor == n:
                epoch, cursor = epoch + 1, 0
                continue
            rid = int(self.order(epoch)[cursor])
            spot = rows.place(int(self.records.lengths[rid]))
            if spot is None:
                break
            placed.append((rid, *spot))
            cursor += 1
        if not placed:
            raise StopIteration
        self.epoch, self.cursor = epoch, cursor
        return _assemble([(self.records.example(rid), row, start) for rid, row, start in placed],
                         self.batch_size, self.seq_len, self.pad_id)

    def sequences_per_epoch(self, epoch: int = 0) -> int:
        """Rows holding at least one example when epoch ``epoch`` is laid out alone (from the lengths)."""
        rows, total = _Rows(self.batch_size, self.seq_len, self.pack), 0
        for rid in self.order(epoch):
            n = int(self.records.lengths[rid])
            if rows.place(n) is None:
                total += sum(f > 0 for f in rows.fill)
                rows = _Rows(self.batch_size, self.seq_len, self.pack)
                rows.place(n)
        return total + sum(f > 0 for f in rows.fill)


@dataclasses.dataclass
class TrainData:
    """Training records and held-out records (``train_ids`` of ``train``, ``eval_ids`` of ``eval``)."""

    train: RecordIndex
    train_ids: np.ndarray
    eval: RecordIndex
    eval_ids: np.ndarray
    seed: int = 0

    @property
    def num_train_records(self) -> int:
        return len(self.train_ids)

    @property
    def num_eval_records(self) -> int:
        return len(self.eval_ids)

    def num_train_tokens(self, seq_len: int | None = None) -> int:
        """Tokens of the training records (each cut to ``seq_len`` when given)."""
        lengths = self.train.lengths[self.train_ids].astype(np.int64)
        return int((lengths if seq_len is None else np.minimum(lengths, seq_len)).sum())

    def num_train_targets(self) -> int:
        """Loss targets in the training records (before truncation)."""
        return int(self.train.trainable[self.train_ids].sum())

    def iterator(self, batch_size: int, seq_len: int, *, pack: bool = True, pad_id: int = 0,
                 num_epochs: int | None = None) -> BatchIterator:
        """Shuffled training batches, seeded with ``seed``; see ``BatchIterator``."""
        return BatchIterator(self.train, self.train_ids, batch_size, seq_len, seed=self.seed, pack=pack,
                             pad_id=pad_id, num_epochs=num_epochs)

    def eval_batches(self, n: int, batch_size: int, seq_len: int, *, pack: bool = True,
                     pad_id: int = 0) -> list[Batch]:
        """The first ``n`` batches of the held-out records in file order (fewer if they run out): a fixed eval set."""
        if n < 1:
            raise ValueError(f"{n=} must be >= 1")
        if not len(self.eval_ids):
            raise ValueError("no held-out records: set eval_fraction > 0 or give an eval file")
        it = BatchIterator(self.eval, self.eval_ids, batch_size, seq_len, pack=pack, pad_id=pad_id,
                           shuffle=False, num_epochs=1)
        batches = [b for _, b in zip(range(n), it)]
        if len(batches) < n:
            logger.info("eval set: %d held-out records fill %d of %d batches", len(self.eval_ids), len(batches), n)
        return batches


def load_data(path: str | os.PathLike, tokenizer, *, eval_path: str | os.PathLike | None = None,
              eval_fraction: float = 0.0, seed: int = 0, add_bos: bool = False, max_len: int | None = None,
              max_train_records: int | None = None, columns: Mapping[str, str] | None = None,
              instruction_format: str = "auto", keep: Callable[[int], bool] | None = None) -> TrainData:
    """Indexes ``path`` (and ``eval_path``) and splits off the held-out records.

    Each is a data file or folder in any format of ``sources.py``, its records in any format
    of ``formats.py`` (``columns``: ``formats.parse_columns`` of renamed fields;
    ``instruction_format``: how Alpaca records render). Without ``eval_path``, records with
    ``in_eval_split(position, eval_fraction, seed)`` are
    held out; with it, all of ``path`` trains and all of ``eval_path`` evaluates
    (``eval_fraction`` is then not used). ``max_train_records`` (0 or None: all) stops indexing ``path``
    once that many training records are found (the held-out records are those met until then).
    ``max_len`` (the trainer passes its ``seq_len``) cuts every example to its first
    ``max_len`` tokens when indexing: counts then say what is trained on, long conversations
    cost less to encode, and records with nothing to train on within the cut are skipped.
    """
    in_eval_split(0, eval_fraction, seed)  # validates eval_fraction
    if seed < 0:
        raise ValueError(f"{seed=} must be >= 0")
    if max_train_records is not None and max_train_records < 0:
        raise ValueError(f"{max_train_records=} must be >= 0 (0 or None: all)")
    is_train = None if eval_path or not eval_fraction else (lambda pos: not in_eval_split(pos, eval_fraction, seed)[0])
    how = dict(add_bos=add_bos, max_len=max_len, columns=columns, instruction_format=instruction_format, keep=keep)
    train = RecordIndex(path, tokenizer, max_records=max_train_records or None, counts=is_train, **how)
    if eval_path:
        evals = RecordIndex(eval_path, tokenizer, **how)
        train_ids, eval_ids = np.arange(len(train)), np.arange(len(evals))
    else:
        held = in_eval_split(train.positions, eval_fraction, seed)
        evals, train_ids, eval_ids = train, np.flatnonzero(~held), np.flatnonzero(held)
        if not len(train_ids):
            raise ValueError(f"{eval_fraction=} held out all {len(train)} records of {train.path}")
        if eval_fraction and not len(eval_ids):
            raise ValueError(f"{eval_fraction=} held out none of the {len(train)} records of {train.path}")
    logger.info("data: %d train records (%d tokens), %d eval records", len(train_ids),
                int(train.lengths[train_ids].sum()), len(eval_ids))
    return TrainData(train, train_ids.astype(np.int64), evals, eval_ids.astype(np.int64), seed)
