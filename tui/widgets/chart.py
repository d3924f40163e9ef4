"""A line chart drawn with braille characters: training and validation loss on one set of axes.

``plot`` is pure (series in, styled text lines out) so it is tested without a terminal; the
``LossChart`` widget feeds it from :class:`tunetop.tui.state.RunState` at the size it has
(``loss_series`` makes one run's series; tunetop.tui.widgets.compare_chart overlays several).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass

from rich.text import Text
from textual.geometry import Size
from textual.reactive import reactive
from textual.widget import Widget

from tunetop.tui.state import RunState, downsample, ema
from tunetop.tui.themes import themed

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
    markers: bool = False  # mark each point (sparse series such as validation)
    line: bool = True  # join the points; a markers-only series is drawn as dots


@dataclass(frozen=True)
class YRange:
    """The values the y-axis spans; ``clipped`` is the largest value above it, if any."""

    low: float
    high: float
    clipped: float | None = None


Y_MODES = ("recent", "full")
"""``recent`` (the default): the axis follows the later half of what is shown, and an early
spike above it is clipped and marked; ``full``: every value fits."""


def _finite(values: list[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000 or abs(value) < 0.01:
        return f"{value:.1e}"
    return f"{value:.3g}"


def fit_range(series: list[Series], mode: str = "recent") -> YRange | None:
    """The y-range to draw, or None without a finite point.

    A loss curve falls fast at first and slowly after: scaled to its first value (10.7 against a
    later 1.0-1.5), the part a person watches is a flat line at the bottom. So by default, when
    every value would squeeze the later half of the x-range into less than a third of the
    height, the axis runs from the lowest value to twice what that later half needs: it fills
    the lower half of the chart, the earlier descent the upper half, and only the values above
    (the first steps) are clipped. A curve that falls evenly (or rises) is never clipped: its
    earlier half needs about as much room as its later half.
    """
    points = [(x, y) for s in series for x, y in zip(s.xs, s.ys, strict=False) if math.isfinite(y)]
    if not points:
        return None
    low = min(y for _, y in points)
    high = max(y for _, y in points)
    if mode != "recent":
        return YRange(low, high)
    x0, x1 = min(x for x, _ in points), max(x for x, _ in points)
    middle = x0 + (x1 - x0) / 2
    recent = max(y for x, y in points if x >= middle) - low
    if high - low <= 3 * recent or recent <= 0:
        return YRange(low, high)
    return YRange(low, low + 2 * recent, clipped=high)


def _clip_segment(
    a: tuple[float, float], b: tuple[float, float], low: float, high: float
) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """The part of segment a-b with low <= y <= high (None if there is none)."""
    (xa, ya), (xb, yb) = a, b
    t0, t1 = 0.0, 1.0
    dy = yb - ya
    for bound, inside_above in ((low, True), (high, False)):
        if dy == 0:
            if (ya < bound) if inside_above else (ya > bound):
                return None
            continue
        t = (bound - ya) / dy
        entering = (dy > 0) == inside_above  # crossing into the band as t grows
        if entering:
            t0 = max(t0, t)
        else:
            t1 = min(t1, t)
    if t0 > t1:
        return None
    return (xa + t0 * (xb - xa), ya + t0 * dy), (xa + t1 * (xb - xa), ya + t1 * dy)


def plot(
    series: list[Series],
    width: int,
    height: int,
    y_range: YRange | None = None,
    x_format: Callable[[float], str] | None = None,
) -> list[Text]:
    """Render the series into ``height`` lines of ``width`` cells (axis labels included).

    ``y_range`` defaults to :func:`fit_range`'s. Values above it are clipped: the columns where
    a series runs above the top show ``↑`` in the top row, and the x-axis line says up to what.
    ``x_format`` writes the x-axis's two labels (default: whole numbers, for iterations).
    """
    width = max(width, AXIS_WIDTH + 4)
    height = max(height, 3)
    plot_w = width - AXIS_WIDTH
    plot_h = height - 1  # last line: x-axis labels
    all_x = [x for s in series for x, y in zip(s.xs, s.ys, strict=False) if math.isfinite(y)]
    fitted = y_range or fit_range(series)
    if not all_x or fitted is None:
        blank = [Text(" " * width) for _ in range(height)]
        blank[height // 2] = Text("waiting for the first report...".center(width), style="dim")
        return blank
    x0, x1 = min(all_x), max(all_x)
    y0, y1 = fitted.low, fitted.high
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = (y1 - y0) * 0.05
    y0, y1 = y0 - pad, y1 + (0 if fitted.clipped is not None else pad)
    px_w, px_h = plot_w * 2, plot_h * 4
    cells = [[0] * plot_w for _ in range(plot_h)]
    styles: list[list[str | None]] = [[None] * plot_w for _ in range(plot_h)]
    above: dict[int, str] = {}  # column -> style of a series that runs above the top there

    def to_px(x: float, y: float) -> tuple[int, int]:
        px = round((x - x0) / (x1 - x0) * (px_w - 1))
        py = round((y1 - y) / (y1 - y0) * (px_h - 1))
        return px, py

    def dot(px: int, py: int, style: str) -> None:
        if 0 <= px < px_w and 0 <= py < px_h:
            row, col = py // 4, px // 2
            cells[row][col] |= DOTS[px % 2][py % 4]
            styles[row][col] = style

    def mark_above(xa: float, xb: float, style: str) -> None:
        for col in range(to_px(xa, y1)[0] // 2, to_px(xb, y1)[0] // 2 + 1):
            above.setdefault(col, style)

    for s in series:
        previous: tuple[float, float] | None = None
        for x, y in zip(s.xs, s.ys, strict=False):
            if not math.isfinite(y):
                previous = None
                continue
            if not s.line or previous is None:
                if y > y1:
                    mark_above(x, x, s.style)
                else:
                    dot(*to_px(x, y), s.style)
            else:
                (xa, ya) = previous
                inside = _clip_segment(previous, (x, y), y0, y1)
                if inside is not None:
                    _line(to_px(*inside[0]), to_px(*inside[1]), lambda px, py, st=s.style: dot(px, py, st))
                if ya > y1 or y > y1:  # the stretch above the top: from where it leaves to where it returns
                    cross = xa + (y1 - ya) / (y - ya) * (x - xa) if (ya > y1) != (y > y1) else None
                    start = xa if ya > y1 or cross is None else cross
                    end = x if y > y1 or cross is None else cross
                    mark_above(start, end, s.style)
            if s.markers and y <= y1:
                px, py = to_px(x, y)
                for dx, dy in ((0, 0), (1, 0), (0, 1), (-1, 0), (0, -1)):
                    dot(px + dx, py + dy, s.style)
            previous = (x, y)

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
        # One span per run of cells in one style (most of a row is blank): a chart redrawn at
        # every report must not cost an append per cell.
        run: list[str] = []
        run_style = ""
        for col in range(plot_w):
            bits = cells[row][col]
            if row == 0 and not bits and col in above:
                char, style = "↑", f"{above[col]} dim"
            else:
                char, style = (chr(BRAILLE_BASE + bits) if bits else " "), (styles[row][col] or "")
            if style != run_style and run:
                line.append("".join(run), style=run_style)
                run = []
            run_style = style
            run.append(char)
        if run:
            line.append("".join(run), style=run_style)
        lines.append(line)
    left, right = (x_format(x0), x_format(x1)) if x_format is not None else (f"{x0:.0f}", f"{x1:.0f}")
    axis = " " * AXIS_WIDTH + left + right.rjust(max(plot_w - len(left), len(right)))
    if fitted.clipped is not None:  # say what the ↑ marks hide, between the x labels
        note = f" ↑ up to {_fmt(fitted.clipped)}, above the top ('y' shows all) "
        room = plot_w - len(left) - len(right) - 2
        if room >= len(note):
            at = AXIS_WIDTH + len(left) + 1 + (room - len(note)) // 2
            axis = axis[:at] + note + axis[at + len(note):]
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

    y_mode: reactive[str] = reactive("recent")
    """How the y-axis is fitted (:data:`Y_MODES`): ``recent`` clips an early spike, ``full`` shows all."""

    def __init__(self, state: RunState, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.run_state = state
        self._shown: list[Text] | None = None  # the lines the last render drew
        self._ready: tuple[Size, list[Text]] | None = None  # lines update_from_state made for the next render

    def update_from_state(self) -> bool:
        """Redraw if the run state now plots differently from what is on screen; True if it does.

        A report usually moves no dot of a long run's curve; then the screen has nothing to redo.
        """
        lines = self._lines()
        if lines == self._shown:
            return False
        self._ready = (self.size, lines)
        self.refresh()
        return True

    def series(self, buckets: int) -> list[Series]:
        state = self.run_state
        start = state.train_iterations[-1] - self.window if self.window > 0 and state.train_iterations else None
        validation, train = loss_series(state, self.smoothing, buckets, start)
        # validation drawn first: the train line on top where they overlap
        return [s for s in (validation, train) if s is not None]

    def render(self) -> Text:
        ready, self._ready = self._ready, None
        lines = ready[1] if ready is not None and ready[0] == self.size else self._lines()
        self._shown = lines
        return Text("\n").join(lines)

    def _lines(self) -> list[Text]:
        width, height = self.size.width, self.size.height
        series = self.series(max((width - AXIS_WIDTH) * 2, 1))
        for s in series:
            s.style = themed(s.style, self.app.current_theme)
        return plot(series, width, height, fit_range(series, self.y_mode), self.x_format())

    def x_format(self) -> Callable[[float], str] | None:
        """How the x-axis labels read (None: iterations, whole numbers)."""
        return None


def loss_series(
    state: RunState,
    smoothing: float,
    buckets: int,
    start: int | None = None,
    x_by: str = "iteration",
    train_style: str = "bold $accent",
    validation_style: str = "bold $warning",
    label: str = "",
) -> tuple[Series | None, Series]:
    """One run's (validation dots or None, smoothed train line) from iteration ``start`` on (None:
    the whole run), against iterations or trained tokens (``x_by``: ``iteration`` or ``tokens``)."""
    xs, ys = state.train_iterations, state.train_losses
    val_x = [v.iteration for v in state.validations]
    val_y = [v.loss for v in state.validations]
    if start is not None and xs:
        keep = bisect.bisect_left(xs, start)
        xs, ys = xs[keep:], ys[keep:]
        kept = [(x, y) for x, y in zip(val_x, val_y, strict=True) if x >= start]
        val_x, val_y = [x for x, _ in kept], [y for _, y in kept]
    smooth = ema(ys, smoothing)
    if x_by == "tokens":
        train_x: list[float] = [float(t) for t in state.train_tokens[len(state.train_tokens) - len(xs):]]
        val_at = tokens_at(state, val_x)
    else:
        train_x, val_at = [float(x) for x in xs], [float(x) for x in val_x]
    dx, dy = downsample(train_x, smooth, buckets)
    # dots, as the legend says: a validation is a measurement at one iteration
    validation = Series(val_at, val_y, validation_style, f"{label} validation".strip(), markers=True, line=False) if val_x else None
    return validation, Series(dx, dy, train_style, f"{label} train".strip())


def tokens_at(state: RunState, iterations: list[int]) -> list[float]:
    """The trained tokens at each of ``iterations`` (a validation's), read off the train reports:
    interpolated between two reports, from 0 at iteration 0, and at the run's average tokens per
    iteration past the last report."""
    xs, ts = state.train_iterations, state.train_tokens
    out = []
    for iteration in iterations:
        at = bisect.bisect_left(xs, iteration)
        if at < len(xs) and xs[at] == iteration:
            out.append(float(ts[at]))
            continue
        x0, t0 = (xs[at - 1], ts[at - 1]) if at > 0 else (0, 0)
        if at < len(xs):
            x1, t1 = xs[at], ts[at]
            out.append(t0 + (t1 - t0) * (iteration - x0) / (x1 - x0) if x1 != x0 else float(t0))
        else:
            per_iteration = ts[-1] / xs[-1] if xs and xs[-1] > 0 else 0.0
            out.append(t0 + per_iteration * (iteration - x0))
    return out
