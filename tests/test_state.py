"""RunState folds events into what the screen shows, without a terminal.

The numbers here are Python floats (doubles) through a few operations: pytest.approx's default
(rel=1e-6) covers their rounding (1.1e-16 each; 2.4e-7 absolute for a timestamp near 1.8e9,
1e-8 of the 21 s elapsed) with room to spare.
"""

from __future__ import annotations

import math

import pytest

from tests.recorded import T0, recorded_events
from tunetop.tui.state import RunState, downsample, ema, format_count, format_duration
from tunetop.tui.widgets.chart import AXIS_WIDTH, Series, YRange, fit_range, plot


def folded() -> RunState:
    state = RunState()
    state.apply_all(recorded_events())
    return state


def test_fold_of_a_whole_run() -> None:
    s = folded()
    assert (s.name, s.model, s.iterations, s.iteration) == ("recorded", "/models/embedded-llama", 400, 400)
    assert s.state == "finished" and s.finished_reason == "completed"
    assert len(s.train_losses) == 40 and s.train_iterations[:2] == [10, 20]
    assert [v.iteration for v in s.validations] == [0, 50, 100, 150, 200, 250, 300, 350, 400]
    assert s.validations[0].change is None
    assert s.validations[1].change == pytest.approx(s.validations[1].loss - 10.5)
    assert [c.iteration for c in s.checkpoints] == [100, 200, 300, 400]
    assert s.checkpoints[0].validation_loss == pytest.approx(s.validations[2].loss)
    assert s.best_validation is s.validations[-1]
    assert s.trained_tokens == 400 * 150 and s.peak_memory == 0.052
    assert s.last_seq == len(recorded_events())
    assert any(line.level == "warning" for line in s.logs)
    assert s.progress == 1.0


def test_training_time_stops_when_finished_and_eta_only_while_running() -> None:
    s = folded()
    # running from 0.6 s (state running) to 1.0 + 400 * 0.05 + 0.1 s (state finished)
    assert s.training_time(now=T0 + 10_000) == pytest.approx(1.0 + 400 * 0.05 + 0.1 - 0.6)
    assert s.eta() is None
    running = RunState()
    running.apply_all(recorded_events()[:30])
    assert running.state == "running"
    # reports every 10 iterations, 0.5 s apart: 20 iterations per second of wall clock
    assert running.rate == pytest.approx(20.0) and running.eta() == pytest.approx((400 - running.iteration) / 20.0)


def test_training_time_leaves_out_pauses_and_a_dead_engine() -> None:
    def event(ts: float, type_: str, **fields: object) -> dict:
        return {"seq": int(ts * 10), "ts": T0 + ts, "run": "r", "type": type_, **fields}

    s = RunState()
    s.apply_all([event(0, "state", state="starting"), event(5, "state", state="running", iteration=0)])
    assert s.training_time(now=T0 + 15) == pytest.approx(10)
    s.apply_all([event(15, "state", state="paused", iteration=224), event(100, "state", state="running", iteration=224)])
    assert s.iteration == 224  # a pause lands between reports: the state event says where
    assert s.training_time(now=T0 + 110) == pytest.approx(20)  # the 85 s paused do not count
    s.apply(event(120, "train", iteration=230, loss=1.0))
    assert s.training_time(now=None) == pytest.approx(30)  # read from the journal: up to the last event
    # the engine died; a resume starts a new one an hour later: the gap is no training either
    s.apply_all([event(3720, "state", state="starting"), event(3730, "state", state="running", iteration=220)])
    assert s.training_time(now=T0 + 3740) == pytest.approx(40)
    s.apply({"seq": 0, "ts": T0 + 3741, "run": "r", "type": "heartbeat", "iteration": 226, "state": "running"})
    assert s.iteration == 226


def test_the_eta_follows_the_smoothed_speed_not_one_report() -> None:
    def train(ts: float, iteration: int) -> dict:
        return {"seq": iteration, "ts": T0 + ts, "run": "r", "type": "train", "iteration": iteration, "loss": 1.0,
                "iterations_per_second": 100.0}

    s = RunState(iterations=10_000)
    s.apply({"seq": 0, "ts": T0, "run": "r", "type": "state", "state": "running"})
    ts = 0.0
    for iteration in range(10, 3010, 10):  # 10 it/s, with every fifth report taking 4x as long
        ts += 4.0 if iteration % 50 == 0 else 1.0
        s.apply(train(ts, iteration))
    etas = []
    for iteration in range(3010, 3510, 10):
        ts += 4.0 if iteration % 50 == 0 else 1.0
        s.apply(train(ts, iteration))
        etas.append(s.eta())
    mean_speed = 50 / 8.0  # iterations per second over each group of five reports
    assert all(eta is not None and abs(eta / ((10_000 - 3500) / mean_speed) - 1) < 0.1 for eta in etas)
    assert max(etas) / min(etas) < 1.15  # per report the speed swung 4x


