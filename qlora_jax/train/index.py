"""``RecordIndex``: the usable records of a data file, indexed in one streaming pass, read back by key.

The file is read through ``sources.open_source`` (JSON Lines, JSON array, Parquet, Arrow IPC,
a ``datasets`` save_to_disk folder), each record mapped onto a shape by
``formats.canonical`` (ShareGPT, Alpaca, renamed columns) and tokenized and masked by
``records.encode_record``. Only per-record numbers are kept, never the records.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping

import numpy as np

from qlora_jax.train.formats import canonical, source_columns
from qlora_jax.train.records import Example, RecordError, encode_record
from qlora_jax.train.sources import open_source

logger = logging.getLogger(__name__)

MAX_REPORTED = 5  # bad records named in logs and errors


class RecordIndex:
    """Usable records of a data file or folder, indexed in one streaming pass and read back by key.

    Attributes (N usable records): ``positions (N,) int64`` each record's place in its source
    (0-based line of JSON Lines, element of a JSON array, row of a table: what the held-out
    split hashes), ``keys (N,) int64`` where the source reads it back (byte offset, or row),
    ``lengths (N,) int32`` its token count, ``trainable (N,) int32`` how many of those are loss
    targets (token 0 never is); ``num_bad`` and ``bad`` (the first ``MAX_REPORTED`` bad records
    as ``(where, reason)``, ``where`` as "line 12", "row 11" or "element 11 (line 40)").

    ``columns`` (``formats.parse_columns``) and ``instruction_format`` map the file's records
    onto the shapes (``formats.canonical``). Indexing tokenizes every record once (to count
    tokens and catch records that do not render), cut to ``max_len`` tokens when given (see
    ``encode_record``). With ``max_records`` it stops after that many usable records for which
    ``counts(position)`` is true (all, without ``counts``). Records whose ``keep(position)`` is
false are skipped without a word (another process indexes them). Bad records (invalid JSON, none of
    the formats, empty content, wrong types) are skipped, counted and logged. Raises
    ``ValueError`` naming the file and its first bad records when no usable record is found,
    and when the file cannot be read.
    """

    def __init__(self, path: str | os.PathLike, tokenizer, *, add_bos: bool = False, max_len: int | None = None,
                 max_records: int | None = None, counts: Callable[[int], bool] | None = None,
                 columns: Mapping[str, str] | None = None, instruction_format: str = "auto",
                 keep: Callable[[int], bool] | None = None):
        if max_len is not None and max_len < 2:
            raise ValueError(f"{max_len=} must be >= 2 or None")
        self.path, self.tokenizer, self.add_bos, self.max_len = os.fspath(path), tokenizer, add_bos, max_len
        self.columns, self.instruction_format = dict(columns or {}), instruction_format
        self.source = open_source(self.path, source_columns(self.columns))
        positions, keys, lengths, trainable, self.bad, self.num_bad = [], [], [], [], [], 0
        counted = 0
        for position, key, value in self.source.scan():
            if keep is not None and not keep(position):
                continue
            try:
                if isinstance(value, RecordError):
                    raise value
                ex = self._encode(value)
            except RecordError as err:
                self.num_bad += 1
                if len(self.bad) < MAX_REPORTED:
                    self.bad.append((self.source.where(position, key), str(err)))
                continue
            positions.append(position), keys.append(key)
            lengths.append(len(ex)), trainable.append(int(ex.trainable[1:].sum()))
            counted += counts is None or counts(position)
            if max_records is not None and counted >= max_records:
                break
        self.positions = np.asarray(positions, np.int64)
        self.keys = np.asarray(keys, np.int64)
        self.lengths = np.asarray(lengths, np.int32)
        self.trainable = np.asarray(trainable, np.int32)
        self._lock = threading.Lock()
        kind = self.source.kind
        if self.num_bad:
            logger.warning("%s (%s): skipped %d bad record(s) of %d; %s", self.path, kind, self.num_bad,
                           self.num_bad + len(self), self.bad_summary())
        if not len(self):
            raise ValueError(f"no usable records in {self.path} ({kind}): "
                             + (f"{self.num_bad} bad record(s); {self.bad_summary()}" if self.num_bad else "it is empty"))
        logger.info("%s (%s): %d records, %d tokens", self.path, kind, len(self), int(self.lengths.sum()))

    def _encode(self, record) -> Example:
        record = canonical(record, self.columns, self.instruction_format, chat=bool(self.tokenizer.chat_template))
        return encode_record(record, self.tokenizer, add_bos=self.add_bos, max_len=self.max_len)

    def bad_summary(self) -> str:
        return "; ".join(f"{where}: {reason}" for where, reason in self.bad)

    def __len__(self) -> int:
        return len(self.keys)

    def where(self, i: int) -> str:
        """Where usable record ``i`` is, for messages: "line 12", "row 11", "element 11 (line 40)"."""
        return self.source.where(int(self.positions[i]), int(self.keys[i]))

    def read(self, i: int):
        """The record ``i`` (0 <= i < N) as its file holds it (before ``formats.canonical``; thread-safe)."""
        try:
            with self._lock:
                return self.source.read(int(self.keys[i]))
        except RecordError as err:
            raise ValueError(f"{self.path} {self.where(i)}: {err} (did the file change since indexing?)") from None

    def example(self, i: int) -> Example:
        """The tokens and mask of record ``i``; ``ValueError`` if the file changed since indexing."""
        try:
            ex = self._encode(self.read(i))
        except RecordError as err:
            raise ValueError(f"{self.path} {self.where(i)}: {err} (did the file change since indexing?)") from None
        if len(ex) != self.lengths[i]:
            raise ValueError(f"{self.path} {self.where(i)}: {len(ex)} tokens, indexed as {self.lengths[i]} "
                             "(did the file or the tokenizer change since indexing?)")
        return ex

    def close(self) -> None:
        with self._lock:
            self.source.close()

    def __enter__(self) -> RecordIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self):  # picklable: the lock is not carried; the source reopens its file on demand
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state):
        self.__dict__.update(state, _lock=threading.Lock())
