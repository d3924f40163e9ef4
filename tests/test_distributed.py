"""Data-parallel runs: real ranks on localhost over mx.distributed's ring backend.

Each test starts real processes (rank 0 is the engine; it starts the other ranks) that talk
over real TCP sockets, on the embedded model.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from engine.client_sync import send_command
from engine.journal import read_events
from engine.runs import RunDir, list_runs, resolve
from tests import sshd
from tests.conftest import ROOT, tunetop, wait_for, write_config

ITERATIONS = 4
TRAINING = {"iterations": ITERATIONS, "steps_per_report": 1, "steps_per_eval": 100, "batch_size": 6}
# Plain SGD, so a step's update is proportional to the combined gradient: Adam divides by the
# gradient's own scale and would hide a wrongly scaled combination. Few steps, because the
# embedded model's first steps amplify the rounding of summing in another order (~1e-7) by
# about 5x a step (4e-6 at step 4, 1e-4 to 1e-3 by step 6-8, for any optimizer or rate tried).
# That growth is the model's and the data's (the same on any CPU); only the seed, float32
# rounding, varies with the CPU's kernels. So at step 4 the losses agree to LOSS_RTOL = 1e-4
# (25x what was seen) and the adapters to ADAPTER_RTOL = 1e-3, while a wrongly combined gradient
# (a rank's share left out, or not averaged) moves them by percents.
LOSS_RTOL = 1e-4
ADAPTER_RTOL = 1e-3
OPTIMIZER = {"name": "sgd", "learning_rate": 0.001}


def losses(events: list[dict], after_seq: int = 0) -> dict[int, float]:
    return {e["iteration"]: e["loss"] for e in events if e["type"] == "train" and e["seq"] > after_seq}


def follower_pids(run: RunDir) -> list[int]:
    """Processes running `_follower` in this run's folder."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if b"_follower" in cmdline and Path(cwd) == run.path:
            found.append(int(entry.name))
    return found


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture(scope="module")
def single_process(tmp_path_factory: pytest.TempPathFactory, embedded_cache: Path) -> tuple[dict[int, float], dict]:
    """Losses and final adapter of a one-process run with the same global batch."""
    folder = tmp_path_factory.mktemp("single")
    os.environ["TUNETOP_HOME"] = str(folder / "home")
    try:
        config = write_config(folder / "run.toml", training=TRAINING, optimizer=OPTIMIZER)
        tunetop("train", str(config), check=True)
        (run,) = list_runs()
        return losses(list(read_events(run.journal))), mx.load(str(run.adapters / "adapters.safetensors"))
    finally:
        del os.environ["TUNETOP_HOME"]


@pytest.mark.parametrize(
    ("ranks", "how"),
    [(2, ["--np", "2"]), (3, ["--np", "3"]), (2, ["--hosts", "127.0.0.1,127.0.0.1"])],
    ids=["np2", "np3", "hosts"],
)
def test_ranks_train_as_one_process_with_the_same_global_batch(
    ranks: int, how: list[str], tmp_path: Path, single_process: tuple[dict[int, float], dict]
) -> None:
    expected, expected_adapter = single_process
    config = write_config(tmp_path / "run.toml", training=TRAINING, optimizer=OPTIMIZER)
    result = tunetop("train", str(config), *how, check=True)
    (run,) = list_runs()
    events = list(read_events(run.journal))
    (world,) = [e for e in events if e["type"] == "world"]
    assert (world["size"], world["backend"]) == (ranks, "ring")
    got = losses(events)
    assert sorted(got) == list(range(1, ITERATIONS + 1))
    for iteration, loss in got.items():
        assert loss == pytest.approx(expected[iteration], rel=LOSS_RTOL), iteration
    # The weights moved (LoRA's B starts at zero), so matching losses mean matching gradients.
    assert all(np.abs(np.array(v)).max() > 0 for k, v in expected_adapter.items() if k.endswith("lora_b"))
    adapter = mx.load(str(run.adapters / "adapters.safetensors"))
    # The adapters as a whole agree to a part in a thousand (a wrongly combined gradient is off by
    # far more); single small matrices (an attention LoRA B of norm 2e-3) only to a few parts.
    keys = sorted(expected_adapter)
    ours = np.concatenate([np.array(adapter[k]).ravel() for k in keys])
    reference = np.concatenate([np.array(expected_adapter[k]).ravel() for k in keys])
    assert np.linalg.norm(ours - reference) <= ADAPTER_RTOL * np.linalg.norm(reference)
    # Every follower followed to the end and left cleanly.
    logs = "".join((run.path / f"rank{r}.log").read_text() for r in range(1, ranks))
    for rank in range(1, ranks):
        assert f"rank {rank}: stop at iteration {ITERATIONS}" in logs
    assert "finished (completed)" in result.stdout
    assert not follower_pids(run)


