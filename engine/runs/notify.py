"""Notifications: the events a person waits for, told to them (``notify.command``, the TUI's bell).

A run that ends (any ``finished`` event: completed, stopped early, stopped, failed...) or that
pauses on a non-finite step (a ``nonfinite`` event whose action is ``pause``: it waits for
someone) is *notable*. The engine runs the config's ``notify.command`` for each notable event,
and an attached TUI rings the bell and raises a desktop notification (tunetop.tui.notify).

The command runs under ``sh -c`` on the engine's machine with the event as one line of JSON on
stdin, and ``TUNETOP_RUN`` / ``TUNETOP_MESSAGE`` (one sentence) in its environment, for ntfy,
mail or a webhook. It runs on a thread of its own, never the training thread, in a session of
its own, killed with its children after ``notify.timeout`` seconds; a failure, a non-zero exit
or a timeout is a ``warning`` event and nothing more. The engine waits for a command still
running when the run ends (at most its timeout) before it closes the journal, so the command's
failure is still recorded.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any


def is_notable(event: dict[str, Any]) -> bool:
    """A run that ended, or paused on a non-finite step (it waits for someone)."""
    kind = event.get("type")
    return kind == "finished" or (kind == "nonfinite" and event.get("action") == "pause")


def describe(event: dict[str, Any]) -> tuple[str, str]:
    """(title, body) of a notable event, as a desktop notification shows them."""
    run = str(event.get("run", ""))
    if event.get("type") == "nonfinite":
        return (f"tunetop: {run} paused", f"non-finite {event.get('cause', 'loss')} at iteration {event.get('iteration')}: "
                "resume with a lower learning rate, or stop it")
    reason = str(event.get("reason", ""))
    body = f"{reason.replace('_', ' ')} at iteration {event.get('iteration')}"
    best, loss = event.get("best_iteration"), event.get("best_loss")
    if best is not None and isinstance(loss, (int, float)):
        body += f"; best validation loss {loss:.4f} at iteration {best}"
    failed = reason in ("failed", "bad_input", "rank_failed", "server_failed")
    return (f"tunetop: {run} {'failed' if failed else 'finished'}", body)


class CommandNotifier:
    """Runs ``notify.command`` for each notable event (an EventLog subscriber); see the module."""

    def __init__(self, command: str, timeout: float, warn: Callable[[str], None]) -> None:
        self.command = command
        self.timeout = timeout
        self.warn = warn
        self._threads: list[threading.Thread] = []

    def on_event(self, event: dict[str, Any], payload: bytes) -> None:
        if not self.command or not is_notable(event):
            return
        title, body = describe(event)
        thread = threading.Thread(target=self._run, args=(payload, event, f"{title}: {body}"), name="notify", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _run(self, payload: bytes, event: dict[str, Any], message: str) -> None:
        what = f"notify.command for the {event.get('type')} event (seq {event.get('seq')})"
        env = {**os.environ, "TUNETOP_RUN": str(event.get("run", "")), "TUNETOP_MESSAGE": message}
        try:
            process = subprocess.Popen(
                self.command, shell=True, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                start_new_session=True, env=env,  # a session of its own: the timeout kills its children too
            )
        except OSError as error:
            self._warn(f"{what} could not start: {error}")
            return
        try:
            _out, err = process.communicate(payload + b"\n", timeout=self.timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.communicate(timeout=5)  # a child that left the session may hold the pipe: give up on it
            self._warn(f"{what} was still running after {self.timeout:g} s (notify.timeout) and was killed")
            return
        if process.returncode != 0:
            said = err.decode("utf-8", "replace").strip()[-300:]
            self._warn(f"{what} exited with code {process.returncode}" + (f": {said}" if said else ""))

    def _warn(self, message: str) -> None:
        with contextlib.suppress(Exception):  # the journal may be closing: the run is what matters
            self.warn(message)

    def close(self) -> None:
        """Wait for commands still running (each at most its timeout, and the kill's grace)."""
        deadline = time.monotonic() + self.timeout + 10
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))


class Ending:
    """Folds a run's events into what ``tunetop wait`` waits for: ``reason`` is the ``finished``
    reason, ``paused_nonfinite`` while the run waits after a non-finite step, "" while it goes
    on. A resumed run's new events clear an earlier end."""

    def __init__(self) -> None:
        self.reason = ""
        self.event: dict[str, Any] | None = None  # the notable event that set it

    def apply(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if is_notable(event):
            self.reason = str(event.get("reason", "")) if kind == "finished" else "paused_nonfinite"
            self.event = event
        elif kind in ("resumed", "run_started") or (kind == "state" and event.get("state") in ("starting", "running")):
            self.reason, self.event = "", None


WAIT_CODES: dict[str, int] = {
    "completed": 0,
    "early_stopped": 10,
    "stopped": 11,
    "paused_nonfinite": 12,
    "non_finite": 13,
    "failed": 14,
    "bad_input": 14,
    "rank_failed": 14,
    "server_failed": 14,
    "interrupted": 15,
    "terminated": 15,
}
"""``tunetop wait``'s exit code for each way a run ends (README, 'Exit codes'); none is one the
other commands use (1-4, 130, 143). A reason of a later version counts as failed."""

WAIT_ENGINE_GONE = 16
"""The engine ended without a ``finished`` event (killed, or its machine went down): resume it."""

WAIT_TIMED_OUT = 17
"""``--timeout`` passed with the run still going."""
