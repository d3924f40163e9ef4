"""The durable, append-only event journal of a run.

One file, ``journal.ttj``: an 8-byte magic, then records framed as

    u32 payload length | u32 CRC-32 of (seq bytes + payload) | u64 seq | payload (JSON event)

all little-endian. Framing with a length and a checksum (as TensorBoard's event files do) lets
a reader tell intact records from damaged bytes. Damage in the middle (a flipped bit, a bad
sector) is skipped: the reader resynchronises at the next intact record (``next_intact``) and
reports what it skipped (``Damage``); nothing after the damage is lost. Only bytes after the
last intact record are a torn tail: a reader stops there (a live writer may be mid-append),
and the writer, on open, moves them to a side file before cutting them off. A damaged middle
is repaired on open by tunetop.control.journal_repair. Plain framing over SQLite because it needs no
schema, appends are one ``write``, and the server can send stored payloads to clients without
decoding them.

No mlx import here. Longer than most modules because the framing, its reader (with damage
skipping) and its writer (with the torn-tail cut) must agree byte for byte; they stay together.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import struct
import zlib
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from tunetop.control.journal_index import IndexWriter, open_sealed, read_seal
from tunetop.control.protocol import loads_many
from tunetop.private import open_private

if TYPE_CHECKING:
    from tunetop.control.history import History

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


@dataclass(frozen=True)
class Damage:
    """Bytes that are no intact record, followed by an intact one (so not a torn tail)."""

    offset: int  # where the unreadable bytes start (a file offset)
    end: int  # where the next intact record starts
    prev_seq: int  # the seq of the intact record before them (0: none, or not known to the reader)
    next_seq: int  # the seq of the one after them (0 for a damaged magic)

    def describe(self) -> str:
        """One clause for a warning: where, how much, and which records went with it."""
        if self.offset == 0 and self.next_seq == 0:
            return "a damaged magic (the file's first 8 bytes)"
        if self.prev_seq and self.next_seq > self.prev_seq + 1:
            first, last = self.prev_seq + 1, self.next_seq - 1
            lost = f"records lost: seq {first}" if first == last else f"records lost: seqs {first}-{last}"
        elif self.prev_seq:
            lost = "no record lost"
        else:
            lost = f"the next intact record is seq {self.next_seq}"
        return f"{self.end - self.offset} unreadable bytes at offset {self.offset} ({lost})"


# A header's length field is at most MAX_RECORD (2**24), so its fourth byte is 0 or 1. JSON
# payloads never hold those bytes (control characters are escaped), so a resync finds its
# candidates with one C-speed search and checks only those.
_LENGTH_TOP = re.compile(rb"[\x00\x01]")


def next_intact(data: bytes | memoryview, start: int, end: int | None = None) -> int | None:
    """The offset of the first intact record at or after ``start`` (before ``end``), or None."""
    view = memoryview(data)
    end = len(view) if end is None else end
    size = HEADER.size
    position = start + 3
    while position < end:
        found = _LENGTH_TOP.search(view, position, end)
        if found is None:
            return None
        offset = found.start() - 3
        position = found.start() + 1
        if offset + size > end:
            return None
        length, crc, _seq = HEADER.unpack_from(view, offset)
        body_end = offset + size + length
        if length <= MAX_RECORD and body_end <= end and zlib.crc32(view[offset + 8 : body_end]) == crc:
            return offset
    return None


def scan(
    data: bytes | memoryview, start: int = len(MAGIC), damage: list[Damage] | None = None, *, after: int = 0
) -> Iterator[tuple[int, int, bytes]]:
    """Yield ``(offset, seq, payload)`` for every complete, intact record from ``start``.

    Damaged bytes followed by an intact record are skipped (and appended to ``damage`` when
    given; ``after`` is the seq of the record before ``start``, for the first one); bytes
    after the last intact record end the scan (a torn tail, or a record still being written).
    """
    last = after
    view = memoryview(data)
    end = len(view)
    offset = start
    unpack = HEADER.unpack_from
    size = HEADER.size
    crc32 = zlib.crc32
    while offset + size <= end:
        length, crc, seq = unpack(view, offset)
        body_end = offset + size + length
        # The seq field sits right before the payload, so one CRC call covers both.
        if length > MAX_RECORD or body_end > end or crc32(view[offset + 8 : body_end]) != crc:
            following = next_intact(view, offset + 1, end)
            if following is None:
                return
            if damage is not None:
                damage.append(Damage(offset, following, last, unpack(view, following)[2]))
            offset = following
            continue
        yield offset, seq, bytes(view[offset + size : body_end])
        last = seq
        offset = body_end


def _survey(data: bytes) -> tuple[array, array, list[Damage], int]:
    """(offsets, seqs) of the intact records in file order, the damage between them, and where
    the last one ends (the rest is a torn tail)."""
    offsets, seqs = array("Q"), array("Q")
    damage: list[Damage] = []
    good_end = len(MAGIC)
    for offset, seq, payload in scan(data, len(MAGIC), damage):
        offsets.append(offset)
        seqs.append(seq)
        good_end = offset + HEADER.size + len(payload)
    return offsets, seqs, damage, min(good_end, len(data))


class JournalWriter:
    """Appends events; the only writer of a journal (the run lock guarantees one).

    ``append`` writes and flushes to the OS at once, so readers in other processes see the
    record immediately; ``sync`` (fsync) is called by the owner at points that matter (saves,
    state changes, a timer), since an fsync per event would cost the trainer. Each sync also
    leaves the fast-read hints beside the journal (tunetop.control.journal_index).
    """

    def __init__(self, path: str | Path, history: History | None = None) -> None:
        self.path = Path(path)
        self.history = history  # fed every record, existing and new (tunetop.control.history)
        self.last_seq = 0
        self.repairs: list[str] = []  # what opening had to mend, as sentences (tunetop.control.journal_repair)
        self._index: list[tuple[int, int]] = []  # sparse (seq, offset) pairs for seeking
        self._file: BinaryIO
        sealed = read_seal(self.path)  # before anything rewrites: the seqs written so far
        known_last = 0  # the highest seq the journal is known to have held
        data = b""
        if self.path.exists() and self.path.stat().st_size > 0:
            data = self.path.read_bytes()
            offsets, seqs, damage, good_end = _survey(data)
            clean = data.startswith(MAGIC) and not damage and seqs == array("Q", range(1, len(seqs) + 1))
            whole = clean and good_end == len(data)
            if not whole or (sealed is not None and sealed.last_seq > max(seqs, default=0)):
                # cycle: the repair builds on this module's framing
                from tunetop.control import journal_repair

                if not seqs and not data.startswith(MAGIC) and not MAGIC.startswith(data) and sealed is None:
                    raise JournalError(f"{self.path}: not a tunetop journal (bad magic, no intact record).")
                known_last = journal_repair.last_written(data, good_end, max(seqs, default=0), sealed)
                if not whole:
                    data, self.repairs = journal_repair.repair(self.path, data, offsets, seqs, damage, good_end, clean)
                    offsets, seqs, _damage, good_end = _survey(data)
            self._file = open(self.path, "r+b")  # noqa: SIM115 (kept open for the run's life)
            self._file.seek(good_end)
            for count, (offset, seq) in enumerate(zip(offsets, seqs, strict=True)):
                if count % 1024 == 0:
                    self._index.append((seq, offset))
                if history is not None:
                    history.add(seq, data[offset + HEADER.size : offset + HEADER.size + HEADER.unpack_from(data, offset)[0]])
            self.last_seq = seqs[-1] if seqs else 0
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
            if sealed is not None:  # the journal was deleted or emptied, its seal is still here
                # cycle: the repair builds on this module's framing
                from tunetop.control import journal_repair

                known_last = journal_repair.last_written(data, len(MAGIC), 0, sealed)
        self._sealed_end = 0
        if known_last > self.last_seq:
            # Records that were written and are gone (a cut file, a damaged last record): each
            # seq gets a warning event in its place, so no seq is ever used twice.
            # cycle: the repair builds on this module's framing
            from tunetop.control import journal_repair

            run = journal_repair.run_id(self.path, data, len(MAGIC) if self._count else None)
            events, sentence = journal_repair.lost_at_end(self.path, self.last_seq + 1, known_last, run)
            for event in events:
                self.append(event)
            self.repairs.append(sentence)
            self.sync()

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
        record can be appended again once there is space (tunetop.control.events holds it meanwhile).
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
                self._fast_index.seal(self.end_offset, self._count, self.last_seq, self._crc)
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


def read_payloads(
    path: str | Path, since: int = 0, start_offset: int | None = None, damage: list[Damage] | None = None
) -> Iterator[tuple[int, bytes]]:
    """Yield ``(seq, payload)`` for records with seq > ``since``, stopping at a torn tail.

    ``start_offset`` (from ``JournalWriter.offset_before``) skips the part of the file before it.
    The sealed prefix is read through its index (tunetop.control.journal_index); what follows it is
    walked record by record with ``scan``'s loop, inlined: this is the replay hot path
    (docs/PERFORMANCE.md). Damaged bytes are skipped and, when ``damage`` is given, listed
    there (a damaged magic as the first 8 bytes).
    """
    path = Path(path)
    with open(path, "rb") as handle:
        bad_magic = handle.read(len(MAGIC)) != MAGIC
    if bad_magic and damage is not None:
        damage.append(Damage(0, len(MAGIC), 0, 0))
    begin = max(start_offset or len(MAGIC), len(MAGIC))
    sealed = open_sealed(path, len(MAGIC), begin)
    last = 0  # the seq of the last intact record read (0: none yet)
    if sealed is not None:
        try:
            yield from sealed.payloads(since, begin)
            begin = max(begin, sealed.end)
            last = int(sealed.seqs[-1])
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
            following = next_intact(view, offset + 1, end)
            if following is None:
                break
            if damage is not None:
                damage.append(Damage(begin + offset, begin + following, last, unpack(view, following)[2]))
            offset = following
            continue
        if seq > since:
            yield seq, data[offset + size : body_end]
        last = seq
        offset = body_end
    if bad_magic and not last and start_offset is None:
        raise JournalError(f"{path}: not a tunetop journal (bad magic, no intact record).")


def read_events(path: str | Path, since: int = 0) -> Iterator[dict[str, Any]]:
    """Decoded events with seq > ``since`` (decoded in batches: tunetop.control.protocol.loads_many)."""
    from itertools import islice


    payloads = (payload for _seq, payload in read_payloads(path, since))
    while batch := list(islice(payloads, 4096)):
        yield from loads_many(batch)


class JournalTail:
    """Follows a live journal from another process: call ``poll()`` for new records.

    Damaged bytes followed by an intact record are skipped and listed in ``damage``;
    ``pending`` counts the bytes after the last intact record (a record being written, or,
    once the writer is gone, a torn tail).
    """

    def __init__(self, path: str | Path, since: int = 0) -> None:
        self.path = Path(path)
        self.since = since
        self.damage: list[Damage] = []
        self.pending = 0
        self._offset = len(MAGIC)
        self._magic_checked = False
        self._last = 0  # the seq of the last intact record read

    def poll(self) -> list[tuple[int, bytes]]:
        """Records appended since the last poll (complete ones only)."""
        try:
            with open(self.path, "rb") as handle:
                if not self._magic_checked:
                    head = handle.read(len(MAGIC))
                    if len(head) == len(MAGIC):
                        self._magic_checked = True
                        if head != MAGIC:
                            self.damage.append(Damage(0, len(MAGIC), 0, 0))
                handle.seek(self._offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        out: list[tuple[int, bytes]] = []
        consumed = 0
        damage: list[Damage] = []
        for offset, seq, payload in scan(data, 0, damage, after=self._last):
            consumed = offset + HEADER.size + len(payload)
            self._last = seq
            if seq > self.since:
                out.append((seq, payload))
                self.since = seq
        self.damage.extend(Damage(self._offset + d.offset, self._offset + d.end, d.prev_seq, d.next_seq) for d in damage)
        self._offset += consumed
        self.pending = len(data) - consumed
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
