"""Optimizers and learning-rate schedules.

The schedule is a plain Python function of the iteration, evaluated before each step and fed
to the optimizer as an array. Keeping it outside the compiled step means a live ``set
learning_rate`` takes effect at the next step without recompiling, and a resumed run needs
only the iteration number to be back on the same curve.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from .config import OptimizerConfig, ScheduleConfig

Schedule = Callable[[int], float]


def build_schedule(optimizer: OptimizerConfig, schedule: ScheduleConfig, iterations: int) -> Schedule:
    """Learning rate as a function of the step about to run (0-based).

    ``linear`` with ``learning_rate=a``, ``end_learning_rate=b``, ``decay_steps=n`` is the
    seed's ``LinearSchedule(a, b, n)``; ``warmup`` steps ramp from ``warmup_init`` first.
    """
    peak = optimizer.learning_rate
    end = schedule.end_learning_rate
    warmup = schedule.warmup
    decay = schedule.decay_steps or max(iterations - warmup, 1)

    def body(step: int) -> float:
        if schedule.name == "constant":
            return peak
        t = min(max(step, 0), decay) / decay
        if schedule.name == "linear":
            return peak + (end - peak) * t
        return end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * t))

    def rate(step: int) -> float:
        if step < warmup:
            return schedule.warmup_init + (peak - schedule.warmup_init) * step / warmup
        return body(step - warmup)

    return rate


def build_optimizer(config: OptimizerConfig) -> Any:
    """An mlx optimizer whose learning rate the trainer sets before each step."""
    import mlx.optimizers as optim

    rate = config.learning_rate
    if config.name == "adam":
        return optim.Adam(learning_rate=rate)
    if config.name == "adamw":
        return optim.AdamW(learning_rate=rate, weight_decay=config.weight_decay)
    if config.name == "sgd":
        return optim.SGD(learning_rate=rate, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.name == "adafactor":
        return optim.Adafactor(learning_rate=rate, relative_step=False, scale_parameter=False)
    raise ValueError(f"unknown optimizer {config.name!r}")
