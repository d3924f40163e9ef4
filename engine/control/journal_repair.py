"""Opening a damaged journal: every intact record kept, the damage set aside, no seq used twice.

:class:`tunetop.control.journal.JournalWriter` calls this when the journal it opens is not a clean run
of records (the magic, then seqs 1, 2, 3... to the end of the file):

- A torn tail only (bytes after the last intact record: a write cut short by a crash, a file
  cut by hand): the bytes are copied to ``journal.ttj.torn-OFFSET`` (fsynced), then cut off.
- Anything else (damaged bytes between intact records, a damaged magic, seqs missing or out of
  order): the journal is rewritten. The original file stays whole under a second name,
  ``journal.ttj.damaged-N`` (a hard link, so there is no moment without a journal and no copy);
  the new file holds the intact records byte for byte, in order, and in place of each missing
  seq a ``warning`` event saying that record was lost and where its bytes are; it is fsynced
  and renamed over the old name. The journal is then gap-free again for every reader (a
  client's seq check, the sealed fast path, ``tunetop events``).
- Seqs after the last intact record that were once written (the seal says so, or a whole but
  damaged last record) get the same placeholders, appended by the writer: a resumed run goes
  on after the highest seq ever written.

Nothing is deleted: good records stay, damaged bytes go to a side file. No mlx import here.
"""

from __future__ import annotations

import json
import os
import time
from array import array
from pathlib import Path
from typing import Any

from tunetop.atomic import fsync_dir, fsync_file, write_bytes_atomic
from tunetop.control.history import DIGEST_NAME
from tunetop.control.journal import HEADER, MAGIC, MAX_RECORD, Damage, frame
from tunetop.control.journal_index import Seal
from tunetop.control.protocol import make_event
from tunetop.private import open_private


def _side_file(path: Path, kind: str, offset: int) -> Path:
    """A name beside the journal that nothing has yet: journal.ttj.KIND-OFFSET[.N]."""
    candidate = path.with_name(f"{path.name}.{kind}-{offset}")
    number = 1
    while candidate.exists():
        candidate = path.with_name(f"{path.name}.{kind}-{offset}.{number}")
        number += 1
    return candidate


