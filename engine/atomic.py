"""Crash-safe file writes: temp file, fsync, rename, fsync of the folder.

A reader (or a resumed run) sees either the old file or the new one, never a torn mix.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from .faults import point


def fsync_file(handle_fd: int) -> None:
    """fsync, with F_FULLFSYNC on macOS, where plain fsync does not reach the platter."""
    if sys.platform == "darwin":
        import fcntl

        try:
            fcntl.fcntl(handle_fd, fcntl.F_FULLFSYNC)  # type: ignore[attr-defined]
            return
        except OSError:
            pass
    os.fsync(handle_fd)


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(temp_path)`` to produce the content, then move it over ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temp name keeps the real suffix: some writers (mx.save_safetensors) append theirs otherwise.
    # It carries the writer's pid, so a cleanup can tell a dead writer's leftovers (remove_stale_temps).
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    temp = Path(temp_name)
    try:
        write(temp)
        with open(temp, "rb+") as handle:
            fsync_file(handle.fileno())
        step = re.sub(r"\d+", "N", path.name)  # one name for every numbered copy, as tests target it
        point(f"atomic {step}: temp written")
        os.replace(temp, path)
        point(f"atomic {step}: replaced")
        fsync_dir(path.parent)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``."""
    def write(temp: Path) -> None:
        temp.write_bytes(data)

    write_atomic(path, write)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Atomically replace ``path`` with UTF-8 ``text``."""
    write_bytes_atomic(path, text.encode("utf-8"))


# write_atomic's temp names: "." + the file's name + "." + the writer's pid + "." + mkstemp's 8
# characters + ".tmp" + the file's suffix. Names of older versions lack the pid.
_TEMP = re.compile(r"^\.(?P<name>.+?)\.(?:(?P<pid>\d+)\.)?[a-z0-9_]{8}\.tmp(?:\.[^.]+)?$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Delete write_atomic's temp files in ``directory`` left by writers that died (a kill mid-write).

    For a folder only one process writes to, called by that process while it holds the run's
    lock and before it writes: a temp file whose pid is this process or a dead one cannot
    belong to a live writer; one of another live process is left alone. Returns what went.
    """
    directory = Path(directory)
    removed: list[Path] = []
    try:
        entries = list(directory.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP.match(entry.name)
        if match is None or not entry.is_file():
            continue
        pid = match.group("pid")
        if pid is not None and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        try:
            entry.unlink()
            removed.append(entry)
        except FileNotFoundError:
            pass
    return removed
