"""Where training records come from: files read one record at a time, never loaded whole.

``open_source(path, columns)`` picks the reader from the path and the file's first bytes:

- **JSON Lines** (any name not below, and a ``.json`` file that does not start with ``[``, which
  is what ``datasets.Dataset.to_json`` writes): one JSON value per line. A record's *position*
  is its 0-based line number, its *key* the byte offset of its line; blank lines are skipped
  silently, a UTF-8 byte order mark on line 1 is skipped. Named "line N" (1-based).
- **JSON array** (a ``.json`` file whose first non-blank character is ``[``): one record per
  element, found by a streaming scan (``json``'s C decoder, ``raw_decode``, run over a window of
  the file that grows only while an element is incomplete): one element in memory at a time,
  its byte offset kept as the key, and read back by seeking there, as JSON Lines are. No
  conversion and no cache file: the file stays the one copy, and nothing needs a place to
  write. Position: the element's 0-based index; named "element N (line L)". The array is one
  JSON document, so a syntax error anywhere makes the file unreadable (``ValueError`` with its
  line and column), unlike a bad line of JSON Lines.
- **Parquet** (``.parquet``, or a file starting ``PAR1``): one record per row. Rows are read
  one row group at a time, when a record of it is asked for, keeping the most recently used
  row groups decoded up to ``cache_bytes`` (at least one). A shuffled pass over a file of more
  row groups than that decodes a row group per record read, so for large files prefer
  row groups of about a thousand rows (what ``datasets`` and the Hub write).
- **Arrow IPC** (``.arrow``, ``.feather``, ``.ipc``, or a file starting ``ARROW1``): the file
  format (Feather v2; record batches read by index) or the stream format (what ``datasets``
  writes), both memory-mapped: an uncompressed file's rows are read in place, never copied
  whole (a compressed stream is decompressed whole when opened; compressed files one batch at
  a time).
- **A** ``datasets`` **save_to_disk folder** (``state.json`` naming its Arrow files in
  ``_data_files``): those files in order, as one table. A ``DatasetDict`` folder
  (``dataset_dict.json``) is refused with its split folders named: give one of them.

A table row becomes a dict of its columns (``to_pylist``: nested lists and structs as lists
and dicts; nulls as None, which ``formats.canonical`` reads as absent fields). Only ``columns`` (the fields the record
formats read) are decoded, when given. Positions and keys of tables are the 0-based row
numbers across the whole table; named "row N". A file that cannot be opened or decoded
raises ``ValueError`` naming it (and the row group or batch).
"""

from __future__ import annotations

import codecs
import collections
import json
import os
import re
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from qlora_jax.train.records import RecordError

ARROW_SUFFIXES = (".arrow", ".feather", ".ipc")
SCAN_ROWS = 1024  # rows turned into Python objects at a time while scanning a table
CACHE_BYTES = 256 << 20  # decoded row groups / batches kept per table source
_CHUNK = 1 << 18  # bytes read at a time while scanning a JSON array
_READ_CHUNK = 1 << 14  # first read for one element (doubling while it is incomplete)
_SPACE = re.compile(r"[ \t\r\n]*")