def _write_synced(path: Path, data: bytes) -> None:
    """``data`` into a new private file (0600, as the run's files: tunetop.private), fsynced."""
    with os.fdopen(open_private(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "wb") as handle:
        handle.write(data)
        handle.flush()
        fsync_file(handle.fileno())


def _field(data: bytes, offset: int, name: str) -> Any:
    """A field of the intact record at ``offset`` (None if it has none)."""
    length = HEADER.unpack_from(data, offset)[0]
    try:
        return json.loads(data[offset + HEADER.size : offset + HEADER.size + length]).get(name)
    except (ValueError, AttributeError):
        return None


def run_id(path: Path, data: bytes, first_offset: int | None) -> str:
    """The run id in the record at ``first_offset``, else the run folder's name."""
    run = _field(data, first_offset, "run") if first_offset is not None else None
    return run if isinstance(run, str) else path.parent.name


def placeholder(run: str, seq: int, ts: float, message: str) -> dict[str, Any]:
    """The event that stands in for a lost record: a warning with the lost record's seq."""

    return make_event(run, seq, "warning", ts=ts, message=message)


def _seqs(first: int, last: int) -> str:
    return f"seq {first}" if first == last else f"seqs {first}-{last}"


def last_written(data: bytes, good_end: int, last_intact: int, seal: Seal | None) -> int:
    """The highest seq the journal is known to have held: its last intact record's, or more when
    the seal (written after each fsync) or a whole but damaged record after it says so.

    A claim is believed only as far as the missing bytes could have held records (16 bytes a
    header at least), so a stale seal can never make the writer jump far ahead.
    """
    known = last_intact
    if seal is not None and seal.last_seq > known:
        room = max(0, seal.end - good_end) // HEADER.size
        known = max(known, min(seal.last_seq, last_intact + room))
    if good_end + HEADER.size <= len(data):  # a whole record there whose CRC fails: it was written
        length, _crc, seq = HEADER.unpack_from(data, good_end)
        if seq == last_intact + 1 and length <= MAX_RECORD and good_end + HEADER.size + length <= len(data):
            known = max(known, seq)
    return known


def repair(
    path: Path, data: bytes, offsets: array, seqs: array, damage: list[Damage], good_end: int, tail_only: bool
) -> tuple[bytes, list[str]]:
    """Mend the journal at ``path`` (its bytes ``data``, its intact records at ``offsets`` with
    ``seqs``; ``tail_only`` when the only fault is a torn tail); return its new bytes and what was
    done, as sentences for the run's log."""
    if tail_only:
        tail = data[good_end:]
        side = _side_file(path, "torn", good_end)
        write_bytes_atomic(side, tail)
        with open(path, "r+b") as handle:
            handle.truncate(good_end)
            fsync_file(handle.fileno())
        return data[:good_end], [
            f"{path.name}: cut a torn tail of {len(tail)} bytes at offset {good_end} (a write a crash cut "
            f"short); the bytes are kept in {side.name}."
        ]

    backup = _side_file(path, "damaged", int(time.time()))
    run = run_id(path, data, offsets[0] if offsets else None)
    parts = [MAGIC]
    previous, previous_offset, previous_end = 0, None, len(MAGIC)
    lost: list[tuple[int, int]] = []
    dropped = 0
    note = f"journal record {{}} was lost: its bytes were damaged (the damaged journal is kept as {backup.name})"
    for offset, seq in zip(offsets, seqs, strict=True):
        end = offset + HEADER.size + HEADER.unpack_from(data, offset)[0]
        # Every lost record took 16 bytes at least: a larger jump in seq is no loss but a bad seq.
        if seq <= previous or seq - previous - 1 > (offset - previous_end) // HEADER.size:
            dropped += 1
            continue
        if seq > previous + 1:
            ts = _field(data, offset if previous_offset is None else previous_offset, "ts")
            ts = ts if isinstance(ts, (int, float)) else time.time()  # the time of the last good one
            for missing in range(previous + 1, seq):
                event = placeholder(run, missing, ts, note.format(missing))
                parts.append(frame(missing, json.dumps(event, separators=(",", ":")).encode()))
            lost.append((previous + 1, seq - 1))
        parts.append(data[offset:end])
        previous, previous_offset, previous_end = seq, offset, end
    new = b"".join(parts)

    temp = path.with_name(path.name + ".repair")
    _write_synced(temp, new)
    try:
        os.link(path, backup)  # the damaged file keeps a name before the journal's name moves on
    except OSError:  # a file system without hard links
        _write_synced(backup, data)
    fsync_dir(path.parent)
    os.replace(temp, path)
    fsync_dir(path.parent)

    path.with_name(DIGEST_NAME).unlink(missing_ok=True)  # derived from the old bytes; rebuilt at close

    what = []
    if not data.startswith(MAGIC):
        what.append("a damaged magic")
    if damage:
        what.append(f"{len(damage)} unreadable stretch{'es' if len(damage) > 1 else ''} "
                    f"({sum(d.end - d.offset for d in damage)} bytes, from offset {damage[0].offset})")
    if good_end < len(data):
        what.append(f"{len(data) - good_end} unreadable bytes at the end")
    if dropped:
        what.append(f"{dropped} intact record{'s' if dropped > 1 else ''} out of order")
    missing_text = ", ".join(_seqs(a, b) for a, b in lost) if lost else "none"
    return new, [
        f"{path.name} was damaged ({'; '.join(what) or 'seqs out of order'}) and has been repaired: every "
        f"intact record is kept; records lost: {missing_text}, each replaced by a warning event. The damaged "
        f"file is kept whole as {backup.name}."
    ]


def lost_at_end(path: Path, first: int, last: int, run: str) -> tuple[list[dict[str, Any]], str]:
    """Placeholder events for seqs ``first``..``last``, written once and gone from the journal's end."""
    now = time.time()
    note = "journal record {} was lost: the journal ended before it (a cut file or a damaged last record)"
    events = [placeholder(run, seq, now, note.format(seq)) for seq in range(first, last + 1)]
    return events, (
        f"{path.name}: {_seqs(first, last)} had been written and are no longer in the journal; each is "
        f"replaced by a warning event, and new events continue from seq {last + 1}."
    )
