"""Run directories: where runs live, their ids, the lock, and finding them again.

A run is a folder under the state directory ($TUNETOP_HOME, else $XDG_STATE_HOME/tunetop,
else ~/.local/state/tunetop)/runs/RUN_ID holding config.toml, the journal, adapters/,
checkpoints/, engine.log, status.json and a lock file. The lock (flock) is held by the engine
for the run's life: it both stops a second engine from taking the run over and tells anyone
else whether the engine is alive. State is private (tunetop.private): folders 0700, files 0600,
so no other user can read a run or hold its lock; a lock held by anything but the run's engine
(another user's process on a run made by an older version, a leftover child) is told apart
from a live engine by who holds it (/proc/locks on Linux). No mlx import here.

Longer than most modules because a run folder and everything that reads it (status, summary for
`ls`, the lock and who holds it, finding a run by id, prefix or name) is one idea: splitting
it would put the folder's layout in several places.
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

from tunetop.control.journal import JOURNAL_NAME
from tunetop.private import open_private, private_dir, tighten, tighten_tree, write_private
from tunetop.training.config import adapter_path_problem


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


def make_state_private() -> Path:
    """Create (or tighten) the state root and the runs folder as 0700 folders; return the latter."""
    private_dir(state_home())
    return private_dir(runs_root())


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
        (tunetop.training.config.adapter_path_problem; a config that old tunetop versions accepted) reads
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
        write_private(self.status_file, json.dumps(status).encode())

    def _locked(self) -> bool:
        """True while anyone holds the lock exclusively."""
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

    def is_alive(self) -> bool:
        """True while an engine holds this run's lock (not another user's process or a leftover)."""
        if not self._locked():
            return False
        holders = lock_holders(self.lock_file)
        return holders is None or any(h.is_engine(self.engine_pid()) for h in holders)

    def summary(self, status: dict[str, Any] | None = None) -> dict[str, Any]:
        """What `tunetop ls` and the runs list show: a run whose engine died mid-run reads 'dead'.

        ``status``: the run's ``status()`` when the caller has read it already."""
        status = self.status() if status is None else status
        alive = self.is_alive()
        state = str(status.get("state", "?"))
        if not alive and state in ("starting", "running", "paused", "stopping"):
            state = "dead"
        loss = status.get("loss")
        best = status.get("best_val_loss")  # kept by engines since tags and notes came; older runs show none
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
            "best_val_loss": float(best) if isinstance(best, (int, float)) else None,
            "best_val_iteration": status.get("best_val_iteration"),
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

    def make_private(self) -> None:
        """Tighten this run's folder and everything in it to 0700 / 0600, and the folders above it
        (runs made by older versions were 0755 / 0644)."""
        tighten_tree(self.path)
        if self.path.parent.name == "runs":
            tighten(self.path.parent)
            tighten(self.path.parent.parent)

    def engine_pid(self) -> int | None:
        try:
            return int(self.lock_file.read_text().strip() or 0) or None
        except (FileNotFoundError, ValueError):
            return None


@dataclass
class LockHolder:
    """A process holding a run's lock, as /proc/locks and /proc/PID tell."""

    pid: int
    uid: int | None  # None: the process is gone (a child that inherited the lock may still hold it)
    argv: list[str]

    @property
    def running(self) -> bool:
        return self.uid is not None

    def is_engine(self, recorded_pid: int | None) -> bool:
        """This run's engine: the pid it wrote into the lock, or a tunetop process of the caller
        (or root): an engine between taking the lock and writing its pid."""
        if not self.running:
            return False
        if self.pid == recorded_pid:
            return True
        # engine.cli: the module's name before tunetop was installed under its own name.
        tunetop = any(m in self.argv for m in ("tunetop.cli", "engine.cli")) or any(Path(a).name == "tunetop" for a in self.argv[:2])
        return tunetop and self.uid in (os.getuid(), 0)

    def describe(self) -> str:
        if not self.running:
            return f"pid {self.pid} (no longer running; a process it started still holds the lock)"
        return f"pid {self.pid} of user {_user_name(self.uid)} (`{' '.join(self.argv)[:80] or '?'}`)"


