"""What every command module of the CLI shares: help lines and the one way to fail (the exit codes live in tunetop.exit_codes)."""

from __future__ import annotations

import sys

CONTROL_HELP = {
    "pause": "pause a live run between two steps (`resume` continues it)",
    "resume": "continue a paused run",
    "stop": "save a live run's adapter, then end the run",
    "save": "write a live run's adapter and checkpoint now",
    "evaluate": "run a validation pass on a live run now and print its loss",
    "status": "print a live run's state and iteration",
}
"""The commands that steer a live engine, each with its help line."""


RUN_HELP = "run id, a unique prefix of one, or a run name (default: the latest run)"


def _fail(message: str, code: int = 2) -> int:
    print(f"tunetop: {message}", file=sys.stderr)
    return code
