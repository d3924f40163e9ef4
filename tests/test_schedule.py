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
        OptimizerConfig(learning_rate=1.0), ScheduleConfig(name="cosine", warmup=10, warmup_init=0.0, decay_steps=100), 111
    )
    assert rate(0) == 0.0
    assert rate(5) == pytest.approx(0.5)
    assert rate(10) == pytest.approx(1.0)  # the warmup's end, then the cosine's start: the peak twice, as in mlx-lm
    assert rate(11) == pytest.approx(1.0)
    assert rate(61) == pytest.approx(0.5)
    assert rate(111) == pytest.approx(0.0, abs=1e-12)  # 0.5 * (1 + cos(pi)): a few roundings of 1.0


@pytest.mark.parametrize(
    ("schedule", "theirs"),
    [
        (ScheduleConfig(name="cosine", warmup=5, warmup_init=1e-7, decay_steps=20, end_learning_rate=1e-6),
         {"name": "cosine_decay", "warmup": 5, "warmup_init": 1e-7, "arguments": [1e-3, 20, 1e-6]}),
        (ScheduleConfig(name="linear", decay_steps=20, end_learning_rate=1e-6),
         {"name": "linear_schedule", "arguments": [1e-3, 1e-6, 20]}),
        (ScheduleConfig(name="linear", warmup=3, decay_steps=20, end_learning_rate=0.0),
         {"name": "linear_schedule", "warmup": 3, "arguments": [1e-3, 0.0, 20]}),
    ],
)
def test_schedules_follow_mlx_lm_step_by_step(schedule: ScheduleConfig, theirs: dict) -> None:
    """The rate of every step is mlx_lm.lora's for the same lr_schedule (its build_schedule)."""
    from mlx_lm.tuner.utils import build_schedule as mlx_lm_schedule

    ours = build_schedule(OptimizerConfig(learning_rate=1e-3), schedule, 40)
    reference = mlx_lm_schedule(theirs)
    for step in range(40):
        # mlx computes in float32: a few roundings of 6e-8 relative to the peak (1e-3) each.
        assert ours(step) == pytest.approx(float(reference(step)), rel=1e-6, abs=1e-9), step
