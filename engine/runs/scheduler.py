"""The scheduler: one detached process per state folder that starts queued runs, in order, as others end.

It is started on demand (:func:`ensure_scheduler`: ``tunetop queue add``, ``sweep``, ``queue``,
``queue resume``) as ``python -m tunetop.cli _scheduler``, in its own session like an engine
(tunetop.runs.daemon), its output in ``queue/scheduler.log``. ``queue/scheduler.lock`` (flock,
held for its life) makes it the only one; it exits when nothing is running and nothing may start.

Every start goes through tunetop.runs.launch, the one start and resume path. Each engine it starts
inherits a spawn lock (``queue/spawn/RUN_ID.lock``), taken before the engine exists and held by
the engine until it exits: "an engine of this run lives" is then a question with no blind spot,
even for an engine still importing its libraries when a scheduler died.

What a scheduler does with an entry after a crash of anything (tunetop.runs.queue's states):

- pending: nothing has happened; it starts in its turn.
- starting or running, its engine alive (spawn lock or run lock held): running; wait for it.
- its engine gone, the run's status final: done (completed, stopped by the user, stopped early) or
  failed (the run's error), as the run ended.
- its engine gone without a final status (killed with everything; SIGTERM'd and saved), or never
  started: the run is continued from its latest checkpoint with the exact resume
  (``train --resume``), or started in its reserved folder when it never saved one. An engine
  that dies without a word while this scheduler watches it (the OOM killer) is started again
  the same way, until it dies ``MAX_DEATHS`` times in a row without saving progress: then failed.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tunetop.faults import point
from tunetop.private import open_private, private_dir
from tunetop.runs.folders import RunDir, RunError, new_run_id, runs_root, state_home
from tunetop.runs.queue import (
    ACTIVE,
    DONE,
    FAILED,
    PENDING,
    RUNNING,
    STARTING,
    Entry,
    Queue,
    edit_queue,
    queue_dir,
)
from tunetop.training.checkpoint import checkpoint_iteration, latest_checkpoint

MAX_DEATHS = 3
"""Deaths in a row without a new checkpoint after which an entry fails instead of starting again."""
DONE_REASONS = ("completed", "stopped", "early_stopped")
"""Finished reasons of a run that ended as it should (the user's stop included): the entry is done."""
RESUMABLE_REASONS = ("terminated", "interrupted")
"""Finished reasons of a run ended by a signal (a shutdown's SIGTERM): saved, so it is continued."""
POLL_SECONDS = 0.5


def _lock_path() -> Path:
    return queue_dir() / "scheduler.lock"


def scheduler_pid() -> int | None:
    """The live scheduler's pid, or None when none runs (creates nothing)."""
    path = state_home() / "queue" / "scheduler.lock"
    if not _held(path):
        return None
    try:
        return int(path.read_text().strip() or 0) or None
    except (OSError, ValueError):
        return None


def _held(path: Path) -> bool:
    """True while any process holds ``path``'s flock."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def ensure_scheduler() -> int | None:
    """Start the scheduler if none runs; its pid when one was started, None when one was running."""
    if _held(_lock_path()):
        return None
    from tunetop.runs.daemon import child_environment

    folder = queue_dir()
    log = os.fdopen(open_private(folder / "scheduler.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT), "ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "tunetop.cli", "_scheduler"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        cwd=str(folder), env={**child_environment(), "TUNETOP_HOME": str(state_home().absolute())},  # its cwd differs
    )
    log.close()
    return process.pid


def _spawn_lock(run_id: str) -> Path:
    return private_dir(queue_dir() / "spawn") / f"{run_id}.lock"


@dataclass
class Start:
    """An engine to start, decided under the queue's lock and done outside it (it takes a while)."""

    entry: int
    run: str
    resume: bool
    config: str
    name: str


class Scheduler:
    """The loop of the scheduler process (:meth:`run`)."""

    def __init__(self, poll: float = POLL_SECONDS) -> None:
        self.poll = poll
        self.watched: set[int] = set()  # entries whose engine this process saw alive
        self._fd: int | None = None

    def log(self, message: str) -> None:
        print(time.strftime("%Y-%m-%d %H:%M:%S ") + message, flush=True)

    def run(self) -> int:
        """Schedule until nothing is running and nothing may start; 0 also when another scheduler runs."""
        fd = open_private(_lock_path(), os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return 0
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        self.log(f"scheduler {os.getpid()} started")
        try:
            while True:
                try:
                    starts = self.settle()
                except OSError as error:  # a full disk: the queue file stays as it was; try again
                    if self._fd is None:  # it was about to exit: the next scheduler does this again
                        return 0
                    self.log(f"cannot update the queue: {error}; trying again in 5 s")
                    time.sleep(5)
                    continue
                if starts is None:
                    self.log("nothing left to run; scheduler exits")
                    return 0
                for start in starts:
                    try:
                        self.start(start)
                    except OSError as error:  # the entry stays starting: the next settle looks again
                        self.log(f"entry {start.entry}: {error}")
                _reap()
                if not starts:
                    time.sleep(self.poll)
        finally:
            self._release()

    def _release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None

    # -- deciding, under the queue's lock ------------------------------------------------

    def settle(self) -> list[Start] | None:
        """Bring every active entry up to date with its run, and reserve the next ones to start.

        None: nothing runs and nothing may start, and the scheduler lock is already released
        (under the queue's lock, so a config queued meanwhile finds no scheduler and starts one)."""
        with edit_queue() as queue:
            starts = [s for e in queue.active() if (s := self._look(e)) is not None]
            busy = len(queue.active())
            for entry in queue.pending():
                if queue.paused or busy >= queue.parallel:
                    break
                entry.state, entry.run, entry.started = STARTING, _fresh_run_id(queue), time.time()
                starts.append(Start(entry.id, entry.run, False, entry.config, entry.name))
                busy += 1
            if not queue.active() and (queue.paused or not queue.pending()):
                self._release()
                return None
            for start in starts:
                entry = queue.find(start.entry)
                entry.state, entry.starts = STARTING, entry.starts + 1
            return starts

    def _look(self, entry: Entry) -> Start | None:
        """Update ``entry`` (starting or running) from its run; a Start when its engine must be started."""
        run = RunDir(runs_root() / entry.run)
        if _held(_spawn_lock(entry.run)) or run.is_alive():
            if entry.state == STARTING:
                entry.state = RUNNING
            self.watched.add(entry.id)
            return None
        if not run.config.is_file():  # reserved, the folder or its config not made yet
            return Start(entry.id, entry.run, False, entry.config, entry.name)
        status = run.status()
        state, reason = status.get("state"), str(status.get("reason", ""))
        if state not in ("finished", "failed"):
            state, reason = _journaled_end(run, int(status.get("seq") or 0)) or (state, reason)
        if state == "failed" or (state == "finished" and reason not in RESUMABLE_REASONS):
            self._end(entry, run, DONE if state == "finished" and reason in DONE_REASONS else FAILED, reason or "failed")
            return None
        latest = latest_checkpoint(run.checkpoints)
        saved = checkpoint_iteration(latest) if latest is not None else 0
        if entry.id in self.watched and state != "finished":  # died without a word while watched
            self.watched.discard(entry.id)
            entry.deaths = entry.deaths + 1 if saved <= entry.progress else 1
            self.log(f"entry {entry.id}: run {entry.run}'s engine died (death {entry.deaths} without progress)")
            if entry.deaths >= MAX_DEATHS:
                entry.error = (f"its engine died {entry.deaths} times without saving progress (last checkpoint: "
                               f"iteration {saved}); {run.log} may say why. `tunetop train --resume {entry.run}` "
                               "continues it by hand.")
                self._end(entry, run, FAILED, "died")
                return None
        entry.progress = saved
        return Start(entry.id, entry.run, latest is not None, entry.config, entry.name)

    def _end(self, entry: Entry, run: RunDir, state: str, reason: str) -> None:
        entry.state, entry.reason, entry.ended = state, reason, time.time()
        if state == FAILED and not entry.error:
            from tunetop.runs.daemon import _failure_message

            entry.error = str(run.status().get("error") or _failure_message(run))
        self.watched.discard(entry.id)
        _spawn_lock(entry.run).unlink(missing_ok=True)  # no engine holds it: it was checked free
        self.log(f"entry {entry.id}: run {entry.run} {state} ({reason})")

    # -- starting, outside the lock ------------------------------------------------------

    def start(self, start: Start) -> None:
        """Start (or continue) ``start``'s run through tunetop.runs.launch, holding its spawn lock."""
        fd = open_private(_spawn_lock(start.run), os.O_RDWR | os.O_CREAT)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # an engine of this run lives: the next settle sees it
            point("scheduler: spawn lock taken")
            outcome, message = self._launch(start, fd)
            point("scheduler: launched")
        finally:
            os.close(fd)  # the engine holds its own copy of the lock for its life
        with edit_queue() as queue:
            try:
                entry = queue.find(start.entry)
            except ValueError:
                return
            if entry.state != STARTING or entry.run != start.run:
                return
            if outcome == RUNNING:
                entry.state = RUNNING
                self.watched.add(entry.id)
            elif outcome == FAILED:
                entry.error = message
                self._end(entry, RunDir(runs_root() / start.run), FAILED, "failed to start")
            else:  # ended while starting: the next settle decides from the run, as for any end
                self.watched.add(entry.id)

    def _launch(self, start: Start, fd: int) -> tuple[str, str]:
        """(RUNNING | FAILED | STARTING, a failure's message)."""
        from tunetop.runs import launch
        from tunetop.runs.daemon import EngineStartError
        from tunetop.training import config as config_module
        from tunetop.training.checkpoint import CheckpointError
        from tunetop.training.config import ConfigError

        run = RunDir(runs_root() / start.run)
        how = "continuing" if start.resume else "starting"
        self.log(f"entry {start.entry}: {how} run {start.run} ({start.name})")
        try:
            if start.resume:
                launch.resume_run(run, None, detach=True, keep_fds=(fd,))
            else:
                cfg = config_module.parse(start.config)  # checked when queued; errors then name the run's copy
                launch.start_run(cfg, detach=True, run_id=start.run, keep_fds=(fd,))
        except EngineStartError:
            # It ended before the first step was seen: failed (bad data), killed, or done already
            # (a resume at its last iteration). The run's status says which: the next settle reads it.
            return STARTING, ""
        except (ConfigError, CheckpointError, RunError, OSError) as error:
            if run.is_alive():  # someone resumed it by hand meanwhile
                return STARTING, ""
            return FAILED, str(error)
        return RUNNING, ""


def _fresh_run_id(queue: Queue) -> str:
    """A run id no run folder and no entry has: a reserved id's folder is used as found, so two
    entries reserving the same id in one second (1 in 65,536) must not share it."""
    taken = {e.run for e in queue.entries}
    while True:
        run_id = new_run_id()
        if run_id not in taken and not (runs_root() / run_id).exists():
            return run_id


def _journaled_end(run: RunDir, since: int) -> tuple[str, str] | None:
    """(state, reason) of a ``finished`` event journaled after seq ``since``: an engine killed between
    journaling its end and writing status.json ended all the same (the journal is the truth)."""
    from tunetop.control.journal import JournalError, read_events

    end = None
    state = "finished"
    try:
        for event in read_events(run.journal, since):
            if event.get("type") == "state":
                state = str(event.get("state"))
                if state == "starting":  # a later engine took the run up again
                    end = None
            elif event.get("type") == "finished":
                end = (state if state in ("finished", "failed") else "finished", str(event.get("reason", "")))
    except (JournalError, OSError, ValueError):
        return None
    return end


def _reap() -> None:
    """Collect the engines of this process that have exited (they are its children until it dies)."""
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def entry_states(queue: Queue) -> dict[str, int]:
    """How many entries are in each state, for one line of summary."""
    counts = {state: 0 for state in (PENDING, *ACTIVE, DONE, FAILED)}
    for entry in queue.entries:
        counts[entry.state] = counts.get(entry.state, 0) + 1
    return counts
