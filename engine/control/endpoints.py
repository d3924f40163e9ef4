"""Where a run's sockets live: a private directory (mode 0700, like tmux's) of short ipc paths.

No mlx import here; clients use it to find a local run's sockets.
"""

from __future__ import annotations

import hashlib
import os
import stat
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
    _check_ancestors(path, elsewhere)
    return path


def _check_ancestors(path: Path, elsewhere: str) -> None:
    """Refuse a socket folder inside a folder another user may rename things in.

    A private folder is only private while nobody else can move it aside: the owner of a parent
    (or anyone, where a parent is writable by others without the sticky bit, as /tmp has) could
    rename ours away and put a folder of theirs, with sockets that pose as the engine, in its place.
    """
    me = os.getuid()
    for parent in path.resolve().parents:
        info = parent.stat()
        loose = info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX
        if info.st_uid not in (0, me) or loose:
            owner = _user(info.st_uid)
            raise SocketDirError(
                f"the socket folder {path} lies in {parent}, which {owner} "
                f"{'owns' if info.st_uid not in (0, me) else 'and others can write to'}: they could move "
                f"the socket folder aside and pose as your runs' engines. {elsewhere[0].upper()}{elsewhere[1:]}."
            )


def check_endpoint(endpoint: str) -> None:
    """Refuse to talk to an ipc socket that is not this user's, in a folder that is not private.

    A client sends commands (and sample prompts) to these sockets: one that someone else bound
    would receive them and could answer as if it were the engine.
    """
    if not endpoint.startswith("ipc://"):
        return  # TCP endpoints are authenticated by CURVE keys instead (curve.py)
    socket_path = Path(endpoint.removeprefix("ipc://"))
    me = os.getuid()
    for checked in (socket_path.parent, socket_path):
        try:
            info = checked.lstat() if checked == socket_path else checked.stat()
        except FileNotFoundError:
            return  # nothing bound there yet: the connection simply finds no engine
        if info.st_uid != me or (checked == socket_path.parent and info.st_mode & 0o077):
            raise SocketDirError(
                f"{checked} belongs to {_user(info.st_uid)} or is not private (mode "
                f"{stat.S_IMODE(info.st_mode):o}): it may not be your run's engine, so tunetop will not "
                "send it commands. Stop the run's engine with `kill` on its pid (tunetop ls) if needed, "
                "and set TUNETOP_SOCKET_DIR to a private folder of yours."
            )


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
