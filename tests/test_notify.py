"""Notifications and `tunetop wait`, with real engines: notify.command hears the run's end (and a
pause on a non-finite step) with the event on stdin; a hanging or failing command costs the run
nothing; `wait` blocks until the run ends and exits with the code of how it ended."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, tunetop, wait_for, write_config
from tunetop.control.journal import read_events
from tunetop.runs.client_sync import send_command
from tunetop.runs.folders import RunDir, list_runs, resolve
from tunetop.runs.notify import WAIT_CODES, WAIT_ENGINE_GONE, WAIT_TIMED_OUT, Ending, describe, is_notable
from tunetop.tui.notify import fresh, sequences


def events_of(run: RunDir) -> list[dict]:
    return list(read_events(run.journal))


def script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return path


def wait(run: RunDir, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "tunetop.cli", "wait", run.id, *extra], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# -- the pure parts ------------------------------------------------------------------------

def test_what_is_notable_and_how_wait_reads_a_journal() -> None:
    assert is_notable({"type": "finished", "reason": "completed"})
    assert is_notable({"type": "nonfinite", "action": "pause"})
    assert not is_notable({"type": "nonfinite", "action": "skipped"})
    assert not is_notable({"type": "state", "state": "paused"})  # a pause someone asked for
    ending = Ending()
    for event in ({"type": "finished", "reason": "stopped"}, {"type": "resumed"}, {"type": "train"}):
        ending.apply(event)
    assert ending.reason == ""  # resumed after it ended: it goes on
    ending.apply({"type": "nonfinite", "action": "pause"})
    assert ending.reason == "paused_nonfinite"
    ending.apply({"type": "state", "state": "running"})
    assert ending.reason == ""
    ending.apply({"type": "finished", "reason": "early_stopped"})
    assert WAIT_CODES[ending.reason] == 10
    # distinct from each other where the reason differs in kind, and from the CLI's 1-4, 130, 143
    assert not set(WAIT_CODES.values()) & {1, 2, 3, 4, 130, 143}
    assert len({WAIT_CODES[r] for r in ("completed", "early_stopped", "stopped", "paused_nonfinite", "non_finite",
                                         "failed", "interrupted")} | {WAIT_ENGINE_GONE, WAIT_TIMED_OUT}) == 9
    title, body = describe({"type": "finished", "run": "r1", "reason": "early_stopped", "iteration": 16,
                            "best_iteration": 4, "best_loss": 1.5})
    assert title == "tunetop: r1 finished" and body == "early stopped at iteration 16; best validation loss 1.5000 at iteration 4"


def test_terminal_sequences_and_only_fresh_events() -> None:
    plain = sequences("tunetop: r1 finished", "completed at iteration 3", tmux=False)
    assert plain == ("\x1b]9;tunetop: r1 finished: completed at iteration 3\x07"
                     "\x1b]777;notify;tunetop: r1 finished;completed at iteration 3\x07")
    wrapped = sequences("t", "b\x1b[2J", tmux=True)  # control characters in a text never reach the terminal raw
    assert wrapped == "\x1bPtmux;\x1b\x1b]9;t: b [2J\x07\x1b\\\x1bPtmux;\x1b\x1b]777;notify;t;b [2J\x07\x1b\\"
    now = time.time()
    history = [{"type": "finished", "ts": now - 3600}, {"type": "nonfinite", "action": "pause", "ts": now - 60}]
    live = [{"type": "nonfinite", "action": "pause", "ts": now}, {"type": "train", "ts": now}]
    assert fresh(history + live, opened_at=now - 1) == live[:1]


# -- notify.command ------------------------------------------------------------------------

def test_notify_command_gets_the_finished_event_on_stdin_and_wait_says_completed(tmp_path: Path) -> None:
    out = tmp_path / "heard.jsonl"
    hook = script(tmp_path / "hook.sh", f'cat >> {out}; echo "$TUNETOP_MESSAGE" >> {tmp_path / "message"}')
    config = write_config(tmp_path / "run.toml", training={"iterations": 6, "steps_per_eval": 3},
                          checkpoints={"save_every": 3}, notify={"command": str(hook)})
    tunetop("train", str(config), check=True)
    (run,) = list_runs()
    finished = [e for e in events_of(run) if e["type"] == "finished"]
    heard = [json.loads(line) for line in out.read_text().splitlines()]
    assert heard == finished and heard[0]["reason"] == "completed"
    assert (tmp_path / "message").read_text().startswith(f"tunetop: {run.id} finished: completed at iteration 6")
    assert not [e for e in events_of(run) if e["type"] == "warning" and "notify" in e["message"]]
    done = tunetop("wait", run.id)  # an ended run answers at once
    assert done.returncode == 0 and "completed at iteration 6" in done.stdout


@pytest.mark.parametrize("kind", ["hanging", "failing"])
def test_a_hanging_or_failing_notify_command_costs_the_run_nothing(tmp_path: Path, kind: str) -> None:
    pid_file = tmp_path / "pid"
    body = f"echo $$ > {pid_file}; exec sleep 600" if kind == "hanging" else "echo cannot reach ntfy >&2; exit 7"
    hook = script(tmp_path / "hook.sh", body)
    config = write_config(tmp_path / "run.toml", training={"iterations": 6, "steps_per_eval": 3},
                          checkpoints={"save_every": 3}, notify={"command": str(hook), "timeout": 2})
    started = time.monotonic()
    result = tunetop("train", str(config), timeout=240)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 200  # the engine did not wait for sleep 600
    (run,) = list_runs()
    events = events_of(run)
    assert [e["iteration"] for e in events if e["type"] == "train"][-1] == 6
    end = next(i for i, e in enumerate(events) if e["type"] == "finished")
    assert events[end]["reason"] == "completed" and (run.adapters / "adapters.safetensors").is_file()
    warnings = [e["message"] for e in events[end:] if e["type"] == "warning"]
    if kind == "hanging":
        assert warnings == [f"notify.command for the finished event (seq {events[end]['seq']}) was still running "
                            "after 2 s (notify.timeout) and was killed"]
        pid = int(pid_file.read_text())
        wait_for(lambda: not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2],
                 timeout=10)
    else:
        assert warnings == [f"notify.command for the finished event (seq {events[end]['seq']}) exited with code 7: "
                            "cannot reach ntfy"]
    assert not run.is_alive()


# -- tunetop wait --------------------------------------------------------------------------

NAN_LOSS = """
import mlx.core as mx
from tunetop.training.trainer import default_loss


