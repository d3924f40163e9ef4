"""TensorBoard event files, written directly: scalars only, no TensorFlow, no protobuf library.

An event file is a sequence of TFRecords (length, masked CRC-32C of the length, data, masked
CRC-32C of the data), each holding one serialized ``tensorflow.Event`` protobuf. The few fields
used here are encoded by hand:

    Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
    Summary { repeated Value value = 1; }
    Value   { string tag = 1; float simple_value = 2; }

With ``metrics.tensorboard = true`` the engine writes ``tensorboard/`` in the run folder as it
trains, so ``tensorboard --logdir ~/.local/state/tunetop/runs`` shows every run;
``tunetop export-metrics RUN --format tensorboard --output DIR`` writes one from a journal.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
import time
from pathlib import Path
from typing import Any


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
    """CRC-32C (Castagnoli), as TFRecord uses; records here are tens of bytes, so Python is enough."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1  # negative int64 as two's complement, as protobuf does
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _bytes_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_event(wall_time: float, step: int = 0, file_version: str = "", scalars: dict[str, float] | None = None) -> bytes:
    """One serialized ``Event``: a file-version header, or scalars at a step."""
    out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time)
    if step:
        out += _varint(2 << 3 | 0) + _varint(step)
    if file_version:
        out += _bytes_field(3, file_version.encode())
    if scalars:
        values = b"".join(
            _bytes_field(1, _bytes_field(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", value))
            for tag, value in scalars.items()
        )
        out += _bytes_field(5, values)
    return out


def frame(data: bytes) -> bytes:
    """A TFRecord around one serialized event."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", _masked(crc32c(length))) + data + struct.pack("<I", _masked(crc32c(data)))


SCALARS = {
    "train": {
        "loss": "train/loss",
        "learning_rate": "train/learning_rate",
        "tokens_per_second": "train/tokens_per_second",
        "iterations_per_second": "train/iterations_per_second",
        "peak_memory": "train/peak_memory_gb",
    },
    "validation": {"loss": "validation/loss"},
}
"""Which journal event fields become which TensorBoard tags."""


class TensorBoardWriter:
    """Appends scalars to one event file in ``folder``, each record written at once.

    A record that cannot be written (a full disk) is kept, in order, and written by the next
    write or ``flush``; the failed write is cut off the file again, so no torn record is left.
    ``private`` (the engine's own files) makes the folder 0700 and the file 0600.
    """

    name = "TensorBoard"

    def __init__(self, folder: Path, private: bool = False) -> None:
        folder.mkdir(mode=0o700 if private else 0o777, parents=True, exist_ok=True)
        now = time.time()
        self.path = folder / f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}.tunetop"
        self._fd = os.open(str(self.path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600 if private else 0o666)
        self._size = os.fstat(self._fd).st_size
        self._pending: list[bytes] = [frame(encode_event(now, file_version="brain.Event:2"))]
        with contextlib.suppress(OSError):  # kept pending: the first scalar's write reports it
            self.flush()

    @property
    def pending(self) -> int:
        """Records waiting for space."""
        return len(self._pending)

    def _write(self, event: bytes) -> None:
        self._pending.append(frame(event))
        self.flush()

    def flush(self) -> None:
        """Write the pending records in order; OSError naming the file if one cannot be written."""
        while self._pending:
            record = self._pending[0]
            try:
                if os.write(self._fd, record) != len(record):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError as error:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, self._size)
                raise OSError(error.errno, error.strerror, str(self.path)) from None
            self._size += len(record)
            self._pending.pop(0)

    def scalars(self, step: int, values: dict[str, float], wall_time: float | None = None) -> None:
        self._write(encode_event(wall_time or time.time(), step=step, scalars=values))

    def on_event(self, event: dict[str, Any], _raw: bytes = b"") -> None:
        """An :class:`engine.events.EventLog` subscriber: train and validation events become scalars."""
        fields = SCALARS.get(event.get("type", ""))
        if not fields:
            return
        values = {tag: float(event[key]) for key, tag in fields.items() if isinstance(event.get(key), (int, float))}
        if values:
            self.scalars(int(event.get("iteration", 0)), values, float(event.get("ts") or time.time()))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.flush()
        os.close(self._fd)


def write_from_events(events: list[dict[str, Any]], folder: Path) -> Path:
    """An event file holding a journal's train and validation scalars."""
    writer = TensorBoardWriter(folder)
    try:
        for event in events:
            writer.on_event(event)
    finally:
        writer.close()
    return writer.path
