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
        # As mlx_lm.lora joins them: the warmup reaches the peak at step ``warmup``, and the
        # schedule starts (at the peak again) at the step after it.
        if step <= warmup and warmup:
            return schedule.warmup_init + (peak - schedule.warmup_init) * step / warmup
        return body(step - warmup - 1 if warmup else step)

    return rate


CLASSES = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD", "adafactor": "Adafactor", "muon": "Muon"}
"""optimizer.name -> its mlx.optimizers class, as mlx_lm.lora picks them."""


def optimizer_arguments(config: OptimizerConfig) -> dict[str, Any]:
    """The keyword arguments (besides the learning rate) tunetop gives the optimizer's class:
    the keys of [optimizer] that apply to it, then ``options``; the class's defaults for the rest."""
    name = config.name
    arguments: dict[str, Any] = {}
    if name in ("adam", "adamw"):
        arguments.update(betas=list(config.betas), eps=config.eps, bias_correction=config.bias_correction)
    if name in ("adamw", "sgd"):
        arguments["weight_decay"] = config.weight_decay
    if name == "sgd":
        arguments["momentum"] = config.momentum
    if name == "adafactor":
        # tunetop's Adafactor follows the learning rate it is given; mlx's default (and mlx_lm.lora's)
        # computes its own from the step. options = { relative_step = true, scale_parameter = true } is that.
        arguments.update(relative_step=False, scale_parameter=False)
    arguments.update(config.options)
    return arguments


def build_optimizer(config: OptimizerConfig, source: str = "") -> Any:
    """An mlx optimizer whose learning rate the trainer sets before each step.

    ``optimizer.options`` are checked against the class's arguments (a ConfigError names a wrong one).
    """
    import inspect

    import mlx.optimizers as optim

    from .config import ConfigError

    cls = getattr(optim, CLASSES[config.name])
    accepted = [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "learning_rate")]
    explicit = set(optimizer_arguments(config.__class__(name=config.name))) - {"relative_step", "scale_parameter"}
    for key in config.options:
        if key in explicit:
            raise ConfigError(f"{source or 'config'}: optimizer.options.{key}: set it as optimizer.{key} instead.")
        if key not in accepted:
            raise ConfigError(
                f"{source or 'config'}: optimizer.options.{key} is not an argument of mlx.optimizers.{cls.__name__}; "
                f"its arguments: {', '.join(accepted)}."
            )
    try:
        return cls(learning_rate=config.learning_rate, **optimizer_arguments(config))
    except (ValueError, TypeError) as error:  # mlx checks the values (a beta out of range...)
        raise ConfigError(f"{source or 'config'}: optimizer {config.name}: {error}") from None
