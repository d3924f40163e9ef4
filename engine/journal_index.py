"""The journal's fast-read sidecars: a dense offsets index and a seal over the synced prefix.

Reading a journal record by record in Python (framing + CRC of each) costs about a
microsecond a record: a second for a million. The writer already knows every record's offset
and can keep a running CRC-32 of everything it wrote, so at each ``sync`` it leaves two small
hints beside the journal:

- ``journal.idx``: an 8-byte magic, then every record's file offset as a little-endian u64,
  in order (appended at each sync);
- ``journal.seal``: (end offset, record count, last seq, CRC-32 of the journal's bytes from the
  magic to that end), written atomically (temp file + rename).

A reader checks the whole sealed prefix with one C-speed CRC call and the index against the
prefix's own headers with numpy (every record starts where the previous one ends, seqs count
up by one), then cuts the payloads out without touching each header in Python. Both files are
hints: any mismatch (a stale or torn index, a seal from before a crash, a flipped bit) makes
the reader fall back to the record-by-record walk, which is always correct. Only the journal
is the truth, so neither file is fsynced. One more use of the seal: its last seq tells a writer
reopening a journal that lost records at its end (cut, or a damaged last record) which seqs
were already handed out, so none is used twice (engine.journal_repair).

numpy is imported only when a sealed journal is read.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import struct
import zlib
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from .private import open_private, write_private

if TYPE_CHECKING:
    import numpy as np

INDEX_MAGIC = b"TTJINDX1"
SEAL_MAGIC = b"TTJSEAL2"
# magic | end offset | records | last seq | CRC-32 of journal[len(MAGIC):end] | CRC-32 of the fields before it
SEAL = struct.Struct("<8sQQQII")
HEADER_SIZE = 16  # the journal's record header: u32 length, u32 CRC, u64 seq
# A record walked in Python costs ~3.5 ns a byte, the seal's CRC + index check ~0.4 ns a byte
# of the whole prefix: the fast path pays off when at least 1/8 of the prefix is read.
WORTH_IT = 8
CHUNK_RECORDS = 65536  # payloads are cut in chunks, so a long read never holds them all at once


def index_path(journal: Path) -> Path:
    return journal.with_name(journal.name + ".idx")


def seal_path(journal: Path) -> Path:
    return journal.with_name(journal.name + ".seal")


class Seal(NamedTuple):
    """What the writer vouched for at its last sync."""

    end: int  # the journal's end offset then
    records: int  # records in [magic, end)
    last_seq: int  # the seq of the last of them
    crc: int  # CRC-32 of the journal's bytes from the magic to ``end``


def _seal_bytes(end: int, records: int, last_seq: int, crc: int) -> bytes:
    fields = struct.pack("<8sQQQI", SEAL_MAGIC, end, records, last_seq, crc)
    return fields + struct.pack("<I", zlib.crc32(fields))


class IndexWriter:
    """The writer's side: collects offsets between syncs, then appends them and re-seals."""

    def __init__(self, journal: Path, offsets: array | None = None) -> None:
        """Start a fresh index; ``offsets`` are the records already in the journal (on reopen)."""
        self.journal = journal
        self._pending = array("Q")
        path = index_path(journal)
        head = INDEX_MAGIC
        if offsets is not None:
            head += offsets.tobytes() if offsets.itemsize == 8 else array("Q", offsets).tobytes()
        write_private(path, head)
        # Raw appends (no buffer): a failed one is cut off again, see seal().
        self._fd = open_private(path, os.O_WRONLY | os.O_APPEND)
        self._size = len(head)

    def add(self, offset: int) -> None:
        self._pending.append(offset)

    def seal(self, end: int, records: int, last_seq: int, crc: int) -> None:
        """Append the pending offsets, then record that ``records`` records, the last ``last_seq``,
        end at ``end`` with ``crc``.

        Called after the journal's fsync, so the sealed prefix is durable before the seal exists.
        A failed write (a full disk) leaves the index as it was and the offsets pending, for the
        next seal.
        """
        if self._pending:
            data = self._pending.tobytes()
            try:
                written = os.write(self._fd, data)
                if written != len(data):
                    raise OSError(errno.ENOSPC, "short write to the journal index")
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, self._size)
                raise
            self._size += len(data)
            self._pending = array("Q")
        write_private(seal_path(self.journal), _seal_bytes(end, records, last_seq, crc))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


