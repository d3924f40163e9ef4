"""Several runs' loss curves on one chart, a colour each: the comparison screen's chart.

The same braille plot, smoothing, window and y-range keys as the dashboard's ``LossChart``
(this is one), fed from several :class:`tunetop.tui.state.RunState` at once through
:func:`tunetop.tui.widgets.chart.loss_series`; x by iteration or by trained tokens.
"""

from __future__ import annotations

from collections.abc import Callable

from textual.reactive import reactive

from tunetop.tui.state import RunState, format_count
from tunetop.tui.widgets.chart import LossChart, Series, loss_series

X_AXES = ("iteration", "tokens")
"""What the x-axis counts: iterations, or trained tokens (runs of different batch sizes or row
widths compare fairly by the data they have seen)."""

RUN_COLOURS = ("accent", "warning", "success", "error", "secondary", "primary")
"""The theme's colours a comparison gives its runs, in this order (then again, from the first)."""


def run_colour(index: int) -> str:
    """The theme colour name (``$accent``...) of the comparison's ``index``-th run."""
    return "$" + RUN_COLOURS[index % len(RUN_COLOURS)]


class CompareChart(LossChart):
    """Several runs' smoothed train loss and validation dots on one set of axes, a colour each.

    The window (last N iterations) ends at the furthest run's last iteration, so runs stay
    aligned; with x by tokens each point sits at the tokens its run had trained then.
    """

    x_by: reactive[str] = reactive("iteration")
    """The x-axis (:data:`X_AXES`): iterations or trained tokens."""

    def __init__(self, states: list[RunState], **kwargs: object) -> None:
        super().__init__(states[0] if states else RunState(), **kwargs)
        self.run_states = states

    def series(self, buckets: int) -> list[Series]:
        ends = [s.train_iterations[-1] for s in self.run_states if s.train_iterations]
        start = max(ends) - self.window if self.window > 0 and ends else None
        dots: list[Series] = []
        lines: list[Series] = []
        for index, state in enumerate(self.run_states):
            colour = run_colour(index)
            validation, train = loss_series(state, self.smoothing, buckets, start, self.x_by,
                                            f"bold {colour}", f"bold {colour}", state.name or state.run_id)
            if validation is not None:
                dots.append(validation)
            lines.append(train)
        return dots + lines  # every run's dots under every run's line

    def x_format(self) -> Callable[[float], str] | None:
        return (lambda x: format_count(x) + " tok") if self.x_by == "tokens" else None
