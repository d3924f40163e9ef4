"""Modal screens: key help, a yes/no confirmation, unsaved edits, the live-settings form, a path prompt,
tags and note."""

from __future__ import annotations

from typing import Any, TypeVar

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static

from tunetop.training.config import LIVE_FIELDS, ConfigError, coerce_live

MODAL_CSS = """
ModalScreen { align: center middle; }
ModalScreen > Vertical, ModalScreen > Grid {
    width: 64; height: auto; padding: 1 2; border: thick $primary; background: $surface;
}
ModalScreen .title { text-style: bold; margin-bottom: 1; }
ModalScreen .error { color: $error; height: auto; }
ModalScreen Horizontal.buttons { height: auto; align-horizontal: right; margin-top: 1; }
ModalScreen Button { margin-left: 1; }
"""


ResultType = TypeVar("ResultType")


class Modal(ModalScreen[ResultType]):
    """A dialog centred over the screen below."""

    # MODAL_CSS styles the screen itself (its align); Textual scopes a widget's DEFAULT_CSS to
    # what is inside it, which would leave every dialog at the top left.
    SCOPED_CSS = False
    DEFAULT_CSS = MODAL_CSS


class HelpScreen(Modal[None]):
    """Every key of the screen below, with what it does."""

    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "Close")]

    def __init__(self, bindings: list[tuple[str, str]]) -> None:
        super().__init__()
        self.keys = bindings

    def compose(self) -> ComposeResult:
        table = Table.grid(padding=(0, 3))
        table.add_column(style="bold")
        table.add_column()
        for key, description in self.keys:
            table.add_row(key, description)
        table.add_row("ctrl+p", "command palette: every action by name, themes too")
        with Vertical():
            yield Label("Keys", classes="title")
            yield Static(table)
            yield Label("escape closes this help", classes="dim")

    def action_dismiss(self, result: Any = None) -> None:  # type: ignore[override]
        self.dismiss(None)


class ConfirmScreen(Modal[bool]):
    """A question with Yes / No; `y` and `n` answer it too."""

    BINDINGS = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n,escape", "answer(False)", "No"),
    ]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.question, classes="title", markup=False)
            with Horizontal(classes="buttons"):
                yield Button("Yes (y)", id="yes", variant="error")
                yield Button("No (n)", id="no", variant="primary")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)


class UnsavedScreen(Modal[str]):
    """Leaving an editor with unsaved edits: answers "save", "discard" or "keep" (editing)."""

    BINDINGS = [
        Binding("s", "answer('save')", "Save"),
        Binding("d", "answer('discard')", "Discard"),
        Binding("escape,k", "answer('keep')", "Keep editing"),
    ]

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(f"{self.path} has unsaved edits.", classes="title", markup=False)
            yield Label("Save them, discard them, or keep editing?")
            with Horizontal(classes="buttons"):
                yield Button("Save (s)", id="save", variant="primary")
                yield Button("Discard (d)", id="discard", variant="error")
                yield Button("Keep editing (esc)", id="keep")

    def on_mount(self) -> None:
        self.query_one("#keep", Button).focus()  # enter on the default loses nothing

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id or "keep")

    def action_answer(self, answer: str) -> None:
        self.dismiss(answer)


class SetScreen(Modal[dict[str, Any] | None]):
    """A form for the live-editable fields; returns only the changed ones, validated."""

    DEFAULT_CSS = """
    SetScreen Grid { grid-size: 2; grid-columns: 25 1fr; grid-rows: 1; grid-gutter: 1 1; height: auto; }
    """
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, current: dict[str, Any]) -> None:
        super().__init__()
        self.current = current

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("Change the running run (applied between steps)", classes="title")
            with Grid():
                for key in LIVE_FIELDS:
                    value = self.current.get(key)
                    yield Label(key)
                    # Compact (one line): every live field fits an 80 x 24 terminal.
                    yield Input(value="" if value is None else str(value), id=f"field-{key}", compact=True)
            yield Static("", id="set-error", classes="error")
            with Horizontal(classes="buttons"):
                yield Button("Apply", id="apply", variant="primary")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#field-learning_rate", Input).focus()

    def _changes(self) -> dict[str, Any]:
        changes: dict[str, Any] = {}
        for key in LIVE_FIELDS:
            text = self.query_one(f"#field-{key}", Input).value.strip()
            if not text or text == str(self.current.get(key)):
                continue
            changes[key] = coerce_live(key, text)
        return changes

    def _submit(self) -> None:
        try:
            changes = self._changes()
        except ConfigError as error:
            self.query_one("#set-error", Static).update(Text(str(error)))  # the typed value, as text
            return
        self.dismiss(changes or None)

    def on_input_submitted(self, _event: Input.Submitted) -> None:
        self._submit()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "apply":
            self._submit()
        else:
            self.dismiss(None)

    def action_cancel(self) -> None:
        self.dismiss(None)


class PromptScreen(Modal[str | None]):
    """Ask for one line of text (a config path, say)."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, question: str, value: str = "") -> None:
        super().__init__()
        self.question = question
        self.value = value

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.question, classes="title", markup=False)
            yield Input(value=self.value, id="prompt-input")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)

    def action_cancel(self) -> None:
        self.dismiss(None)


class LabelsScreen(Modal[tuple[list[str], str] | None]):
    """Edit a run's tags (space-separated words) and note; returns (tags, note), checked, or None."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, run_id: str, tags: list[str], note: str) -> None:
        super().__init__()
        self.run_id = run_id
        self.tags = tags
        self.note = note
        # One line: a note written with line breaks (`tunetop note`) shows them as spaces, and is
        # given back unchanged unless the line is edited.
        self._shown_note = " ".join(note.splitlines()).strip()

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(f"Tags and note of {self.run_id}", classes="title", markup=False)
            yield Label("tags (separated by spaces)")
            # Not selected on focus: a word typed would replace every tag (a sweep's tag was lost so).
            yield Input(value=" ".join(self.tags), id="labels-tags", compact=True, select_on_focus=False)
            yield Label("note")
            yield Input(value=self._shown_note, id="labels-note", compact=True, select_on_focus=False)
            yield Static("", id="labels-error", classes="error")
            with Horizontal(classes="buttons"):
                yield Button("Save", id="save", variant="primary")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        tags = self.query_one("#labels-tags", Input)
        tags.focus()
        tags.cursor_position = len(tags.value)  # typing adds to the tags there are

    def _submit(self) -> None:
        from tunetop.runs.labels import note_problem
        from tunetop.training.config import check_tags

        words = self.query_one("#labels-tags", Input).value.replace(",", " ").split()
        note = self.query_one("#labels-note", Input).value.strip()
        if note == self._shown_note:
            note = self.note
        try:
            tags = check_tags(words, "tags")
        except ConfigError as error:
            self.query_one("#labels-error", Static).update(Text(str(error)))
            return
        if problem := note_problem(note):
            self.query_one("#labels-error", Static).update(Text(problem))
            return
        self.dismiss((tags, note))

    def on_input_submitted(self, _event: Input.Submitted) -> None:
        self._submit()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "save":
            self._submit()
        else:
            self.dismiss(None)

    def action_cancel(self) -> None:
        self.dismiss(None)
