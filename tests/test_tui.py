"""The real TUI driven by Textual's Pilot: every key and screen, on recorded and live runs."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from textual.widgets import Checkbox, DataTable, Input, TextArea
from textual.widgets._footer import FooterKey

from tests.conftest import tunetop, wait_for, write_config
from tests.recorded import write_recorded_run
from tunetop.control.journal import read_events
from tunetop.runs.client_sync import send_command
from tunetop.runs.folders import RunDir, list_runs
from tunetop.training.adapters import numbered_checkpoints
from tunetop.training.checkpoint import list_checkpoints
from tunetop.tui.app import TunetopApp
from tunetop.tui.screens.dashboard import DashboardScreen
from tunetop.tui.screens.editor import ConfigEditorScreen
from tunetop.tui.screens.modals import ConfirmScreen, HelpScreen, SetScreen, UnsavedScreen
from tunetop.tui.screens.playground import PlaygroundScreen, columns
from tunetop.tui.screens.runs import RunsScreen
from tunetop.tui.widgets.chart import LossChart
from tunetop.tui.widgets.panels import RunHeader

SIZE = (160, 45)


async def settle(pilot, predicate, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    """Let the app run until ``predicate()`` holds."""
    for _ in range(int(timeout / 0.05)):
        if predicate():
            return
        await pilot.pause(0.05)
    raise AssertionError("the screen never reached the expected state")


async def test_recorded_run_opens_read_only_with_its_whole_history(isolated_state: Path) -> None:
    run = write_recorded_run(isolated_state)
    app = TunetopApp(run)
    async with app.run_test(size=SIZE) as pilot:
        screen = app.screen
        assert isinstance(screen, DashboardScreen)
        await settle(pilot, lambda: screen.query_one("#validation-table", DataTable).row_count == 9)
        assert screen.query_one("#checkpoint-table", DataTable).row_count == 4
        assert screen.query_one(RunHeader).read_only
        assert screen.run_state.state == "finished"
        # the controls that need an engine are not offered: not in the footer, not in the palette
        await settle(pilot, lambda: {"m", "w", "c", "g", "q"} <= {key.key for key in screen.query(FooterKey)})
        assert not {key.key for key in screen.query(FooterKey)} & {"p", "s", "e", "x", "l"}
        titles = [c.title for c in app.get_system_commands(screen)]
        assert "Detach" in titles and not {"Pause or resume", "Save checkpoint now", "Stop run"} & set(titles)
        await pilot.press("p")
        await pilot.pause(0.2)
        assert screen.last_reply == ""  # nothing was sent
        chart = screen.query_one(LossChart)
        smoothing = chart.smoothing
        await pilot.press("m")
        assert chart.smoothing != smoothing
        await pilot.press("w")
        assert chart.window == 100
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        assert app.screen is screen
        await pilot.press("c")
        assert isinstance(app.screen, ConfigEditorScreen)
        await pilot.press("escape")
        assert app.screen is screen
        await pilot.press("q")
    assert app.return_code in (0, None)


async def test_checkpoint_panel_lists_what_retention_left_on_disk(tmp_path: Path) -> None:
    config = write_config(tmp_path / "run.toml", training={"iterations": 12, "steps_per_report": 2, "steps_per_eval": 4},
                          checkpoints={"save_every": 2, "keep_last": 2})
    tunetop("train", str(config), check=True)
    (run,) = list_runs()
    on_disk = [int(folder.name) for folder in list_checkpoints(run.checkpoints)]
    assert 2 <= len(on_disk) < 6  # saves at 2, 4, ..., 12; retention deleted some
    assert sorted(i for i, _path in numbered_checkpoints(run.adapters)) == on_disk  # the numbered copies follow
    app = TunetopApp(run)
    async with app.run_test(size=SIZE) as pilot:
        screen = app.screen
        assert isinstance(screen, DashboardScreen)
        await settle(pilot, lambda: screen.run_state.state == "finished")
        screen.repaint()
        table = screen.query_one("#checkpoint-table", DataTable)
        rows = [table.get_row_at(i) for i in range(table.row_count)]
        assert sorted(int(row[0]) for row in rows) == on_disk
        measured = {v.iteration: v.loss for v in screen.run_state.validations}
        for row in rows:  # a validation loss only where one was measured (every 4), else "-"
            iteration, shown = int(row[0]), str(row[1])
            assert shown == (f"{measured[iteration]:.4f}" if iteration in measured else "-"), row
        assert any(str(row[1]) == "-" for row in rows) or all(int(row[0]) % 4 == 0 for row in rows)
    oldest = min(on_disk)
    result = tunetop("export", run.id, "--format", "mlx", "--checkpoint", str(oldest), "--output", str(tmp_path / "x"))
    assert result.returncode == 0, result.stderr


async def test_keys_steer_a_live_engine(engine_run: RunDir) -> None:
    app = TunetopApp(engine_run)
    async with app.run_test(size=SIZE) as pilot:
        screen = app.screen
        assert isinstance(screen, DashboardScreen)
        await settle(pilot, lambda: screen.run_state.iteration >= 4)
        await pilot.press("p")
        await settle(pilot, lambda: screen.run_state.state == "paused")
        assert send_command(engine_run, "status").result["state"] == "paused"
        assert "pause: ok" in screen.last_reply
        await pilot.press("p")
        await settle(pilot, lambda: screen.run_state.state == "running")
        await pilot.press("s")
        await settle(pilot, lambda: "save: ok" in screen.last_reply)
        await settle(pilot, lambda: len(screen.run_state.checkpoints) >= 1)
        await pilot.press("e")
        await settle(pilot, lambda: "evaluate: ok" in screen.last_reply)
        # set form: change the learning rate
        await pilot.press("l")
        assert isinstance(app.screen, SetScreen)
        field = app.screen.query_one("#field-learning_rate", Input)
        field.value = "2e-4"
        await pilot.press("enter")
        await settle(pilot, lambda: "set: ok" in screen.last_reply)
        await settle(pilot, lambda: screen.run_state.learning_rate == 2e-4)
        # a bad value is refused in the form, with the reason
        await pilot.press("l")
        app.screen.query_one("#field-save_every", Input).value = "0"
        await pilot.press("enter")
        assert isinstance(app.screen, SetScreen)
        assert "must be at least 1" in str(app.screen.query_one("#set-error").render())
        await pilot.press("escape")
        # stop asks first; "n" cancels
        await pilot.press("x")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        assert "cancelled" in screen.last_reply and engine_run.is_alive()
        await pilot.press("x")
        await pilot.press("y")
        await settle(pilot, lambda: screen.run_state.state == "finished")
        await pilot.press("q")
    wait_for(lambda: not engine_run.is_alive(), timeout=30)
    events = list(read_events(engine_run.journal))
    assert events[-1]["type"] == "finished" and events[-1]["reason"] == "stopped"
    assert any(e["type"] == "config_changed" and e["changes"] == {"learning_rate": 2e-4} for e in events)


async def test_the_header_is_current_between_reports_and_where_a_pause_landed(engine_run: RunDir) -> None:
    wait_for(lambda: int(send_command(engine_run, "status").result["iteration"]) >= 2)
    send_command(engine_run, "set", {"steps_per_report": 100_000})  # no more train events
    app = TunetopApp(engine_run)
    async with app.run_test(size=SIZE) as pilot:
        screen = app.screen
        assert isinstance(screen, DashboardScreen)
        await settle(pilot, lambda: screen.run_state.train_iterations != [])
        reported = screen.run_state.train_iterations[-1]
        # heartbeats carry the engine's iteration: the header moves on without reports
        await settle(pilot, lambda: screen.run_state.iteration > reported + 2, timeout=60)
        await pilot.press("p")
        await settle(pilot, lambda: "pause: ok — paused at iteration " in screen.last_reply)
        paused_at = int(screen.last_reply.rsplit(" ", 1)[1].replace(",", ""))
        await settle(pilot, lambda: f"iter {paused_at:,}/" in str(screen.query_one(RunHeader).render()))
        shown = str(screen.query_one(RunHeader).render())
        assert "training time" in shown and "elapsed" not in shown
        await pilot.press("q")


async def test_detach_leaves_the_engine_training(engine_run: RunDir) -> None:
    app = TunetopApp(engine_run)
    async with app.run_test(size=SIZE) as pilot:
        screen = app.screen
        await settle(pilot, lambda: screen.run_state.iteration >= 2)
        await pilot.press("ctrl+d")
    assert "goes on training" in app.exit_note and f"tunetop attach {engine_run.id}" in app.exit_note
    before = int(send_command(engine_run, "status").result["iteration"])
    wait_for(lambda: int(send_command(engine_run, "status").result["iteration"]) > before)


async def test_runs_list_attach_back_and_delete(isolated_state: Path) -> None:
    run = write_recorded_run(isolated_state)
    app = TunetopApp(None)
    async with app.run_test(size=SIZE) as pilot:
        assert isinstance(app.screen, RunsScreen)
        table = app.screen.query_one(DataTable)
        await settle(pilot, lambda: table.row_count == 1)
        assert run.id in str(table.get_row_at(0)[0])
        await pilot.press("enter")
        assert isinstance(app.screen, DashboardScreen)
        await pilot.press("q")  # back to the list, not out of the app
        assert isinstance(app.screen, RunsScreen)
        await pilot.press("d")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await settle(pilot, lambda: table.row_count == 0)
        assert not run.path.exists()
        await pilot.press("q")


async def test_config_editor_validates_as_you_type_and_saves(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('# my comment\n[training]\niterations = 10\n')
    app = TunetopApp(None)
    async with app.run_test(size=SIZE) as pilot:
        app.push_screen(ConfigEditorScreen(path))
        await pilot.pause()
        editor = app.screen.query_one(TextArea)
        editor.text = '# my comment\n[training]\niterations = 10\nbatch_sise = 2\n'
        await pilot.pause()
        message = str(app.screen.query_one("#validation").render())
        assert "run.toml:4" in message and "Did you mean 'batch_size'?" in message
        await pilot.press("ctrl+s")
        assert "batch_sise" not in path.read_text()  # invalid text is not saved
        editor.text = '[lora]\nrnak = 4\n'
        await pilot.pause()
        assert "Valid keys in [lora] are:" in str(app.screen.query_one("#validation").render())  # text, not markup
        editor.text = '# my comment\n[training]\niterations = 20\n'
        await pilot.pause()
        await pilot.press("ctrl+s")
        assert path.read_text() == '# my comment\n[training]\niterations = 20\n'
        # ctrl+f: tomli-w's canonical TOML of the validated config, then saved as such
        await pilot.press("ctrl+f")
        await pilot.press("ctrl+s")
        saved = tomllib.loads(path.read_text())
        assert saved["training"]["iterations"] == 20 and "batch_size" in saved["training"]
        assert "# my comment" not in path.read_text()


async def test_config_editor_asks_before_escape_drops_unsaved_edits(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text("[training]\niterations = 10\n")
    app = TunetopApp(None)
    async with app.run_test(size=SIZE) as pilot:
        app.push_screen(ConfigEditorScreen(path))
        await pilot.pause()
        editor_screen = app.screen
        await pilot.press("escape")  # nothing edited: closes at once
        assert app.screen is not editor_screen
        app.push_screen(ConfigEditorScreen(path))
        await pilot.pause()
        editor_screen = app.screen
        editor_screen.query_one(TextArea).text = "[training]\niterations = 20\n"
        await pilot.pause()
        await pilot.press("escape")
        assert isinstance(app.screen, UnsavedScreen)
        await pilot.press("escape")  # keep editing: back in the editor, the edit still there
        assert app.screen is editor_screen
        assert "iterations = 20" in editor_screen.query_one(TextArea).text
        await pilot.press("escape", "s")  # save, then close
        await pilot.pause()
        assert app.screen is not editor_screen
        assert path.read_text() == "[training]\niterations = 20\n"
        app.push_screen(ConfigEditorScreen(path))
        await pilot.pause()
        editor_screen = app.screen
        editor_screen.query_one(TextArea).text = "[training]\nbatch_sise = 2\n"
        await pilot.pause()
        await pilot.press("escape", "s")  # an invalid text is not saved, and the editor stays
        await pilot.pause()
        assert app.screen is editor_screen and "batch_sise" not in path.read_text()
        await pilot.press("escape", "d")  # discard: closes, the file as it was
        await pilot.pause()
        assert app.screen is not editor_screen
        assert path.read_text() == "[training]\niterations = 20\n"


async def test_theme_choice_is_applied_and_remembered(isolated_state: Path, tmp_path: Path) -> None:
    write_recorded_run(isolated_state)
    app = TunetopApp(None, theme="light")
    async with app.run_test(size=SIZE) as pilot:
        assert app.theme == "tunetop-light"
        app.theme = "tunetop-high-contrast"
        await pilot.pause()
    settings = json.loads((tmp_path / "config" / "tunetop" / "tui.json").read_text())
    assert settings["theme"] == "tunetop-high-contrast"
    again = TunetopApp(None)
    async with again.run_test(size=SIZE):
        assert again.theme == "tunetop-high-contrast"


async def test_palette_offers_the_run_commands(engine_run: RunDir) -> None:
    app = TunetopApp(engine_run)
    async with app.run_test(size=SIZE) as pilot:
        screen = app.screen
        await settle(pilot, lambda: screen.run_state.state == "running")
        titles = [c.title for c in app.get_system_commands(screen)]
        for title in ("Pause or resume", "Save checkpoint now", "Evaluate now", "Stop run", "Detach", "Theme"):
            assert any(title in t for t in titles), title
        await settle(pilot, lambda: {"p", "s", "e", "x", "l", "q"} <= {key.key for key in screen.query(FooterKey)})


def test_playground_columns_group_samples_by_prompt_newest_first() -> None:
    samples = [(10, "a", "1", False), (10, "b", "2", False), (20, "a", "3", False), (30, "c", "4", False),
               (40, "a", "5", False), (50, "b", "6", True)]
    assert columns(samples) == [
        (("b", True), [(50, "6")]),  # a raw prompt has a column of its own
        (("a", False), [(40, "5"), (20, "3"), (10, "1")]),
        (("c", False), [(30, "4")]),
        (("b", False), [(10, "2")]),
    ]
    assert [key for key, _ in columns(samples, limit=2)] == [("b", True), ("a", False)]


async def test_playground_prompts_the_live_adapter(engine_run: RunDir) -> None:
    app = TunetopApp(engine_run)
    async with app.run_test(size=SIZE) as pilot:
        dashboard = app.screen
        await settle(pilot, lambda: dashboard.run_state.iteration >= 2)
        await pilot.press("g")
        playground = app.screen
        assert isinstance(playground, PlaygroundScreen)
        labels = [str(label.render()) for label in playground.query(".field-label")]
        assert labels == ["max tokens", "temperature"]  # the boxes say what they hold once filled
        playground.query_one("#max-tokens", Input).value = "8"
        await pilot.click("#prompt")
        await pilot.press(*"The river")
        await pilot.press("enter")
        assert playground.query_one("#prompt", Input).value == ""  # sent: the box is ready for the next one
        await settle(pilot, lambda: "sample: ok, from the weights of iteration" in playground.status_text, timeout=60)
        await settle(pilot, lambda: len(playground.query(".column")) == 1)
        (column,) = playground.query(".column")
        assert column.border_title == "The river"
        shown = str(column.query_one(".sample").render())
        assert "iter " in shown and "The river\n→ " in shown  # the answer on a line of its own
        # a sample asked by another client shows up too, as the newest column
        send_command(engine_run, "sample", {"prompt": "A lantern", "max_tokens": 4}, timeout=60)
        await settle(pilot, lambda: len(playground.query(".column")) == 2)
        assert [c.border_title for c in playground.query(".column")] == ["A lantern", "The river"]
        assert "prompt in the chat template" in playground.status_text
        # ctrl+t: the same prompt sent as typed, in a column of its own
        await pilot.press("ctrl+t")
        assert playground.query_one("#raw", Checkbox).value
        await pilot.click("#prompt")
        await pilot.press(*"The river")
        await pilot.press("enter")
        await settle(pilot, lambda: len(playground.query(".column")) == 3, timeout=60)
        assert playground.query(".column").first().border_title == "raw: The river"
        await settle(pilot, lambda: "prompt raw, as typed" in playground.status_text)
        formats = [(e["prompt"], e["prompt_format"]) for e in read_events(engine_run.journal) if e["type"] == "sample"]
        assert formats == [("The river", "chat"), ("A lantern", "chat"), ("The river", "raw")]
        await pilot.press("escape")
        assert app.screen is dashboard
        await pilot.press("q")


def _layout_holds(app: TunetopApp, essential: set[str]) -> None:
    """At the app's size: the header's lines fit without wrapping and keep the state; the
    checkpoints show rows; the footer shows the essential keys whole, apart from each other."""
    screen = app.screen
    width = app.size.width
    header = screen.query_one(RunHeader)
    lines = str(header.render()).split("\n")
    assert len(lines) == 2 and all(len(line) <= header.content_size.width for line in lines), lines
    assert screen.run_state.state.upper() in lines[0] and "%" in lines[1] and "ETA" in lines[1], lines
    table = screen.query_one("#checkpoint-table", DataTable)
    assert table.row_count >= 1 and table.region.height >= 2, table.region  # a header row and a checkpoint
    keys = {key.key: key.region for key in screen.query(FooterKey)}
    assert essential <= set(keys), (width, sorted(keys))
    spans = sorted((region.x, region.right) for region in keys.values())
    assert all(right <= width for _, right in spans), spans
    assert all(a_right <= b_left for (_, a_right), (b_left, _) in zip(spans, spans[1:], strict=False)), spans


async def test_the_dashboard_fits_80x24_and_120_columns(isolated_state: Path, engine_run: RunDir) -> None:
    # At 80x24 the header wrapped (its second line lost) and the checkpoints had no row; at 120
    # columns a live run's footer cut g, ? and q.
    app = TunetopApp(write_recorded_run(isolated_state))
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        await settle(pilot, lambda: screen.query_one("#checkpoint-table", DataTable).row_count == 4)
        screen.run_state.name = "a-run-name-much-longer-than-any-header-has-room-for-" * 3  # other helpers add tags too
        for size in ((80, 24), (120, 30), (80, 24)):
            await pilot.resize_terminal(*size)
            await pilot.pause(0.5)
            screen.query_one(RunHeader).refresh_from_state()
            await pilot.pause(0.1)
            _layout_holds(app, {"g", "question_mark", "q", "c"})
    live = TunetopApp(engine_run)
    async with live.run_test(size=(120, 30)) as pilot:
        screen = live.screen
        await settle(pilot, lambda: screen.run_state.iteration >= 2)
        await pilot.press("s")
        await settle(pilot, lambda: screen.query_one("#checkpoint-table", DataTable).row_count >= 1)
        for size in ((120, 30), (80, 24)):
            await pilot.resize_terminal(*size)
            await pilot.pause(0.5)
            _layout_holds(live, {"p", "x", "g", "question_mark", "q"})
        await pilot.press("q")
