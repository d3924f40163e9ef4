"""The comparison of runs: their loss curves overlaid, a colour each, and a table; Enter opens one.

Each run is followed as its dashboard would follow it: a live run through its own
:class:`~tunetop.tui.source.LiveSource` (the digest, then live events), a finished one from its
journal, each into its own :class:`RunState`. The screen repaints on a timer, only what changed:
the chart at most ``CHART_HZ`` times a second, the table once a second (cells that changed
only), so following several live runs costs about what one dashboard does.
"""

from __future__ import annotations

import asyncio
import time
from functools import partial
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Static

from tunetop.runs.folders import RunDir
from tunetop.tui.compare import Comparison, Entry, compare
from tunetop.tui.screens.dashboard import SMOOTHING_STEPS, WINDOW_STEPS
from tunetop.tui.screens.modals import HelpScreen
from tunetop.tui.source import EventSource, JournalSource, LiveSource
from tunetop.tui.state import RunState
from tunetop.tui.themes import theme_color
from tunetop.tui.widgets.chart import Y_MODES
from tunetop.tui.widgets.compare_chart import RUN_COLOURS, X_AXES, CompareChart
from tunetop.tui.widgets.footer import KeysFooter

TICK_HZ = 4
"""The timer's pace: how soon a repaint follows the events that call for it."""
CHART_HZ = 1
"""The chart, the costliest widget to draw: as on the dashboard."""
TABLE_HZ = 1
"""The table: its numbers are read, not watched move; a live run's training time ticks in seconds."""


