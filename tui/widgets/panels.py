"""Small read-only panels of the dashboard: the run header, the throughput panel, the machine panel."""

from __future__ import annotations

import time

from rich.text import Text
from textual.widgets import Static

from tunetop.tui.state import RunState, format_count, format_duration
from tunetop.tui.themes import themed

STATE_STYLES = {
    "running": "bold $success",
    "paused": "bold $warning",
    "stopping": "bold $warning",
    "starting": "bold $secondary",
    "finished": "bold $primary",
    "failed": "bold $error",
}


def progress_bar(fraction: float, width: int) -> str:
    """A bar of ``width`` cells with eighth-block resolution."""
    width = max(width, 1)
    eighths = round(max(0.0, min(fraction, 1.0)) * width * 8)
    full, part = divmod(eighths, 8)
    bar = "█" * full + (" ▏▎▍▌▋▊▉"[part] if part else "")
    return bar.ljust(width, "·")


def fit_line(left: Text, right: Text, width: int) -> Text:
    """``left`` then ``right`` in one line of at most ``width`` cells, never wrapped: ``left`` (the
    names, the model) gives way first, cut with an ellipsis, so ``right`` (the state, the
    connection) stays whole while it fits at all."""
    room = width - right.cell_len
    if room < 8:  # too narrow for both: the line as it comes, cut at the end
        line = Text.assemble(left, right)
        line.truncate(max(width, 1), overflow="ellipsis")
        return line
    left = left.copy()
    left.truncate(room, overflow="ellipsis")
    return Text.assemble(left, right)


