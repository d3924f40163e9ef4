"""Learning-rate schedules are pure functions of the step.

They compute in Python floats (doubles): a handful of roundings of 1.1e-16 each, so
pytest.approx's default (rel=1e-6) holds with room to spare on any machine.
"""

from __future__ import annotations

import pytest

from engine.config import OptimizerConfig, ScheduleConfig
from engine.optimizers import build_schedule


def test_constant() -> None:
    rate = build_schedule(OptimizerConfig(learning_rate=1e-3), ScheduleConfig(), 100)
    assert [rate(s) for s in (0, 50, 99)] == [1e-3, 1e-3, 1e-3]


def test_linear_matches_the_seeds_linear_schedule() -> None:
    # LinearSchedule(init: 1e-3, end: 1e-4, steps: 10)
    rate = build_schedule(
        OptimizerConfig(learning_rate=1e-3), ScheduleConfig(name="linear", end_learning_rate=1e-4, decay_steps=10), 100
    )
    assert rate(0) == pytest.approx(1e-3)
    assert rate(5) == pytest.approx(5.5e-4)
    assert rate(10) == pytest.approx(1e-4)
    assert rate(50) == pytest.approx(1e-4)


def test_cosine_with_warmup() -> None:
    rate = build_schedule(
        OptimizerConfig(learning_rate=1.0), ScheduleConfig(name="cosine", warmup=10, warmup_init=0.0), 110
    )
    assert rate(0) == 0.0
    assert rate(5) == pytest.approx(0.5)
    assert rate(10) == pytest.approx(1.0)
    assert rate(60) == pytest.approx(0.5)
    assert rate(110) == pytest.approx(0.0, abs=1e-12)  # 0.5 * (1 + cos(pi)): a few roundings of 1.0
