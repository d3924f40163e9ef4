"""Tags and notes (config, CLI, TUI; live engines and runs at rest) and the runs list that scales.

Real processes: the CLI in subprocesses, engines training the embedded model, the TUI through
Pilot. Labels must survive detach, reattach, replay and resume, since they are journaled events.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from textual.widgets import DataTable, Input

from bench.runs_list import make_runs
from tests.conftest import tunetop, wait_for, write_config
from tests.test_tui import SIZE, settle
from tunetop.control.journal import read_events
from tunetop.runs.folders import RunDir, list_runs, resolve
from tunetop.runs.labels import change_labels, labels_from_history, labels_of
from tunetop.training.config import ConfigError, parse
from tunetop.tui.app import TunetopApp
from tunetop.tui.screens.dashboard import DashboardScreen
from tunetop.tui.screens.modals import LabelsScreen
from tunetop.tui.screens.runs import COLUMNS, RunsScreen
from tunetop.tui.state import RunState
from tunetop.tui.widgets.panels import RunHeader


def label_events(run: RunDir) -> list[dict]:
    return [e for e in read_events(run.journal) if e["type"] in ("tags", "note")]


def keys(text: str) -> list[str]:
    """Pilot key names that type ``text``."""
    return ["space" if char == " " else char for char in text]


def header_text(screen: DashboardScreen) -> str:
    return str(screen.query_one(RunHeader).render())


# -- config ------------------------------------------------------------------------------------


def test_config_tags_are_validated_with_errors_that_name_the_key(tmp_path: Path) -> None:
    assert parse('tags = ["baseline", "sweep:2026-1", "baseline"]\n').tags == ["baseline", "sweep:2026-1"]
    assert parse("").tags == []
    for text, expected in (
        ('tags = "baseline"\n', "'tags' must be a list"),
        ('name = "x"\ntags = ["ok", "two words"]\n', "config:2: in 'tags', tag 'two words' is not a short label"),
        ("tags = [1]\n", "in 'tags', a tag must be a string"),
        (f'tags = ["{"x" * 41}"]\n', "at most 40"),
        ("tags = [" + ", ".join(f'"t{i}"' for i in range(33)) + "]\n", "at most 32"),
        ('tags = ["-x"]\n', "start with a letter or digit"),
    ):
        with pytest.raises(ConfigError) as caught:
            parse(text, "run.toml")
        assert expected.replace("config:2", "run.toml:2") in str(caught.value), (text, str(caught.value))
    bad = write_config(tmp_path / "bad.toml", tags=["fine", "not fine"])
    result = tunetop("train", str(bad), "--detach")
    assert result.returncode == 2
    assert f"{bad}:2: in 'tags', tag 'not fine'" in result.stderr and "Traceback" not in result.stderr
    assert not list_runs()  # refused before any run was made


# -- a run at rest -------------------------------------------------------------------------------


@pytest.mark.slow
async def test_tags_and_note_on_a_finished_run_through_cli_and_tui(tmp_path: Path) -> None:
    config = write_config(tmp_path / "run.toml", tags=["base", "keep"],
                          training={"iterations": 6, "steps_per_report": 2, "steps_per_eval": 3})
    tunetop("train", str(config), check=True)
    run = resolve(None)
    assert labels_of(run).tags == ["base", "keep"]  # the config's, as the engine wrote them in its status
    assert "tags base, keep" in tunetop("tag", run.id, check=True).stdout

    out = tunetop("tag", run.id, "+x", "-base", "+sweep:1", check=True).stdout
    assert "tags keep, x, sweep:1" in out
    tunetop("note", run.id, "first try: lr too high", check=True)
    assert [(e["type"], e.get("tags", e.get("text"))) for e in label_events(run)] == [
        ("tags", ["keep", "x", "sweep:1"]), ("note", "first try: lr too high")]
    listed = json.loads(tunetop("ls", "--json", check=True).stdout.splitlines()[0])
    assert listed["tags"] == ["keep", "x", "sweep:1"] and listed["note"] == "first try: lr too high"
    # A change that adds nothing journals nothing; a bad tag is refused before anything is written.
    tunetop("tag", run.id, "+x", check=True)
    bad = tunetop("tag", run.id, "+two words")
    assert bad.returncode == 2 and "not a short label" in bad.stderr and "Traceback" not in bad.stderr
    assert len(label_events(run)) == 2
    mistaken = tunetop("note", "text without a run")
    assert mistaken.returncode == 2 and "The run comes first" in mistaken.stderr
    # The status is a cache of the journal: without it (a change cut short by a crash) the digest answers the same.
    assert labels_from_history(run) == labels_of(run)
    status = json.loads(run.status_file.read_text())
    run.status_file.write_text(json.dumps({k: v for k, v in status.items() if k not in ("tags", "note")}))
    assert labels_of(run).tags == ["keep", "x", "sweep:1"] and labels_of(run).note == "first try: lr too high"

    # The TUI on the finished run: the header shows them, `t` edits them, the journal takes the change.
    # Wide: the header fits each line to the width, and a fresh machine's model path (its cache
    # under pytest's tmp) is long enough to cut the note at 120 columns.
    app = TunetopApp(run, remember=False)
    async with app.run_test(size=(220, SIZE[1])) as pilot:
        screen = app.screen
        assert isinstance(screen, DashboardScreen)
        await settle(pilot, lambda: "#sweep:1" in header_text(screen))
        assert "first try: lr too high" in header_text(screen)
        await pilot.press("t")
        assert isinstance(app.screen, LabelsScreen)
        app.screen.query_one("#labels-tags", Input).value = "keep sweep:1 best"
        app.screen.query_one("#labels-note", Input).value = "the one to ship"
        await pilot.press("enter")
        await settle(pilot, lambda: "#best" in header_text(screen) and "the one to ship" in header_text(screen))
        assert "#x" not in header_text(screen)
        await pilot.press("q")
    assert [e.get("tags", e.get("text")) for e in label_events(run)][-2:] == [["keep", "sweep:1", "best"], "the one to ship"]

    # Replayed in a fresh TUI, and after a resume (the engine takes its labels from the journal, not the config).
    app = TunetopApp(run, remember=False)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, lambda: app.screen.run_state.tags == ["keep", "sweep:1", "best"])
        assert app.screen.run_state.note == "the one to ship"
        await pilot.press("q")
    tunetop("train", "--resume", run.id, check=True)
    assert labels_of(run).tags == ["keep", "sweep:1", "best"]
    assert json.loads(run.status_file.read_text())["note"] == "the one to ship"
    # The resumed engine's run_started carries the config's tags again; a replay keeps the journaled ones.
    state = RunState()
    state.apply_all(list(read_events(run.journal)))
    assert [e["type"] for e in read_events(run.journal)].count("run_started") == 2
    assert state.tags == ["keep", "sweep:1", "best"] and state.note == "the one to ship"


# -- a live engine -------------------------------------------------------------------------------


@pytest.mark.slow
async def test_tags_and_note_on_a_live_engine_survive_detach_reattach_and_resume(engine_run: RunDir) -> None:
    run = engine_run
    wait_for(lambda: run.status().get("state") == "running", timeout=120)
    assert "tags live" in tunetop("tag", run.id, "+live", check=True).stdout
    tunetop("note", run.id, "watching it", check=True)
    assert run.is_alive()  # the engine journaled them: nothing else held the run
    assert [e.get("tags", e.get("text")) for e in label_events(run)] == [["live"], "watching it"]
    assert labels_of(run).tags == ["live"]

    app = TunetopApp(run, remember=False)
    async with app.run_test(size=SIZE) as pilot:
        screen = app.screen
        await settle(pilot, lambda: "#live" in header_text(screen) and "watching it" in header_text(screen))
        await pilot.press("t")
        app.screen.query_one("#labels-tags", Input).value = "live tui"
        app.screen.query_one("#labels-note", Input).value = "changed from the TUI"
        await pilot.press("enter")
        await settle(pilot, lambda: "#tui" in header_text(screen) and "changed from the TUI" in header_text(screen))
        await pilot.press("q")  # detach: the engine goes on
    assert run.is_alive()
    app = TunetopApp(run, remember=False)  # reattach: the replay brings them back
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, lambda: app.screen.run_state.tags == ["live", "tui"])
        assert app.screen.run_state.note == "changed from the TUI"
        await pilot.press("q")

    # Stopped, changed at rest, resumed: the new engine starts from the journal's labels.
    tunetop("stop", run.id, check=True)
    wait_for(lambda: not run.is_alive(), timeout=120)
    tunetop("tag", run.id, "-live", "+stopped", check=True)
    assert labels_of(run).tags == ["tui", "stopped"]
    tunetop("train", "--resume", run.id, "--detach", check=True)
    wait_for(lambda: run.is_alive() and run.status().get("state") == "running", timeout=120)
    assert labels_of(run).tags == ["tui", "stopped"]
    assert "tags tui, stopped, again" in tunetop("tag", run.id, "+again", check=True).stdout
    assert [e["tags"] for e in label_events(run) if e["type"] == "tags"][-1] == ["tui", "stopped", "again"]
    pid = run.engine_pid()
    if pid:
        os.kill(pid, signal.SIGKILL)


# -- the runs list ---------------------------------------------------------------------------------


def test_ls_shows_tags_notes_best_loss_and_hides_runs_that_never_trained(isolated_state: Path) -> None:
    make_runs(isolated_state, 20)  # runs 9 and 19 failed before training
    lines = tunetop("ls", check=True).stdout.splitlines()
    assert lines[0].split()[:10] == ["RUN", "NAME", "STATE", "ITER", "LOSS", "BEST_VAL", "ALIVE", "AGE", "TAGS", "NOTE"]
    assert "2 runs that failed before training hidden" in lines[0] and len(lines) == 19
    assert len(tunetop("ls", "--all", check=True).stdout.splitlines()) == 21
    rows = [json.loads(line) for line in tunetop("ls", "--json", "--all", check=True).stdout.splitlines()]
    first = next(r for r in rows if r["run"].endswith("-0000"))
    assert first["tags"] == ["baseline"] and first["note"].startswith("run 0: tried lr")
    assert isinstance(first["best_val_loss"], float) and first["best_val_iteration"] == 100


async def test_runs_list_filter_sort_and_hidden_failed_runs(isolated_state: Path) -> None:
    ids = make_runs(isolated_state, 30)  # every tenth failed before training
    runs = {run_id: RunDir(isolated_state / "runs" / run_id) for run_id in ids}
    app = TunetopApp(None, remember=False)
    async with app.run_test(size=SIZE) as pilot:
        screen = app.screen
        assert isinstance(screen, RunsScreen)
        table = screen.query_one(DataTable)
        await settle(pilot, lambda: table.row_count == 27)

        def shown() -> list[str]:
            return [str(table.get_row_at(i)[0]) for i in range(table.row_count)]

        trained = [i for i in ids if not runs[i].summary()["failed_before_training"]]
        assert shown() == sorted(trained, reverse=True)  # newest first
        await pilot.press("a")  # the failed ones too
        await settle(pilot, lambda: table.row_count == 30)
        await pilot.press("a")
        await settle(pilot, lambda: table.row_count == 27)

        # `/` filters by tag, note text, state and name; escape clears it.
        await pilot.press("slash")
        await pilot.press(*"lr-sweep")
        expected = [i for i in ids if "lr-sweep" in labels_of(runs[i]).tags and not runs[i].summary()["failed_before_training"]]
        await settle(pilot, lambda: sorted(shown()) == sorted(expected))
        assert "filter: lr-sweep" in str(screen.query_one("#title").render())
        await pilot.press("escape")
        await settle(pilot, lambda: table.row_count == 27)
        await pilot.press("slash", *keys("tried 1e-05"), "enter")
        expected = [i for i in trained if "tried lr 1e-05" in labels_of(runs[i]).note]
        await settle(pilot, lambda: sorted(shown()) == sorted(expected) and expected)
        await pilot.press("slash", "escape", "a", "slash", *"failed")
        await settle(pilot, lambda: table.row_count == 3)
        await pilot.press("escape", "a")
        await settle(pilot, lambda: table.row_count == 27)

        # `o` cycles the sort column, `O` flips the order; the header says which.
        while COLUMNS[screen.sort_column] != "best val":
            await pilot.press("o")
        await settle(pilot, lambda: "best val ▲" in str(table.columns[table.ordered_columns[5].key].label))
        best = [float(str(table.get_row_at(i)[5])) for i in range(table.row_count)]
        assert best == sorted(best) and len(set(best)) > 3
        assert "sorted by best val ▲" in str(screen.query_one("#title").render())
        await pilot.press("O")
        await settle(pilot, lambda: float(str(table.get_row_at(0)[5])) == max(best))
        while COLUMNS[screen.sort_column] != "name":
            await pilot.press("o")
        await pilot.pause(0.1)
        names = [str(table.get_row_at(i)[1]) for i in range(table.row_count)]
        assert names == sorted(names)

        # `t` edits the tags and note of the run under the cursor (a run at rest: journaled here).
        target = str(table.get_row_at(table.cursor_row)[0])
        change_labels(runs[target], note="line one\nline two")  # a note of two lines (tunetop note)
        await pilot.press("r")
        before = labels_of(runs[target])
        await pilot.press("t")
        assert isinstance(app.screen, LabelsScreen)
        await pilot.press("space", *"picked")  # typed: the tags there are stay (they were selected, and replaced)
        await pilot.press("enter")
        await settle(pilot, lambda: "picked" in labels_of(runs[target]).tags)
        assert label_events(runs[target])[-1] == {**label_events(runs[target])[-1], "tags": [*before.tags, "picked"]}
        assert labels_of(runs[target]).note == "line one\nline two"  # shown on one line, kept as it was
        await pilot.press("slash", *"picked")
        await settle(pilot, lambda: shown() == [target])
        await pilot.press("escape", "q")


def test_text_that_reaches_terminals_holds_no_control_characters(tmp_path: Path) -> None:
    """An escape sequence in a note, a run's name or a sweep's --name would be printed raw by
    `ls`, `compare`, `queue` and the TUI (ESC]0;...BEL retitles the window, ESC[2J clears it)."""
    from tests.recorded import write_recorded_run
    from tunetop.runs.labels import note_problem

    assert "control character" in note_problem("evil\x1b]0;PWNED\x07")
    assert note_problem("line one\nline two\twith a tab") == ""
    run = write_recorded_run(Path(os.environ["TUNETOP_HOME"]))
    refused = tunetop("note", run.id, "red \x1b[31m text")
    assert refused.returncode == 2 and "control character '\\x1b'" in refused.stderr
    config = write_config(tmp_path / "run.toml")
    config.write_text('name = "x\\u001b]0;T\\u0007y"\n' + config.read_text().split("\n", 1)[1])
    bad_name = tunetop("train", str(config))
    assert bad_name.returncode == 2 and f"{config}:1: 'name' holds the control character '\\x1b'" in bad_name.stderr
    sweep = tunetop("sweep", str(write_config(tmp_path / "ok.toml")), "--name", "a\nb", "--set", "lora.rank=1,2")
    assert sweep.returncode == 2 and "--name holds the control character '\\n'" in sweep.stderr