class RunHeader(Static):
    """Name, model, state, iteration of total with a bar, training time, ETA, connection.

    Each of its two lines is fitted to the width (fit_line) and never wraps, whatever it holds."""

    DEFAULT_CSS = """
    RunHeader { height: 2; background: $panel; padding: 0 1; text-wrap: nowrap; text-overflow: ellipsis; }
    """

    def __init__(self, state: RunState, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.run_state = state
        self.connection = "connecting"
        self.read_only = False
        self._shown: Text | None = None
        self._painted_width = 0

    def on_resize(self) -> None:
        if self.content_size.width != self._painted_width:  # refit both lines to the new width
            self.refresh_from_state()

    def _style(self, name: str) -> str:
        return themed(STATE_STYLES.get(name, "bold"), self.app.current_theme)

    def refresh_from_state(self) -> None:
        s = self.run_state
        now = time.time()
        width = self.content_size.width or max(self.app.size.width - 2, 1)
        top = Text()
        top.append("tunetop ", style="bold")
        top.append(s.name or s.run_id or "…", style="bold")
        top.append(f" · {s.run_id} · ", style="dim")
        model = s.model if len(s.model) < 48 else "…" + s.model[-47:]
        top.append(model, style="italic")
        if s.world_size > 1:
            top.append(f" × {s.world_size} ranks", style="italic")
        if s.tags:  # tags and the note go before the state: they give way first on a narrow screen
            top.append("  " + " ".join(f"#{tag}" for tag in s.tags), style="bold")
        if s.note:
            line = s.note.strip().split("\n", 1)[0]
            top.append(f"  “{line if len(line) <= 40 else line[:39] + '…'}”", style="italic dim")
        status = Text("  ")
        status.append(f" {s.state.upper()} ", style=self._style(s.state) + " reverse")
        if self.read_only:
            status.append("  read-only (journal)", style="dim")
        elif self.connection != "live":
            status.append(f"  ⚠ {self.connection}", style=self._style("failed"))
        # Training time, not wall time: a paused or dead run's clock stands still.
        times = Text(f" {s.progress * 100:5.1f}%", style="bold")
        times.append(f"   training time {format_duration(s.training_time(None if self.read_only else now))}")
        times.append(f"   ETA {format_duration(s.eta())}")
        bottom = Text(f"iter {s.iteration:,}/{s.iterations:,} ", style="bold")
        bar = width - bottom.cell_len - times.cell_len  # the bar takes what the numbers leave
        if bar >= 4:
            bottom.append(progress_bar(s.progress, min(bar, 80)), style=self._style("running"))
        text = Text("\n").join([fit_line(top, status, width), fit_line(bottom, times, width)])
        if text == self._shown:
            return
        self._shown = text
        self._painted_width = width
        # Two lines in a two-line box: nothing about the layout changes, so no layout pass (which
        # re-renders every widget on the screen).
        self.update(text, layout=False)


def _memory(peak: float | None, cap: float | None) -> str:
    """``0.073 GB``, or with a soft cap set ``15.46 GB (cap 15)``."""
    if peak is None:
        return "-"
    return f"{peak:.3f} GB" if cap is None else f"{peak:.2f} GB (cap {cap:g})"


class ThroughputPanel(Static):
    """Iterations/s, tokens/s, trained tokens, peak memory, learning rate, parameters."""

    DEFAULT_CSS = """
    ThroughputPanel { height: auto; padding: 0 1; border: round $primary 50%; border-title-color: $text; }
    """

    def __init__(self, state: RunState, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.run_state = state
        self.border_title = "throughput"
        self._shown: Text | None = None

    def refresh_from_state(self) -> None:
        s = self.run_state
        last_loss = s.train_losses[-1] if s.train_losses else None
        best = s.best_validation
        rows = [
            ("train loss", f"{last_loss:.4f}" if last_loss is not None else "-"),
            ("best val loss", f"{best.loss:.4f} @ {best.iteration}" if best else "-"),
            ("iterations/s", f"{s.iterations_per_second:.2f}" if s.iterations_per_second else "-"),
            ("tokens/s", format_count(s.tokens_per_second)),
            ("trained tokens", format_count(s.trained_tokens)),
            ("peak memory", _memory(s.peak_memory, s.memory_cap)),
            ("learning rate", f"{s.learning_rate:.2e}" if s.learning_rate is not None else "-"),
            ("trainable", f"{format_count(s.trainable_parameters)} / {format_count(s.total_parameters)}"),
        ]
        # Two columns, names dim and values bold and right-aligned, as plain text: a Rich table
        # measures and lays out its cells at every report, several times the cost.
        names, values = max(len(n) for n, _ in rows), max(len(v) for _, v in rows)
        text = Text(no_wrap=True, overflow="crop")
        for number, (name, value) in enumerate(rows):
            text.append(("\n" if number else "") + name.ljust(names + 2), style="dim")
            text.append(value.rjust(values), style="bold")
        if text == self._shown:
            return
        # Its height follows its rows, which do not change: a layout pass only the first time.
        self.update(text, layout=self._shown is None)
        self._shown = text


SPARK_BARS = "▁▂▃▄▅▆▇█"


def spark(values: list[float], width: int, top: float | None = None) -> str:
    """The last ``width`` values as bars: from 0 to ``top`` when given (a percentage, a total),
    else from their least to their most (a flat line when they do not move)."""
    shown = values[-width:] if width > 0 else []
    if not shown:
        return ""
    low, high = (0.0, top) if top else (min(shown), max(shown))
    span = high - low
    if span <= 0:
        return SPARK_BARS[3] * len(shown)
    last = len(SPARK_BARS) - 1
    return "".join(SPARK_BARS[max(0, min(last, round((v - low) / span * last)))] for v in shown)


def _bytes(value: float | None) -> str:
    """1.2G, 340M, 12K (powers of 1024, as top and Activity Monitor count)."""
    if value is None:
        return "-"
    for unit, size in (("T", 1024.0**4), ("G", 1024.0**3), ("M", 1024.0**2), ("K", 1024.0)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return f"{value:.0f}B"


class SystemPanel(Static):
    """The machine (``system`` events): a reading and a sparkline each, in as many columns as fit.

    Hidden until the first ``system`` event (older runs, or ``metrics.system_seconds = 0``).
    ``compact`` (a short terminal): one line of readings, no sparklines, no border."""

    DEFAULT_CSS = """
    SystemPanel { height: auto; padding: 0 1; border: round $primary 50%; border-title-color: $text; display: none; }
    SystemPanel.compact { border: none; padding: 0 1; text-wrap: nowrap; text-overflow: ellipsis; }
    """

    def __init__(self, state: RunState, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.run_state = state
        self.border_title = "machine"
        self._shown_key: tuple[int, int, bool] | None = None
        self._lines = 0

    def on_resize(self) -> None:
        # The columns and sparklines follow the width; after this layout pass, so that a change of
        # height is laid out by the next one.
        self.call_after_refresh(self.refresh_from_state)

    def rows(self) -> list[tuple[str, str, str, float | None]]:
        """(name, the reading now, its series in RunState.system_series, the sparkline's top) for
        each reading this engine sends."""
        now = self.run_state.system
        rows: list[tuple[str, str, str, float | None]] = []
        if "cpu_percent" in now:
            rows.append(("cpu", f"{now['cpu_percent']:.0f}%", "cpu_percent", max(100.0, *self.run_state.system_series.get("cpu_percent", [0.0]))))
        if "rss" in now:
            rows.append(("rss", _bytes(now["rss"]), "rss", None))
        if "memory_used" in now:
            total = now.get("memory_total")
            rows.append(("memory", f"{_bytes(now['memory_used'])}/{_bytes(total)}", "memory_used", total))
        if "mlx_active" in now:
            rows.append(("mlx +cache", f"{_bytes(now['mlx_active'])} +{_bytes(now.get('mlx_cache'))}", "mlx_active", None))
        if "gpu_utilization" in now:
            rows.append(("gpu", f"{now['gpu_utilization']:.0f}%", "gpu_utilization", 100.0))
        if "gpu_memory_used" in now:
            total = now.get("gpu_memory_total")
            rows.append(("gpu mem", f"{_bytes(now['gpu_memory_used'])}/{_bytes(total)}", "gpu_memory_used", total))
        if "gpu_power" in now:
            rows.append(("power", f"{now['gpu_power']:.0f} W", "gpu_power", None))
        return rows

    def refresh_from_state(self) -> None:
        s = self.run_state
        if not s.system_events:
            return
        compact = self.has_class("compact")
        key = (s.system_events, self.size.width, compact)
        if key == self._shown_key:
            return
        self._shown_key = key
        self.display = True
        rows = self.rows()
        text = Text(no_wrap=True, overflow="crop")
        if compact:
            for number, (name, value, _series, _top) in enumerate(rows):
                text.append(("  " if number else "") + name + " ", style="dim")
                text.append(value, style="bold")
            lines = 1
        else:
            inner = max(self.size.width - 4, 20)  # border and padding
            columns = 2 if inner >= 64 else 1
            cell = inner // columns
            names = max(len(name) for name, *_ in rows)
            values = max(len(value) for _, value, *_ in rows)
            bars = max(cell - names - values - 4, 0)
            for number, (name, value, series, top) in enumerate(rows):
                if number:
                    text.append("\n" if number % columns == 0 else "  ")
                text.append(name.ljust(names + 1), style="dim")
                text.append(value.rjust(values), style="bold")
                line = spark(s.system_series.get(series, []), bars, top)
                text.append(" " + line.ljust(bars), style=themed("$accent", self.app.current_theme))
            lines = -(-len(rows) // columns)
        # A layout pass only when the panel's height changes (the first event, a resize).
        self.update(text, layout=lines != self._lines)
        self._lines = lines
