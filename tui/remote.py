"""Attach to a run on another machine through the system ``ssh``.

``user@host[:port]:RUN`` names a remote run. We ask the remote ``tunetop`` where the run's
sockets are (``tunetop _remote-info RUN`` prints JSON), then forward two private local unix
sockets to them with ``ssh -N -L local:remote`` (StreamLocalBindUnlink, ExitOnForwardFailure),
so ~/.ssh/config, agents, ProxyJump and ControlMaster all apply and no port opens anywhere.
The tunnel is watched and restarted with backoff when it dies; the client above it replays
only what it missed. No mlx import here.

Environment: ``TUNETOP_SSH`` is the ssh command with any options (default ``ssh``);
``TUNETOP_REMOTE_TUNETOP`` is the command that runs tunetop on the remote side (default
``tunetop``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.endpoints import Endpoints, socket_dir
from engine.protocol import PROTOCOL_VERSION
from engine.ssh import (
    RemoteError,
    RemoteTarget,
    explain_ssh_failure,
    is_remote,
    parse_target,
    remote_tunetop,
    run_remote,
    ssh_base,
)

__all__ = ["RemoteAttachment", "RemoteError", "RemoteTarget", "is_remote", "parse_target", "remote_info"]


def remote_info(target: RemoteTarget) -> dict[str, Any]:
    """Where the remote run's sockets are, checked for protocol version."""
    output = run_remote(target, ["_remote-info", target.run])
    try:
        info = json.loads(output.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise RemoteError(f"the remote tunetop on {target} answered something unexpected: {output[:200]!r}") from None
    if info.get("protocol") != PROTOCOL_VERSION:
        raise RemoteError(
            f"the tunetop on {target} speaks protocol {info.get('protocol')}, this one {PROTOCOL_VERSION}: "
            "install the same tunetop version on both machines."
        )
    return info


class Tunnel:
    """``ssh -N`` forwarding two local unix sockets to the remote run's sockets."""

    def __init__(self, target: RemoteTarget, remote: Endpoints) -> None:
        self.target = target
        self.remote = remote
        key = hashlib.sha1(f"{target}:{remote.events}".encode()).hexdigest()[:10]
        directory = socket_dir()
        self.local = Endpoints(events=f"ipc://{directory}/r-{key}.pub", commands=f"ipc://{directory}/r-{key}.cmd")
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    def command(self) -> list[str]:
        forwards: list[str] = []
        for local, remote in zip(self.local.paths, self.remote.paths, strict=True):
            forwards += ["-L", f"{local}:{remote}"]
        options = [
            "-N",
            "-o", "ExitOnForwardFailure=yes",
            "-o", "StreamLocalBindUnlink=yes",
            "-o", "StreamLocalBindMask=0177",
            "-o", "ServerAliveInterval=5",
            "-o", "ServerAliveCountMax=2",
        ]
        base = ssh_base(self.target)
        return [*base[:-1], *options, *forwards, base[-1]]

    def start(self, wait: float = 15.0) -> None:
        """Start ssh and wait until both local sockets exist."""
        for path in self.local.paths:
            path.unlink(missing_ok=True)
        self.process = subprocess.Popen(
            self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                stderr = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                raise RemoteError(explain_ssh_failure(self.target, self.process.returncode, stderr))
            if all(path.exists() for path in self.local.paths):
                return
            time.sleep(0.05)
        self.stop()
        raise RemoteError(f"the ssh tunnel to {self.target} did not come up within {wait:.0f}s.")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
        for path in self.local.paths:
            Path(path).unlink(missing_ok=True)

    async def supervise(self, on_status: Any = None) -> None:
        """Restart the tunnel with backoff whenever ssh exits (network drop, laptop sleep)."""
        backoff = 0.5
        while True:
            await asyncio.sleep(0.5)
            if self.alive():
                backoff = 0.5
                continue
            if on_status is not None:
                on_status("disconnected", f"ssh tunnel to {self.target} dropped; reconnecting")
            try:
                await asyncio.to_thread(self.start)
                self.restarts += 1
            except RemoteError as error:
                if on_status is not None:
                    on_status("disconnected", str(error))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)


@dataclass
class RemoteAttachment:
    """A remote run opened for the TUI: its info, and the tunnel when it is live."""

    target: RemoteTarget
    info: dict[str, Any]
    tunnel: Tunnel | None

    @property
    def alive(self) -> bool:
        return bool(self.info.get("alive"))

    @property
    def run_dir(self) -> Any:
        from engine.runs import RunDir

        # Only the id is used for a remote run; its folder lives on the other machine.
        return RunDir(Path("/nonexistent-remote") / str(self.info.get("run", "remote")))

    @classmethod
    def open(cls, spec: str) -> RemoteAttachment:
        target = parse_target(spec)
        info = remote_info(target)
        tunnel = None
        if info.get("alive"):
            tunnel = Tunnel(target, Endpoints(events=f"ipc://{info['events']}", commands=f"ipc://{info['commands']}"))
            tunnel.start()
        return cls(target, info, tunnel)

    def history_command(self) -> list[str]:
        """ssh command printing a finished remote run's journal as JSON lines."""
        return [*ssh_base(self.target), shlex.join([*remote_tunetop(), "events", "--digest", str(self.info["run"])])]

    def close(self) -> None:
        if self.tunnel is not None:
            self.tunnel.stop()
