"""Runs side by side: the pure comparison, `tunetop compare` here and over ssh, and the TUI's view."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from textual.widgets import DataTable

from tests import sshd
from tests.conftest import ROOT, tunetop, wait_for, write_config
from tests.recorded import RUN_ID, recorded_events, write_recorded_run
from tunetop.control.protocol import make_event
from tunetop.runs.client_sync import send_command
from tunetop.runs.folders import RunDir, resolve
from tunetop.training.config import RunConfig
from tunetop.tui.app import TunetopApp
from tunetop.tui.compare import Entry, compare, differing_keys, flatten
from tunetop.tui.screens.compare import CompareScreen
from tunetop.tui.screens.dashboard import DashboardScreen
from tunetop.tui.state import RunState
from tunetop.tui.widgets.chart import loss_series, tokens_at
from tunetop.tui.widgets.compare_chart import CompareChart

OTHER_ID = "20261129-130000-beef"


def full_config(name: str, **changes: Any) -> dict[str, Any]:
    """A whole config as an engine journals it (every key), with ``changes`` ("section.key": value)."""
    config = RunConfig(name=name).to_dict()
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        config[section][key] = value
    return config


def write_runs(home: Path) -> tuple[RunDir, RunDir]:
    """Two finished runs that differ in learning rate and batch size (so twice the tokens a step)
    and learn differently: 'recorded' and 'bigger-batch'."""
    first = recorded_events()
    first[1]["config"] = full_config("recorded")
    second = recorded_events(run_id=OTHER_ID)
    second[1]["config"] = full_config("bigger-batch", **{"optimizer.learning_rate": 3e-4, "training.batch_size": 8})
    second[1]["name"] = "bigger-batch"
    for event in second:
        if event["type"] in ("train", "validation"):
            event["loss"] = 0.8 * event["loss"] + 0.1
        if event["type"] == "train":
            event["trained_tokens"] *= 2
            event["tokens_per_second"] *= 1.5
    other = write_recorded_run(home, second, run_id=OTHER_ID)
    other.write_status({**other.status(), "name": "bigger-batch"})
    return write_recorded_run(home, first), other


# -- the pure part ---------------------------------------------------------------------------


def test_only_the_keys_that_differ_are_listed() -> None:
    a = full_config("a")
    b = full_config("b", **{"optimizer.learning_rate": 3e-4, "lora.keys": ["self_attn.q_proj"]})
    c = full_config("c")
    del c["training"]["grad_checkpoint"]  # a run of an older version, without the key
    assert flatten({"x": {"y": 1, "z": {"w": [1, 2]}}, "n": "s"}) == {"x.y": 1, "x.z.w": [1, 2], "n": "s"}
    assert differing_keys([a, a]) == [] and differing_keys([a]) == []
    assert differing_keys([a, b]) == ["lora.keys", "optimizer.learning_rate"]  # not `name`: the table has it
    assert differing_keys([a, b, c]) == ["lora.keys", "training.grad_checkpoint", "optimizer.learning_rate"]


def test_rows_are_ranked_by_best_validation_and_say_what_each_run_did() -> None:
    states = []
    for run_id, scale, config in (("r1", 1.0, full_config("one")), ("r2", 0.5, full_config("two", **{"lora.rank": 16})),
                                  ("r3", 1.0, full_config("three"))):
        state = RunState(run_id=run_id)
        events = recorded_events(run_id=run_id)
        events[1]["config"], events[1]["name"] = config, config["name"]
        for event in events:
            if event["type"] == "validation":
                event["loss"] *= scale
        state.apply_all(events if run_id != "r3" else events[:3])  # r3: started, never validated
        states.append(state)
    result = compare([Entry(s.run_id, s, alive=False) for s in states])
    assert [r.run for r in result.runs] == ["r2", "r1", "r3"]
    best = result.runs[0]
    assert best.best_validation_iteration == 400 and best.best_validation_loss == pytest.approx(0.5 * (1.4 + 8.0 * 2.718281828459045 ** (-400 / 45)))
    assert best.state == "finished" and best.iteration == 400 and best.trained_tokens == 60_000
    assert best.elapsed_seconds == pytest.approx(21.1 - 0.6, abs=1e-6)  # running from 0.6 s to the finish at 21.1 s
    assert best.tokens_per_second == pytest.approx(3000.0, abs=100)  # the median of 3000 + 100 sin(it)
    assert result.runs[2].state == "dead"  # reads running, no engine: as `tunetop ls` says
    assert result.keys == ["lora.rank"] and [r.config for r in result.runs] == [{"lora.rank": 16}, {"lora.rank": 8}, {"lora.rank": 8}]
    text = result.text().splitlines()
    assert text[0].split() == ["RUN", "NAME", "STATE", "ITER", "BEST", "VAL", "LAST", "LOSS", "TOK/S", "TOKENS", "ELAPSED", "lora.rank"]
    assert text[1].split()[:3] == ["r2", "two", "finished"] and text[1].split()[-1] == "16"


def test_validations_sit_at_the_tokens_trained_when_they_ran() -> None:
    state = RunState()
    state.apply_all(recorded_events())  # 150 tokens an iteration, reports every 10
    assert tokens_at(state, [0, 10, 15, 400, 410]) == [0.0, 1500.0, 2250.0, 60_000.0, 61_500.0]
    validation, train = loss_series(state, 0.0, 1000, start=300, x_by="tokens")
    assert validation is not None and validation.xs == [300 * 150.0, 350 * 150.0, 400 * 150.0]
    assert train.xs == [float(i * 150) for i in range(300, 401, 10)]


# -- the command line ------------------------------------------------------------------------


def test_compare_json_lists_only_the_differing_keys(isolated_state: Path) -> None:
    first, second = write_runs(isolated_state)
    result = tunetop("compare", first.id, "bigger-batch", "--json", check=True)
    out = json.loads(result.stdout)
    assert out["differing_keys"] == ["training.batch_size", "optimizer.learning_rate"]
    assert [r["run"] for r in out["runs"]] == [OTHER_ID, RUN_ID]  # the lower best validation loss first
    other, recorded = out["runs"]
    assert other["config"] == {"training.batch_size": 8, "optimizer.learning_rate": 3e-4}
    assert recorded["config"] == {"training.batch_size": 4, "optimizer.learning_rate": 1e-5}
    assert other["trained_tokens"] == 2 * recorded["trained_tokens"] == 120_000
    assert other["best_validation_iteration"] == 400 and other["state"] == "finished"
    text = tunetop("compare", first.id, second.id, check=True).stdout.splitlines()
    assert text[0].split()[-2:] == ["training.batch_size", "optimizer.learning_rate"]
    assert text[1].startswith(OTHER_ID) and text[1].split()[-2:] == ["8", "0.0003"]
    # mistakes: one paragraph, exit 2
    for args, message in ((["compare", first.id], "two runs or more"), (["compare", first.id, "nope"], "no run matches 'nope'"),
                          (["compare", first.id, first.id], "two runs or more")):
        bad = tunetop(*args)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr


def test_compare_alone_takes_the_latest_sweep_and_a_tag_names_a_group(isolated_state: Path) -> None:
    """A sweep tags its runs sweep:ID; `compare` alone compares the newest tagged run's sweep (else its first tag)."""
    tags = {"20261129-100000-aaaa": ["sweep:s1"], "20261129-110000-bbbb": ["lr", "sweep:s1"],
            "20261129-120000-cccc": ["baseline", "sweep:s2"], "20261129-130000-dddd": ["sweep:s2"],
            "20261129-140000-eeee": []}  # the newest has no tag: the newest tagged run decides
    nothing = tunetop("compare")  # no runs at all
    assert nothing.returncode == 2 and "nothing to compare" in nothing.stderr and "Traceback" not in nothing.stderr
    for run_id, run_tags in tags.items():
        events = recorded_events(run_id=run_id)
        events[1]["config"]["tags"] = run_tags  # as a sweep writes them into each run's config
        if run_id.endswith("dddd"):
            events.append(make_event(run_id, len(events) + 1, "note", ts=events[-1]["ts"] + 1, text="lr too high?\nsee log"))
        run = write_recorded_run(isolated_state, events, run_id=run_id)
        run.write_status({**run.status(), "tags": run_tags, "note": ""})
    latest = tunetop("compare", "--json", check=True)
    runs = {r["run"]: r for r in json.loads(latest.stdout)["runs"]}
    assert set(runs) == {"20261129-120000-cccc", "20261129-130000-dddd"}
    assert runs["20261129-120000-cccc"]["tags"] == ["baseline", "sweep:s2"] and runs["20261129-130000-dddd"]["note"] == "lr too high?\nsee log"
    assert "comparing the 2 runs tagged sweep:s2" in latest.stderr
    table = tunetop("compare", check=True).stdout.splitlines()  # tags and the note's first line, as columns
    assert table[0].split()[-2:] == ["TAGS", "NOTE"] and table[1].endswith("baseline sweep:s2  -")
    assert table[2].endswith("sweep:s2           lr too high?")
    by_id = tunetop("compare", "s1", "--json", check=True)  # a sweep's id alone
    assert {r["run"] for r in json.loads(by_id.stdout)["runs"]} == {"20261129-100000-aaaa", "20261129-110000-bbbb"}
    mixed = tunetop("compare", "lr", "20261129-140000-eeee", "--json", check=True)  # a tag and a run
    assert {r["run"] for r in json.loads(mixed.stdout)["runs"]} == {"20261129-110000-bbbb", "20261129-140000-eeee"}
    alone = tunetop("compare", "baseline")
    assert alone.returncode == 2 and "two runs or more" in alone.stderr
    newest = RunDir(isolated_state / "runs" / "20261129-140000-eeee")
    newest.write_status({**newest.status(), "tags": ["adhoc"], "note": ""})  # a tag on one newer run alone
    still = tunetop("compare", "--json", check=True)  # does not hide the sweep before it
    assert {r["run"] for r in json.loads(still.stdout)["runs"]} == {"20261129-120000-cccc", "20261129-130000-dddd"}
    for run_id in tags:  # only the newest tag's one run left tagged
        run = RunDir(isolated_state / "runs" / run_id)
        run.write_status({**run.status(), "tags": ["solo"] if run_id.endswith("eeee") else [], "note": ""})
    solo = tunetop("compare")
    assert solo.returncode == 2 and "'solo', is on one run only (20261129-140000-eeee)" in solo.stderr
    for run_id in tags:
        run = RunDir(isolated_state / "runs" / run_id)
        run.write_status({**run.status(), "tags": [], "note": ""})
    none = tunetop("compare")
    assert none.returncode == 2 and "no run has a tag" in none.stderr


