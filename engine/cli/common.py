"""What every command module of the CLI shares: help lines and the one way to fail (the exit codes live in tunetop.exit_codes)."""

from __future__ import annotations

import argparse
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


def checkpoint_arg(text: str) -> int | str:
    """``--checkpoint``: an iteration, or ``best`` (the lowest validation loss, checkpoint.best_checkpoint)."""
    if text.strip().lower() == "best":
        return "best"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is neither an iteration nor 'best'") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value}: an iteration is 0 or more")
    return value


CHECKPOINT_HELP = "a checkpoint (ITERATION, or best: the lowest validation loss) instead of the latest adapter"


RUN_HELP = "run id, a unique prefix of one, or a run name (default: the latest run)"


def _fail(message: str, code: int = 2) -> int:
    print(f"tunetop: {message}", file=sys.stderr)
    return code