class CompareScreen(Screen[None]):
    """Several runs side by side: one chart, one table."""

    DEFAULT_CSS = """
    CompareScreen #title { height: 1; background: $panel; padding: 0 1; text-style: bold; }
    CompareScreen .box { border: round $primary 50%; border-title-color: $text; }
    CompareScreen #chart-box { height: 1fr; }
    CompareScreen #legend { height: auto; max-height: 3; padding: 0 1; }
    CompareScreen #table-box { height: auto; max-height: 14; }
    CompareScreen #table { height: auto; max-height: 12; }
    CompareScreen #reply { height: 1; padding: 0 1; background: $panel; }
    """

    BINDINGS = [
        Binding("enter", "open", "Open run"),
        Binding("m", "smoothing", "Smoothing"),
        Binding("w", "window", "Window"),
        Binding("y", "y_range", "Y range"),
        Binding("t", "x_axis", "X: iterations/tokens"),
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("q,escape", "back", "Back"),
    ]
    FOOTER_PRIORITY = ("back", "help", "x_axis", "smoothing", "window", "y_range")
    """The footer's keys, the most needed first: a narrow terminal shows those that fit (KeysFooter)."""

    def __init__(self, runs: list[RunDir]) -> None:
        super().__init__()
        self.runs = runs
        self.states = [RunState(run_id=run.id) for run in runs]
        self.alive = [run.is_alive() for run in runs]
        self.sources: list[EventSource] = []
        for index, run in enumerate(runs):
            on_events, on_status = partial(self._on_events, index), partial(self._on_status, index)
            if self.alive[index]:
                self.sources.append(LiveSource.for_run(run, on_events, on_status))
            else:
                self.sources.append(JournalSource(run.journal, on_events, on_status))
        self._tasks: list[asyncio.Task[None]] = []
        self._chart_dirty = True
        self._table_dirty = True
        self._chart_painted = 0.0
        self._table_painted = 0.0
        self._title_shown = ""
        self._shown_header: list[str] = []
        self._shown_rows: list[list[str]] = []
        self.comparison = Comparison([], [])
        self._legend_shown: list[str] | None = None
        self.last_reply = ""

    # -- layout ----------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Static(Text(f"tunetop — comparing {len(self.runs)} runs"), id="title")
        chart_box = Vertical(id="chart-box", classes="box")
        with chart_box:
            yield CompareChart(self.states, id="chart")
            yield Static("", id="legend")
        table_box = Vertical(id="table-box", classes="box")
        table_box.border_title = "runs · best validation loss first · enter opens a run's dashboard"
        with table_box:
            yield DataTable(id="table", cursor_type="row", zebra_stripes=True)
        yield Static("", id="reply")
        yield KeysFooter()

    def on_mount(self) -> None:
        self._tasks = [asyncio.create_task(self._follow(source, run)) for source, run in zip(self.sources, self.runs, strict=True)]
        self._paint_legend()
        self._paint_chart()
        self._paint_table()
        self.query_one("#table", DataTable).focus()
        self.set_interval(1 / TICK_HZ, self._tick)

    def on_unmount(self) -> None:
        for source in self.sources:
            source.close()
        for task in self._tasks:
            task.cancel()

    async def _follow(self, source: EventSource, run: RunDir) -> None:
        try:
            await source.run()
        except (OSError, ValueError) as error:  # a journal gone or unreadable: the other runs go on
            self.show_reply(f"run {run.id}: cannot read its events ({error})", error=True)

    # -- events in -------------------------------------------------------------------------

    def _on_events(self, index: int, events: list[dict[str, Any]]) -> None:
        self.states[index].apply_all(events)
        self._chart_dirty = self._table_dirty = True

    def _on_status(self, index: int, status: str, detail: str) -> None:
        if status == "disconnected":
            if self.states[index].state in ("finished", "failed"):
                self.sources[index].close()  # the engine exited after finishing: what we hold is complete
            self.alive[index] = self.runs[index].is_alive()  # gone (the table says dead), or a passing drop
            self._table_dirty = True
        elif status == "live":
            self.alive[index] = True
            self._table_dirty = True

    def _tick(self) -> None:
        now = time.monotonic()
        if self._chart_dirty and now - self._chart_painted >= 1 / CHART_HZ:
            self._paint_chart()
        ticking = any(alive and state.running_since is not None for alive, state in zip(self.alive, self.states, strict=True))
        if (self._table_dirty or ticking) and now - self._table_painted >= 1 / TABLE_HZ:
            self._paint_table()

    # -- painting --------------------------------------------------------------------------

    def repaint(self) -> None:
        """Bring the chart, the legend and the table up to date now."""
        self._paint_legend()
        self._paint_chart()
        self._paint_table()

    def _paint_chart(self) -> None:
        self._chart_dirty = False
        self._chart_painted = time.monotonic()
        chart = self.query_one(CompareChart)
        chart.update_from_state()
        window = "whole runs" if chart.window == 0 else f"last {chart.window:,} iterations"
        if chart.y_mode == "full":
            window += ", every value"
        x = "trained tokens" if chart.x_by == "tokens" else "iteration"
        title = f"loss · ━ train (EMA {chart.smoothing:g}) · ● validation · x: {x} · {window}"
        if title != self._title_shown:  # setting a title redraws the box, even the same title
            self._title_shown = title
            self.query_one("#chart-box", Vertical).border_title = title
        if self._legend_names() != self._legend_shown:  # a run's name comes with its first events
            self._paint_legend()

    def _legend_names(self) -> list[str]:
        return [state.name or "" for state in self.states]

    def _paint_legend(self) -> None:
        """One entry per run in its colour: the name (what the table's first columns say too)."""
        theme = self.app.current_theme
        legend = Text()
        for index, (run, state) in enumerate(zip(self.runs, self.states, strict=True)):
            colour = theme_color(theme, RUN_COLOURS[index % len(RUN_COLOURS)])
            if index:
                legend.append("   ")
            legend.append("━━ ", style=f"bold {colour}")
            legend.append(state.name or run.id, style="bold")
            legend.append(f" {run.id}", style="dim")
        self._legend_shown = self._legend_names()
        self.query_one("#legend", Static).update(legend)

    def _entries(self) -> list[Entry]:
        now = time.time()
        return [Entry(run.id, state, alive, now if alive else None)
                for run, state, alive in zip(self.runs, self.states, self.alive, strict=True)]

    def _paint_table(self) -> None:
        """The comparison as rows; only the cells that changed are written (rows reorder: all)."""
        self._table_dirty = False
        self._table_painted = time.monotonic()
        self.comparison = compare(self._entries())
        header, rows = ["", *self.comparison.header()], self.comparison.rows()
        table = self.query_one("#table", DataTable)
        order = [row[0] for row in rows]
        if header != self._shown_header or order != [row[0] for row in self._shown_rows]:
            cursor_key = self._cursor_run()
            table.clear(columns=True)
            for label in header:
                table.add_column(label, key=label or "colour")
            for row in rows:
                table.add_row(self._swatch(row[0]), *(Text(cell) for cell in row), key=row[0])
            if cursor_key in order:
                table.move_cursor(row=order.index(cursor_key))
        else:
            for row, shown in zip(rows, self._shown_rows, strict=True):
                for column, (cell, was) in enumerate(zip(row, shown, strict=True)):
                    if cell != was:
                        table.update_cell(row[0], header[column + 1], Text(cell))
        self._shown_header, self._shown_rows = header, rows

    def _swatch(self, run_id: str) -> Text:
        index = next(i for i, run in enumerate(self.runs) if run.id == run_id)
        return Text("━━", style=f"bold {theme_color(self.app.current_theme, RUN_COLOURS[index % len(RUN_COLOURS)])}")

    def _cursor_run(self) -> str | None:
        table = self.query_one("#table", DataTable)
        if not table.row_count:
            return None
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value

    def show_reply(self, text: str, error: bool = False) -> None:
        self.last_reply = text
        self.query_one("#reply", Static).update(Text(text, style="bold red" if error else "green"))

    # -- keys ------------------------------------------------------------------------------

    def on_data_table_row_selected(self, _event: DataTable.RowSelected) -> None:
        self.action_open()

    def action_open(self) -> None:
        """The dashboard of the run under the cursor (escape or q comes back here)."""
        key = self._cursor_run()
        run = next((r for r in self.runs if r.id == key), None)
        if run is None:
            return
        from tunetop.tui.screens.dashboard import DashboardScreen

        self.app.push_screen(DashboardScreen(run))

    def action_smoothing(self) -> None:
        chart = self.query_one(CompareChart)
        index = SMOOTHING_STEPS.index(chart.smoothing) if chart.smoothing in SMOOTHING_STEPS else 0
        chart.smoothing = SMOOTHING_STEPS[(index + 1) % len(SMOOTHING_STEPS)]
        self._paint_chart()

    def action_window(self) -> None:
        chart = self.query_one(CompareChart)
        index = WINDOW_STEPS.index(chart.window) if chart.window in WINDOW_STEPS else 0
        chart.window = WINDOW_STEPS[(index + 1) % len(WINDOW_STEPS)]
        self._paint_chart()

    def action_y_range(self) -> None:
        chart = self.query_one(CompareChart)
        chart.y_mode = Y_MODES[(Y_MODES.index(chart.y_mode) + 1) % len(Y_MODES)] if chart.y_mode in Y_MODES else Y_MODES[0]
        self._paint_chart()

    def action_x_axis(self) -> None:
        """x by iteration, or by trained tokens."""
        chart = self.query_one(CompareChart)
        chart.x_by = X_AXES[(X_AXES.index(chart.x_by) + 1) % len(X_AXES)] if chart.x_by in X_AXES else X_AXES[0]
        self._paint_chart()

    def action_help(self) -> None:
        keys = [(b.key_display or b.key, b.description) for b in self.BINDINGS if isinstance(b, Binding)]
        self.app.push_screen(HelpScreen(keys))

    def action_back(self) -> None:
        """Back to the runs list (the runs go on); the TUI quits if there is nothing to go back to."""
        if len(self.app.screen_stack) > 2:
            self.app.pop_screen()
        else:
            self.app.exit()
