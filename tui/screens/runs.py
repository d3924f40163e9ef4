"""The runs list: every run with state, progress, losses, tags, note and age; enter attaches.

Hundreds of runs: a ``/`` filter (name, tag, state, note), a sort by any column, and the runs
that failed before training hidden unless asked for. Each run costs a status.json read and a
look at its lock (tunetop.runs.folders, tunetop.runs.labels); the table is rebuilt only when
what it shows changed (bench/runs_list.py: 500 runs, docs/PERFORMANCE.md).

Longer than most modules because it is one screen: the table, its filter, sort and marks, and the
queue's rows (reorder, cancel) share the list's state.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from typing import Any

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Input, Static

from tunetop.runs.folders import RunDir, list_runs
from tunetop.runs.labels import labels_of
from tunetop.runs.queue import QueueError, edit_queue, load_queue
from tunetop.tui.screens.modals import ConfirmScreen, LabelsScreen, PromptScreen
from tunetop.tui.state import format_duration

QUEUE_KEY = "queue:"
"""Row keys of pending queue entries (``queue:ID``), which are no runs."""
QUEUE_BINDINGS = [
    Binding("shift+up,K", "queue_move(-1)", "Queued earlier"),
    Binding("shift+down,J", "queue_move(1)", "Queued later"),
    Binding("x", "queue_cancel", "Cancel queued"),
]

# -- rows: one per run, read once per refresh ----------------------------------------------

COLUMNS = ("run", "name", "state", "iter", "loss", "best val", "tags", "note", "age")
NOTE_WIDTH = 32
MAX_WIDTH = 40


@dataclass
class RunRow:
    """What the list knows of one run: its cells, the values it sorts by, and the text a filter searches."""

    run: RunDir
    cells: tuple[str, ...]
    sort_values: tuple[Any, ...]
    search: str  # lower case: id, name, state, tags, note
    failed_before_training: bool
    tags: list[str]
    note: str


def _number(value: Any) -> float:
    """A sortable number; unknown sorts last in ascending order."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.inf


def read_row(run: RunDir) -> RunRow:
    """One run's row, from its status.json (and lock) alone."""
    status = run.status()
    s = run.summary(status)
    labels = labels_of(run, status)
    best = s["best_val_loss"]
    note = labels.note_line
    loss = status.get("loss")
    cells = (
        s["run"], s["name"], s["state"], s["iter"], s["loss"], "-" if best is None else f"{best:.4f}",
        " ".join(labels.tags), note if len(note) <= NOTE_WIDTH else note[: NOTE_WIDTH - 1] + "…",
        format_duration(s["age_seconds"]),
    )
    iteration = status.get("iteration") if not s["failed_before_training"] else None
    sort_values = (
        s["run"], s["name"].lower(), s["state"], _number(iteration), _number(loss), _number(best),
        " ".join(labels.tags).lower(), labels.note.lower(), s["age_seconds"],
    )
    search = " ".join((s["run"], s["name"], s["state"], " ".join(labels.tags), labels.note)).lower()
    return RunRow(run, cells, sort_values, search, bool(s["failed_before_training"]), labels.tags, labels.note)


def matches(row: RunRow, query: str) -> bool:
    """Every word of ``query`` occurs in the run's id, name, state, tags or note (case ignored)."""
    return all(word in row.search for word in query.lower().split())


def arrange(rows: list[RunRow], query: str, column: int, descending: bool, show_failed: bool) -> list[RunRow]:
    """The rows to show: filtered, failed-before-training ones dropped unless asked for, sorted."""
    kept = [r for r in rows if (show_failed or not r.failed_before_training) and matches(r, query)]
    known = [r for r in kept if r.sort_values[column] != math.inf]
    unknown = [r for r in kept if r.sort_values[column] == math.inf]  # no value: always at the end
    known.sort(key=lambda r: r.sort_values[column], reverse=descending)
    return known + unknown


