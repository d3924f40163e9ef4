"""The queue and sweeps, with real processes: the CLI, the detached scheduler, real engines on the embedded model.

The durability test kills the scheduler (and at times every engine too) with SIGKILL at random
moments, round after round, and checks that every queued run ended exactly once, in one run
folder, continued with the exact resume where it had saved.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from textual.widgets import DataTable

from tests.conftest import tunetop, wait_for, write_config
from tunetop.control.journal import read_events
from tunetop.runs.folders import RunDir, list_runs, runs_root
from tunetop.runs.queue import add_configs, load_queue
from tunetop.runs.scheduler import scheduler_pid
from tunetop.training import config as config_module
from tunetop.training.checkpoint import latest_checkpoint

TINY = {"iterations": 6, "steps_per_report": 2, "steps_per_eval": 1000, "validation_batches": 1, "batch_size": 2}


def tiny(path: Path, name: str, **training: Any) -> Path:
    return write_config(path, name=name, training={**TINY, **training}, checkpoints={"save_every": 2})


def queue_state() -> dict[str, Any]:
    return json.loads(tunetop("queue", "--json", check=True).stdout)


def pending_names() -> list[str]:
    return [e.name for e in load_queue().pending()]


def all_ended() -> bool:
    queue = load_queue()
    return bool(queue.entries) and all(e.state in ("done", "failed") for e in queue.entries)


def wait_idle(timeout: float = 60) -> None:
    wait_for(lambda: scheduler_pid() is None, timeout=timeout)


# -- validation before queueing ------------------------------------------------------


def test_queue_add_validates_every_config_before_queueing_any(tmp_path: Path) -> None:
    good = tiny(tmp_path / "good.toml", "good")
    bad = tmp_path / "bad.toml"
    bad.write_text('[lora]\nrnak = 8\n')
    result = tunetop("queue", "add", str(good), str(bad))
    assert result.returncode == 2
    assert f"{bad}:2: unknown key 'lora.rnak'. Did you mean 'rank'?" in result.stderr
    assert "Traceback" not in result.stderr
    assert load_queue().entries == [] and scheduler_pid() is None  # the good one was not queued either

    missing = tunetop("queue", "add", str(tmp_path / "nope.toml"))
    assert missing.returncode == 2 and "no such config file" in missing.stderr
    no_data = write_config(tmp_path / "nodata.toml", data={"path": str(tmp_path / "absent")})
    result = tunetop("queue", "add", str(no_data))
    assert result.returncode == 2 and "'data.path'" in result.stderr and "is not a directory" in result.stderr
    two = tunetop("queue", "add", str(good), str(good), "--name", "x")
    assert two.returncode == 2 and "--name names one run" in two.stderr
    assert load_queue().entries == []


def test_sweep_validates_every_value_and_combination_before_queueing(tmp_path: Path) -> None:
    config = tiny(tmp_path / "base.toml", "base")
    cases = [
        (["--set", "lora.rank=8,0"], "--set lora.rank=0: 'lora.rank' must be at least 1, got 0."),
        (["--set", "lora.rnak=8,16"], "--set lora.rnak: unknown key 'lora.rnak'. Did you mean 'rank'?"),
        (["--set", "optimizer.learning_rate=1e-5,fast"], "--set optimizer.learning_rate=fast: 'optimizer.learning_rate' must be a finite number, got a string"),
        (["--set", "rank=8"], "--set rank: a sweep sets keys of a table as SECTION.KEY"),
        # each value is valid alone; adafactor with a non-default eps is not
        (["--set", "optimizer.name=adam,adafactor", "--set", "optimizer.eps=1e-8,1e-6"],
         "the combination optimizer.name=adafactor, optimizer.eps=1e-6: 'optimizer.eps' does not apply to adafactor"),
        (["--set", "lora.rank=8,16", "--random", "5"], "--random 5: the grid has 2 combinations"),
    ]
    for args, message in cases:
        result = tunetop("sweep", str(config), *args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert load_queue().entries == [] and scheduler_pid() is None

    dry = tunetop("sweep", str(config), "--set", "optimizer.learning_rate=1e-5,3e-5,1e-4", "--set", "lora.rank=8,16",
                  "--dry-run", check=True)
    names = dry.stdout.splitlines()[:-1]
    assert names == [f"base-lr{lr}-r{r}" for lr in ("1e-5", "3e-5", "1e-4") for r in (8, 16)]
    assert load_queue().entries == []
    draws = [tunetop("sweep", str(config), "--set", "optimizer.learning_rate=1e-5,3e-5,1e-4", "--set", "lora.rank=8,16",
                     "--random", "3", "--seed", "7", "--dry-run", check=True).stdout for _ in range(2)]
    assert draws[0] == draws[1] and len(draws[0].splitlines()) == 4 and "--seed 7" in draws[0]
    assert set(draws[0].splitlines()[:3]) <= set(names)


# -- ordering ----------------------------------------------------------------------------


def test_queue_order_commands(tmp_path: Path) -> None:
    tunetop("queue", "pause", check=True)  # nothing starts: the order is all there is to see
    configs = [str(tiny(tmp_path / f"{n}.toml", n)) for n in ("a", "b", "c")]
    added = tunetop("queue", "add", *configs, check=True)
    assert "queued 1: a" in added.stdout and "queued 3: c" in added.stdout and "paused" in added.stdout
    assert scheduler_pid() is None
    assert pending_names() == ["a", "b", "c"]
    assert "now 2nd in line" in tunetop("queue", "up", "3", check=True).stdout
    assert pending_names() == ["a", "c", "b"]
    tunetop("queue", "down", "1", check=True)
    assert pending_names() == ["c", "a", "b"]
    tunetop("queue", "up", "c", check=True)  # by name; already first: stays
    assert pending_names() == ["c", "a", "b"]
    tunetop("queue", "down", "2", check=True)
    tunetop("queue", "down", "2", check=True)  # already last: stays
    assert pending_names() == ["c", "a", "b"]
    assert "removed queue entry 1 (a)" in tunetop("queue", "rm", "1", check=True).stdout
    assert pending_names() == ["c", "b"]
    unknown = tunetop("queue", "rm", "99")
    assert unknown.returncode == 2 and "no queue entry '99'" in unknown.stderr
    shown = queue_state()
    assert shown["paused"] is True and shown["scheduler"] is None
    assert [(e["id"], e["position"]) for e in shown["entries"]] == [(3, 1), (2, 2)]
    listing = tunetop("queue", check=True).stdout.splitlines()
    assert listing[0].startswith("queue: paused, 1 at a time")
    assert listing[2].split()[:4] == ["3", "pending", "-", "c"] and "1st in line" in listing[2]
    assert tunetop("queue", "--parallel", "0").returncode == 2
    tunetop("queue", "--parallel", "2", check=True)
    assert load_queue().parallel == 2 and scheduler_pid() is None  # still paused


# -- end to end ------------------------------------------------------------------------


def events_of(run: RunDir) -> list[dict[str, Any]]:
    return list(read_events(run.journal))


def test_a_sweep_of_four_runs_end_to_end(tmp_path: Path) -> None:
    config = tiny(tmp_path / "base.toml", "base")
    result = tunetop("sweep", str(config), "--set", "optimizer.learning_rate=1e-4,5e-4", "--set", "lora.rank=2,4", check=True)
    sweep_id = result.stdout.split("sweep ", 1)[1].split(":", 1)[0]
    assert "scheduler started" in result.stdout
    wait_for(all_ended, timeout=240, interval=0.5)
    wait_idle()
    queue = load_queue()
    assert [(e.name, e.state, e.reason, e.sweep) for e in queue.entries] == [
        (f"base-lr{lr}-r{r}", "done", "completed", sweep_id) for lr in ("1e-4", "5e-4") for r in (2, 4)
    ]
    runs = list_runs()
    assert sorted(r.id for r in runs) == sorted(e.run for e in queue.entries)
    spans = []
    for entry in queue.entries:
        run = RunDir(runs_root() / entry.run)
        cfg = config_module.load(run.config)
        assert cfg.name == entry.name and cfg.tags == [f"sweep:{sweep_id}"]
        assert (cfg.optimizer.learning_rate, cfg.lora.rank) in {(1e-4, 2), (1e-4, 4), (5e-4, 2), (5e-4, 4)}
        events = events_of(run)
        assert [e["reason"] for e in events if e["type"] == "finished"] == ["completed"]
        assert max(e["iteration"] for e in events if e["type"] == "train") == TINY["iterations"]
        spans.append((events[0]["ts"], events[-1]["ts"]))
    spans.sort()
    assert all(earlier[1] <= later[0] for earlier, later in zip(spans, spans[1:], strict=False))  # one at a time
    shown = tunetop("queue", check=True).stdout
    assert shown.startswith("queue: idle") and shown.count(" done ") == 4
    running = tunetop("queue", "rm", "1", check=True)  # an ended entry: forgotten, its run stays
    assert "run " in running.stdout and len(list_runs()) == 4 and len(load_queue().entries) == 3


def test_a_running_entry_is_not_removed_and_a_stopped_run_is_done(tmp_path: Path) -> None:
    long = tiny(tmp_path / "long.toml", "long", iterations=100_000)
    tunetop("queue", "add", str(long), check=True)
    wait_for(lambda: load_queue().entries[0].state == "running", timeout=120)
    entry = load_queue().entries[0]
    refused = tunetop("queue", "rm", "1")
    assert refused.returncode == 2 and f"`tunetop stop {entry.run}`" in refused.stderr
    tunetop("stop", entry.run, check=True)
    wait_for(all_ended, timeout=120)
    entry = load_queue().entries[0]
    assert (entry.state, entry.reason) == ("done", "stopped")
    wait_idle()


def test_a_run_that_fails_at_start_fails_its_entry_and_the_queue_goes_on(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    row = '{"prompt": "Where does Ada live?", "completion": " Lyon."}\n'
    (data / "train.jsonl").write_text(row + "not json\n")
    (data / "valid.jsonl").write_text(row)
    bad = write_config(tmp_path / "bad.toml", name="bad", data={"path": str(data)}, training=TINY)
    good = tiny(tmp_path / "good.toml", "good")
    tunetop("queue", "add", str(bad), str(good), check=True)  # the config is fine; its data is not
    wait_for(all_ended, timeout=180, interval=0.2)
    wait_idle()
    failed, done = load_queue().entries
    assert (failed.state, done.state, done.reason) == ("failed", "done", "completed")
    assert f"{data / 'train.jsonl'}:2" in failed.error, failed.error
    shown = tunetop("queue", check=True).stdout
    assert "failed" in shown and "train.jsonl:2" in shown


# -- durability -------------------------------------------------------------------------


def engine_pids() -> list[int]:
    """The engines of this test's runs (any stage: importing, training, saving), from /proc."""
    root = str(runs_root())
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in argv]
        if "_engine" in words and any(w.startswith(root) for w in words):
            pids.append(int(proc.name))
    return pids


