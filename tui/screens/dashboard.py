"""The dashboard of one run: header, loss chart, sparklines, the machine, throughput, tables, log, and keys.

Events are folded into a :class:`RunState` as they arrive; the screen repaints from it on a
timer and only what changed, each part at its own pace: the header (iteration, state) up to
``REFRESH_HZ`` times a second, the numbers, tables and log ``PANEL_HZ``, the loss chart and
sparklines ``CHART_HZ``. A flood of events costs one repaint per tick, not one per event, and no
layout pass (bench/tui.py follow: a TUI following 10 reports a second uses under 5% of a core).

Longer than most modules because it is one screen: its layout, its keys and the timer that paints
it share the screen's state; the panels it paints live in tui/widgets.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from typing import Any, TypeVar

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widget import Widget
from textual.widgets import DataTable, RichLog, Sparkline, Static

from tunetop.control.replies import describe
from tunetop.runs.folders import RunDir
from tunetop.training.config import LIVE_FIELDS
from tunetop.tui.notify import fresh, ring
from tunetop.tui.screens.modals import ConfirmScreen, HelpScreen, LabelsScreen, SetScreen
from tunetop.tui.source import EventSource, JournalSource, LiveSource
from tunetop.tui.state import ACTIVE_STATES, RunState
from tunetop.tui.themes import theme_color
from tunetop.tui.widgets.chart import Y_MODES, LossChart
from tunetop.tui.widgets.footer import KeysFooter
from tunetop.tui.widgets.panels import RunHeader, SystemPanel, ThroughputPanel

W = TypeVar("W", bound=Widget)
REFRESH_HZ = 8
"""The timer's pace, and the header's: the iteration and state are what say the screen is live."""
PANEL_HZ = 4
"""The throughput numbers, the tables and the log: read, not watched move."""
CHART_HZ = 1
"""The loss chart and the sparklines (the chart only when it would look different): the costliest
widgets to draw, and a report moves a long run's curve by a fraction of a dot."""
STEERING = frozenset({"toggle_pause", "save", "evaluate", "stop", "set_form"})
"""Actions that send the engine a command: hidden when no engine can take one."""
COMPACT_BELOW = 34
"""Terminal rows under which the machine panel is one line (at 80x24 the chart would be gone)."""
SHORT_BELOW = 30
"""Terminal rows under which the log is shorter and the validation table gives way (at 80x24 the
checkpoints had no row left to show)."""
SMOOTHING_STEPS = (0.0, 0.6, 0.9, 0.99)
WINDOW_STEPS = (0, 100, 1000, 10000)


