"""End to end: the real `tunetop attach` in a real terminal (tmux) against a real detached engine."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, wait_for
from tunetop.runs.client_sync import send_command
from tunetop.runs.folders import RunDir

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (.ci/setup installs it)")


class Tmux:
    """One tmux server of our own (-L), so the test never touches a user's sessions."""

    def __init__(self, name: str) -> None:
        self.socket = f"tt-{os.getpid()}-{name}"
        self.session = name

    def run(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, check=False).stdout

    def start(self, command: str, extra_env: str = "") -> None:
        env = " ".join(
            f"{k}={v}"
            for k, v in os.environ.items()
            if k.startswith(("TUNETOP_", "XDG_")) or k in ("PYTHONPATH", "TZ", "HOME", "PATH")
        )
        # The shell stays after the TUI exits, so the test can read what was left on screen.
        # COLUMNS and LINES (pytest may set them) would override the pane size in Textual.
        script = f"cd {ROOT} && env -u COLUMNS -u LINES {env} TERM=xterm-256color {extra_env} {command}; echo TUI-EXITED-$?; sleep 60"
        self.run("new-session", "-d", "-s", self.session, "-x", "160", "-y", "45", script)
        self.run("resize-window", "-t", self.session, "-x", "160", "-y", "45")

    def screen(self, escapes: bool = False) -> str:
        return self.run("capture-pane", "-p", *(["-e"] if escapes else []), "-t", self.session)

    def keys(self, *keys: str) -> None:
        self.run("send-keys", "-t", self.session, *keys)

    def kill(self) -> None:
        self.run("kill-server")


def shown_iteration(screen: str) -> int:
    match = re.search(r"iter ([\d,]+)/", screen)
    return int(match.group(1).replace(",", "")) if match else -1


def test_attach_watch_pause_detach_and_reattach(engine_run: RunDir) -> None:
    attach = f"{sys.executable} -m tunetop.cli attach {engine_run.id}"
    tmux = Tmux("first")
    tmux.start(attach)
    try:
        first = wait_for(lambda: shown_iteration(tmux.screen()) > 0 and tmux.screen(), timeout=60)
        start = shown_iteration(first)
        wait_for(lambda: shown_iteration(tmux.screen()) > start, timeout=60)  # the number on screen goes up
        tmux.keys("p")
        wait_for(lambda: send_command(engine_run, "status").result["state"] == "paused", timeout=30)
        wait_for(lambda: "PAUSED" in tmux.screen(), timeout=60)
        held = shown_iteration(tmux.screen())
        time.sleep(1.5)
        assert shown_iteration(tmux.screen()) == held
        tmux.keys("p")  # resume
        wait_for(lambda: send_command(engine_run, "status").result["state"] == "running", timeout=30)
        tmux.keys("q")
        wait_for(lambda: "TUI-EXITED-0" in tmux.screen(), timeout=30)
        left = tmux.run("capture-pane", "-p", "-J", "-t", tmux.session)  # -J: a wrapped line whole
        assert "it goes on training" in left and f"tunetop attach {engine_run.id}" in left
    finally:
        tmux.kill()
    # the engine goes on without the TUI
    after = int(send_command(engine_run, "status").result["iteration"])
    wait_for(lambda: int(send_command(engine_run, "status").result["iteration"]) > after, timeout=60)

    # a second attach shows the whole history: the first validation (iteration 0) and the pause
    second = Tmux("second")
    second.start(attach)
    try:
        def history_shown() -> str | None:
            s = second.screen()
            complete = (
                "state: paused" in s
                and "RUNNING" in s
                and re.search(r"best val loss\s+\d+\.\d{4} @ 0", s)  # the validation before step 1
                and re.search(r"│\s*0\s+\d+\.\d{4}", s)  # ... and its row in the validation table
            )
            return s if complete else None

        screen = wait_for(history_shown, timeout=60)
        assert shown_iteration(screen) >= after
        second.keys("q")
        wait_for(lambda: "TUI-EXITED-0" in second.screen(), timeout=30)
    finally:
        second.kill()
    assert engine_run.is_alive()


def screen_colors(screen: str) -> set[tuple[int, int, int]]:
    """The 24-bit colours in a captured screen's escape sequences (38;2;R;G;B and 48;2;R;G;B)."""
    colors = set()
    for params in re.findall(r"\x1b\[([0-9;]*)m", screen):
        parts = params.split(";")
        for i in range(len(parts) - 4):
            if parts[i] in ("38", "48") and parts[i + 1] == "2":
                colors.add((int(parts[i + 2]), int(parts[i + 3]), int(parts[i + 4])))
    return colors


def test_no_color_makes_the_tui_monochrome(isolated_state: Path) -> None:
    from tests.recorded import write_recorded_run

    run = write_recorded_run(isolated_state)
    seen = {}
    for name, extra in (("colour", "COLORTERM=truecolor"), ("nocolor", "COLORTERM=truecolor NO_COLOR=1")):
        tmux = Tmux(name)
        tmux.start(f"{sys.executable} -m tunetop.cli attach {run.id}", extra_env=extra)
        try:
            wait_for(lambda t=tmux: "FINISHED" in t.screen() and "validation" in t.screen(), timeout=60)
            seen[name] = screen_colors(tmux.screen(escapes=True))
        finally:
            tmux.kill()
    assert any(len({r, g, b}) > 1 for r, g, b in seen["colour"])  # the check can see colour at all
    assert seen["nocolor"] and all(r == g == b for r, g, b in seen["nocolor"])


def test_a_run_that_ends_rings_and_notifies_through_tmux(engine_run: RunDir, tmp_path: Path) -> None:
    """The bell, OSC 9 and OSC 777 in tmux's passthrough, read from the pane's raw output
    (pipe-pane: what the TUI wrote, before tmux interprets it); none for an end that was already
    history when the TUI opened."""
    attach = f"{sys.executable} -m tunetop.cli attach {engine_run.id}"
    raw = tmp_path / "pane.raw"
    tmux = Tmux("notify")
    tmux.start(attach)
    tmux.run("pipe-pane", "-t", tmux.session, f"cat >> {raw}")
    try:
        wait_for(lambda: shown_iteration(tmux.screen()) > 0, timeout=60)
        assert b"\x1bPtmux;" not in raw.read_bytes()
        assert send_command(engine_run, "stop").ok
        wait_for(lambda: "FINISHED" in tmux.screen(), timeout=60)
        title = f"tunetop: {engine_run.id} finished"
        expected = [
            f"\x1bPtmux;\x1b\x1b]9;{title}: stopped at iteration".encode(),
            f"\x1bPtmux;\x1b\x1b]777;notify;{title};stopped at iteration".encode(),
        ]
        seen = wait_for(lambda: (data := raw.read_bytes()) and all(part in data for part in expected) and data, timeout=30)
        assert seen.count(b"\x1b\x1b]9;") == 1 and seen.count(b"\x1b\x1b]777;") == 1  # once, not per repaint
        assert b"\x07" + expected[0] in seen  # the bell, just before
    finally:
        tmux.kill()

    # Opening the finished run later shows its end without ringing again.
    again_raw = tmp_path / "again.raw"
    again = Tmux("notify-again")
    again.start(attach)
    again.run("pipe-pane", "-t", again.session, f"cat >> {again_raw}")
    try:
        wait_for(lambda: "FINISHED" in again.screen(), timeout=60)
        time.sleep(1)
        assert b"]9;" not in again_raw.read_bytes() and b"]777;" not in again_raw.read_bytes()
    finally:
        again.kill()
