"""Start an engine in the background, detached from the terminal, and wait until it serves.

The child runs ``python -m tunetop.cli _engine RUN_DIR`` in a new session (so closing the
terminal or logging out does not reach it), with stdin from /dev/null and stdout/stderr
appended to the run's engine.log. No mlx import here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tunetop.control.journal import read_payloads
from tunetop.faults import point
from tunetop.private import open_private
from tunetop.runs.folders import RunDir, RunError


class EngineStartError(RunError):
    """The detached engine exited before it started training; ``code`` is its exit code."""

    def __init__(self, message: str, code: int, run_id: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.run_id = run_id


def _ends(run: RunDir) -> tuple[int, int]:
    """Where the run's journal and log end now: what an engine started after adds is its own."""
    sizes = []
    for path in (run.journal, run.log):
        try:
            sizes.append(path.stat().st_size)
        except OSError:
            sizes.append(0)
    return sizes[0], sizes[1]


def _failure_message(run: RunDir, journal_from: int = 0, log_from: int = 0) -> str:
    """One line saying why an engine ended: the last error event it journaled, else what it logged
    last (only what it added after ``journal_from`` and ``log_from``: a resumed run's journal and
    log hold earlier engines' errors), else, when it could write nothing, why that may be."""
    errors = []
    try:
        for _seq, payload in read_payloads(run.journal, start_offset=journal_from or None):
            if b'"error"' in payload:
                event = json.loads(payload)
                if event.get("type") == "error":
                    errors.append(str(event.get("message", "")))
    except Exception:  # no journal, or one that cannot be read: the log says why
        errors = []
    if errors:
        return errors[-1]
    try:
        with open(run.log, "rb") as handle:
            handle.seek(log_from)
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        text = ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        try:
            free = shutil.disk_usage(run.path).free
        except OSError:
            free = -1
        if 0 <= free < 1 << 20:
            return (f"it could write nothing: the disk holding {run.path} is full ({free:,} bytes free; No space "
                    "left on device). Make room there, then run the command again.")
        return f"it wrote nothing (its output would be in {run.log})"
    # The CLI's own error line (`tunetop: ...`), else a traceback's last line (the exception).
    said = [line.removeprefix("tunetop: ") for line in lines if line.startswith("tunetop: ")]
    last = said[-1] if said else lines[-1]
    return f"{last} (the engine's output is in {run.log})"


def source_root() -> Path | None:
    """The folder on sys.path this process found ``tunetop`` in, when it was found that way (a
    source view on PYTHONPATH, .ci/source-view); None when an installer maps it (pip install,
    editable or not), which every process of this Python then finds on its own."""
    import tunetop

    folder = Path(tunetop.__file__).parent.parent  # not resolved: a view is a tree of links
    if (folder / "tunetop").is_dir() and not {"site-packages", "dist-packages"} & set(folder.parts):
        return folder
    return None


def child_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a tunetop child process (an engine, a rank): ``base`` (default this
    process's), with the folder this process imported tunetop from first on PYTHONPATH (if it
    came from one) so that the child imports the same package, and unbuffered output for its log."""
    env = dict(os.environ if base is None else base)
    root = source_root()
    if root is not None:
        env["PYTHONPATH"] = str(root) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def spawn_engine(
    run: RunDir, wait_seconds: float = 120.0, extra_args: list[str] | None = None, keep_fds: tuple[int, ...] = ()
) -> int:
    """Start the engine for ``run``; return its pid once it trains (or after ``wait_seconds``).

    Raises :class:`EngineStartError` with the engine's own error when it exits first (bad
    data, a model that will not load), so ``tunetop train --detach`` can report it. ``keep_fds``
    are inherited by the engine (the queue's spawn lock: held for exactly the engine's life).
    """
    ends = _ends(run)
    log = os.fdopen(open_private(run.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "ab")  # handed to the child
    env = child_environment()
    process = subprocess.Popen(
        [sys.executable, "-m", "tunetop.cli", "_engine", str(run.path), *(extra_args or [])],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=str(run.path),
        env=env,
        pass_fds=keep_fds,
    )
    log.close()
    point("daemon: engine spawned")
    return _wait_until_training(run, process, wait_seconds, engine_pid=process.pid, ends=ends)


def _wait_until_training(
    run: RunDir, process: subprocess.Popen[bytes], wait_seconds: float, engine_pid: int | None, ends: tuple[int, int] = (0, 0)
) -> int:
    """Return ``process``'s pid once the run's status says it trains (written by ``engine_pid``,
    when given); raise :class:`EngineStartError` if the process exits first, with what it wrote
    after ``ends`` (the journal's and the log's sizes when it started)."""
    deadline = time.monotonic() + wait_seconds
    while time.monotonic() < deadline:
        code = process.poll()
        if code is not None:
            raise EngineStartError(f"run {run.id} failed to start: {_failure_message(run, *ends)}", code, run.id)
        status = run.status()
        # Running is not enough: a first step that fails (a model the settings do not fit) is a
        # failure to start too, and the command that started the run should say so.
        state = status.get("state")
        started = state in ("paused", "stopping", "finished") or (state == "running" and status.get("stepped"))
        if started and (engine_pid is None or status.get("pid") == engine_pid):
            return process.pid
        time.sleep(0.05)
    return process.pid


def spawn_command(run: RunDir, command: list[str], wait_seconds: float = 300.0) -> int:
    """Start a launcher (``mlx.launch``) for ``run`` in the background; return once rank 0 trains.

    mlx.launch forwards its stdin to every rank and polls it: it gets a pipe that never ends
    (it holds the write end itself), since /dev/null would make that poll spin.
    """
    read_end, write_end = os.pipe()
    ends = _ends(run)
    log = os.fdopen(open_private(run.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "ab")  # handed to the child
    process = subprocess.Popen(
        command, stdin=read_end, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        cwd=str(run.path), pass_fds=(write_end,),
    )
    os.close(read_end)
    os.close(write_end)
    log.close()
    # Rank 0 is a grandchild here: any engine's status will do (this run has only this one).
    return _wait_until_training(run, process, wait_seconds, engine_pid=None, ends=ends)