def test_resume_rewinds_the_series_to_the_checkpoint() -> None:
    s = folded()
    s.apply({"seq": 999, "ts": T0 + 100, "run": "r", "type": "resumed", "iteration": 200, "checkpoint": "c", "from_seq": 1})
    assert s.train_iterations[-1] == 200 and len(s.train_losses) == len(s.train_iterations) == 20
    assert [v.iteration for v in s.validations][-1] == 200
    assert s.iteration == 200 and s.finished_reason == ""
    assert "resumed at iteration 200" in s.logs[-1].message


def test_heartbeats_do_not_count_as_events() -> None:
    s = RunState()
    s.apply({"seq": 5, "ts": 1.0, "run": "r", "type": "heartbeat", "iteration": 3, "state": "paused"})
    assert s.last_seq == 0 and s.events_applied == 0 and s.iteration == 3  # the engine's iteration, between reports


def test_unknown_event_types_are_ignored() -> None:
    s = RunState()
    s.apply({"seq": 1, "ts": 1.0, "run": "r", "type": "from_the_future", "x": 1})
    assert s.last_seq == 1 and s.state == "unknown"


def test_failed_runs_read_as_failed() -> None:
    s = RunState()
    s.apply({"seq": 1, "ts": 1.0, "run": "r", "type": "state", "state": "running"})
    s.apply({"seq": 2, "ts": 2.0, "run": "r", "type": "finished", "reason": "failed", "iteration": 3})
    assert s.state == "failed"


def test_a_distributed_run_shows_its_ranks_and_a_lost_rank() -> None:
    s = RunState()
    s.apply({"seq": 1, "ts": 1.0, "run": "r", "type": "world", "size": 3, "backend": "ring"})
    assert s.world_size == 3 and "3 ranks joined" in s.logs[-1].message
    s.apply({"seq": 2, "ts": 2.0, "run": "r", "type": "error", "message": "rank 2 stopped responding at iteration 7"})
    s.apply({"seq": 3, "ts": 3.0, "run": "r", "type": "finished", "reason": "rank_failed", "iteration": 7})
    assert s.state == "failed"
    assert [line.level for line in s.logs][-2:] == ["error", "log"]


def test_ema_matches_tensorboard_debiasing() -> None:
    assert ema([1.0, 1.0, 1.0], 0.9) == pytest.approx([1.0, 1.0, 1.0])
    values = ema([0.0, 10.0], 0.5)
    assert values[0] == 0.0 and values[1] == pytest.approx((0.5 * 0 * 0.5 + 0.5 * 10) / (1 - 0.25))
    assert ema([3.0, 4.0], 0.0) == [3.0, 4.0]
    assert math.isnan(ema([1.0, math.nan, 2.0], 0.5)[1])


def test_downsample_keeps_the_shape() -> None:
    xs = list(range(1_000_000))
    ys = [float(x % 100) for x in xs]
    dx, dy = downsample(xs, ys, 200)
    # Sums of integers below 2**53 and a division with an exact result: exact in doubles.
    assert len(dx) == 200 and dx[0] == 2499.5
    assert all(y == 49.5 for y in dy)


def test_formatting() -> None:
    assert format_duration(None) == "-" and format_duration(59) == "59s"
    assert format_duration(3725) == "1h02m" and format_duration(90000) == "1d01h"
    assert format_count(12_345) == "12.3k" and format_count(None) == "-"


def test_plot_draws_both_series_inside_the_box() -> None:
    lines = plot([Series([0, 1, 2, 3], [4.0, 3.0, 2.0, 1.0], "red", "train"), Series([0, 3], [4.0, 1.0], "blue", "val")], 40, 10)
    assert len(lines) == 10 and all(len(line.plain) <= 40 for line in lines)
    body = "".join(line.plain for line in lines[:-1])
    assert any(0x2800 < ord(ch) <= 0x28FF for ch in body)
    assert lines[0].plain.strip().startswith("4.") and lines[-1].plain.strip().startswith("0")


def test_plot_without_data_says_it_waits() -> None:
    lines = plot([Series([], [], "red", "train")], 40, 6)
    assert "waiting for the first report" in "".join(line.plain for line in lines)


def test_live_changes_update_the_config_the_set_form_shows() -> None:
    s = folded()
    s.apply({"seq": 999, "ts": T0 + 100, "run": "r", "type": "config_changed",
             "changes": {"steps_per_report": 3, "memory_limit_gb": 12.0, "learning_rate": 2e-4}})
    assert s.config["training"]["steps_per_report"] == 3 and s.config["training"]["memory_limit_gb"] == 12.0
    assert s.config["optimizer"]["learning_rate"] == 2e-4 and s.learning_rate == 2e-4
    assert "steps_per_report = 3" in s.logs[-1].message
    assert s.memory_cap == 12.0  # the throughput panel shows the peak against it
    s.apply({"seq": 1000, "ts": T0 + 101, "run": "r", "type": "config_changed", "changes": {"memory_limit_gb": 0.0}})
    assert s.memory_cap is None


