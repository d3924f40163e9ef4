"""What the dashboard costs while it follows a fast run (issue 22): reports are folded at once, the
screen is redrawn at a few fixed paces, a report triggers no layout pass, and the loss chart is
drawn again only when it would look different. bench/tui.py follow has the CPU figures."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tests.recorded import RUN_ID, T0, recorded_events, write_recorded_run
from tests.test_tui import SIZE, settle
from tunetop.control.protocol import make_event
from tunetop.tui.app import TunetopApp
from tunetop.tui.screens.dashboard import CHART_HZ, REFRESH_HZ, DashboardScreen
from tunetop.tui.state import format_count
from tunetop.tui.widgets.chart import LossChart


def shown(app: TunetopApp) -> str:
    """The screen's text as the terminal has it."""
    return "\n".join("".join(segment.text for segment in strip) for strip in app.screen._compositor.render_strips())


def train(seq: int, iteration: int) -> dict[str, Any]:
    return make_event(RUN_ID, seq, "train", ts=T0 + 200 + iteration * 0.1, iteration=iteration, loss=1.5 + (iteration % 7) / 10,
                      learning_rate=5e-4, iterations_per_second=10.0, tokens_per_second=3000.0 + iteration,
                      trained_tokens=iteration * 150, peak_memory=0.05)


async def test_a_stream_of_reports_is_shown_without_layout_passes_or_a_chart_per_report(isolated_state: Path) -> None:
    events = recorded_events(iterations=2000)[:-2]  # a run still going: no 'finished'
    run = write_recorded_run(isolated_state, events)
    app = TunetopApp(run)
    async with app.run_test(size=SIZE) as pilot:
        screen = app.screen
        assert isinstance(screen, DashboardScreen)
        await settle(pilot, lambda: screen.run_state.iteration == 2000)
        await pilot.pause(1.5)  # the first paint, its layout, the tables
        chart = screen.query_one(LossChart)
        counts = {"layout": 0, "chart": 0}
        layout, render = screen._refresh_layout, chart.render

        def counting_layout(*args: Any, **kwargs: Any) -> Any:
            counts["layout"] += 1
            return layout(*args, **kwargs)

        def counting_render() -> Any:
            counts["chart"] += 1
            return render()

        screen._refresh_layout = counting_layout  # type: ignore[method-assign]
        chart.render = counting_render  # type: ignore[method-assign]
        seq, reports = events[-1]["seq"], 60
        start = time.monotonic()
        for number in range(1, reports + 1):  # 50 reports a second, as fast as a small model trains
            screen._on_events([train(seq + number, 2000 + number)])
            await pilot.pause(0.02)
        # The header has the last report's iteration, the throughput panel its trained tokens.
        await settle(pilot, lambda: "iter 2,060/" in shown(app) and format_count(2060 * 150) in shown(app))
        elapsed = time.monotonic() - start
        assert screen.run_state.iteration == 2060  # every report folded in
        # A report changes numbers, not sizes: no layout pass (one re-renders every widget on screen).
        assert counts["layout"] == 0, counts
        # The chart at its own pace, at most: far fewer draws than reports, however slow this machine.
        assert 1 <= counts["chart"] <= elapsed * CHART_HZ + 2, (counts, elapsed)
        assert counts["chart"] < reports / 4 and REFRESH_HZ > CHART_HZ
        # Nothing new: nothing to draw.
        await pilot.pause(1.2)
        assert not chart.update_from_state()