def test_a_rank_over_ssh_trains_in_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, single_process: tuple[dict[int, float], dict]
) -> None:
    """Rank 1 started through a real sshd on localhost, as on another host."""
    server = sshd.start(tmp_path / "ssh")
    try:
        monkeypatch.setenv("TUNETOP_SSH", f"ssh -F {server.client_config}")
        monkeypatch.setenv("TUNETOP_REMOTE_TUNETOP", sshd.remote_tunetop_command(dict(os.environ), ROOT))
        config = write_config(tmp_path / "run.toml", training=TRAINING, optimizer=OPTIMIZER)
        tunetop("train", str(config), "--hosts", f"127.0.0.1,{server.user}@127.0.0.1:{server.port}", check=True)
    finally:
        server.stop()
    (run,) = list_runs()
    got = losses(list(read_events(run.journal)))
    expected, _ = single_process
    assert sorted(got) == list(range(1, ITERATIONS + 1))
    for iteration, loss in got.items():
        assert loss == pytest.approx(expected[iteration], rel=LOSS_RTOL), iteration
    assert f"rank 1: stop at iteration {ITERATIONS}" in (run.path / "rank1.log").read_text()


def test_batch_size_must_split_over_the_ranks(tmp_path: Path) -> None:
    config = write_config(tmp_path / "run.toml", training={"batch_size": 4})
    result = tunetop("train", str(config), "--np", "3")
    assert result.returncode == 2
    assert "batch_size = 4" in result.stderr and "--np" in result.stderr
    assert not list_runs()


def test_pause_resume_set_evaluate_save_stop_reach_every_rank(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "run.toml",
        training={"iterations": 100_000, "steps_per_report": 2, "steps_per_eval": 100_000},
        checkpoints={"save_every": 100_000},
    )
    run = resolve(tunetop("train", str(config), "--detach", "--np", "2", check=True).stdout.strip())
    try:
        wait_for(lambda: any(e["type"] == "train" for e in read_events(run.journal)), timeout=120)
        (follower,) = follower_pids(run)

        assert send_command(run, "pause").ok
        held = run.status()["iteration"]
        cpu_before = cpu_seconds(follower)
        time.sleep(2.0)
        assert run.status()["iteration"] == held
        # The follower sleeps on its control socket while paused (a collective would spin a core).
        assert cpu_seconds(follower) - cpu_before < 0.5

        assert send_command(run, "set", {"learning_rate": 1e-4, "memory_limit_gb": 4}).ok
        assert send_command(run, "evaluate").ok
        assert send_command(run, "save").ok
        assert send_command(run, "resume").ok
        wait_for(lambda: run.status().get("iteration", 0) > held + 4, timeout=60)
        rates = [e["learning_rate"] for e in read_events(run.journal) if e["type"] == "train" and e["iteration"] > held + 2]
        assert rates and all(r == 1e-4 for r in rates)  # the double that was set, through JSON

        assert send_command(run, "stop").ok
        wait_for(lambda: not run.is_alive(), timeout=60)
        events = list(read_events(run.journal))
        finished = [e for e in events if e["type"] == "finished"]
        assert finished[-1]["reason"] == "stopped"
        last = finished[-1]["iteration"]
        follower_log = (run.path / "rank1.log").read_text()
        assert f"rank 1: stop at iteration {last}" in follower_log
        assert "rank 1: memory_limit_gb = 4 from iteration " in follower_log  # the live cap reached it
        wait_for(lambda: not follower_pids(run), timeout=60)
        weights = mx.load(str(run.adapters / "adapters.safetensors"))
        assert weights and all(bool(mx.all(mx.isfinite(v)).item()) for v in weights.values())
    finally:
        for pid in follower_pids(run) + [run.engine_pid() or 0]:
            if pid and run.is_alive():
                os.kill(pid, signal.SIGKILL)


def test_a_killed_rank_ends_the_run_with_an_event_and_the_run_resumes_exactly(tmp_path: Path) -> None:
    training = {"iterations": 16, "steps_per_report": 1, "steps_per_eval": 100, "batch_size": 4}
    config = write_config(tmp_path / "run.toml", training=training, checkpoints={"save_every": 4, "keep_last": 0})
    tunetop("train", str(config), "--np", "2", check=True)
    (straight,) = list_runs()
    straight_losses = losses(list(read_events(straight.journal)))

    # Slow steps (a pause after each report) so the kill lands mid-run.
    run = resolve(tunetop("train", str(config), "--detach", "--np", "2", check=True).stdout.strip())
    wait_for(lambda: any(e["type"] == "save" and e["iteration"] >= 4 for e in read_events(run.journal)), timeout=120)
    send_command(run, "pause")
    (follower,) = follower_pids(run)
    os.kill(follower, signal.SIGKILL)
    wait_for(lambda: not run.is_alive(), timeout=60)
    events = list(read_events(run.journal))
    (failed,) = [e for e in events if e["type"] == "rank_failed"]
    assert failed["ranks"] == [1]
    assert "--resume" in failed["message"]
    assert events[-1]["type"] == "finished" and events[-1]["reason"] == "rank_failed"

    resumed = tunetop("train", "--resume", run.id, "--np", "2", check=True)
    assert "resumed at iteration" in resumed.stdout
    events = list(read_events(run.journal))
    resume_seq = max(e["seq"] for e in events if e["type"] == "resumed")
    again = losses(events, resume_seq)
    assert max(again) == 16
    for iteration, loss in again.items():  # exactly equal by construction, as in test_resume.py
        assert loss == straight_losses[iteration], iteration