def test_checkpoint_rows_follow_retention_and_take_only_their_own_validation() -> None:
    s = folded()  # saves at 100..400, each with a validation at the same iteration
    assert [c.iteration for c in s.checkpoints] == [100, 200, 300, 400]

    def event(seq: int, type_: str, **fields: object) -> dict:
        return {"seq": seq, "ts": T0 + seq, "run": "r", "type": type_, **fields}

    s.apply(event(1001, "save", iteration=431, path="a", kind="adapter", removed=[100, 200]))
    assert [c.iteration for c in s.checkpoints] == [300, 400, 431]
    assert s.checkpoints[-1].validation_loss is None  # the last validation was at 400, not of these weights
    assert "removed the checkpoints of iterations 100, 200" in s.logs[-1].message
    s.apply(event(1002, "validation", iteration=431, loss=1.25, seconds=0.1))
    assert s.checkpoints[-1].validation_loss == 1.25  # evaluated after saving: the same weights
    s.apply(event(1003, "save", iteration=431, path="a", kind="adapter", removed=[]))
    assert [c.iteration for c in s.checkpoints] == [300, 400, 431]  # a second save at 431 replaces the first


def _recorded_series() -> list[Series]:
    """The chart's series for the recorded run: its first loss (10.5) is 7x the later ones."""
    s = folded()
    return [
        Series([float(v.iteration) for v in s.validations], [v.loss for v in s.validations], "y", "val", markers=True, line=False),
        Series([float(x) for x in s.train_iterations], s.train_losses, "b", "train"),
    ]


def test_the_default_y_range_follows_the_recent_curve_and_marks_the_clipped_spike() -> None:
    series = _recorded_series()
    train = series[1]
    later = [y for x, y in zip(train.xs, train.ys, strict=True) if x >= 200]
    fitted = fit_range(series)
    assert fitted is not None and fitted.clipped == pytest.approx(10.5)
    # 1.4011: the last validation loss, 1.4 + 8 exp(-400 / 45), to the 4 decimals written here.
    assert fitted.low == pytest.approx(min(min(train.ys), 1.4011), abs=1e-3) and max(later) <= fitted.high
    # the later half fills at least half the height (it was ~5% with the first loss setting the scale)
    assert (max(later) - fitted.low) / (fitted.high - fitted.low) >= 0.49
    assert fit_range(series, "full") == YRange(fitted.low, pytest.approx(10.5))
    lines = plot(series, 100, 20, fitted)
    top, axis = lines[0].plain, lines[-1].plain
    assert "↑" in top[AXIS_WIDTH:AXIS_WIDTH + 20] and "↑" not in top[-30:]  # early columns only
    assert "up to 10.5" in axis
    assert "up to" not in plot(series, 100, 20, fit_range(series, "full"))[-1].plain


def test_a_steady_fall_is_never_clipped() -> None:
    xs = [float(x) for x in range(100)]
    assert fit_range([Series(xs, [4.0 - 3.0 * x / 99 for x in xs], "b", "train")]) == YRange(1.0, 4.0)
    rising = [1.0 + x / 99 for x in xs]
    assert fit_range([Series(xs, rising, "b", "train")]) == YRange(1.0, 2.0)


def test_validation_is_drawn_as_dots_not_a_line() -> None:
    dots = Series([0.0, 100.0], [2.0, 1.0], "y", "val", markers=True, line=False)
    lines = plot([dots], 40, 10, YRange(1.0, 2.0))
    body = [line.plain[AXIS_WIDTH:] for line in lines[:-1]]
    drawn = [(row, col) for row, text in enumerate(body) for col, ch in enumerate(text) if ch.strip()]
    assert drawn and all(col <= 1 or col >= len(body[0]) - 2 for _, col in drawn)  # nothing in between


def test_a_huge_spike_is_clipped_without_drawing_it_pixel_by_pixel() -> None:
    xs = [float(x) for x in range(1000)]
    ys = [1e12 if x == 10 else 1.0 + 0.5 * math.cos(x / 50) for x in xs]
    lines = plot([Series(xs, ys, "b", "train")], 120, 30)
    assert "up to 1.0e+12" in lines[-1].plain and lines[0].plain.startswith("   2.5")


def test_a_run_that_ends_says_finished_once_in_the_log() -> None:
    from tunetop.runs.console import describe

    s = folded()
    assert [line.message for line in s.logs if "finished" in line.message] == ["finished (completed) at iteration 400"]
    said = [describe(e) for e in recorded_events()]
    assert [line for line in said if line and "finished" in line] == ["finished (completed) at iteration 400"]
