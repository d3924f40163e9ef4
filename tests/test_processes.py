"""The suite leaves no process behind (tests/processes.py), checked on a pytest run of its own.

Each case runs a small test file in a separate pytest (with the plugin, as the suite runs it)
whose tests start processes in their own sessions and never stop them, then checks that every
one of them is gone once that pytest is over: after a test that passed, after one that timed
out, and after pytest itself was killed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, wait_for

INNER = '''
import os, signal, subprocess, sys, time
from pathlib import Path

import pytest

from engine.runs import resolve
from tests.conftest import tunetop, write_config

PIDS = Path(os.environ["INNER_PIDS"])


def sleeper() -> int:
    """A process in a session of its own, as a detached engine is: no process group reaches it."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    with PIDS.open("a") as file:
        file.write(f"{process.pid}\\n")
    return process.pid


def test_forgets_an_engine(tmp_path):
    config = write_config(tmp_path / "run.toml", training={"iterations": 100_000, "steps_per_eval": 100_000})
    run = resolve(tunetop("train", str(config), "--detach", check=True).stdout.strip())
    with PIDS.open("a") as file:
        file.write(f"{run.engine_pid()}\\n")


@pytest.mark.timeout(3)
def test_times_out():
    sleeper()
    time.sleep(600)


def test_pytest_is_killed():
    if os.environ.get("INNER_KILL") != "1":
        pytest.skip("only in the run that kills pytest")
    sleeper()
    os.kill(os.getpid(), signal.SIGKILL)
'''


def _alive(pid: int) -> bool:
    """Running, or stopped; not gone and not a zombie (dead, waiting for its parent to notice)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _inner_pytest(tmp_path: Path, *args: str, kill: bool = False) -> tuple[subprocess.CompletedProcess, list[int]]:
    folder = tmp_path / ("killed" if kill else "normal")
    folder.mkdir()
    (folder / "pytest.ini").write_text("[pytest]\n")  # its own rootdir: none of the suite's options
    (folder / "test_inner.py").write_text(INNER)
    pids = folder / "pids"
    pids.touch()
    env_extra = {"INNER_PIDS": str(pids), "INNER_KILL": "1" if kill else "0", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.processes", "-p", "no:cacheprovider", "-p", "no:xdist",
         "--rootdir", str(folder), *args, str(folder / "test_inner.py")],
        cwd=str(folder), env={**os.environ, **env_extra}, capture_output=True, text=True, timeout=600,
    )
    return result, [int(line) for line in pids.read_text().split()]


def test_what_a_test_leaves_running_is_ended_after_it(tmp_path: Path) -> None:
    result, pids = _inner_pytest(tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output  # the timed-out test fails; the other two pass or skip
    assert "1 failed, 1 passed, 1 skipped" in output and "Timeout" in output, output
    assert len(pids) == 2  # the engine and the sleeper
    # The sweeps ran before that pytest ended: nothing of them is running now.
    assert not [pid for pid in pids if _alive(pid)], output
    assert output.count("left 1 process(es) running (5 s after it), ended now") == 2, output


def test_what_a_killed_pytest_left_running_is_ended_by_its_watchdog(tmp_path: Path) -> None:
    result, pids = _inner_pytest(tmp_path, "-k", "killed", kill=True)
    assert result.returncode == -9, result.stdout + result.stderr  # pytest itself was killed
    (pid,) = pids
    wait_for(lambda: not _alive(pid), timeout=60)  # the watchdog notices within a second
