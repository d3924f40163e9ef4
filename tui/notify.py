"""Desktop notifications through the terminal: the bell, OSC 9 and OSC 777, as the TUI sends them.

When the run on screen ends or pauses on a non-finite step (tunetop.runs.notify.is_notable),
the dashboard rings the bell and writes both notification sequences: OSC 9 (iTerm2, WezTerm,
kitty, Windows Terminal, foot, ConEmu...) and OSC 777 (rxvt's ``notify``: VTE terminals such as
GNOME Terminal, WezTerm, foot). Terminals ignore the one they do not know. Inside tmux the
sequences are wrapped in tmux's passthrough (``ESC P tmux; ... ESC \\``, each ESC doubled), which
tmux forwards to the outer terminal only with ``set -g allow-passthrough on``.

Only events that happen while the screen is open on a live engine notify: neither the history
replayed on attach (an old ``finished``, :func:`fresh`) nor a run opened after its engine ended.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Any

from tunetop.runs.notify import describe, is_notable

SLACK = 2.0
"""Seconds before the screen opened that still count as now (the engine's clock and ours)."""

_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def fresh(events: Iterable[dict[str, Any]], opened_at: float) -> list[dict[str, Any]]:
    """The notable events among ``events`` that happened since the screen opened."""
    return [e for e in events if is_notable(e) and float(e.get("ts") or 0) >= opened_at - SLACK]


def sequences(title: str, body: str, tmux: bool) -> str:
    """The OSC 9 and OSC 777 notifications of (title, body), wrapped for tmux when ``tmux``."""
    title, body = _UNSAFE.sub(" ", title), _UNSAFE.sub(" ", body)
    osc = [f"\x1b]9;{title}: {body}\x07", f"\x1b]777;notify;{title.replace(';', ',')};{body}\x07"]
    if tmux:
        osc = [f"\x1bPtmux;{s.replace(chr(27), chr(27) * 2)}\x1b\\" for s in osc]
    return "".join(osc)


def in_tmux() -> bool:
    return bool(os.environ.get("TMUX"))


def ring(app: Any, event: dict[str, Any]) -> None:
    """Ring the bell and raise a desktop notification for one notable event (nothing headless)."""
    driver = getattr(app, "_driver", None)  # Textual has no public call for raw terminal output
    if getattr(app, "is_headless", True) or driver is None:
        return
    app.bell()
    title, body = describe(event)
    driver.write(sequences(title, body, in_tmux()))
