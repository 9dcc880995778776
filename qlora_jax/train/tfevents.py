"""A TensorBoard event file writer for scalars: the TFRecord framing and three protobuf messages, by hand.

Why not tensorboardX: its ``SummaryWriter`` module imports torch whenever torch is
installed (1.6 s and a few hundred MiB of RSS in a venv with the oracle extra, for
a writer of floats), and the package's ``__init__`` imports that module, so even
its plain ``EventFileWriter`` brings torch in. Scalars need much less: this file
(no dependency) writes what TensorBoard reads, and the tests read it back with
tensorboard's own ``EventAccumulator``, which checks every CRC.

A file is a sequence of records; each record is::

    uint64 len (little-endian) | uint32 masked_crc32c(len bytes) | data[len] | uint32 masked_crc32c(data)

with ``masked_crc32c(x) = ((c >> 15) | (c << 17)) + 0xa282ead8 (mod 2**32)``, ``c`` the
CRC-32C (Castagnoli, reflected polynomial ``0x82f63b78``) of ``x``. Each ``data`` is
an ``Event`` message (tensorboard/compat/proto/event.proto) in protobuf wire format:

- ``Event``: 1 ``wall_time`` double, 2 ``step`` int64, then one of 3 ``file_version``
  string, 5 ``summary`` ``Summary``, 7 ``session_log`` ``SessionLog``;
- ``Summary``: 1 repeated ``Value``; ``Value``: 1 ``tag`` string, 2 ``simple_value`` float;
- ``SessionLog``: 1 ``status`` enum (``START = 1``).

The first event is ``file_version = "brain.Event:2"`` (readers purge on restarts only
from version 2 on). ``SessionLog START`` at step ``s`` is TensorBoard's restart
marker: readers drop the events at steps ``>= s`` read before it, in any file of
the folder (``EventFileWriter.restart``).
"""

from __future__ import annotations

import os
import socket
import struct
import time


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C of ``data`` (init and final xor ``0xffffffff``): ``crc32c(b"123456789") == 0xe3069283``."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def record(data: bytes) -> bytes:
    """``data`` framed as one TFRecord (module docstring)."""
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 two's complement, as protobuf encodes negative int64
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:  # length-delimited (wire type 2)
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def event(step: int, wall_time: float, *, file_version: str | None = None,
          scalars: dict[str, float] | None = None, session_start: bool = False) -> bytes:
    """One ``Event`` message: a file version, a ``Summary`` of ``simple_value`` scalars, or a ``SessionLog START``."""
    out = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step)  # fields 1 (fixed64), 2 (varint)
    if file_version is not None:
        out += _field(3, file_version.encode())
    if scalars:
        values = b"".join(_field(1, _field(1, tag.encode()) + b"\x15" + struct.pack("<f", value))
                          for tag, value in scalars.items())  # Value: 1 tag, 2 simple_value (fixed32)
        out += _field(5, values)
    if session_start:
        out += _field(7, b"\x08\x01")  # SessionLog.status = START
    return out


class EventFileWriter:
    """``<directory>/events.out.tfevents.<seconds>.<microseconds>.<host>.<pid>``, each event flushed as written.

    The name sorts by creation time (TensorBoard reads a folder's files in name order).
    """

    def __init__(self, directory: str):
        os.makedirs(directory, exist_ok=True)
        now = time.time()
        name = f"events.out.tfevents.{int(now):010d}.{int(now % 1 * 1e6):06d}.{socket.gethostname()}.{os.getpid()}"
        self.path = os.path.join(directory, name)
        self.file = open(self.path, "wb")
        self._write(event(0, now, file_version="brain.Event:2"))

    def _write(self, data: bytes) -> None:
        self.file.write(record(data))
        self.file.flush()

    def restart(self, step: int) -> None:
        """Marks a restart at ``step``: readers drop the events at steps ``>= step`` written before this one."""
        self._write(event(step, time.time(), session_start=True))

    def scalars(self, step: int, values: dict[str, float], wall_time: float | None = None) -> None:
        """One event holding every ``tag: value`` of ``values`` at ``step`` (stored as float32)."""
        self._write(event(step, time.time() if wall_time is None else wall_time, scalars=values))

    def close(self) -> None:
        self.file.close()