def kill_and_wait(pids: list[int], gone: Any) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_for(gone, timeout=30)


def saved_since_start() -> bool:
    """Some active entry's run saved a checkpoint since its engine last started: killing it now must resume it."""
    for entry in load_queue().active():
        run = RunDir(runs_root() / entry.run)
        status = run.status()
        if status.get("state") == "running" and status.get("iteration", 0) > entry.progress and latest_checkpoint(run.checkpoints):
            return True
    return False


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_scheduler_killed_at_random_points_loses_no_run_and_starts_none_twice(tmp_path: Path) -> None:
    rng = random.Random(2021)
    iterations = 40
    # Saves every 4 steps: a kill mid-run leaves a checkpoint, so a continued run must resume.
    configs = [str(write_config(tmp_path / f"q{n}.toml", name=f"q{n}", training={**TINY, "iterations": iterations},
                                checkpoints={"save_every": 4})) for n in range(4)]
    tunetop("queue", "add", *configs, "--parallel", "2", check=True)
    rounds = everything = aimed = 0
    while rounds < 12 and not all_ended():
        wait_for(lambda: scheduler_pid() is not None or all_ended(), timeout=60)
        if rng.random() < 0.5:  # anywhere: mostly while engines start, the scheduler's busiest time
            time.sleep(rng.uniform(0.05, 2.5))
        else:  # while a run trains past a checkpoint
            wait_for(lambda: saved_since_start() or all_ended(), timeout=120)
            time.sleep(rng.uniform(0, 0.3))
        pid = scheduler_pid()
        if pid is None:
            break  # it finished the queue meanwhile
        trained = saved_since_start()
        kill_and_wait([pid], lambda: scheduler_pid() is None)
        if rng.random() < 0.5:
            everything += 1
            aimed += trained
            kill_and_wait(engine_pids(), lambda: not engine_pids())
        rounds += 1
        tunetop("queue", check=True)  # starts it again
    wait_for(all_ended, timeout=300, interval=0.5)
    wait_idle()
    queue = load_queue()
    assert [(e.name, e.state, e.reason) for e in queue.entries] == [(f"q{n}", "done", "completed") for n in range(4)]
    runs = list_runs()
    assert sorted(r.id for r in runs) == sorted(e.run for e in queue.entries)  # one folder per entry, no other
    resumed = 0
    for entry in queue.entries:
        events = events_of(RunDir(runs_root() / entry.run))
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        assert [e["reason"] for e in events if e["type"] == "finished"] == ["completed"], entry.name
        saved = False
        for number, event in enumerate(events):
            saved = saved or event["type"] == "save"
            if event["type"] == "run_started":
                # Once a checkpoint exists every start is a resume (its `resumed` event comes just before).
                came_back = any(e["type"] == "resumed" for e in events[max(0, number - 5):number])
                assert came_back or not saved, (entry.name, event["seq"])
                resumed += came_back
        assert {e["iteration"] for e in events if e["type"] == "train"} == set(range(2, iterations + 1, 2)), entry.name
    print(f"{rounds} kills of the scheduler, {everything} of them with every engine ({aimed} after a save); "
          f"{resumed} exact resumes")
    assert rounds >= 3 and resumed >= min(aimed, 1)


