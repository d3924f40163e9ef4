"""Shared fixtures: one embedded model per test session, a private state dir per test."""

from __future__ import annotations

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


@pytest.fixture(scope="session", autouse=True)
def embedded_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the embedded model once per session, into a cache the subprocesses share."""
    cache = Path(os.environ.get("TUNETOP_TEST_CACHE") or tmp_path_factory.mktemp("cache"))
    os.environ["TUNETOP_CACHE"] = str(cache)
    from engine.demo import build_embedded

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
