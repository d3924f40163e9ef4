"""Crash-safe file writes: temp file, fsync, rename, fsync of the folder.

A reader (or a resumed run) sees either the old file or the new one, never a torn mix.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path


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
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    temp = Path(temp_name)
    try:
        write(temp)
        with open(temp, "rb+") as handle:
            fsync_file(handle.fileno())
        os.replace(temp, path)
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
