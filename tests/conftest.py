"""Shared fixtures, and how the suite runs: on a busy machine, in parallel, leaving nothing behind.

- Parallel: one pytest-xdist worker per core (``-n auto --dist worksteal`` in pyproject.toml;
  ``-n0`` runs in this process, for ``-s`` or ``--pdb``). Each test has its own runs folder,
  socket folder and config folder (``isolated_state``); tmux servers are named by pid, sshd and
  TCP ports are probed free. A new test file needs nothing more, as long as what it shares
  beyond these is named per process (``os.getpid()``) or per test (``tmp_path``). Tests marked
  ``slow`` run first, so a long one never starts last on a worker.
- One embedded model for the whole run: built once (``embedded_cache``), under a file lock the
  workers share, into ``$TUNETOP_TEST_CACHE`` or the run's temporary folder.
- Busy machines: a test is bounded by counts (iterations, kills), never by how much fits in a
  time; its waits are generous and poll (``wait_for``). pytest-timeout ends a test after
  ``timeout`` (pyproject.toml: 300 s, raised in-test by its ``signal`` method, so teardown
  runs); a test that does more carries its own ``pytest.mark.timeout``: a per-step budget
  times its steps.
- No process outlives its test: every process a test starts carries the test's token in its
  environment, and tests/processes.py ends what is left after the test, at the end of the
  session, and (a watchdog) when pytest itself is killed. Nothing to do in a new test; a test
  that leaves something running gets a warning naming it.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import engine  # noqa: E402,F401  (loads OpenBLAS before anything imports mlx)
from engine.runs import RunDir, resolve  # noqa: E402

pytest_plugins = ["tests.processes"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow tests first (stable otherwise): with workers, a long test must not start last."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session", autouse=True)
def embedded_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the embedded model once per run, into a cache the workers and subprocesses share."""
    # A worker's temporary folder is a sub-folder of the run's; a run without workers has its own.
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    run_folder = tmp_path_factory.getbasetemp().parent if worker else tmp_path_factory.getbasetemp()
    cache = Path(os.environ.get("TUNETOP_TEST_CACHE") or run_folder / "embedded-cache")
    cache.mkdir(parents=True, exist_ok=True)
    os.environ["TUNETOP_CACHE"] = str(cache)
    from engine.demo import build_embedded

    # One worker builds (20 s on an idle core, minutes on a busy one); the others wait for it.
    with open(cache / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        build_embedded()
    return cache


@pytest.fixture(autouse=True)
def isolated_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Each test gets its own runs folder and a short private socket folder."""
    home = tmp_path / "home"
    monkeypatch.setenv("TUNETOP_HOME", str(home))
    sockets = tempfile.mkdtemp(prefix="tt-", dir="/tmp")
    os.chmod(sockets, 0o700)
    monkeypatch.setenv("TUNETOP_SOCKET_DIR", sockets)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield home
    shutil.rmtree(sockets, ignore_errors=True)


def wait_for(predicate: Any, timeout: float = 60.0, interval: float = 0.1) -> Any:
    """Poll until ``predicate()`` is truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


@pytest.fixture
def engine_run(tmp_path: Path) -> Iterator[RunDir]:
    """A detached engine training (for a long time) on the embedded model; killed afterwards."""
    config = write_config(
        tmp_path / "run.toml",
        training={"iterations": 100_000, "steps_per_report": 2, "steps_per_eval": 10_000},
        checkpoints={"save_every": 10_000},
    )
    result = tunetop("train", str(config), "--detach", check=True)
    run = resolve(result.stdout.strip())
    yield run
    pid = run.engine_pid()
    if run.is_alive() and pid:
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not run.is_alive(), timeout=10)


def write_config(path: Path, **sections: dict) -> Path:
    """A small, fast config on the embedded model, with per-section overrides."""
    import tomli_w

    base: dict = {
        "name": "test",
        "data": {"mask_prompt": True},
        "lora": {"rank": 4, "scale": 20.0},
        "training": {
            "batch_size": 4,
            "iterations": 40,
            "steps_per_report": 5,
            "steps_per_eval": 20,
            "validation_batches": 2,
        },
        "optimizer": {"learning_rate": 5e-4},
        "checkpoints": {"save_every": 20},
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            base.setdefault(name, {}).update(values)
        else:
            base[name] = values
    path.write_text(tomli_w.dumps(base))
    return path


def tunetop(*args: str, timeout: float = 300, check: bool = False, **kwargs) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess."""
    result = subprocess.run(
        [sys.executable, "-m", "engine.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(ROOT),
        **kwargs,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"tunetop {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result
