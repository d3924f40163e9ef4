"""A line chart drawn with braille characters: training and validation loss on one set of axes.

``plot`` is pure (series in, styled text lines out) so it is tested without a terminal; the
``LossChart`` widget feeds it from :class:`tui.state.RunState` at the size it has.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from tui.state import RunState, downsample, ema

BRAILLE_BASE = 0x2800
# Dot bit for (x in 0..1, y in 0..3) inside one braille cell.
DOTS = ((0x01, 0x02, 0x04, 0x40), (0x08, 0x10, 0x20, 0x80))
AXIS_WIDTH = 8


@dataclass
class Series:
    xs: list[float]
    ys: list[float]
    style: str
    label: str
    markers: bool = False  # also mark each point (sparse series such as validation)


def _finite(values: list[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000 or abs(value) < 0.01:
        return f"{value:.1e}"
    return f"{value:.3g}"


def plot(series: list[Series], width: int, height: int) -> list[Text]:
    """Render the series into ``height`` lines of ``width`` cells (axis labels included)."""
    width = max(width, AXIS_WIDTH + 4)
    height = max(height, 3)
    plot_w = width - AXIS_WIDTH
    plot_h = height - 1  # last line: x-axis labels
    all_x = [x for s in series for x, y in zip(s.xs, s.ys, strict=False) if math.isfinite(y)]
    all_y = _finite([y for s in series for y in s.ys])
    if not all_x or not all_y:
        blank = [Text(" " * width) for _ in range(height)]
        blank[height // 2] = Text("waiting for the first report...".center(width), style="dim")
        return blank
    x0, x1 = min(all_x), max(all_x)
    y0, y1 = min(all_y), max(all_y)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = (y1 - y0) * 0.05
    y0, y1 = y0 - pad, y1 + pad
    px_w, px_h = plot_w * 2, plot_h * 4
    cells = [[0] * plot_w for _ in range(plot_h)]
    styles: list[list[str | None]] = [[None] * plot_w for _ in range(plot_h)]

    def to_px(x: float, y: float) -> tuple[int, int]:
        px = round((x - x0) / (x1 - x0) * (px_w - 1))
        py = round((y1 - y) / (y1 - y0) * (px_h - 1))
        return px, py

    def dot(px: int, py: int, style: str) -> None:
        if 0 <= px < px_w and 0 <= py < px_h:
            row, col = py // 4, px // 2
            cells[row][col] |= DOTS[px % 2][py % 4]
            styles[row][col] = style

    for s in series:
        previous: tuple[int, int] | None = None
        for x, y in zip(s.xs, s.ys, strict=False):
            if not math.isfinite(y):
                previous = None
                continue
            point = to_px(x, y)
            if previous is None:
                dot(*point, s.style)
            else:
                _line(previous, point, lambda px, py, st=s.style: dot(px, py, st))
            if s.markers:
                for dx, dy in ((1, 0), (0, 1), (-1, 0), (0, -1)):
                    dot(point[0] + dx, point[1] + dy, s.style)
            previous = point

    lines: list[Text] = []
    for row in range(plot_h):
        label = ""
        if row == 0:
            label = _fmt(y1)
        elif row == plot_h - 1:
            label = _fmt(y0)
        elif row == plot_h // 2:
            label = _fmt((y0 + y1) / 2)
        line = Text(label.rjust(AXIS_WIDTH - 2) + " ┤", style="dim")
        for col in range(plot_w):
            bits = cells[row][col]
            line.append(chr(BRAILLE_BASE + bits) if bits else " ", style=styles[row][col] or "")
        lines.append(line)
    left, right = f"{x0:.0f}", f"{x1:.0f}"
    axis = " " * AXIS_WIDTH + left + right.rjust(max(plot_w - len(left), len(right)))
    lines.append(Text(axis[:width], style="dim"))
    return lines


def _line(a: tuple[int, int], b: tuple[int, int], put: object) -> None:
    """Bresenham from a to b, calling put(x, y) for each pixel."""
    (x0, y0), (x1, y1) = a, b
    dx, dy = abs(x1 - x0), -abs(y1 - y0)
    sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
    err = dx + dy
    while True:
        put(x0, y0)  # type: ignore[operator]
        if x0 == x1 and y0 == y1:
            return
        e2 = 2 * err
        if e2 >= dy:
            err += dy
            x0 += sx
        if e2 <= dx:
            err += dx
            y0 += sy


class LossChart(Widget):
    """Training (smoothed) and validation loss against iteration."""

    DEFAULT_CSS = """
    LossChart { height: 1fr; min-height: 8; }
    """

    smoothing: reactive[float] = reactive(0.6)
    """EMA weight for the training curve, as TensorBoard's slider: 0 = raw, 0.99 = very smooth."""

    window: reactive[int] = reactive(0)
    """Show only the last N iterations; 0 = the whole run."""

    def __init__(self, state: RunState, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.run_state = state

    def series(self, buckets: int) -> list[Series]:
        state = self.run_state
        xs, ys = state.train_iterations, state.train_losses
        val_x = [v.iteration for v in state.validations]
        val_y = [v.loss for v in state.validations]
        if self.window > 0 and xs:
            start = xs[-1] - self.window
            keep = next((i for i, x in enumerate(xs) if x >= start), len(xs))
            xs, ys = xs[keep:], ys[keep:]
            kept = [(x, y) for x, y in zip(val_x, val_y, strict=True) if x >= start]
            val_x, val_y = [x for x, _ in kept], [y for _, y in kept]
        smooth = ema(ys, self.smoothing)
        dx, dy = downsample(xs, smooth, buckets)
        out = []
        if val_x:
            out.append(Series([float(x) for x in val_x], val_y, "bold $warning", "validation", markers=True))
        out.append(Series(dx, dy, "bold $accent", "train"))  # drawn last: on top where they overlap
        return out

    def render(self) -> Text:
        width, height = self.size.width, self.size.height
        theme = self.app.current_theme
        colors = {"$accent": theme.accent or theme.primary, "$warning": theme.warning or "yellow"}
        series = self.series(max((width - AXIS_WIDTH) * 2, 1))
        for s in series:
            for key, value in colors.items():
                s.style = s.style.replace(key, str(value))
        lines = plot(series, width, height)
        return Text("\n").join(lines)