def parse_json(line: bytes) -> Any:
    """One JSON value from UTF-8 bytes; ``RecordError`` naming the problem."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RecordError(f"not UTF-8 ({err.reason} at byte {err.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise RecordError(f"invalid JSON: {err.msg} at column {err.colno}") from None


class Source:
    """Records of one file or folder: ``scan()`` once in order, then ``read(key)`` in any order."""

    path: str
    kind: str

    def scan(self) -> Iterator[tuple[int, int, Any]]:
        """``(position, key, value)`` for every record in order; ``value`` is a ``RecordError`` when unreadable."""
        raise NotImplementedError

    def read(self, key: int) -> Any:
        """The record at ``key`` (as ``scan`` gave it); ``RecordError`` if it no longer parses."""
        raise NotImplementedError

    def where(self, position: int, key: int) -> str:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __getstate__(self):  # picklable: open files and readers are reopened on demand
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __setstate__(self, state):
        self.__init__(**state)


class _JsonFile(Source):
    """A JSON file read back by byte offset (the key), through one open handle."""

    def __init__(self, path: str):
        self.path, self._file = path, None

    def _at(self, key: int):
        if self._file is None:
            self._file = open(self.path, "rb")
        self._file.seek(key)
        return self._file

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None


class JsonLines(_JsonFile):
    kind = "JSON Lines"

    def scan(self):
        offset = 0
        with open(self.path, "rb") as f:
            for line_no, line in enumerate(f):
                start, offset = offset, offset + len(line)
                if line_no == 0 and line.startswith(codecs.BOM_UTF8):
                    line, start = line[3:], start + 3
                if not line.strip():
                    continue
                try:
                    yield line_no, start, parse_json(line)
                except RecordError as err:
                    yield line_no, start, err

    def read(self, key):
        return parse_json(self._at(key).readline())

    def where(self, position, key):
        return f"line {position + 1}"


class JsonArray(_JsonFile):
    kind = "JSON array"

    def scan(self):
        with open(self.path, "rb") as f:
            window = _Window(f, self.path)
            if window.skip_space() != "[":
                raise ValueError(f"{self.path}: a JSON array must start with '['")
            window.advance(window.pos + 1)
            index = 0
            while True:
                c = window.skip_space()
                if c == "]" and index == 0:
                    break
                key, value = window.value()
                yield index, key, value
                index += 1
                c = window.skip_space()
                if c == "]":
                    break
                if c != ",":
                    window.fail(f"expected ',' or ']' after element {index - 1}, got {c or 'the end'!r}")
                window.advance(window.pos + 1)
            window.advance(window.pos + 1)
            if window.skip_space():
                window.fail("data after the array's closing ']'")

    def read(self, key):
        try:
            return _Window(self._at(key), self.path, key, _READ_CHUNK).value()[1]
        except ValueError as err:
            raise RecordError(str(err)) from None

    def where(self, position, key):
        return f"element {position} (line {_line_at(self.path, key)})"


class _Window:
    """Decoded text of a binary file from byte ``start`` on, read as needed: ``buf[pos]`` is at byte ``byte``."""

    def __init__(self, f, path: str, start: int = 0, chunk: int = _CHUNK):
        self.f, self.path, self.eof, self.chunk = f, path, False, chunk
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.buf, self.pos, self.byte = "", 0, start
        if start == 0:
            self.more()
            if self.buf.startswith("\ufeff"):
                self.pos, self.byte = 1, 3

    def more(self) -> bool:
        if self.eof:
            return False
        data = self.f.read(max(self.chunk, len(self.buf) - self.pos))
        try:
            text = self.decoder.decode(data, final=not data)
        except UnicodeDecodeError as err:
            raise ValueError(f"{self.path}: not UTF-8 ({err.reason}) near byte "
                             f"{self.byte + len(self.buf[self.pos:].encode()) + err.start}") from None
        self.buf, self.pos, self.eof = self.buf[self.pos:] + text, 0, not data
        return True

    def advance(self, to: int) -> None:
        self.byte += len(self.buf[self.pos:to].encode("utf-8"))
        self.pos = to

    def skip_space(self) -> str:
        """The next non-whitespace character ('' at the end), without consuming it."""
        while True:
            self.advance(_SPACE.match(self.buf, self.pos).end())
            if self.pos < len(self.buf) or not self.more():
                return self.buf[self.pos:self.pos + 1]

    def value(self) -> tuple[int, Any]:
        """The JSON value starting here (after whitespace) and its byte offset; consumed."""
        decoder = json.JSONDecoder()
        self.skip_space()
        while True:
            try:
                value, end = decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as err:
                truncated = err.msg.startswith("Unterminated string") or err.pos >= len(self.buf) - 8
                if truncated and self.more():  # ran off the window: read on, parse again
                    continue
                self.advance(err.pos)
                self.fail(f"invalid JSON: {err.msg}")
            key = self.byte
            self.advance(end)
            return key, value

    def fail(self, message: str):
        line, column = _line_at(self.path, self.byte, with_column=True)
        raise ValueError(f"{self.path} line {line} column {column}: {message}")


def _line_at(path: str, offset: int, with_column: bool = False):
    """The 1-based line (and byte column) of byte ``offset`` in ``path`` (read in chunks; for messages)."""
    line, last_newline, done = 1, -1, 0
    with open(path, "rb") as f:
        while done < offset:
            chunk = f.read(min(_CHUNK, offset - done))
            if not chunk:
                break
            line += chunk.count(b"\n")
            if b"\n" in chunk:
                last_newline = done + chunk.rindex(b"\n")
            done += len(chunk)
    return (line, offset - last_newline) if with_column else line


class _Part:
    """One file of a table: its chunks (Parquet row groups, Arrow record batches), loaded by index."""

    def __init__(self, path: str, kind: str):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path, self.kind, self.file, self.batches = path, kind, None, None
        try:
            if kind == "Parquet":
                self.file = pq.ParquetFile(path, memory_map=True)
                self.schema = self.file.schema_arrow
                meta = self.file.metadata
                self.rows = [meta.row_group(k).num_rows for k in range(meta.num_row_groups)]
            else:
                source = pa.memory_map(path)
                if source.read(6) == b"ARROW1":
                    source.seek(0)
                    self.file = pa.ipc.open_file(source)
                    self.schema = self.file.schema
                    self.rows = [self.file.get_batch(k).num_rows for k in range(self.file.num_record_batches)]
                else:
                    source.seek(0)
                    reader = pa.ipc.open_stream(source)
                    self.schema, self.batches = reader.schema, list(reader)
                    self.rows = [b.num_rows for b in self.batches]
        except (pa.ArrowException, OSError) as err:
            raise ValueError(f"{path}: not a readable {kind} file: {err}") from None

    def load(self, k: int, columns: list[str] | None):
        import pyarrow as pa

        try:
            if self.kind == "Parquet":
                return self.file.read_row_group(k, columns=columns)
            batch = self.batches[k] if self.file is None else self.file.get_batch(k)
            return batch if columns is None else batch.select(columns)
        except (pa.ArrowException, OSError) as err:
            unit = "row group" if self.kind == "Parquet" else "record batch"
            raise ValueError(f"{self.path}: cannot read {unit} {k}: {err}") from None


class Table(Source):
    """Rows of one or more Parquet / Arrow files (``paths``, concatenated in order)."""

    def __init__(self, path: str, kind: str, paths: list[str], columns: Iterable[str] | None = None,
                 cache_bytes: int = CACHE_BYTES):
        self.path, self.kind, self.paths, self.cache_bytes = path, kind, list(paths), cache_bytes
        self.columns = None if columns is None else sorted(set(columns))
        file_kind = "Parquet" if kind == "Parquet" else "Arrow"
        self._parts = [_Part(p, file_kind) for p in self.paths]
        self.names = list(self._parts[0].schema.names)
        for part in self._parts[1:]:
            if list(part.schema.names) != self.names:
                raise ValueError(f"{part.path}: columns {part.schema.names} differ from {self.paths[0]}'s {self.names}")
        self._chunks = [(p, k) for p, part in enumerate(self._parts) for k in range(len(part.rows))]
        rows = [n for part in self._parts for n in part.rows]
        self._starts = np.concatenate([[0], np.cumsum(rows, dtype=np.int64)])
        self._read = None if self.columns is None else [c for c in self.names if c in self.columns]
        if self._read == []:
            raise ValueError(f"{path} ({kind}): none of its columns ({', '.join(self.names)}) is a field the record "
                             f"formats read ({', '.join(self.columns)}); name yours with data.columns (FIELD=COLUMN)")
        self._cache: collections.OrderedDict = collections.OrderedDict()

    def __getstate__(self):
        return {k: getattr(self, k) for k in ("path", "kind", "paths", "columns", "cache_bytes")}

    @property
    def num_rows(self) -> int:
        return int(self._starts[-1])

    def _chunk(self, j: int):
        if j in self._cache:
            self._cache.move_to_end(j)
            return self._cache[j]
        p, k = self._chunks[j]
        data = self._parts[p].load(k, self._read)
        self._cache[j] = data
        while len(self._cache) > 1 and sum(c.nbytes for c in self._cache.values()) > self.cache_bytes:
            self._cache.popitem(last=False)
        return data

    def scan(self):
        for j in range(len(self._chunks)):
            data, start = self._parts[self._chunks[j][0]].load(self._chunks[j][1], self._read), int(self._starts[j])
            for lo in range(0, data.num_rows, SCAN_ROWS):
                for r, row in enumerate(data.slice(lo, SCAN_ROWS).to_pylist(), start=start + lo):
                    yield r, r, row

    def read(self, key):
        if not 0 <= key < self.num_rows:
            raise RecordError(f"row {key} is past the table's {self.num_rows} rows")
        j = int(np.searchsorted(self._starts, key, side="right")) - 1
        return self._chunk(j).slice(key - int(self._starts[j]), 1).to_pylist()[0]

    def where(self, position, key):
        return f"row {position}"

    def close(self):
        self._cache.clear()


def open_source(path: str | os.PathLike, columns: Iterable[str] | None = None) -> Source:
    """The reader for ``path`` (see the module docstring); ``columns``: the only table columns decoded."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return Table(path, "save_to_disk folder", _saved_files(path), columns)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such data file: {path}")
    with open(path, "rb") as f:
        head = f.read(1 << 12)
    lower = path.lower()
    if head.startswith(b"PAR1") or lower.endswith(".parquet"):
        return Table(path, "Parquet", [path], columns)
    if head.startswith(b"ARROW1") or lower.endswith(ARROW_SUFFIXES):
        return Table(path, "Arrow", [path], columns)
    if lower.endswith(".json") and head.lstrip(codecs.BOM_UTF8).lstrip(b" \t\r\n").startswith(b"["):
        return JsonArray(path)
    return JsonLines(path)


def _saved_files(folder: str) -> list[str]:
    """The Arrow files of a ``datasets.Dataset.save_to_disk`` folder, in order."""
    if os.path.exists(os.path.join(folder, "dataset_dict.json")):
        splits = sorted(e for e in os.listdir(folder) if os.path.isdir(os.path.join(folder, e)))
        raise ValueError(f"{folder} is a DatasetDict folder; give one of its splits: "
                         + ", ".join(os.path.join(folder, s) for s in splits))
    state = os.path.join(folder, "state.json")
    if not os.path.exists(state):
        raise ValueError(f"{folder} is a folder, but not a datasets save_to_disk folder (it has no state.json); "
                         "give a data file (JSON Lines, JSON array, Parquet, Arrow)")
    try:
        with open(state, encoding="utf-8") as f:
            files = [os.path.join(folder, d["filename"]) for d in json.load(f)["_data_files"]]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{state}: not a datasets state.json (no _data_files list of filenames): {err}") from None
    if not files:
        raise ValueError(f"{state} lists no data files")
    for p in files:
        if not os.path.exists(p):
            raise ValueError(f"{state} names {os.path.basename(p)}, which is not in {folder}")
    return files
