"""Where a run's sockets live: a private directory (mode 0700, like tmux's) of short ipc paths.

No mlx import here; clients use it to find a local run's sockets.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

IPC_PATH_LIMIT = 103 if sys.platform == "darwin" else 107
"""Longest unix-socket path (sun_path minus the NUL): 104 / 108 bytes with it."""


def socket_dir() -> Path:
    """$TUNETOP_SOCKET_DIR, else $XDG_RUNTIME_DIR/tunetop, else /tmp/tunetop-UID; created 0700."""
    if env := os.environ.get("TUNETOP_SOCKET_DIR"):
        path = Path(env)
    elif runtime := os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(runtime) / "tunetop"
    else:
        path = Path(tempfile.gettempdir()) / f"tunetop-{os.getuid()}"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        # Someone else's or world-readable: refuse, a stranger could listen in or steer the run.
        os.chmod(path, 0o700) if info.st_uid == os.getuid() else None
        if path.stat().st_mode & 0o077 or info.st_uid != os.getuid():
            raise PermissionError(f"{path}: socket directory must be owned by you with mode 0700")
    return path


@dataclass(frozen=True)
class Endpoints:
    """The two ipc endpoints of one run: PUB for live events, ROUTER for commands and replay."""

    events: str
    commands: str

    @property
    def paths(self) -> tuple[Path, Path]:
        return Path(self.events.removeprefix("ipc://")), Path(self.commands.removeprefix("ipc://"))


def endpoints_for(run_id: str, directory: Path | None = None) -> Endpoints:
    """Endpoints for a run id; names fall back to a short hash when the path would be too long."""
    directory = directory or socket_dir()
    stem = run_id
    if len(str(directory / f"{stem}.cmd")) > IPC_PATH_LIMIT:
        stem = hashlib.sha1(run_id.encode()).hexdigest()[:12]
    if len(str(directory / f"{stem}.cmd")) > IPC_PATH_LIMIT:
        raise OSError(
            f"socket directory {directory} is too long for an ipc path ({IPC_PATH_LIMIT} bytes); "
            "set TUNETOP_SOCKET_DIR to a shorter folder."
        )
    return Endpoints(events=f"ipc://{directory / stem}.pub", commands=f"ipc://{directory / stem}.cmd")
