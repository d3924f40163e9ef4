"""SIGKILL at every step of a save, second saves at one iteration included: ``latest`` always
names a complete checkpoint, and the run resumes from it.

The steps are engine.faults points: a traced run lists them, then a fresh process is killed at
each in turn (``TUNETOP_FAULT_KILL_AT=*#K``). The counts these tests print (run with -s) are
recorded in docs/RELIABILITY.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from engine.checkpoint import (
    LATEST,
    TrainerState,
    checkpoint_iteration,
    find_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    prune,
    read_checkpoint,
    recover,
    write_checkpoint,
)
from engine.client_sync import send_command
from engine.journal import read_events
from engine.runs import RunDir, resolve
from tests.conftest import ROOT, tunetop, wait_for, write_config

# Saves in order: their iterations. Saves 3 and 4 are a second and third save at iteration 2.
PLAN = [1, 2, 2, 2, 3]

SAVER = """
import json, sys
import engine
import mlx.core as mx
from pathlib import Path
from engine.checkpoint import TrainerState, prune, write_checkpoint

directory, keep_last, plan = Path(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
for index, iteration in enumerate(plan, start=1):
    print("begin", index, flush=True)
    state = TrainerState(iteration=iteration, trained_tokens=index, epoch=0, position=index,
                         learning_rate_override=None, validation_loss=0.5 if index == 1 else 1.0 + index,
                         seq=index, config_hash="", saved_at=float(index))
    weights = {"w": mx.full((8, 8), float(index))}
    optimizer = {"m": mx.full((8,), float(index)), "step": mx.array(index)}
    write_checkpoint(directory, state, weights, optimizer)
    prune(directory, keep_last)
    print("done", index, flush=True)
"""


def _save_plan(directory: Path, keep_last: int, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", SAVER, str(directory), str(keep_last), json.dumps(PLAN)],
        capture_output=True, text=True, timeout=120, cwd=str(ROOT), env={**os.environ, **env},
    )


def _assert_save(folder: Path, index: int) -> None:
    """``folder`` holds exactly what save number ``index`` of PLAN wrote."""
    state, weights, optimizer = read_checkpoint(folder)
    assert state.seq == index and state.iteration == PLAN[index - 1]
    if not folder.name.startswith(".tmp-"):  # a copy a kill left before its rename (see recover)
        assert checkpoint_iteration(folder) == state.iteration
    assert np.all(np.array(weights["w"]) == index) and np.all(np.array(optimizer["m"]) == index)


# Budgets for a busy machine (tests/conftest.py): a step is one process started, killed and
# checked, or one engine started, trained, saved twice and killed.
SAVER_STEPS, SAVER_STEP_SECONDS = 60, 20
ENGINE_STEPS, ENGINE_STEP_SECONDS = 20, 60


@pytest.mark.slow
@pytest.mark.timeout(SAVER_STEPS * SAVER_STEP_SECONDS)
@pytest.mark.parametrize("keep_last", [1, 2])
def test_a_kill_at_every_step_of_every_save_leaves_latest_complete(tmp_path: Path, keep_last: int) -> None:
    trace = tmp_path / "trace"
    traced = _save_plan(tmp_path / "traced", keep_last, TUNETOP_FAULT_TRACE=str(trace))
    assert traced.returncode == 0, traced.stderr
    steps = trace.read_text().splitlines()
    assert {"checkpoint.renamed", "checkpoint.old renamed", "atomic latest: replaced"} <= set(steps)
    assert len(steps) < SAVER_STEPS  # the budget covers them
    _assert_save(find_checkpoint(tmp_path / "traced", None), len(PLAN))

    in_second_saves = 0
    for kill_at, step in enumerate(steps, start=1):
        directory = tmp_path / f"kill-{kill_at}"
        killed = _save_plan(directory, keep_last, TUNETOP_FAULT_KILL_AT=f"*#{kill_at}")
        assert killed.returncode == -signal.SIGKILL, (step, killed.stderr)
        lines = killed.stdout.split()
        done = max((int(n) for word, n in zip(lines, lines[1:], strict=False) if word == "done"), default=0)
        begun = max(int(n) for word, n in zip(lines, lines[1:], strict=False) if word == "begin")
        in_second_saves += PLAN[begun - 1] in PLAN[: begun - 1]
        latest = latest_checkpoint(directory)
        if latest is None:  # only while the very first save had not switched `latest` yet
            assert done == 0, (step, kill_at)
        else:
            # The last finished save, or the one the kill interrupted: never anything older.
            state = read_checkpoint(latest)[0]
            assert state.seq in (done, begun) and state.seq >= 1, (step, kill_at, done, begun, state.seq)
            _assert_save(latest, state.seq)
            if (directory / LATEST).exists():
                assert (directory / LATEST).read_text().strip() == latest.name, (step, kill_at)
            else:  # the first save of all, killed before it wrote `latest`: its folder (or its
                assert done == 0, (step, kill_at)  # whole copy before the rename) serves
        # What the next engine does: recover, then save again; no leftovers remain after it.
        recover(directory)
        again = TrainerState(iteration=9, trained_tokens=0, epoch=0, position=0, learning_rate_override=None,
                             validation_loss=None, seq=99, config_hash="", saved_at=99.0)
        written = write_checkpoint(directory, again, {"w": mx.zeros((8, 8))}, {"m": mx.zeros((8,)), "step": mx.array(9)})
        prune(directory, keep_last)
        assert latest_checkpoint(directory) == written and written in list_checkpoints(directory)
        assert not [p.name for p in directory.iterdir() if p.name.startswith(".")], (step, kill_at)
    assert in_second_saves > 0
    print(f"\ncheckpoint kills (keep_last {keep_last}): {len(steps)} steps in {len(PLAN)} saves, "
          f"{len(steps)} kills, one at each, {in_second_saves} in a second or third save at one iteration, 0 failures")


def test_complete_copies_left_in_temp_folders_are_recovered(tmp_path: Path) -> None:
    """The state a kill left with the version before 17 (issue 17): ``latest`` names 0000005,
    which is gone; the first save at 5 sits in .tmp-old-*, the second in .tmp-*."""
    directory = tmp_path / "checkpoints"
    for index, name in ((1, "0000005"), (2, "0000005.1")):
        state = TrainerState(iteration=5, trained_tokens=index, epoch=0, position=index, learning_rate_override=None,
                             validation_loss=None, seq=index, config_hash="", saved_at=float(index))
        write_checkpoint(directory, state, {"w": mx.full((8, 8), float(index))}, {"m": mx.full((8,), float(index))})
        assert latest_checkpoint(directory) == directory / name
        if index == 1:
            shutil.copytree(directory / name, tmp_path / "first")
    (directory / "0000005.1").rename(directory / ".tmp-0000005-4242")
    (tmp_path / "first").rename(directory / ".tmp-old-0000005-4242")
    # a torn copy is never taken for a checkpoint
    torn = directory / ".tmp-0000006-4242"
    torn.mkdir()
    for source in (directory / ".tmp-0000005-4242").iterdir():
        data = source.read_bytes().replace(b'"iteration": 5', b'"iteration": 6')
        (torn / source.name).write_bytes(data[: len(data) - 7] if source.suffix == ".safetensors" else data)
    (directory / LATEST).write_text("0000005\n")

    found = find_checkpoint(directory, None)  # read-only: tunetop test / export / the resume check
    assert found == directory / ".tmp-0000005-4242" and read_checkpoint(found)[0].seq == 2
    assert find_checkpoint(directory, 5) == found
    with pytest.raises(Exception, match="no checkpoint at iteration 6"):
        find_checkpoint(directory, 6)

    promoted = recover(directory)  # the engine, holding the lock
    assert [p.name for p in promoted] == ["0000005", "0000005.1"]
    latest = latest_checkpoint(directory)
    assert latest == directory / "0000005.1" and (directory / LATEST).read_text().strip() == "0000005.1"
    assert read_checkpoint(latest)[0].seq == 2 and read_checkpoint(directory / "0000005")[0].seq == 1
    assert recover(directory) == []


def _train_event_after(run: RunDir, iteration: int) -> bool:
    return any(e["type"] == "train" and e["iteration"] > iteration for e in read_events(run.journal))


def _pause_save_arm_save(run: RunDir, armed: Path, after: int, killed: bool) -> int:
    """Wait for training past ``after``, pause, save; then arm the fault and save again at the
    same iteration (the engine dies in it when ``killed``). Returns the paused iteration."""
    wait_for(lambda: _train_event_after(run, after), timeout=120)
    assert send_command(run, "pause").ok
    first = send_command(run, "save", timeout=60)
    assert first.ok, first.error
    armed.touch()
    if not killed:
        assert send_command(run, "save", timeout=60).ok
        return int(first.result["iteration"])
    with contextlib.suppress(TimeoutError):  # killed mid-save: no reply
        send_command(run, "save", timeout=5)
    wait_for(lambda: not run.is_alive(), timeout=60)
    return int(first.result["iteration"])


def _stale_temps(run: RunDir) -> list[str]:
    return [p.name for p in run.adapters.iterdir() if ".tmp" in p.name] if run.adapters.exists() else []


@pytest.mark.slow
@pytest.mark.timeout(ENGINE_STEPS * ENGINE_STEP_SECONDS)
def test_an_engine_killed_at_every_step_of_a_second_save_at_one_iteration_resumes(tmp_path: Path) -> None:
    """The issue's case for real: keep_last = 1, a `save` at an iteration that already has one.
    One engine is traced through the second save; then, run after run, each engine is killed
    at the next step of its second save and the next one resumes."""
    config = write_config(
        tmp_path / "run.toml",
        training={"iterations": 100_000, "steps_per_report": 1, "steps_per_eval": 100_000},
        checkpoints={"save_every": 100_000, "keep_last": 1},
    )
    trace = tmp_path / "trace"
    armed = tmp_path / "armed-0"
    fault = {"TUNETOP_FAULT_TRACE": str(trace), "TUNETOP_FAULT_ARMED": str(armed)}
    run = resolve(tunetop("train", str(config), "--detach", check=True, env={**os.environ, **fault}).stdout.strip())
    iteration = _pause_save_arm_save(run, armed, 0, killed=False)
    steps = trace.read_text().splitlines()
    assert "checkpoint.old renamed" in steps and any(s.startswith("atomic adapters.safetensors") for s in steps)
    assert len(steps) + 2 <= ENGINE_STEPS  # the budget covers them (the traced run and the last resume)
    os.kill(run.engine_pid() or 0, signal.SIGKILL)
    wait_for(lambda: not run.is_alive(), timeout=20)

    temps_cleaned = 0
    for kill_at, step in enumerate(steps, start=1):
        assert read_checkpoint(find_checkpoint(run.checkpoints, None))[0].iteration == iteration
        armed = tmp_path / f"armed-{kill_at}"
        fault = {"TUNETOP_FAULT_KILL_AT": f"*#{kill_at}", "TUNETOP_FAULT_ARMED": str(armed)}
        left_before = _stale_temps(run)
        tunetop("train", "--resume", run.id, "--detach", check=True, env={**os.environ, **fault})
        wait_for(lambda: _train_event_after(run, iteration), timeout=120)  # noqa: B023
        assert not _stale_temps(run), (step, _stale_temps(run))  # the kill's leftovers went at the start
        temps_cleaned += bool(left_before)
        resumed = [e for e in read_events(run.journal) if e["type"] == "resumed"][-1]
        assert resumed["iteration"] == iteration, step
        iteration = _pause_save_arm_save(run, armed, iteration, killed=True)
    assert temps_cleaned > 0  # some kill landed between an adapter's temp file and its rename

    tunetop("train", "--resume", run.id, "--detach", check=True)
    wait_for(lambda: _train_event_after(run, iteration), timeout=120)
    assert send_command(run, "stop", timeout=60).ok
    wait_for(lambda: not run.is_alive(), timeout=60)
    events = list(read_events(run.journal))
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["type"] == "finished"
    assert not [p.name for p in run.checkpoints.iterdir() if p.name.startswith(".")]
    print(f"\nengine second-save kills: {len(steps)} steps, {len(steps)} engines killed, one at each, "
          f"{len(steps) + 1} resumes, {temps_cleaned} left adapter temp files that the resume removed, 0 failures")
