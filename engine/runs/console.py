"""Headless output of a training run: a progress line on a terminal, plain lines otherwise.

In the spirit of mlx_lm.lora's output. Respects NO_COLOR. No mlx import here.
"""

from __future__ import annotations

import os
import sys
from typing import Any, TextIO

UNWRITTEN_LINES = 10_000
"""Lines kept while the log cannot be written (a full disk), written with the next one."""


def _fmt_lr(value: float) -> str:
    return f"{value:.3e}"


def describe(event: dict[str, Any]) -> str | None:
    """One human line for an event, or None for events not worth a line."""
    kind = event.get("type")
    if kind == "train":
        return (
            f"Iter {event['iteration']}: train loss {event['loss']:.3f}, lr {_fmt_lr(event['learning_rate'])}, "
            f"it/s {event['iterations_per_second']:.2f}, tokens/s {event['tokens_per_second']:.0f}, "
            f"trained tokens {event['trained_tokens']}, peak mem {event['peak_memory']:.3f} GB"
        )
    if kind == "validation":
        return f"Iter {event['iteration']}: val loss {event['loss']:.3f}, val took {event['seconds']:.2f}s"
    if kind == "save":
        return f"Iter {event['iteration']}: saved {event.get('kind', 'adapter')} to {event['path']}"
    if kind == "run_started":
        return (
            f"Run {event['run']} ({event.get('name', '')}): model {event['model']}, trainable parameters "
            f"{event['trainable_parameters']:,} of {event['total_parameters']:,}"
        )
    if kind in ("log", "warning", "error"):
        prefix = "" if kind == "log" else f"{kind}: "
        return prefix + str(event.get("message", ""))
    if kind == "state":
        # An ended run's `finished` event follows at once and says it with the reason: one line.
        return None if event["state"] in ("finished", "failed") else f"state: {event['state']}"
    if kind == "sample":
        return f"Iter {event['iteration']}: sample {event['prompt']!r} -> {event['completion']!r}"
    if kind == "resumed":
        return f"resumed at iteration {event['iteration']} from {event['checkpoint']}"
    if kind == "nonfinite":
        return None  # the warning that follows says it in words
    if kind == "finished":
        best = event.get("best_iteration")
        after = f"; best validation loss {event['best_loss']:.4f} at iteration {best}" if best is not None and isinstance(event.get("best_loss"), float) else ""
        return f"finished ({event['reason']}) at iteration {event['iteration']}{after}"
    if kind == "config_changed":
        return "changed: " + ", ".join(f"{k}={v}" for k, v in event.get("changes", {}).items())
    return None


class ConsoleReporter:
    """Prints events; on a terminal keeps a live progress bar on the last line."""

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.total = total
        self.tty = self.stream.isatty()
        self.color = self.tty and "NO_COLOR" not in os.environ
        self._bar_shown = False
        self._unwritten: list[str] = []

    def __call__(self, event: dict[str, Any], _payload: bytes = b"") -> None:
        if event.get("type") == "heartbeat":
            return
        line = describe(event)
        if line is None:
            return
        try:
            if self._unwritten:  # lines a full disk refused earlier (stdout is engine.log when detached)
                self.stream.write("".join(self._unwritten))
                self._unwritten.clear()
            if self.tty:
                self._clear_bar()
                if self.color and event.get("type") in ("warning", "error"):
                    line = f"\x1b[33m{line}\x1b[0m"
                self.stream.write(line + "\n")
                if event.get("type") == "train":
                    self._draw_bar(int(event["iteration"]))
            else:
                self.stream.write(line + "\n")
            self.stream.flush()
        except OSError:
            # A copy of the journal for people: kept for the next line rather than pausing the run.
            self._unwritten.append(line + "\n")
            del self._unwritten[:-UNWRITTEN_LINES]

    def _clear_bar(self) -> None:
        if self._bar_shown:
            self.stream.write("\r\x1b[2K")
            self._bar_shown = False

    def _draw_bar(self, iteration: int) -> None:
        width = 30
        done = int(width * iteration / max(self.total, 1))
        self.stream.write(f"[{'#' * done}{'.' * (width - done)}] {iteration}/{self.total}")
        self._bar_shown = True

    def close(self) -> None:
        if self.tty:
            self._clear_bar()
            self.stream.flush()
