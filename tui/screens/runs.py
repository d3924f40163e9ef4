"""The runs list: every run with state, progress, last loss and age; enter attaches."""

from __future__ import annotations

import shutil

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from tunetop.runs.folders import RunDir, list_runs
from tunetop.runs.queue import QueueError, edit_queue, load_queue
from tunetop.tui.screens.modals import ConfirmScreen, PromptScreen
from tunetop.tui.state import format_duration

QUEUE_KEY = "queue:"
"""Row keys of pending queue entries (``queue:ID``), which are no runs."""
QUEUE_BINDINGS = [
    Binding("shift+up,K", "queue_move(-1)", "Queued earlier"),
    Binding("shift+down,J", "queue_move(1)", "Queued later"),
    Binding("x", "queue_cancel", "Cancel queued"),
]


def run_row(run: RunDir) -> tuple[Text, ...]:
    """One row of the table; Text cells, since DataTable reads a str cell as Rich markup (names are the user's)."""
    s = run.summary()
    cells = (s["run"], s["name"], s["state"], s["iter"], s["loss"], format_duration(s["age_seconds"]))
    return tuple(Text(str(cell)) for cell in cells)


class RunsScreen(Screen[None]):
    """All runs; finished and failed ones stay until deleted."""

    DEFAULT_CSS = """
    RunsScreen #title { height: 1; background: $panel; padding: 0 1; text-style: bold; }
    RunsScreen DataTable { height: 1fr; }
    """

    BINDINGS = [
        Binding("enter", "open", "Attach / open"),
        Binding("space", "mark", "Mark"),
        Binding("c", "compare", "Compare marked"),
        Binding("n", "new_run", "New run from config"),
        Binding("u", "resume_run", "Resume run"),
        Binding("d", "delete", "Delete run"),
        Binding("r", "reload", "Refresh"),
        Binding("q,ctrl+d", "quit", "Quit"),
        *QUEUE_BINDINGS,
    ]

    def __init__(self) -> None:
        super().__init__()
        self.marked: list[str] = []
        """Run ids marked (space) for a comparison, in the order marked: the comparison's colours."""

    def compose(self) -> ComposeResult:
        yield Static("tunetop — runs", id="title")
        yield DataTable(id="runs", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("run", "name", "state", "iter", "loss", "age")
        self.action_reload()
        self.set_interval(2.0, self.action_reload)
        table.focus()

    def action_reload(self) -> None:
        table = self.query_one(DataTable)
        cursor = table.cursor_row
        table.clear()
        self._add_queue_rows(table)
        for run in reversed(list_runs()):
            row = run_row(run)
            if run.id in self.marked:
                row = (Text.assemble(("● ", "bold"), row[0]), *row[1:])
            table.add_row(*row, key=run.id)
        if table.row_count:
            table.move_cursor(row=min(cursor, table.row_count - 1))

    def _selected(self) -> RunDir | None:
        table = self.query_one(DataTable)
        if not table.row_count:
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        return next((r for r in list_runs() if r.id == key), None)

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
        """Open the comparison of the marked runs."""
        runs = {r.id: r for r in list_runs()}
        chosen = [runs[key] for key in self.marked if key in runs]  # a marked run may have been deleted since
        if len(chosen) < 2:
            self.notify("mark two runs or more with space, then press c to compare them", severity="warning")
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

    def _add_queue_rows(self, table: DataTable[Text]) -> None:
        try:
            pending = load_queue().pending()
        except QueueError as error:
            self.notify(str(error), severity="error", timeout=10, markup=False)
            return
        for place, entry in enumerate(pending, start=1):
            cells = [f"queue #{entry.id}", entry.name, f"queued ({place})"]
            cells += [""] * (len(table.columns) - len(cells))
            table.add_row(*(Text(cell) for cell in cells), key=f"{QUEUE_KEY}{entry.id}")

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
