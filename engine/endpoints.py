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


class SocketError(RuntimeError):
    """The engine's sockets cannot be set up or found safely; the message says how to fix it."""


class SocketDirError(SocketError):
    """A socket folder that is not private to this user."""


def socket_dir() -> Path:
    """$TUNETOP_SOCKET_DIR, else $XDG_RUNTIME_DIR/tunetop, else /tmp/tunetop-UID; created 0700.

    SocketDirError when the folder belongs to someone else (anyone could create
    /tmp/tunetop-UID first, to listen in) or cannot be made private.
    """
    if env := os.environ.get("TUNETOP_SOCKET_DIR"):
        path, knob = Path(env), "TUNETOP_SOCKET_DIR"
    elif runtime := os.environ.get("XDG_RUNTIME_DIR"):
        path, knob = Path(runtime) / "tunetop", "XDG_RUNTIME_DIR"
    else:
        path, knob = Path(tempfile.gettempdir()) / f"tunetop-{os.getuid()}", ""
    elsewhere = (
        f"set {knob} to another folder of yours" if knob else "set TUNETOP_SOCKET_DIR to a private folder of yours"
    )
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.stat()
        if info.st_uid == os.getuid() and info.st_mode & 0o077:
            os.chmod(path, 0o700)  # ours but loose (made by hand): tighten
            info = path.stat()
    except OSError as error:
        raise SocketDirError(
            f"cannot use {path} for the run's sockets: {error.strerror or error}. Fix its permissions, "
            f"or {elsewhere}."
        ) from None
    if info.st_uid != os.getuid():
        # Someone else's: they could listen to the run's events or steer it through the sockets.
        raise SocketDirError(
            f"the socket folder {path} belongs to {_user(info.st_uid)}, not to you ({_user(os.getuid())}): "
            f"whoever owns it could watch and steer your runs. Remove it (its owner or root can), or {elsewhere}."
        )
    if info.st_mode & 0o077:
        raise SocketDirError(f"the socket folder {path} must have mode 0700 and could not be made so; {elsewhere}.")
    return path


def _user(uid: int) -> str:
    import pwd

    try:
        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


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
        raise SocketError(
            f"socket directory {directory} is too long for an ipc path ({IPC_PATH_LIMIT} bytes); "
            "set TUNETOP_SOCKET_DIR to a shorter folder."
        )
    return Endpoints(events=f"ipc://{directory / stem}.pub", commands=f"ipc://{directory / stem}.cmd")
