"""Named fault points: where crash-safety tests kill the process between two steps of a write.

Code that must survive a crash at any moment (checkpoints, atomic file writes) calls
``point("checkpoint.renamed")`` between its steps. Unset, a point costs two environment
look-ups. Tests set:

- ``TUNETOP_FAULT_TRACE=FILE``: append every point's name to FILE, one a line, so a test can
  list every step a save passes through;
- ``TUNETOP_FAULT_KILL_AT=NAME#K``: SIGKILL this process at the K-th time it passes a point
  named NAME (``*`` matches any name; ``#K`` may be left out for the first time);
- ``TUNETOP_FAULT_ARMED=FILE``: points count (and are traced) only once FILE exists, so a test
  can aim at one write of a long-lived engine: create FILE, then send the command.

Together they give kill-anywhere tests: trace one run, then kill a fresh run at each traced
point in turn (tests/test_checkpoint_kills.py). No mlx import here.
"""

from __future__ import annotations

import os
import signal

TRACE = "TUNETOP_FAULT_TRACE"
KILL_AT = "TUNETOP_FAULT_KILL_AT"
ARMED = "TUNETOP_FAULT_ARMED"

_passed: dict[str, int] = {}


def point(name: str) -> None:
    """A step boundary: record it when tracing, die here when a test asked for it."""
    trace = os.environ.get(TRACE)
    kill_at = os.environ.get(KILL_AT)
    if not trace and not kill_at:
        return
    armed = os.environ.get(ARMED)
    if armed and not os.path.exists(armed):
        return
    if trace:
        with open(trace, "a", encoding="utf-8") as handle:
            handle.write(name + "\n")
    if kill_at:
        wanted, _, count = kill_at.partition("#")
        if wanted in ("*", name):
            key = wanted
            _passed[key] = _passed.get(key, 0) + 1
            if _passed[key] == int(count or 1):
                os.kill(os.getpid(), signal.SIGKILL)