class DashboardScreen(Screen[None]):
    """Watch and steer one run."""

    DEFAULT_CSS = """
    DashboardScreen #body { height: 1fr; }
    DashboardScreen #left { width: 2fr; }
    DashboardScreen #right { width: 1fr; min-width: 38; }
    DashboardScreen .box { border: round $primary 50%; border-title-color: $text; }
    DashboardScreen #chart-box { height: 1fr; }
    DashboardScreen .spark-row { height: 4; }
    DashboardScreen .spark-row > Vertical { width: 1fr; }
    DashboardScreen Sparkline { height: 1; margin: 0 1; }
    DashboardScreen .spark-label { height: 1; padding: 0 1; color: $text-muted; }
    DashboardScreen #validations { height: 1fr; }
    DashboardScreen #checkpoints { height: 1fr; }
    DashboardScreen DataTable { height: 1fr; }
    DashboardScreen #log { height: 8; }
    DashboardScreen.short #log { height: 5; }
    DashboardScreen.short #validations { display: none; }
    DashboardScreen #reply { height: 1; padding: 0 1; background: $panel; }
    """

    BINDINGS = [
        Binding("p", "toggle_pause", "Pause/Resume"),
        Binding("s", "save", "Save"),
        Binding("e", "evaluate", "Evaluate"),
        Binding("x", "stop", "Stop"),
        Binding("l", "set_form", "Set LR/intervals"),
        Binding("m", "smoothing", "Smoothing"),
        Binding("w", "window", "Window"),
        Binding("y", "y_range", "Y range"),
        Binding("c", "edit_config", "Config"),
        Binding("g", "playground", "Playground"),
        Binding("t", "labels", "Tags/note"),
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("q,ctrl+d", "detach", "Detach"),
    ]

    FOOTER_PRIORITY = (
        "detach", "help", "toggle_pause", "stop", "playground", "save", "evaluate", "set_form",
        "edit_config", "labels", "smoothing", "window", "y_range",
    )
    """The footer's keys, the most needed first: a narrow terminal shows those that fit (KeysFooter)."""

    def __init__(self, run: RunDir, live: bool | None = None, remote: Any = None) -> None:
        super().__init__()
        self.run_dir = run
        self.remote = remote
        self.live = run.is_alive() if live is None else live
        self.run_state = RunState(run_id=run.id)
        self._dirty = True
        self._dirty_header = True
        self._header_painted = 0.0
        self._chart_dirty = True
        self._chart_painted = 0.0
        self._chart_title_shown = ""
        self._panels_painted = 0.0
        self._found: dict[str, Widget] = {}
        self._shown_validations: tuple[int, int] = (0, 0)
        self._shown_checkpoints: list[tuple[int, float | None, float]] = []
        self._shown_logs = 0
        self._steerable = self.live
        self.source: EventSource
        if remote is not None and remote.tunnel is not None:
            from tunetop.tui.client import RunClient

            self.source = LiveSource(
                RunClient(remote.tunnel.local, self._on_events, self._on_status, on_heartbeat=self._on_heartbeat)
            )
        elif remote is not None:
            from tunetop.tui.source import CommandSource

            self.source = CommandSource(remote.history_command(), self._on_events, self._on_status)
        elif self.live:
            self.source = LiveSource.for_run(run, self._on_events, self._on_status, self._on_heartbeat)
        else:
            self.source = JournalSource(run.journal, self._on_events, self._on_status)
        self._source_task: asyncio.Task[None] | None = None
        self._tunnel_task: asyncio.Task[None] | None = None
        self.last_reply = ""
        self._opened_at = time.time()  # notable events since then ring (tunetop.tui.notify)

    # -- layout --------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield RunHeader(self.run_state, id="header")
        with Horizontal(id="body"):
            with Vertical(id="left"):
                chart_box = Vertical(id="chart-box", classes="box")
                chart_box.border_title = "loss"
                with chart_box:
                    yield LossChart(self.run_state, id="chart")
                with Horizontal(classes="spark-row"):
                    with Vertical(classes="box"):
                        yield Static("train loss", classes="spark-label", id="spark-loss-label")
                        yield Sparkline([], id="spark-loss")
                    with Vertical(classes="box"):
                        yield Static("tokens/s", classes="spark-label", id="spark-tps-label")
                        yield Sparkline([], id="spark-tps")
                yield SystemPanel(self.run_state, id="system")
            with Vertical(id="right"):
                yield ThroughputPanel(self.run_state, id="throughput")
                validations = Vertical(id="validations", classes="box")
                validations.border_title = "validation"
                with validations:
                    yield DataTable(id="validation-table", cursor_type="row", zebra_stripes=True, cell_padding=0)
                checkpoints = Vertical(id="checkpoints", classes="box")
                checkpoints.border_title = "checkpoints"
                with checkpoints:
                    yield DataTable(id="checkpoint-table", cursor_type="row", zebra_stripes=True, cell_padding=0)
        log = RichLog(id="log", classes="box", wrap=True, markup=False, max_lines=2000)
        log.border_title = "log"
        yield log
        yield Static("", id="reply")
        yield KeysFooter()

    def on_mount(self) -> None:
        # Fixed widths, a space of gap built in (no cell padding): every column fits the right-hand
        # panel at its narrowest (36 cells inside), so none hides behind a horizontal scrollbar.
        validation_table = self.query_one("#validation-table", DataTable)
        for label, width in (("iter", 7), ("loss", 8), ("change", 9), ("secs", 6), ("", 5)):
            validation_table.add_column(label, width=width)
        checkpoint_table = self.query_one("#checkpoint-table", DataTable)
        for label, width in (("iter", 7), ("val loss", 9), ("size", 9), ("saved", 8)):
            checkpoint_table.add_column(label, width=width)
        self.query_one(RunHeader).read_only = not self.live
        self._source_task = asyncio.create_task(self.source.run())
        if self.remote is not None and self.remote.tunnel is not None:
            self._tunnel_task = asyncio.create_task(self.remote.tunnel.supervise(self._on_status))
        self.set_interval(1 / REFRESH_HZ, self._tick)

    def on_resize(self) -> None:
        # A short terminal keeps the loss chart: the machine panel shrinks to one line of readings.
        panel = self.query_one(SystemPanel)
        panel.set_class(self.size.height < COMPACT_BELOW, "compact")
        panel.refresh_from_state()
        # ... and the checkpoints keep rows to show: a shorter log, and the validation table (its
        # best is in the throughput panel, every point on the chart) gives way.
        self.set_class(self.size.height < SHORT_BELOW, "short")

    def on_unmount(self) -> None:
        self.source.close()
        for task in (self._source_task, self._tunnel_task):
            if task is not None:
                task.cancel()

    # -- events in -------------------------------------------------------------------------

    def _on_events(self, events: list[dict[str, Any]]) -> None:
        self.run_state.apply_all(events)
        if isinstance(self.source, LiveSource):  # an engine that was running when the screen opened
            for event in fresh(events, self._opened_at):
                ring(self.app, event)
        self._dirty = True
        self._dirty_header = True

    def _on_heartbeat(self, event: dict[str, Any]) -> None:
        self.run_state.apply(event)  # the engine's iteration now, between reports
        self._dirty_header = True

    def _on_status(self, status: str, detail: str) -> None:
        header = self.query_one(RunHeader)
        if status == "disconnected" and self.run_state.state in ("finished", "failed"):
            # The engine exited after finishing: nothing to reconnect to; what we hold is complete.
            self.source.close()
            header.connection = "live"
            header.read_only = True
            self._dirty = True
            return
        header.connection = status
        self._dirty_header = True
        if status == "disconnected":
            self.show_reply(f"connection lost ({detail}); keeping what we have and reconnecting…", error=True)
        elif status == "incompatible":
            self.show_reply(detail, error=True)
        self._dirty = True

    def _tick(self) -> None:
        # Repaint only when events arrived, each part at its pace; the header's clock (whole
        # seconds) once a second.
        now = time.monotonic()
        chart_due = now - self._chart_painted >= 1 / CHART_HZ
        if self._dirty and now - self._panels_painted >= 1 / PANEL_HZ:
            self._panels_painted = now
            self._repaint(chart=chart_due)
        elif self._chart_dirty and chart_due:
            self._paint_chart()
        if self._dirty_header or now - self._header_painted >= 1.0:
            self._header_painted = now
            self._dirty_header = False
            self._widget("#header", RunHeader).refresh_from_state()

    def _widget(self, selector: str, kind: type[W]) -> W:
        """``query_one``, remembered: the widgets live as long as the screen, and a query walks the
        DOM (a third of a millisecond, several times a repaint)."""
        found = self._found.get(selector)
        if found is None:
            found = self._found[selector] = self.query_one(selector, kind)
        return found  # type: ignore[return-value]

    def can_steer(self) -> bool:
        """Whether an engine may take commands: a live run that has not ended."""
        if not self.is_mounted or not self.live or self._widget("#header", RunHeader).read_only:
            return False
        return self.run_state.state not in ("finished", "failed")

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Pause, save, evaluate, stop and set leave the footer (and do nothing) once they cannot work."""
        if action in STEERING:
            return self.can_steer()
        return True

    def repaint(self) -> None:
        """Bring every widget up to date with the run state now."""
        self._repaint(chart=True)

    def _paint_chart(self) -> None:
        self._chart_dirty = False
        self._chart_painted = time.monotonic()
        self._widget("#chart", LossChart).update_from_state()
        s = self.run_state  # the sparklines are charts too: at the chart's pace
        self._widget("#spark-loss", Sparkline).data = [x for x in s.train_losses[-200:] if math.isfinite(x)]
        self._widget("#spark-tps", Sparkline).data = s.tokens_per_second_history[-200:]
        title = self._chart_title()
        if title != self._chart_title_shown:  # setting a title redraws the box, even the same title
            self._chart_title_shown = title
            self._widget("#chart-box", Vertical).border_title = title

    def _repaint(self, chart: bool) -> None:
        self._dirty = False
        self._dirty_header = True
        s = self.run_state
        if self.can_steer() != self._steerable:
            self._steerable = not self._steerable
            self.refresh_bindings()
        self._widget("#throughput", ThroughputPanel).refresh_from_state()
        self._widget("#system", SystemPanel).refresh_from_state()
        if chart:
            self._paint_chart()
        else:
            self._chart_dirty = True
        self._refresh_tables()
        log = self._widget("#log", RichLog)
        new = min(s.log_total - self._shown_logs, len(s.logs))
        for line in list(s.logs)[len(s.logs) - new :] if new > 0 else []:
            stamp = time.strftime("%H:%M:%S", time.localtime(line.ts))
            style = {"warning": "yellow", "error": "bold red"}.get(line.level, "")
            log.write(Text(f"{stamp} {line.message}", style=style))
        self._shown_logs = s.log_total

    def _chart_title(self) -> str:
        chart = self._widget("#chart", LossChart)
        theme = self.app.current_theme
        window = "whole run" if chart.window == 0 else f"last {chart.window:,} iterations"
        if chart.y_mode == "full":
            window += ", every value"
        train, val = theme_color(theme, "accent"), theme_color(theme, "warning")
        return f"loss · [{train}]━ train (EMA {chart.smoothing:g})[/] · [{val}]● validation[/] · {window}"

    def _refresh_tables(self) -> None:
        """Newest first, so the latest rows are always in view without scrolling."""
        s = self.run_state
        shown_validations = (len(s.validations), id(s.validations[-1]) if s.validations else 0)
        if shown_validations != self._shown_validations:
            table = self._widget("#validation-table", DataTable)
            best = s.best_validation
            table.clear()
            for row in reversed(s.validations[-200:]):
                change = "" if row.change is None else f"{row.change:+.4f}"
                mark = "★best" if best is not None and row is best else ""
                table.add_row(str(row.iteration), f"{row.loss:.4f}", change, f"{row.seconds:.2f}", mark)
            self._shown_validations = shown_validations
        # Rows come and go (retention) and gain a validation loss later: compare what they show.
        shown_checkpoints = [(c.iteration, c.validation_loss, c.ts) for c in s.checkpoints]
        if shown_checkpoints != self._shown_checkpoints:
            checkpoints = self._widget("#checkpoint-table", DataTable)
            checkpoints.clear()
            for saved in reversed(s.checkpoints[-200:]):
                weights = os.path.join(saved.checkpoint, "adapters.safetensors") if saved.checkpoint else saved.path
                val = f"{saved.validation_loss:.4f}" if saved.validation_loss is not None else "-"
                stamp = time.strftime("%H:%M:%S", time.localtime(saved.ts))
                checkpoints.add_row(str(saved.iteration), val, _file_size(weights), stamp)
            self._shown_checkpoints = shown_checkpoints

    # -- commands out ----------------------------------------------------------------------

    def show_reply(self, text: str, error: bool = False) -> None:
        self.last_reply = text
        style = "bold red" if error else "green"
        self.query_one("#reply", Static).update(Text(text, style=style))

    @work(exclusive=False)
    async def send(self, cmd: str, args: dict[str, Any] | None = None) -> None:
        """Send a command and show its reply, ok or the error."""
        self.show_reply(f"{cmd}: sent…")
        reply = await self.source.command(cmd, args)
        self.show_reply(describe(cmd, reply), error=not reply.ok)

    def action_toggle_pause(self) -> None:
        self.send("resume" if self.run_state.state == "paused" else "pause")

    def action_save(self) -> None:
        self.send("save")

    def action_evaluate(self) -> None:
        self.send("evaluate")

    def action_stop(self) -> None:
        def answered(yes: bool | None) -> None:
            if yes:
                self.send("stop")
            else:
                self.show_reply("stop: cancelled")

        self.app.push_screen(ConfirmScreen("Stop the run? It saves the adapter, then the engine exits."), answered)

    def action_set_form(self) -> None:
        config = self.run_state.config
        current = {key: config.get(section, {}).get(name) for key, (section, name) in LIVE_FIELDS.items()}
        current["learning_rate"] = self.run_state.learning_rate  # the rate now, not the configured peak

        def submitted(changes: dict[str, Any] | None) -> None:
            if changes:
                self.send("set", changes)

        self.app.push_screen(SetScreen(current), submitted)

    # -- tags and note (tunetop.runs.labels) ------------------------------------------------

    def action_labels(self) -> None:
        """Edit the run's tags and note: a live engine journals the change, a run at rest is changed here."""
        s = self.run_state

        def chosen(result: tuple[list[str], str] | None) -> None:
            if result is None:
                return
            tags, note = result
            add = [t for t in tags if t not in s.tags]
            remove = [t for t in s.tags if t not in tags]
            new_note = note if note != s.note else None
            if not add and not remove and new_note is None:
                self.show_reply("tags and note: nothing changed")
            elif self.can_steer():
                if add or remove:
                    self.send("tag", {"add": add, "remove": remove})
                if new_note is not None:
                    self.send("note", {"text": new_note})
            elif self.remote is not None:
                self.show_reply("this remote run has no live engine: change its tags on its machine (`tunetop tag`)", error=True)
            else:
                self._labels_at_rest(add, remove, new_note)

        self.app.push_screen(LabelsScreen(self.run_dir.id, list(s.tags), s.note), chosen)

    @work(thread=True, exclusive=True)
    def _labels_at_rest(self, add: list[str], remove: list[str], note: str | None) -> None:
        from tunetop.runs.folders import RunError
        from tunetop.runs.labels import LabelError, change_labels

        try:
            labels = change_labels(self.run_dir, add, remove, note)
        except (LabelError, RunError, OSError) as error:
            self.app.call_from_thread(self.show_reply, f"tags and note: {error}", True)
            return

        def show() -> None:
            # A journal source read the journal once: the new labels are folded in here.
            self.run_state.tags, self.run_state.note = labels.tags, labels.note
            self._dirty_header = True
            self.show_reply(f"tags: {', '.join(labels.tags) or '(none)'}; note: {labels.note_line or '(none)'}")

        self.app.call_from_thread(show)

    def action_smoothing(self) -> None:
        chart = self.query_one(LossChart)
        index = SMOOTHING_STEPS.index(chart.smoothing) if chart.smoothing in SMOOTHING_STEPS else 0
        chart.smoothing = SMOOTHING_STEPS[(index + 1) % len(SMOOTHING_STEPS)]
        self._paint_chart()  # the chart redraws itself (a reactive); its title now too

    def action_window(self) -> None:
        chart = self.query_one(LossChart)
        index = WINDOW_STEPS.index(chart.window) if chart.window in WINDOW_STEPS else 0
        chart.window = WINDOW_STEPS[(index + 1) % len(WINDOW_STEPS)]
        self._paint_chart()

    def action_y_range(self) -> None:
        """Toggle the loss chart's y-axis: fitted to the recent curve (an early spike clipped), or all of it."""
        chart = self.query_one(LossChart)
        chart.y_mode = Y_MODES[(Y_MODES.index(chart.y_mode) + 1) % len(Y_MODES)] if chart.y_mode in Y_MODES else Y_MODES[0]
        self._paint_chart()

    def action_edit_config(self) -> None:
        from tunetop.tui.screens.editor import ConfigEditorScreen

        if self.remote is not None:
            self.show_reply("the config of a remote run lives on the remote machine: edit it there", error=True)
            return
        self.app.push_screen(ConfigEditorScreen(self.run_dir.config))

    def action_playground(self) -> None:
        from tunetop.tui.screens.playground import PlaygroundScreen

        self.app.push_screen(PlaygroundScreen(self))

    def action_help(self) -> None:
        keys = [(b.key_display or b.key, b.description) for b in self.BINDINGS if isinstance(b, Binding)]
        self.app.push_screen(HelpScreen(keys))

    def action_detach(self) -> None:
        """Leave; the run goes on. On the runs list, go back to it; otherwise quit."""
        if len(self.app.screen_stack) > 2:
            self.app.pop_screen()
        else:
            self.app.exit_note = self.detach_note()  # type: ignore[attr-defined]
            self.app.exit()

    def detach_note(self) -> str:
        """What the terminal says once the TUI is gone: the run goes on, and how to come back."""
        s = self.run_state
        header = self.query_one(RunHeader)
        if header.read_only or s.state not in ACTIVE_STATES:
            return ""
        target = f"{self.remote.target}:{s.run_id}" if self.remote is not None else s.run_id
        run = f"run {s.run_id}" + (f" ({s.name})" if s.name else "")
        reattach = f"Reattach with `tunetop attach {target}`."
        if header.connection in ("disconnected", "incompatible"):
            return f"Detached from {run}; its engine could not be reached ({header.connection}). " \
                f"`tunetop ls` shows its state. {reattach}"
        if s.state == "paused":
            return f"Detached from {run}: it stays paused at iteration {s.iteration:,} " \
                f"(`tunetop resume {s.run_id}` continues it). {reattach}"
        return f"Detached from {run}: it goes on training (iteration {s.iteration:,} of {s.iterations:,}). {reattach}"


def _file_size(path: str) -> str:
    try:
        size = os.path.getsize(path)
    except OSError:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024  # type: ignore[assignment]
    return "-"
