"""The Textual app: themes, the first screen (runs list or a run's dashboard), the palette."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

from textual.app import App, SystemCommand
from textual.screen import Screen

from engine.runs import RunDir, RunError, resolve
from tui.themes import DEFAULT_THEME, SHORT_NAMES, ThemeError, load_themes, remember_theme, remembered_theme


class TunetopApp(App[int]):
    """tunetop's terminal UI. ``run`` opens that run's dashboard; None opens the runs list."""

    TITLE = "tunetop"
    ENABLE_COMMAND_PALETTE = True

    def __init__(
        self, run: RunDir | None = None, theme: str | None = None, remember: bool = True, remote: Any = None
    ) -> None:
        super().__init__()
        self.initial_run = run
        self.remote = remote
        self.requested_theme = theme
        self.remember = remember
        self._themes_ready = False
        self.exit_note = ""
        """Printed once the TUI has left the terminal (detaching says the run goes on, and how to reattach)."""

    def on_mount(self) -> None:
        for theme in load_themes():
            self.register_theme(theme)
        wanted = self.requested_theme or remembered_theme() or DEFAULT_THEME
        wanted = SHORT_NAMES.get(wanted, wanted)
        # Fall back to Textual's own theme if the theme files are missing (a non-editable install).
        fallback = DEFAULT_THEME if DEFAULT_THEME in self.available_themes else "textual-dark"
        self.theme = wanted if wanted in self.available_themes else fallback
        self._themes_ready = True
        from tui.screens.dashboard import DashboardScreen
        from tui.screens.runs import RunsScreen

        if self.remote is not None:
            self.push_screen(DashboardScreen(self.remote.run_dir, live=self.remote.alive, remote=self.remote))
        elif self.initial_run is None:
            self.push_screen(RunsScreen())
        else:
            self.push_screen(DashboardScreen(self.initial_run))

    def watch_theme(self, theme: str) -> None:
        if self._themes_ready and self.remember:
            remember_theme(theme)

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        from tui.screens.dashboard import DashboardScreen

        if isinstance(screen, DashboardScreen):
            for title, help_text, action in (
                ("Pause or resume", "Pause the run, or resume a paused one", "toggle_pause"),
                ("Save checkpoint now", "Write the adapter now", "save"),
                ("Evaluate now", "Run validation now", "evaluate"),
                ("Stop run", "Save, then end the run (asks first)", "stop"),
                ("Set learning rate and intervals", "Live changes, applied between steps", "set_form"),
                ("Cycle loss smoothing", "EMA 0 / 0.6 / 0.9 / 0.99", "smoothing"),
                ("Cycle chart window", "Whole run / last 100 / 1000 / 10000 iterations", "window"),
                ("Toggle chart y-range", "Fit the recent curve (clip an early spike) / every value", "y_range"),
                ("Edit config", "Open the run's config in the editor", "edit_config"),
                ("Playground", "Prompt the live adapter; samples side by side by iteration", "playground"),
                ("Detach", "Leave the run training and close the TUI", "detach"),
            ):
                if screen.check_action(action, ()):  # a finished run offers no pause, save, ...
                    yield SystemCommand(title, help_text, getattr(screen, f"action_{action}"))


def run_remote_app(spec: str, theme: str | None = None) -> int:
    """``tunetop attach user@host[:port]:RUN``: the TUI here, the engine there, ssh between."""
    from tui.remote import RemoteAttachment, RemoteError

    try:
        remote = RemoteAttachment.open(spec)
    except RemoteError as error:
        print(f"tunetop: {error}", file=sys.stderr)
        return 3
    try:
        app = TunetopApp(None, theme, remote=remote)
        app.run()
    finally:
        remote.close()
    if app.exit_note:
        print(app.exit_note)
    return app.return_code or 0


def run_app(spec: str | None, theme: str | None = None, runs_list: bool = False) -> int:
    """Open the TUI (``tunetop attach`` and ``tunetop``); returns an exit code."""
    run: RunDir | None = None
    if not runs_list:
        try:
            run = resolve(spec)
        except RunError as error:
            if spec:
                print(f"tunetop: {error}", file=sys.stderr)
                return 2
            run = None  # no runs yet: the runs list says so and offers to start one
    if theme:
        try:
            names = {t.name for t in load_themes()} | set(SHORT_NAMES)
        except ThemeError as error:
            print(f"tunetop: {error}", file=sys.stderr)
            return 2
        if theme not in names:
            print(f"tunetop: unknown theme '{theme}'; themes: {', '.join(sorted(names))}", file=sys.stderr)
            return 2
    os.environ.setdefault("TEXTUAL_FPS", "30")
    app = TunetopApp(run, theme)
    app.run()
    if app.exit_note:
        print(app.exit_note)
    return app.return_code or 0
