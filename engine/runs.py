"""Run directories: where runs live, their ids, the lock, and finding them again.

A run is a folder under the state directory ($TUNETOP_HOME, else $XDG_STATE_HOME/tunetop,
else ~/.local/state/tunetop)/runs/RUN_ID holding config.toml, the journal, adapters/,
checkpoints/, engine.log, status.json and a lock file. The lock (flock) is held by the engine
for the run's life: it both stops a second engine from taking the run over and tells anyone
else whether the engine is alive. No mlx import here.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import adapter_path_problem
from .journal import JOURNAL_NAME


class RunError(LookupError):
    """A run that cannot be found or used; the message says which and why."""


def state_home() -> Path:
    """The root of tunetop's persistent state."""
    if env := os.environ.get("TUNETOP_HOME"):
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "tunetop"


def runs_root() -> Path:
    return state_home() / "runs"


def new_run_id() -> str:
    """Sortable by start time, unique without coordination: 20261129-101502-3fa9."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


@dataclass
class RunDir:
    """Paths inside one run's folder."""

    path: Path

    @property
    def id(self) -> str:
        return self.path.name

    @property
    def config(self) -> Path:
        return self.path / "config.toml"

    @property
    def journal(self) -> Path:
        return self.path / JOURNAL_NAME

    @property
    def adapters(self) -> Path:
        """Where the engine saves adapters: ``checkpoints.adapter_path`` of the run's config,
        relative to the run folder (default ``adapters``). A value that would leave the run folder
        (engine.config.adapter_path_problem; a config that old tunetop versions accepted) reads
        as the default: nothing outside the run folder is ever its adapter."""
        try:
            sections = tomllib.loads(self.config.read_text(encoding="utf-8"))
            folder = sections.get("checkpoints", {}).get("adapter_path", "adapters")
        except (OSError, tomllib.TOMLDecodeError, AttributeError):
            folder = "adapters"
        if not isinstance(folder, str) or adapter_path_problem(folder):
            folder = "adapters"
        return self.path / folder

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def log(self) -> Path:
        return self.path / "engine.log"

    @property
    def status_file(self) -> Path:
        return self.path / "status.json"

    @property
    def endpoints_file(self) -> Path:
        return self.path / "endpoints.json"

    @property
    def lock_file(self) -> Path:
        return self.path / "lock"

    def status(self) -> dict[str, Any]:
        """The engine's last published summary (empty if none yet)."""
        try:
            status = json.loads(self.status_file.read_bytes())
        except (OSError, ValueError):  # missing, unreadable, not UTF-8, not JSON: derived data, so none
            return {}
        return status if isinstance(status, dict) else {}

    def write_status(self, status: dict[str, Any]) -> None:
        # Derived data (the journal is the truth), so a rename without fsync is enough.
        temp = self.status_file.with_suffix(".tmp")
        temp.write_text(json.dumps(status))
        os.replace(temp, self.status_file)

    def is_alive(self) -> bool:
        """True while an engine holds this run's lock."""
        try:
            fd = os.open(str(self.lock_file), os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def summary(self) -> dict[str, Any]:
        """What `tunetop ls` and the runs list show: a run whose engine died mid-run reads 'dead'."""
        status = self.status()
        alive = self.is_alive()
        state = str(status.get("state", "?"))
        if not alive and state in ("starting", "running", "paused", "stopping"):
            state = "dead"
        loss = status.get("loss")
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            age = 0.0
        trained = self._trained(status)
        # Failed (or died) before its first step: nothing to look at or resume; `ls` hides it.
        failed_early = not alive and not trained and state in ("failed", "dead")
        return {
            "run": self.id,
            "name": str(status.get("name", "")),
            "state": state,
            "iter": "-" if failed_early else f"{status.get('iteration', 0)}/{status.get('iterations', '?')}",
            "loss": f"{loss:.4f}" if isinstance(loss, (int, float)) else "-",
            "alive": alive,
            "age_seconds": age,
            "trained": trained,
            "failed_before_training": failed_early,
        }

    def _trained(self, status: dict[str, Any]) -> bool:
        """Whether any step ever ran: the engine says so, a report or save happened, or a checkpoint exists."""
        if status.get("trained") or status.get("iteration"):
            return True
        try:
            return any(self.checkpoints.iterdir())
        except OSError:
            return False

    def engine_pid(self) -> int | None:
        try:
            return int(self.lock_file.read_text().strip() or 0) or None
        except (FileNotFoundError, ValueError):
            return None


class RunLock:
    """The exclusive lock an engine holds on its run for its whole life."""

    def __init__(self, run: RunDir) -> None:
        self.run = run
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(str(self.run.lock_file), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = self.run.engine_pid()
            raise RunError(
                f"run {self.run.id} already has a live engine (pid {pid}); a second engine would "
                "steal its sockets. Attach to it with `tunetop attach` or stop it first."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def create_run() -> RunDir:
    run = RunDir(runs_root() / new_run_id())
    run.path.mkdir(parents=True)
    return run


def list_runs() -> list[RunDir]:
    """All runs, oldest first."""
    root = runs_root()
    if not root.is_dir():
        return []
    return sorted((RunDir(p) for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda r: r.id)


def resolve(spec: str | None) -> RunDir:
    """A run by id, unique id prefix, or name; the latest run when ``spec`` is empty."""
    runs = list_runs()
    if not runs:
        raise RunError(f"no runs yet under {runs_root()}. Start one with `tunetop train CONFIG` or `tunetop demo`.")
    if not spec:
        alive = [r for r in runs if r.is_alive()]
        return (alive or runs)[-1]
    exact = [r for r in runs if r.id == spec]
    if exact:
        return exact[0]
    prefixed = [r for r in runs if r.id.startswith(spec)]
    named = [r for r in runs if r.status().get("name") == spec]
    matches = prefixed or named
    if len(matches) == 1:
        return matches[0]
    if named and not prefixed:
        return named[-1]  # a reused name means the latest run of that name
    if matches:
        raise RunError(f"'{spec}' matches {len(matches)} runs ({', '.join(r.id for r in matches[:5])}); give more of the id.")
    raise RunError(f"no run matches '{spec}'. `tunetop ls` lists the runs.")