@pytest.fixture
def ssh_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[sshd.SshServer]:
    if sshd.available() is not None:
        pytest.skip(str(sshd.available()))
    server = sshd.start(tmp_path / "ssh")
    monkeypatch.setenv("TUNETOP_SSH", f"ssh -F {server.client_config}")
    monkeypatch.setenv("TUNETOP_REMOTE_TUNETOP", sshd.remote_tunetop_command(dict(os.environ), ROOT))
    yield server
    server.stop()


def test_compare_a_remote_run_with_a_local_one(ssh_server: sshd.SshServer, isolated_state: Path, engine_run: RunDir) -> None:
    """The remote side is this machine's sshd: the live engine is read through ssh, the recorded run here."""
    first, _second = write_runs(isolated_state)
    wait_for(lambda: send_command(engine_run, "status").result["iteration"] >= 4)
    remote = f"{ssh_server.destination}:{engine_run.id}"
    out = json.loads(tunetop("compare", remote, first.id, "--json", check=True).stdout)
    by_run = {r["run"]: r for r in out["runs"]}
    assert set(by_run) == {remote, first.id}
    live = by_run[remote]
    assert live["state"] == "running" and live["iteration"] >= 4 and live["last_train_loss"] is not None
    # only the validation before the first step so far (steps_per_eval is 10,000): far above the recorded run's
    assert live["best_validation_iteration"] == 0 and out["runs"][-1]["run"] == remote
    assert "optimizer.learning_rate" in out["differing_keys"] and live["config"]["optimizer.learning_rate"] == 5e-4
    # an unreachable host: exit 3 and why
    bad = tunetop("compare", f"127.0.0.1:{sshd.free_port()}:x", first.id)
    assert bad.returncode == 3 and "cannot reach" in bad.stderr and "Traceback" not in bad.stderr