def read_seal(journal: Path) -> Seal | None:
    """The journal's seal, if there is one and it is intact (a seal of an older version: None)."""
    try:
        data = seal_path(journal).read_bytes()
    except OSError:
        return None
    if len(data) != SEAL.size:
        return None
    magic, end, records, last_seq, crc, own_crc = SEAL.unpack(data)
    if magic != SEAL_MAGIC or zlib.crc32(data[:-4]) != own_crc:
        return None
    return Seal(end, records, last_seq, crc)


def _u32_at(buffer: mmap.mmap, limit: int, positions: np.ndarray) -> np.ndarray:
    """Little-endian u32s at arbitrary byte positions of ``buffer[:limit]``.

    Through a view with a stride of one byte (a u32 starting at every byte): one gather, no
    per-alignment passes. The view is dropped before returning so the map can be closed.
    """
    import numpy as np

    every_byte = np.ndarray(shape=(limit - 3,), dtype="<u4", buffer=buffer, offset=0, strides=(1,))
    values = every_byte[positions]
    del every_byte
    return values


class SealedPrefix:
    """A journal's verified sealed prefix: where each record is, without walking the records."""

    def __init__(self, mapped: mmap.mmap, end: int, offsets: np.ndarray, seqs: np.ndarray) -> None:
        self.mapped = mapped
        self.end = end
        self.offsets = offsets
        self.seqs = seqs

    def payloads(self, since: int, start_offset: int) -> Iterator[tuple[int, bytes]]:
        """``(seq, payload)`` for sealed records with seq > ``since`` at or after ``start_offset``."""
        import numpy as np

        first = max(int(np.searchsorted(self.seqs, since, side="right")),
                    int(np.searchsorted(self.offsets, start_offset, side="left")))
        mapped = self.mapped
        for begin in range(first, len(self.offsets), CHUNK_RECORDS):
            offsets = self.offsets[begin : begin + CHUNK_RECORDS]
            following = self.offsets[begin + 1 : begin + CHUNK_RECORDS + 1].tolist()
            if len(following) < len(offsets):
                following.append(self.end)
            starts = (offsets + HEADER_SIZE).tolist()
            payloads = [mapped[a:b] for a, b in zip(starts, following, strict=True)]
            yield from zip(self.seqs[begin : begin + CHUNK_RECORDS].tolist(), payloads, strict=True)

    def close(self) -> None:
        self.mapped.close()


def open_sealed(journal: Path, magic_size: int, begin: int = 0) -> SealedPrefix | None:
    """The journal's sealed prefix, verified against the seal and the index; None if unusable.

    None means "read record by record": no seal or index, a seal that does not match the
    journal's bytes, or an index that does not match the records' own headers. Also None
    when the caller reads only from ``begin`` on and that is a small part of the prefix: the
    seal's CRC covers the whole prefix, and walking a short stretch costs less than that.
    """
    seal = read_seal(journal)
    if seal is None:
        return None
    end, records, _last_seq, crc = seal
    if (end - begin) * WORTH_IT < end - magic_size:
        return None
    try:
        import numpy as np

        index = index_path(journal).read_bytes()
        with open(journal, "rb") as handle:
            if records == 0 or end <= magic_size or end > handle.seek(0, 2):
                return None
            # Only [0, end) is mapped and touched: the writer never cuts below a synced end,
            # so a concurrent reopen that trims a torn tail cannot pull pages from under us.
            mapped = mmap.mmap(handle.fileno(), end, access=mmap.ACCESS_READ)
    except (OSError, ImportError, ValueError):
        return None
    try:
        with memoryview(mapped) as whole, whole[magic_size:end] as body:
            intact = zlib.crc32(body) == crc
        if not intact or not index.startswith(INDEX_MAGIC) or (len(index) - len(INDEX_MAGIC)) // 8 < records:
            raise ValueError("seal or index does not match the journal")
        offsets = np.frombuffer(index, dtype="<u8", offset=len(INDEX_MAGIC), count=records).astype(np.int64)
        if offsets[0] != magic_size or not bool(np.all(offsets[1:] > offsets[:-1])) or offsets[-1] + HEADER_SIZE > end:
            raise ValueError("index out of order")
        lengths = _u32_at(mapped, end, offsets).astype(np.int64)
        ends = offsets + HEADER_SIZE + lengths
        if ends[-1] != end or not np.array_equal(ends[:-1], offsets[1:]):
            raise ValueError("index does not follow the records' lengths")
        # The CRC says these are the writer's bytes and the writer appends seqs one by one
        # (JournalWriter.append), so the first header's seq gives every seq.
        first_seq = struct.unpack_from("<Q", mapped, magic_size + 8)[0]
        seqs = first_seq + np.arange(records, dtype=np.int64)
    except ValueError:
        mapped.close()
        return None
    return SealedPrefix(mapped, end, offsets, seqs)
