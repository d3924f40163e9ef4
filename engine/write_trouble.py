"""Writes that fail (a full disk): what failed, what waits, and when to try again.

The engine pauses the run at the first failed write (journal, status, digest, TensorBoard, a
checkpoint), keeps what could not be written in memory, says so once, and every few seconds
checks whether there is room again; when there is and every held write succeeds, it resumes
on its own (unless the user had paused it). This module holds that bookkeeping and its words;
engine.session does the pausing. No mlx import here.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

POLL_SECONDS = 2.0
"""How often a paused engine checks for room again."""

ROOM_BYTES = 256 * 1024
"""Free space needed before held writes are tried again: a disk with a few bytes free would
accept one record and refuse the next, pausing and resuming the run over and over."""


def free_bytes(path: Path) -> int | None:
    """Bytes this process may still write on ``path``'s filesystem (None if it cannot be told)."""
    for candidate in (path, *path.parents):
        try:
            info = os.statvfs(candidate)
        except FileNotFoundError:
            continue
        except OSError:
            return None
        blocks = info.f_bfree if os.geteuid() == 0 else info.f_bavail  # root may use the reserved blocks
        return blocks * info.f_frsize
    return None


def reason(error: BaseException) -> str:
    """The error in a few words ("No space left on device")."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error)


@dataclass
class WriteTrouble:
    """Everything that failed to be written since the run paused for it."""

    what: str  # the first file (or writer) that could not be written
    why: str
    auto_resume: bool  # the engine paused the run for this: resume when it clears
    since: float = field(default_factory=time.time)
    failed: list[str] = field(default_factory=list)
    room_needed: int = ROOM_BYTES  # more while a checkpoint waits to be written again
    last_try: float = field(default_factory=time.monotonic)
    ended: bool = False  # the run is over: the engine only waits to write what it holds, then exits
    save_iteration: int | None = None  # a save that failed for want of room: written again first

    def add(self, what: str) -> None:
        if what != self.what and what not in self.failed:
            self.failed.append(what)

    def due(self) -> bool:
        """Time for another look (every POLL_SECONDS)."""
        return time.monotonic() - self.last_try >= POLL_SECONDS

    def notice(self, held: int) -> str:
        """The one line that says what happened and what the engine does about it."""
        also = f" (also {', '.join(self.failed)})" if self.failed else ""
        kept = f"{held} event(s) wait in memory for the journal; " if held else ""
        every = f"(checked every {POLL_SECONDS:.0f} s)"
        if self.ended:
            return (
                f"cannot write {self.what}{also}: {self.why}. The run has ended; {kept}the engine writes them "
                f"when there is room again {every}, then exits. Free some space."
            )
        then = "resumes by itself" if self.auto_resume else "stays paused (you paused it)"
        return (
            f"cannot write {self.what}{also}: {self.why}. The run is paused and nothing written so far is "
            f"lost; {kept}everything held is written when there is room again {every}, and the run then "
            f"{then}. Free some space, or `tunetop resume` to retry now."
        )

    def recovered(self, held: int, saved: int | None) -> str:
        """The line logged once the held writes succeeded."""
        seconds = time.time() - self.since
        parts = [f"writes succeed again after {seconds:.0f} s ({self.what}: {self.why})"]
        if held:
            parts.append(f"{held} event(s) held in memory are now in the journal")
        if saved is not None:
            parts.append(f"the save at iteration {saved} is written")
        return "; ".join(parts)