def _user_name(uid: int | None) -> str:
    import pwd

    if uid is None:
        return "?"
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _pid_running(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def lock_holders(path: Path) -> list[LockHolder] | None:
    """Who holds a flock on ``path``, from /proc/locks; None where that cannot be known."""
    try:
        info = os.stat(path)
        table = Path("/proc/locks").read_text()
    except OSError:
        return None
    device = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    holders = []
    for line in table.splitlines():
        # "1: FLOCK  ADVISORY  WRITE 4242 fe:00:123456 0 EOF"; waiters have "->" in place of the type.
        parts = line.split()
        if len(parts) < 6 or parts[1] != "FLOCK" or parts[5] != device:
            continue
        pid = int(parts[4]) if parts[4].isdigit() else 0
        if pid <= 0:
            return None  # a holder in another pid namespace: cannot tell who
        try:
            uid: int | None = os.stat(f"/proc/{pid}").st_uid
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            uid, argv = None, []
        holders.append(LockHolder(pid, uid, [arg for arg in argv if arg]))
    return holders


class RunLock:
    """The exclusive lock an engine holds on its run for its whole life."""

    def __init__(self, run: RunDir) -> None:
        self.run = run
        self._fd: int | None = None
        self.replaced = ""  # set when another user's stray lock was replaced: the warning to journal

    def acquire(self) -> None:
        """Take the lock; RunError says who holds it when that is not possible.

        Another user's process holding the lock (possible on a run folder made readable by an
        older version) cannot be this run's engine, which runs as the owner: the lock file is
        replaced by a fresh one and ``replaced`` says so. A live engine, or a process of the
        owner's that is no engine (a leftover child), is reported, never taken over.
        """
        fd = open_private(self.run.lock_file, os.O_RDWR | os.O_CREAT)
        for _attempt in range(3):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holders = lock_holders(self.run.lock_file)
                if holders == []:  # released between the two looks: try again
                    time.sleep(0.05)
                    continue
                os.close(fd)
                fd = self._when_held(holders)
                break
        else:
            os.close(fd)
            self._refuse_live(self.run.engine_pid())
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def _refuse_live(self, pid: int | None) -> None:
        raise RunError(
            f"run {self.run.id} already has a live engine (pid {pid}); a second engine would "
            "steal its sockets. Attach to it with `tunetop attach` or stop it first."
        )

    def _when_held(self, holders: list[LockHolder] | None) -> int:
        """The lock is held: a fresh lock's fd if the holder is a stranger; else RunError saying who."""
        run = self.run
        recorded = run.engine_pid()
        if holders is None:  # who holds it cannot be known here (not Linux)
            if _pid_running(recorded):
                self._refuse_live(recorded)
            raise RunError(
                f"run {run.id}'s lock ({run.lock_file}) is held by a process that is not its engine: the "
                f"engine recorded there (pid {recorded}) is no longer running. Find the holder with "
                f"`fuser -v {run.lock_file}` (or `lsof`), end it, and try again."
            )
        engines = [h for h in holders if h.is_engine(recorded)]
        if engines:
            self._refuse_live(engines[0].pid)
        owner = run.path.stat().st_uid
        strangers = [h for h in holders if h.running and h.uid not in (owner, os.getuid())]
        if len(strangers) == len(holders):
            return self._replace(holders)
        ours = next(h for h in holders if h not in strangers)
        recorded_note = f"pid {recorded}" if recorded else "none"
        end = f"`kill {ours.pid}`" if ours.running else f"find it with `fuser -v {run.lock_file}`"
        raise RunError(
            f"run {run.id}'s lock is held by {ours.describe()}, which is not its engine (the engine "
            f"recorded in the lock, {recorded_note}, is no longer running). End that process ({end}) "
            "and try again."
        )

    def _replace(self, holders: list[LockHolder]) -> int:
        """A fresh lock file, locked, renamed over the one a stranger holds open."""
        run = self.run
        fresh = run.lock_file.with_name(f".lock-{os.getpid()}")
        fd = open_private(fresh, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else has it
        os.replace(fresh, run.lock_file)
        if os.stat(run.lock_file).st_ino != os.fstat(fd).st_ino:  # another engine replaced it meanwhile
            os.close(fd)
            raise RunError(f"run {run.id} was taken by another engine while its stray lock was replaced; "
                           "`tunetop ls` shows it.")
        who = "; ".join(h.describe() for h in holders)
        self.replaced = (
            f"run {run.id}'s lock was held by another user's process ({who}), not by an engine of "
            "this run (it would run as the run's owner); the lock file was replaced and the run folder "
            "made private (0700), so that user can no longer read the run or hold its lock."
        )
        return fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def create_run(run_id: str = "") -> RunDir:
    """A new, empty run folder (mode 0700, in a 0700 state folder); ``run_id`` is one reserved
    before (the queue writes it down first), else a fresh id. A reserved id's folder may exist
    already (made before a crash), and is used as it is."""
    run = RunDir(make_state_private() / (run_id or new_run_id()))
    run.path.mkdir(mode=0o700, exist_ok=bool(run_id))
    return run


def list_runs() -> list[RunDir]:
    """All runs, oldest first."""
    root = runs_root()
    try:
        if not root.is_dir():
            return []
        found = [RunDir(p) for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    except PermissionError:
        owner = _owner_of(root)
        raise RunError(
            f"cannot read the runs in {root}: permission denied{owner}. Runs are private to the user "
            "who made them; set TUNETOP_HOME to a folder of your own."
        ) from None
    return sorted(found, key=lambda r: r.id)


def _owner_of(path: Path) -> str:
    for candidate in (path, *path.parents):
        try:
            uid = candidate.stat().st_uid
        except OSError:
            continue
        return f" (it belongs to {_user_name(uid)})" if uid != os.getuid() else ""
    return ""


def ambiguous(spec: str, matches: list[RunDir]) -> str:
    """The refusal of a RUN that names several runs: each one (id, name, state), and how to pick."""
    shown = matches[-10:]
    lines = [f"'{spec}' matches {len(matches)} runs; give one's id (or enough of it to be unique):"]
    for run in shown:
        summary = run.summary()
        lines.append(f"  {run.id}  {summary['name'] or '-'}  {summary['state']}")
    if len(matches) > len(shown):
        lines.append(f"  ... and {len(matches) - len(shown)} older (`tunetop ls --all` lists them)")
    return "\n".join(lines)


def resolve(spec: str | None) -> RunDir:
    """A run by id, unique id prefix, or name; the latest run when ``spec`` is empty.

    A prefix or name that several runs match is refused (RunError listing them), never guessed.
    """
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
    matches = prefixed + [r for r in runs if r.status().get("name") == spec and r not in prefixed]
    if len(matches) > 1:  # runs that failed before training (hidden by `ls`) do not make it ambiguous
        matches = [r for r in matches if not r.summary()["failed_before_training"]] or matches
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise RunError(ambiguous(spec, matches))
    raise RunError(f"no run matches '{spec}'. `tunetop ls` lists the runs.")
