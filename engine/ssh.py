"""ssh to another machine: parse ``user@host[:port]``, the ssh command line, run ``tunetop`` there.

The one home of the ssh command tunetop uses, for remote attach and ``ls HOST`` (tui.remote,
cli) and for distributed ranks on other hosts (engine.distributed), so ~/.ssh/config, agents,
ProxyJump and ControlMaster apply the same way everywhere. No mlx import here.

Environment: ``TUNETOP_SSH`` is the ssh command with any options (default ``ssh``);
``TUNETOP_REMOTE_TUNETOP`` is the command that runs tunetop on the remote side (default
``tunetop``).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from dataclasses import dataclass


class RemoteError(RuntimeError):
    """A remote attach that cannot go ahead; the message says why and what to check."""


@dataclass(frozen=True)
class RemoteTarget:
    """``user@host[:port]`` and, for attach, the run (empty = the remote's latest)."""

    host: str
    user: str = ""
    port: int | None = None
    run: str = ""

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    def __str__(self) -> str:
        port = f":{self.port}" if self.port else ""
        return f"{self.destination}{port}"


def is_remote(spec: str | None) -> bool:
    """Run ids and names hold no ':' or '@'; anything that does names a host."""
    return bool(spec) and (":" in spec or "@" in spec)  # type: ignore[operator]


def parse_target(spec: str, with_run: bool = True) -> RemoteTarget:
    """``user@host[:port]:RUN`` for attach (``host:RUN``, ``host:`` = latest), ``user@host[:port]`` for ls."""
    parts = spec.split(":")
    destination = parts[0]
    user, _, host = destination.rpartition("@")
    rest = parts[1:]
    port: int | None = None
    run = ""
    if with_run:
        if len(rest) == 2 and rest[0].isdigit():
            port, run = int(rest[0]), rest[1]
        elif len(rest) == 1:
            run = rest[0]
        elif rest:
            host = ""
    else:
        if len(rest) == 1 and rest[0].isdigit():
            port = int(rest[0])
        elif rest:
            host = ""
    if not host or not re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+", host) or (user and not re.fullmatch(r"[A-Za-z0-9_.\-]+", user)):
        form = "user@host[:port]:RUN" if with_run else "user@host[:port]"
        raise RemoteError(f"'{spec}' is not {form} (for example alice@gpu1:2222:my-run).")
    return RemoteTarget(host, user, port, run)


def ssh_command(destination: str, port: int | None = None) -> list[str]:
    """``ssh [options] [-p PORT] DESTINATION``, never asking for a password (``TUNETOP_SSH`` overrides ssh)."""
    command = shlex.split(os.environ.get("TUNETOP_SSH", "ssh"))
    command += ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]
    if port:
        command += ["-p", str(port)]
    return [*command, destination]


def ssh_base(target: RemoteTarget) -> list[str]:
    """The ssh command line that reaches ``target``."""
    return ssh_command(target.destination, target.port)


def remote_tunetop() -> list[str]:
    """The command that runs tunetop on the remote side (``TUNETOP_REMOTE_TUNETOP``, default ``tunetop``)."""
    return shlex.split(os.environ.get("TUNETOP_REMOTE_TUNETOP", "tunetop"))


def explain_ssh_failure(target: RemoteTarget, code: int, stderr: str) -> str:
    """One paragraph for the ways ssh or the remote tunetop fail."""
    text = stderr.strip().splitlines()
    last = text[-1] if text else ""
    lowered = stderr.lower()
    if "permission denied" in lowered or "authentication" in lowered:
        return (f"ssh to {target} was refused: authentication failed ({last}). Check that your key is in the "
                "remote ~/.ssh/authorized_keys and loaded in your agent (ssh-add -l), or set the identity in ~/.ssh/config.")
    if code == 255 or "could not resolve" in lowered or "connection refused" in lowered or "timed out" in lowered:
        return (f"cannot reach {target}: {last or 'ssh exited with 255'}. Check the host name, the port and the "
                "network; `ssh " + str(target) + "` must work on its own first.")
    if code == 127 or "command not found" in lowered or "no such file" in lowered:
        return (f"tunetop is not installed on {target} (or not on the PATH of a non-interactive shell): {last}. "
                "Install it there, or set TUNETOP_REMOTE_TUNETOP to its full path (e.g. ~/tunetop/.venv/bin/tunetop).")
    return f"the remote tunetop on {target} failed (exit {code}): {last}"


def run_remote(target: RemoteTarget, args: list[str], timeout: float = 30.0) -> str:
    """Run ``tunetop ARGS`` on the remote side; RemoteError with an explanation on failure."""
    command = [*ssh_base(target), shlex.join([*remote_tunetop(), *args])]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise RemoteError(f"cannot reach {target}: no answer within {timeout:.0f}s.") from None
    except FileNotFoundError:
        raise RemoteError("the ssh client is not installed here (install openssh-client).") from None
    if result.returncode != 0:
        if result.returncode == 2 and result.stderr.startswith("tunetop:"):
            raise RemoteError(f"{target}: {result.stderr.strip().removeprefix('tunetop: ')}")
        raise RemoteError(explain_ssh_failure(target, result.returncode, result.stderr))
    return result.stdout
