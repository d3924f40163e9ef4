"""The engine's event stream: number each event, journal it, then hand it to live subscribers.

The journal write comes first and is the source of truth; subscribers (the ZeroMQ server, the
console) get the event afterwards and may drop it without loss, since clients can always
replay from the journal. No mlx import here.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

from .journal import JournalWriter
from .protocol import encode, make_event

Subscriber = Callable[[dict[str, Any], bytes], None]

SYNC_TYPES = frozenset({"run_started", "save", "state", "finished", "error", "validation"})
"""Events after which the journal is fsynced at once; others are synced at most once a second."""


class EventLog:
    """Assigns gap-free seq numbers, journals every event, and fans it out to subscribers."""

    def __init__(self, run_id: str, journal: JournalWriter) -> None:
        self.run_id = run_id
        self.journal = journal
        self.subscribers: list[Subscriber] = []
        self._lock = threading.Lock()
        self._last_sync = time.monotonic()

    @property
    def last_seq(self) -> int:
        return self.journal.last_seq

    def emit(self, type_: str, **fields: Any) -> dict[str, Any]:
        """Record one event and deliver it; returns the event."""
        with self._lock:
            event = make_event(self.run_id, self.journal.last_seq + 1, type_, **fields)
            payload = encode(event)
            self.journal.append(event, payload)
            now = time.monotonic()
            if type_ in SYNC_TYPES or now - self._last_sync > 1.0:
                self.journal.sync()
                self._last_sync = now
        for subscriber in list(self.subscribers):
            subscriber(event, payload)
        return event

    def snapshot(self) -> tuple[int, int]:
        """(last seq, journal end offset), taken together: what a replay may send."""
        with self._lock:
            return self.journal.last_seq, self.journal.end_offset

    def write_digest(self) -> None:
        """Save the journal's history digest beside it (engine.history), consistent with the journal."""
        from .history import write_digest

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
