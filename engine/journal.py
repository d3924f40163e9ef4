"""The durable, append-only event journal of a run.

One file, ``journal.ttj``: an 8-byte magic, then records framed as

    u32 payload length | u32 CRC-32 of (seq bytes + payload) | u64 seq | payload (JSON event)

all little-endian. Framing with a length and a checksum (as TensorBoard's event files do) lets
a reader stop cleanly at a torn tail after a crash: a record whose length runs past the end of
the file, or whose checksum fails, ends the journal, and the writer truncates it away on open.
Plain framing over SQLite because it needs no schema, appends are one ``write``, and the
server can send stored payloads to clients without decoding them.

No mlx import here.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import struct
import zlib
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from .journal_index import IndexWriter, open_sealed
from .private import open_private

if TYPE_CHECKING:
    from .history import History

MAGIC = b"TTJOURN1"
HEADER = struct.Struct("<IIQ")
MAX_RECORD = 16 * 1024 * 1024
JOURNAL_NAME = "journal.ttj"


class JournalError(RuntimeError):
    """A journal that cannot be opened or is not a journal."""


def _checksum(seq: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(struct.pack("<Q", seq)))


def frame(seq: int, payload: bytes) -> bytes:
    """One framed record."""
    return HEADER.pack(len(payload), _checksum(seq, payload), seq) + payload


def scan(data: bytes | memoryview, start: int = len(MAGIC)) -> Iterator[tuple[int, int, bytes]]:
    """Yield ``(offset, seq, payload)`` for every complete, intact record from ``start``."""
    view = memoryview(data)
    end = len(view)
    offset = start
    unpack = HEADER.unpack_from
    size = HEADER.size
    crc32 = zlib.crc32
    while offset + size <= end:
        length, crc, seq = unpack(view, offset)
        body_end = offset + size + length
        if length > MAX_RECORD or body_end > end:
            return
        # The seq field sits right before the payload, so one CRC call covers both.
        if crc32(view[offset + 8 : body_end]) != crc:
            return
        yield offset, seq, bytes(view[offset + size : body_end])
        offset = body_end


class JournalWriter:
    """Appends events; the only writer of a journal (the run lock guarantees one).

    ``append`` writes and flushes to the OS at once, so readers in other processes see the
    record immediately; ``sync`` (fsync) is called by the owner at points that matter (saves,
    state changes, a timer), since an fsync per event would cost the trainer. Each sync also
    leaves the fast-read hints beside the journal (engine.journal_index).
    """

    def __init__(self, path: str | Path, history: History | None = None) -> None:
        self.path = Path(path)
        self.history = history  # fed every record, existing and new (engine.history)
        self.last_seq = 0
        self._index: list[tuple[int, int]] = []  # sparse (seq, offset) pairs for seeking
        self._file: BinaryIO
        if self.path.exists() and self.path.stat().st_size > 0:
            self._file = open(self.path, "r+b")  # noqa: SIM115 (kept open for the run's life)
            data = self._file.read()
            if not data.startswith(MAGIC):
                self._file.close()
                raise JournalError(f"{self.path}: not a tunetop journal (bad magic).")
            good_end = len(MAGIC)
            offsets = array("Q")
            for count, (offset, seq, payload) in enumerate(scan(data)):
                if count % 1024 == 0:
                    self._index.append((seq, offset))
                if history is not None:
                    history.add(seq, payload)
                offsets.append(offset)
                self.last_seq = seq
                good_end = offset + HEADER.size + len(payload)
            if good_end < len(data):
                # A torn tail from a crash mid-append: cut it so new records follow intact ones.
                self._file.truncate(good_end)
            self._file.seek(good_end)
            self._count = len(offsets)
            self.end_offset = good_end
            self._crc = zlib.crc32(memoryview(data)[len(MAGIC) : good_end])
            self._fast_index = IndexWriter(self.path, offsets)
        else:
            self._file = os.fdopen(open_private(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "wb")
            self._file.write(MAGIC)
            self._file.flush()
            self._count = 0
            self.end_offset = len(MAGIC)
            self._crc = 0
            self._fast_index = IndexWriter(self.path)
        self._sealed_end = 0

    def append(self, event: dict[str, Any], payload: bytes | None = None) -> bytes:
        """Append one event (its ``seq`` must be ``last_seq + 1``); returns the payload written."""
        seq = event["seq"]
        if seq != self.last_seq + 1:
            raise JournalError(f"journal seq gap: appending {seq} after {self.last_seq}")
        if payload is None:
            payload = json.dumps(event, separators=(",", ":")).encode("utf-8")
        offset = self.end_offset
        record = frame(seq, payload)
        self._write_at(offset, record)
        if self._count % 1024 == 0:
            self._index.append((seq, offset))
        self._fast_index.add(offset)
        self._crc = zlib.crc32(record, self._crc)  # running CRC of the prefix, for the seal
        self._count += 1
        self.last_seq = seq
        self.end_offset = offset + len(record)
        if self.history is not None:
            self.history.add(seq, payload)
        return payload

    def _write_at(self, offset: int, data: bytes) -> None:
        """Write a whole record at ``offset`` or none of it.

        A failed write (a full disk: ENOSPC, possibly after a short write) cuts the file back to
        where the record began and raises, so a live engine never leaves a torn tail, and the
        record can be appended again once there is space (engine.events holds it meanwhile).
        Unbuffered, so no half-written record lingers in a buffer to be flushed later.
        """
        fd = self._file.fileno()
        view = memoryview(data)
        try:
            while view:
                written = os.pwrite(fd, view, offset)
                if written <= 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                view, offset = view[written:], offset + written
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, self.end_offset)
            raise

    def offset_before(self, seq: int) -> int:
        """A file offset at or before the record with ``seq`` (for fast replay)."""
        best = len(MAGIC)
        for indexed_seq, offset in self._index:
            if indexed_seq > seq:
                break
            best = offset
        return best

    def sync(self) -> None:
        """Make everything appended so far durable, then seal it for fast readers."""
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._count and self.end_offset != self._sealed_end:
            try:
                self._fast_index.seal(self.end_offset, self._count, self._crc)
                self._sealed_end = self.end_offset
            except OSError:
                pass  # a hint: readers without it walk the records; the journal itself is synced

    def close(self) -> None:
        if not self._file.closed:
            try:
                self.sync()
            finally:
                self._file.close()
                self._fast_index.close()


def read_payloads(path: str | Path, since: int = 0, start_offset: int | None = None) -> Iterator[tuple[int, bytes]]:
    """Yield ``(seq, payload)`` for records with seq > ``since``, stopping at a torn tail.

    ``start_offset`` (from ``JournalWriter.offset_before``) skips the part of the file before it.
    The sealed prefix is read through its index (engine.journal_index); what follows it is
    walked record by record with ``scan``'s loop, inlined: this is the replay hot path
    (docs/PERFORMANCE.md).
    """
    path = Path(path)
    with open(path, "rb") as handle:
        if handle.read(len(MAGIC)) != MAGIC:
            raise JournalError(f"{path}: not a tunetop journal (bad magic).")
    begin = max(start_offset or len(MAGIC), len(MAGIC))
    sealed = open_sealed(path, len(MAGIC), begin)
    if sealed is not None:
        try:
            yield from sealed.payloads(since, begin)
            begin = max(begin, sealed.end)
        finally:
            sealed.close()
    with open(path, "rb") as handle:
        handle.seek(begin)
        data = handle.read()
    view = memoryview(data)
    end = len(view)
    offset = 0
    unpack = HEADER.unpack_from
    size = HEADER.size
    crc32 = zlib.crc32
    while offset + size <= end:
        length, crc, seq = unpack(view, offset)
        body_end = offset + size + length
        if length > MAX_RECORD or body_end > end or crc32(view[offset + 8 : body_end]) != crc:
            return
        if seq > since:
            yield seq, data[offset + size : body_end]
        offset = body_end


def read_events(path: str | Path, since: int = 0) -> Iterator[dict[str, Any]]:
    """Decoded events with seq > ``since`` (decoded in batches: engine.protocol.loads_many)."""
    from itertools import islice

    from .protocol import loads_many

    payloads = (payload for _seq, payload in read_payloads(path, since))
    while batch := list(islice(payloads, 4096)):
        yield from loads_many(batch)


class JournalTail:
    """Follows a live journal from another process: call ``poll()`` for new records."""

    def __init__(self, path: str | Path, since: int = 0) -> None:
        self.path = Path(path)
        self.since = since
        self._offset = len(MAGIC)

    def poll(self) -> list[tuple[int, bytes]]:
        """Records appended since the last poll (complete ones only)."""
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        out: list[tuple[int, bytes]] = []
        consumed = 0
        for offset, seq, payload in scan(data, 0):
            consumed = offset + HEADER.size + len(payload)
            if seq > self.since:
                out.append((seq, payload))
                self.since = seq
        self._offset += consumed
        return out


def read_range(path: str | Path, start: int, end: int, chunk: int = 1 << 20) -> Iterator[bytes]:
    """Raw journal bytes from ``start`` to ``end`` in chunks (record boundaries not kept)."""
    with open(path, "rb") as handle:
        handle.seek(start)
        left = end - start
        while left > 0:
            data = handle.read(min(chunk, left))
            if not data:
                return
            left -= len(data)
            yield data


class RecordStream:
    """Reassembles records from raw journal bytes that arrive in arbitrary chunks (a replay)."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Complete, intact ``(seq, payload)`` records in ``data`` plus what was left over."""
        buffer = self._pending + data if self._pending else data
        out: list[tuple[int, bytes]] = []
        consumed = 0
        for offset, seq, payload in scan(buffer, 0):
            out.append((seq, payload))
            consumed = offset + HEADER.size + len(payload)
        self._pending = buffer[consumed:]
        return out
