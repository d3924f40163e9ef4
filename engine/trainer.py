"""The training loop, with mlx-swift-lm's ``LoRATrain`` semantics in Python form.

Read top to bottom: the parameters, the progress events a callback receives, the default
length-masked loss, ``evaluate``, the :class:`Trainer` (one compiled step, validation, save),
and ``train``, the loop that ties them together.

The progress callback sees ``Train``, ``Validation`` and ``Save`` events and returns
``Disposition.STOP`` or ``Disposition.MORE``; returning STOP ends the run right after the
event that returned it (the adapter is still saved). An optional ``control`` hook runs between
steps: the engine uses it to apply commands (pause, save, evaluate, set) without the loop
knowing about sockets.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map

from .adapters import numbered_checkpoints, prune_numbered, save_adapters
from .data import Batch, BatchPlan, Dataset
from .optimizers import Schedule


@dataclass
class TrainingParameters:
    """What ``LoRATrain.Parameters`` holds, plus the knobs the engine adds."""

    batch_size: int = 4
    iterations: int = 1000
    steps_per_report: int = 10
    steps_per_eval: int = 100
    validation_batches: int = 10  # 0 = the whole validation set
    save_every: int = 100
    adapter_path: Path = Path("adapters")
    max_seq_length: int = 2048
    grad_checkpoint: bool = False
    grad_accumulation_steps: int = 1
    seed: int = 0
    keep_last: int = 3
    adapter_config: dict[str, Any] = field(default_factory=dict)


class Disposition(enum.Enum):
    """What the progress callback wants next."""

    STOP = "stop"
    MORE = "more"


@dataclass
class Train:
    """Training progress over the last report interval."""

    iteration: int
    loss: float
    learning_rate: float
    iterations_per_second: float
    tokens_per_second: float
    trained_tokens: int
    peak_memory: float  # GB


@dataclass
class Validation:
    """A validation pass: mean loss per token, and how long it took."""

    iteration: int
    loss: float
    seconds: float


@dataclass
class Save:
    """An adapter written to ``path``."""

    iteration: int
    path: str
    kind: str = "adapter"


Progress = Train | Validation | Save
ProgressCallback = Callable[[Progress], "Disposition | None"]
LossFunction = Callable[[nn.Module, mx.array, mx.array], tuple[mx.array, mx.array]]


def default_loss(model: nn.Module, tokens: mx.array, lengths: mx.array) -> tuple[mx.array, mx.array]:
    """Cross-entropy over real tokens only; returns (mean loss, token count).

    ``lengths`` holds ``(offset, length)`` per row: targets before ``offset`` (a masked
    prompt) and at or past ``length`` (padding) do not count.
    """
    inputs = tokens[:, :-1]
    targets = tokens[:, 1:]
    logits = model(inputs)
    steps = mx.arange(1, targets.shape[1] + 1)
    mask = mx.logical_and(steps >= lengths[:, 0:1], steps < lengths[:, 1:])
    ce = nn.losses.cross_entropy(logits, targets) * mask
    count = mask.sum()
    return ce.astype(mx.float32).sum() / count, count


def evaluate(
    model: nn.Module,
    dataset: Dataset | BatchPlan,
    batch_size: int = 4,
    batch_count: int = 0,
    max_seq_length: int = 2048,
    loss: LossFunction = default_loss,
) -> float:
    """Mean per-token loss over ``batch_count`` batches (0 = the whole dataset)."""
    plan = (
        dataset
        if isinstance(dataset, BatchPlan)
        else BatchPlan(dataset, batch_size, max_seq_length, drop_last=False)
    )
    was_training = model.training
    model.eval()
    total = mx.array(0.0)
    count = mx.array(0)
    for batch in plan.fixed_sample(batch_count):
        value, tokens = loss(model, mx.array(batch.tokens), mx.array(batch.lengths))
        total = total + value * tokens
        count = count + tokens
        mx.eval(total, count)
    if was_training:
        model.train()
    return float((total / count).item()) if count.item() else float("nan")  # type: ignore[arg-type]


def grad_checkpoint(layer: nn.Module) -> None:
    """Recompute this layer type's activations in the backward pass (mx.checkpoint)."""
    cls = type(layer)
    original = cls.__call__

    def checkpointed(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        def inner(params: Any, *inner_args: Any, **inner_kwargs: Any) -> Any:
            self.update(params)
            return original(self, *inner_args, **inner_kwargs)

        return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

    cls.__call__ = checkpointed  # type: ignore[method-assign]


@dataclass
class StepResult:
    loss: float
    tokens: int


class Trainer:
    """Owns the model, optimizer, data position and compiled step of one run."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: Any,
        train_set: Dataset,
        valid_set: Dataset | None,
        parameters: TrainingParameters,
        schedule: Schedule,
        loss: LossFunction = default_loss,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.parameters = parameters
        self.schedule = schedule
        self.loss = loss
        self.train_plan = BatchPlan(train_set, parameters.batch_size, parameters.max_seq_length, parameters.seed)
        self.valid_plan = (
            BatchPlan(valid_set, parameters.batch_size, parameters.max_seq_length, parameters.seed, drop_last=False)
            if valid_set is not None
            else None
        )
        self.iteration = 0
        self.trained_tokens = 0
        self.epoch = 0
        self.position = 0
        self.learning_rate = schedule(0)
        self._batches: Iterator[tuple[int, int, Batch]] | None = None
        self._accumulated: Any = None
        if parameters.grad_checkpoint:
            grad_checkpoint(model.layers[0])  # type: ignore[attr-defined]
        mx.random.seed(parameters.seed)
        self._step = self._compile_step()
        model.train()

    def _compile_step(self) -> Callable[..., Any]:
        loss_and_grad = nn.value_and_grad(self.model, self.loss)
        accumulation = self.parameters.grad_accumulation_steps
        state = [self.model.state, self.optimizer.state, mx.random.state]

        @partial(mx.compile, inputs=state, outputs=state)
        def step(tokens: mx.array, lengths: mx.array, previous: Any, update: bool) -> Any:
            (value, count), grad = loss_and_grad(self.model, tokens, lengths)
            if previous is not None:
                grad = tree_map(lambda a, b: a + b, grad, previous)
            if update:
                if accumulation > 1:
                    grad = tree_map(lambda g: g / accumulation, grad)
                self.optimizer.update(self.model, grad)
                grad = None
            return value, count, grad

        self._state = state
        return step

    def next_batch(self) -> Batch:
        """The next training batch in the seeded order; remembers the position for resume."""
        if self._batches is None:
            self._batches = self.train_plan.iterate(self.epoch, self.position)
        epoch, index, batch = next(self._batches)
        self.epoch, self.position = epoch, index + 1
        return batch

    def step(self) -> StepResult:
        """One optimizer step (of ``grad_accumulation_steps`` micro-batches)."""
        self.learning_rate = self.schedule(self.iteration)
        self.optimizer.learning_rate = mx.array(self.learning_rate, dtype=mx.float32)
        accumulation = self.parameters.grad_accumulation_steps
        total_loss = 0.0
        total_tokens = 0
        for micro in range(accumulation):
            batch = self.next_batch()
            value, count, self._accumulated = self._step(
                mx.array(batch.tokens), mx.array(batch.lengths), self._accumulated, micro == accumulation - 1
            )
            mx.eval(self._state, value, count, self._accumulated)
            tokens = int(count.item())
            total_loss += value.item() * tokens
            total_tokens += tokens
        self.iteration += 1
        self.trained_tokens += total_tokens
        return StepResult(total_loss / max(total_tokens, 1), total_tokens)

    def validate(self) -> Validation | None:
        """Validation on ``validation_batches`` batches (0 = all); None without a validation set."""
        if self.valid_plan is None:
            return None
        start = time.perf_counter()
        value = evaluate(self.model, self.valid_plan, batch_count=self.parameters.validation_batches, loss=self.loss)
        return Validation(self.iteration, value, time.perf_counter() - start)

    def save(self) -> Save:
        """Write the adapter and a numbered copy; prune old numbered copies."""
        directory = self.parameters.adapter_path
        path = save_adapters(self.model, directory, self.parameters.adapter_config, iteration=self.iteration)
        prune_numbered(directory, self.parameters.keep_last)
        return Save(self.iteration, str(path))

    def numbered(self) -> list[tuple[int, Path]]:
        return numbered_checkpoints(self.parameters.adapter_path)


@dataclass
class TrainResult:
    """How a ``train`` call ended."""

    iteration: int
    reason: str  # "completed", "stopped"
    last_train_loss: float = math.nan
    last_validation_loss: float = math.nan


class Meter:
    """Accumulates steps between reports."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss_sum = 0.0
        self.tokens = 0
        self.steps = 0
        self.seconds = 0.0

    def add(self, result: StepResult, seconds: float) -> None:
        self.loss_sum += result.loss * result.tokens
        self.tokens += result.tokens
        self.steps += 1
        self.seconds += seconds

    def report(self, trainer: Trainer) -> Train:
        seconds = max(self.seconds, 1e-9)
        return Train(
            iteration=trainer.iteration,
            loss=self.loss_sum / max(self.tokens, 1),
            learning_rate=trainer.learning_rate,
            iterations_per_second=self.steps / seconds,
            tokens_per_second=self.tokens / seconds,
            trained_tokens=trainer.trained_tokens,
            peak_memory=mx.get_peak_memory() / 1e9,
        )


def _emit(progress: ProgressCallback | None, event: Progress) -> bool:
    """Send one event; True when the callback asked to stop."""
    return progress is not None and progress(event) is Disposition.STOP


def run_loop(
    trainer: Trainer,
    progress: ProgressCallback | None = None,
    control: Callable[[Trainer], Disposition | None] | None = None,
) -> TrainResult:
    """Train ``trainer`` from its current iteration to ``parameters.iterations``."""
    p = trainer.parameters
    meter = Meter()
    result = TrainResult(trainer.iteration, "completed")
    if trainer.iteration == 0 and (validation := trainer.validate()) is not None:
        result.last_validation_loss = validation.loss
        if _emit(progress, validation):
            result.reason = "stopped"
            return result
    while trainer.iteration < p.iterations:
        if control is not None and control(trainer) is Disposition.STOP:
            result.reason = "stopped"
            break
        start = time.perf_counter()
        step = trainer.step()
        meter.add(step, time.perf_counter() - start)
        it = trainer.iteration
        result.iteration = it
        stop = False
        # Intervals are read each step: a live `set` takes effect at once.
        if it % p.steps_per_report == 0 or it == p.iterations:
            report = meter.report(trainer)
            result.last_train_loss = report.loss
            meter.reset()
            stop = _emit(progress, report)
        if not stop and (it % p.steps_per_eval == 0 or it == p.iterations):
            validation = trainer.validate()
            if validation is not None:
                result.last_validation_loss = validation.loss
                stop = _emit(progress, validation)
        if not stop and it % p.save_every == 0 and it != p.iterations:
            stop = _emit(progress, trainer.save())
        if stop:
            result.reason = "stopped"
            break
    if trainer.iteration > 0:  # the adapter is saved however the run ended
        _emit(progress, trainer.save())
    return result


def train(
    model: nn.Module,
    train: Dataset,
    validate: Dataset | None,
    optimizer: Any,
    tokenizer: Any = None,
    parameters: TrainingParameters | None = None,
    loss: LossFunction = default_loss,
    progress: ProgressCallback | None = None,
    schedule: Schedule | None = None,
) -> TrainResult:
    """Fine-tune ``model`` (already adapted, e.g. by ``apply_fine_tuning``) as ``LoRATrain.train`` does.

    ``tokenizer`` is accepted for parity with the seed's signature; data arrives tokenized.
    Without a ``schedule`` the optimizer's initial learning rate is held constant.
    """
    parameters = parameters or TrainingParameters()
    if schedule is None:
        rate = float(np.asarray(optimizer.learning_rate))
        schedule = lambda _step: rate  # noqa: E731
    trainer = Trainer(model, optimizer, train, validate, parameters, schedule, loss)
    return run_loop(trainer, progress)
