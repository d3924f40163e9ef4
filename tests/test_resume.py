"""Exact resume: a run killed with SIGKILL and resumed matches one that was never interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from tests.conftest import tunetop, wait_for, write_config
from tunetop.control.journal import read_events
from tunetop.runs.client_sync import send_command
from tunetop.runs.folders import list_runs, resolve
from tunetop.training.checkpoint import latest_checkpoint, list_checkpoints, read_checkpoint

N = 20


def losses_after(events: list[dict], start_seq: int = 0) -> dict[int, float]:
    return {e["iteration"]: e["loss"] for e in events if e["type"] == "train" and e["seq"] > start_seq}


def test_killed_and_resumed_run_matches_an_uninterrupted_one(tmp_path: Path) -> None:
    training = {"iterations": 2 * N, "steps_per_report": 1, "steps_per_eval": 10 * N, "batch_size": 4}
    # dropout makes the random state matter too
    config = write_config(tmp_path / "run.toml", training=training, lora={"dropout": 0.1}, checkpoints={"save_every": N, "keep_last": 0})

    tunetop("train", str(config), check=True)
    (straight,) = list_runs()
    straight_losses = losses_after(list(read_events(straight.journal)))
    assert sorted(straight_losses) == list(range(1, 2 * N + 1))

    run_id = tunetop("train", str(config), "--detach", check=True).stdout.strip()
    run = resolve(run_id)
    wait_for(lambda: any(e["type"] == "save" and e["iteration"] == N for e in read_events(run.journal)), timeout=120)
    send_command(run, "pause")  # somewhere past N; the kill then lands before 2N
    os.kill(run.engine_pid() or 0, signal.SIGKILL)
    wait_for(lambda: not run.is_alive(), timeout=10)
    killed_at = max(e["iteration"] for e in read_events(run.journal) if e["type"] == "train")
    assert N <= killed_at < 2 * N
    assert latest_checkpoint(run.checkpoints).name == f"{N:07d}"

    resumed = tunetop("train", "--resume", run_id, check=True)
    assert f"resumed at iteration {N}" in resumed.stdout
    events = list(read_events(run.journal))
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))  # one journal, gap-free
    resume_seq = next(e["seq"] for e in events if e["type"] == "resumed")
    again = losses_after(events, resume_seq)
    assert sorted(again) == list(range(N + 1, 2 * N + 1))
    # Exactly equal by construction: the checkpoint holds the weights, the optimizer state and
    # the data position bit for bit, dropout's randomness is seeded per step, and the same
    # operations on the same bits give the same bits on this machine.
    for iteration in again:
        assert again[iteration] == straight_losses[iteration], iteration
    a = mx.load(str(straight.adapters / "adapters.safetensors"))
    b = mx.load(str(run.adapters / "adapters.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(np.array(a[key]), np.array(b[key])), key
    assert events[-1]["type"] == "finished" and events[-1]["iteration"] == 2 * N


def test_resume_from_a_chosen_checkpoint_and_retention(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "run.toml",
        training={"iterations": 30, "steps_per_report": 5, "steps_per_eval": 10},
        checkpoints={"save_every": 5, "keep_last": 2},
    )
    tunetop("train", str(config), check=True)
    (run,) = list_runs()
    kept = [int(p.name) for p in list_checkpoints(run.checkpoints)]
    # the last two, plus the best by validation loss (which may be one of them)
    assert kept[-2:] == [25, 30] and len(kept) <= 3
    state, weights, optimizer = read_checkpoint(latest_checkpoint(run.checkpoints))
    assert state.iteration == 30 and state.trained_tokens > 0 and weights and "step" in optimizer
    missing = tunetop("train", "--resume", run.id, "--from", "7")
    assert missing.returncode == 2 and "no checkpoint at iteration 7" in missing.stderr
    assert "checkpoints at iterations: " in missing.stderr
    first = kept[0]
    result = tunetop("train", "--resume", run.id, "--from", str(first), check=True)
    assert f"resumed at iteration {first}" in result.stdout
    events = list(read_events(run.journal))
    assert events[-1]["type"] == "finished" and events[-1]["iteration"] == 30


def test_nonfinite_loss_pauses_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    # SGD on a loss scaled by 1e30 (its value and gradients still finite) moves the weights by
    # ~1e30 in one step, so the next step's loss is not finite. (A learning rate of 1e30 did it
    # before the config bounded the learning rate.)
    (tmp_path / "scaled_loss.py").write_text(
        "from tunetop.training.trainer import default_loss\n\n\n"
        "def loss(model, tokens, lengths, segments=None):\n"
        "    value, counted = default_loss(model, tokens, lengths, segments=segments)\n"
        "    return value * 1e30, counted\n",
        encoding="utf-8",
    )
    config = write_config(
        tmp_path / "run.toml",
        training={"iterations": 100_000, "steps_per_report": 1, "loss": "scaled_loss.py:loss"},
        optimizer={"learning_rate": 1.0, "name": "sgd"},
        checkpoints={"save_every": 1},
    )
    run = resolve(tunetop("train", str(config), "--detach", check=True).stdout.strip())
    try:
        wait_for(lambda: any(e["type"] == "nonfinite" for e in read_events(run.journal)), timeout=120)
        wait_for(lambda: send_command(run, "status").result["state"] == "paused", timeout=30)
        events = list(read_events(run.journal))
        bad = next(e for e in events if e["type"] == "nonfinite")
        assert bad["action"] == "pause" and "batch" in bad and "epoch" in bad
        assert any(e["type"] == "warning" and f"iteration {bad['iteration']}" in e["message"] for e in events)
        latest = latest_checkpoint(run.checkpoints)
        if latest is not None:  # whatever was saved holds finite weights
            _, weights, _ = read_checkpoint(latest)
            assert all(bool(mx.all(mx.isfinite(w)).item()) for w in weights.values())
        # The bad step's update was undone, so the weights are finite and a save works.
        saved = send_command(run, "save")
        assert saved.ok, saved.error
        _, weights, _ = read_checkpoint(Path(saved.result["checkpoint"]))
        assert all(bool(mx.all(mx.isfinite(w)).item()) for w in weights.values())
    finally:
        if run.is_alive():
            os.kill(run.engine_pid() or 0, signal.SIGKILL)


def _detached(tmp_path: Path):  # type: ignore[no-untyped-def]
    config = write_config(tmp_path / "run.toml", training={"iterations": 100_000, "steps_per_report": 2}, checkpoints={"save_every": 100_000})
    run = resolve(tunetop("train", str(config), "--detach", check=True).stdout.strip())
    wait_for(lambda: send_command(run, "status").result["iteration"] >= 3)
    return run


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _assert_save_fails_and_pauses(run) -> None:  # type: ignore[no-untyped-def]
    good = latest_checkpoint(run.checkpoints)
    assert good is not None
    before = _snapshot(good)
    reply = send_command(run, "save")
    assert not reply.ok and "paused" in reply.error, reply
    assert send_command(run, "status").result["state"] == "paused"
    assert run.is_alive()
    assert _snapshot(good) == before  # the previous checkpoint is untouched
    assert latest_checkpoint(run.checkpoints) == good
    assert not list(run.checkpoints.glob(".tmp-*"))
    errors = [e for e in read_events(run.journal) if e["type"] == "error"]
    # The message names the checkpoint that is intact, by iteration and folder.
    assert errors and f"The last checkpoint, of iteration {int(good.name):,}, is intact ({good})" in errors[-1]["message"]


def test_a_read_only_checkpoint_folder_pauses_the_run(tmp_path: Path) -> None:
    run = _detached(tmp_path)
    immutable = os.geteuid() == 0  # root ignores permission bits; the immutable attribute stops it
    try:
        assert send_command(run, "save").ok
        if immutable:
            result = subprocess.run(["chattr", "+i", str(run.checkpoints)], capture_output=True, text=True)
            if result.returncode != 0:
                pytest.skip(f"chattr +i is not available here: {result.stderr.strip()}")
        else:
            run.checkpoints.chmod(0o500)
        _assert_save_fails_and_pauses(run)
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(run.checkpoints)], check=False)
        else:
            run.checkpoints.chmod(0o755)
        if run.is_alive():
            os.kill(run.engine_pid() or 0, signal.SIGKILL)


def test_a_full_disk_pauses_the_run(tmp_path: Path) -> None:
    run = _detached(tmp_path)
    run.checkpoints.mkdir(exist_ok=True)
    # A real full disk: a small tmpfs over the checkpoints folder.
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(run.checkpoints)], capture_output=True, text=True)
    if mounted.returncode != 0:
        os.kill(run.engine_pid() or 0, signal.SIGKILL)
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        assert send_command(run, "save").ok
        used = sum(p.stat().st_size for p in run.checkpoints.rglob("*") if p.is_file())
        # Shrink the disk to what is used plus a little: the next checkpoint cannot fit.
        subprocess.run(["mount", "-o", f"remount,size={(used + 64 * 1024) // 1024}k", str(run.checkpoints)], check=True)
        _assert_save_fails_and_pauses(run)
        assert send_command(run, "resume").ok  # the run goes on after the user frees space
    finally:
        if run.is_alive():
            os.kill(run.engine_pid() or 0, signal.SIGKILL)
        wait_for(lambda: not run.is_alive(), timeout=10)
        subprocess.run(["umount", str(run.checkpoints)], check=False)


def test_resume_warns_of_config_changes_that_change_the_computation_and_names_them(tmp_path: Path) -> None:
    import tomllib

    import tomli_w

    config = write_config(
        tmp_path / "run.toml",
        training={"iterations": 10, "steps_per_report": 5, "steps_per_eval": 10},
        checkpoints={"save_every": 5},
    )
    tunetop("train", str(config), check=True)
    (run,) = list_runs()

    def edit(section: str, key: str, value: object) -> None:
        values = tomllib.loads(run.config.read_text())
        values.setdefault(section, {})[key] = value
        run.config.write_text("# edited between runs\n" + tomli_w.dumps(values))

    def config_warnings() -> list[str]:
        return [e["message"] for e in read_events(run.journal) if e["type"] == "warning" and "config changed" in e["message"]]

    # How the run is watched and fitted in memory: the resume stays exact, so no warning.
    edit("training", "steps_per_report", 2)
    edit("training", "memory_limit_gb", 8.0)
    edit("training", "memory_budget_gb", 0.5)
    tunetop("train", "--resume", run.id, "--from", "5", check=True)
    assert config_warnings() == []
    # What it computes: the warning names the key, its old and new value, and nothing else.
    edit("optimizer", "learning_rate", 0.002)
    tunetop("train", "--resume", run.id, "--from", "5", check=True)
    (message,) = config_warnings()
    assert "optimizer.learning_rate: " in message and "-> 0.002" in message and "not exact" in message
    assert "steps_per_report" not in message and "memory_limit_gb" not in message and "memory_budget" not in message
