"""Global batches as ``S`` independent packing streams, so that each process builds only its own rows.

A global batch of ``B`` rows (``(B, T)`` arrays, see ``data.py``) is split into ``S`` streams of
``R = B / S`` consecutive rows: stream ``s`` owns rows ``[s R, (s + 1) R)``. The record at
position ``p`` of the data file (its line, row or element) belongs to stream ``p mod S``. Each
stream is a ``BatchIterator`` over its own records, shuffled per epoch by
``default_rng([seed, epoch, s])`` and packed into its ``R`` rows. A process that holds rows
``[a, b)`` of the global batch indexes, tokenizes and packs only the records of streams
``a / R .. b / R - 1``; nothing depends on the number of processes, so ``S`` fixed gives the
same global batches on one process or several. With ``S = 1`` the one stream is exactly the
single-stream layout of ``data.py`` (order ``default_rng([seed, epoch])``), so single-process
runs are unchanged.

The data position is global: ``{"streams": [[epoch, cursor, num_records], ...]}``, one entry
per stream in stream order, gathered from every process before a checkpoint. A run resumes
from it on any number of processes that divides ``S``.

Evaluation: stream ``s`` takes the held-out records of its positions in file order; with
``S > 1`` every stream yields exactly ``n`` batches (rows of padding once its records run out),
so that every process builds the same number of batches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from qlora_jax.train.data import Batch, BatchIterator, TrainData, make_batch


@dataclasses.dataclass(frozen=True)
class StreamLayout:
    """``num_streams`` streams of ``rows_per_stream`` rows; this process builds ``local`` (consecutive)."""

    num_streams: int
    rows_per_stream: int
    local: tuple[int, ...]

    @classmethod
    def for_rows(cls, num_streams: int, batch_size: int, rows: tuple[int, int]) -> StreamLayout:
        """The layout of a process that holds rows ``[start, stop)`` of a ``batch_size``-row global batch."""
        if num_streams < 1 or batch_size % num_streams:
            raise ValueError(f"data.streams={num_streams} must divide loop.batch_size={batch_size}")
        per = batch_size // num_streams
        start, stop = rows
        if start % per or stop % per or not 0 <= start < stop <= batch_size:
            raise ValueError(f"this process holds rows [{start}, {stop}) of the {batch_size}-row batch, which are not "
                             f"whole streams of {per} rows (data.streams={num_streams}): make data.streams a multiple "
                             "of the number of processes")
        return cls(num_streams, per, tuple(range(start // per, stop // per)))

    def keeps(self, position: int) -> bool:
        """Whether the record at ``position`` belongs to one of this process's streams."""
        return position % self.num_streams in self.local

    def stream_ids(self, index_positions: np.ndarray, ids: np.ndarray, stream: int) -> np.ndarray:
        """The records of ``ids`` whose positions fall in ``stream``."""
        return ids[index_positions[ids] % self.num_streams == stream]

    def batch_rows(self) -> int:
        """Rows of the global batch built here."""
        return self.rows_per_stream * len(self.local)


def _concat(batches: Sequence[Batch]) -> Batch:
    return Batch(*(np.concatenate(parts, axis=0) for parts in zip(*batches)))


class StreamedBatches:
    """This process's rows of each global batch: its streams' ``BatchIterator`` batches, stacked in stream order."""

    def __init__(self, data: TrainData, layout: StreamLayout, seq_len: int, *, pack: bool = True, pad_id: int = 0):
        self.layout = layout
        stream = None if layout.num_streams == 1 else 0
        self.iterators = {}
        for s in layout.local:
            ids = layout.stream_ids(data.train.positions, data.train_ids, s)
            if not len(ids):
                raise ValueError(f"data stream {s} of {layout.num_streams} has no training records (positions p with "
                                 f"p mod {layout.num_streams} = {s}): use fewer data.streams")
            self.iterators[s] = BatchIterator(data.train, ids, layout.rows_per_stream, seq_len, seed=data.seed,
                                              pack=pack, pad_id=pad_id, stream=None if stream is None else s)

    def __iter__(self) -> StreamedBatches:
        return self

    def __next__(self) -> Batch:
        return _concat([next(it) for it in self.iterators.values()])

    def local_state(self) -> np.ndarray:
        """``(local streams, 3)`` int: ``[epoch, cursor, num_records]`` of each stream built here."""
        return np.asarray([[s["epoch"], s["cursor"], s["num_records"]] for s in
                           (it.state() for it in self.iterators.values())], np.int64)

    def restore(self, state: dict) -> None:
        """Continues from a global state (``global_state``), or a single-stream ``BatchIterator.state()``."""
        if "streams" not in state:
            state = {"streams": [[state["epoch"], state["cursor"], state.get("num_records", -1)]]}
        streams = state["streams"]
        if len(streams) != self.layout.num_streams:
            raise ValueError(f"the checkpoint's data position is of {len(streams)} data stream(s), this run packs "
                             f"{self.layout.num_streams}: resume with --data.streams {len(streams)}")
        for s, it in self.iterators.items():
            epoch, cursor, num = (int(v) for v in streams[s])
            it.restore({"epoch": epoch, "cursor": cursor} | ({"num_records": num} if num >= 0 else {}))

    def sequences_per_epoch(self) -> int:
        """Rows holding an example in one epoch of this process's streams (sum over processes for the run's)."""
        return sum(it.sequences_per_epoch() for it in self.iterators.values())


def global_state(gathered: np.ndarray) -> dict:
    """The JSON data position from ``allgather_ints(local_state())``: ``(P, k, 3)`` in process = stream order."""
    return {"streams": np.asarray(gathered).reshape(-1, 3).astype(int).tolist()}


def eval_batches(data: TrainData, layout: StreamLayout, n: int, seq_len: int, *, pack: bool = True,
                 pad_id: int = 0) -> list[Batch]:
    """This process's rows of the first ``n`` held-out batches (see the module docstring)."""
    if layout.num_streams == 1:
        return data.eval_batches(n, layout.rows_per_stream, seq_len, pack=pack, pad_id=pad_id)
    if n < 1:
        raise ValueError(f"{n=} must be >= 1")
    empty, _ = make_batch([], layout.rows_per_stream, seq_len, pad_id=pad_id)  # all padding
    per_stream = []
    for s in layout.local:
        ids = layout.stream_ids(data.eval.positions, data.eval_ids, s)
        got = [] if not len(ids) else list(
            b for _, b in zip(range(n), BatchIterator(data.eval, ids, layout.rows_per_stream, seq_len, pack=pack,
                                                      pad_id=pad_id, shuffle=False, num_epochs=1)))
        per_stream.append(got + [empty] * (n - len(got)))
    return [_concat(parts) for parts in zip(*per_stream)]
