"""The engine's event stream: number each event, journal it, then hand it to live subscribers.

The journal write comes first and is the source of truth; subscribers (the ZeroMQ server, the
console, TensorBoard) get the event afterwards and may drop it without loss, since clients can
always replay from the journal. When the journal cannot be written (a full disk), events keep
their seq numbers and are held in memory, in order, until ``retry`` writes them: subscribers
see an event only once it is journaled, so what clients see stays gap-free and replayable.
Write failures (the journal's or a subscriber's) go to ``on_trouble``, which pauses the run.
No mlx import here.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

from tunetop.control.history import write_digest
from tunetop.control.journal import JournalWriter
from tunetop.control.protocol import encode, make_event

Subscriber = Callable[[dict[str, Any], bytes], None]
Trouble = Callable[[str, OSError], None]
"""Told what could not be written (a file or a subscriber's name) and why."""

SYNC_TYPES = frozenset({"run_started", "save", "state", "finished", "error", "validation"})
"""Events after which the journal is fsynced at once; others are synced at most once a second."""

UNSYNCED_TYPES = frozenset({"system"})
"""Events that never cost an fsync of their own: readings of the machine every few seconds (an
fsync took 15 ms on a busy disk, on the loop's thread). The next event that syncs takes them
along; a crash of the engine loses none of them (they are written), a crash of the machine at
most those since."""


class EventLog:
    """Assigns gap-free seq numbers, journals every event, and fans it out to subscribers."""

    def __init__(self, run_id: str, journal: JournalWriter) -> None:
        self.run_id = run_id
        self.journal = journal
        self.subscribers: list[Subscriber] = []
        self.on_trouble: Trouble | None = None
        self._lock = threading.Lock()
        self._last_sync = time.monotonic()
        self._sync_due = False
        self._held: list[tuple[dict[str, Any], bytes]] = []  # numbered, not yet journaled

    @property
    def last_seq(self) -> int:
        """The last seq in the journal (held events come after it)."""
        return self.journal.last_seq

    @property
    def held(self) -> int:
        """Events numbered but not yet journaled (the journal could not be written)."""
        return len(self._held)

    def emit(self, type_: str, **fields: Any) -> dict[str, Any]:
        """Record one event and deliver it; returns the event (held, if it cannot be journaled yet)."""
        with self._lock:
            event = make_event(self.run_id, self.journal.last_seq + len(self._held) + 1, type_, **fields)
            self._held.append((event, encode(event)))
            self._sync_due = self._sync_due or type_ in SYNC_TYPES
            written, error = self._write_held(timed_sync=type_ not in UNSYNCED_TYPES)
        self._deliver(written)
        if error is not None:
            self._report(error.filename or self.journal.path.name, error)
        return event

    def retry(self) -> bool:
        """Journal the held events and sync; True when nothing is held or unsynced any more."""
        with self._lock:
            self._sync_due = True
            written, error = self._write_held()
        self._deliver(written)
        return error is None

    def _write_held(self, timed_sync: bool = True) -> tuple[list[tuple[dict[str, Any], bytes]], OSError | None]:
        """Append held events in order, then sync if due (``timed_sync``: or if the last sync is a
        second old); stops at the first failed write."""
        written = []
        try:
            while self._held:
                event, payload = self._held[0]
                self.journal.append(event, payload)
                written.append(self._held.pop(0))
            now = time.monotonic()
            if self._sync_due or (timed_sync and now - self._last_sync > 1.0):
                self.journal.sync()
                self._sync_due = False
                self._last_sync = now
        except OSError as error:
            if written or self._held:
                self._sync_due = True  # what was written still wants its fsync
            return written, error
        return written, None

    def _deliver(self, written: list[tuple[dict[str, Any], bytes]]) -> None:
        for event, payload in written:
            for subscriber in list(self.subscribers):
                try:
                    subscriber(event, payload)
                except OSError as error:  # a full disk under TensorBoard or the log: pause, not crash
                    self._report(error.filename or _name(subscriber), error)

    def _report(self, what: str, error: OSError) -> None:
        if self.on_trouble is not None:
            self.on_trouble(str(what), error)
        else:
            raise error

    def snapshot(self) -> tuple[int, int]:
        """(last seq, journal end offset), taken together: what a replay may send."""
        with self._lock:
            return self.journal.last_seq, self.journal.end_offset

    def write_digest(self) -> None:
        """Save the journal's history digest beside it (tunetop.control.history), consistent with the journal."""

        history = self.journal.history
        if history is None:
            return
        with self._lock:
            self.journal.sync()
            write_digest(history, self.journal.path, self.journal.end_offset)

    def close(self) -> None:
        with contextlib.suppress(OSError):  # a cache: a full disk must not stop the journal closing
            self.write_digest()
        self.journal.close()


def _name(subscriber: Subscriber) -> str:
    owner = getattr(subscriber, "__self__", subscriber)
    return str(getattr(owner, "name", type(owner).__name__))