class RunsScreen(Screen[None]):
    """All runs; finished and failed ones stay until deleted."""

    DEFAULT_CSS = """
    RunsScreen #title { height: 1; background: $panel; padding: 0 1; text-style: bold; }
    RunsScreen #filter { dock: top; display: none; }
    RunsScreen #filter.shown { display: block; }
    RunsScreen DataTable { height: 1fr; }
    """

    BINDINGS = [
        Binding("enter", "open", "Attach / open"),
        Binding("space", "mark", "Mark"),
        Binding("c", "compare", "Compare marked"),
        Binding("n", "new_run", "New run from config"),
        Binding("u", "resume_run", "Resume run"),
        Binding("d", "delete", "Delete run"),
        Binding("slash", "filter", "Filter", key_display="/"),
        Binding("o", "sort_column", "Sort column"),
        Binding("O", "sort_order", "Sort order", key_display="O"),
        Binding("a", "toggle_failed", "Show failed"),
        Binding("t", "labels", "Tags/note"),
        Binding("r", "reload", "Refresh"),
        Binding("q,ctrl+d", "quit", "Quit"),
        *QUEUE_BINDINGS,
    ]

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[RunRow] = []
        self.shown: list[RunRow] = []
        self.query_text = ""
        self.sort_column = 0  # the run id: start time
        self.sort_descending = True  # newest first
        self.show_failed = False
        self._shown_key: tuple[Any, ...] = ()
        self.queued: list[tuple[str, tuple[str, ...]]] = []  # (row key, cells) of pending queue entries
        self.marked: list[str] = []
        """Run ids marked (space) for a comparison, in the order marked: the comparison's colours."""

    def compose(self) -> ComposeResult:
        yield Static("tunetop — runs", id="title")
        yield Input(placeholder="filter: words in the name, tags, state or note (enter keeps it, escape clears it)", id="filter")
        yield DataTable(id="runs", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        self.action_reload()
        self.set_interval(2.0, self.action_reload)
        self.query_one(DataTable).focus()

    def action_reload(self) -> None:
        """Read every run again, and show what changed."""
        self.rows = [read_row(run) for run in list_runs()]
        self.queued = self._queue_rows()
        self._show()

    def _show(self) -> None:
        """Filter, sort and draw the rows; the table is rebuilt only when what it shows changed."""
        self.shown = arrange(self.rows, self.query_text, self.sort_column, self.sort_descending, self.show_failed)
        key = (self.sort_column, self.sort_descending, tuple(self.marked), tuple(self.queued),
               tuple((r.run.id, r.cells) for r in self.shown))
        self._title()
        if key == self._shown_key:
            return
        self._shown_key = key
        table = self.query_one(DataTable)
        selected = self._cursor_key()
        table.clear(columns=True)
        arrow = " ▼" if self.sort_descending else " ▲"
        for number, name in enumerate(COLUMNS):
            label = name + (arrow if number == self.sort_column else "")
            # Each column as wide as its longest cell, up to MAX_WIDTH: long tags or notes do not
            # push the other columns off the screen.
            width = max([len(label), *(len(r.cells[number]) for r in self.shown),
                         *(len(cells[number]) for _key, cells in self.queued)]) + (2 if number == 0 and self.marked else 0)
            table.add_column(label, key=name, width=min(width, MAX_WIDTH))
        self._add_queue_rows(table)
        # Text cells: DataTable reads a str cell as Rich markup, and names, tags and notes are the user's.
        for r in self.shown:
            cells = [Text(cell) for cell in r.cells]
            if r.run.id in self.marked:  # marked for a comparison (space)
                cells[0] = Text.assemble(("● ", "bold"), cells[0])
            table.add_row(*cells, key=r.run.id)
        if table.row_count:
            keys = [key for key, _cells in self.queued] + [r.run.id for r in self.shown]
            table.move_cursor(row=keys.index(selected) if selected in keys else 0)

    def _title(self) -> None:
        total = len(self.rows)
        hidden = 0 if self.show_failed else sum(r.failed_before_training for r in self.rows)
        parts = ["tunetop — runs", f"{len(self.shown)} of {total}" if len(self.shown) != total else f"{total}"]
        parts.append(f"sorted by {COLUMNS[self.sort_column]} {'▼' if self.sort_descending else '▲'}")
        if self.query_text:
            parts.append(f"filter: {self.query_text}")
        if hidden:
            parts.append(f"{hidden} failed before training hidden (a shows them)")
        self.query_one("#title", Static).update(Text(" · ".join(parts)))

    def _cursor_key(self) -> str | None:
        """The row key under the cursor: a run id, or a queue entry's key."""
        table = self.query_one(DataTable)
        if not table.row_count:
            return None
        return str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)

    def _selected(self) -> RunDir | None:
        """The run under the cursor (rows are keyed by run id)."""
        table = self.query_one(DataTable)
        if not table.row_count:
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        return next((r.run for r in self.shown if r.run.id == key), None)

    # -- filter and sort -------------------------------------------------------------------

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.add_class("shown")
        box.focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "filter":
            self.query_text = event.value.strip()
            self._show()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "filter":
            if not self.query_text:
                event.input.remove_class("shown")
            self.query_one(DataTable).focus()

    def on_key(self, event: Any) -> None:
        box = self.query_one("#filter", Input)
        if event.key == "escape" and box.has_focus:  # escape clears the filter and leaves the box
            event.stop()
            box.value = ""
            self.query_text = ""
            box.remove_class("shown")
            self.query_one(DataTable).focus()
            self._show()

    def action_sort_column(self) -> None:
        """The next column; text columns sort A-Z first, numbers and the id largest first."""
        self.sort_column = (self.sort_column + 1) % len(COLUMNS)
        self.sort_descending = COLUMNS[self.sort_column] in ("run", "iter", "age")
        self._show()

    def action_sort_order(self) -> None:
        self.sort_descending = not self.sort_descending
        self._show()

    def action_toggle_failed(self) -> None:
        self.show_failed = not self.show_failed
        self.notify("showing runs that failed before training" if self.show_failed else "hiding runs that failed before training")
        self._show()

    # -- tags and note (tunetop.runs.labels) ---------------------------------------------------

    def action_labels(self) -> None:
        run = self._selected()
        if run is None:
            return
        row = next((r for r in self.shown if r.run.id == run.id), None)
        tags, note = (row.tags, row.note) if row is not None else ([], "")

        def chosen(result: tuple[list[str], str] | None) -> None:
            if result is not None:
                new_tags, new_note = result
                add = [t for t in new_tags if t not in tags]
                remove = [t for t in tags if t not in new_tags]
                self._change_labels(run, add, remove, new_note if new_note != note else None)

        self.app.push_screen(LabelsScreen(run.id, list(tags), note), chosen)

    @work(thread=True, exclusive=True)
    def _change_labels(self, run: RunDir, add: list[str], remove: list[str], note: str | None) -> None:
        """Live: the engine journals it; at rest: journaled here under the run's lock."""
        from tunetop.runs.folders import RunError
        from tunetop.runs.labels import LabelError, change_labels

        if not add and not remove and note is None:
            return
        try:
            labels = change_labels(run, add, remove, note)
        except (LabelError, RunError, OSError) as error:
            self.app.call_from_thread(self.notify, f"{run.id}: {error}", severity="error", timeout=10, markup=False)
            return
        self.app.call_from_thread(self.notify, f"{run.id}: tags {' '.join(labels.tags) or '(none)'}", markup=False)
        self.app.call_from_thread(self.action_reload)

    # -- opening, starting, resuming, deleting ---------------------------------------------

    def on_data_table_row_selected(self, _event: DataTable.RowSelected) -> None:
        self.action_open()

    def action_open(self) -> None:
        run = self._selected()
        if run is not None:
            from tunetop.tui.screens.dashboard import DashboardScreen

            self.app.push_screen(DashboardScreen(run))

    def action_mark(self) -> None:
        """Mark the run under the cursor for a comparison, or unmark it."""
        run = self._selected()
        if run is None:
            return
        if run.id in self.marked:
            self.marked.remove(run.id)
        else:
            self.marked.append(run.id)
        self.action_reload()
        table = self.query_one(DataTable)
        table.move_cursor(row=min(table.cursor_row + 1, table.row_count - 1))  # as file managers do: on to the next

    def action_compare(self) -> None:
        """Open the comparison of the marked runs; none marked, of the latest sweep or tag's runs."""
        runs = {r.id: r for r in list_runs()}
        chosen = [runs[key] for key in self.marked if key in runs]  # a marked run may have been deleted since
        if not self.marked:
            from tunetop.runs.groups import latest_group

            group = latest_group(list(runs.values()))
            if group is not None and len(group[1]) >= 2:
                tag, chosen = group
                self.notify(f"comparing the {len(chosen)} runs tagged {tag}", markup=False)
        if len(chosen) < 2:
            self.notify("mark two runs or more with space, then press c to compare them "
                        "(with none marked, c compares the latest sweep or tag's runs)", severity="warning")
            return
        from tunetop.tui.screens.compare import CompareScreen

        self.app.push_screen(CompareScreen(chosen))

    def action_new_run(self) -> None:
        def chosen(path: str | None) -> None:
            if not path:
                return
            from tunetop.runs.launch import load_run_config, start_run

            try:
                run, _code = start_run(load_run_config(path), detach=True)
            except Exception as error:
                self.notify(f"could not start: {error}", severity="error", timeout=10, markup=False)
                return
            self.notify(f"started run {run.id}", markup=False)
            self.action_reload()

        self.app.push_screen(PromptScreen("Config file for the new run:", "run.toml"), chosen)

    def action_resume_run(self) -> None:
        """Continue a dead or finished run from its latest checkpoint, detached, and attach."""
        run = self._selected()
        if run is None:
            return
        if run.is_alive():
            self.notify("that run is training already", severity="warning")
            return
        from tunetop.runs.launch import resume_run

        try:
            resume_run(run, None, detach=True)
        except Exception as error:
            self.notify(f"could not resume: {error}", severity="error", timeout=10, markup=False)
            return
        from tunetop.tui.screens.dashboard import DashboardScreen

        self.app.push_screen(DashboardScreen(run, live=True))

    def action_delete(self) -> None:
        run = self._selected()
        if run is None:
            return
        if run.is_alive():
            self.notify("that run is still training: stop it first", severity="warning")
            return

        def answered(yes: bool | None) -> None:
            if yes:
                shutil.rmtree(run.path, ignore_errors=True)
                self.action_reload()

        self.app.push_screen(ConfirmScreen(f"Delete run {run.id} and its files?"), answered)

    def action_quit(self) -> None:
        self.app.exit()

    # -- the queue (tunetop.runs.queue): pending entries first, in order; reorder and cancel them --

    def _queue_rows(self) -> list[tuple[str, tuple[str, ...]]]:
        """(row key, cells) of each pending entry, in order (shown first, whatever the filter and sort)."""
        try:
            pending = load_queue().pending()
        except QueueError as error:
            self.notify(str(error), severity="error", timeout=10, markup=False)
            return []
        rows = []
        for place, entry in enumerate(pending, start=1):
            cells = [f"queue #{entry.id}", entry.name, f"queued ({place})"]
            rows.append((f"{QUEUE_KEY}{entry.id}", tuple(cells + [""] * (len(COLUMNS) - len(cells)))))
        return rows

    def _add_queue_rows(self, table: DataTable[Text]) -> None:
        for key, cells in self.queued:
            table.add_row(*(Text(cell) for cell in cells), key=key)

    def _queued(self) -> str | None:
        """The selected row's queue entry number, when it is a queued entry."""
        table = self.query_one(DataTable)
        if not table.row_count:
            return None
        key = str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)
        return key.removeprefix(QUEUE_KEY) if key.startswith(QUEUE_KEY) else None

    def action_queue_move(self, steps: int) -> None:
        entry = self._queued()
        if entry is None:
            return
        try:
            with edit_queue() as queue:
                queue.move(entry, steps)
                place = [e.id for e in queue.pending()].index(int(entry))
        except QueueError as error:
            self.notify(str(error), severity="warning", markup=False)
            return
        self.action_reload()
        self.query_one(DataTable).move_cursor(row=place)

    def action_queue_cancel(self) -> None:
        entry = self._queued()
        if entry is None:
            self.notify("x cancels a queued run: select one (the rows marked queued)", severity="warning")
            return

        def answered(yes: bool | None) -> None:
            if not yes:
                return
            try:
                with edit_queue() as queue:
                    queue.remove(entry)
            except QueueError as error:
                self.notify(str(error), severity="warning", markup=False)
            self.action_reload()

        self.app.push_screen(ConfirmScreen(f"Take queue entry {entry} out of the queue?"), answered)
