"""The config editor: a TOML TextArea validated as you type with the engine's own rules.

Save (ctrl+s) writes the text as typed once it validates, so comments survive; ctrl+f rewrites
the buffer as tomli-w's canonical TOML of the validated config (every key, no comments), for
whoever prefers that; ctrl+n starts a new detached run from the edited config. Escape with
unsaved edits asks first: save, discard, or keep editing.
"""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Static, TextArea

from tunetop.training import config as config_module
from tunetop.training.config import ConfigError
from tunetop.tui.screens.modals import UnsavedScreen


class ConfigEditorScreen(Screen[None]):
    """Edit a run config or any TOML file."""

    DEFAULT_CSS = """
    ConfigEditorScreen #path { height: 1; background: $panel; padding: 0 1; }
    ConfigEditorScreen TextArea { height: 1fr; }
    ConfigEditorScreen #validation { height: auto; min-height: 1; padding: 0 1; }
    ConfigEditorScreen #validation.invalid { color: $error; }
    ConfigEditorScreen #validation.valid { color: $success; }
    """

    BINDINGS = [
        Binding("ctrl+s", "save", "Save"),
        Binding("ctrl+f", "format", "Format (tomli-w)"),
        Binding("ctrl+n", "start_run", "Start new run"),
        Binding("ctrl+r", "resume_run", "Resume run from checkpoint"),
        Binding("escape", "close", "Close", priority=True),
    ]

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.valid = False
        self.saved_text = ""  # the text as on disk (or the starter text of a new file): escape compares with it

    @property
    def is_run_config(self) -> bool:
        """A run's own config.toml: a live engine read it at start and does not read it again."""
        return self.path.name == "config.toml" and (self.path.parent / "journal.ttj").exists()

    def compose(self) -> ComposeResult:
        note = (
            "  (this run's file: a running engine keeps the values it started with and the live changes "
            "of `l`; what you save here applies when the run is resumed)"
            if self.is_run_config
            else ""
        )
        yield Static(f"config: {self.path}{note}", id="path", markup=False)
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            text = config_module.starter_text()
        self.saved_text = text
        editor = TextArea.code_editor(text, language="toml", id="editor")
        yield editor
        yield Static("", id="validation")
        yield Footer()

    def on_mount(self) -> None:
        self.validate_text()
        self.query_one(TextArea).focus()

    def on_text_area_changed(self, _event: TextArea.Changed) -> None:
        self.validate_text()

    def validate_text(self) -> None:
        text = self.query_one(TextArea).text
        label = self.query_one("#validation", Static)
        try:
            config_module.parse(text, source=str(self.path))
        except ConfigError as error:
            self.valid = False
            label.set_classes("invalid")
            label.update(Text(str(error)))  # "[lora]" in a message is text, not Rich markup
            return
        self.valid = True
        label.set_classes("valid")
        label.update("valid ✓  (ctrl+s saves, ctrl+n starts a new run from it)")

    def action_save(self) -> bool:
        if not self.valid:
            self.notify("not saved: fix the error under the editor first", severity="error")
            return False
        text = self.query_one(TextArea).text
        self.path.write_text(text, encoding="utf-8")
        self.saved_text = text
        applies = "; it applies when the run is resumed (live settings: `l`)" if self.is_run_config else ""
        self.notify(f"saved {self.path}{applies}", markup=False)
        return True

    def action_format(self) -> None:
        """Replace the text with the validated config as tomli-w writes it (comments are lost)."""
        editor = self.query_one(TextArea)
        try:
            parsed = config_module.parse(editor.text, source=str(self.path))
        except ConfigError:
            self.notify("not formatted: fix the error under the editor first", severity="error")
            return
        editor.load_text(config_module.dumps(parsed))
        self.validate_text()
        self.notify("formatted with tomli-w (ctrl+z undoes it); ctrl+s saves")

    def action_start_run(self) -> None:
        if not self.action_save():
            return
        from tunetop.runs.launch import load_run_config, start_run

        try:
            run, _code = start_run(load_run_config(self.path), detach=True)
        except Exception as error:  # shown to the user, never a traceback on screen
            self.notify(f"could not start: {error}", severity="error", timeout=10, markup=False)
            return
        self.notify(f"started run {run.id}", markup=False)

    def action_resume_run(self) -> None:
        """Save, then resume the run this config belongs to from a chosen checkpoint."""
        from tunetop.runs.folders import RunDir
        from tunetop.runs.launch import resume_run
        from tunetop.training.checkpoint import checkpoint_iteration, list_checkpoints
        from tunetop.tui.screens.modals import PromptScreen

        run = RunDir(self.path.parent)
        if self.path.name != "config.toml" or not run.journal.exists():
            self.notify("this file is not a run's config; open it from a run's dashboard (c)", severity="warning")
            return
        if run.is_alive():
            self.notify("the run is training; stop it first to resume from a checkpoint", severity="warning")
            return
        if not self.action_save():
            return
        have = ", ".join(str(i) for i in sorted({checkpoint_iteration(p) for p in list_checkpoints(run.checkpoints)})) or "none"

        def chosen(answer: str | None) -> None:
            if answer is None:
                return
            try:
                iteration = int(answer) if answer.strip() else None
                resume_run(run, iteration, detach=True)
            except Exception as error:
                self.notify(f"could not resume: {error}", severity="error", timeout=10, markup=False)
                return
            self.notify(f"resumed run {run.id}", markup=False)

        self.app.push_screen(PromptScreen(f"Resume from iteration (checkpoints: {have}; empty = latest):"), chosen)

    def action_close(self) -> None:
        """Close; with unsaved edits, ask first (save / discard / keep editing)."""
        if self.query_one(TextArea).text == self.saved_text:
            self.app.pop_screen()
            return
        def answered(answer: str | None) -> None:
            if answer == "discard" or (answer == "save" and self.action_save()):
                self.app.pop_screen()

        self.app.push_screen(UnsavedScreen(str(self.path)), answered)
