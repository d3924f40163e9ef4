"""Small read-only panels of the dashboard: the run header and the throughput panel."""

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


class RunHeader(Static):
    """Name, model, state, iteration of total with a bar, training time, ETA, connection."""

    DEFAULT_CSS = """
    RunHeader { height: 2; background: $panel; padding: 0 1; }
    """

    def __init__(self, state: RunState, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.run_state = state
        self.connection = "connecting"
        self.read_only = False
        self._shown: Text | None = None

    def _style(self, name: str) -> str:
        return themed(STATE_STYLES.get(name, "bold"), self.app.current_theme)

    def refresh_from_state(self) -> None:
        s = self.run_state
        now = time.time()
        top = Text()
        top.append("tunetop ", style="bold")
        top.append(s.name or s.run_id or "…", style="bold")
        top.append(f" · {s.run_id} · ", style="dim")
        model = s.model if len(s.model) < 48 else "…" + s.model[-47:]
        top.append(model, style="italic")
        if s.world_size > 1:
            top.append(f" × {s.world_size} ranks", style="italic")
        top.append("  ")
        top.append(f" {s.state.upper()} ", style=self._style(s.state) + " reverse")
        if s.tags:
            top.append("  " + " ".join(f"#{tag}" for tag in s.tags), style="bold")
        if s.note:
            line = s.note.strip().split("\n", 1)[0]
            top.append(f"  “{line if len(line) <= 40 else line[:39] + '…'}”", style="italic dim")
        if self.read_only:
            top.append("  read-only (journal)", style="dim")
        elif self.connection != "live":
            top.append(f"  ⚠ {self.connection}", style=self._style("failed"))
        bottom = Text()
        width = max(self.size.width - 60, 10)
        bottom.append(f"iter {s.iteration:,}/{s.iterations:,} ", style="bold")
        bottom.append(progress_bar(s.progress, width), style=self._style("running"))
        bottom.append(f" {s.progress * 100:5.1f}%", style="bold")
        # Training time, not wall time: a paused or dead run's clock stands still.
        bottom.append(f"   training time {format_duration(s.training_time(None if self.read_only else now))}")
        bottom.append(f"   ETA {format_duration(s.eta())}")
        text = Text("\n").join([top, bottom])
        if text == self._shown:
            return
        self._shown = text
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
