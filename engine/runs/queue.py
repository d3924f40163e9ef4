"""The run queue: configs waiting their turn, in order, and what became of each, in one durable file.

The queue of a state folder is ``$TUNETOP_HOME/queue/queue.json``. Every change is a
read-modify-write under an flock (``queue.lock``, held for milliseconds) ending in an atomic
replace (tunetop.atomic: temp file, fsync, rename, fsync of the folder), so the CLI, the TUI and
the scheduler (tunetop.runs.scheduler) edit it side by side, and a kill at any point leaves
either the old queue or the new one.

An entry goes through one state machine, each step written here before it is acted on:

    pending --(the scheduler reserves a run id)--> starting --(its engine trains)--> running
    running --(the engine ends)--> done | failed
    pending --(queue rm, the TUI's cancel)--> removed

``starting`` holds the run id before the run folder or the engine exist, so a crash at any point
after it finds the same run again, never a second one; the scheduler's ``settle`` gives each
state its one recovery. No mlx import here: the CLI and the TUI edit the queue.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tunetop.atomic import write_bytes_atomic
from tunetop.private import open_private, private_dir
from tunetop.runs.folders import make_state_private, state_home
from tunetop.training import config as config_module
from tunetop.training.config import RunConfig

FORMAT_VERSION = 1

PENDING, STARTING, RUNNING, DONE, FAILED = "pending", "starting", "running", "done", "failed"
ACTIVE = (STARTING, RUNNING)
"""States in which an entry has a run id and the scheduler watches its engine."""
ENDED = (DONE, FAILED)

MAX_PARALLEL = 64


class QueueError(ValueError):
    """A queue command that cannot be done (unknown entry, a move past the end...); the message says why."""


@dataclass
class Entry:
    """One queued config and its fate. ``config`` is the validated TOML text (paths made absolute
    when it was added), so editing or deleting the file afterwards changes nothing queued."""

    id: int
    name: str
    config: str
    source: str = ""
    state: str = PENDING
    run: str = ""  # the run id, reserved when the entry leaves pending
    sweep: str = ""
    added: float = 0.0
    started: float = 0.0
    ended: float = 0.0
    reason: str = ""  # the run's finished reason (completed, stopped...), or why it failed
    error: str = ""  # a failed run's own error line
    starts: int = 0  # engines started for it (a resume after a crash is one more)
    deaths: int = 0  # engines that died without a word and without progress, in a row
    progress: int = 0  # the latest checkpoint's iteration when the last engine started

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Entry:
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in raw.items() if key in known})


@dataclass
class Queue:
    """The whole file: entries in queue order (the order pending ones start in), and its switches."""

    entries: list[Entry] = field(default_factory=list)
    paused: bool = False
    parallel: int = 1
    next_id: int = 1

    def find(self, spec: str | int) -> Entry:
        """An entry by its number, or by its run's id or name (the latest of that name)."""
        text = str(spec).strip().lstrip("#")
        if text.isdigit():
            for entry in self.entries:
                if entry.id == int(text):
                    return entry
        matches = [e for e in self.entries if text and (e.run == text or e.name == text)]
        if not matches:
            raise QueueError(f"no queue entry '{spec}'. `tunetop queue` lists them with their numbers.")
        return matches[-1]

    def pending(self) -> list[Entry]:
        return [e for e in self.entries if e.state == PENDING]

    def active(self) -> list[Entry]:
        return [e for e in self.entries if e.state in ACTIVE]

    def add(self, cfg: RunConfig, source: str = "", sweep: str = "") -> Entry:
        entry = Entry(self.next_id, cfg.name, config_module.dumps(cfg), source, sweep=sweep, added=time.time())
        self.next_id += 1
        self.entries.append(entry)
        return entry

    def remove(self, spec: str | int) -> Entry:
        """Take a pending entry out (cancel it), or forget an ended one (its run stays)."""
        entry = self.find(spec)
        if entry.state in ACTIVE:
            raise QueueError(
                f"queue entry {entry.id} ({entry.name}) is {entry.state} as run {entry.run}: the queue does not end "
                f"runs. `tunetop stop {entry.run}` saves and ends it (the queue then records it done)."
            )
        self.entries.remove(entry)
        return entry

    def move(self, spec: str | int, steps: int) -> Entry:
        """Move a pending entry ``steps`` places among the pending ones (negative: earlier)."""
        entry = self.find(spec)
        if entry.state != PENDING:
            raise QueueError(f"queue entry {entry.id} ({entry.name}) is {entry.state}; only pending entries can move.")
        pending = self.pending()
        here = pending.index(entry)
        there = max(0, min(len(pending) - 1, here + steps))
        if there != here:
            # Pending entries keep their slots in the whole list; only their order among themselves changes.
            slots = [i for i, e in enumerate(self.entries) if e.state == PENDING]
            pending.insert(there, pending.pop(here))
            for slot, moved in zip(slots, pending, strict=True):
                self.entries[slot] = moved
        return entry

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "paused": self.paused,
            "parallel": self.parallel,
            "next_id": self.next_id,
            "entries": [asdict(e) for e in self.entries],
        }


def queue_dir() -> Path:
    """$TUNETOP_HOME/queue (0700): the queue file, its locks, the scheduler's log."""
    make_state_private()
    return private_dir(state_home() / "queue")


def queue_file() -> Path:
    return state_home() / "queue" / "queue.json"


def parse_queue(data: bytes, path: Path) -> Queue:
    """The queue in ``data`` (the bytes of ``path``); QueueError names the file when it cannot be read."""
    try:
        raw = json.loads(data)
        if not isinstance(raw, dict) or raw.get("version", 0) > FORMAT_VERSION:
            raise ValueError(f"format version {raw.get('version') if isinstance(raw, dict) else '?'} is not one this tunetop reads")
        return Queue(
            entries=[Entry.from_dict(e) for e in raw.get("entries", [])],
            paused=bool(raw.get("paused", False)),
            parallel=max(1, int(raw.get("parallel", 1))),
            next_id=int(raw.get("next_id", 1)),
        )
    except (ValueError, TypeError, AttributeError) as error:
        raise QueueError(
            f"{path}: cannot read the queue ({error}). tunetop writes it whole or not at all, so it was changed by "
            "hand or by another program: fix it, or move it aside (the runs it started stay) and queue the "
            "waiting configs again."
        ) from None


def load_queue() -> Queue:
    """The queue as it is now, for reading (an empty one when there is none yet)."""
    path = queue_file()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return Queue()
    return parse_queue(data, path)


@contextlib.contextmanager
def edit_queue() -> Iterator[Queue]:
    """The queue for a change, under the edit lock; written back (atomically) if the block changed
    it and raised nothing."""
    folder = queue_dir()
    fd = open_private(folder / "queue.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        queue = load_queue()
        before = queue.to_dict()
        yield queue
        after = queue.to_dict()
        if after != before:
            write_bytes_atomic(queue_file(), json.dumps(after, indent=1).encode("utf-8"))
    finally:
        os.close(fd)  # closing releases the flock


def add_configs(configs: list[RunConfig], sources: list[str], sweep: str = "") -> list[Entry]:
    """Queue already-validated configs, all or none (one write)."""
    with edit_queue() as queue:
        return [queue.add(cfg, source, sweep) for cfg, source in zip(configs, sources, strict=True)]


def set_parallel(queue: Queue, parallel: int) -> None:
    if not 1 <= parallel <= MAX_PARALLEL:
        raise QueueError(f"--parallel must be between 1 and {MAX_PARALLEL}, got {parallel}.")
    queue.parallel = parallel