# -- the TUI ---------------------------------------------------------------------------------


async def settle(pilot, predicate, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    for _ in range(int(timeout / 0.05)):
        if predicate():
            return
        await pilot.pause(0.05)
    raise AssertionError("the screen never reached the expected state")


async def open_comparison(pilot, marks: int = 2) -> CompareScreen:  # type: ignore[no-untyped-def]
    """From the runs list: mark the first ``marks`` rows (space moves on to the next), then c."""
    app = pilot.app
    await settle(pilot, lambda: app.screen.query_one(DataTable).row_count >= marks)
    await pilot.press(*(["space"] * marks), "c")
    await settle(pilot, lambda: isinstance(app.screen, CompareScreen))
    return app.screen  # type: ignore[no-any-return]


async def test_runs_list_marks_runs_and_opens_their_comparison(isolated_state: Path) -> None:
    first, second = write_runs(isolated_state)
    app = TunetopApp(None, theme="dark", remember=False)
    async with app.run_test(size=(160, 45)) as pilot:
        await settle(pilot, lambda: app.screen.query_one(DataTable).row_count == 2)
        await pilot.press("space", "c")  # one run marked: nothing to compare yet
        await pilot.pause(0.2)
        assert not isinstance(app.screen, CompareScreen)
        await pilot.press("up", "space", "up")  # unmarked again, and back to the top
        assert app.screen.marked == []  # type: ignore[attr-defined]
        screen = await open_comparison(pilot)
        assert [r.id for r in screen.runs] == [second.id, first.id]  # newest first in the list, marked in that order
        await settle(pilot, lambda: all(s.state == "finished" for s in screen.states))
        screen.repaint()
        table = screen.query_one("#table", DataTable)
        assert table.row_count == 2 and [c.label.plain for c in table.columns.values()][-2:] == [
            "training.batch_size", "optimizer.learning_rate"]
        chart = screen.query_one(CompareChart)
        series = chart.series(200)
        assert len(series) == 4 and {s.style for s in series} == {"bold $accent", "bold $warning"}
        await pilot.press("t")  # x by trained tokens: the bigger batch reaches twice as far
        assert chart.x_by == "tokens" and max(chart.series(200)[-2].xs) == 2 * max(chart.series(200)[-1].xs)
        await pilot.press("m", "w")
        assert chart.smoothing == 0.9 and chart.window == 100
        assert "EMA 0.9" in str(screen.query_one("#chart-box").border_title)
        await pilot.press("enter")  # the top row: the better run
        await settle(pilot, lambda: isinstance(app.screen, DashboardScreen))
        assert app.screen.run_dir.id == second.id  # type: ignore[attr-defined]
        await pilot.press("q")
        await settle(pilot, lambda: app.screen is screen)
        await pilot.press("q")
        await settle(pilot, lambda: not isinstance(app.screen, CompareScreen))


async def test_c_with_nothing_marked_compares_the_latest_sweep(isolated_state: Path) -> None:
    first, second = write_runs(isolated_state)
    app = TunetopApp(None, theme="dark", remember=False)
    async with app.run_test(size=(160, 45)) as pilot:
        await settle(pilot, lambda: app.screen.query_one(DataTable).row_count == 2)
        await pilot.press("c")  # no marks, no tags: nothing to compare
        await pilot.pause(0.3)
        assert not isinstance(app.screen, CompareScreen)
        for run in (first, second):
            run.write_status({**run.status(), "tags": ["sweep:ab12cd"], "note": ""})
        await pilot.press("c")
        await settle(pilot, lambda: isinstance(app.screen, CompareScreen))
        assert {r.id for r in app.screen.runs} == {first.id, second.id}  # type: ignore[attr-defined]


def test_snapshot_of_two_recorded_runs_compared(snap_compare, isolated_state: Path) -> None:  # type: ignore[no-untyped-def]
    write_runs(isolated_state)

    async def compared(pilot) -> None:  # type: ignore[no-untyped-def]
        screen = await open_comparison(pilot)
        await settle(pilot, lambda: all(s.state == "finished" for s in screen.states))
        await pilot.pause(0.3)
        screen.repaint()  # no dependence on when the timer last fired
        await pilot.pause(0.1)
        await pilot.wait_for_scheduled_animations()

    assert snap_compare(TunetopApp(None, theme="dark", remember=False), terminal_size=(160, 45), run_before=compared)


@pytest.fixture
def two_engines(tmp_path: Path) -> Iterator[list[RunDir]]:
    """Two detached engines on the embedded model, differing in learning rate and rank; killed afterwards."""
    runs = []
    try:
        for name, rate, rank in (("slow-lr", 1e-4, 4), ("fast-lr", 1e-3, 8)):
            config = write_config(
                tmp_path / f"{name}.toml", name=name, lora={"rank": rank, "scale": 20.0}, optimizer={"learning_rate": rate},
                training={"iterations": 100_000, "steps_per_report": 2, "steps_per_eval": 10, "validation_batches": 1},
                checkpoints={"save_every": 10_000},
            )
            runs.append(resolve(tunetop("train", str(config), "--detach", check=True).stdout.strip()))
        yield runs
    finally:
        import signal

        for run in runs:
            pid = run.engine_pid()
            if run.is_alive() and pid:
                os.kill(pid, signal.SIGKILL)
        for run in runs:
            wait_for(lambda run=run: not run.is_alive(), timeout=10)


async def test_live_runs_move_in_the_comparison(two_engines: list[RunDir]) -> None:
    app = TunetopApp(None, theme="dark", remember=False)
    async with app.run_test(size=(160, 45)) as pilot:
        screen = await open_comparison(pilot)
        assert {r.id for r in screen.runs} == {r.id for r in two_engines} and all(screen.alive)
        await settle(pilot, lambda: all(s.validations and len(s.train_iterations) >= 2 for s in screen.states), timeout=180)
        before = [s.iteration for s in screen.states]
        table = screen.query_one("#table", DataTable)

        def shown() -> dict[str, list[str]]:
            return {str(key.value): [cell.plain for cell in table.get_row(key)] for key in table.rows}

        await settle(pilot, lambda: all(row[3] == "running" for row in shown().values()))
        first_cells = shown()
        # both runs go on, each through its own live subscription: the state, the chart, the table
        await settle(pilot, lambda: all(s.iteration >= b + 4 for s, b in zip(screen.states, before, strict=True)), timeout=180)
        await settle(pilot, lambda: all(shown()[k][4] != first_cells[k][4] for k in first_cells), timeout=30)  # the iter column
        assert table.columns and [c.label.plain for c in table.columns.values()][-2:] == ["lora.rank", "optimizer.learning_rate"]
        lines = screen.query_one(CompareChart).series(200)
        assert len([s for s in lines if s.line]) == 2 and all(len(s.xs) >= 2 for s in lines if s.line)
        # steer one from its dashboard, come back: the comparison still follows both
        target = screen.runs[0]
        table.move_cursor(row=[str(k.value) for k in table.rows].index(target.id))
        await pilot.press("enter")
        await settle(pilot, lambda: isinstance(app.screen, DashboardScreen))
        await pilot.press("p")
        await settle(pilot, lambda: send_command(target, "status").result["state"] == "paused", timeout=60)
        await pilot.press("q")
        await settle(pilot, lambda: app.screen is screen)
        index = screen.runs.index(target)
        await settle(pilot, lambda: screen.states[index].state == "paused")
        await settle(pilot, lambda: shown()[target.id][3] == "paused", timeout=30)
