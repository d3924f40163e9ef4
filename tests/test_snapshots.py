"""SVG snapshots of the dashboard fed a recorded event stream (pytest-textual-snapshot)."""

from __future__ import annotations

from pathlib import Path

from tests.recorded import write_recorded_run
from tui.app import TunetopApp


def test_dashboard_of_a_recorded_run(snap_compare, isolated_state: Path) -> None:  # type: ignore[no-untyped-def]
    run = write_recorded_run(isolated_state)

    async def loaded(pilot) -> None:  # type: ignore[no-untyped-def]
        screen = pilot.app.screen
        for _ in range(600):  # 30 s or more: a busy machine
            if screen.run_state.state == "finished":
                break
            await pilot.pause(0.05)
        await pilot.pause(0.3)
        screen.repaint()  # no dependence on when the refresh timer last fired
        await pilot.pause(0.1)
        await pilot.wait_for_scheduled_animations()

    assert snap_compare(TunetopApp(run, theme="dark", remember=False), terminal_size=(160, 45), run_before=loaded)


def test_help_screen(snap_compare, isolated_state: Path) -> None:  # type: ignore[no-untyped-def]
    run = write_recorded_run(isolated_state)
    assert snap_compare(TunetopApp(run, theme="dark", remember=False), terminal_size=(100, 30), press=["question_mark"])