SCHEDULER_STEPS = ("atomic queue.json: ", "scheduler: ", "launch: ", "daemon: ")
"""Fault points the scheduler passes (tunetop.faults): its queue writes and its start of an engine."""


def scheduler_process(**env: str) -> subprocess.CompletedProcess[bytes]:
    """A scheduler in the foreground, until the queue is done or a fault point kills it."""
    return subprocess.run([sys.executable, "-m", "tunetop.cli", "_scheduler"], env={**os.environ, **env},
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_scheduler_killed_at_each_of_its_steps_recovers_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every step of the state machine has one recovery: the scheduler is killed at each point it
    passes for one entry (a trace of one run lists them), alone or with the engine; a new one ends
    the entry exactly once, adopting a live engine rather than starting a second."""
    config = config_module.load(tiny(tmp_path / "one.toml", "one", iterations=4))
    trace = tmp_path / "trace"
    add_configs([config], ["one.toml"])
    assert scheduler_process(TUNETOP_FAULT_TRACE=str(trace)).returncode == 0 and all_ended()
    seen: dict[str, int] = {}
    points = []
    for name in trace.read_text().splitlines():
        if name.startswith(SCHEDULER_STEPS):
            seen[name] = seen.get(name, 0) + 1
            points.append(f"{name}#{seen[name]}")
    assert "daemon: engine spawned#1" in points and len(points) >= 8, points
    # With the engine too where one lives (from its spawn to the entry's last write); elsewhere
    # killing everything is killing the scheduler alone.
    alive = points[points.index("daemon: engine spawned#1"):-2]
    kills = 0
    for number, point in enumerate(points):
        for everything in (False, True) if point in alive else (False,):
            monkeypatch.setenv("TUNETOP_HOME", str(tmp_path / f"{number}-{everything}"))
            add_configs([config], ["one.toml"])
            assert scheduler_process(TUNETOP_FAULT_KILL_AT=point).returncode == -signal.SIGKILL, point
            if everything:
                kill_and_wait(engine_pids(), lambda: not engine_pids())
            tunetop("queue", check=True)  # a new scheduler
            wait_for(all_ended, timeout=180, interval=0.2)
            wait_idle()
            (entry,) = load_queue().entries
            assert (entry.state, entry.reason) == ("done", "completed"), (point, everything, entry)
            (run,) = list_runs()
            assert run.id == entry.run
            events = events_of(run)
            assert [e["reason"] for e in events if e["type"] == "finished"] == ["completed"], (point, everything)
            starts = sum(e["type"] == "run_started" for e in events)
            assert starts == 1 or (everything and starts == 2), (point, everything, starts)
            assert "already has a live engine" not in run.log.read_text(), (point, everything)
            kills += 1
    print(f"scheduler step kills: {len(points)} steps, {kills} kills ({len(alive)} with the live engine too); "
          "each entry ended once, in one run folder")


# -- remote -------------------------------------------------------------------------------


def test_queue_over_ssh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests import sshd
    from tests.conftest import ROOT

    if sshd.available() is not None:
        pytest.skip(str(sshd.available()))
    server = sshd.start(tmp_path / "ssh")
    try:
        monkeypatch.setenv("TUNETOP_SSH", f"ssh -F {server.client_config}")
        monkeypatch.setenv("TUNETOP_REMOTE_TUNETOP", sshd.remote_tunetop_command(dict(os.environ), ROOT))
        tunetop("queue", "pause", check=True)
        tunetop("queue", "add", str(tiny(tmp_path / "r.toml", "remote-one")), check=True)
        host = f"{server.user}@127.0.0.1:{server.port}"
        shown = tunetop("queue", f"{host}:", check=True).stdout
        assert shown.startswith("queue: paused") and "remote-one" in shown
        as_json = json.loads(tunetop("queue", "--host", host, "--json", check=True).stdout)
        assert [e["name"] for e in as_json["entries"]] == ["remote-one"]
        tunetop("queue", "rm", "1", "--host", host, check=True)
        assert load_queue().entries == []
        missing = tunetop("queue", "rm", "5", "--host", host)
        assert missing.returncode == 3 and "no queue entry '5'" in missing.stderr
    finally:
        server.stop()


# -- the TUI ------------------------------------------------------------------------------


async def test_runs_list_shows_reorders_and_cancels_queued_runs(tmp_path: Path) -> None:
    from tunetop.runs.queue import add_configs, edit_queue
    from tunetop.tui.app import TunetopApp
    from tunetop.tui.screens.modals import ConfirmScreen
    from tunetop.tui.screens.runs import RunsScreen

    with edit_queue() as queue:
        queue.paused = True
    add_configs([config_module.load(tiny(tmp_path / f"{n}.toml", n)) for n in ("a", "b")], ["a.toml", "b.toml"])
    app = TunetopApp(None)
    async with app.run_test(size=(160, 45)) as pilot:
        assert isinstance(app.screen, RunsScreen)
        table = app.screen.query_one(DataTable)
        for _ in range(100):
            if table.row_count == 2:
                break
            await pilot.pause(0.05)
        assert [str(table.get_row_at(i)[1]) for i in range(2)] == ["a", "b"]
        assert str(table.get_row_at(0)[2]) == "queued (1)"
        await pilot.press("shift+down")
        assert pending_names() == ["b", "a"]
        assert [str(table.get_row_at(i)[1]) for i in range(2)] == ["b", "a"] and table.cursor_row == 1
        await pilot.press("x")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await pilot.pause(0.1)
        assert pending_names() == ["b"] and table.row_count == 1
        await pilot.press("q")
