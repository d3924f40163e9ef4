"""A bounded digest of a run's events, so a client attaches to a long run in well under a second.

A run of days journals millions of ``train`` events; a screen draws a few thousand points. The
digest keeps every event that is rare and matters whole (validations, saves, states, errors,
resumes...), the last ``recent`` train events whole (sparklines, "last N iterations"), and the
rest of the train events thinned evenly to at most ``max_points`` (halved again, twice the
stride, each time it fills up). ``system`` events (the machine, every few seconds: a day is
17,280 of them) are a series of their own, thinned the same way. Chatty types (logs, warnings, samples) keep their newest few
thousand. Events are kept as the journal's own payload bytes, in seq order, never decoded: the
event type is read from the payload's fixed prefix.

The engine feeds it every event as the journal takes it (:class:`tunetop.control.journal.JournalWriter`
calls :meth:`add`), and the server answers the ``history`` command with it; the client folds the
digest, then replays from its last seq as usual. No mlx import here.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from pathlib import Path

from tunetop.control.journal import MAGIC, Damage, frame, read_payloads, scan
from tunetop.private import write_private

TYPE_MARK = b'"type":"'

THINNED = (b"train", b"system")
"""Series: each type's events kept evenly spread (at most ``2 * max_points``) plus its newest ``recent`` whole."""

CAPPED = {"log": 2000, "warning": 2000, "sample": 1000, "nonfinite": 1000, "config_changed": 1000}
"""Chatty event types: only the newest this many are kept."""


def event_type(payload: bytes) -> bytes:
    """The ``type`` of an encoded event without decoding it (``protocol.encode`` puts it near the start)."""
    start = payload.find(TYPE_MARK, 0, 256)
    if start < 0:
        return b""
    start += len(TYPE_MARK)
    end = payload.find(b'"', start, start + 64)
    return payload[start:end] if end > 0 else b""


class _Series:
    """One thinned type: every ``stride``-th event (the stride doubling as it fills) and the newest whole."""

    def __init__(self, max_points: int, recent: int) -> None:
        self.max_points = max_points
        self.stride = 1
        self.seen = 0
        self.thinned: list[tuple[int, bytes]] = []
        self.recent: deque[tuple[int, bytes]] = deque(maxlen=recent)

    def add(self, seq: int, payload: bytes) -> None:
        self.recent.append((seq, payload))
        if self.seen % self.stride == 0:
            self.thinned.append((seq, payload))
            if len(self.thinned) >= 2 * self.max_points:
                self.thinned = self.thinned[::2]
                self.stride *= 2
        self.seen += 1


class History:
    """The digest; ``add`` is called for every journaled event in order, ``records`` reads it."""

    def __init__(self, max_points: int = 2048, recent: int = 1000) -> None:
        self.max_points = max_points
        self.upto = 0  # seq of the last event added
        self._series = {kind: _Series(max_points, recent) for kind in THINNED}
        self._whole: list[tuple[int, bytes]] = []
        self._capped: dict[bytes, deque[tuple[int, bytes]]] = {
            kind.encode(): deque(maxlen=limit) for kind, limit in CAPPED.items()
        }
        self._lock = threading.Lock()

    def add(self, seq: int, payload: bytes) -> None:
        kind = event_type(payload)
        with self._lock:
            self.upto = seq
            series = self._series.get(kind)
            if series is not None:
                series.add(seq, payload)
            elif kind in self._capped:
                self._capped[kind].append((seq, payload))
            elif kind != b"heartbeat":
                self._whole.append((seq, payload))

    def records(self) -> tuple[int, list[tuple[int, bytes]]]:
        """(the last seq covered, the kept events in seq order)."""
        with self._lock:
            kept: dict[int, bytes] = {}
            for series in self._series.values():
                kept.update(series.thinned)
                kept.update(series.recent)
            kept.update(self._whole)
            for queue in self._capped.values():
                kept.update(queue)
            upto = self.upto
        return upto, sorted(kept.items())


DIGEST_NAME = "history.ttj"
"""Beside the journal: the digest as of a journal offset, so a finished run opens without a full read."""


def write_digest(history: History, journal_path: Path, journal_end: int) -> None:
    """Save ``history`` (covering the journal up to byte ``journal_end``) beside the journal.

    Journal framing: a seq-0 record with where it stops, then the kept records. Derived data
    (the journal stays the truth), so a crash mid-write only costs the next reader a full read.
    """
    upto, records = history.records()
    header = json.dumps({"upto": upto, "journal_end": journal_end}).encode()
    data = MAGIC + frame(0, header) + b"".join(frame(seq, payload) for seq, payload in records)
    write_private(journal_path.with_name(DIGEST_NAME), data)  # a failed write leaves no partial temp file


def _saved_digest(journal_path: Path) -> tuple[int, int, list[tuple[int, bytes]]] | None:
    """(upto, journal_end, records) from the saved digest, or None when absent or unusable."""
    try:
        data = journal_path.with_name(DIGEST_NAME).read_bytes()
    except OSError:
        return None
    if not data.startswith(MAGIC):
        return None
    records = [(seq, payload) for _offset, seq, payload in scan(data)]
    if not records or records[0][0] != 0:
        return None
    try:
        meta = json.loads(records[0][1])
        return int(meta["upto"]), int(meta["journal_end"]), records[1:]
    except (ValueError, KeyError, TypeError):
        return None


def read_history(path: str | Path, damage: list[Damage] | None = None) -> tuple[int, list[tuple[int, bytes]]]:
    """The digest of a journal on disk: the saved one plus the records after it, or one full pass.

    No event is decoded either way. Damaged records read past are listed in ``damage``.
    """
    journal = Path(path)
    history = History()
    saved = _saved_digest(journal)
    if saved is not None:
        upto, journal_end, records = saved
        tail = list(read_payloads(journal, since=upto, start_offset=journal_end, damage=damage))
        # The tail must continue the digest exactly; anything else (a journal rewritten or cut
        # since) means the saved digest is stale: read everything instead.
        if journal.stat().st_size >= journal_end and (not tail or tail[0][0] == upto + 1):
            for seq, payload in tail:  # the saved part is thinned already: only the tail is
                history.add(seq, payload)
            tail_upto, tail_records = history.records()
            merged = dict(records)
            merged.update(tail_records)
            return (tail_upto if tail else upto), sorted(merged.items())
    if damage is not None:
        damage.clear()  # the tail's, read again below
    for seq, payload in read_payloads(journal, damage=damage):
        history.add(seq, payload)
    return history.records()