def nan_loss(model, tokens, lengths, segments=None):
    loss, count = default_loss(model, tokens, lengths)
    return loss * mx.array(float("nan")), count
"""


@pytest.mark.timeout(400)
def test_wait_returns_when_the_run_pauses_on_nan_and_again_when_it_is_stopped(tmp_path: Path) -> None:
    out = tmp_path / "heard.jsonl"
    hook = script(tmp_path / "hook.sh", f"cat >> {out}")
    (tmp_path / "losses.py").write_text(NAN_LOSS)
    config = write_config(tmp_path / "run.toml", data={"mask_prompt": True, "packing": "off"},
                          training={"iterations": 100_000, "steps_per_report": 1, "on_nonfinite": "pause",
                                    "loss": "losses.py:nan_loss"}, notify={"command": str(hook)})
    run = resolve(tunetop("train", str(config), "--detach", check=True).stdout.strip())
    try:
        paused = wait(run)
        assert paused.wait(timeout=120) == WAIT_CODES["paused_nonfinite"] == 12
        assert "paused: non-finite loss at iteration 1" in paused.stdout.read()  # type: ignore[union-attr]
        heard = wait_for(lambda: out.exists() and [json.loads(line) for line in out.read_text().splitlines()], timeout=30)
        assert heard[0]["type"] == "nonfinite" and heard[0]["action"] == "pause"
        assert run.is_alive()  # it waits for someone
        stopped = wait(run, "--timeout", "300")
        assert send_command(run, "stop").ok
        assert stopped.wait(timeout=120) == WAIT_CODES["stopped"] == 11
        assert "stopped at iteration" in stopped.stdout.read()  # type: ignore[union-attr]
        wait_for(lambda: len(out.read_text().splitlines()) == 2, timeout=30)
        assert json.loads(out.read_text().splitlines()[1])["reason"] == "stopped"
    finally:
        if run.is_alive():
            os.kill(run.engine_pid() or 0, signal.SIGKILL)


def test_wait_blocks_through_a_pause_gives_up_at_its_timeout_and_sees_a_killed_engine(engine_run: RunDir) -> None:
    wait_for(lambda: send_command(engine_run, "status").result.get("iteration", 0) >= 1, timeout=60)
    assert send_command(engine_run, "pause").ok  # a pause someone asked for is no end
    assert wait(engine_run, "--timeout", "2").wait(timeout=60) == WAIT_TIMED_OUT == 17
    waiting = wait(engine_run)
    time.sleep(2)
    assert waiting.poll() is None
    os.kill(engine_run.engine_pid() or 0, signal.SIGKILL)
    assert waiting.wait(timeout=60) == WAIT_ENGINE_GONE == 16
    assert f"tunetop train --resume {engine_run.id}" in waiting.stderr.read()  # type: ignore[union-attr]
